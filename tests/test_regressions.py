import pytest
import torch

import ballgrad as bg


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


@pytest.mark.parametrize("name", ["bessel_j0", "bessel_j1", "bessel_y0", "bessel_y1"])
def test_bessel_gradients_contain_the_mpmath_derivative(name):
    """The OpInfo gradient checks of the Bessel functions once compared against PyTorch's float64 kernels, which are
    off by up to 2e-7 relative on some CPUs; these gradient balls are checked against mpmath's derivatives instead
    (J0' = -J1, J1' = J0 - J1/x, Y0' = -Y1, Y1' = Y0 - Y1/x), on arguments around the functions' zeros."""
    import mpmath

    f = getattr(torch.special, name)
    if f(torch.ones(1, requires_grad=True)).grad_fn is None:
        pytest.skip(f"torch {torch.__version__} defines no derivative for special.{name} (added in later releases)")
    kind, order = name[-2], int(name[-1])
    fn = mpmath.besselj if kind == "j" else mpmath.bessely
    derivative = (lambda v: -fn(1, v)) if order == 0 else (lambda v: fn(0, v) - fn(1, v) / v)
    x = torch.tensor([0.26, 0.52, 2.3386, 3.2998, 4.9473, 5.87, 6.3058, 7.015, 11.5, 19.62], dtype=torch.float32)
    cot = torch.linspace(-2.1, 2.1, x.numel())
    xb = bg.ball(x.clone()).requires_grad_(True)
    (g,) = torch.autograd.grad([f(xb)], [xb], [bg.ball(cot)])
    for i in range(x.numel()):
        with mpmath.workprec(200):
            exact = derivative(mpmath.mpf(float(x[i]))) * mpmath.mpf(float(cot[i]))
            assert abs(exact - mpmath.mpf(float(g.mid[i]))) <= mpmath.mpf(float(g.rad[i])), (name, float(x[i]))
