"""In-place rules (DESIGN.md §4 ``inplace.py``): every in-place overload listed here is evaluated through its
functional rule and written back.

For ``x.op_(*args)``: the functional rule gives a ball (c, r) containing the exact result for every point of the
inputs (computed from the old values, so aliasing such as ``x.mul_(x)`` is handled); PyTorch's own in-place kernel
then updates ``x.mid`` (so the midpoint is bit-identical to plain PyTorch, including its cast to x's dtype); and
the radius becomes r + |x.mid - c| (exact when they agree, else one rounded subtraction and addition bumped up by F2).
Views keep aliasing: ``x.mid`` and ``x.rad`` are updated in place.
"""

from __future__ import annotations

import torch

from ballgrad import fused, rounding
from ballgrad.ops.arith import alpha_constants
from ballgrad.ops.common import add_abs_, mids
from ballgrad.ops.registry import RULES, rule
from ballgrad.tensor import BallTensor

aten = torch.ops.aten

# in-place overload -> functional overload with the same arguments
_PAIRS = [
    ("add_.Tensor", "add.Tensor"), ("add_.Scalar", "add.Scalar"),
    ("sub_.Tensor", "sub.Tensor"), ("sub_.Scalar", "sub.Scalar"),
    ("mul_.Tensor", "mul.Tensor"), ("mul_.Scalar", "mul.Scalar"),
    ("div_.Tensor", "div.Tensor"), ("div_.Scalar", "div.Scalar"),
    ("div_.Tensor_mode", "div.Tensor_mode"), ("div_.Scalar_mode", "div.Scalar_mode"),
    ("neg_.default", "neg.default"), ("abs_.default", "abs.default"),
    ("reciprocal_.default", "reciprocal.default"),
    ("addcmul_.default", "addcmul.default"), ("addcdiv_.default", "addcdiv.default"),
    ("exp_.default", "exp.default"), ("expm1_.default", "expm1.default"), ("log_.default", "log.default"),
    ("log1p_.default", "log1p.default"), ("log2_.default", "log2.default"), ("log10_.default", "log10.default"),
    ("tanh_.default", "tanh.default"), ("sigmoid_.default", "sigmoid.default"), ("sin_.default", "sin.default"),
    ("cos_.default", "cos.default"), ("atan_.default", "atan.default"), ("erf_.default", "erf.default"),
    ("erfc_.default", "erfc.default"), ("sqrt_.default", "sqrt.default"), ("rsqrt_.default", "rsqrt.default"),
    ("pow_.Scalar", "pow.Tensor_Scalar"), ("pow_.Tensor", "pow.Tensor_Tensor"),
    ("clamp_.default", "clamp.default"), ("clamp_.Tensor", "clamp.Tensor"),
    ("clamp_min_.default", "clamp_min.default"), ("clamp_min_.Tensor", "clamp_min.Tensor"),
    ("clamp_max_.default", "clamp_max.default"), ("clamp_max_.Tensor", "clamp_max.Tensor"),
    ("masked_fill_.Scalar", "masked_fill.Scalar"), ("masked_fill_.Tensor", "masked_fill.Tensor"),
    ("relu_.default", "relu.default"), ("lerp_.Scalar", "lerp.Scalar"), ("lerp_.Tensor", "lerp.Tensor"),
    ("maximum_.default", "maximum.default"), ("square_.default", "square.default"),
    ("ceil_.default", "ceil.default"), ("floor_.default", "floor.default"), ("trunc_.default", "trunc.default"),
    ("round_.default", "round.default"), ("round_.decimals", "round.decimals"), ("frac_.default", "frac.default"),
    ("fix_.default", "fix.default"), ("nan_to_num_.default", "nan_to_num.default"),
    ("asin_.default", "asin.default"), ("acos_.default", "acos.default"), ("sinh_.default", "sinh.default"),
    ("cosh_.default", "cosh.default"), ("tan_.default", "tan.default"), ("asinh_.default", "asinh.default"),
    ("acosh_.default", "acosh.default"), ("atanh_.default", "atanh.default"), ("exp2_.default", "exp2.default"),
    ("sinc_.default", "sinc.default"), ("deg2rad_.default", "deg2rad.default"), ("rad2deg_.default", "rad2deg.default"),
    ("erfinv_.default", "erfinv.default"), ("lgamma_.default", "lgamma.default"), ("digamma_.default", "digamma.default"),
    ("i0_.default", "i0.default"), ("logit_.default", "logit.default"), ("polygamma_.default", "polygamma.default"),
    ("atan2_.default", "atan2.default"), ("hypot_.default", "hypot.default"), ("copysign_.Tensor", "copysign.Tensor"),
    ("copysign_.Scalar", "copysign.Scalar"), ("xlogy_.Tensor", "xlogy.Tensor"), ("xlogy_.Scalar_Other", "xlogy.Scalar_Other"),
    ("fmod_.Tensor", "fmod.Tensor"), ("fmod_.Scalar", "fmod.Scalar"), ("remainder_.Tensor", "remainder.Tensor"),
    ("remainder_.Scalar", "remainder.Scalar"), ("floor_divide_.Tensor", "floor_divide.default"),
    ("floor_divide_.Scalar", "floor_divide.Scalar"), ("cumsum_.default", "cumsum.default"),
    ("cumprod_.default", "cumprod.default"), ("index_add_.default", "index_add.default"),
    ("scatter_add_.default", "scatter_add.default"), ("index_put_.default", "index_put.default"),
    ("put_.default", "put.default"), ("igamma_.default", "igamma.default"), ("igammac_.default", "igammac.default"),
    ("heaviside_.default", "heaviside.default"), ("tril_.default", "tril.default"), ("triu_.default", "triu.default"),
    ("index_fill_.int_Scalar", "index_fill.int_Scalar"), ("index_fill_.int_Tensor", "index_fill.int_Tensor"),
    ("index_copy_.default", "index_copy.default"), ("scatter_.src", "scatter.src"), ("scatter_.value", "scatter.value"),
    ("masked_scatter_.default", "masked_scatter.default"), ("renorm_.default", "renorm.default"),
]


