import os
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, settings

# Seeded and reproducible in CI; no deadline (mpmath checks are slow by design).
settings.register_profile(
    "ballgrad",
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ballgrad"))


@pytest.fixture(params=["fused", "reference"])
def ln_path(request, monkeypatch):
    """Layer norm through its fused kernels (``fused.layer_norm_*``: the test fails if they never ran, unless it sets
    ``expect_calls`` False, e.g. for a dtype they do not take) or through the reference torch formulas (the fused
    entry points patched to decline)."""
    from ballgrad import fused
    from ballgrad.ops import normalization

    path = SimpleNamespace(name=request.param, calls=[], expect_calls=True)
    if request.param == "reference":
        monkeypatch.setattr(normalization, "_layer_norm_fused_forward", lambda *a, **k: None)
        monkeypatch.setattr(normalization, "_layer_norm_fused_backward", lambda *a, **k: None)
    else:
        for name in ("layer_norm_forward", "layer_norm_backward"):
            original = getattr(fused, name)
            monkeypatch.setattr(fused, name, lambda *a, _f=original, **k: path.calls.append(1) or _f(*a, **k))
    yield path
    if path.name == "fused" and path.expect_calls and fused._numba() is not None:
        assert path.calls, "the fused layer-norm kernels never ran"
