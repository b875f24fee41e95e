"""The Sparsifier: finds a model's sparse layers and runs its method's schedule on them.

Training loop (optimizer built after the Sparsifier: DynaDiag adds gate scores):

    sparsifier = dst.Sparsifier(model, cfg, total_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(total_steps):
        with sparsifier.capture(step):          # hooks only on update steps of gradient rules
            loss = loss_fn(model(x), y)
            loss.backward()
        optimizer.step(); optimizer.zero_grad()
        stats = sparsifier.step(step, optimizer)  # dict when masks changed, else None

Resume: build the model, the Sparsifier and the optimizer as above, then
``sparsifier.load_state_dict(sd)`` (gives each layer its saved pattern shapes and gates,
keeping the Parameter objects the optimizer holds), then ``model.load_state_dict`` and
``optimizer.load_state_dict``.
"""
from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

from alwayssparse.kernels import SparseLayer, resize_parameter

from .config import DSTConfig
from .layers import check_layer_format
from .rules import rule_for
from .schedules import drop_fraction
from .scores import UpdateContext

class Sparsifier:
    """Mask updates of every ``kernels.SparseLayer`` in ``model`` under ``cfg``.

    Args:
        model: the network; its sparse layers are found with named_modules().
        cfg: the DST config (validated here).
        total_steps: length of training, for the schedules (t_end, freeze_at).
        heads: names of sparse layers that are never ablated (SRigL's classifier head).
    """

    def __init__(self, model: nn.Module, cfg: DSTConfig, total_steps: int, *, heads=()):
        cfg.validate()
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        self.cfg = cfg
        self.total_steps = total_steps
        self.rule = rule_for(cfg.method)
        self.layers: dict[str, SparseLayer] = {
            name: m for name, m in model.named_modules() if isinstance(m, SparseLayer)}
        for name, layer in self.layers.items():
            check_layer_format(cfg.method, name, layer, self.rule.formats(cfg.method))
        unknown = sorted(set(heads) - set(self.layers))
        if unknown:
            raise ValueError(f"heads {unknown} are not sparse layers of the model; sparse layers: {sorted(self.layers)}")
        self.heads = frozenset(heads)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.update_end = self.rule.horizon(cfg, total_steps)   # updates stop here (DynaDiag: its freeze)
        self.frozen = False
        self.budgets = {name: layer.nnz() for name, layer in self.layers.items()}
        self.k_targets: dict[str, int] = {}
        self._records: dict[str, list] = {}
        self.rule.start(self)

    @property
    def freeze_step(self) -> float:
        """DynaDiag's freeze step (its update horizon)."""
        return self.update_end

    def update_due(self, step: int) -> bool:
        """Whether ``step(step, ...)`` changes masks (DynaDiag: resamples or freezes)."""
        return self.rule.update_due(self, step)

    def drop_fraction(self, step: int) -> float:
        return drop_fraction(step, self.cfg.alpha, self.update_end, self.cfg.drop_schedule)


    @contextlib.contextmanager
    def capture(self, step: int):
        """Record every sparse layer's input x and output gradient dy during the forward and
        backward run inside the block, on update steps of gradient-based rules only (a no-op
        otherwise). Several forwards (gradient accumulation) are concatenated along tokens.
        x shares the storage autograd saves anyway; dy ([T, out] per layer) is the extra
        memory, held until ``step``."""
        if not self.rule.captures(self, step):
            yield
            return
        handles = [layer.register_forward_hook(self._recorder(name)) for name, layer in self.layers.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _recorder(self, name: str):
        def hook(module, inputs, output):
            x = inputs[0].detach().reshape(-1, module.in_features)
            slot = [x, None]
            self._records.setdefault(name, []).append(slot)
            if output.requires_grad:
                def grad_hook(grad, slot=slot):
                    slot[1] = grad.detach().reshape(-1, module.out_features)
                output.register_hook(grad_hook)
        return hook

    def captured(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{name: (dy [T, out], x [T, in])} recorded by ``capture`` since the last ``step``."""
        out = {}
        for name, slots in self._records.items():
            done = [s for s in slots if s[1] is not None]
            if done:
                dy, x = torch.cat([s[1] for s in done]), torch.cat([s[0] for s in done])
                # Under autocast the input and the output gradient may differ in dtype.
                common = torch.promote_types(dy.dtype, x.dtype)
                out[name] = (dy.to(common), x.to(common))
        return out


    def step(self, step: int, optimizer: torch.optim.Optimizer | None) -> dict | None:
        """After optimizer.step(): anneal DynaDiag's temperature, freeze, or update masks when
        due. Returns {"step", "drop_fraction", "seconds", "layers": {name: {"kept", "dropped",
        "grown", "density", ...}}} when masks changed, else None."""
        try:
            return self._step(step, optimizer)
        finally:
            self._records.clear()

    def _step(self, step, optimizer):
        cfg = self.cfg
        self.rule.every_step(self, step, optimizer)
        if not self.update_due(step):
            return None
        start = time.perf_counter()
        frac = self.drop_fraction(step)
        ctx = UpdateContext(cfg=cfg, optimizer=optimizer, drop_fraction=frac, generator=self.generator,
                            captures=self.captured() if self.rule.needs_gradient else {},
                            budgets=self.budgets, heads=self.heads)
        layers = self.rule.run(self, step, ctx)
        return {"step": step, "drop_fraction": frac, "seconds": time.perf_counter() - start, "layers": layers}


    def densities(self) -> dict[str, float]:
        """Stored weights / (out * in) of every sparse layer (DynaDiag before its freeze
        stores its candidate diagonals too)."""
        return {name: layer.density() for name, layer in self.layers.items()}

    def active_densities(self) -> dict[str, float]:
        """Weights that count toward the target / (out * in) of every sparse layer: DynaDiag's
        K active diagonals without the candidates it carries until the freeze; the stored
        density for every other method."""
        return {name: self.rule.active_density(self, name, layer) for name, layer in self.layers.items()}

    def state_dict(self) -> dict:
        layers = {}
        for name, layer in self.layers.items():
            layers[name] = {"pattern": {b: t.detach().cpu().clone() for b, t in layer.pattern().items()},
                            "values_shape": tuple(layer.values.shape), **self.rule.layer_state(layer)}
        return {"method": self.cfg.method, "config": self.cfg.to_dict(), "total_steps": self.total_steps,
                "generator": self.generator.get_state(), "frozen": self.frozen, "budgets": dict(self.budgets),
                "k_targets": dict(self.k_targets), "heads": sorted(self.heads), "layers": layers}

    def load_state_dict(self, sd: dict) -> None:
        """Restore schedules, RNG, gates and each layer's pattern (call before the model's
        load_state_dict: values of a changed shape are resized here, in the same Parameter,
        and filled by the model's state dict)."""
        if sd["method"] != self.cfg.method:
            raise ValueError(f"state is for method {sd['method']!r}, this Sparsifier runs {self.cfg.method!r}")
        if set(sd["layers"]) != set(self.layers):
            raise ValueError(f"state has layers {sorted(sd['layers'])}, the model has {sorted(self.layers)}")
        self.generator.set_state(sd["generator"])
        self.frozen = sd["frozen"]
        self.budgets = dict(sd["budgets"])
        self.k_targets = dict(sd["k_targets"])
        for name, layer in self.layers.items():
            entry = sd["layers"][name]
            device = layer.values.device
            for b, t in entry["pattern"].items():
                setattr(layer, b, t.to(device).clone())
            shape = tuple(entry["values_shape"])
            if tuple(layer.values.shape) != shape:
                resize_parameter(layer.values, layer.values.new_zeros(shape))
            self.rule.load_layer_state(layer, entry)
