"""pyproject.toml: the environment the tests run in lies inside the pinned ranges, so a pin
states versions the code was actually tested against."""
import importlib.metadata
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_installed_dependency_lies_in_its_pinned_range():
    requirements = pytest.importorskip("packaging.requirements")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    outside = []
    for line in project["dependencies"] + project["optional-dependencies"]["test"]:
        req = requirements.Requirement(line)
        assert req.specifier, f"{req.name} has no version range"
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            continue   # the GPU machines have no `datasets`: nothing to check there
        if not req.specifier.contains(version, prereleases=True):
            outside.append(f"{req.name} {version} not in {req.specifier}")
    assert not outside, outside
