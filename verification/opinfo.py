"""OpInfo coverage: ballgrad against every op of PyTorch's ``op_db`` that has float32/float64 samples (issue 5).

For each op and each of its CPU samples (``op.sample_inputs(device='cpu', dtype=...)``):

1. the plain op runs on the sample; a sample on which plain PyTorch itself raises is skipped (not ballgrad's problem);
2. every floating tensor argument (the input, positional and keyword arguments, tensors inside lists) is wrapped as a
   point ball ``ballgrad.ball(t)`` -- and, for the first sample of every op, also as a small-radius ball
   (r = 2^-12 |t| + 2^-20, the sample's midpoints unchanged) -- and the op runs on the balls;
3. the outcome is recorded: ``UnsupportedOpError`` (honest: no rule, the message names the aten overload), any other
   exception raised under ballgrad (a bug: a rule must raise ``UnsupportedOpError`` for inputs it cannot bound), or
   a result, whose midpoints must be identical to the plain op's (``torch.equal`` with NaN-awareness and signed
   zeros) and whose floating outputs must be balls;
4. containment is checked with the strongest reference available, and labelled with it:
   - ``mpmath``: elementwise ops mapped to an mpmath function (``ELEMENTWISE``): sampled elements at 256 bits, at the
     midpoints and at points of the input balls (end points and interior), decided exactly;
   - ``exact oracle``: the op traced with ``make_fx`` on the plain sample and interpreted by ``verification.oracle``
     (exact dyadic arithmetic / 256-bit roundings, no code shared with ``ballgrad.ops``), at the midpoints and, for
     radius balls, at an interior point;
   - ``float64 reference (weaker)``: float32 samples only, the op evaluated in float64 on the exactly widened
     midpoints, |f64 - mid| <= rad + 2^-28 |f64| (the float64 result is not exact: this is evidence, not proof);
   - ``none``: nothing to compare with (float64 samples of ops neither mpmath nor the oracle can evaluate);
5. backward, where the op supports autograd and the sample's input requires grad: ``torch.autograd.grad`` of the
   floating outputs with seeded plain cotangents, on balls and on plain tensors; the gradients must be balls with
   identical midpoints, and are checked like forward outputs (oracle or float64 reference).

An op is ``supported`` when every checked sample ran without exception, with identical midpoints and no containment
failure; ``partial`` when some samples raised ``UnsupportedOpError`` and the others passed; ``unsupported`` when all
raised it; ``error`` when some sample raised anything else or failed a check; ``n/a`` when no sample has a floating
tensor argument (factory functions such as ``zeros``/``randn``: nothing to wrap as a ball).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import random
import time
import traceback
import warnings
from fractions import Fraction

import mpmath
import torch
import torch.utils._pytree as pytree

import ballgrad
from ballgrad.errors import BallgradError, UndecidedComparisonError, UnsupportedOpError
from ballgrad.tensor import BallTensor
from ballgrad.testing import contains_exact

DTYPES = (torch.float32, torch.float64)
RADIUS_REL = 2.0**-12
RADIUS_ABS = 2.0**-20
# Relative slack of the float64 reference (weaker): PyTorch's own float64 special functions are not accurate to the
# last bits (polygamma(1, x) is off by up to ~3e-10 relative; airy_ai/bessel_y1 by ~1e-8, which is why those
# have mpmath references), so a tight slack reports false alarms against radii that mpmath confirms.
WEAK_SLACK = 2.0**-28
# Ops whose PyTorch float64 kernels are off by far more than WEAK_SLACK on ordinary arguments (bessel_y1: 2e-7
# relative at x = 3.3 on an AMD EPYC CPU), and whose gradient graphs the exact oracle cannot run (their backward
# selects -inf at 0 through a non-finite scalar). Their gradients get no float64 check: it reports false alarms
# against radii that mpmath confirms. Their forward balls, and every rule of their backward graphs (the functions
# themselves, mul, sub, reciprocal, where), are checked against mpmath. Bessel J0/J1 gradients go to the exact
# oracle (mpmath's besselj) instead.
FLOAT64_GRADIENT_UNRELIABLE = {"special.bessel_y0", "special.bessel_y1"}
MPMATH_PREC = 256
MAX_CHECKED_ELEMENTS = 48

# Ops whose output memory is uninitialised: only dtype and shape are compared, and the radius must be +inf.
UNINITIALISED = {"empty_like", "new_empty", "new_empty_strided", "empty", "empty_strided", "empty_permuted"}
# Random ops: the ball run and the plain run share the generator state; there is no reference to compare with.
RANDOM = {"randn_like", "rand_like", "randint_like"}
# Ops that convert an integer result (an index) to float *outside* ballgrad: the plain float output is exact.
INDEX_AS_FLOAT = {"masked.argmax", "masked.argmin"}
# Known midpoint deviations that ballgrad cannot remove, with the reason (PyTorch takes another path for subclasses).
SUBCLASS_PATH = {
    "masked_fill": "backward of the fill value: PyTorch's masked_fill_backward (FunctionsManual.cpp) sums "
                   "where(mask, grad, 0) for tensor subclasses but masked_select(grad, mask) for plain tensors; the "
                   "two summation orders can differ in the last bit",
    "prod": "backward: PyTorch's prod_backward (FunctionsManual.cpp) always takes the zero-safe cumprod path for tensor "
            "subclasses (Composite Compliance) but grad * result / input for plain tensors without zeros",
    "masked.prod": "backward: as prod (prod_backward takes the zero-safe path for tensor subclasses)",
}


def load_op_db():
    """op_db (importing it needs ``expecttest``, a dev dependency)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.testing._internal.common_methods_invocations import op_db
    return op_db


def op_name(op) -> str:
    return op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")


