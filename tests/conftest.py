import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Tests never reach a network: a hub name must fail fast instead of hanging.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Tokenizers the tests train, in this process and in every trainer they start, go to a folder of
# this session (train/data.py reads DST_DATA_CACHE before any test module imports it), never the
# repository's data_cache/; Fashion-MNIST is still read from there (train/data.FASHION_DIRS).
REPO_CACHE = Path(__file__).resolve().parents[1] / "data_cache"
TEST_CACHE = tempfile.mkdtemp(prefix="dst-test-data-cache-")
os.environ["DST_DATA_CACHE"] = TEST_CACHE

from hypothesis import settings  # noqa: E402

# Same examples on every run (a fixed seed per test), no example database left behind.
settings.register_profile("project", derandomize=True, database=None, deadline=None)
settings.load_profile("project")


def pytest_unconfigure(config):
    shutil.rmtree(TEST_CACHE, ignore_errors=True)


def _listing(folder: Path) -> dict:
    """{relative path: (size, mtime)} of everything under ``folder`` (a few files: Fashion-MNIST's)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture(autouse=True)
def repository_data_cache_is_left_alone(request):
    """A test that writes into the repository's data_cache/ (a trainer started with an
    environment of its own, without DST_DATA_CACHE) errors, naming what it changed."""
    before = _listing(REPO_CACHE)
    yield
    after = _listing(REPO_CACHE)
    if after != before:
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        pytest.fail(f"{request.node.nodeid} changed the repository's {REPO_CACHE}: {', '.join(changed)} (tests "
                    f"keep tokenizers in DST_DATA_CACHE={TEST_CACHE}: pass os.environ to subprocesses)",
                    pytrace=False)
