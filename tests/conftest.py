import os

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