def float_ops(op_db=None):
    """The op_db entries with float32 or float64 CPU support (the denominator of the coverage share)."""
    op_db = load_op_db() if op_db is None else op_db
    out = []
    for op in op_db:
        try:
            dts = op.supported_dtypes("cpu")
        except Exception:  # pragma: no cover - a broken OpInfo entry
            continue
        if any(d in dts for d in DTYPES):
            out.append(op)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Elementwise ops with an mpmath meaning (for the strongest containment check)


def _mp_div(a, b):
    return a / b if b != 0 else None


def _mp_fmod(a, b):
    if b == 0:
        return None
    q = a / b
    return a - b * (mpmath.floor(q) if q >= 0 else mpmath.ceil(q))


def _mp_remainder(a, b):
    if b == 0:
        return None
    return a - b * mpmath.floor(a / b)


def _mp_sign(a):
    return mpmath.mpf(0) if a == 0 else (mpmath.mpf(1) if a > 0 else mpmath.mpf(-1))


def _mp_real(fn):
    """fn with complex or undefined values mapped to None (the real function is undefined there)."""

    def wrapped(*args):
        try:
            v = fn(*args)
        except (ZeroDivisionError, ValueError):
            return None
        if v is None or isinstance(v, mpmath.mpc) or mpmath.isnan(v) or mpmath.isinf(v):
            return None
        return v

    return wrapped


def _mp_round(a):
    f = mpmath.floor(a)
    d = a - f
    if d > 0.5:
        return f + 1
    if d < 0.5:
        return f
    return f if int(f) % 2 == 0 else f + 1


def _mp_xlogy(x, y):
    if x == 0:
        return mpmath.mpf(0)
    return x * mpmath.log(y) if y > 0 else None


def _mp_logit(x, eps=None):
    if eps is not None:
        x = min(max(x, eps), 1 - eps)
    return mpmath.log(x / (1 - x)) if 0 < x < 1 else None


def _mp_degree(n):
    return int(mpmath.floor(n)) if n >= 0 else int(mpmath.ceil(n))


def _mp_recurrence(x, n, p1):
    if n == 0:
        return mpmath.mpf(1)
    prev, cur = mpmath.mpf(1), p1
    for _ in range(n - 1):
        prev, cur = cur, 2 * x * cur - prev
    return cur


def _mp_orth(kind, shifted=False):
    def fn(x, n):
        k = _mp_degree(n)
        if shifted:
            x = 2 * x - 1
        if k < 0:
            return mpmath.mpf(0)
        if kind == "t":
            return mpmath.chebyt(k, x)
        if kind == "u":
            return mpmath.chebyu(k, x)
        if kind == "v":
            return _mp_recurrence(x, k, 2 * x - 1)
        if kind == "w":
            return _mp_recurrence(x, k, 2 * x + 1)
        if kind == "h":
            return mpmath.hermite(k, x)
        if kind == "he":
            return mpmath.hermite(k, x / mpmath.sqrt(2)) / mpmath.sqrt(2) ** k
        if kind == "l":
            return mpmath.laguerre(k, 0, x)
        return mpmath.legendre(k, x)

    return fn


