"""The one-way import flow of the project: kernels <- dst, models <- train; bench uses kernels
and models; dst and models never import each other; nothing imports train or bench."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "dst", "models", "train", "bench")
ALLOWED = {
    "kernels": set(),
    "dst": {"kernels"},
    "models": {"kernels"},
    "train": {"kernels", "dst", "models"},
    "bench": {"kernels", "models"},
}


def _our_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        # alwayssparse.kernels is the installed name of kernels (kernels/_names.py)
        names = [n.removeprefix("alwayssparse.") for n in names]
        found |= {n.split(".")[0] for n in names if n.split(".")[0] in PACKAGES}
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_flow_one_way(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        extra = _our_imports(path) - ALLOWED[package] - {package}
        if extra:
            bad.append(f"{path.relative_to(ROOT)} imports {sorted(extra)}")
    assert not bad, "import flow broken:\n" + "\n".join(bad)


def test_checker_sees_a_forbidden_import(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("import train.vit\nfrom models import vit\nfrom . import x\nimport alwayssparse.kernels as k\n")
    assert _our_imports(p) == {"train", "models", "kernels"}
