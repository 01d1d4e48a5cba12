"""Suite-wide settings: hypothesis keeps no example database (tests leave no
files behind) and never times a single example (the machine is shared)."""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "kvmmem",
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("kvmmem")