ELEMENTWISE = {
    "abs": abs,
    "neg": lambda a: -a,
    "positive": lambda a: a,
    "exp": mpmath.exp,
    "exp2": lambda a: mpmath.power(2, a),
    "expm1": mpmath.expm1,
    "log": mpmath.log,
    "log2": lambda a: mpmath.log(a, 2),
    "log10": mpmath.log10,
    "log1p": mpmath.log1p,
    "sqrt": mpmath.sqrt,
    "rsqrt": lambda a: 1 / mpmath.sqrt(a),
    "reciprocal": lambda a: 1 / a,
    "square": lambda a: a * a,
    "sin": mpmath.sin,
    "cos": mpmath.cos,
    "tan": mpmath.tan,
    "asin": mpmath.asin,
    "acos": mpmath.acos,
    "atan": mpmath.atan,
    "sinh": mpmath.sinh,
    "cosh": mpmath.cosh,
    "tanh": mpmath.tanh,
    "asinh": mpmath.asinh,
    "acosh": mpmath.acosh,
    "atanh": mpmath.atanh,
    "sigmoid": lambda a: 1 / (1 + mpmath.exp(-a)),
    "logit": _mp_logit,
    "erf": mpmath.erf,
    "erfc": mpmath.erfc,
    "erfinv": mpmath.erfinv,
    "lgamma": lambda a: mpmath.log(abs(mpmath.gamma(a))),
    "digamma": mpmath.digamma,
    "sinc": lambda a: mpmath.sincpi(a),
    "deg2rad": lambda a: a * mpmath.pi / 180,
    "rad2deg": lambda a: a * 180 / mpmath.pi,
    "floor": mpmath.floor,
    "ceil": mpmath.ceil,
    "trunc": lambda a: mpmath.floor(a) if a >= 0 else mpmath.ceil(a),
    "frac": lambda a: a - (mpmath.floor(a) if a >= 0 else mpmath.ceil(a)),
    "round": _mp_round,
    "sign": _mp_sign,
    "sgn": _mp_sign,
    "special.ndtr": lambda a: mpmath.ncdf(a),
    "special.ndtri": lambda a: mpmath.sqrt(2) * mpmath.erfinv(2 * a - 1),
    "special.log_ndtr": lambda a: mpmath.log(mpmath.ncdf(a)),
    "special.erfcx": lambda a: mpmath.exp(a * a) * mpmath.erfc(a),
    "special.i0e": lambda a: mpmath.exp(-abs(a)) * mpmath.besseli(0, a),
    "special.i1": lambda a: mpmath.besseli(1, a),
    "special.i1e": lambda a: mpmath.exp(-abs(a)) * mpmath.besseli(1, a),
    "i0": lambda a: mpmath.besseli(0, a),
    "special.entr": lambda a: -a * mpmath.log(a) if a > 0 else (mpmath.mpf(0) if a == 0 else None),
    "special.bessel_j0": lambda a: mpmath.besselj(0, a),
    "special.bessel_j1": lambda a: mpmath.besselj(1, a),
    "special.modified_bessel_i0": lambda a: mpmath.besseli(0, a),
    "special.modified_bessel_i1": lambda a: mpmath.besseli(1, a),
    "special.airy_ai": lambda a: mpmath.airyai(a),
    "special.polygamma.special_polygamma_n_0": lambda x, n: mpmath.psi(int(n), x),
    "special.bessel_y0": lambda a: mpmath.bessely(0, a) if a > 0 else None,
    "special.bessel_y1": lambda a: mpmath.bessely(1, a) if a > 0 else None,
    "special.modified_bessel_k0": lambda a: mpmath.besselk(0, a) if a > 0 else None,
    "special.modified_bessel_k1": lambda a: mpmath.besselk(1, a) if a > 0 else None,
    "special.scaled_modified_bessel_k0": lambda a: mpmath.exp(a) * mpmath.besselk(0, a) if a > 0 else None,
    "special.scaled_modified_bessel_k1": lambda a: mpmath.exp(a) * mpmath.besselk(1, a) if a > 0 else None,
    "special.spherical_bessel_j0": lambda a: mpmath.sin(a) / a if a != 0 else mpmath.mpf(1),
    "polygamma.polygamma_n_0": lambda x, n: mpmath.psi(int(n), x),
    "polygamma.polygamma_n_1": lambda x, n: mpmath.psi(int(n), x),
    "polygamma.polygamma_n_2": lambda x, n: mpmath.psi(int(n), x),
    "polygamma.polygamma_n_3": lambda x, n: mpmath.psi(int(n), x),
    "polygamma.polygamma_n_4": lambda x, n: mpmath.psi(int(n), x),
    "special.zeta": lambda s, q: mpmath.zeta(s, q) if (s > 1 and q > 0) else None,
    "igamma": lambda a, x: mpmath.gammainc(a, 0, x, regularized=True) if (a > 0 and x >= 0) else None,
    "igammac": lambda a, x: mpmath.gammainc(a, x, mpmath.inf, regularized=True) if (a > 0 and x >= 0) else None,
    **{f"special.{pre}{name}": _mp_orth(kind, pre == "shifted_")
       for pre in ("", "shifted_") for name, kind in (("chebyshev_polynomial_t", "t"), ("chebyshev_polynomial_u", "u"),
                                                     ("chebyshev_polynomial_v", "v"), ("chebyshev_polynomial_w", "w"))},
    "special.hermite_polynomial_h": _mp_orth("h"),
    "special.hermite_polynomial_he": _mp_orth("he"),
    "special.laguerre_polynomial_l": _mp_orth("l"),
    "special.legendre_polynomial_p": _mp_orth("p"),
    "nn.functional.tanhshrink": lambda a: a - mpmath.tanh(a),
    "nn.functional.softsign": lambda a: a / (1 + abs(a)),
    "nn.functional.logsigmoid": lambda a: -mpmath.log1p(mpmath.exp(-a)),
    "nn.functional.silu": lambda a: a / (1 + mpmath.exp(-a)),
    "nn.functional.mish": lambda a: a * mpmath.tanh(mpmath.log1p(mpmath.exp(a))),
    # binary
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div.no_rounding_mode": _mp_div,
    "true_divide": _mp_div,
    "atan2": lambda a, b: mpmath.atan2(a, b) if (a != 0 or b != 0) else mpmath.mpf(0),
    "hypot": lambda a, b: mpmath.sqrt(a * a + b * b),
    "fmod": _mp_fmod,
    "remainder": _mp_remainder,
    "copysign": lambda a, b: abs(a) if b >= 0 else -abs(a),
    "xlogy": _mp_xlogy,
    "special.xlog1py": lambda x, y: mpmath.mpf(0) if x == 0 else (x * mpmath.log1p(y) if y > -1 else None),
    "maximum": max,
    "minimum": min,
    "fmax": max,
    "fmin": min,
    "logaddexp": lambda a, b: mpmath.log(mpmath.exp(a) + mpmath.exp(b)),
    "logaddexp2": lambda a, b: mpmath.log(mpmath.power(2, a) + mpmath.power(2, b), 2),
}

