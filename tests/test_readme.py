"""The README's code runs as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_kernel_example_runs():
    text = README.read_text()
    section = text[text.index("## Using the kernels"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert ".venv/bin/python -m train.vit --method dynadiag" in text
    assert ".venv/bin/python -m pytest -q tests" in text
