"""The BallTensor type (DESIGN.md §3): a wrapper subclass holding a midpoint tensor ``mid`` and a radius tensor ``rad``.

X = (mid, rad) denotes every real tensor x with |x_i - mid_i| <= rad_i. Every aten op reaching a BallTensor goes
through ``__torch_dispatch__`` to exactly one rule in ``ballgrad.ops.registry``; an op without a rule raises
``UnsupportedOpError``. Comparisons give *bool balls*: ``mid`` is the midpoints' decision and ``rad`` a bool mask of
the elements whose decision is not the same for every point of the balls.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from ballgrad import rounding
from ballgrad.errors import UndecidedComparisonError

__all__ = ["BallTensor", "ball", "from_interval", "split", "is_ball"]


class BallTensor(torch.Tensor):
    """A tensor of balls: ``mid`` (what PyTorch computes) and ``rad`` (a rigorous bound on the distance to the exact
    real result). Build one with ``ballgrad.ball(mid, rad)`` or ``ballgrad.from_interval(lo, hi)``."""

    mid: torch.Tensor
    rad: torch.Tensor

    @staticmethod
    def __new__(cls, mid, rad, outer_size=None, outer_stride=None, *, requires_grad=False):
        size = mid.size() if outer_size is None else outer_size
        stride = mid.stride() if outer_stride is None else outer_stride
        return torch.Tensor._make_wrapper_subclass(
            cls,
            size,
            strides=stride,
            storage_offset=mid.storage_offset(),
            dtype=mid.dtype,
            device=mid.device,
            layout=mid.layout,
            requires_grad=requires_grad,
        )

    def __init__(self, mid, rad, outer_size=None, outer_stride=None, *, requires_grad=False):
        # Internal constructor: rules pass a midpoint computed by PyTorch and a radius computed by the rounding
        # helpers. Public construction with validation is ``ball()``.
        if rad.stride() != mid.stride() and mid.numel() > 0:
            rad = _same_layout(rad, mid)
        self.mid = mid
        self.rad = rad

    # -- tensor subclass protocol (two_tensor.py shape) ------------------------------------------------------------
    def __tensor_flatten__(self):
        return ["mid", "rad"], None

    @staticmethod
    def __tensor_unflatten__(inner_tensors, meta, outer_size, outer_stride):
        return BallTensor(inner_tensors["mid"], inner_tensors["rad"], outer_size, outer_stride)

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        from ballgrad.ops.registry import dispatch

        return dispatch(func, args, kwargs or {})

    # -- public API ----------------------------------------------------------------------------------------------
    def lower(self) -> torch.Tensor:
        """Lower end points mid - rad, rounded down (in the radius dtype, or float64 for float64 midpoints)."""
        m, r = _common(self.mid, self.rad)
        return rounding.sub_down(m, r)

    def upper(self) -> torch.Tensor:
        """Upper end points mid + rad, rounded up."""
        m, r = _common(self.mid, self.rad)
        return rounding.add_up(m, r)

    def contains(self, value) -> torch.Tensor:
        """Elementwise, exactly: is ``value`` in the ball (|value - mid| <= rad, decided in exact arithmetic)?

        ``value`` may be a tensor, a number, a ``fractions.Fraction``, an ``mpmath.mpf`` or a nested sequence /
        object array of those, broadcastable to this ball's shape. An infinite radius contains everything.
        """
        return _contains(self, value)

    def rel_accuracy_bits(self) -> torch.Tensor:
        """Like Arb's ``arb_rel_accuracy_bits``: floor(log2(|mid| / rad)) per element, as float64.

        +inf for exact non-zero... points (rad 0), -inf where the ball contains 0 with rad > 0 or rad is infinite.
        """
        m = self.mid.detach().to(torch.float64).abs()
        r = self.rad.to(torch.float64)
        bits = torch.floor(torch.log2(m) - torch.log2(r))
        bits = torch.where(r == 0, torch.full_like(bits, math.inf), bits)
        bits = torch.where((r > 0) & (m <= r), torch.full_like(bits, -math.inf), bits)
        return torch.nan_to_num(bits, nan=-math.inf, posinf=math.inf, neginf=-math.inf)

    def is_decided(self) -> torch.Tensor:
        """For a bool ball (a comparison result): True where every point of the balls gives the same answer."""
        if self.dtype != torch.bool:
            raise TypeError("is_decided() is for bool balls (comparison results)")
        return ~self.rad

    def __repr__(self, *, tensor_contents=None):
        return _format_ball(self)

    def __bool__(self):
        if self.numel() != 1:
            raise RuntimeError("Boolean value of a BallTensor with more than one value is ambiguous")
        if self.dtype == torch.bool:
            if bool(self.rad.reshape(())):
                raise UndecidedComparisonError(
                    "bool() of an undecided ball comparison: the result differs between points of the balls. "
                    "Use .mid for the midpoints' decision, or .is_decided() to branch on certainty."
                )
            return bool(self.mid.reshape(()))
        m, r = float(self.mid.reshape(())), float(self.rad.reshape(()))
        if m == 0 and r == 0:
            return False
        if abs(m) > r:
            return True
        raise UndecidedComparisonError(f"bool() of the ball {m} ± {r}: it contains 0 and non-zero values")

    def __reduce_ex__(self, proto):
        # Pickling (pickle, torch.save) keeps both inner tensors, requires_grad and nn.Parameter-ness.
        if getattr(self, "_is_param", False):
            import collections

            inner = BallTensor(self.mid, self.rad)
            return (torch._utils._rebuild_parameter, (inner, self.requires_grad, collections.OrderedDict()))
        return (_rebuild_ball, (self.mid, self.rad, self.requires_grad))


def _rebuild_ball(mid, rad, requires_grad=False):
    out = BallTensor(mid, rad)
    if requires_grad:
        out.requires_grad_(True)
    return out


torch.serialization.add_safe_globals([BallTensor, _rebuild_ball])


# ----------------------------------------------------------------------------------------------------------------------
# Construction


def is_ball(x) -> bool:
    return isinstance(x, BallTensor)


def ball(mid, rad=None, *, dtype=None, device=None) -> BallTensor:
    """Build a BallTensor from a midpoint and a radius (``rad=None``: exact points, radius 0).

    The radius is converted to the radius dtype (float32 for float16/bfloat16 midpoints, else the midpoint's)
    rounding *up*, and broadcast to the midpoint's shape. A non-finite midpoint carries no information, so its
    radius becomes +inf. Raises ``TypeError`` for non-floating or complex midpoints and ``ValueError`` for negative
    or NaN radii, or a radius that does not match the midpoint's shape or device.
    """
    if isinstance(mid, BallTensor):
        raise TypeError("ball() got a BallTensor as midpoint; use it directly or pass .mid")
    conversion = None
    if not isinstance(mid, torch.Tensor) and not _is_complex_like(mid):
        # Python numbers are exact doubles: if the ball's dtype cannot hold them, the radius covers the rounding.
        exact64 = torch.as_tensor(mid, dtype=torch.float64, device=device)
        mid = exact64.to(dtype or torch.get_default_dtype())
        conversion = torch.abs(exact64 - mid.to(torch.float64))  # exact (Sterbenz), see ops.common.cast_error
    mid = torch.as_tensor(mid, dtype=dtype, device=device)
    if mid.is_complex():
        raise TypeError(f"complex midpoints are not supported yet (got {mid.dtype})")
    if not mid.is_floating_point():
        raise TypeError(
            f"a ball's midpoint must be a floating tensor, got {mid.dtype}; convert it first (e.g. x.float())"
        )
    rounding.check_float_dtype(mid.dtype)
    mid = mid.detach()
    rd = rounding.rad_dtype(mid.dtype)
    if rad is None:
        r = torch.zeros_like(mid, dtype=rd)
    else:
        if isinstance(rad, BallTensor):
            raise TypeError("the radius must be a plain tensor or number, not a BallTensor")
        if isinstance(rad, torch.Tensor):
            r = rad
        else:  # Python numbers / sequences are exact doubles: never let them round to float32 on the way in
            r = torch.as_tensor(rad, dtype=torch.float64, device=mid.device)
        if r.is_complex() or not (r.is_floating_point() or r.dtype in (torch.int8, torch.int16, torch.int32,
                                                                      torch.int64, torch.uint8)):
            raise TypeError(f"the radius must be real, got {r.dtype}")
        if r.device != mid.device:
            raise ValueError(f"radius on {r.device} but midpoint on {mid.device}: put them on the same device")
        r = r.detach()
        if torch.isnan(r).any() if r.is_floating_point() else False:
            raise ValueError("the radius has NaN entries; use math.inf for 'nothing known'")
        if (r < 0).any():
            raise ValueError("the radius has negative entries; a radius is a non-negative bound")
        try:
            torch.broadcast_shapes(r.shape, mid.shape)
            if torch.broadcast_shapes(r.shape, mid.shape) != mid.shape:
                raise RuntimeError
        except RuntimeError:
            raise ValueError(
                f"radius shape {tuple(r.shape)} does not match midpoint shape {tuple(mid.shape)}"
            ) from None
        if not r.is_floating_point():
            r = r.to(torch.float64)
        r = rounding.to_dtype_up(r, rd) if r.dtype != rd else r
        r = torch.empty_like(mid, dtype=rd).copy_(r.expand(mid.shape)) if mid.numel() else r.expand(mid.shape)
    if conversion is not None and bool((conversion > 0).any()):
        r = torch.where(conversion > 0, rounding.add_up(r.to(torch.float64), conversion), r.to(torch.float64))
        r = rounding.to_dtype_up(r, rd)
    r = torch.where(torch.isfinite(mid), r, torch.full_like(r, math.inf))
    if not _non_overlapping(mid):
        mid = mid.contiguous()
        r = r.contiguous()
    return BallTensor(mid, r)


def _is_complex_like(x) -> bool:
    try:
        import numpy as np

        return bool(np.iscomplexobj(np.asarray(x)))
    except Exception:
        return False


def from_interval(lo, hi, *, dtype=None) -> BallTensor:
    """The ball containing every real in [lo, hi], with a float midpoint near (lo + hi)/2 and an outward-rounded
    radius. ``lo``/``hi`` are tensors or numbers; the result has their (promoted) floating dtype, or ``dtype``."""
    # Python numbers are exact doubles (never rounded through the default float32 on the way in)
    lo_t = lo if isinstance(lo, torch.Tensor) else torch.as_tensor(lo, dtype=torch.float64)
    hi_t = hi if isinstance(hi, torch.Tensor) else torch.as_tensor(hi, dtype=torch.float64)
    out_dtype = dtype or (
        torch.promote_types(lo_t.dtype, hi_t.dtype)
        if isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor)
        else torch.get_default_dtype()
    )
    if not out_dtype.is_floating_point:
        out_dtype = torch.get_default_dtype()
    rounding.check_float_dtype(out_dtype)
    # Work in float64 (exact for every supported input dtype), one rounding per step bounded by F2.
    lo64, hi64 = torch.broadcast_tensors(lo_t.to(torch.float64), hi_t.to(torch.float64))
    if (lo64 > hi64).any():
        raise ValueError("from_interval needs lo <= hi elementwise")
    if torch.isnan(lo64).any() or torch.isnan(hi64).any():
        raise ValueError("from_interval got NaN end points")
    mid = (lo64 * 0.5 + hi64 * 0.5).to(out_dtype)  # any float: the radius below makes the ball contain [lo, hi]
    m64 = mid.to(torch.float64)
    r64 = torch.maximum(rounding.sub_up(m64, lo64), rounding.sub_up(hi64, m64))
    r64 = rounding.clean_rad(r64)
    return BallTensor(mid, rounding.to_dtype_up(r64, rounding.rad_dtype(out_dtype)))


# ----------------------------------------------------------------------------------------------------------------------
# Helpers shared by the rules


def split(x, like: torch.Tensor | None = None):
    """(mid, rad) of an argument: a BallTensor's inner tensors, or a plain floating tensor as a point ball."""
    if isinstance(x, BallTensor):
        return x.mid, x.rad
    if isinstance(x, torch.Tensor):
        if x.is_floating_point():
            return x, torch.zeros_like(x, dtype=rounding.rad_dtype(x.dtype))
        return x, None
    raise TypeError(f"expected a tensor, got {type(x).__name__}")


def _non_overlapping(t: torch.Tensor) -> bool:
    """True when every element of ``t`` has its own memory location (no stride-0 broadcast, no overlap)."""
    dims = sorted((st, sz) for sz, st in zip(t.size(), t.stride()) if sz > 1)
    span = 1
    for st, sz in dims:
        if st < span:
            return False
        span = st * sz
    return True


def _same_layout(rad: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
    """A copy of ``rad`` with ``mid``'s strides, so that view ops apply to both alike."""
    try:
        out = torch.empty_strided(mid.size(), mid.stride(), dtype=rad.dtype, device=rad.device)
        if _non_overlapping(out):
            return out.copy_(rad)
    except RuntimeError:
        pass
    # mid is overlapping (e.g. an expanded view): keep rad with the same expand structure when it already has it
    return rad


def _common(mid: torch.Tensor, rad: torch.Tensor):
    """mid and rad in one dtype (the radius dtype; exact widening for float16/bfloat16 midpoints)."""
    return mid.detach().to(rad.dtype), rad


def _to_fraction(v) -> Fraction | None:
    """Exact rational value of a number (None for NaN; +-inf kept as float)."""
    if isinstance(v, Fraction):
        return v
    if isinstance(v, int):
        return Fraction(v)
    if hasattr(v, "_mpf_"):  # mpmath.mpf: exact binary value
        import mpmath

        if mpmath.isnan(v):
            return None
        if mpmath.isinf(v):
            return math.inf if v > 0 else -math.inf
        sign, man, exp, _ = v._mpf_  # exact (mpmath.mpf(v) would re-round to the context precision; not
        # .man_exp: it drops the sign)
        value = Fraction(int(man)) * (Fraction(2) ** int(exp))
        return -value if sign else value
    f = float(v)
    if math.isnan(f):
        return None
    if math.isinf(f):
        return f
    return Fraction(f)


def _contains(b: BallTensor, value) -> torch.Tensor:
    if b.dtype == torch.bool:
        raise TypeError("contains() is for numeric balls")
    mid = b.mid.detach()
    if isinstance(value, BallTensor):
        raise TypeError("contains() takes exact values, not a BallTensor (compare lower()/upper() instead)")
    if isinstance(value, torch.Tensor):
        v = value.detach().to(torch.float64)
        m = mid.to(torch.float64)
        r = b.rad.to(torch.float64)
        v, m, r = torch.broadcast_tensors(v, m, r)
        lo_out, hi_out = rounding.sub_down(m, r), rounding.add_up(m, r)
        lo_in, hi_in = rounding.sub_up(m, r), rounding.add_down(m, r)
        inside = (v >= lo_in) & (v <= hi_in)
        maybe = (v >= lo_out) & (v <= hi_out) & ~inside
        result = inside.clone()
        if maybe.any():  # decide the few near-boundary elements exactly
            idx = maybe.nonzero(as_tuple=False)
            for i in idx.tolist():
                i = tuple(i)
                result[i] = _contains_scalar(float(m[i]), float(r[i]), Fraction(float(v[i])))
        result |= torch.isinf(r)
        return result
    # Exact objects (Fraction, mpf, nested sequences)
    import numpy as np

    arr = np.asarray(value, dtype=object)
    out_shape = torch.broadcast_shapes(tuple(arr.shape), tuple(mid.shape))
    arr = np.broadcast_to(arr, out_shape)
    m = mid.to(torch.float64).expand(out_shape)
    r = b.rad.to(torch.float64).expand(out_shape)
    flat_v = arr.reshape(-1)
    flat_m = m.reshape(-1).tolist()
    flat_r = r.reshape(-1).tolist()
    res = [_contains_scalar(mm, rr, _to_fraction(vv)) for mm, rr, vv in zip(flat_m, flat_r, flat_v)]
    return torch.tensor(res, dtype=torch.bool).reshape(out_shape)


def _contains_scalar(m: float, r: float, v) -> bool:
    if math.isinf(r):
        return True
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return False
    if isinstance(v, float) and math.isinf(v):
        return False
    if not math.isfinite(m):
        return False
    return abs(v - Fraction(m)) <= Fraction(r)


# ----------------------------------------------------------------------------------------------------------------------
# Printing

_MAX_SHOWN = 12


def _format_ball(b: BallTensor) -> str:
    extra = []
    if b.dtype != torch.float32 and b.dtype != torch.bool:
        extra.append(f"dtype={b.dtype}")
    if b.device.type != "cpu":
        extra.append(f"device='{b.device}'")
    if b.requires_grad:
        extra.append("requires_grad=True")
    if b.grad_fn is not None:
        extra.append(f"grad_fn=<{type(b.grad_fn).__name__}>")
    suffix = "".join(", " + e for e in extra)
    mid = b.mid.detach().cpu()
    rad = b.rad.detach().cpu()
    if b.dim() == 0:
        return f"BallTensor({_format_element(mid.item(), rad.item())}{suffix})"
    flat_m, flat_r = mid.reshape(-1), rad.reshape(-1)
    n = flat_m.numel()
    if n <= _MAX_SHOWN:
        body = _format_nested(mid, rad)
    else:
        head = ", ".join(_format_element(flat_m[i].item(), flat_r[i].item()) for i in range(3))
        tail = ", ".join(_format_element(flat_m[i].item(), flat_r[i].item()) for i in range(n - 3, n))
        if b.dtype == torch.bool:
            undecided = int(flat_r.sum())
            stats = f"undecided {undecided}/{n}"
        else:
            finite = flat_r[torch.isfinite(flat_r)]
            stats = f"max rad {flat_r.max().item():.1e}" if n else ""
            if finite.numel() < n:
                stats += f", {n - finite.numel()} infinite"
        body = f"[{head}, ..., {tail}], shape={tuple(b.shape)}, {stats}"
    return f"BallTensor({body}{suffix})"


def _format_nested(mid, rad) -> str:
    if mid.dim() == 0:
        return _format_element(mid.item(), rad.item())
    return "[" + ", ".join(_format_nested(m, r) for m, r in zip(mid, rad)) + "]"


def _format_element(m, r) -> str:
    if isinstance(m, bool):
        return "?" if r else str(m)
    if r == 0:
        return f"{m:.6g} (exact)" if math.isfinite(m) else f"{m}"
    if math.isinf(r):
        return f"{m:.5g} ± inf"
    if m != 0 and math.isfinite(m):
        digits = max(1, min(17, int(math.floor(math.log10(abs(m) / r))) + 1)) if r < abs(m) else 1
        return f"{m:#.{digits}g} ± {r:.1e}"
    return f"{m:.5g} ± {r:.1e}"
