"""Shape, view, indexing and copy rules (DESIGN.md §4): exact, so the same op is applied to ``mid`` and ``rad`` alike.

An op that only moves, repeats or selects elements has the exact result f(x) = (elements of x) for every x in the
ball, so its ball is (f(mid), f(rad)) with no rounding. View ops return views of both inner tensors, so in-place
updates through a view reach the base's midpoint and radius alike (aliasing kept).
"""

from __future__ import annotations

import math

import torch

from ballgrad import rounding
from ballgrad.errors import UndecidedComparisonError, UnsupportedOpError
from ballgrad.ops.common import cast_error, mid_of, operand, result
from ballgrad.ops import registry
from ballgrad.ops.registry import rule
from ballgrad.tensor import BallTensor

aten = torch.ops.aten


def _exact_index(x):
    """Index/mask arguments must be exact: a bool/int ball is used by its midpoint only if every element is decided."""
    if isinstance(x, BallTensor) and not x.is_floating_point():
        if bool(x.rad.any()):
            raise UndecidedComparisonError(
                "an undecided comparison result is used as an index or mask; the selection differs between points "
                "of the balls. Decide it first (e.g. use .mid deliberately, or torch.where on the ball)."
            )
        return x.mid
    return x


def _rad_arg(x):
    """The radius counterpart of one argument: a ball's radius, zeros for a plain floating tensor, others as is."""
    if isinstance(x, BallTensor):
        return _exact_index(x) if not x.is_floating_point() else x.rad
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return torch.zeros_like(x, dtype=rounding.rad_dtype(x.dtype))
    if isinstance(x, (list, tuple)):
        return type(x)(_rad_arg(a) for a in x)
    return x


def _mid_arg(x):
    if isinstance(x, BallTensor):
        return _exact_index(x) if not x.is_floating_point() else x.mid
    if isinstance(x, (list, tuple)):
        return type(x)(_mid_arg(a) for a in x)
    return x


def _pair(m, r):
    if isinstance(m, torch.Tensor):
        if r.dtype != rounding.rad_dtype(m.dtype):
            r = r.to(rounding.rad_dtype(m.dtype))  # widening only: rads of mixed inputs promote like mids
        return BallTensor(m, r)
    if isinstance(m, (list, tuple)):
        return type(m)(_pair(a, b) for a, b in zip(m, r))
    return m


@rule(
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.t.default,
    aten.transpose.int,
    aten.permute.default,
    aten.expand.default,
    aten.squeeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.unsqueeze.default,
    aten.select.int,
    aten.slice.Tensor,
    aten.narrow.default,
    aten.cat.default,
    aten.stack.default,
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.unbind.int,
    aten.clone.default,
    aten.detach.default,
    aten.alias.default,
    aten.lift_fresh.default,
    aten.flip.default,
    aten.roll.default,
    aten.repeat.default,
    aten.index_select.default,
    aten.gather.default,
    aten.index.Tensor,
    aten.diagonal.default,
    aten.unfold.default,
    aten.slice_backward.default,
    aten.select_backward.default,
    aten.slice_scatter.default,
    aten.select_scatter.default,
    aten.diagonal_scatter.default,
    aten.constant_pad_nd.default,
    aten.masked_select.default,
    aten.take_along_dim.default,
    aten._reshape_alias.default,
    aten.movedim.int,
    aten.unflatten.int,
    aten.flatten.using_ints,
    aten.contiguous.default,
    # copy variants of the views (functionalised graphs use them), and further pure element movements
    aten.expand_copy.default,
    aten.diagonal_copy.default,
    aten.alias_copy.default,
    aten.narrow_copy.default,
    aten.view_copy.default,
    aten.permute_copy.default,
    aten.split_with_sizes_copy.default,
    aten.squeeze_copy.default,
    aten.squeeze_copy.dim,
    aten.squeeze_copy.dims,
    aten.unsqueeze_copy.default,
    aten.transpose_copy.int,
    aten.t_copy.default,
    aten.unbind_copy.int,
    aten.unfold_copy.default,
    aten.unsafe_split.Tensor,
    aten.unsafe_split_with_sizes.default,
    aten._chunk_cat.default,
    aten.diag_embed.default,
    aten.tril.default,
    aten.triu.default,
    aten.rot90.default,
    aten.pixel_shuffle.default,
    aten.pixel_unshuffle.default,
    aten.channel_shuffle.default,
    aten.native_channel_shuffle.default,
    aten.take.default,
    aten.index_fill.int_Tensor,
    aten.index_copy.default,
    aten.scatter.src,
    aten.masked_scatter.default,
    aten.reflection_pad1d.default,
    aten.reflection_pad2d.default,
    aten.reflection_pad3d.default,
    aten.replication_pad1d.default,
    aten.replication_pad2d.default,
    aten.replication_pad3d.default,
    aten.im2col.default,
    aten.block_diag.default,
    aten._unsafe_index.Tensor,
    aten.fill.Tensor,
    aten.diagonal_backward.default,
)
def structural(func, *args, **kwargs):
    """Exact element movement: (f(mid), f(rad)). Padding and backward-of-slicing fill with exact zeros (radius 0).
    ``constant_pad_nd``'s fill value must be exact in the dtype (it is checked)."""
    x = args[0]
    if func in _ONE_TENSOR and type(x) is BallTensor and x.is_floating_point():  # the common views, directly
        op = _AS_METHOD.get(func, func)
        return BallTensor(op(x.mid, *args[1:], **kwargs), op(x.rad, *args[1:], **kwargs))
    if func is aten.constant_pad_nd.default and len(args) > 2:
        value = args[2]
        _, r_fill = operand(value, args[0].dtype)
        if float(r_fill) != 0:
            raise UnsupportedOpError(func, f"pad value {value!r} is not exact in {args[0].dtype}")
    m = func(*_mid_arg(args), **_mid_arg(kwargs) if kwargs else {})
    r = func(*_rad_arg(args), **_rad_arg(kwargs) if kwargs else {})
    return _pair(m, r)


