"""The raw-kernel API for other Triton projects: the @triton.jit kernels of fanin.py and
sddmm.py have public names exported by the package and a docstring that gives the grid and an
entry for every argument; the launchers' docstrings give every argument's shape or type,
dtype and constraint."""
import inspect
import re

import pytest

import kernels

LAUNCHERS = [kernels.fanin_fwd, kernels.fanin_dx, kernels.fanout_structure, kernels.sddmm_fwd, kernels.csr_matmul]
SHAPE = re.compile(r"\[[^\]]*\]")
KINDS = re.compile(r"\b(int32|int64|ints?|bools?|str|float|fp16|bf16|fp32|fp64|dtype|triton dtype|None)\b")


def _entries(doc: str, section: str = "Args") -> dict[str, str]:
    """{name: text} of a Google-style section; "a, b: text" gives both names the text."""
    lines = doc.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == f"{section}:")
    indent = len(lines[start + 1]) - len(lines[start + 1].lstrip())
    out, current = {}, []
    for line in lines[start + 1:]:
        if line.strip() and len(line) - len(line.lstrip()) < indent:
            break
        m = re.match(r"\s*([\w, ]+?):\s(.*)", line) if len(line) - len(line.lstrip()) == indent else None
        if m:
            current = [n.strip() for n in m.group(1).split(",")]
            for n in current:
                out[n] = m.group(2)
        else:
            for n in current:
                out[n] += " " + line.strip()
    # several entries on one line: "T: int, tokens (>= 1). n_rows: int, ..."
    for text in list(out.values()):
        for m in re.finditer(r"(?:^|\.\s)(\w+): ", text):
            out.setdefault(m.group(1), text[m.end():])
    return out


@pytest.mark.parametrize("name", kernels.RAW_KERNELS)
def test_every_raw_kernel_is_public_and_documents_its_grid_and_every_argument(name):
    kernel = getattr(kernels, name)
    assert name in kernels.__all__ and not name.startswith("_")
    assert hasattr(kernel, "fn") and kernel.fn.__name__ == name   # the @triton.jit function itself
    doc = inspect.getdoc(kernel.fn)
    assert doc and kernel.__doc__ == kernel.fn.__doc__            # also under the interpreter
    assert "Grid:" in doc
    entries = _entries(doc)
    assert set(kernel.arg_names) <= set(entries), sorted(set(kernel.arg_names) - set(entries))
    for arg in kernel.arg_names:
        text = entries[arg]
        assert KINDS.search(text), (arg, text)                  # a dtype or a type
        if arg.endswith("_ptr"):
            assert SHAPE.search(text), (arg, text)              # a tensor: its shape


@pytest.mark.parametrize("launcher", LAUNCHERS, ids=lambda f: f.__name__)
def test_every_launcher_documents_each_arguments_shape_dtype_and_constraint(launcher):
    doc = inspect.getdoc(launcher)
    entries = _entries(doc)
    params = list(inspect.signature(launcher).parameters)
    assert set(params) <= set(entries), sorted(set(params) - set(entries))
    for p in params:
        text = entries[p]
        assert KINDS.search(text) or SHAPE.search(text), (p, text)
        if SHAPE.search(text):   # a tensor argument names its dtype too
            assert KINDS.search(text) or "dtype of" in text, (p, text)
    assert "Returns:" in doc or launcher is kernels.fanout_structure


def test_the_private_kernel_names_are_gone_from_the_package():
    for old in ("_fanin_fwd_kernel", "_fanin_dx_kernel", "_sddmm_kernel", "_sddmm_block_kernel"):
        assert not hasattr(kernels, old) and not hasattr(kernels.fanin, old) and not hasattr(kernels.sddmm, old)
