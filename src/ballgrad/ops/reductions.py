"""Reduction rules: sum, mean, prod, amax/amin/max/min, logsumexp, var/std, norm (DESIGN.md §2 "Sums")."""

from __future__ import annotations

import torch

aten = torch.ops.aten
