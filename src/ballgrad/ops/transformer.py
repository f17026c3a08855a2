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

from ballgrad import accuracy, rounding
from ballgrad.errors import UnsupportedOpError
from ballgrad.ops.common import mid_of as _mid
from ballgrad.ops.common import mids, recentre, result
from ballgrad.ops.linalg import _mid_error
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


def _hull_of(a: BallTensor, b: BallTensor) -> BallTensor:
    """A ball containing both balls (same shape)."""
    return _hull(torch.minimum(a.lower(), b.lower()), torch.maximum(a.upper(), b.upper()))


def _constant(mid: float, rad: float) -> BallTensor:
    """A 0-d float64 ball for a real constant (CPU scalars mix with tensors of any device)."""
    return BallTensor(torch.tensor(mid, dtype=_F64), torch.tensor(rad, dtype=_F64))


def _reshaped(x: BallTensor, shape) -> BallTensor:
    return BallTensor(x.mid.reshape(shape), x.rad.reshape(shape))


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


class _SdpaCase:
    """The float64 balls of one ``_scaled_dot_product_flash_attention_for_cpu`` call: q, k and v (kv heads repeated),
    the scale, the scores s = (q k^T) * scale + mask (ball rules: bmm, mul, add of the mask's finite part) and the
    probabilities (``_Probs``). Causal: column > row is excluded (top-left aligned, as the kernel does); a plain mask's
    -inf entries are excluded exactly; a ball mask is added as a ball (its -inf midpoints are unknown values)."""

    def __init__(self, func, q, k, v, dropout_p, is_causal, attn_mask, scale):
        if dropout_p:
            raise UnsupportedOpError(func, "dropout_p > 0 (PyTorch's CPU kernel refuses it too)")
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise UnsupportedOpError(func, "inputs must be 4-D (batch, heads, length, head_dim)")
        if not (q.shape[0] == k.shape[0] == v.shape[0]):
            raise UnsupportedOpError(
                func, f"batch sizes {q.shape[0]}, {k.shape[0]}, {v.shape[0]} differ: the CPU kernel does not "
                "broadcast them (its values match no broadcasting rule), so there is no real result to bound")
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
    """
    out, lse = func(_mid(q), _mid(k), _mid(v), dropout_p, is_causal, attn_mask=_mid(attn_mask), scale=scale)
    case = _SdpaCase(func, q, k, v, dropout_p, is_causal, attn_mask, scale)
    o = _bmm(case.probs.p, case.v_centred) + _point(case.v_centre)
    return case.probs.exact_empty_rows(_finish(out, o)), _finish(lse, case.lse)


@rule(aten._scaled_dot_product_flash_attention_for_cpu_backward.default)
def sdpa_flash_cpu_backward(func, grad_out, q, k, v, out, logsumexp, dropout_p, is_causal, *, attn_mask=None,
                            scale=None):
    """(dq, dk, dv) of attention at (q, k, v), from its formula with P recomputed by ``_Probs`` (the saved out and
    logsumexp are functions of q, k, v; only the kernel's midpoint uses them):
        dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dP * P)),  dQ = dS K scale,  dK = dS^T Q scale,
    excluded entries having P = 0 exactly; grouped-query heads summed back. Ball rules in float64, re-centred."""
    grads = func(*mids((grad_out, q, k, v, out, logsumexp, dropout_p, is_causal)), attn_mask=_mid(attn_mask),
                 scale=scale)
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
