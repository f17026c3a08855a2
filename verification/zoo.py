"""The model zoo of BENCHMARKS.md: five small models with seeded synthetic data.

``make(name, dtype=torch.float32, seed=0)`` builds a ``ZooCase``: the model (seeded initialisation, training mode),
seeded inputs, seeded random labels and the loss (cross-entropy). No downloads. ``ballgrad verify``, the
benchmarks and the notebooks share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = ["ZooCase", "make", "NAMES", "ZOO"]


@dataclass
class ZooCase:
    name: str
    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    loss_fn: Callable
    description: str

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


class TinyTransformer(nn.Module):
    """TransformerEncoderLayer (d_model 64, 4 heads, feed-forward 128, dropout 0, batch_first), mean over tokens,
    Linear 64 -> 10."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, dropout=0.0, batch_first=True)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.encoder(x).mean(dim=1))


def _mlp_small():
    return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))


def _mlp_deep():
    layers = [nn.Linear(784, 128)]
    for _ in range(8):
        layers += [nn.ReLU(), nn.Linear(128, 128)]
    layers += [nn.ReLU(), nn.Linear(128, 10)]
    return nn.Sequential(*layers)


def _mlp_wide():
    return nn.Sequential(nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))


def _cnn_small():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 5 * 5, 10),
    )


# name -> (builder, input shape without batch, batch, description)
ZOO = {
    "mlp-small": (_mlp_small, (784,), 64, "Linear 784-128, ReLU, Linear 128-10"),
    "mlp-deep": (_mlp_deep, (784,), 64, "Linear 784-128, 8 x (ReLU, Linear 128-128), ReLU, Linear 128-10"),
    "mlp-wide": (_mlp_wide, (1024,), 512, "Linear 1024-2048, ReLU, Linear 2048-2048, ReLU, Linear 2048-10"),
    "cnn-small": (_cnn_small, (1, 28, 28), 32, "2 x (Conv2d k3, BatchNorm2d, ReLU, MaxPool2d 2), Linear 400-10"),
    "transformer-tiny": (TinyTransformer, (32, 64), 8, "TransformerEncoderLayer d64 h4 ff128, mean, Linear 64-10"),
}
NAMES = list(ZOO)


def make(name: str, dtype: torch.dtype = torch.float32, seed: int = 0, batch: int | None = None) -> ZooCase:
    """The zoo model ``name`` in ``dtype`` and training mode, with seeded inputs (standard normal) and labels
    (uniform over 10 classes). ``batch`` overrides the BENCHMARKS.md batch size (for quick tests)."""
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; choose from {', '.join(NAMES)}")
    builder, shape, default_batch, description = ZOO[name]
    n = default_batch if batch is None else batch
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = builder()
    model = model.to(dtype).train()
    inputs = torch.randn((n, *shape), generator=gen, dtype=torch.float64).to(dtype)
    targets = torch.randint(0, 10, (n,), generator=gen)
    return ZooCase(name, model, inputs, targets, nn.functional.cross_entropy, description)