# Views and copies whose only tensor argument is the first (the rest are ints, int lists, dims, memory formats):
# autograd and nn modules call these around every op, so ``structural`` applies them to (mid, rad) without walking the
# arguments (the radius keeps its dtype: the same op on a tensor of the radius dtype).
_ONE_TENSOR = frozenset({
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.t.default, aten.transpose.int,
    aten.permute.default, aten.expand.default, aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.unsqueeze.default, aten.select.int, aten.slice.Tensor, aten.clone.default, aten.detach.default,
    aten.alias.default, aten.contiguous.default, aten._reshape_alias.default, aten.flatten.using_ints,
    aten.unflatten.int, aten.movedim.int, aten.diagonal.default, aten.narrow.default,
})
registry.DIRECT.update(_ONE_TENSOR)  # nothing to record: ``registry.dispatch`` skips the per-op bookkeeping
# The commonest of them called as Tensor methods on (mid, rad): the same aten op with the same arguments, through the
# C++ binding instead of the OpOverload's Python ``__call__`` (~1.5 us less a call, twice per view, ~100 views a
# transformer-tiny step).
_AS_METHOD = {
    aten.view.default: torch.Tensor.view, aten.reshape.default: torch.Tensor.reshape, aten.t.default: torch.Tensor.t,
    aten.transpose.int: torch.Tensor.transpose, aten.permute.default: torch.Tensor.permute,
    aten.unsqueeze.default: torch.Tensor.unsqueeze, aten.squeeze.dim: torch.Tensor.squeeze,
    aten.select.int: torch.Tensor.select, aten.clone.default: torch.Tensor.clone,
    aten.detach.default: torch.Tensor.detach,
}


_FILL_POSITION = {
    aten.index_fill.int_Scalar: 3,
    aten.scatter.value: 3,
    aten._unsafe_masked_index.default: 3,
    aten.fill.Scalar: 1,
}


@rule(*_FILL_POSITION)
def fill_structural(func, *args):
    """Element movement with a Python-number fill value v (index_fill, scatter with a value, masked index with a
    fill, fill): moved elements keep their radii; filled elements hold the kernel's cast v' of v, so their radius is
    |v - v'| (``operand``), applied to the radius with the same op."""
    pos = _FILL_POSITION[func]
    x = args[0]
    m = func(*_mid_arg(args))
    _, r_fill = operand(args[pos], m.dtype)
    rad_args = list(_rad_arg(args))
    rad_args[pos] = float(rounding.to_dtype_up(r_fill.to(torch.float64), rounding.rad_dtype(m.dtype)))
    r = func(*rad_args)
    return _pair(m, r)


