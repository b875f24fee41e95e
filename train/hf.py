"""Dynamic sparse training inside Hugging Face ``transformers.Trainer``: a TrainerCallback that
runs a ``dst.Sparsifier``'s mask updates at the Trainer's steps.

    model = BertForMaskedLM(BertConfig(...))
    cfg = dst.DSTConfig.for_method("rigl", sparsity=0.9)
    models.sparsify(model, lambda name, lin: dst.make_layer(cfg, lin.in_features, lin.out_features, 0.1),
                    include=r"encoder\\..*(query|key|value|dense)$")
    sparsifier = dst.Sparsifier(model, cfg, total_steps=1000)          # before the Trainer builds its optimizer
    trainer = Trainer(model=model, args=TrainingArguments(max_steps=1000, ...), train_dataset=...,
                      callbacks=[DSTCallback(sparsifier)])
    trainer.train()

Trainer needs ``accelerate`` (``pip install -e ".[hf]"``); this module imports nothing of
transformers beyond TrainerCallback. Where the callback acts, in the order of Trainer's loop
(transformers 4.50-5.x): ``on_step_begin`` (the first micro-batch of a step) opens
``sparsifier.capture(step)``, which records the layer inputs and output gradients a gradient
rule needs on update steps, over every micro-batch of gradient accumulation;
``on_pre_optimizer_step`` (after backward and clipping) closes it; ``on_optimizer_step``
(after ``optimizer.step()``, before ``zero_grad``) calls ``sparsifier.step(step, optimizer)``,
which changes the masks and resets the optimizer state of regrown weights. Build the
Sparsifier before the Trainer creates its optimizer (at ``train()``): DynaDiag adds gate
scores the optimizer must hold.
"""
from __future__ import annotations

import contextlib

from transformers import TrainerCallback


class DSTCallback(TrainerCallback):
    """Runs ``sparsifier``'s schedule in ``transformers.Trainer``; ``updates`` collects the
    (step, stats) of every mask update, and each is logged as ``dst/...`` metrics."""

    def __init__(self, sparsifier):
        self.sparsifier = sparsifier
        self.updates: list[tuple[int, dict]] = []
        self._capture = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._close()
        self._capture = contextlib.ExitStack()
        self._capture.enter_context(self.sparsifier.capture(state.global_step))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._close()

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        optimizer = getattr(optimizer, "optimizer", optimizer)   # accelerate's AcceleratedOptimizer wraps it
        stats = self.sparsifier.step(state.global_step, optimizer)
        if stats is not None:
            self.updates.append((state.global_step, stats))
            numbers = {f"dst/{k}": v for k, v in stats.items() if isinstance(v, (int, float))}
            state.log_history.append({"step": state.global_step, **numbers})

    def on_train_end(self, args, state, control, **kwargs):
        self._close()

    def _close(self):
        if self._capture is not None:
            self._capture.close()
            self._capture = None