def _overload(name: str):
    packet, overload = name.split(".")
    return getattr(getattr(aten, packet), overload, None) if hasattr(aten, packet) else None


INPLACE_TO_FUNCTIONAL = {}
for _inplace, _functional in _PAIRS:
    _i, _f = _overload(_inplace), _overload(_functional)
    if _i is not None and _f is not None:
        INPLACE_TO_FUNCTIONAL[_i] = _f


def _functional_rule(func):
    functional = INPLACE_TO_FUNCTIONAL[func]
    fn = RULES.get(functional)
    if fn is None:
        from ballgrad.ops import decompositions

        fn = decompositions.rule_for(functional)
    if fn is None:
        from ballgrad.errors import UnsupportedOpError

        raise UnsupportedOpError(func, f"its functional form {functional} has no rule")
    return functional, fn


_SCALED_ADDS = {aten.add_.Tensor, aten.sub_.Tensor}


def _scaled_add_in_place(func, self: BallTensor, other, alpha) -> bool:
    """x.add_(y, alpha=a) / x.sub_(y, alpha=a) with a != 1 (the optimizer step p -= lr g), updating ``self.rad`` in
    place instead of through the functional rule and a copy. The bound is ``arith._add_rad``'s, word for word:
    r_new = inflate(ra + Aup rb + C |mb| + u |m|, 7) with m the kernel's new midpoint (the functional kernel's value:
    the in-place kernel is the same computation) and (Aup, C) = ``arith.alpha_constants``. Taken only when nothing can
    alias or broadcast into ``self``: float32/float64 balls of one dtype, self's radius a dense tensor of its own
    shape, other a different ball of the same shape; returns False otherwise (the general path then runs)."""
    if (func not in _SCALED_ADDS or not isinstance(other, BallTensor) or other is self or isinstance(alpha, bool)
            or not isinstance(alpha, (int, float)) or alpha == 1 or self.dtype not in (torch.float32, torch.float64)
            or other.dtype != self.dtype or other.shape != self.shape or self.rad.dtype != self.dtype
            or other.rad.dtype != self.dtype or not self.rad.is_contiguous() or self.rad.shape != self.shape
            or other.mid.data_ptr() in (self.mid.data_ptr(), self.rad.data_ptr())
            or other.rad.data_ptr() == self.rad.data_ptr()):
        return False
    a_up, coef = alpha_constants(float(alpha), self.dtype, self.rad.dtype)
    u = rounding.op_roundoff(self.dtype)
    rad = self.rad
    if fused.applies(rad, other.rad, other.mid, self.mid) and self.mid.is_contiguous():  # one pass after the update
        func(self.mid, other.mid, alpha=alpha)
        fused.scaled_add_radius(rad, other.rad, other.mid, self.mid, a_up, coef, u,
                                *rounding.inflation_constants(7, rad.dtype))
        return True
    rad.add_(other.rad, alpha=a_up)
    add_abs_(rad, other.mid, coef)  # blocked: no full-size |mb| (common.add_abs_)
    func(self.mid, other.mid, alpha=alpha)
    add_abs_(rad, self.mid, u)
    rounding.inflate_(rad, 7)
    return True