@rule(aten.as_strided_copy.default, aten.as_strided_scatter.default)
def as_strided_family(func, x, *args):
    """as_strided_copy / as_strided_scatter: exact element movement through the storage geometry, which the radius
    shares only when it has the midpoint's strides and storage offset (otherwise the op is refused)."""
    mids = [x.mid if isinstance(x, BallTensor) else x] + [a.mid if isinstance(a, BallTensor) else a for a in args]
    rads = [_rad_arg(x)] + [_rad_arg(a) for a in args]
    for mt, rt in zip(mids, rads):
        if isinstance(mt, torch.Tensor) and (mt.stride() != rt.stride()
                                             or mt.storage_offset() != rt.storage_offset()):
            raise UnsupportedOpError(func, "the radius does not share the midpoint's storage geometry")
    return _pair(func(*mids), func(*rads))




@rule(aten.as_strided.default)
def as_strided(func, x, size, stride, storage_offset=None):
    """Exact; the radius view uses the radius tensor's own storage offset shifted like the midpoint's."""
    m = func(x.mid, size, stride, storage_offset)
    offset = x.mid.storage_offset() if storage_offset is None else storage_offset
    r = func(x.rad, size, stride, offset - x.mid.storage_offset() + x.rad.storage_offset())
    return BallTensor(m, r)


@rule(aten.zeros_like.default, aten.ones_like.default)
def exact_like(func, x, **kwargs):
    """Constant tensors 0 or 1 are exact in every float dtype: radius 0."""
    m = func(mid_of(x), **kwargs)
    if not m.is_floating_point():
        return m
    return BallTensor(m, torch.zeros_like(m, dtype=rounding.rad_dtype(m.dtype)))


@rule(aten.full_like.default)
def full_like(func, x, fill_value, **kwargs):
    """full_like(x, v): the radius bounds |v - cast(v)| (``operand``)."""
    m = func(mid_of(x), fill_value, **kwargs)
    if not m.is_floating_point():
        return m
    _, r = operand(fill_value, m.dtype)
    return result(m, r.expand(m.shape))


@rule(aten.empty_like.default, aten.new_empty.default, aten.new_empty_strided.default)
def empty_like(func, x, *args, **kwargs):
    """Uninitialised memory has no meaning: radius +inf until it is written (copy_, fill_ set exact radii)."""
    m = func(mid_of(x), *args, **kwargs)
    if not m.is_floating_point():
        return m
    return BallTensor(m, torch.full_like(m, math.inf, dtype=rounding.rad_dtype(m.dtype)))


@rule(aten.new_zeros.default, aten.new_ones.default)
def new_exact(func, x, size, **kwargs):
    """New tensors of 0 or 1 are exact: radius 0."""
    m = func(mid_of(x), size, **kwargs)
    if not m.is_floating_point():
        return m
    return BallTensor(m, torch.zeros_like(m, dtype=rounding.rad_dtype(m.dtype)))


@rule(aten.new_full.default)
def new_full(func, x, size, fill_value, **kwargs):
    """new_full(size, v): radius |v - cast(v)|."""
    m = func(mid_of(x), size, fill_value, **kwargs)
    if not m.is_floating_point():
        return m
    _, r = operand(fill_value, m.dtype)
    return result(m, r.expand(m.shape))


def _conversion_rad(new_mid: torch.Tensor, old_mid: torch.Tensor, old_rad: torch.Tensor) -> torch.Tensor:
    """Radius after converting a ball's midpoint: |x - new| <= old_rad + |old - new|, in float64: the difference is
    exact (``common.cast_error``), the addition is bumped up (F2) unless the difference is 0."""
    if (old_mid.dtype, new_mid.dtype) in rounding._EXACT_WIDENINGS or old_mid.dtype == new_mid.dtype:
        return old_rad.to(rounding.rad_dtype(new_mid.dtype))
    diff = cast_error(old_mid, new_mid)
    wide_rad = old_rad.to(torch.float64)
    return rounding.clean_rad(torch.where(diff == 0, wide_rad, rounding.add_up(wide_rad, diff)))


