"""A TorchDispatchMode that sees every tensor created, inside our custom ops too.

``TensorCensus`` records, for each op, the size of every tensor it returns: the largest
element count (a sparse tensor counts its stored elements) with the op that made it, and
the live / peak bytes of the storages created while it is active (a storage is released
when the last tensor seen on it is freed).

Custom ops reach a dispatch mode as one opaque op; for the ``namespaces`` given (ours:
``alwayssparse``) the census runs the op's Python body with itself active, so the tensors
made inside are counted too.
"""
from __future__ import annotations

import weakref

import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def stored_elements(t: torch.Tensor) -> int:
    if t.layout == torch.strided:
        return t.numel()
    return int(t._nnz())


class TensorCensus(TorchDispatchMode):
    def __init__(self, namespaces: tuple[str, ...] = ("alwayssparse",)):
        super().__init__()
        self.namespaces = tuple(f"{ns}::" for ns in namespaces)
        self.largest = 0
        self.largest_op = None
        self.ops = 0
        self.live_bytes = 0
        self.peak_bytes = 0
        self._storages: dict[int, list[int]] = {}  # data_ptr -> [bytes, tensors alive]

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        opdef = OPDEFS.get(name) if self.namespaces and name.startswith(self.namespaces) else None
        if opdef is not None:
            with self:
                out = opdef._init_fn(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        self.ops += 1
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._record(str(func), t)
        return out

    def _record(self, op: str, t: torch.Tensor) -> None:
        n = stored_elements(t)
        if n > self.largest:
            self.largest, self.largest_op = n, f"{op} -> {tuple(t.shape)} {t.layout}"
        if t.layout != torch.strided or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if key == 0 or nbytes == 0:
            return
        entry = self._storages.get(key)
        if entry is None or entry[0] != nbytes:
            entry = self._storages[key] = [nbytes, 0]
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        entry[1] += 1
        weakref.finalize(t, self._release, key, entry)

    def _release(self, key: int, entry: list[int]) -> None:
        entry[1] -= 1
        if entry[1] == 0 and self._storages.get(key) is entry:
            del self._storages[key]
            self.live_bytes -= entry[0]
