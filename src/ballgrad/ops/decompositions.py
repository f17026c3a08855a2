"""Audited decompositions (DESIGN.md §4): ops without a rule of their own that are evaluated through a real-arithmetic
identity, re-centred on the original op's midpoint. Each entry states its identity. Never the raw decomposition
table: an op not listed here raises ``UnsupportedOpError``.

How an entry is evaluated (``_evaluate``): the midpoint is the original op on the midpoints (bit-identical to plain
PyTorch). The enclosure is the identity's right-hand side evaluated with ball rules on the arguments widened exactly to
float64 (every ball rule encloses the exact real result of its op for every point of its input balls, so the composed
expression encloses the exact value of the identity's right-hand side, which *is* the op's exact value). The result is
``common.recentre(mid, enclosure)``: |exact - mid| <= r + |c - mid|.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.utils._pytree as pytree

from ballgrad.ops.common import recentre
from ballgrad.tensor import BallTensor

aten = torch.ops.aten
_F64 = torch.float64


@dataclass(frozen=True)
class Decomposition:
    identity: str  # the real-number identity, stated
    enclosure: Callable  # (*widened args, **kwargs) -> ball(s) enclosing the exact value


AUDITED: dict = {}


def audited(identity: str, *ops):
    """Register ``enclosure`` as the audited decomposition of ``ops`` with the stated ``identity``."""

    def register(fn):
        for op in ops:
            AUDITED[op] = Decomposition(identity, fn)
        return fn

    return register


def rule_for(func):
    """The audited decomposition rule for ``func``, or None."""
    if func not in AUDITED:
        return None
    return _evaluate


def _mid(x):
    if isinstance(x, BallTensor):
        if not x.is_floating_point():
            from ballgrad.ops.shape import _exact_index

            return _exact_index(x)
        return x.mid
    return x


def _widen(x):
    """Floating balls and plain floating tensors as float64 balls (exact widening); others unchanged."""
    if isinstance(x, BallTensor):
        if not x.is_floating_point():
            return _mid(x)
        return BallTensor(x.mid.detach().to(_F64), x.rad.to(_F64))
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        m = x.detach().to(_F64)
        return BallTensor(m, torch.zeros_like(m))
    return x


def _evaluate(func, *args, **kwargs):
    entry = AUDITED[func]
    is_tensor = lambda t: isinstance(t, torch.Tensor)  # noqa: E731
    mid = func(*pytree.tree_map_only(torch.Tensor, _mid, args), **pytree.tree_map_only(torch.Tensor, _mid, kwargs))
    enclosure = entry.enclosure(*pytree.tree_map_only(torch.Tensor, _widen, args),
                                **pytree.tree_map_only(torch.Tensor, _widen, kwargs))
    mids, spec = pytree.tree_flatten(mid)
    encs, _ = pytree.tree_flatten(enclosure)
    out = []
    for m, e in zip(mids, encs):
        if is_tensor(m) and m.is_floating_point():
            out.append(recentre(m, e))
        else:
            out.append(m)
    return pytree.tree_unflatten(out, spec)


# ----------------------------------------------------------------------------------------------------------------------
# Entries


@audited("vdot(a, b) = sum_i a_i b_i = dot(a, b) for real a, b", aten.vdot.default)
def _vdot(a, b):
    return torch.dot(a, b)


@audited("addr(M, u, v, beta, alpha) = beta M + alpha u v^T (beta = 0 ignores M)", aten.addr.default)
def _addr(m, u, v, *, beta=1, alpha=1):
    outer = u.unsqueeze(-1) * v.unsqueeze(0)
    scaled = outer if alpha == 1 else outer * alpha
    if beta == 0:
        return scaled + torch.zeros_like(m) if m.shape != scaled.shape else scaled
    return (m if beta == 1 else m * beta) + scaled


@audited("addbmm(M, A, B, beta, alpha) = beta M + alpha sum_b A_b B_b (beta = 0 ignores M)", aten.addbmm.default)
def _addbmm(m, a, b, *, beta=1, alpha=1):
    prod = torch.bmm(a, b).sum(0) if a.shape[0] else torch.zeros(a.shape[1], b.shape[2], dtype=_F64)
    scaled = prod if alpha == 1 else prod * alpha
    if beta == 0:
        return scaled
    return (m if beta == 1 else m * beta) + scaled


@audited("cross(a, b) = roll(a, -1) roll(b, -2) - roll(a, -2) roll(b, -1) along the size-3 dim "
         "(the components a_y b_z - a_z b_y, a_z b_x - a_x b_z, a_x b_y - a_y b_x)", aten.linalg_cross.default)
def _cross(a, b, dim=-1):
    shape = torch.broadcast_shapes(a.shape, b.shape)
    a, b = a.expand(shape), b.expand(shape)
    return torch.roll(a, -1, dim) * torch.roll(b, -2, dim) - torch.roll(a, -2, dim) * torch.roll(b, -1, dim)


@audited("trace(X) = sum_i X_ii", aten.trace.default)
def _trace(x):
    return torch.diagonal(x).sum()


def _norm(x, p, dim=None, keepdim=False):
    """||x||_p over ``dim`` for p in {1, 2, inf, -inf} (the vector_norm rule) and other real p != 0:
    (sum |x_i|^p)^(1/p) composed from abs, pow (lemma M/P), sum and pow; p = 0: the number of non-zero elements,
    exact where every element is decided."""
    p = float(p)
    if p in (1.0, 2.0, float("inf"), float("-inf")):
        return torch.linalg.vector_norm(x, p, dim, keepdim)
    if p == 0.0:
        nonzero = torch.ne(x, 0)
        from ballgrad.errors import UndecidedComparisonError

        if bool(nonzero.rad.any()):
            raise UndecidedComparisonError("the 0-'norm' counts non-zero elements; a ball contains 0 and non-zero values")
        count = nonzero.mid.to(_F64).sum(dim=dim, keepdim=keepdim) if dim is not None else nonzero.mid.to(_F64).sum()
        return BallTensor(count, torch.zeros_like(count))
    s = torch.abs(x) ** p
    s = s.sum(dim=dim, keepdim=keepdim) if dim is not None else s.sum()
    return s ** (1.0 / p)


@audited("vector_norm(x, p) = (sum |x_i|^p)^(1/p) (p != 0, +-inf); p = 0 counts non-zeros", aten.linalg_vector_norm.default)
def _vector_norm(x, ord=2, dim=None, keepdim=False, *, dtype=None):
    return _norm(x, ord, dim, keepdim)


@audited("norm(x, p, dim) = vector_norm(x, p, dim)", aten.norm.ScalarOpt_dim, aten.norm.Scalar, aten.norm.ScalarOpt_dtype,
         aten.norm.ScalarOpt_dim_dtype)
def _legacy_norm(x, p=2, dim=None, keepdim=False, *, dtype=None):
    if p is None:
        p = 2
    if isinstance(dim, (list, tuple)) and len(dim) == 0:
        dim = None
    return _norm(x, p, dim, keepdim)


@audited("dist(a, b, p) = ||a - b||_p", aten.dist.default)
def _dist(a, b, p=2):
    return _norm(a - b, p)


@audited("cdist(X, Y, p)_ij = ||X_i - Y_j||_p", aten._cdist_forward.default)
def _cdist(x1, x2, p, compute_mode=None):
    diff = x1.unsqueeze(-2) - x2.unsqueeze(-3)
    return _norm(diff, p, dim=-1)


@audited("pdist(X, p) = (||X_i - X_j||_p for i < j, row-major)", aten._pdist_forward.default)
def _pdist(x, p=2):
    n = x.shape[0]
    i, j = torch.triu_indices(n, n, 1)
    return _norm(x[i] - x[j], p, dim=-1)


@audited("renorm(x, p, dim, maxnorm): each slice s along dim is s * maxnorm / (||s||_p + 1e-7) where ||s||_p > maxnorm, "
         "else s (an undecided comparison gives the hull of both branches)", aten.renorm.default)
def _renorm(x, p, dim, maxnorm):
    dims = [d for d in range(x.dim()) if d != dim % x.dim()]
    n = _norm(x, p, dims, True)
    scale = maxnorm / (n + 1e-7)
    return torch.where(n > maxnorm, x * scale, x)


@audited("linspace(s, e, n)_i = s + (e - s) i / (n - 1) for n >= 2 (n = 1: s)", aten.linspace.Tensor_Tensor,
         aten.linspace.Tensor_Scalar, aten.linspace.Scalar_Tensor)
def _linspace(start, end, steps, **kwargs):
    start = start if isinstance(start, torch.Tensor) else BallTensor(torch.tensor(float(start), dtype=_F64),
                                                                      torch.zeros((), dtype=_F64))
    end = end if isinstance(end, torch.Tensor) else BallTensor(torch.tensor(float(end), dtype=_F64),
                                                              torch.zeros((), dtype=_F64))
    n = int(steps)
    if n == 1:
        return start.reshape(1)
    i = torch.arange(n, dtype=_F64)
    return start + (end - start) * i / float(n - 1)


# ----------------------------------------------------------------------------------------------------------------------
# Triangular solves by ball substitution
#
# For a triangular A with non-zero diagonal, the exact solution of A X = B satisfies, row by row in substitution
# order, X_i = (B_i - sum_(j before i) A_ij X_j) / A_ii. Evaluating the right-hand side with ball rules, with balls
# that already contain the exact X_j, gives a ball containing the exact X_i for every A and B in their balls
# (inclusion monotonicity); a diagonal ball containing 0 gives +inf (the division rule's domain event).


def _substitute(a, b, upper: bool, unit: bool):
    """Enclosure of X with A X = B for triangular float64 balls A [..., n, n] and B [..., n, k]."""
    n = a.shape[-1]
    if n == 0:  # nothing to solve: X is B's (empty) shape, broadcast with A's batch dimensions
        shape = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + tuple(b.shape[-2:])
        return BallTensor(torch.zeros(shape, dtype=_F64), torch.zeros(shape, dtype=_F64))
    order = range(n - 1, -1, -1) if upper else range(n)
    rows = [None] * n
    for i in order:
        done = [j for j in (range(i + 1, n) if upper else range(i))]
        acc = b.select(-2, i)
        if done:
            coeffs = torch.stack([a.select(-2, i).select(-1, j) for j in done], -1)  # [..., len(done)]
            xs = torch.stack([rows[j] for j in done], -2)  # [..., len(done), k]
            acc = acc - (coeffs.unsqueeze(-1) * xs).sum(-2)
        rows[i] = acc if unit else acc / a.select(-2, i).select(-1, i).unsqueeze(-1)
    return torch.stack(rows, -2)


def _mT(x):
    return x.transpose(-2, -1)


@audited("A X = B (left) or X A = B (right) for triangular A: substitution X_i = (B_i - sum_j A_ij X_j)/A_ii",
         aten.linalg_solve_triangular.default)
def _solve_triangular(a, b, *, upper, left=True, unitriangular=False):
    if left:
        return _substitute(a, b, upper, unitriangular)
    return _mT(_substitute(_mT(a), _mT(b), not upper, unitriangular))


@audited("triangular_solve(B, A) solves A X = B (A^T X = B with transpose); the second output is A itself",
         aten.triangular_solve.default)
def _triangular_solve(b, a, upper=True, transpose=False, unitriangular=False):
    if transpose:
        x = _substitute(_mT(a), b, not upper, unitriangular)
    else:
        x = _substitute(a, b, upper, unitriangular)
    return x, a


@audited("cholesky_solve(B, L) solves L L^T X = B (U^T U X = B for upper): two substitutions", aten.cholesky_solve.default)
def _cholesky_solve(b, factor, upper=False):
    lower = _mT(factor) if upper else factor
    y = _substitute(lower, b, False, False)
    return _substitute(_mT(lower), y, True, False)


@audited("cholesky_inverse(L) = (L L^T)^-1 (or (U^T U)^-1): cholesky_solve with B = I", aten.cholesky_inverse.default)
def _cholesky_inverse(factor, upper=False):
    n = factor.shape[-1]
    eye = torch.eye(n, dtype=_F64).expand(factor.shape)
    return _cholesky_solve(BallTensor(eye.contiguous(), torch.zeros(factor.shape, dtype=_F64)), factor, upper)


def _pivot_permutation(pivots: torch.Tensor, n: int) -> torch.Tensor:
    """Row order perm (per batch) with (P^T B)_i = B_perm[i], from LAPACK's 1-based sequential row swaps."""
    batch = pivots.shape[:-1]
    perm = torch.arange(n).expand(*batch, n).clone()
    for i in range(pivots.shape[-1]):
        j = (pivots[..., i] - 1).long()
        pi = perm[..., i].clone()
        pj = torch.gather(perm, -1, j.unsqueeze(-1)).squeeze(-1)
        perm[..., i] = pj
        perm.scatter_(-1, j.unsqueeze(-1), pi.unsqueeze(-1))
    return perm