@rule(aten._to_copy.default)
def to_copy(func, x, **kwargs):
    """.to(dtype/device): moving devices is exact; narrowing a dtype widens the radius by the conversion error.

    To bool: x != 0, a bool ball decided as the comparison rules decide it. To an integer dtype: PyTorch truncates
    toward zero; the integer is exact when trunc is the same at both outward end points of the ball (trunc is
    monotone), otherwise ``UndecidedComparisonError`` (an integer cannot hold a hull); values outside the integer
    range (or NaN) are refused. A bool ball converted to a floating dtype is 0/1 with radius 1 where undecided."""
    m = func(x.mid, **kwargs)
    if m.is_complex():
        raise UnsupportedOpError(func, f"complex results ({m.dtype}) are out of scope")
    if x.dtype == torch.bool:
        if m.dtype == torch.bool:
            return BallTensor(m, x.rad.to(m.device).clone())
        if m.is_floating_point():
            return result(m, x.rad.to(device=m.device, dtype=rounding.rad_dtype(m.dtype)))
        if bool(x.rad.any()):
            raise UndecidedComparisonError(f"{func}: an undecided bool ball converted to {m.dtype}")
        return m
    if m.dtype == torch.bool:
        decided = torch.ne(x, 0)
        return BallTensor(m, decided.rad.to(m.device).clone())
    if not m.is_floating_point():
        lo = rounding.sub_down(x.mid.detach().to(torch.float64), x.rad.to(torch.float64))
        hi = rounding.add_up(x.mid.detach().to(torch.float64), x.rad.to(torch.float64))
        info = torch.iinfo(m.dtype)
        if not bool(((lo > float(info.min) - 1.0) & (hi < float(info.max) + 1.0)).all()):
            raise UnsupportedOpError(func, f"values outside the range of {m.dtype} (or NaN): the conversion is undefined")
        if not bool((torch.trunc(lo) == torch.trunc(hi)).all()):
            raise UndecidedComparisonError(f"{func}: a ball spans several integers; the conversion to {m.dtype} is "
                                           "not decided")
        return m
    r = _conversion_rad(m, x.mid.to(m.device), x.rad.to(m.device))
    return result(m, r.to(m.device))


@rule(aten.copy_.default)
def copy_(func, dst, src, non_blocking=False):
    """dst.copy_(src): the midpoint is PyTorch's copy (with its dtype conversion); the radius is src's plus the
    conversion error. Copying a ball into a plain tensor would drop its radius and is refused."""
    if not isinstance(dst, BallTensor):
        raise TypeError(
            "copying a BallTensor into a plain tensor would drop its radius; copy src.mid explicitly if you mean it"
        )
    if isinstance(src, BallTensor):
        src_mid, src_rad = src.mid, src.rad
    else:
        src_mid, src_rad = src, None
    old_dtype_mid = src_mid
    func(dst.mid, src_mid, non_blocking)
    if src_rad is None:
        if src_mid.is_floating_point() and src_mid.dtype == dst.dtype:
            dst.rad.zero_()
            return dst
        src_rad = torch.zeros_like(src_mid, dtype=torch.float64)
    expanded_mid = old_dtype_mid.expand(dst.shape) if old_dtype_mid.shape != dst.shape else old_dtype_mid
    expanded_rad = src_rad.expand(dst.shape) if src_rad.shape != dst.shape else src_rad
    if expanded_mid.dtype == dst.dtype:
        dst.rad.copy_(expanded_rad.to(dst.rad.dtype))
    else:
        new_rad = _conversion_rad(dst.mid, expanded_mid.to(dst.device), expanded_rad.to(dst.device))
        dst.rad.copy_(rounding.to_dtype_up(new_rad, dst.rad.dtype))
    return dst


@rule(aten.fill_.Scalar, aten.zero_.default)
def fill_(func, x, *args):
    """In-place constant: the radius bounds |v - cast(v)| (0 for zero_)."""
    func(x.mid, *args)
    if args:
        _, r = operand(args[0], x.dtype)
        x.rad.fill_(float(r))
    else:
        x.rad.zero_()
    return x


@rule(aten._local_scalar_dense.default)
def local_scalar(func, x):
    """``.item()``: the midpoint's value, as ``x.mid.item()`` (training loops log ``loss.item()``); the radius stays
    available as ``x.rad``. For a bool ball, an undecided element raises UndecidedComparisonError."""
    if x.dtype == torch.bool:
        _exact_index(x)
    return func(x.mid)


