

def test_exact_product_error_not_taken_when_radius_products_underflow():
    """Regression: eta * (0 ± eta) has exact values ±2^-2148; the propagation term eta*eta underflows to 0 in float64,
    which must not be mistaken for 'both operands are points' (the ball 0 ± 0 excluded the exact value)."""
    import torch
    from fractions import Fraction

    import ballgrad as bg

    eta = 2.0**-1074
    x = bg.ball(torch.tensor([eta], dtype=torch.float64))
    y = bg.ball(torch.tensor([0.0], dtype=torch.float64), eta)
    out = x * y
    assert bool(out.contains([Fraction(eta) * Fraction(eta)]))
    assert bool(out.contains([-Fraction(eta) * Fraction(eta)]))
