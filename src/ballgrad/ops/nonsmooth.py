"""Non-smooth rules: comparisons (bool balls), where, clamp, maximum/minimum, masked_fill, logical ops (DESIGN.md §3-4)."""

from __future__ import annotations

import torch

aten = torch.ops.aten