@audited("lu_solve(LU, pivots, B) solves A X = B with A = P L U: P^T B (exact row swaps), L Y = P^T B (unit lower) "
         "and U X = Y by substitution; A^T X = B (adjoint): U^T Z = B, L^T W = Z, X = P W; right-hand forms through "
         "transposes (X A = B iff A^T X^T = B^T)", aten.linalg_lu_solve.default)
def _lu_solve(lu, pivots, b, *, left=True, adjoint=False):
    if not left:
        return _mT(_lu_solve(lu, pivots, _mT(b), left=True, adjoint=not adjoint))
    n = lu.shape[-1]
    batch = torch.broadcast_shapes(lu.shape[:-2], b.shape[:-2])
    lu = lu.expand(*batch, n, n)
    b = b.expand(*batch, *b.shape[-2:])
    perm = _pivot_permutation(pivots.expand(*batch, pivots.shape[-1]), n)
    index = lambda p: p.unsqueeze(-1).expand(*batch, n, b.shape[-1])  # noqa: E731
    if not adjoint:
        pb = torch.gather(b, -2, index(perm))
        y = _substitute(lu, pb, False, True)
        return _substitute(lu, y, True, False)
    z = _substitute(_mT(lu), b, False, False)
    w = _substitute(_mT(lu), z, True, True)
    inverse = torch.argsort(perm, dim=-1)
    return torch.gather(w, -2, index(inverse))
