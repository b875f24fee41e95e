import os

# Tests never reach a network: a hub name must fail fast instead of hanging.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hypothesis import settings  # noqa: E402

# Same examples on every run (a fixed seed per test), no example database left behind.
settings.register_profile("project", derandomize=True, database=None, deadline=None)
settings.load_profile("project")
