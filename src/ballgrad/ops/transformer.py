"""Transformer rules: embedding, fused CPU attention, safe softmax, dropout (DESIGN.md §2 "fused kernels",
§4).

(Layer norm, which transformers reach as ``native_layer_norm``/``_backward``, is in ``normalization`` with batch norm.)

The fused kernels (``_scaled_dot_product_flash_attention_for_cpu`` and its backward op) are
not bounded as black boxes. Each rule computes its midpoints with the fused kernel itself (bit-identical to plain
PyTorch), encloses the exact real result by composing ball rules on float64 balls (the inputs widened exactly: every
supported dtype is a subset of float64), and re-centres each output on the kernel's midpoint (``common.recentre``:
|exact - mid| <= r + |c - mid|). The float64 enclosures are some 2^29 times tighter than a float32 midpoint's own
error, so the radius is essentially the kernel's real error plus the propagated input radii.

What a transformer reaches on CPU with BallTensors (torch 2.13):
- ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` in training mode (or with grad enabled) with dropout 0,
  and ``F.scaled_dot_product_attention`` on 4-D inputs: ``_scaled_dot_product_flash_attention_for_cpu`` and its
  ``_backward``, ``native_layer_norm`` and ``native_layer_norm_backward`` (plus mm/addmm/relu/views, ruled elsewhere).
  Boolean masks become additive float masks (0 / -inf) in ``F.scaled_dot_product_attention`` before the fused op.
- In eval mode without grad, the fast paths ``_transformer_encoder_layer_fwd`` and ``_native_multi_head_attention``
  (BallTensor disables ``__torch_function__``, so PyTorch's ``has_torch_function`` check does not stop them).
- With dropout > 0, 3-D inputs, or a mask that requires grad, SDPA's composite math path: mul.Scalar, bmm,
  ``_safe_softmax``, and for dropout ``empty_like`` + ``bernoulli_.float`` + ``div_.Scalar`` + mul.Tensor.
- ``nn.Embedding``: ``embedding`` and ``embedding_dense_backward``.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import torch

from ballgrad import accuracy, fused, rounding
from ballgrad.errors import UnsupportedOpError
from ballgrad.ops.common import mid_of as _mid
from ballgrad.ops.common import mids, recentre, result
from ballgrad.ops.linalg import _is_point, _mid_error
from ballgrad.ops.normalization import layer_norm_enclosure
from ballgrad.ops.registry import RULES, rule
from ballgrad.tensor import BallTensor

aten = torch.ops.aten

_F64 = torch.float64


# ----------------------------------------------------------------------------------------------------------------------
# Helpers: exact float64 balls, hulls, directed sums


def _ball64(x) -> BallTensor | None:
    """A tensor argument as a float64 ball, exactly (a ball's mid and rad widened; a plain float tensor as a point)."""
    if x is None:
        return None
    if isinstance(x, BallTensor):
        m, r = x.mid.to(_F64), x.rad.to(_F64)
    else:
        if not x.is_floating_point():
            raise TypeError(f"expected a floating tensor, got {x.dtype}")
        m, r = x.to(_F64), torch.zeros((), dtype=_F64, device=x.device)
    if r.shape != m.shape:
        r = r.expand(m.shape).contiguous()
    return BallTensor(m, r)


def _hull(lo: torch.Tensor, hi: torch.Tensor) -> BallTensor:
    """A float64 ball containing [lo, hi]: mid any float near the centre, rad = max(up(mid - lo), up(hi - mid)) (F2).
    NaN or infinite end points give an infinite radius."""
    mid = lo * 0.5 + hi * 0.5
    rad = torch.maximum(rounding.sub_up(mid, lo), rounding.sub_up(hi, mid))
    return BallTensor(mid, rounding.clean_rad(rad))


def _constant(mid: float, rad: float) -> BallTensor:
    """A 0-d float64 ball for a real constant (CPU scalars mix with tensors of any device)."""
    return BallTensor(torch.tensor(mid, dtype=_F64), torch.tensor(rad, dtype=_F64))


def _where(cond: torch.Tensor, a: BallTensor, mid: float = 0.0) -> BallTensor:
    """``a`` where ``cond``, else the exact point ``mid`` (radius 0)."""
    return BallTensor(torch.where(cond, a.mid, torch.full_like(a.mid, mid)), torch.where(cond, a.rad, 0.0))


def _exact_indices(x) -> torch.Tensor:
    """Index tensors are exact integers: a (bool/int) ball is accepted only when every element is decided."""
    if isinstance(x, BallTensor):
        if x.is_floating_point() or bool(x.rad.any()):
            raise TypeError("indices must be exact integers, not a floating or undecided ball")
        return x.mid
    return x


def _sum_lower(t: torch.Tensor, dim: int) -> torch.Tensor:
    """A lower bound of the exact sum of the non-negative float64 ``t`` over ``dim`` (keepdim): a computed sum of n
    non-negative terms in any order has |fl - exact| <= gamma_(n-1) exact, so exact >= fl (1 - gamma_(n-1))."""
    n = t.shape[dim]
    s = torch.sum(t, dim=dim, keepdim=True)
    if n <= 1:
        return s
    factor = rounding.round_down_float(1 - Fraction(rounding.gamma(n - 1, _F64)))
    return rounding.mul_down(s, factor)


def _sum_upper(t: torch.Tensor, dim: int) -> torch.Tensor:
    """An upper bound of the same exact sum: exact <= fl / (1 - gamma_(n-1)) = theta_(n-1) fl."""
    n = t.shape[dim]
    s = torch.sum(t, dim=dim, keepdim=True)
    if n <= 1:
        return s
    factor = rounding.round_up_float(rounding.theta(n - 1, rounding.unit_roundoff_exact(_F64)))
    return rounding.mul_up(s, factor)


def _exp_bounds(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lower <= exp(t) <= upper for float64 points t (trust table), the lower bound clamped at 0."""
    lo, hi = accuracy.enclose("exp", t, device_type=t.device.type)
    return torch.clamp_min(lo, 0), hi


def _finish(mid: torch.Tensor | None, enclosure: BallTensor):
    """Re-centre ``enclosure`` (same shape) on the kernel's midpoint; None passes through (masked-out outputs)."""
    if mid is None:
        return None
    enclosure = BallTensor(enclosure.mid.reshape(mid.shape), enclosure.rad.reshape(mid.shape))
    return recentre(mid, enclosure)


# ----------------------------------------------------------------------------------------------------------------------
# Embedding


@rule(aten.embedding.default)
def embedding(func, weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    """weight[indices]: an exact gather, applied to mid and rad alike (padding_idx only matters in backward)."""
    idx = _exact_indices(indices)
    m = func(_mid(weight), idx, padding_idx, scale_grad_by_freq, sparse)
    if not isinstance(weight, BallTensor):
        return result(m, torch.zeros((), dtype=rounding.rad_dtype(m.dtype), device=m.device))
    return BallTensor(m, func(weight.rad, idx, padding_idx, scale_grad_by_freq, sparse))


@functools.lru_cache(maxsize=4096)
def _row_sum_error(count: int, scaled: bool, dtype: torch.dtype) -> tuple[float, float]:
    """(g, a) for one row of ``embedding_dense_backward`` summing ``count`` gradient rows: |computed - exact| <=
    g sum|terms| + a (``linalg._mid_error``'s model: each term passes through at most ``steps`` rounded operations,
    reduced dtypes possibly in float32 with storage roundings). Unscaled: count - 1 additions into an exact zero, so
    a row hit once is copied exactly (0 + x = x; float32 <-> storage conversions of a storage value are exact).
    Scaled by 1/count (scale_grad_by_freq): the scale's own roundings (1/count in double, then cast), one product
    or division, count - 1 additions: steps = count + 2, exact for count 1 (scale 1)."""
    if count <= 1:
        return 0.0, 0.0
    steps = count + 2 if scaled else count - 1
    g, a = _mid_error(steps, dtype)
    return rounding.round_up_float(g), rounding.absolute_term(a, _F64)


@rule(aten.embedding_dense_backward.default)
def embedding_dense_backward(func, grad_output, indices, num_weights, padding_idx, scale_grad_by_freq):
    """grad_weight[w] = sum of grad_output rows p with indices[p] == w != padding_idx (divided by their count c_w when
    ``scale_grad_by_freq``). Per row, in float64 (the sums of non-negative terms bounded by theta_(c_max) x computed):

        rad_w = sum_p r_p / k_w + g(c_w) sum_p |m_p| / k_w + a(c_w),   k_w = c_w if scaled else 1,

    with (g, a) = ``_row_sum_error``. Rows hit once keep their input radius exactly (no rounding happens); rows never
    hit (or only by padding_idx) are exact zeros."""
    idx = _exact_indices(indices)
    m = func(_mid(grad_output), idx, num_weights, padding_idx, scale_grad_by_freq)
    gb = _ball64(grad_output)
    d = m.shape[-1]
    flat = idx.reshape(-1).long()
    keep = flat != padding_idx
    hit = flat[keep]
    g_mid = gb.mid.reshape(-1, d)[keep]
    g_rad = gb.rad.reshape(-1, d)[keep]
    counts = torch.bincount(hit, minlength=num_weights)
    abs_sum = torch.zeros(num_weights, d, dtype=_F64, device=m.device).index_add_(0, hit, torch.abs(g_mid))
    rad_sum = torch.zeros(num_weights, d, dtype=_F64, device=m.device).index_add_(0, hit, g_rad)
    c_max = int(counts.max()) if counts.numel() else 0
    if c_max <= 1:
        return result(m, rad_sum)
    th = rounding.round_up_float(rounding.theta(c_max, rounding.unit_roundoff_exact(_F64)))
    uniq, inverse = torch.unique(counts, return_inverse=True)
    errors = [_row_sum_error(c, bool(scale_grad_by_freq), m.dtype) for c in uniq.tolist()]
    g_row = torch.tensor([e[0] for e in errors], dtype=_F64, device=m.device)[inverse].unsqueeze(-1)
    a_row = torch.tensor([e[1] for e in errors], dtype=_F64, device=m.device)[inverse].unsqueeze(-1)
    base = rounding.mul_up(rad_sum, th)
    rel = rounding.mul_up(rounding.mul_up(abs_sum, th), g_row)
    if scale_grad_by_freq:
        c = torch.clamp_min(counts, 1).to(_F64).unsqueeze(-1)
        base, rel = rounding.div_up(base, c), rounding.div_up(rel, c)
    rad = rounding.add_up(rounding.add_up(base, rel), a_row)
    once = (counts <= 1).unsqueeze(-1)
    return result(m, torch.where(once, rad_sum, rounding.clean_rad(rad)))


# ----------------------------------------------------------------------------------------------------------------------
# Attention: the probabilities


@functools.lru_cache(maxsize=None)
def _inverse_sqrt(e: int) -> tuple[float, float]:
    """(mid, rad) in float64 with |1/sqrt(e) - mid| <= rad: 1/sqrt(e) is in [lo, hi] iff lo^2 e <= 1 <= hi^2 e,
    decided in exact rationals (a constant is a ball, not a bare float; exact when e is a power of 4)."""
    mid = 1.0 / math.sqrt(e)
    lo = hi = mid
    while Fraction(lo) ** 2 * e > 1:
        lo = math.nextafter(lo, 0.0)
    while Fraction(hi) ** 2 * e < 1:
        hi = math.nextafter(hi, math.inf)
    return mid, rounding.round_up_float(max(Fraction(mid) - Fraction(lo), Fraction(hi) - Fraction(mid)))


def _scale_ball(head_dim: int, scale, func) -> BallTensor | float:
    """The softmax scale: an exact double when given, else the real 1/sqrt(head_dim) enclosed (``_inverse_sqrt``)."""
    if scale is not None:
        return float(scale)
    if head_dim == 0:
        raise UnsupportedOpError(func, "head dimension 0")
    mid, rad = _inverse_sqrt(int(head_dim))
    return _constant(mid, rad)


def _bmm(a: BallTensor, b: BallTensor) -> BallTensor:
    """a @ b over the last two dims of 4-D balls by the ``bmm`` rule (composite ``matmul`` does not decompose inside a
    rule)."""
    lead = a.shape[:-2]
    c = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
    return c.reshape(*lead, *c.shape[-2:])


class _Probs:
    """Attention probabilities P = softmax(s) along the last dim with some entries excluded, as float64 balls, with
    logsumexp bounds; ``s`` is a float64 ball of scores, ``excluded`` a bool tensor broadcastable to it.

    Excluded entries (a causal mask's upper triangle, a plain mask's -inf entries: exact extended reals) have P = 0
    exactly. Rows with no allowed entry are "empty": P = 0 (the flash kernel's definition: output 0); their
    logsumexp (-inf) is unknown (radius +inf). A row with an allowed score that is unknown (NaN or infinite radius,
    e.g. a +inf mask entry) is "unknown": P in [0, 1], logsumexp unknown.

    Bounds (monotone corners). With lo_j <= s_j <= hi_j, P_i = A/(A + B), A = exp(s_i - X), B = sum_(j != i)
    exp(s_j - X) for any shift X, increases in s_i and decreases in every other s_j, so
        upper: X_i = max(M_lo, hi_i), A <= exp(up(hi_i - X_i)), B >= exp(down(M_lo - X_i)) R_i,
               R_i = sum_j exp(down(lo_j - M_lo)) - (upper bound of term i)  <= sum_(j != i) exp(lo_j - M_lo),
        lower: A >= exp(down(lo_i - M_hi)), B <= sum_j exp(up(hi_j - M_hi)) - (lower bound of term i),
    with M_lo = max lo, M_hi = max hi over allowed entries (every exp argument <= 0: no overflow; the shift keeps the
    largest term near 1), sums bounded by ``_sum_lower``/``_sum_upper``, exp by the trust table, every operation
    rounded outward and A/(A+B) evaluated with numerator and denominator rounded in the needed directions. These are
    the exact end points of P over the box of score balls (up to float64 roundings), so nothing is lost beyond the
    box itself. logsumexp = M + log(sum exp(s - M)) increases in every s_j: [M_lo + log(T_lo), M_hi + log(T_hi)].
    """

    def __init__(self, s: BallTensor, excluded: torch.Tensor):
        allowed = ~excluded.expand(s.shape)
        lo, hi = s.lower(), s.upper()
        known = torch.isfinite(lo) & torch.isfinite(hi)
        self.unknown_rows = (allowed & ~known).any(-1, keepdim=True)
        self.empty_rows = ~allowed.any(-1, keepdim=True)
        valid = allowed & known & ~self.unknown_rows
        ok_rows = valid.any(-1, keepdim=True)
        neg_inf = torch.full_like(lo, -math.inf)
        m_lo = torch.amax(torch.where(valid, lo, neg_inf), dim=-1, keepdim=True)
        m_hi = torch.amax(torch.where(valid, hi, neg_inf), dim=-1, keepdim=True)
        m_lo = torch.where(ok_rows, m_lo, 0.0)
        m_hi = torch.where(ok_rows, m_hi, 0.0)
        lo = torch.where(valid, lo, m_lo)
        hi = torch.where(valid, hi, m_lo)
        zero = torch.zeros_like(lo)

        # upper bounds of P
        e_lo_lower, e_lo_upper = _exp_bounds(rounding.sub_down(lo, m_lo))
        e_lo_lower = torch.where(valid, e_lo_lower, zero)
        e_lo_upper = torch.where(valid, e_lo_upper, zero)
        t_lo = _sum_lower(e_lo_lower, -1)
        rest_lo = torch.clamp_min(rounding.sub_down(t_lo, e_lo_upper), 0)
        shift = torch.maximum(m_lo, hi)
        a_hi = _exp_bounds(rounding.sub_up(hi, shift))[1]
        f = torch.where(shift == m_lo, torch.ones_like(lo), _exp_bounds(rounding.sub_down(m_lo, shift))[0])
        b_lo = rounding.mul_down(f, rest_lo)
        p_hi = rounding.div_up(a_hi, rounding.add_down(a_hi, b_lo))
        p_hi = torch.clamp_max(torch.nan_to_num(p_hi, nan=1.0), 1.0)

        # lower bounds of P
        e_hi_lower, e_hi_upper = _exp_bounds(rounding.sub_up(hi, m_hi))
        e_hi_lower = torch.where(valid, e_hi_lower, zero)
        e_hi_upper = torch.where(valid, e_hi_upper, zero)
        t_hi = _sum_upper(e_hi_upper, -1)
        rest_hi = torch.clamp_min(rounding.sub_up(t_hi, e_hi_lower), 0)
        a_lo = _exp_bounds(rounding.sub_down(lo, m_hi))[0]
        p_lo = rounding.div_down(a_lo, rounding.add_up(a_lo, rest_hi))
        p_lo = torch.clamp_min(torch.nan_to_num(p_lo, nan=0.0), 0.0)

        p_lo = torch.where(valid, p_lo, zero)
        p_hi = torch.where(valid, p_hi, zero)
        unknown = self.unknown_rows & allowed
        p_lo = torch.where(unknown, zero, p_lo)
        p_hi = torch.where(unknown, torch.ones_like(p_hi), p_hi)
        self.p = _hull(p_lo, p_hi)

        # logsumexp
        device_type = lo.device.type
        log_lo = accuracy.enclose("log", torch.where(ok_rows, t_lo, 1.0), device_type=device_type)[0]
        log_hi = accuracy.enclose("log", torch.where(ok_rows, t_hi, 1.0), device_type=device_type)[1]
        bad = ~ok_rows
        lse_lo = torch.where(bad, -math.inf, rounding.add_down(m_lo, log_lo))
        lse_hi = torch.where(bad, math.inf, rounding.add_up(m_hi, log_hi))
        self.lse = _hull(lse_lo, lse_hi)

    def exact_empty_rows(self, y: BallTensor) -> BallTensor:
        """Re-centred output ``y`` (out or dq) with the rows of empty rows exact: their exact value is 0 (a sum of
        exact zero terms), so the radius there is |mid| (0 where the kernel returns 0, as it does)."""
        if not bool(self.empty_rows.any()):
            return y
        empty = self.empty_rows.expand(y.shape)
        return result(y.mid, torch.where(empty, torch.abs(y.mid).to(y.rad.dtype), y.rad))


# ----------------------------------------------------------------------------------------------------------------------
# Attention: the fused CPU kernel (scaled_dot_product_attention)


def _heads(x: BallTensor, heads: int, func) -> BallTensor:
    """Key/value heads repeated for grouped-query attention: query head h reads kv head h // (heads / kv_heads)
    (the kernel's convention, checked in the tests). Exact (element copies)."""
    kv = x.shape[1]
    if kv == heads:
        return x
    if kv == 0 or heads % kv:
        raise UnsupportedOpError(func, f"{heads} query heads and {kv} key/value heads")
    g = heads // kv
    return BallTensor(x.mid.repeat_interleave(g, dim=1), x.rad.repeat_interleave(g, dim=1))


def _group_sum(x: BallTensor, kv_heads: int) -> BallTensor:
    """The gradient of ``_heads``: sum over each group of query heads (the ``sum`` rule)."""
    b, h = x.shape[:2]
    if h == kv_heads:
        return x
    return torch.sum(x.reshape(b, kv_heads, h // kv_heads, *x.shape[2:]), dim=2)


def _point(t: torch.Tensor) -> BallTensor:
    return BallTensor(t, torch.zeros_like(t))


def _centred(x: BallTensor) -> tuple[BallTensor, torch.Tensor]:
    """(x - c, c) with c the mean of x's midpoints over the sequence dim (a float64 point per batch and head), by the
    ``sub`` rule. Used where the exact result does not change when every key / value moves by the same vector:
    softmax rows are invariant to adding q_i . c to row i (scores against centred keys; logsumexp adds it back),
    out_i = sum_j P_ij v_j = c + sum_j P_ij (v_j - c) since sum_j P_ij = 1 in a non-empty row, and in backward
    dP_ij - D_i is unchanged by centring v and dQ_i = sum_j dS_ij (k_j - c) since sum_j dS_ij = 0. The balls of the
    centred vectors are smaller when keys / values share a common component, and so are the radii that multiply them.
    """
    if x.shape[-2] == 0:
        return x, torch.zeros(*x.shape[:-2], 1, x.shape[-1], dtype=_F64, device=x.device)
    c = torch.mean(x.mid, dim=-2, keepdim=True)
    return x - _point(c), c


def _check_sdpa(func, q, k, v, dropout_p):
    """The calls the fused-attention rules refuse (both paths)."""
    if dropout_p:
        raise UnsupportedOpError(func, "dropout_p > 0 (PyTorch's CPU kernel refuses it too)")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise UnsupportedOpError(func, "inputs must be 4-D (batch, heads, length, head_dim)")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise UnsupportedOpError(
            func, f"batch sizes {q.shape[0]}, {k.shape[0]}, {v.shape[0]} differ: the CPU kernel does not "
            "broadcast them (its values match no broadcasting rule), so there is no real result to bound")


class _SdpaCase:
    """The float64 balls of one ``_scaled_dot_product_flash_attention_for_cpu`` call: q, k and v (kv heads repeated),
    the scale, the scores s = (q k^T) * scale + mask (ball rules: bmm, mul, add of the mask's finite part) and the
    probabilities (``_Probs``). Causal: column > row is excluded (top-left aligned, as the kernel does); a plain mask's
    -inf entries are excluded exactly; a ball mask is added as a ball (its -inf midpoints are unknown values)."""

    def __init__(self, func, q, k, v, dropout_p, is_causal, attn_mask, scale):
        _check_sdpa(func, q, k, v, dropout_p)
        heads = q.shape[1]
        self.q = _ball64(q)
        self.k = _heads(_ball64(k), heads, func)
        self.v = _heads(_ball64(v), heads, func)
        self.scale = _scale_ball(q.shape[-1], scale, func)
        self.k_centred, k_centre = _centred(self.k)
        self.v_centred, self.v_centre = _centred(self.v)
        s = _bmm(self.q, self.k_centred.transpose(-2, -1)) * self.scale
        length, src = s.shape[-2], s.shape[-1]
        excluded = torch.zeros(length, src, dtype=torch.bool, device=s.device)
        if is_causal:
            excluded = ~torch.ones(length, src, dtype=torch.bool, device=s.device).tril()
        if attn_mask is not None:
            if isinstance(attn_mask, BallTensor):
                s = s + _ball64(attn_mask)
            elif attn_mask.dtype == torch.bool:
                excluded = excluded | ~attn_mask
            else:
                mask64 = attn_mask.to(_F64)
                minus_inf = mask64 == -math.inf
                excluded = excluded | minus_inf
                s = s + torch.where(minus_inf, 0.0, mask64)
        self.probs = _Probs(s, excluded)
        # the scores were taken against centred keys: logsumexp of the true scores adds scale * q . centre
        self.lse = self.probs.lse + _bmm(self.q, _point(k_centre).transpose(-2, -1)) * self.scale


@rule(aten._scaled_dot_product_flash_attention_for_cpu.default)
def sdpa_flash_cpu(func, q, k, v, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    """(out, logsumexp) = (P v, logsumexp(q k^T scale + mask)) with P = softmax(q k^T scale + mask): P and the
    logsumexp by ``_Probs`` (exact monotone end points over the score balls), out by the ball bmm of P and v, all in
    float64, re-centred on the kernel's outputs. scale None means the real 1/sqrt(E) (enclosed). dropout_p must be 0.
    The same bounds are computed directly on float64 tensors, block by block (``_FastCall``, ``_FastAttention``),
    wherever everything is finite.
    """
    out, lse = func(_mid(q), _mid(k), _mid(v), dropout_p, is_causal, attn_mask=_mid(attn_mask), scale=scale)
    _check_sdpa(func, q, k, v, dropout_p)
    call = _FastCall.make(func, q, k, v, is_causal, attn_mask, scale)
    if call is not None:
        keep = _to_keep(call, q, k, v)
        balls = call.forward(out, lse, keep=keep)
        if balls is not None:
            if keep is not None:
                _remember((keep, call.kept), q, k, v, is_causal, attn_mask, scale)
            return balls
    case = _SdpaCase(func, q, k, v, dropout_p, is_causal, attn_mask, scale)
    o = _bmm(case.probs.p, case.v_centred) + _point(case.v_centre)
    return case.probs.exact_empty_rows(_finish(out, o)), _finish(lse, case.lse)


@rule(aten._scaled_dot_product_flash_attention_for_cpu_backward.default)
def sdpa_flash_cpu_backward(func, grad_out, q, k, v, out, logsumexp, dropout_p, is_causal, *, attn_mask=None,
                            scale=None):
    """(dq, dk, dv) of attention at (q, k, v), from its formula with P recomputed by ``_Probs`` (the saved out and
    logsumexp are functions of q, k, v; only the kernel's midpoint uses them):
        dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dP * P)),  dQ = dS K scale,  dK = dS^T Q scale,
    excluded entries having P = 0 exactly; grouped-query heads summed back. Ball rules in float64, re-centred; or the
    same bounds directly on float64 tensors, block by block (``_FastCall``, ``_FastAttention``), wherever everything
    is finite, P recomputed, or for small calls taken from the forward call when q, k, v, the mask and the scale are
    provably unchanged (``_recall``)."""
    grads = func(*mids((grad_out, q, k, v, out, logsumexp, dropout_p, is_causal)), attn_mask=_mid(attn_mask),
                 scale=scale)
    _check_sdpa(func, q, k, v, dropout_p)
    kept = _recall(q, k, v, is_causal, attn_mask, scale)
    call = _FastCall.make(func, q, k, v, is_causal, attn_mask, scale, grad_out=grad_out)
    balls = call.backward(grads, kept) if call is not None else None
    if balls is not None:
        return balls
    case = _SdpaCase(func, q, k, v, dropout_p, is_causal, attn_mask, scale)
    p, g = case.probs.p, _ball64(grad_out)
    dv = _bmm(p.transpose(-2, -1), g)
    dp = _bmm(g, case.v_centred.transpose(-2, -1))
    ds = p * (dp - torch.sum(dp * p, dim=-1, keepdim=True))
    dq = _bmm(ds, case.k_centred) * case.scale
    dk = _bmm(ds.transpose(-2, -1), case.q) * case.scale
    return (case.probs.exact_empty_rows(_finish(grads[0], dq)), _finish(grads[1], _group_sum(dk, k.shape[1])),
            _finish(grads[2], _group_sum(dv, v.shape[1])))


# ----------------------------------------------------------------------------------------------------------------------
# Attention: the fused CPU kernel, bounds computed directly on float64 tensors (the rules' fast path)
#
# The enclosures of ``_SdpaCase``/``_Probs`` (or tighter ones), computed on plain float64 (mid, rad) tensors with every
# rounding folded into constants: about a hundred vectorized passes instead of ~40 dispatched ball rules, and no
# nextafter or boolean select on full-size tensors. Where an input or a score bound is not finite or near overflow
# (unknown rows, NaN, inf), a dimension is empty or a mask is not a tensor we read, the composed rules above run
# instead (``_FastCall.make`` or a block returns None). Grouped-query heads: query head h = j g + i reads kv head j,
# so q is viewed as (B, kv, g L, E) ("rows"); keys and values are not repeated, and the GEMMs for dK, dV sum over each
# group themselves (the same exact real sums as ``_group_sum``).
#
# Notation: u = 2^-53, eta = 2^-1074, lam_A = 2^-1000, lam_B = 2^-512. One RN float64 operation with exact result e
# returns c with |c - e| <= u|e| and |c - e| <= u|c|, plus eta/2 for * and / (+ and - are exact when the result
# underflows).
# ``_inflation``/``_bound``: ``rounding.inflate``'s lemma (t a sum of products of two non-negative floats or sums of
# floats, n operations: exact(t) <= (1 + u)^n (t + n eta/2)) with a multiplier folded into phi; a coefficient
# (1 + u)^m on terms is covered by counting m more operations.
#
# Lemma G (``_ball_mm``, ball GEMM with an output scale). x in (am, ar), y with |y - bm| <= br + eps|bm|, sigma in
# [sm +- sr]; Xc = fl(am bm) with |Xc - am bm| <= g|am||bm| + a (F3, ``_mid_error(k, float64)``), C = fl(Xc sm) (C = Xc
# when sigma = 1 exactly). Then for a slack s >= 0:
#     |sigma x y - C| + s|C| <= s1 (T1 + (1 + eps) T2 + (eps + g) Q + a) + kappa ((1 + g) Q + a) + tau,
# T1 = |am| br, T2 = ar (|bm| + br), Q = |am||bm| (exact GEMMs), s1 = |sm| + sr, kappa = sr + (u + s(1 + u))|sm|,
# tau = (1 + s) eta/2 (kappa = s, tau = 0 unscaled): |xy - am bm| <= |am|(br + eps|bm|) + ar(1 + eps)(|bm| + br),
# |C - Xc sm| <= u|Xc sm| + eta/2, |C| <= (1 + u)|sm||Xc| + eta/2, |Xc| <= (1 + g)Q + a. Each exact GEMM of
# non-negative terms is <= theta_k (fl + k eta) (F3), and |bm| + br is rounded once (factor 1 + u). These are the bmm
# rule's bounds (linalg's ``_bracket``: |mA|(rB + g|mB|) + rA(|mB| + rB)), evaluated in two GEMMs besides the centre
# (``_mm_constants``), one when A is a point.
#
# Lemma E (exp bounds). t <= 0 a difference of two floats, x = fl(t) = t(1 + d), |d| <= u, -700 <= x, v = exp(x) with
# |v - e^x| <= c_rel v + c_abs (trust table). t is in [x/(1 - u), x/(1 + u)], so |t - x| <= rho|x|, rho = u/(1 - u),
# and e^x (1 - rho|x|) <= e^t <= e^x (1 + rho'|x|), rho' = rho (1 + 702u) (e^y <= 1 + y e^y, y <= 700 rho). Hence
#     E_dn = v (1 - c_rel)(1 - rho|x|) - c_abs - D  <=  e^t  <=  v (1 + c_rel)(1 + rho'|x|) + c_abs (1 + 700 rho')
# = E_up (the lower one also for a negative v(1 - c_rel) - c_abs, where it is negative), for any D >= 0. Evaluated as
# E_up = fl(A2 + v fl(F1 + F2|x|)) and E_dn = max(fl(v fl(G1 - G2|x|) - B2), 0) (``_exp_constants``): f = fl(F1 +
# fl(F2|x|)) >= (F1 + F2|x|)((1 - u)^2 - eta) (F1 >= 1/2), fl(A2 + v f) >= v f (1 - u)^2 + (A2 - eta/2)(1 - u); and
# 0 < g <= (G1 - G2|x|(1 - u) + eta/2)(1 + u), a positive fl(v g - B2) <= v g (1 + u)^2 + eta/2 - B2 (v <= 2).
# Arguments are clamped at -700 (x' = max(x, -700); exp never underflows, whose subnormal results cost 100x): the
# upper bound holds at x' since e^(x/(1 + u)) increases in x, and D = 2^-1009 > e^-700 makes the lower one negative
# (so 0) wherever x was clamped. E_up carries an extra lam_A on allowed entries (E_up >= lam_A); both are exactly 0
# on excluded ones (masked F1, F2, A2).
#
# Lemma P (probabilities; ``_FastAttention._probs``). Per row with allowed set A and lo <= s <= hi: M_lo = max lo,
# M_hi = max hi, l_j = lo_j - M_lo, h_j = hi_j - M_hi, delta = M_lo - M_hi (all <= 0). a/(a + b) increases in a and
# decreases in b, so with e_j = e^(l_j), f_j = e^(h_j):
#     P_i <= a/(a + b) for a >= f_i, b <= e^delta sum_(j != i) e_j:  a = Eh_up_i, b = d (TL - El_dn_i)+,
#     P_i >= e_i/(e_i + e^-delta B) for B >= sum_(j != i) f_j:  >= El_dn_i/(El_dn_i + B/d), B = T' - Eh_up_i,
# with d <= e^delta (Lemma E), TL <= sum_j El_dn_j, T' >= sum_j Eh_up_j + lam_B (row vectors). These are the exact
# end points of P over the box of scores (``_Probs``), with ``_Probs``'s own-term bounds replaced by the same term
# (El_dn_i, Eh_up_i), which is tighter, and the shift e^delta kept as a factor. lam_A = 2^-1000 (in Eh_up: a >=
# lam_A) and lam_B = 2^-512 (in T': B >= lam_B) keep denominators normal, so rounding stays relative down to P ~ 1e-300.
# Upper: with r = max(fl(TL - El_dn), 0) <= R(1 + u), D = fl(a + fl(d r)) <= (a + d R)(1 + u)^3 (1 + eta/lam_A),
# q = fl(a/D) >= U (1 - u)/((1 + u)^3 (1 + eta/lam_A)) - eta/2 and fl(K2 + K1 q) >= U for
# K1 >= (1 + u)^3 (1 + eta/lam_A)/(1 - u)^3, K2 >= eta (1 + K1)/2. Lower: y = fl(T' - a3) >= B (1 - u), z = fl(y/d) >=
# (y/d)(1 - u) (normal: y >= lam_B/2, d <= 1; d = 0 gives z = inf and 0), D = fl(El_dn + z) >= (El_dn + B/d)(1 - u)^3,
# so q = fl(El_dn/D) <= (1 + u)/(1 - u)^3 L + eta/2 and max(fl(K3 q - K4), 0) <= L for K3 <= (1 - u)^3/(1 + u)^3,
# K4 >= eta/2 (1 + K3 (1 + u)^2) (realmin).
# Excluded entries get exactly 0 (Eh_up = El_dn = 0; 0/0 -> 0; the additive constants are masked). The P ball:
# pm = fl(p_lo + fl(p_hi - p_lo)/2), pr >= (p_hi - p_lo)/2 + |pm - (p_lo + p_hi)/2| + 3u pm, the 3u pm paying for
# the rounding of the elementwise products with pm below. |P| <= p_hi.
# logsumexp of the centred scores: [M_lo + log TL, M_hi + log T'] (row vectors, rounded outward with nextafter).
#
# Lemma C (centring, as ``_centred``): softmax rows are invariant under k_j -> k_j - c, out_i = c_v + sum_j P_ij
# (v_j - c_v) and dP - rowsum(dP * P) is unchanged under v_j -> v_j - c_v in a non-empty row (sum_j P_ij = 1),
# dQ_i = sum_j dS_ij (k_j - c) since sum_j dS_ij = 0; logsumexp adds sigma q_i . c back. kc = fl(k - c) is the ball
# (kc, rk + u|kc|): Lemma G with eps = u. Empty rows (every entry excluded): out and dq are exactly 0 there (the
# radius is |mid|), logsumexp is unknown.
#
# Backward (dV = P^T dO, dP = dO vc^T, D = rowsum(dP * P), dS = P * (dP - D), dQ = dS kc sigma, dK = dS^T q sigma):
# |sum_j P_j dP_j - Dm| <= sum_j (p_hi rdP + pr |dPm| + gamma_(S-1) |W|) + S eta/2 with W = fl(pm dPm), Dm = fl(sum W)
# (pr's 3u pm covers u pm|dPm|); dS_m = fl(pm Xm), Xm = fl(dPm - Dm): |P X - dS_m| <= p_hi (rdP + rD) + (1 + u) pr
# |Xm| + eta/2 (|Xm - (dPm - Dm)| <= u|Xm|, u p_hi + u pm <= u pr + 2u pm). GEMMs by Lemma G.
#
# Re-centring (``_recentre_into``): |x - mid| <= rad + |mid - c| <= rad + |fl(mid - c)|/(1 - u), rounded up with the
# conversion to the radius dtype folded in (``_to_rad``).

_U64 = rounding.unit_roundoff_exact(_F64)
_ETA64 = Fraction(rounding.eta(_F64))
_LAM_A = Fraction(1, 2**1000)  # Lemma P: the floor of Eh_up on allowed entries
_LAM_B = Fraction(1, 2**512)  # Lemma P: the floor added to T'
_REALMIN64 = float(torch.finfo(_F64).smallest_normal)
# Radius floor: every bounded radius is >= 2^-900 (not merely realmin), so that its products with operands above
# 2^-120 stay normal: subnormal operands or results make float64 kernels 15-100x slower (measured: exp producing
# subnormals, GEMMs of realmin-sized radii). Loosens nothing that matters (2^-900 ~ 1e-271).
_FLOOR = Fraction(1, 2**900)


def _ru(x) -> float:
    return rounding.round_up_float(Fraction(x), _F64)


def _rd(x) -> float:
    return rounding.round_down_float(Fraction(x), _F64)


@functools.lru_cache(maxsize=256)
def _scalar(value: float, device: torch.device) -> torch.Tensor:
    """A cached 0-d float64 constant (read only)."""
    return torch.tensor(value, dtype=_F64, device=device)


@functools.lru_cache(maxsize=None)
def _inflation(n_ops: int, extra: Fraction, mult: Fraction = Fraction(1),
               floor: float = float(_FLOOR)) -> tuple[float, float]:
    """(phi, a) with fl(a + fl(phi t)) >= mult (1 + u)^n (t + n eta/2) + extra for the computed t >= 0 of an expression
    of n operations (``rounding.inflate``'s lemma): fl(a + fl(phi t)) >= phi t (1 - u)^2 + (a - eta/2)(1 - u), with or
    without an FMA. a >= ``floor``."""
    grow = (1 + _U64) ** n_ops
    phi = _ru(mult * grow / (1 - _U64) ** 2)
    a = _ru(_ETA64 / 2 + (mult * grow * n_ops * _ETA64 / 2 + extra) / (1 - _U64))
    return phi, max(a, floor)


def _bound(t: torch.Tensor, consts: tuple[float, float]) -> torch.Tensor:
    """fl(a + fl(phi t)) for (phi, a) from ``_inflation``: one pass, written over ``t`` (every caller's t is its own
    temporary)."""
    phi, a = consts
    return torch.add(_scalar(a, t.device), t, alpha=phi, out=t)


@functools.lru_cache(maxsize=None)
def _to_rad(rd: torch.dtype) -> tuple[float, float]:
    """``_inflation`` for ``_recentre_into``'s t = rad + C|d| (2 operations) followed by the RN conversion to the radius
    dtype rd, which loses at most a factor 1 - u_rd and eta_rd/2: multiplier 1/(1 - u_rd), extra eta_rd/(2(1 - u_rd))
    (no floor: an exact 0 keeps a radius of one subnormal eta_rd, as ``common.recentre`` gives)."""
    if rd == _F64:
        return _inflation(2, Fraction(0))
    u_r, eta_r = rounding.unit_roundoff_exact(rd), Fraction(rounding.eta(rd))
    return _inflation(2, eta_r / (2 * (1 - u_r)), 1 / (1 - u_r), 0.0)


_RECENTRE = _ru(1 / (1 - _U64))  # |mid - centre| <= |fl(mid - centre)|/(1 - u)


def _recentre_into(dst: torch.Tensor, mid: torch.Tensor, centre: torch.Tensor, rad: torch.Tensor, empty=None) -> None:
    """Write into ``dst`` (a slice of an output's radius tensor, in the radius dtype) the radius of the ball on the
    kernel's ``mid`` that contains every x with |x - centre| <= rad (float64 temporaries of mid's shape, overwritten):
    |x - mid| <= rad + |fl(mid - centre)|/(1 - u) (two operations, bounded and converted by ``_to_rad``, the
    conversion being ``copy_``'s round to nearest); NaN -> +inf. ``empty``: rows whose exact value is 0 get the radius
    |mid|."""
    rd = dst.dtype
    rad.add_(torch.sub(mid, centre, out=centre).abs_(), alpha=_RECENTRE)
    dst.copy_(_bound(rad, _to_rad(rd))).nan_to_num_(nan=math.inf, posinf=math.inf)
    if empty is not None:
        dst.copy_(torch.where(empty.expand(mid.shape), torch.abs(mid).to(rd), dst))


_SLACKS = (Fraction(0), _U64, _U64 * (2 + _U64))  # none; u|C| (scores); u(2 + u)|C| (scores plus an additive mask)


@functools.lru_cache(maxsize=4096)
def _mm_constants(k: int, b_ball: bool, a_ball: bool, eps_u: bool, sm: float, sr: float, slack: int, scores: bool,
                  term_coefs: tuple) -> tuple[float | None, float, tuple, tuple[float, float]]:
    """Constants of Lemma G's bound B = s1 T1 + s1 (1 + eps) T2 + c_q Q + (s1 + kappa) a + tau, c_q = s1 (eps + g) +
    kappa (1 + g) (times 1/(1 - u) for the scores, whose ``terms`` already are), evaluated from one or two GEMMs:
      B ball: s1 T1 + c_q Q = s1 |am| (br + w|bm|) with w >= c_q/s1, and W = fl(fl(br + fl(w|bm|)) + F), F = 2^-900
        >= eta/2, satisfies br + w|bm| <= (fl(br + fl(w|bm|)) + eta/2)/(1 - u)^2 <= W/(1 - u)^3; so
        s1 T1 + c_q Q <= m (fl(|am| W) + k eta) with m = s1 theta_k/(1 - u)^3 (F3);
      B point: c_q Q <= m (fl(|am||bm|) + k eta) with m = c_q theta_k;
      s1 (1 + eps) T2 <= c2 (fl(ar (fl(|bm| + br))) + k eta), c2 = s1 (1 + eps)(1 + u) theta_k ((1 + u): the sum).
    Returns (w or None, c2/m, coef/m per term, ``_inflation`` with multiplier m of 2 (a_ball + #terms) operations and
    the absolute k eta (m + c2) + (s1 + kappa) a + tau): the bound is evaluated as m (G1 + (c2/m) G2 + sum
    (coef/m) term). eps = u or 0, slack ``_SLACKS[slack]``; the scale is non-zero (s1 > 0)."""
    g, a = _mid_error(k, _F64)
    th = rounding.theta(k, _U64)
    eps, slack_f = (_U64 if eps_u else Fraction(0)), _SLACKS[slack]
    factor = 1 / (1 - _U64) if scores else Fraction(1)
    scaled = not (sm == 1.0 and sr == 0.0)
    abs_sm, sr_f = abs(Fraction(sm)), Fraction(sr)
    s1 = abs_sm + sr_f
    kappa = sr_f + (_U64 + slack_f * (1 + _U64)) * abs_sm if scaled else slack_f
    tau = (1 + slack_f) * _ETA64 / 2 if scaled else Fraction(0)
    c_q = s1 * (eps + g) + kappa * (1 + g)
    if b_ball:
        w, m = _ru(c_q / s1), s1 * th / (1 - _U64) ** 3
    else:
        w, m = None, c_q * th
    c2 = s1 * (1 + eps) * ((1 + _U64) if b_ball else 1) * th if a_ball else Fraction(0)
    const = (k * _ETA64 * (m + c2) + (s1 + kappa) * a + tau) * factor
    mult = m * factor
    n_ops = 2 * a_ball + 2 * len(term_coefs)
    return w, _ru(c2 / m), tuple(_ru(Fraction(c) / mult) for c in term_coefs), _inflation(n_ops, const, mult)


_F_FLOOR = float(_FLOOR)


def _ball_mm(am, ar, bm, br, *, abs_a=None, abs_b=None, eps_u=False, scale=(1.0, 0.0), slack=0, scores=False,
             terms=()):
    """(C, R), float64: C = fl(am @ bm) (times scale[0] unless the scale is exactly 1) and R >= (|sigma x y - C| +
    slack |C|) (/(1 - u) for the scores) + sum of ``terms`` for every x, y, sigma of Lemma G (ar, br None: points;
    ``_mm_constants``). ``terms`` are pairs (t >= 0 broadcastable to C, coefficient >= the exact one). ``abs_a``,
    ``abs_b``: |am|, |bm| when the caller has them (read only). ``br`` may be float32 (or any float dtype): it only
    meets float64 tensors in additions, which compute in float64 on its exact widening."""
    sm, sr = scale
    w, c2, coefs, consts = _mm_constants(am.shape[-1], br is not None, ar is not None, eps_u, sm, sr, slack, scores,
                                         tuple(c for _, c in terms))
    centre = torch.matmul(am, bm)
    if not (sm == 1.0 and sr == 0.0):
        centre.mul_(sm)
    abs_a = torch.abs(am) if abs_a is None else abs_a
    abs_b = torch.abs(bm) if abs_b is None else abs_b
    t = torch.matmul(abs_a, abs_b if br is None else torch.add(br, abs_b, alpha=w).add_(_F_FLOOR))
    if ar is not None:
        t.add_(torch.matmul(ar, abs_b if br is None else torch.add(abs_b, br)), alpha=c2)
    for (term, _), coef in zip(terms, coefs):
        t.add_(term, alpha=coef)
    return centre, _bound(t, consts)


_EXP_FLOOR = Fraction(1, 2**1009)  # > e^-700 (1009 ln 2 = 699.4)


@functools.lru_cache(maxsize=None)
def _exp_constants(backend: str) -> tuple[float, ...]:
    """(F1, F2, A2 + lam_A, G1, G2, B2) of Lemma E: F1 >= (1 + c_rel)/Dn, F2 >= (1 + c_rel) rho'/Dn with
    Dn = ((1 - u)^2 - eta)(1 - u)^2, A2 >= (c_abs (1 + 700 rho') + lam_A)/(1 - u) + eta/2; G1 <= (1 - c_rel)/(1 + u)^3,
    G2 >= (1 - c_rel) rho/((1 - u)(1 + u)^3), B2 >= eta/2 + c_abs + 2^-1009 + eta (1 + u)^3 and >= realmin (no
    subnormal constant)."""
    c_rel, c_abs = (Fraction(c) for c in accuracy._coefficients("exp", backend))
    u = _U64
    rho = u / (1 - u)
    rho_up = rho * (1 + 702 * u)
    dn = ((1 - u) ** 2 - _ETA64) * (1 - u) ** 2
    f1, f2 = _ru((1 + c_rel) / dn), _ru((1 + c_rel) * rho_up / dn)
    a2 = _ru((c_abs * (1 + 700 * rho_up) + _LAM_A) / (1 - u) + _ETA64 / 2)
    g1, g2 = _rd((1 - c_rel) / (1 + u) ** 3), _ru((1 - c_rel) * rho / ((1 - u) * (1 + u) ** 3))
    b2 = max(_ru(_ETA64 / 2 + c_abs + _EXP_FLOOR + _ETA64 * (1 + u) ** 3), _REALMIN64)
    return f1, f2, a2, g1, g2, b2


def _exp_dn(x: torch.Tensor, g1: float, g2: float, b2: float) -> torch.Tensor:
    """Lemma E's lower bound of e^t at x = fl(t) in [-700, 0] (x is overwritten; the result is a new tensor)."""
    g = torch.add(_scalar(g1, x.device), x, alpha=g2)  # G1 - G2|x|
    return torch.addcmul(_scalar(-b2, x.device), x.exp_(), g, out=g).clamp_min_(0)


def _exp_up(x: torch.Tensor, f1, f2, a2) -> torch.Tensor:
    """Lemma E's upper bound of e^t at x = fl(t) in [-700, 0] (x is overwritten); f1, f2 (= -F2), a2 are 0-d or
    masked constant tensors (0 on excluded entries)."""
    f = torch.addcmul(f1, x, f2)  # F1 + F2|x|
    return torch.addcmul(a2, x.exp_(), f, out=f)


_K1 = _ru((1 + _U64) ** 3 * (1 + _ETA64 / _LAM_A) / (1 - _U64) ** 3)
_K2 = max(_ru(_ETA64 * (1 + Fraction(_K1)) / 2), _REALMIN64)
_K3 = _rd((1 - _U64) ** 3 / (1 + _U64) ** 3)
_K4 = max(_ru(_ETA64 / 2 * (1 + Fraction(_K3) * (1 + _U64) ** 2)), _REALMIN64)
# The P ball: wc = fl(p_hi - p_lo) (|wc - w| <= u w, w = p_hi - p_lo <= wc/(1 - u)), pm = fl(p_lo + fl(wc/2)), so
# |pm - (p_lo + p_hi)/2| <= u pm + eta/2 + u w/2 and pr >= w/2 + |pm - (p_lo + p_hi)/2| + 3u pm holds for
# pr = bound of fl(wc + C pm) with multiplier M = (1 + u)/(2(1 - u)), C >= 4u/M, extra eta/2 (2 operations)
_PR_COEF = _ru(8 * _U64 * (1 - _U64) / (1 + _U64))
_PR_INFLATION = _inflation(2, _ETA64 / 2, (1 + _U64) / (2 * (1 - _U64)))
_MASK_SLACK = _ru(_U64 * (2 + _U64))
_DS_INFLATION = _inflation(5, _ETA64 / 2)  # dS: 4 operations and the (1 + u) on pr |Xm|
_U_UP = _ru(_U64)
# T' = fl(lam' + fl(C s)) >= C s (1 - u)^2 + lam_B >= theta_(S-1) s + lam_B for C >= theta/(1 - u)^2,
# lam' >= lam_B/(1 - u) + eta/2 (s the computed row sum of S non-negative terms, whose exact sum is <= theta_(S-1) s)
_LAM_UP = _ru(_LAM_B / (1 - _U64) + _ETA64 / 2)


def _wide(smin: float, smax: float, rmax: float) -> bool | None:
    """The overflow check of a block's scores from min and max of their centres and the largest radius: None where a
    bound is not finite or near overflow (also NaN), else whether an argument of Lemma E may fall below -700 (the
    arguments have |x| <= 2 mag + 1, ``_FastAttention._probs``), which only then needs the clamp."""
    mag = abs(smax) + abs(smin) + 2 * rmax
    if not mag < 1e300:
        return None
    return 2 * mag + 1 >= 700


def _shift_bound(m_lo: torch.Tensor, m_hi: torch.Tensor, clamp: bool, g1: float, g2: float, b2: float) -> torch.Tensor:
    """d <= e^(M_lo - M_hi): Lemma E's lower bound at x = fl(M_lo - M_hi) (clamped at -700 where ``clamp``)."""
    x = torch.sub(m_lo, m_hi)
    return _exp_dn(x.clamp_min_(-700.0) if clamp else x, g1, g2, b2)


@functools.lru_cache(maxsize=None)
def _sum_up_factor(n: int) -> float:
    return _ru(rounding.theta(max(n - 1, 1), _U64) / (1 - _U64) ** 2)


@functools.lru_cache(maxsize=None)
def _bounds_constants(backend: str, s: int) -> tuple[float, ...]:
    """``fused.attention_bounds``'s constants: Lemma E's (G1, G2, B2, F1, -F2, A2), the row sums' factors
    (``_sum_dn_factor``, ``_sum_up_factor``, ``_LAM_UP``) and Lemma P's (K1, K2, K3, K4, C_pr, phi_pr, a_pr)."""
    f1, f2, a2, g1, g2, b2 = _exp_constants(backend)
    return (g1, g2, b2, f1, -f2, a2, _sum_dn_factor(s), _sum_up_factor(s), _LAM_UP, _K1, _K2, _K3, _K4, _PR_COEF,
            *_PR_INFLATION)


@functools.lru_cache(maxsize=None)
def _log_constants(backend: str) -> tuple[float, tuple[float, float]]:
    """(c_rel (1 + u), ``_inflation`` of ``_lse_into``'s 8 operations with the absolute 2 c_abs + eta/2) of the trust
    table's float64 log, |lib(x) - log x| <= c_rel |lib(x)| + c_abs (cached: the rational arithmetic and the Fraction
    key of ``_inflation`` cost ~40 us a call)."""
    c_rel, c_abs = accuracy._coefficients("log", backend)
    return _ru(Fraction(c_rel) * (1 + _U64)), _inflation(8, 2 * Fraction(c_abs) + _ETA64 / 2)


_HALF_UP = _ru((1 + _U64) / 2)
_LSE_SLACK = _ru(Fraction(16, 10) * _U64 * (1 + _U64))


@functools.lru_cache(maxsize=None)
def _sum_dn_factor(n: int) -> float:
    """D with fl(s D) <= exact sum for the computed row sum s of the n values El_dn: the exact sum is >=
    s (1 - gamma_(n-1)), and s is 0 (empty rows) or >= 1/2 (the row maximum has x = 0 and El_dn(0) > 0.99), so
    fl(s D) <= s D (1 + u) + eta/2 <= s (D (1 + u) + eta) <= s (1 - gamma) for D <= (1 - gamma - eta)/(1 + u)."""
    return _rd((1 - rounding.growth(max(n - 1, 1), _U64) - _ETA64) / (1 + _U64))


def _rows(t: torch.Tensor | None, kv: int, rows: int) -> torch.Tensor | None:
    """(B, H, L, X) -> (B, kv, g L, X): query head j g + i, position p -> kv head j, row i L + p (a view if it can)."""
    return None if t is None else t.reshape(t.shape[0], kv, rows, t.shape[-1])


def _mask_rows(t: torch.Tensor, b: int, h: int, l: int, s: int, kv: int, g: int) -> torch.Tensor:
    """A mask broadcastable to (B, H, L, S) in the row layout, broadcastable to (B, kv, g L, S)."""
    t = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    tb, th = t.shape[0], t.shape[1]
    t = t.expand(tb, th, l, s)
    if g == 1:
        return t
    if th == 1:
        return t.repeat(1, 1, g, 1)
    return t.reshape(tb, kv, g * l, s)


def _exclusion(excluded: torch.Tensor):
    """(allowed as float64 0/1, neg as float64 0/-inf, empty rows or None) of a row-layout bool mask."""
    allowed = (~excluded).to(_F64)
    neg = torch.zeros(excluded.shape, dtype=_F64, device=excluded.device).masked_fill_(excluded, -math.inf)
    empty = ~(~excluded).any(-1, keepdim=True)
    return allowed, neg, (empty if bool(empty.any()) else None)


@functools.lru_cache(maxsize=64)
def _causal_exclusion(l: int, s: int, g: int, device: torch.device):
    """``_exclusion`` of the causal mask (column > row, top-left aligned as the kernel does), cached: read only."""
    excluded = ~torch.ones(l, s, dtype=torch.bool, device=device).tril()
    return _exclusion(_mask_rows(excluded, 1, 1, l, s, 1, g))


@functools.lru_cache(maxsize=256)
def _masked_constants(allowed: torch.Tensor, f1: float, f2: float, a2: float):
    """(allowed F1, -allowed F2, allowed A2, allowed K2) of Lemmas E and P: 0 on excluded entries (cached for the
    cached causal masks, which are read only; ``__wrapped__`` for other masks)."""
    return allowed * f1, allowed * -f2, allowed * a2, allowed * _K2


# Blocks. Nothing in these bounds mixes two (batch element, kv head) pairs: every GEMM is per head, every reduction
# over a row of scores or over the keys of one head (the centres c_k, c_v). So a call is computed in blocks of whole
# batch elements (of kv heads when one batch element alone is over the budget), each block holding only its own
# float64 working set, and its outputs' radii are written into the call's radius tensors. Every lemma above holds
# block by block (they are statements per head and per row), and the operations and operands are those of one block
# over the whole call, so the radii are the same bit for bit (checked in the tests; were a kernel's summation order to
# depend on the layout of a block's float64 copies, a centre c_k, c_v or a GEMM's rounding would move, which the
# lemmas allow: they hold for any centre and any summation order). The call-wide decisions are taken once (which
# operands are points: ``_nonzero_radii``); those taken per block only skip work that would not change a value (the
# clamp at -700 is a no-op where 2 mag + 1 < 700, nan_to_num where no 0/0 can arise). A block whose scores are not
# finite or near overflow sends the whole call to the composed rules. The P of a block is not kept for the
# backward (it would hold 24 bytes per score from forward to backward, where the kernel itself stores none); the
# backward recomputes it (with the forward's row statistics), except for calls of at most ``_REUSE_LIMIT`` scores
# (``_remember``).
# Working set per score, measured: the forward about 7 score-shaped float64 tensors at once (56 bytes a score), the
# backward about 10 (P, dP and a GEMM's temporaries: 80 bytes), besides the per-head operands; a block holds at most
# ``_BLOCK_BYTES`` of them where whole heads allow, and the blocks of a call are of equal size (up to one batch
# element or head). 1 MiB: with 2 MiB the attention backward set transformer-tiny's step peak (2.46x plain, 2.30x
# at 1 MiB), for ~1% of its step time.
_BLOCK_BYTES = 1 << 20
_BYTES_PER_SCORE = {"forward": 56, "backward": 80}


def _blocks(b: int, kv: int, g: int, l: int, s: int, phase: str) -> list[tuple[int, int, int, int]]:
    """(b0, b1, j0, j1): the blocks (batch elements b0:b1, kv heads j0:j1) covering a call, in order."""
    budget = max(1, _BLOCK_BYTES // _BYTES_PER_SCORE[phase])  # scores a block
    per_head = g * l * s
    if kv * per_head <= budget:
        n = -(-b // (budget // (kv * per_head)))  # blocks of whole batch elements, as few as fit, equal sizes
        step = -(-b // n)
        return [(i, min(i + step, b), 0, kv) for i in range(0, b, step)]
    n = -(-kv // max(1, budget // per_head))
    step = -(-kv // n)
    return [(i, i + 1, j, min(j + step, kv)) for i in range(b) for j in range(0, kv, step)]


def _nonzero_radii(tensors) -> list[bool]:
    """Per tensor: a ball whose radius is not identically zero (else a point: the GEMMs skip its radius terms), by
    ``linalg._is_point`` (a non-zero corner decides without a scan; "point" is always a full scan's answer)."""
    return [isinstance(x, BallTensor) and not _is_point(x.rad) for x in tensors]


def _part(x, ball: bool, index, wide_rad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mid, rad or None) of ``x[index]``, the midpoint in float64 (exact widening), the radius too when
    ``wide_rad`` (an operand that ``_ball_mm`` multiplies as A), else in its own dtype (a B operand's radius is only
    added to float64 tensors, which widens it exactly on the fly). Read only: these may be views of the argument."""
    m = _mid(x)[index].to(_F64)
    if not ball:
        return m, None
    r = x.rad.expand(x.shape)[index]
    return m, (r.to(_F64) if wide_rad else r)


def _mask_block(t: torch.Tensor, index) -> torch.Tensor:
    """A mask broadcastable to (B, H, L, S) cut to a block's batch elements and query heads ``index`` (its broadcast
    dimensions of size 1 stay)."""
    t = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    return t[index[0] if t.shape[0] != 1 else slice(None), index[1] if t.shape[1] != 1 else slice(None)]


class _FastCall:
    """One fused attention call on the fast path: its arguments, the call-wide decisions (which operands are points,
    the scale) and its blocks (``_FastAttention``). ``make`` returns None where the composed rules must run (empty
    dimensions, non-floating inputs, a mask the fast path does not read, a zero or non-finite scale)."""

    @classmethod
    def make(cls, func, q, k, v, is_causal, attn_mask, scale, grad_out=None):
        if isinstance(attn_mask, BallTensor) and not attn_mask.is_floating_point():
            return None
        if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
            return None
        b, h, l, e = q.shape
        kv, s, ev = k.shape[1], k.shape[2], v.shape[-1]
        if 0 in (b, h, l, e, kv, s, ev) or k.shape[-1] != e or v.shape[1] != kv or v.shape[2] != s:
            return None
        if h % kv:
            raise UnsupportedOpError(func, f"{h} query heads and {kv} key/value heads")
        if not all(x.is_floating_point() for x in (q, k, v) + (() if grad_out is None else (grad_out,))):
            return None
        scale = (float(scale), 0.0) if scale is not None else _inverse_sqrt(int(e))
        if scale[0] == 0.0 or not math.isfinite(scale[0]):  # Lemma G's constants need s1 > 0
            return None
        self = cls()
        self.b, self.h, self.l, self.kv, self.g, self.s = b, h, l, kv, h // kv, s
        self.q, self.k, self.v, self.grad = q, k, v, grad_out
        self.is_causal, self.attn_mask, self.scale = is_causal, attn_mask, scale
        # q and k are checked through the scores (``_probs``); non-finite values of v, dO or of their radii only
        # propagate to NaN or infinite output radii, which ``_recentre_into`` makes +inf
        self.ball = _nonzero_radii((q, k, v, grad_out))
        self.recording, self.rows = False, None
        return self

    def block(self, b0: int, b1: int, j0: int, j1: int, need_lse: bool, probs=None):
        """The block (batch elements b0:b1, kv heads j0:j1) with its P: ``probs`` (p_hi, pm, pr) when given, else
        computed (Lemmas E, P; with the forward's row statistics when ``self.rows`` holds them); None where a score
        bound is not finite or near overflow."""
        blk = _FastAttention(self, b0, b1, j0, j1)
        device = self.q.device
        blk._mask(device)
        if probs is not None:
            blk.p_hi, blk.pm, blk.pr = probs
            blk.mf = blk.mterm = None  # the scores' operands
            return blk
        return blk if blk._probs(device, need_lse) else None

    def forward(self, out: torch.Tensor, lse: torch.Tensor, keep: str | None = None):
        """(out, logsumexp) balls on the kernel's midpoints, block by block; None where a block fails. ``keep`` (for
        ``_remember``): "P", the call is one block and its P stays in ``self.kept``; "rows", the row statistics of
        every block are recorded in ``self.kept`` (``_FastAttention._probs``)."""
        out_rad = torch.empty_like(out, dtype=rounding.rad_dtype(out.dtype))
        lse_rad = torch.empty_like(lse, dtype=rounding.rad_dtype(lse.dtype))
        self.recording = keep == "rows"
        if self.recording:
            self.kept = [torch.empty(5, self.b, self.kv, self.g * self.l, 1, dtype=_F64, device=out.device), False]
        for b0, b1, j0, j1 in _blocks(self.b, self.kv, self.g, self.l, self.s, "forward"):
            blk = self.block(b0, b1, j0, j1, need_lse=True)
            if blk is None:
                return None
            qi = blk.q_index
            if keep == "P":
                self.kept = (blk.p_hi, blk.pm, blk.pr)
            blk.p_hi = None  # the forward reads pm and pr only
            blk.forward_into(out[qi], lse[qi], out_rad[qi], lse_rad[qi])
            del blk  # before the next block's working set
        return BallTensor(out, out_rad), BallTensor(lse, lse_rad)

    def backward(self, grads, kept=None):
        """(dq, dk, dv) balls on the kernel's midpoints, block by block; None where a block fails. ``kept``: what the
        forward left for exactly these inputs (``_recall``): ("P", P), one block over the whole call with the forward's
        P, or ("rows", statistics), P recomputed with the forward's row statistics."""
        rads = [torch.empty_like(t, dtype=rounding.rad_dtype(t.dtype)) for t in grads]
        kind, value = kept if kept is not None else (None, None)
        self.rows = value if kind == "rows" else None
        probs = value if kind == "P" else None
        blocks = ([(0, self.b, 0, self.kv)] if probs is not None
                  else _blocks(self.b, self.kv, self.g, self.l, self.s, "backward"))
        for b0, b1, j0, j1 in blocks:
            blk = self.block(b0, b1, j0, j1, need_lse=False, probs=probs)
            if blk is None:
                return None
            qi, ki = blk.q_index, blk.kv_index
            blk.backward_into((grads[0][qi], grads[1][ki], grads[2][ki]), (rads[0][qi], rads[1][ki], rads[2][ki]))
            del blk
        return tuple(BallTensor(m, r) for m, r in zip(grads, rads))


class _FastAttention:
    """Float64 bounds of one block of a fused attention call (Lemmas G, E, P, C above): the scores, P as (p_hi, pm,
    pr), the logsumexp bounds, and the outputs' radii (``forward_into``, ``backward_into``). Each float64 operand
    (``_q_parts`` ...) is made when needed and dropped after its last use."""

    @classmethod
    def build(cls, func, q, k, v, is_causal, attn_mask, scale, grad_out=None):
        """The bounds of a whole call as one block (P computed), or None where the composed rules must run."""
        call = _FastCall.make(func, q, k, v, is_causal, attn_mask, scale, grad_out)
        if call is None:
            return None
        return call.block(0, call.b, 0, call.kv, need_lse=grad_out is None)

    def __init__(self, call: _FastCall, b0: int, b1: int, j0: int, j1: int):
        self.call, self.scale = call, call.scale
        self.b, self.kv, self.g, self.l, self.s = b1 - b0, j1 - j0, call.g, call.l, call.s
        self.h, self.rows = self.kv * self.g, self.g * self.l
        self.q_index = (slice(b0, b1), slice(j0 * self.g, j1 * self.g))
        self.kv_index = (slice(b0, b1), slice(j0, j1))
        self.row_index = (slice(None), slice(b0, b1), slice(j0, j1))  # of the row statistics (5, B, kv, g L, 1)

    def _q_parts(self):
        """(qm, rq, |qm|) in the row layout."""
        qm, rq = _part(self.call.q, self.call.ball[0], self.q_index)
        qm, rq = _rows(qm, self.kv, self.rows), _rows(rq, self.kv, self.rows)
        return qm, rq, torch.abs(qm)

    def _k_parts(self):
        """(kc, rk, |kc|, c_k): the keys centred on their mean c_k (Lemma C); always B in ``_ball_mm``."""
        km, rk = _part(self.call.k, self.call.ball[1], self.kv_index, wide_rad=False)
        ck = torch.mean(km, dim=-2, keepdim=True)
        kcm = km - ck
        return kcm, rk, torch.abs(kcm), ck

    def _v_parts(self):
        """(vc, rv, |vc|, c_v): the values centred on their mean c_v (Lemma C); always B in ``_ball_mm``."""
        vm, rv = _part(self.call.v, self.call.ball[2], self.kv_index, wide_rad=False)
        cv = torch.mean(vm, dim=-2, keepdim=True)
        vcm = vm - cv
        return vcm, rv, torch.abs(vcm), cv

    def _g_parts(self):
        """(gm, rg, |gm|) of dO in the row layout."""
        gm, rg = _part(self.call.grad, self.call.ball[3], self.q_index)
        gm, rg = _rows(gm, self.kv, self.rows), _rows(rg, self.kv, self.rows)
        return gm, rg, torch.abs(gm)

    def _mask(self, device):
        """Row-layout mask pieces of the block: allowed (0/1), neg (0/-inf), empty rows (from the excluded entries: a
        causal mask, a bool mask's False entries, a float mask's -inf entries), the additive mask's centre ``mf`` and
        its term mterm >= (rm + u(2 + u)|mf|)/(1 - u) (the mask's radius and the rounding of sc2 = fl(sc + mf):
        |sc + mf - sc2| + u|sc2| <= u(2 + u)(|sc| + |mf|), see ``_probs``)."""
        b, h, l, s, kv, g = self.b, self.h, self.l, self.s, self.kv, self.g
        attn_mask, is_causal = self.call.attn_mask, self.call.is_causal
        self.allowed = self.neg = self.empty = self.mf = self.mterm = None
        self.cached_mask = attn_mask is None
        if attn_mask is None:
            if is_causal:
                self.allowed, self.neg, self.empty = _causal_exclusion(l, s, g, device)
            return
        excluded = mf = rm = None
        if is_causal:
            excluded = ~torch.ones(l, s, dtype=torch.bool, device=device).tril()
        if isinstance(attn_mask, BallTensor):
            mf = _mask_block(attn_mask.mid, self.q_index).to(_F64)
            rm = _mask_block(attn_mask.rad.expand(attn_mask.shape), self.q_index).to(_F64)
        elif attn_mask.dtype == torch.bool:
            kept = _mask_block(attn_mask, self.q_index)
            excluded = ~kept if excluded is None else excluded | ~kept
        else:
            mf = _mask_block(attn_mask, self.q_index).to(_F64)
            minus_inf = mf == -math.inf
            excluded = minus_inf if excluded is None else excluded | minus_inf
            mf = mf.masked_fill(minus_inf, 0.0)
        if excluded is not None:
            self.allowed, self.neg, self.empty = _exclusion(_mask_rows(excluded, b, h, l, s, kv, g))
        if mf is not None:
            self.mf = _mask_rows(mf, b, h, l, s, kv, g)
            t = torch.abs(self.mf).mul_(_MASK_SLACK)
            if rm is not None:
                t = t.add_(_mask_rows(rm, b, h, l, s, kv, g))
            self.mterm = _bound(t, _inflation(4, Fraction(0)))  # (1 - u)^-1 <= (1 + u)^2: two more operations

    def _probs(self, device, need_lse: bool) -> bool:
        """Scores, then P (and the logsumexp bounds) by Lemmas E, P. False where a score bound is not finite or near
        overflow. Every score-shaped temporary is overwritten or dropped after its last use (about four live at once).

        Scores: sc2 = fl(sc + mf) with sc, R from Lemma G (slack u, or u(2 + u) with a mask, divided by 1 - u) plus the
        mask's term: R (1 - u) >= rho + u|sc2| with rho >= |exact - sc2|, so lo = fl(sc2 - R) <= sc2 - R + u(|sc2| + R)
        <= sc2 - rho and likewise hi = fl(sc2 + R) >= sc2 + rho."""
        has_mask = self.mf is not None
        qm, rq, qabs = self._q_parts()
        kcm, rk, kabs, ck = self._k_parts()
        sc, rad = _ball_mm(qm, rq, kcm.mT, None if rk is None else rk.mT, abs_a=qabs, abs_b=kabs.mT, eps_u=True,
                           scale=self.scale, slack=2 if has_mask else 1, scores=True,
                           terms=((self.mterm, 1.0),) if has_mask else ())
        del kcm, rk, kabs
        # the logsumexp's sigma q . c_k (Lemma G), while q's operands are alive (``_lse_into``)
        self.lse_q = _ball_mm(qm, rq, ck.mT, None, abs_a=qabs, scale=self.scale) if need_lse else None
        del qm, rq, qabs
        if has_mask:
            sc.add_(self.mf)
            self.mf = self.mterm = None
        if self.allowed is None:
            fused_result = self._probs_fused(sc, rad, need_lse, device)
            if fused_result is not None:
                return fused_result
        # With the forward's row statistics M_lo, M_hi, TL, T', d (``_remember``): the values the skipped passes give
        # on the same, unchanged inputs, whose check below passed in the forward (its "wide", taken over the forward's
        # blocks, only adds no-op clamps and nan_to_num here)
        rows = self.call.rows
        if rows is None:
            # every score bound finite and far from overflow (else the composed rules); the arguments x = fl(lo - M_lo),
            # fl(hi - M_hi), fl(M_lo - M_hi) of allowed entries have |x| <= (1 + u)^2 (|smax| + |smin| + 2 rmax)
            # <= 2 mag + 1 (lo, hi lie in [smin - rmax, smax + rmax] up to a factor 1 + u), so only excluded entries
            # (-inf) or a large mag need the clamp at -700
            smin, smax = torch.aminmax(sc)
            wide = _wide(*torch.stack([smin, smax, rad.amax()]).tolist())
            if wide is None:
                return False
        else:
            wide = rows[1]
        clamp = self.neg is not None or wide
        f1, f2, a2, g1, g2, b2 = _exp_constants(accuracy.backend_for(device.type))
        if self.neg is not None:
            sc.add_(self.neg)
        lo = torch.sub(sc, rad)
        hi = sc.add_(rad)
        del sc, rad
        if rows is None:
            m_lo = torch.amax(lo, dim=-1, keepdim=True)
            m_hi = torch.amax(hi, dim=-1, keepdim=True)
            if self.empty is not None:
                m_lo.nan_to_num_(neginf=0.0)  # -inf in empty rows
                m_hi.nan_to_num_(neginf=0.0)
        else:
            m_lo, m_hi, tl, t_prime, d = rows[0][self.row_index].unbind(0)
        x = lo.sub_(m_lo)
        e_lo = _exp_dn(x.clamp_min_(-700.0) if clamp else x, g1, g2, b2)  # El_dn (0 where excluded)
        del lo, x
        if self.allowed is None:
            consts = (_scalar(f1, device), _scalar(-f2, device), _scalar(a2, device), _scalar(_K2, device))
        elif self.cached_mask:
            consts = _masked_constants(self.allowed, f1, f2, a2)
        else:
            consts = _masked_constants.__wrapped__(self.allowed, f1, f2, a2)
        x = hi.sub_(m_hi)
        e_hi = _exp_up(x.clamp_min_(-700.0) if clamp else x, *consts[:3])  # Eh_up (+lam_A; 0 where excluded)
        del hi, x
        k2 = consts[3]
        if rows is None:
            tl = torch.sum(e_lo, dim=-1, keepdim=True).mul_(_sum_dn_factor(self.s))
            t_prime = torch.add(_scalar(_LAM_UP, device), torch.sum(e_hi, dim=-1, keepdim=True),
                                alpha=_sum_up_factor(self.s))
            d = _shift_bound(m_lo, m_hi, clamp, g1, g2, b2)
            self._record_rows(m_lo, m_hi, tl, t_prime, d, wide)
        self.p_hi, self.pm, self.pr = self._p_ball(e_lo, e_hi, tl, t_prime, d, k2, wide, device)
        # logsumexp of the centred scores lies in [M_lo + log TL, M_hi + log T'] (row vectors; ``_lse_into``)
        self.lse_parts = (m_lo, m_hi, torch.cat([tl, t_prime], -1)) if need_lse else None
        return True

    def _probs_fused(self, sc, rad, need_lse: bool, device) -> bool | None:
        """``_probs`` from the scores on, without excluded entries, as two kernels around torch's exp: the shifted end
        points and row maxima (``fused.attention_shift``), then Lemma E's bounds, their row sums and Lemma P's P ball
        (``fused.attention_bounds``); the same check, row statistics and results. None where the kernels do not
        apply (nothing was written: the reference passes run)."""
        rows = self.call.rows
        shape = sc.shape[:-1] + (1,)
        if rows is None:
            m_lo, m_hi = torch.empty(shape, dtype=_F64, device=device), torch.empty(shape, dtype=_F64, device=device)
        else:
            m_lo, m_hi, tl, t_prime, d = (t.contiguous() for t in rows[0][self.row_index].unbind(0))
        stats = fused.attention_shift(sc, rad, m_lo, m_hi, given=rows is not None)  # x_lo over sc, x_hi over rad
        if stats is None:
            return None
        g1, g2, b2 = _exp_constants(accuracy.backend_for(device.type))[3:]
        if rows is None:
            wide = _wide(*stats)  # the reference's check, on the same values
            if wide is None:
                return False
            d = _shift_bound(m_lo, m_hi, wide, g1, g2, b2)
            tl, t_prime = torch.empty_like(m_lo), torch.empty_like(m_lo)
        v_lo, v_hi = torch.exp(sc), torch.exp(rad)
        # the same layouts as attention_shift's (fresh contiguous tensors of sc's shape, contiguous row vectors)
        if not fused.attention_bounds(sc, v_lo, rad, v_hi, tl, t_prime, d, rows is not None,
                                      _bounds_constants(accuracy.backend_for(device.type), self.s)):
            raise RuntimeError("fused.attention_bounds declined the layouts attention_shift took")
        del v_hi
        if rows is None:
            self._record_rows(m_lo, m_hi, tl, t_prime, d, wide)
        self.p_hi, self.pm, self.pr = rad, sc, v_lo
        self.lse_parts = (m_lo, m_hi, torch.cat([tl, t_prime], -1)) if need_lse else None
        return True

    def _record_rows(self, m_lo, m_hi, tl, t_prime, d, wide: bool) -> None:
        """The block's row statistics into the call's record (``_remember``), where the forward records them."""
        if self.call.recording:
            self.call.kept[0][self.row_index].copy_(torch.stack([m_lo, m_hi, tl, t_prime, d]))
            self.call.kept[1] = self.call.kept[1] or wide

    def _p_ball(self, e_lo, e_hi, tl, t_prime, d, k2, wide: bool, device):
        """(p_hi, pm, pr) of Lemma P from Lemma E's bounds e_lo, e_hi (overwritten) and the row vectors TL, T', d."""
        # upper bounds (Lemma P): K2 + K1 a / (a + d (TL - El_dn)+)
        den = torch.sub(tl, e_lo).clamp_min_(0)
        den = torch.addcmul(e_hi, den, d, out=den)
        q_hi = torch.div(e_hi, den, out=den)
        if self.allowed is not None and (self.empty is not None or wide):
            q_hi.nan_to_num_(nan=0.0)  # excluded: 0/0 in empty rows or where d underflows (allowed: a >= lam_A)
        p_hi = torch.add(k2, q_hi, alpha=_K1, out=q_hi).clamp_max_(1.0)
        # lower bounds: K3 El_dn / (El_dn + (T' - Eh_up)/d) - K4
        y = torch.sub(t_prime, e_hi, out=e_hi)
        q_lo = e_lo.div_(y.div_(d).add_(e_lo))
        del e_hi, y
        p_lo = torch.add(_scalar(-_K4, device), q_lo, alpha=_K3, out=q_lo).clamp_min_(0)
        # the P ball
        wc = torch.sub(p_hi, p_lo)
        pm = torch.add(p_lo, wc, alpha=0.5, out=p_lo)
        pr = wc.add_(pm, alpha=_PR_COEF)
        return p_hi, pm, _bound(pr, _PR_INFLATION)

    def _lse_into(self, lse: torch.Tensor, lse_rad: torch.Tensor) -> None:
        """logsumexp(scores) in [c - R, c + R] (row vectors), re-centred into ``lse_rad``. With v = log([TL, T'])
        (library values, |v - log| <= e = c_rel|v| + c_abs by the trust table) and sigma q . c_k in [qc +- qr] (Lemma
        G), the exact value lies in [a_lo - e_lo, a_hi + e_hi] + [qc +- qr], a = M + v. s = fl(M + v), A = fl(s_lo +
        s_hi), c = fl(qc + A/2), d = fl(s_hi - s_lo): |c - ((a_lo + a_hi)/2 + qc)| <= u|c| + eta/2 + u|A|/2 + u(|s_lo| +
        |s_hi|)/2 and (a_hi - a_lo)/2 <= (1 + u)|d|/2 + u(|s_lo| + |s_hi|)/2, so R >= (1 + u)|d|/2 + c_rel(1 + u) V +
        1.6u(1 + u) S + u|c| + qr + 2 c_abs + eta/2 with V, S the computed sums |v_lo| + |v_hi|, |s_lo| + |s_hi| (8
        operations). Empty rows: TL = 0, log 0 = -inf, so R = +inf (unknown), as the composed rule gives."""
        m_lo, m_hi, t = self.lse_parts
        qc, qr = self.lse_q
        self.lse_parts = self.lse_q = None
        c_rel, inflation = _log_constants(accuracy.backend_for(lse.device.type))
        v = torch.log(t)
        s = torch.cat([m_lo, m_hi], -1).add_(v)
        c = torch.add(qc, s.sum(-1, keepdim=True), alpha=0.5)
        r = torch.sub(s[..., 1:], s[..., :1]).abs_().mul_(_HALF_UP).add_(qr)
        r.add_(v.abs_().sum(-1, keepdim=True), alpha=c_rel).add_(torch.abs(c), alpha=_U_UP)
        r.add_(s.abs_().sum(-1, keepdim=True), alpha=_LSE_SLACK)
        r = _bound(r, inflation)
        _recentre_into(lse_rad, lse, c.reshape(lse.shape), r.reshape(lse.shape))

    def _restore(self, t: torch.Tensor) -> torch.Tensor:
        """(b, kv, g L, X) -> (b, H, L, X)."""
        return t.reshape(self.b, self.h, self.l, t.shape[-1])

    def _empty_rows(self) -> torch.Tensor | None:
        if self.empty is None:
            return None
        return self._restore(self.empty.expand(self.b, self.kv, self.rows, 1))

    def forward_into(self, out, lse, out_rad, lse_rad) -> None:
        """The (out, logsumexp) radii of the block (its slices of the kernel's outputs and of their radius tensors):
        out = c_v + P vc (Lemmas G, C; the slack u and the term u|c_v| pay for the final addition), logsumexp =
        [lse_lo, lse_hi] + sigma q . c_k."""
        pm, pr = self.pm, self.pr
        self.pm = self.pr = None
        vcm, rv, vabs, cv = self._v_parts()
        if out.dtype == _F64:  # float64 midpoints: the exact error of the final addition (TwoSum), not u|c_v + oc|
            oc, orad = _ball_mm(pm, pr, vcm, rv, abs_a=pm, abs_b=vabs, eps_u=True)
            total = oc + cv
            back = total - oc
            err = torch.sub(oc, total - back).add_(cv - back).abs_()  # oc + c_v = total + err exactly
            oc, orad = total, _bound(orad.add_(err), _inflation(1, Fraction(0)))
        else:
            oc, orad = _ball_mm(pm, pr, vcm, rv, abs_a=pm, abs_b=vabs, eps_u=True, slack=1,
                                terms=((torch.abs(cv), _U_UP),))
            oc.add_(cv)
        del pm, pr, vcm, rv, vabs
        _recentre_into(out_rad, out, self._restore(oc), self._restore(orad), self._empty_rows())
        del oc, orad
        self._lse_into(lse, lse_rad)

    def backward_into(self, grads, rads) -> None:
        """The (dq, dk, dv) radii of the block (its slices of the kernel's gradients and of their radius tensors; the
        backward paragraph above). P is dropped from the block once dS is formed."""
        pm, pr, p_hi = self.pm, self.pr, self.p_hi
        self.pm = self.pr = self.p_hi = None
        gm, rg, gabs = self._g_parts()
        vcm, rv, vabs, _ = self._v_parts()
        dv_c, dv_r = _ball_mm(pm.mT, pr.mT, gm, rg, abs_a=pm.mT, abs_b=gabs)  # pm >= 0
        _recentre_into(rads[2], grads[2], dv_c, dv_r)
        del dv_c, dv_r
        dp_c, dp_r = _ball_mm(gm, rg, vcm.mT, None if rv is None else rv.mT, abs_a=gabs, abs_b=vabs.mT, eps_u=True)
        del gm, rg, gabs, vcm, rv, vabs
        s = self.s  # rd's bound counts 5 operations a term and s - 1 additions (``_ds``)
        ds_abs = fused.attention_ds(p_hi, pm, pr, dp_c, dp_r, _gamma(s), _inflation(6 * s, s * _ETA64 / 2),
                                    _DS_INFLATION)
        if ds_abs is not None:  # ``_ds`` in one kernel (``fused.attention_ds``): dS over (dp_c, dp_r)
            ds_c, ds_r = dp_c, dp_r
        else:
            ds_c, ds_r, ds_abs = self._ds(p_hi, pm, pr, dp_c, dp_r)
        del pm, pr, p_hi, dp_c, dp_r
        kcm, rk, kabs, _ = self._k_parts()
        dq_c, dq_r = _ball_mm(ds_c, ds_r, kcm, rk, abs_a=ds_abs, abs_b=kabs, eps_u=True, scale=self.scale)
        del kcm, rk, kabs
        _recentre_into(rads[0], grads[0], self._restore(dq_c), self._restore(dq_r), self._empty_rows())
        del dq_c, dq_r
        qm, rq, qabs = self._q_parts()
        dk_c, dk_r = _ball_mm(ds_c.mT, ds_r.mT, qm, rq, abs_a=ds_abs.mT, abs_b=qabs, scale=self.scale)
        _recentre_into(rads[1], grads[1], dk_c, dk_r)

    def _ds(self, p_hi, pm, pr, dp_c, dp_r):
        """(dS_m, its radius, |dS_m|) by the backward paragraph's formulas (dp_c, dp_r overwritten)."""
        s = self.s
        # t = p_hi rdP + pr |dPm| + gamma_(S-1) |W|, W = fl(pm dPm) (written over the temporary |dPm|)
        t = torch.mul(p_hi, dp_r)
        w = torch.abs(dp_c)
        t.addcmul_(pr, w)
        w = torch.mul(dp_c, pm, out=w)
        dm = w.sum(-1, keepdim=True)
        t.add_(w.abs_(), alpha=_gamma(s))
        del w
        rd = _bound(t.sum(-1, keepdim=True), _inflation(6 * s, s * _ETA64 / 2))  # 5 ops a term, s - 1 additions
        del t
        xm = dp_c.sub_(dm)
        ds_c = torch.mul(pm, xm)
        ds_r = _bound(dp_r.add_(rd).mul_(p_hi).addcmul_(pr, xm.abs_()), _DS_INFLATION)
        return ds_c, ds_r, torch.abs(ds_c)


@functools.lru_cache(maxsize=None)
def _gamma(s: int) -> float:
    return rounding.gamma(max(s - 1, 1), _F64)


# Forward -> backward reuse. The backward op receives the very q, k, v objects of its forward (autograd's saved
# tensors), so the bounds of P computed by the forward serve the backward when nothing changed: the same objects (weak
# references), the same mid and rad tensors with the same version counters (every in-place change bumps them), the
# same mask object, causal flag and scale. Reusing them is recomputing them (the same passes on the same values);
# anything else recomputes. Kept only while some input requires grad; one entry per q, dropped when used or when q
# dies. What is kept: for calls of at most 2^12 scores (one block), P itself (its three float64 tensors, 24 bytes a
# score, held until the backward); for larger calls, where that memory would cost more than recomputing P costs time
# (the blocks paragraph above), only the row statistics M_lo, M_hi, TL, T', d of Lemma P and whether a block was
# "wide" (40 bytes a query row): the backward recomputes the scores and P but not their row maxima, sums and the
# overflow check.
_REUSE_LIMIT = 1 << 12
_REUSE: dict = {}


def _reuse_key(q, k, v, is_causal, attn_mask, scale):
    objs, versions = [], []
    for x in (q, k, v, attn_mask):
        if isinstance(x, BallTensor):
            objs += [x, x.mid, x.rad]
            versions += [x.mid._version, x.rad._version]
        else:
            objs.append(x)
            versions.append(x._version if isinstance(x, torch.Tensor) else None)
    return objs, (tuple(versions), bool(is_causal), scale)


def _to_keep(call: _FastCall, q, k, v) -> str | None:
    """What the forward keeps for ``_remember``: nothing unless an input requires grad; P for a small call of one
    block; else the row statistics."""
    if not any(getattr(x, "requires_grad", False) for x in (q, k, v)):
        return None
    if (call.b * call.h * call.l * call.s <= _REUSE_LIMIT
            and len(_blocks(call.b, call.kv, call.g, call.l, call.s, "forward")) == 1):
        return "P"
    return "rows"


def _remember(kept, q, k, v, is_causal, attn_mask, scale) -> None:
    """Keep ``kept`` (("P", (p_hi, pm, pr)) or ("rows", [statistics, wide])) of the forward for the backward of
    exactly these inputs (``_recall``)."""
    import weakref

    objs, meta = _reuse_key(q, k, v, is_causal, attn_mask, scale)
    key = id(q)
    refs = [weakref.ref(o) if isinstance(o, torch.Tensor) else o for o in objs]
    refs[0] = weakref.ref(q, lambda _ref, key=key: _REUSE.pop(key, None))
    _REUSE[key] = (refs, meta, kept)


def _recall(q, k, v, is_causal, attn_mask, scale):
    """What the forward kept for exactly these inputs (``_remember``), or None."""
    import weakref

    entry = _REUSE.pop(id(q), None)
    if entry is None:
        return None
    refs, meta, kept = entry
    objs, now = _reuse_key(q, k, v, is_causal, attn_mask, scale)
    if now != meta or len(objs) != len(refs):
        return None
    if any((r() if isinstance(r, weakref.ref) else r) is not o for r, o in zip(refs, objs)):
        return None
    return kept


# ----------------------------------------------------------------------------------------------------------------------
# Attention: the eval-mode fast paths (nn.MultiheadAttention, nn.TransformerEncoderLayer under no_grad)
#
# BallTensor disables __torch_function__, so ``has_torch_function`` is False and PyTorch's fast paths are taken in
# eval mode without grad: ``_native_multi_head_attention`` and ``_transformer_encoder_layer_fwd``. Their real meaning
# (checked against the composite path in the tests): batch-first inputs, in-projection by ``qkv_weight``/``qkv_bias``
# (q, k, v rows in that order), softmax(q k^T / sqrt(head_dim)) per head with the mask converted to bool (any non-zero
# entry, -inf or not, excludes; mask_type 1 is a (batch, source) key-padding mask, otherwise the mask broadcasts to
# (batch, heads, target, source)), out-projection. A fully excluded row gives NaN in these kernels (so radius +inf).


def _linear(x: BallTensor, w, b) -> BallTensor:
    """x @ w^T + b over the last dim by the ``addmm``/``mm`` rules (float64 balls)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    wt = w.transpose(0, 1)
    y = torch.mm(x2, wt) if b is None else torch.addmm(b, x2, wt)
    return y.reshape(*lead, y.shape[-1])


def _refuse_nested(func, *tensors):
    if any(isinstance(t, torch.Tensor) and t.is_nested for t in tensors):
        raise UnsupportedOpError(func, "nested-tensor inputs (nn.TransformerEncoder's padding-mask fast path) are not "
                                 "supported; build the encoder with enable_nested_tensor=False")


def _fast_path_excluded(mask, mask_type, shape, device) -> torch.Tensor:
    if mask is None:
        return torch.zeros((), dtype=torch.bool, device=device)
    excluded = _exact_indices(mask) != 0
    if mask_type == 1:
        excluded = excluded.reshape(shape[0], 1, 1, shape[-1])
    return excluded.expand(shape)


def _mha_enclosure(query, key, value, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias, mask, mask_type,
                   func):
    """(out, P) float64 balls of multi-head attention as the fast path means it (see the section comment)."""
    w, b = _ball64(qkv_weight), _ball64(qkv_bias)
    e = w.shape[1]
    if e % num_heads:
        raise UnsupportedOpError(func, f"embed_dim {e} is not a multiple of num_heads {num_heads}")
    d = e // num_heads

    def project(x, i):
        y = _linear(_ball64(x), w[i * e:(i + 1) * e], b[i * e:(i + 1) * e])
        return y.reshape(y.shape[0], y.shape[1], num_heads, d).transpose(1, 2)

    q, k, v = project(query, 0), project(key, 1), project(value, 2)
    s = _bmm(q, k.transpose(-2, -1)) * _scale_ball(d, None, func)
    probs = _Probs(s, _fast_path_excluded(mask, mask_type, s.shape, s.device))
    o = _bmm(probs.p, v).transpose(1, 2).reshape(q.shape[0], q.shape[2], e)
    return _linear(o, _ball64(proj_weight), _ball64(proj_bias)), probs.p


@rule(aten._native_multi_head_attention.default)
def native_multi_head_attention(func, query, key, value, embed_dim, num_head, qkv_weight, qkv_bias, proj_weight,
                                proj_bias, mask=None, need_weights=True, average_attn_weights=True, mask_type=None):
    """(out, weights) of the fast-path multi-head attention: ``_mha_enclosure`` (ball rules and ``_Probs`` in float64),
    re-centred on the kernel's outputs; weights are P (averaged over heads by the ``mean`` rule when asked)."""
    _refuse_nested(func, query, key, value)
    out, weights = func(*mids((query, key, value, embed_dim, num_head, qkv_weight, qkv_bias, proj_weight, proj_bias,
                               mask, need_weights, average_attn_weights, mask_type)))
    o, p = _mha_enclosure(query, key, value, num_head, qkv_weight, qkv_bias, proj_weight, proj_bias, mask, mask_type,
                          func)
    if weights is None:
        return _finish(out, o), None
    if average_attn_weights:
        p = torch.mean(p, dim=1)
    return _finish(out, o), _finish(weights, p)


@rule(aten._transformer_encoder_layer_fwd.default)
def transformer_encoder_layer_fwd(func, src, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias,
                                  use_gelu, norm_first, eps, norm_weight_1, norm_bias_1, norm_weight_2, norm_bias_2,
                                  ffn_weight_1, ffn_bias_1, ffn_weight_2, ffn_bias_2, mask=None, mask_type=None):
    """One fast-path encoder layer, composed of the enclosures above (``_mha_enclosure``, ``_linear``,
    ``normalization.layer_norm_enclosure``, the relu / exact-gelu rules) in float64 and re-centred on the kernel's
    output:
        norm_first: x = src + MHA(LN1(src)); out = x + FFN(LN2(x))
        otherwise:  x = LN1(src + MHA(src)); out = LN2(x + FFN(x)),   FFN(x) = W2 act(W1 x + b1) + b2."""
    args = (src, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias, use_gelu, norm_first, eps,
            norm_weight_1, norm_bias_1, norm_weight_2, norm_bias_2, ffn_weight_1, ffn_bias_1, ffn_weight_2, ffn_bias_2,
            mask, mask_type)
    _refuse_nested(func, src)
    out = func(*mids(args))
    if src.numel() == 0:
        return result(out, torch.zeros((), dtype=rounding.rad_dtype(out.dtype), device=out.device))
    x = _ball64(src)

    def mha(h):
        return _mha_enclosure(h, h, h, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias, mask, mask_type,
                              func)[0]

    def norm(h, w, b):
        return layer_norm_enclosure(h, 1, w, b, eps)

    def ffn(h):
        h = _linear(h, _ball64(ffn_weight_1), _ball64(ffn_bias_1))
        h = torch.nn.functional.gelu(h) if use_gelu else torch.relu(h)
        return _linear(h, _ball64(ffn_weight_2), _ball64(ffn_bias_2))

    if norm_first:
        x = x + mha(norm(x, norm_weight_1, norm_bias_1))
        y = x + ffn(norm(x, norm_weight_2, norm_bias_2))
    else:
        x = norm(x + mha(x), norm_weight_1, norm_bias_1)
        y = norm(x + ffn(x), norm_weight_2, norm_bias_2)
    return _finish(out, y)


# ----------------------------------------------------------------------------------------------------------------------
# Safe softmax (SDPA's math path)


@rule(aten._safe_softmax.default)
def safe_softmax(func, x, dim, dtype=None):
    """softmax along ``dim``, except that rows whose entries are all -inf give 0 (PyTorch's ``_safe_softmax``).

    Rows with a finite entry: the ``_softmax`` rule's enclosure (on the input converted to ``dtype`` by the
    ``_to_copy`` rule), re-centred on this kernel's midpoint (bit-identical to ``_softmax`` on those rows). A -inf
    midpoint in a ball has radius +inf ("any real", DESIGN.md §1), so a masked entry reaching this op through the ball
    ``add`` is not known to be -inf: its row's real softmax is only known to lie in [0, 1]. Every exact softmax value
    lies in [0, 1], so the radius is also capped by max(mid, 1 - mid) (rounded up): fully masked rows (mid 0) get
    radius 1, not +inf. (The fused attention rule treats a plain -inf mask exactly; this path cannot.)
    """
    m = func(_mid(x), dim, dtype)
    if aten._softmax.default not in RULES:
        raise UnsupportedOpError(func, "it is bounded through the _softmax rule (ops/nn.py), which is not registered")
    xin = x if dtype is None or dtype == x.dtype else aten._to_copy.default(x, dtype=dtype)
    enclosure = aten._softmax.default(xin, dim, False)
    out = recentre(m, BallTensor(enclosure.mid, enclosure.rad))
    m64 = m.to(_F64)
    one_minus = 1.0 - m64
    exact = (1.0 - one_minus) == m64  # 1 - m is exact (Sterbenz for m >= 1/2; for m < 1/2, 1 - fl(1 - m) is exact)
    cap = torch.maximum(m64, torch.where(exact, one_minus, rounding.up(one_minus)))
    in_range = (m64 >= 0) & (m64 <= 1)
    rad = torch.where(in_range, torch.minimum(out.rad.to(_F64), cap), out.rad.to(_F64))
    return result(m, rad)


# ----------------------------------------------------------------------------------------------------------------------
# Dropout


@functools.lru_cache(maxsize=None)
def _dropout_scale(p: float) -> tuple[float, float]:
    """(mid, rad) in float64 with |1/(1 - p) - mid| <= rad for the double p < 1, in exact rationals."""
    exact = 1 / (1 - Fraction(p))
    mid = float(exact)
    return mid, rounding.round_up_float(abs(exact - Fraction(mid)))


@rule(aten.native_dropout.default)
def native_dropout(func, x, p, train):
    """(x * mask / (1 - p), mask): the mask is PyTorch's random draw (taken from the midpoint call, so the random
    stream is consumed exactly as in plain PyTorch) and exact; the real scale 1/(1 - p) of the double p is enclosed
    (``_dropout_scale``); kept entries by the ball ``mul`` rule in float64, dropped ones exact zeros; re-centred.
    train False (or p = 0): the kernel returns x itself (mask all true), exact."""
    out, mask = func(_mid(x), p, train)
    if train is False or p == 0:  # out = x * 1 * 1.0: bit-exact copies
        return BallTensor(out, x.rad.clone()), mask
    if p >= 1:  # every entry dropped: exact zeros
        return result(out, torch.zeros((), dtype=rounding.rad_dtype(out.dtype), device=out.device)), mask
    s_mid, s_rad = _dropout_scale(float(p))
    kept = _ball64(x) * _constant(s_mid, s_rad)
    return _finish(out, _where(mask.bool(), kept)), mask


@rule(aten.native_dropout_backward.default)
def native_dropout_backward(func, grad_output, mask, scale):
    """grad * mask * scale with ``scale`` an exact double (autograd passes 1/(1 - p) as computed): the ball ``mul``
    rule in float64 where the mask keeps, exact zeros elsewhere; re-centred on the kernel's midpoint."""
    m = func(_mid(grad_output), _exact_indices(mask), scale)
    kept = _ball64(grad_output) * float(scale)
    keep = _exact_indices(mask).bool().expand(m.shape)
    return _finish(m, _where(keep, kept))


@rule(aten.bernoulli_.float)
def bernoulli_(func, x, p=0.5, *, generator=None):
    """In-place Bernoulli draw (dropout's mask in the composite path): PyTorch's own draw into the midpoint (same
    random stream as plain PyTorch); the values 0 and 1 are exact, so the radius becomes 0."""
    func(x.mid, p, generator=generator)
    x.rad.zero_()
    return x


@rule(aten.bernoulli.p)
def bernoulli_p(func, x, p=0.5, *, generator=None):
    """A fresh Bernoulli draw with the shape of x (x's values are not read): exact 0/1 values, radius 0."""
    m = func(_mid(x), p, generator=generator)
    return BallTensor(m, torch.zeros_like(m, dtype=rounding.rad_dtype(m.dtype)))
