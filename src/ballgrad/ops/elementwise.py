"""Library-function rules (exp, log, tanh, erf, sin, ...): DESIGN.md §2 "trust boundary" and §4."""

from __future__ import annotations

import torch

aten = torch.ops.aten
