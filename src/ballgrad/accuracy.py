"""The trust table: accuracy assumptions about library functions (DESIGN.md §2, "trust boundary").

exp, log, tanh, erf, sin, ... are not correctly rounded, and nothing in ballgrad can prove how accurate a vendor's
implementation is. This module is the one place where such an assumption is written down: per library function and
backend, a *declared* maximal error in ulps, where the number comes from, and the *margin* ballgrad actually uses
(at least twice the declared value). ``tests/test_accuracy_table.py`` checks every CPU entry against mpmath on many
points, hard cases included, and fails if an observed error ever exceeds the declared value (not the margin).

Only float64 implementations are trusted. Every elementwise rule evaluates its library function in float64 on exactly
widened end points (float16, bfloat16 and float32 values convert exactly), whatever the midpoint dtype, so the float32
and float16 kernels are never trusted: their midpoints are compared with rigorous float64 enclosures.

Backends. "cpu" is what a float64 CPU tensor op runs in PyTorch: SLEEF u10/u15 vector kernels, glibc libm scalar
loops (tails and non-vectorised paths) and MKL VM (high-accuracy mode) for ops routed through ``at::vml``; the
declared value is the maximum over the three. "cuda" is NVIDIA's libdevice (CUDA C++ Programming Guide, Mathematical
Functions appendix, double-precision table; maximal ulp errors over the full range).

Error model. "k ulps" means |lib(x) - f(x)| <= k ulp(f(x)) with ulp(y) = 2^(e-52) for 2^e <= |y| < 2^(e+1) normal and
eta = 2^-1074 in the subnormal range, so ulp(y) <= 2u|y| + eta with u = 2^-53 (this also covers ulps measured at the
computed value). ``f64_error_bound`` turns a margin of K ulps into a bound from the computed value v alone: with
|f(x)| <= |v| + err, err <= K(2u(|v| + err) + eta), i.e.

    err <= K (2u|v| + eta) / (1 - 2Ku) = c_rel |v| + c_abs,

with c_rel >= 2Ku/(1 - 2Ku) and c_abs >= K eta/(1 - 2Ku) rounded up offline (exact rationals, ``round_up_float``),
and the run-time expression c_rel|v| + c_abs made an upper bound by ``rounding.inflate(., 2)`` (one product of two
inputs plus one addition). An infinite or NaN computed value gives err = +inf: such a value carries no information.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import torch

from ballgrad import rounding
from ballgrad.errors import UnsupportedOpError

__all__ = [
    "Entry",
    "TABLE",
    "EVALUATORS",
    "backend_for",
    "entry",
    "f64_error_bound",
    "enclose",
]

_F64 = torch.float64


@dataclass(frozen=True)
class Entry:
    """One trust assumption: ``function`` on ``backend`` in float64 errs by at most ``declared_ulps`` ulps (according
    to ``source``); ballgrad bounds it with ``margin_ulps`` (>= 2 x declared)."""

    function: str
    backend: str
    declared_ulps: float
    margin_ulps: float
    source: str


# float64 evaluators: exactly the torch calls whose accuracy the table declares and the tests measure.
EVALUATORS: dict[str, Callable] = {
    "exp": torch.exp,
    "expm1": torch.expm1,
    "log": torch.log,
    "log1p": torch.log1p,
    "log2": torch.log2,
    "log10": torch.log10,
    "tanh": torch.tanh,
    "sin": torch.sin,
    "cos": torch.cos,
    "atan": torch.atan,
    "erf": torch.erf,
    "erfc": torch.erfc,
    "sqrt": torch.sqrt,
    "sinh": torch.sinh,
    "asinh": torch.asinh,
    "acosh": torch.acosh,
    "exp2": torch.exp2,
    "pow": torch.pow,  # pow(x, y): tensor^tensor, tensor^scalar (never an exponent PyTorch special-cases) or scalar^tensor
}

_CPU_GENERIC = (
    "max over backends: SLEEF u10 documentation (1.0 ULP), glibc x86_64 libm-test-ulps (double) and MKL VM HA "
    "(< 1 ulp)"
)

# (declared cpu ulps, cpu source, declared cuda ulps, cuda source)
_DECLARED: dict[str, tuple[float, str, float, str]] = {
    "exp": (1, _CPU_GENERIC, 1, ""),
    "expm1": (1, _CPU_GENERIC, 1, ""),
    "log": (1, _CPU_GENERIC, 1, ""),
    "log1p": (1, _CPU_GENERIC, 1, ""),
    "log2": (2, "glibc x86_64 libm-test-ulps log2 (double): 2; SLEEF u10: 1.0 ULP; MKL VM HA < 1 ulp", 1, ""),
    "log10": (2, "glibc x86_64 libm-test-ulps log10 (double): 2; SLEEF u10: 1.0 ULP; MKL VM HA < 1 ulp", 1, ""),
    "tanh": (2, "glibc x86_64 libm-test-ulps tanh (double): 2; SLEEF u10: 1.0 ULP; MKL VM HA < 1 ulp", 1, ""),
    "sin": (1, _CPU_GENERIC + "; all arguments (SLEEF and glibc reduce arguments exactly)", 2, ""),
    "cos": (1, _CPU_GENERIC + "; all arguments (SLEEF and glibc reduce arguments exactly)", 2, ""),
    "atan": (1, _CPU_GENERIC, 2, ""),
    "erf": (1, _CPU_GENERIC, 2, ""),
    "erfc": (5, "glibc x86_64 libm-test-ulps erfc (double): 5; SLEEF erfc u15: 1.5 ULP; MKL VM HA < 1 ulp", 5, ""),
    "sqrt": (
        1,
        "DESIGN.md: PyTorch's CPU sqrt is not assumed correctly rounded (SLEEF/MKL vector paths); 1 ulp assumed",
        1,
        "CUDA guide: 0 ulp (IEEE sqrt); declared 1 ulp like the CPU",
    ),
    "pow": (1, "SLEEF pow u10: 1.0 ULP; glibc pow (double) < 1 ulp; MKL VM HA < 1 ulp", 2, ""),
    # measured max over tests/test_accuracy_table.py's point sets (vector and short-slice paths): sinh 1.33, asinh 1.48,
    # acosh 1.45, exp2 0.76 ulps
    "sinh": (2, "glibc x86_64 libm-test-ulps sinh (double): 2; SLEEF sinh u10: 1.0 ULP; MKL VM HA < 1 ulp", 2, ""),
    "asinh": (2, "glibc x86_64 libm-test-ulps asinh (double): 2; SLEEF asinh u10: 1.0 ULP; MKL VM HA < 1 ulp", 3, ""),
    "acosh": (2, "glibc x86_64 libm-test-ulps acosh (double): 2; SLEEF acosh u10: 1.0 ULP; MKL VM HA < 1 ulp", 3, ""),
    "exp2": (1, "glibc x86_64 libm-test-ulps exp2 (double): 1; SLEEF exp2 u10: 1.0 ULP; MKL VM HA < 1 ulp", 2, ""),
}

_CUDA_SOURCE = "CUDA C++ Programming Guide, Mathematical Functions, double-precision table (libdevice)"


def _build_table() -> dict[tuple[str, str], Entry]:
    table = {}
    for name, (cpu_ulps, cpu_src, cuda_ulps, cuda_src) in _DECLARED.items():
        table[(name, "cpu")] = Entry(name, "cpu", cpu_ulps, 2 * cpu_ulps, cpu_src)
        table[(name, "cuda")] = Entry(name, "cuda", cuda_ulps, 2 * cuda_ulps, cuda_src or f"{_CUDA_SOURCE}: {cuda_ulps}")
    for e in table.values():
        assert e.margin_ulps >= 2 * e.declared_ulps > 0, e
    return table


TABLE: dict[tuple[str, str], Entry] = _build_table()


def backend_for(device_type: str) -> str:
    """The table's backend for a torch device type."""
    if device_type in ("cpu", "cuda"):
        return device_type
    raise UnsupportedOpError(
        f"library functions on {device_type!r}",
        "ballgrad's accuracy table (src/ballgrad/accuracy.py) has entries for 'cpu' and 'cuda' only; "
        "add measured entries for this backend before trusting its float64 library",
    )