@rule(
    aten.squeeze_.default,
    aten.squeeze_.dim,
    aten.squeeze_.dims,
    aten.unsqueeze_.default,
    aten.t_.default,
    aten.transpose_.default,
)
def inplace_view(func, x, *args):
    """In-place view ops change only metadata: applied to mid and rad alike (exact), then to the wrapper's own
    sizes/strides without dispatching (the same trick as torch.utils._python_dispatch.return_and_correct_aliasing)."""
    func(x.mid, *args)
    func(x.rad, *args)
    with torch.utils._mode_utils.no_dispatch():
        meta_in_tls = torch._C._meta_in_tls_dispatch_include()
        torch._C._set_meta_in_tls_dispatch_include(True)
        try:
            func(x, *args)
        finally:
            torch._C._set_meta_in_tls_dispatch_include(meta_in_tls)
    return x


# ----------------------------------------------------------------------------------------------------------------------
# Integer results of decisions (nonzero, searchsorted, bucketize, isin, unique) and Python-bool results (equal,
# allclose): exact when every decision they rest on is the same for all points of the balls, otherwise
# ``UndecidedComparisonError`` (an integer or a Python bool cannot hold a hull). Random tensors shaped like a ball.


def _require_decided(func, bool_ball, what):
    if isinstance(bool_ball, BallTensor) and bool(bool_ball.rad.any()):
        raise UndecidedComparisonError(f"{func}: {what} differs between points of the balls")


@rule(aten.nonzero.default, aten.argwhere.default, aten.nonzero_static.default)
def nonzero(func, x, *args, **kwargs):
    """Indices of the non-zero elements: exact when every element's x != 0 is decided (``compare``)."""
    _require_decided(func, torch.ne(x, 0) if x.is_floating_point() else x, "x != 0")
    return func(_exact_index(x) if not x.is_floating_point() else x.mid, *args, **kwargs)


@rule(aten.searchsorted.Tensor, aten.searchsorted.Scalar, aten.bucketize.Tensor, aten.bucketize.Scalar)
def searchsorted(func, *args, **kwargs):
    """The insertion index of each value among sorted boundaries: the number of boundaries b with b < v (b <= v for
    right=True), exact when every such comparison is decided (checked on all pairs with the comparison rules)."""
    if func in (aten.bucketize.Tensor, aten.bucketize.Scalar):
        values, boundaries = args[0], args[1]
        right = kwargs.get("right", args[3] if len(args) > 3 else False)
    else:
        boundaries, values = args[0], args[1]
        right = kwargs.get("right", args[4] if len(args) > 4 else False)
        side = kwargs.get("side", None)
        right = right or side == "right"
        if kwargs.get("sorter") is not None or (len(args) > 5 and args[5] is not None):
            raise UnsupportedOpError(func, "searchsorted with a sorter")
    v = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.float64)
    b_flat = boundaries.reshape(-1) if boundaries.dim() <= 1 else boundaries
    if isinstance(boundaries, torch.Tensor) and boundaries.dim() > 1:
        pairs = (torch.le if right else torch.lt)(boundaries.unsqueeze(-2), v.unsqueeze(-1))
    else:
        pairs = (torch.le if right else torch.lt)(b_flat, v.unsqueeze(-1))
    _require_decided(func, pairs, "a boundary comparison")
    return func(*[_mid_arg(a) for a in args], **{k: _mid_arg(w) for k, w in kwargs.items()})


@rule(aten.isin.Tensor_Tensor, aten.isin.Tensor_Scalar, aten.isin.Scalar_Tensor)
def isin(func, elements, test_elements, *, assume_unique=False, invert=False):
    """Membership as a bool ball: any_j (x == t_j), three-valued (``compare``, ``any``), negated for invert."""
    m = func(_mid_arg(elements), _mid_arg(test_elements), assume_unique=assume_unique, invert=invert)
    e = elements if isinstance(elements, torch.Tensor) else torch.tensor(elements, dtype=torch.float64)
    t = test_elements if isinstance(test_elements, torch.Tensor) else torch.tensor(test_elements, dtype=torch.float64)
    hit = torch.eq(e.unsqueeze(-1), t.reshape(-1)).any(-1) if t.numel() else None
    if hit is None or not isinstance(hit, BallTensor):
        return m
    value = hit.mid.reshape(m.shape) != invert
    return BallTensor(m, hit.rad.reshape(m.shape) | (value != m))  # undecided, or the kernel disagrees