@rule(*INPLACE_TO_FUNCTIONAL)
def inplace(func, self, *args, **kwargs):
    """See the module docstring: functional ball, PyTorch's in-place midpoint, radius r + |mid - c|."""
    if not isinstance(self, BallTensor):
        raise TypeError(
            f"{func}: a plain tensor is updated in place with a BallTensor operand; the result would drop the "
            "radius. Make the target a ball (ballgrad.ball(t)) or use the operand's .mid deliberately."
        )
    if len(args) == 1 and _scaled_add_in_place(func, self, args[0], kwargs.get("alpha", 1)):
        return self
    functional, fn = _functional_rule(func)
    enclosure = fn(functional, self, *args, **kwargs)
    func(self.mid, *mids(args), **mids(kwargs))
    if enclosure.dtype == self.dtype and torch.equal(enclosure.mid, self.mid):
        new_rad = enclosure.rad
    else:
        wide = torch.float64
        shift = rounding.up(torch.abs(self.mid.to(wide) - enclosure.mid.to(wide)))
        new_rad = rounding.clean_rad(rounding.add_up(enclosure.rad.to(wide), shift))
    self.rad.copy_(rounding.to_dtype_up(new_rad, self.rad.dtype).expand(self.shape))
    return self


# ----------------------------------------------------------------------------------------------------------------------
# _foreach_* ops (optimizers with foreach=True): each is the per-tensor op applied to every list element, which is
# also what PyTorch's CPU kernels do (their "slow path"), so midpoints are identical and each element's ball comes
# from that op's own rule.

_FOREACH_VALUE_LAST = {"addcmul", "addcmul_", "addcdiv", "addcdiv_"}


def _foreach_names():
    names = sorted({s.name[len("aten::"):] for s in torch._C._jit_get_all_schemas() if s.name.startswith("aten::_foreach_")})
    return [n for n in names if n not in ("_foreach_mm", "_foreach_powsum")]


def _foreach_overloads():
    ops = []
    for name in _foreach_names():
        packet = getattr(aten, name)
        for overload in packet.overloads():
            if not overload.endswith("_out"):
                ops.append(getattr(packet, overload))
    return ops


def _element_callable(base: str):
    """torch.<base> for functional ops, Tensor.<base> (method) for in-place ones; norm/max via torch.linalg."""
    if base == "norm":
        return lambda t, ord=2, dtype=None: torch.linalg.vector_norm(t, ord, dtype=dtype)
    if base.endswith("_"):
        return getattr(torch.Tensor, base)
    return getattr(torch, base)


@rule(*_foreach_overloads())
def foreach(func, *args, **kwargs):
    """_foreach_<op>(lists, ...) = [<op>(elements, ...)] elementwise over the lists (list and ScalarList arguments
    are zipped, single tensors and scalars broadcast); in-place forms return None like PyTorch's."""
    base = func._opname[len("_foreach_"):]
    fn = _element_callable(base)
    args = list(args)
    if base.rstrip("_") in ("addcmul", "addcdiv") and func._overloadname == "Tensor":
        args[3] = args[3].tolist() if not isinstance(args[3], BallTensor) else args[3].mid.tolist()
    n = max(len(a) for a in args if isinstance(a, (list, tuple)))
    outs = []
    for i in range(n):
        elem = [a[i] if isinstance(a, (list, tuple)) else a for a in args]
        kw = dict(kwargs)
        if base in _FOREACH_VALUE_LAST and len(elem) == 4:
            kw["value"] = elem.pop()
        outs.append(fn(*elem, **kw))
    return None if base.endswith("_") else outs
