"""Optimizers on ballified models: after SGD/Adam/AdamW steps, every parameter ball contains the parameter that the
same algorithm reaches in exact arithmetic from the same start (an independent mpmath trainer written here), and the
midpoints are bit-identical to a plain PyTorch run."""

import copy

import mpmath
import pytest
import torch
from torch import nn

import ballgrad as bg
from helpers import assert_same_bits

mp = mpmath.mp.clone()
mp.prec = 256


def small_mlp(dtype):
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).to(dtype)


def data(dtype):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 3, (4,), generator=g)
    return x, y


# ---------------------------------------------------------------------------------------------------------------------
# The independent exact trainer: lists of mpf, no torch arithmetic.


def _to_mp(t):
    return [[mp.mpf(float(v)) for v in row] for row in t.tolist()] if t.dim() == 2 else [mp.mpf(float(v)) for v in t.tolist()]


def exact_grads(params, x, y):
    """Gradients of mean cross-entropy of Linear-ReLU-Linear at exact parameters (dict of mp lists)."""
    W1, b1, W2, b2 = params["0.weight"], params["0.bias"], params["2.weight"], params["2.bias"]
    n = len(x)
    gW1 = [[mp.mpf(0)] * len(W1[0]) for _ in W1]
    gb1 = [mp.mpf(0)] * len(b1)
    gW2 = [[mp.mpf(0)] * len(W2[0]) for _ in W2]
    gb2 = [mp.mpf(0)] * len(b2)
    for xi, yi in zip(x, y):
        h_pre = [mp.fsum(w * v for w, v in zip(row, xi)) + b for row, b in zip(W1, b1)]
        h = [v if v > 0 else mp.mpf(0) for v in h_pre]
        z = [mp.fsum(w * v for w, v in zip(row, h)) + b for row, b in zip(W2, b2)]
        zmax = max(z)
        e = [mp.exp(v - zmax) for v in z]
        s = mp.fsum(e)
        p = [v / s for v in e]
        dz = [(p[j] - (1 if j == yi else 0)) / n for j in range(len(z))]
        for j, d in enumerate(dz):
            gb2[j] += d
            for k, hk in enumerate(h):
                gW2[j][k] += d * hk
        dh = [mp.fsum(dz[j] * W2[j][k] for j in range(len(dz))) for k in range(len(h))]
        dpre = [d if hp > 0 else mp.mpf(0) for d, hp in zip(dh, h_pre)]
        for k, d in enumerate(dpre):
            gb1[k] += d
            for i, xv in enumerate(xi):
                gW1[k][i] += d * xv
    return {"0.weight": gW1, "0.bias": gb1, "2.weight": gW2, "2.bias": gb2}


def _map(f, a, *rest):
    if isinstance(a, list):
        return [_map(f, ai, *[r[i] for r in rest]) for i, ai in enumerate(a)]
    return f(a, *rest)


def exact_sgd(params, x, y, steps, lr, momentum, weight_decay):
    buf = None
    for _ in range(steps):
        g = exact_grads(params, x, y)
        g = {k: _map(lambda gi, pi: gi + weight_decay * pi, g[k], params[k]) for k in g}
        buf = g if buf is None else {k: _map(lambda bi, gi: momentum * bi + gi, buf[k], g[k]) for k in g}
        params = {k: _map(lambda pi, bi: pi - lr * bi, params[k], buf[k]) for k in params}
    return params


def exact_adam(params, x, y, steps, lr, beta1, beta2, eps, weight_decay=0.0, decoupled=False):
    m = {k: _map(lambda p: mp.mpf(0), v) for k, v in params.items()}
    v = copy.deepcopy(m)
    b1, b2 = mp.mpf(beta1), mp.mpf(beta2)
    for t in range(1, steps + 1):
        g = exact_grads(params, x, y)
        if decoupled:
            params = {k: _map(lambda p: p * (1 - lr * weight_decay), params[k]) for k in params}
        elif weight_decay:
            g = {k: _map(lambda gi, pi: gi + weight_decay * pi, g[k], params[k]) for k in g}
        m = {k: _map(lambda mi, gi: mi + (1 - b1) * (gi - mi), m[k], g[k]) for k in g}  # lerp, as PyTorch writes it
        v = {k: _map(lambda vi, gi: b2 * vi + (1 - b2) * gi * gi, v[k], g[k]) for k in g}
        c1, c2 = 1 - b1**t, 1 - b2**t
        params = {
            k: _map(lambda pi, mi, vi: pi - (lr / c1) * mi / (mp.sqrt(vi) / mp.sqrt(c2) + eps), params[k], m[k], v[k])
            for k in params
        }
    return params


# ---------------------------------------------------------------------------------------------------------------------

OPTIMIZERS = {
    "sgd": (lambda ps, fe: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01, foreach=fe),
            lambda p, x, y: exact_sgd(p, x, y, 3, mp.mpf(0.1), mp.mpf(0.9), mp.mpf(0.01))),
    "adam": (lambda ps, fe: torch.optim.Adam(ps, lr=0.01, foreach=fe),
             lambda p, x, y: exact_adam(p, x, y, 3, mp.mpf(0.01), 0.9, 0.999, mp.mpf(1e-8))),
    "adamw": (lambda ps, fe: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, foreach=fe),
              lambda p, x, y: exact_adam(p, x, y, 3, mp.mpf(0.01), 0.9, 0.999, mp.mpf(1e-8), mp.mpf(0.1), True)),
}


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_three_steps_contain_exact_training(name, dtype, foreach):
    make_opt, exact_train = OPTIMIZERS[name]
    x, y = data(dtype)
    plain = small_mlp(dtype)
    model = bg.ballify(copy.deepcopy(plain))
    start = {k: _to_mp(v.detach()) for k, v in plain.named_parameters()}
    opt_plain, opt_ball = make_opt(plain.parameters(), foreach), make_opt(model.parameters(), foreach)
    for _ in range(3):
        for m, opt in ((plain, opt_plain), (model, opt_ball)):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    exact = exact_train(start, _to_mp(x), y.tolist())
    for k, p in model.named_parameters():
        assert isinstance(p, bg.BallTensor)
        assert_same_bits(p.mid, dict(plain.named_parameters())[k].detach())
        bg.testing.assert_contains(p.detach(), exact[k], what=f"{k} after 3 {name} steps")