@rule(aten._unique2.default, aten.unique_consecutive.default)
def unique(func, x, *args, **kwargs):
    """(values, [inverse], [counts]): the values are exact selections of elements, so each keeps the radius of the
    elements it stands for; this is exact when equality between elements is decided: two elements are equal for every
    point of the balls only if both are the same exact point, so an element with a radius may not share its ball
    with another element (``UndecidedComparisonError``). Inverse indices and counts are PyTorch's."""
    if x.numel() > 1:
        flat = x.reshape(-1)
        eq = torch.eq(flat.unsqueeze(-1), flat.unsqueeze(0))
        _require_decided(func, eq, "equality of elements")
    out = func(x.mid, *args, **kwargs)
    values = out[0]
    if func is aten._unique2.default:
        inverse = func(x.mid, True, True, False)[1]
    else:
        inverse = aten.unique_consecutive.default(x.mid, True, False, None)[1]
    rad = torch.zeros(values.shape, dtype=x.rad.dtype)
    if x.numel():
        rad = rad.scatter_reduce(0, inverse.reshape(-1), x.rad.reshape(-1), "amax", include_self=True)
    return (BallTensor(values, rad),) + tuple(out[1:])


@rule(aten.equal.default)
def equal(func, a, b):
    """True iff same shape and every element equal: decided with the comparison rules (undecided raises)."""
    if a.shape != b.shape:
        return False
    eq = torch.eq(a, b)
    if isinstance(eq, BallTensor):
        decided_false = bool((~eq.rad & ~eq.mid).any())
        if decided_false:
            return False
        _require_decided(func, eq, "equality")
        return bool(eq.mid.all())
    return bool(eq.all())


@rule(aten.allclose.default)
def allclose(func, a, b, rtol=1e-5, atol=1e-8, equal_nan=False):
    """all(isclose(a, b)) with isclose = (a == b) or |a - b| <= atol + rtol |b| (PyTorch's definition), each part a
    comparison of balls (three-valued), decided or raising. NaN balls are never decided."""
    close = torch.logical_or(torch.eq(a, b), torch.le(torch.abs(a - b), atol + rtol * torch.abs(b)))
    if isinstance(close, BallTensor):
        if bool((~close.rad & ~close.mid).any()):
            return False
        _require_decided(func, close, "closeness")
        return bool(close.mid.all())
    return bool(close.all())


@rule(aten.randn_like.default, aten.rand_like.default, aten.randint_like.default, aten.randint_like.low_dtype,
      aten.randint_like.Tensor)
def random_like(func, x, *args, **kwargs):
    """Random tensors shaped like x: their values do not depend on x's values, so they are exact points (radius 0);
    the generator state advances exactly as for the plain op."""
    m = func(x.mid, *[_mid_arg(a) for a in args], **kwargs)
    if not m.is_floating_point():
        return m
    return BallTensor(m, torch.zeros_like(m, dtype=rounding.rad_dtype(m.dtype)))


@rule(aten.lu_unpack.default)
def lu_unpack(func, lu_data, lu_pivots, unpack_data=True, unpack_pivots=True):
    """(P, L, U) from a packed LU factorisation: P is built from the integer pivots (exact, radius 0); L = the strict
    lower part plus the exact unit diagonal and U = the upper part are element selections of LU, so their radii are
    the same selections of LU's radius (the unit diagonal's radius is 0)."""
    pivots = _mid_arg(lu_pivots)
    p, l_mid, u_mid = func(lu_data.mid, pivots, unpack_data, unpack_pivots)
    _, l_rad, u_rad = func(lu_data.rad, pivots, unpack_data, unpack_pivots)
    outs = []
    if p.numel() or unpack_pivots:
        outs.append(BallTensor(p, torch.zeros_like(p, dtype=rounding.rad_dtype(p.dtype))) if p.is_floating_point() else p)
    else:
        outs.append(p)
    if l_mid.numel():
        outs.append(BallTensor(l_mid, torch.tril(l_rad, -1).to(rounding.rad_dtype(l_mid.dtype))))
        outs.append(BallTensor(u_mid, u_rad.to(rounding.rad_dtype(u_mid.dtype))))
    else:
        outs.extend([BallTensor(l_mid, l_rad.to(rounding.rad_dtype(l_mid.dtype))),
                     BallTensor(u_mid, u_rad.to(rounding.rad_dtype(u_mid.dtype)))])
    return tuple(outs)
