# kernels must be imported before triton: without a GPU it switches the Triton interpreter on,
# which only takes effect for code that triton defines after the switch (its own tl.zeros too).
import kernels  # noqa: F401
import csv  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def read_rows(path) -> list[dict]:
    """The rows of a results CSV as dicts."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
