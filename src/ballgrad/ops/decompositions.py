"""Audited decompositions (DESIGN.md §4): ops without a rule of their own that are evaluated through a real-arithmetic
identity, re-centred on the original op's midpoint. Each entry states its identity. Never the raw decomposition
table: an op not listed here raises ``UnsupportedOpError``.
"""

from __future__ import annotations

AUDITED: dict = {}


def rule_for(func):
    """The audited decomposition rule for ``func``, or None."""
    return AUDITED.get(func)
