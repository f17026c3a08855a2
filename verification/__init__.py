"""Independent high-precision oracles that check ballgrad's balls (DESIGN.md §7)."""