def entry(name: str, device_type: str) -> Entry:
    """The table entry for library function ``name`` on ``device_type`` ("cpu", "cuda")."""
    key = (name, backend_for(device_type))
    if key not in TABLE:
        raise KeyError(f"no accuracy-table entry for {name!r} on {key[1]!r}")
    return TABLE[key]


@functools.lru_cache(maxsize=None)
def _coefficients(name: str, backend: str) -> tuple[float, float]:
    """(c_rel, c_abs) >= (2Ku/(1 - 2Ku), K eta/(1 - 2Ku)) for the margin K, rounded up (module docstring)."""
    k = Fraction(TABLE[(name, backend)].margin_ulps)
    u = rounding.unit_roundoff_exact(_F64)
    eta = Fraction(rounding.eta(_F64))
    denominator = 1 - 2 * k * u
    return rounding.round_up_float(2 * k * u / denominator), rounding.round_up_float(k * eta / denominator)


def f64_error_bound(name: str, value: torch.Tensor, device_type: str | None = None) -> torch.Tensor:
    """Upper bound on |lib(x) - f(x)| for the float64 values ``value`` = lib(x) of library function ``name``.

    err = inflate(c_rel |v| + c_abs, 2) (module docstring); +inf where v is infinite or NaN.
    """
    if value.dtype != _F64:
        raise TypeError(f"the trust table is for float64 library values, got {value.dtype}")
    c_rel, c_abs = _coefficients(name, backend_for(device_type or value.device.type))
    return rounding.inflate(torch.abs(value) * c_rel + c_abs, 2)


def enclose(name: str, *args, device_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower, upper) with lower <= f(args) <= upper exactly, for float64 arguments (tensors or exact Python floats).

    v = EVALUATORS[name](*args) in float64; lower = pred(v - err), upper = succ(v + err) (F2) with
    err = ``f64_error_bound``. NaN (an infinite v, or an argument outside the domain) means "unknown".
    """
    for a in args:
        if isinstance(a, torch.Tensor) and a.dtype != _F64:
            raise TypeError(f"library functions are evaluated on float64 arguments, got {a.dtype}")
    v = EVALUATORS[name](*args)
    err = f64_error_bound(name, v, device_type)
    return rounding.sub_down(v, err), rounding.add_up(v, err)
