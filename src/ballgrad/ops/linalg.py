"""Linear algebra rules: mm, addmm, bmm, baddbmm, mv, dot (DESIGN.md §2 F3/F4)."""

from __future__ import annotations

import torch

aten = torch.ops.aten