def _arity(fn) -> int:
    import inspect

    try:
        return len(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return 1 if fn not in (max, min) else 2


ARITY = {k: (2 if v in (max, min) else _arity(v)) for k, v in ELEMENTWISE.items()}
ELEMENTWISE = {k: _mp_real(v) for k, v in ELEMENTWISE.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Wrapping samples


def _is_float_tensor(t) -> bool:
    return isinstance(t, torch.Tensor) and not isinstance(t, BallTensor) and t.is_floating_point() \
        and t.layout == torch.strided


def radius_for(t: torch.Tensor) -> torch.Tensor:
    """The small radius of the radius-ball runs: 2^-12 |t| + 2^-20 (float64, rounded by ``ball``)."""
    a = t.detach().to(torch.float64).abs()
    return torch.nan_to_num(a * RADIUS_REL + RADIUS_ABS, nan=0.0, posinf=0.0)


def wrap(obj, with_radius: bool):
    """``obj`` (a pytree of sample arguments) with every floating strided tensor as a ball: point balls, or balls of
    radius ``radius_for`` (midpoints unchanged). ``requires_grad`` is carried over."""

    def leaf(t):
        if not _is_float_tensor(t):
            return t
        mid = t.detach().clone()
        b = ballgrad.ball(mid, radius_for(t) if with_radius else None)
        if t.requires_grad:
            b.requires_grad_(True)
        return b

    return pytree.tree_map(leaf, obj)


def float_leaves(obj) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(obj) if _is_float_tensor(t) or isinstance(t, BallTensor)]


def _clone_sample(sample):
    """(input, args, kwargs) deep-copied (tensors cloned with their requires_grad), so in-place ops do not leak."""

    def leaf(t):
        if isinstance(t, torch.Tensor):
            c = t.detach().clone()
            if t.requires_grad:
                c.requires_grad_(True)
            return c
        return copy.copy(t) if isinstance(t, (list, dict)) else t

    return pytree.tree_map(leaf, (sample.input, list(sample.args), dict(sample.kwargs)))


# ----------------------------------------------------------------------------------------------------------------------
# Comparing outputs


def same_bits(a, b) -> bool:
    """Bit-identical tensors/values: dtype, shape, values, NaN positions and signs of zeros."""
    if isinstance(b, torch.Tensor):
        if not isinstance(a, torch.Tensor):
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if b.layout != torch.strided or a.layout != torch.strided:
            return False
        if not b.is_floating_point():
            return bool(torch.equal(a, b))
        nan_a, nan_b = torch.isnan(a), torch.isnan(b)
        if not torch.equal(nan_a, nan_b):
            return False
        ok = nan_a | ((a == b) & (torch.signbit(a) == torch.signbit(b)))
        return bool(ok.all())
    if isinstance(b, float) and isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    return a == b


@dataclasses.dataclass
class Check:
    """The outcome of one run (one sample, point or radius balls, forward or backward)."""

    status: str  # ok | unsupported | undecided | error | mismatch | unballed | not_contained | plain_error
    detail: str = ""
    containment: str = ""  # mpmath | exact oracle | float64 reference (weaker) | none | n/a
    unsupported_op: str = ""


def _compare(ball_out, plain_out, *, uninitialised=False, plain_ok=False, zeros_ok=False) -> Check | None:
    """Midpoint identity and 'float outputs are balls' for two output pytrees; None when they agree.

    ``uninitialised``: compare dtype and shape only and require infinite radii. ``plain_ok``: a plain float output is
    accepted (an exact index converted outside ballgrad). ``zeros_ok``: a plain float output that is exactly zero is
    accepted (autograd's own zero gradients, e.g. ``_efficientzerotensor`` for sign's derivative)."""
    b_leaves, b_spec = pytree.tree_flatten(ball_out)
    p_leaves, p_spec = pytree.tree_flatten(plain_out)
    if len(b_leaves) != len(p_leaves):
        return Check("mismatch", f"output structure differs: {b_spec} vs {p_spec}")
    for i, (b, p) in enumerate(zip(b_leaves, p_leaves)):
        if isinstance(p, torch.Tensor) and p.is_floating_point() and not isinstance(b, BallTensor):
            exact_zero = zeros_ok and isinstance(b, torch.Tensor) and not bool((b != 0).any())
            if not (plain_ok or exact_zero):
                return Check("unballed", f"output {i} is a plain {p.dtype} tensor: a floating result without a radius")
        if uninitialised and isinstance(b, BallTensor):
            if b.dtype != p.dtype or b.shape != p.shape or not bool(torch.isinf(b.rad).all()):
                return Check("mismatch", f"output {i}: uninitialised memory needs an infinite radius")
            continue
        m = b.mid if isinstance(b, BallTensor) else b
        if isinstance(m, torch.Tensor) and isinstance(p, torch.Tensor):
            m = m.detach()
            p = p.detach()
        if not same_bits(m, p):
            return Check("mismatch", f"output {i}: midpoint differs from the plain op")
        if isinstance(b, BallTensor) and b.is_floating_point():
            r = b.rad
            if bool(torch.isnan(r).any()) or bool((r < 0).any()):
                return Check("mismatch", f"output {i}: NaN or negative radius")
            if bool((torch.isfinite(r) & ~torch.isfinite(b.mid.detach())).any()):
                return Check("mismatch", f"output {i}: finite radius on a non-finite midpoint")
    return None


def _ball_leaves(out) -> list[BallTensor]:
    return [b for b in pytree.tree_leaves(out) if isinstance(b, BallTensor) and b.is_floating_point()]


def _check_against(balls: list[BallTensor], refs: list, sample_idx: list | None = None, rng=None) -> str | None:
    """Exact containment of reference values (Fractions / mpf / float64 tensors) in the balls; None when contained."""
    rng = rng or random.Random(0)
    for j, (b, ref) in enumerate(zip(balls, refs)):
        if ref is None:
            continue
        mids = b.mid.detach().to(torch.float64).reshape(-1).tolist()
        rads = b.rad.to(torch.float64).reshape(-1).tolist()
        n = len(mids)
        idx = range(n) if n <= MAX_CHECKED_ELEMENTS else sorted(rng.sample(range(n), MAX_CHECKED_ELEMENTS))
        for i in idx:
            v = ref(i)
            if v is _SKIP:
                continue
            if v is None:
                if not math.isinf(rads[i]):
                    return f"output {j} element {i}: the real function is undefined at this point but the radius is " \
                           f"finite ({mids[i]!r} ± {rads[i]!r})"
                continue
            if not contains_exact(mids[i], rads[i], v):
                return f"output {j} element {i}: exact value {float(v)!r} not in {mids[i]!r} ± {rads[i]!r}"
    return None


_SKIP = object()


# ----------------------------------------------------------------------------------------------------------------------
# References


def _points_inside(t_ball: BallTensor, seed: int):
    """A float64 tensor of points inside the ball (midpoint + s r, s in [-1, 1] seeded; exactly inside, else the
    midpoint), in the midpoint's dtype where that is exact, so the traced graph sees the dtype it was traced with."""
    g = torch.Generator().manual_seed(seed)
    m = t_ball.mid.detach()
    r = t_ball.rad.to(torch.float64)
    s = torch.rand(m.shape, generator=g, dtype=torch.float64) * 2 - 1
    cand = (m.to(torch.float64) + s * r).to(m.dtype)
    inside = (cand.to(torch.float64) - m.to(torch.float64)).abs() <= r  # exact: Sterbenz or tiny differences
    ok = inside & torch.isfinite(cand) & torch.isfinite(m)
    return torch.where(ok, cand, m)


def mpmath_reference(name, sample_args, balls_in, out_ball, n_points: int, seed: int):
    """For an elementwise op: a function i -> exact value (or None: undefined) for output element i, at a point of
    the input balls (the midpoint for i's first evaluation, else a seeded point). Returns None when not applicable."""
    fn = ELEMENTWISE.get(name)
    if fn is None or not (ARITY[name] == len(sample_args) or (name == "logit" and len(sample_args) <= 2)):
        return None
    shape = out_ball.shape
    per_arg = []
    for a in sample_args:
        if isinstance(a, BallTensor):
            if not a.is_floating_point():
                return None
            m = a.mid.detach().to(torch.float64).expand(shape).reshape(-1).tolist()
            r = a.rad.to(torch.float64).expand(shape).reshape(-1).tolist()
            per_arg.append((m, r))
        elif isinstance(a, torch.Tensor):
            if a.is_complex():
                return None
            try:
                m = a.detach().to(torch.float64).expand(shape).reshape(-1).tolist()
            except RuntimeError:
                return None
            per_arg.append((m, [0.0] * len(m)))
        elif isinstance(a, (int, float)) and not isinstance(a, bool):
            per_arg.append((None, float(a)))
        else:
            return None
    rng = random.Random(seed)

    def ref(i):
        with mpmath.workprec(MPMATH_PREC):  # every conversion and operation at 256 bits
            vals = []
            for m, r in per_arg:
                if m is None:
                    vals.append(mpmath.mpf(r))
                    continue
                mi, ri = m[i], r[i]
                if not (math.isfinite(mi) and math.isfinite(ri)):
                    return _SKIP  # the ball denotes nothing finite / everything
                if ri == 0:
                    vals.append(mpmath.mpf(mi))
                else:
                    s = rng.choice([-1, 1, 0, Fraction(rng.randint(-2**20, 2**20), 2**20)])
                    p = Fraction(mi) + Fraction(ri) * s
                    vals.append(mpmath.mpf(p.numerator) / p.denominator)
            return fn(*vals)

    return ref


def _oracle_outputs(fn, flat_inputs):
    """Trace ``fn(*flat_inputs)`` with make_fx and evaluate it with the exact oracle: a list of Dyadic/None per output
    leaf, or raise."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from verification.dyadic import Dyadic
    from verification.oracle import Oracle

    gm = make_fx(fn)(*flat_inputs)
    outs = Oracle(prec=MPMATH_PREC).run(gm, *flat_inputs)
    leaves = pytree.tree_leaves(outs)
    return [o if isinstance(o, Dyadic) else None for o in leaves]


def _dyadic_ref(d):
    if d is None:
        return None
    return lambda i: d.fraction(tuple(int(k) for k in __import__("numpy").unravel_index(i, d.shape))) \
        if d.shape else d.fraction(())


# ----------------------------------------------------------------------------------------------------------------------
# Running one sample


def _call(op, inp, args, kwargs):
    return op(inp, *args, **kwargs)


def _grad_targets(inp, args, kwargs):
    return [t for t in float_leaves((inp, args, kwargs)) if t.requires_grad]


def _differentiable(out):
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad
            and t.is_floating_point()]


def _cotangents(outs, seed):
    """Seeded plain cotangents, one per differentiable output, in the output's dtype."""
    g = torch.Generator().manual_seed(seed)
    res = []
    for o in outs:
        m = o.mid if isinstance(o, BallTensor) else o
        res.append(torch.randn(m.shape, generator=g, dtype=torch.float64).to(m.dtype))
    return res


def run_sample(op, sample, *, with_radius: bool, backward: bool, seed: int = 0, reference: bool = True) -> list[Check]:
    """Run one sample on balls and plain tensors; returns the forward Check and, with ``backward``, the backward one."""
    name = op_name(op)
    inp, args, kwargs = _clone_sample(sample)
    if not float_leaves((inp, args, kwargs)):
        return [Check("n/a", "no floating tensor argument")]
    # plain run
    torch.manual_seed(seed)
    try:
        plain_out = _call(op, inp, args, kwargs)
    except Exception as exc:  # noqa: BLE001 - PyTorch's own failure: skip the sample
        return [Check("plain_error", f"{type(exc).__name__}: {exc}"[:200])]
    b_inp0, b_args0, b_kwargs0 = _clone_sample(sample)
    b_inp, b_args, b_kwargs = wrap((b_inp0, b_args0, b_kwargs0), with_radius)
    torch.manual_seed(seed)
    fwd = _run_ball(op, b_inp, b_args, b_kwargs)
    if isinstance(fwd, Check):
        return [fwd]
    ball_out = fwd
    bad = _compare(ball_out, plain_out, uninitialised=name in UNINITIALISED, plain_ok=name in INDEX_AS_FLOAT)
    if bad is not None:
        return [bad]
    if name in UNINITIALISED:
        return [Check("ok", containment="n/a")]
    check = Check("ok")
    if reference and name in RANDOM:
        check.containment = "n/a (random values: exact points)"
    elif reference:
        check.containment, failure = _containment(op, name, sample, (b_inp, b_args, b_kwargs), ball_out, with_radius,
                                                  seed)
        if failure:
            return [Check("not_contained", failure, check.containment)]
    checks = [check]
    if backward:
        checks.append(_run_backward(op, sample, (inp, args, kwargs), plain_out, (b_inp, b_args, b_kwargs), ball_out,
                                    with_radius, seed, reference))
    return checks


def _run_ball(op, inp, args, kwargs):
    try:
        return _call(op, inp, args, kwargs)
    except UnsupportedOpError as exc:
        return Check("unsupported", str(exc)[:300], unsupported_op=exc.op_name)
    except UndecidedComparisonError as exc:
        return Check("undecided", str(exc)[:300])
    except Exception as exc:  # noqa: BLE001 - the thing this harness exists to catch
        tb = traceback.extract_tb(exc.__traceback__)
        where = next((f"{f.filename.split('src/')[-1]}:{f.lineno}" for f in reversed(tb) if "ballgrad" in f.filename),
                     "")
        return Check("error", f"{type(exc).__name__}: {str(exc)[:200]} [{where}]")


def _containment(op, name, sample, ball_args, ball_out, with_radius, seed) -> tuple[str, str | None]:
    """(method, failure or None) for the forward outputs."""
    outs = _ball_leaves(ball_out)
    if not outs:
        return "n/a", None
    b_inp, b_args, b_kwargs = ball_args
    # 1. mpmath, elementwise
    if name in ELEMENTWISE and not b_kwargs and len(outs) == 1:
        ref = mpmath_reference(name, [b_inp, *b_args], ball_args, outs[0], 2, seed)
        if ref is not None:
            return "mpmath", _check_against(outs, [ref], rng=random.Random(seed))
    # 2. the exact oracle, at the midpoints (and at an interior point of radius balls)
    flat, spec = pytree.tree_flatten(ball_args)
    positions = [i for i, t in enumerate(flat) if isinstance(t, BallTensor) and t.is_floating_point()]
    points = [[flat[i].mid.detach().clone() for i in positions]]
    if with_radius:
        points.append([_points_inside(flat[i], seed + k) for k, i in enumerate(positions)])
    oracle_failure, oracle_ok = None, False
    for pt in points:
        def fn(*ts, pt_positions=positions):
            leaves = list(pytree.tree_flatten(_clone_sample(sample))[0])
            for k, i in enumerate(pt_positions):
                leaves[i] = ts[k]
            a, b, c = pytree.tree_unflatten(leaves, spec)
            torch.manual_seed(seed)
            return _call(op, a, b, c)

        try:
            refs = _oracle_outputs(fn, pt)
        except Exception:  # noqa: BLE001 - the oracle cannot evaluate this graph (op, NaN, ...): fall back
            oracle_ok = False
            break
        if len(refs) != len(pytree.tree_leaves(ball_out)):
            break
        refs = [_dyadic_ref(d) for d, leaf in zip(refs, pytree.tree_leaves(ball_out))
                if isinstance(leaf, BallTensor) and leaf.is_floating_point()]
        if len(refs) != len(outs):
            break
        oracle_ok = True
        oracle_failure = oracle_failure or _check_against(outs, refs, rng=random.Random(seed))
    if oracle_ok:
        return "exact oracle", oracle_failure
    # 3. float64 reference (weaker): float32 (and reduced) samples only
    if all(o.dtype == torch.float64 for o in outs):
        return "none", None
    return "float64 reference (weaker)", _weak_check(op, sample, outs, seed)


def _weak_check(op, sample, outs, seed) -> str | None:
    inp, args, kwargs = _clone_sample(sample)

    def widen(t):
        if _is_float_tensor(t):
            c = t.detach().to(torch.float64)
            return c
        return t

    inp, args, kwargs = pytree.tree_map(widen, (inp, args, kwargs))
    torch.manual_seed(seed)
    try:
        ref = _call(op, inp, args, kwargs)
    except Exception:  # noqa: BLE001 - the op has no float64 path with these arguments
        return None
    refs = [t for t in pytree.tree_leaves(ref) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if len(refs) != len(outs):
        return None
    for j, (b, r) in enumerate(zip(outs, refs)):
        if r.shape != b.shape:
            return None
        m = b.mid.detach().to(torch.float64)
        rad = b.rad.to(torch.float64)
        r = r.detach().to(torch.float64)
        finite = torch.isfinite(r) & torch.isfinite(rad)
        excess = (r - m).abs() - rad - WEAK_SLACK * r.abs()
        bad = finite & (excess > 0)
        if bool(bad.any()):
            i = int(bad.reshape(-1).nonzero()[0])
            return (f"output {j} element {i}: float64 value {float(r.reshape(-1)[i])!r} not in "
                    f"{float(m.reshape(-1)[i])!r} ± {float(rad.reshape(-1)[i])!r} (weaker check)")
    return None


def _run_backward(op, sample, plain_args, plain_out, ball_args, ball_out, with_radius, seed, reference) -> Check:
    p_targets = _grad_targets(*plain_args)
    b_targets = _grad_targets(*ball_args)
    p_outs = _differentiable(plain_out)
    b_outs = [o for o in pytree.tree_leaves(ball_out) if isinstance(o, torch.Tensor) and o.requires_grad
              and o.is_floating_point()]
    if not p_targets or not p_outs or len(b_outs) != len(p_outs) or len(b_targets) != len(p_targets):
        return Check("n/a", "nothing to differentiate")
    cot = _cotangents(p_outs, seed + 1)
    try:
        p_grads = torch.autograd.grad(p_outs, p_targets, cot, allow_unused=True)
    except Exception as exc:  # noqa: BLE001 - plain backward fails: skip
        return Check("plain_error", f"backward: {type(exc).__name__}: {exc}"[:200])
    try:
        b_grads = torch.autograd.grad(b_outs, b_targets, [ballgrad.ball(c) for c in cot], allow_unused=True)
    except UnsupportedOpError as exc:
        return Check("unsupported", "backward: " + str(exc)[:300], unsupported_op=exc.op_name)
    except UndecidedComparisonError as exc:
        return Check("undecided", "backward: " + str(exc)[:300])
    except Exception as exc:  # noqa: BLE001
        tb = traceback.extract_tb(exc.__traceback__)
        where = next((f"{f.filename.split('src/')[-1]}:{f.lineno}" for f in reversed(tb) if "ballgrad" in f.filename),
                     "")
        return Check("error", f"backward: {type(exc).__name__}: {str(exc)[:200]} [{where}]")
    pairs = [(b, p) for b, p in zip(b_grads, p_grads) if not (b is None and p is None)]
    if any((b is None) != (p is None) for b, p in pairs):
        return Check("mismatch", "backward: gradient defined on one side only")
    bad = _compare([b for b, _ in pairs], [p for _, p in pairs], zeros_ok=True)
    if bad is not None:
        name = op_name(op)
        if bad.status == "mismatch" and name in SUBCLASS_PATH:
            return Check("ok", "known deviation: " + SUBCLASS_PATH[name], containment="n/a (known deviation)")
        bad.detail = "backward: " + bad.detail
        return bad
    check = Check("ok")
    if not reference:
        return check
    grads = [b for b, _ in pairs if isinstance(b, BallTensor)]
    method, failure = _grad_containment(op, sample, b_grads, cot, seed)
    check.containment = method
    if failure:
        return Check("not_contained", "backward: " + failure, method)
    return check


def _grad_containment(op, sample, b_grads, cot, seed) -> tuple[str, str | None]:
    """Gradient containment: the exact oracle on the traced forward + backward at the midpoints, else the float64
    reference (weaker) for float32 samples."""
    inp, args, kwargs = _clone_sample(sample)
    flat, spec = pytree.tree_flatten((inp, args, kwargs))
    positions = [i for i, t in enumerate(flat) if _is_float_tensor(t)]
    grad_pos = [i for i in positions if flat[i].requires_grad]
    grads = [g for g in b_grads]

    def fn(*ts):
        leaves = list(flat)
        for k, i in enumerate(positions):
            t = ts[k]
            leaves[i] = t.detach().requires_grad_(True) if i in grad_pos else t
        a, b, c = pytree.tree_unflatten(leaves, spec)
        torch.manual_seed(seed)
        out = _call(op, a, b, c)
        outs = _differentiable(out)
        targets = [leaves[i] for i in grad_pos]
        cts = [c.to(o.dtype) for c, o in zip(cot, outs)]  # the plain run's cotangents (exact widening)
        return torch.autograd.grad(outs, targets, cts, allow_unused=True)

    pts = [flat[i].detach().clone() for i in positions]
    try:
        refs = _oracle_outputs(fn, pts)
        if len(refs) == len(grads):
            balls = [g for g, d in zip(grads, refs) if isinstance(g, BallTensor) and d is not None]
            return "exact oracle", _check_against(balls, [_dyadic_ref(d) for g, d in zip(grads, refs)
                                                          if isinstance(g, BallTensor) and d is not None])
    except Exception:  # noqa: BLE001 - fall back
        pass
    balls = [g for g in grads if isinstance(g, BallTensor)]
    if not balls or all(g.dtype == torch.float64 for g in balls) or op_name(op) in FLOAT64_GRADIENT_UNRELIABLE:
        return "none", None
    # float64 reference of the gradients
    wide = [t.detach().to(torch.float64) for t in pts]
    try:
        ref = fn(*wide)
    except Exception:  # noqa: BLE001
        return "none", None
    refs = [r for g, r in zip(grads, ref) if isinstance(g, BallTensor)]
    for j, (b, r) in enumerate(zip(balls, refs)):
        if r is None or r.shape != b.shape:
            continue
        m = b.mid.detach().to(torch.float64)
        rad = b.rad.to(torch.float64)
        r = r.detach()
        finite = torch.isfinite(r) & torch.isfinite(rad)
        bad = finite & (((r - m).abs() - rad - WEAK_SLACK * r.abs()) > 0)
        if bool(bad.any()):
            i = int(bad.reshape(-1).nonzero()[0])
            return "float64 reference (weaker)", (f"grad {j} element {i}: float64 value {float(r.reshape(-1)[i])!r} "
                                                  f"not in {float(m.reshape(-1)[i])!r} ± {float(rad.reshape(-1)[i])!r}")
    return "float64 reference (weaker)", None


# ----------------------------------------------------------------------------------------------------------------------
# Per-op results


@dataclasses.dataclass
class OpResult:
    name: str
    status: str = "n/a"  # supported | partial | unsupported | error | n/a
    samples: int = 0  # samples run under ballgrad (plain-failing ones excluded)
    ok: int = 0
    unsupported: int = 0
    failures: list = dataclasses.field(default_factory=list)  # (kind, detail)
    unsupported_ops: list = dataclasses.field(default_factory=list)
    containment: list = dataclasses.field(default_factory=list)  # methods used (forward)
    backward: str = "n/a"  # ok | unsupported | error | n/a
    backward_containment: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)  # known deviations (``SUBCLASS_PATH``)
    seconds: float = 0.0

    def as_dict(self):
        return dataclasses.asdict(self)


def _samples(op, dtype, requires_grad: bool, limit: int | None):
    try:
        gen = op.sample_inputs("cpu", dtype, requires_grad=requires_grad)
        return list(itertools.islice(gen, limit)) if limit else list(gen)
    except Exception:  # noqa: BLE001 - the OpInfo cannot build samples for this dtype
        return []


def check_op(op, *, samples_per_dtype: int | None = 3, dtypes=DTYPES, seed: int = 0, backward: bool = True,
             radius_samples: int = 1, reference: bool = True) -> OpResult:
    """Run ``samples_per_dtype`` samples (None: all) per dtype; see the module docstring for the statuses."""
    t0 = time.perf_counter()
    res = OpResult(op_name(op))
    supported = op.supported_dtypes("cpu")
    back_dtypes = op.supported_backward_dtypes("cpu") if op.supports_autograd else ()
    radius_done = 0
    containment, b_containment = set(), set()
    back_status = set()
    for dtype in dtypes:
        if dtype not in supported:
            continue
        want_grad = backward and dtype in back_dtypes
        samples = _samples(op, dtype, want_grad, samples_per_dtype)
        for k, sample in enumerate(samples):
            modes = [False] + ([True] if radius_done < radius_samples else [])
            for with_radius in modes:
                checks = run_sample(op, sample, with_radius=with_radius, backward=want_grad, seed=seed + k,
                                    reference=reference)
                fwd = checks[0]
                if fwd.status in ("n/a", "plain_error"):
                    continue
                if with_radius:
                    radius_done += 1
                res.samples += 1
                if fwd.status == "ok":
                    res.ok += 1
                    containment.add(fwd.containment)
                elif fwd.status == "unsupported":
                    res.unsupported += 1
                    if fwd.unsupported_op and fwd.unsupported_op not in res.unsupported_ops:
                        res.unsupported_ops.append(fwd.unsupported_op)
                elif fwd.status == "undecided" and with_radius:
                    res.ok += 1  # a ballgrad signal on radius balls (a branch on an undecided comparison)
                    containment.add("n/a (undecided branch)")
                else:
                    res.failures.append((fwd.status, f"{dtype} sample {k}{' radius' if with_radius else ''}: "
                                                     f"{fwd.detail}"))
                for bc in checks[1:]:
                    if bc.status in ("n/a", "plain_error"):
                        continue
                    back_status.add(bc.status)
                    if bc.detail.startswith("known deviation") and bc.detail not in res.notes:
                        res.notes.append(bc.detail)
                    if bc.status == "ok":
                        b_containment.add(bc.containment)
                    elif bc.status == "unsupported":
                        if bc.unsupported_op and bc.unsupported_op not in res.unsupported_ops:
                            res.unsupported_ops.append(bc.unsupported_op)
                    elif bc.status == "undecided" and with_radius:
                        pass
                    else:
                        res.failures.append((bc.status, f"{dtype} sample {k}{' radius' if with_radius else ''}: "
                                                         f"{bc.detail}"))
    res.containment = sorted(c for c in containment if c)
    res.backward_containment = sorted(c for c in b_containment if c)
    if back_status:
        res.backward = "error" if back_status - {"ok", "unsupported", "undecided"} else (
            "unsupported" if "unsupported" in back_status else "ok")
    if res.failures:
        res.status = "error"
    elif res.samples == 0:
        res.status = "n/a"
    elif res.unsupported == res.samples:
        res.status = "unsupported"
    elif res.unsupported:
        res.status = "partial"
    else:
        res.status = "supported"
    res.seconds = time.perf_counter() - t0
    return res


def summarize(results: list[OpResult]) -> dict:
    applicable = [r for r in results if r.status != "n/a"]
    n = len(applicable)
    by = {s: [r.name for r in results if r.status == s] for s in ("supported", "partial", "unsupported", "error", "n/a")}
    supported = by["supported"]
    return {
        "float_ops": len(results),
        "applicable": n,
        "supported": len(supported),
        "supported_share": len(supported) / n if n else 0.0,
        "supported_or_partial_share": (len(supported) + len(by["partial"])) / n if n else 0.0,
        "by_status": by,
        "backward_ok": sum(r.backward == "ok" for r in applicable),
        "containment_methods": {
            m: sum(m in r.containment for r in applicable if r.status == "supported")
            for m in ("mpmath", "exact oracle", "float64 reference (weaker)", "none", "n/a")
        },
        "strongest_containment": _strongest([r for r in applicable if r.status == "supported"]),
    }


_STRENGTH = ("mpmath", "exact oracle", "float64 reference (weaker)", "none")


def _strongest(results) -> dict:
    """Per supported op, the strongest forward reference any of its samples was checked with (mpmath > exact oracle >
    float64 reference > none; ops with no floating output count as n/a)."""
    counts = {m: 0 for m in _STRENGTH + ("n/a",)}
    for r in results:
        best = next((m for m in _STRENGTH if m in r.containment), "n/a")
        counts[best] += 1
    return counts


def format_table(results: list[OpResult]) -> str:
    width = max(len(r.name) for r in results) if results else 10
    lines = [f"{'op':<{width}}  {'status':<11} {'ok/run':>7}  {'backward':<11} containment / detail"]
    for r in results:
        detail = ", ".join(r.containment) or ""
        if r.status in ("unsupported", "partial"):
            detail = "no rule: " + ", ".join(r.unsupported_ops[:3])
        if r.failures:
            detail = r.failures[0][0] + ": " + r.failures[0][1]
        lines.append(f"{r.name:<{width}}  {r.status:<11} {r.ok:>3}/{r.samples:<3}  {r.backward:<11} {detail[:160]}")
    return "\n".join(lines)
