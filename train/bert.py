"""Train a BERT masked-LM whose attention and MLP linears are always-sparse layers, with a DST
method.

    python -m train.bert --method rigl --sparsity 0.9       # pydoc text, 2 CPU cores, see RESULTS.md
    python -m train.bert --method dense
    python -m train.bert --method srigl --preset base --dataset wikitext --device cuda
    python -m train.bert --method dynadiag --block-size 16 --dropout 0 --fused-mlp   # fused MLPs

The default corpus is the stdlib's ``pydoc_data.topics`` (offline); ``--dataset`` also takes a
local .txt file or folder, a Hugging Face dataset name or a .parquet file with a text column.
A WordPiece tokenizer is trained on the corpus, cached in data_cache/ and kept in the run folder
(tokenizer.json: --resume and train.eval read that one). Metrics: masked-LM
loss (cross-entropy over the masked tokens) and accuracy on the masked tokens.
Writes to runs/bert/<method>-s<sparsity>-seed<seed>/ (or --out-dir) the same files as train.vit.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass

# Only the standard library at import: --help and flag errors return before torch, the kernels
# and the data load (the functions below import them when called).
from .flags import Entry, TrainerFlags, UsageError, check_common, entry_main

ENTRY = Entry("bert", title="BERT", metric="masked-token accuracy", loss_label="MLM loss",
              metric_label="masked accuracy")


@dataclass
class BertFlags:
    """The BERT trainer's own flags (TrainerFlags has the shared ones)."""
    # data
    dataset: str = "pydoc"          # pydoc (stdlib text) | .txt file / folder | Hugging Face name | .parquet
    vocab_size: int = 4096          # WordPiece vocabulary trained on the corpus
    seq_len: int = 64               # tokens per sequence (the model's max_len is at least this)
    mask_prob: float = 0.15         # fraction of tokens predicted (80% [MASK], 10% random, 10% kept)
    # model (None = the preset's value)
    preset: str = "tiny"            # micro | tiny (2x128) | mini | small | base (BERT-base) | large
    dropout: float = 0.1            # dropout on embeddings / attention / MLP / residuals
    # optimisation
    steps: int = 600                # optimizer steps (the DST schedules scale with it)
    batch_size: int = 32            # sequences per step
    lr: float = 1e-3                # peak learning rate (after warm-up; cosine decay to 0)
    weight_decay: float = 0.01      # on weights / sparse values only
    # evaluation, logging, checkpoints
    eval_examples: int = 0          # validation sequences per pass (0 = all); the final test uses all


@dataclass
class Config(TrainerFlags, BertFlags):
    """Train a BERT masked-LM with sparse qkv / attention-out / fc1 / fc2 layers and a DST method."""


def mlm_loss(model, inputs, labels):
    """(mean cross-entropy over the masked tokens, logits of those tokens, their labels)."""
    import torch.nn.functional as F
    picked = labels != -100
    logits, target = model(inputs, predict=picked).float(), labels[picked]
    return F.cross_entropy(logits, target), logits, target


def evaluate(model, blocks, data, cfg, device, amp):
    """(masked-LM loss, masked-token accuracy) with a fixed masking (same tokens every pass)."""
    import torch

    from .common import token_metrics
    from .data import mask_tokens
    g = torch.Generator().manual_seed(10_000 + cfg.seed)

    def batch(i):   # masked in order: the generator gives the same masking every pass
        inputs, labels = mask_tokens(blocks[i:i + 64], data.special, data.vocab_size, g, cfg.mask_prob)
        return mlm_loss(model, inputs.to(device), labels.to(device))
    return token_metrics(model, (lambda i=i: batch(i) for i in range(0, len(blocks), 64)), amp)


def check_flags(cfg: Config) -> None:
    """The checks that need no import beyond the standard library (UsageError)."""
    check_common(cfg)
    if not 0 <= cfg.dropout < 1 or not 0 < cfg.mask_prob < 1:
        raise UsageError("--dropout must lie in [0, 1) and --mask-prob in (0, 1)")
    if cfg.seq_len < 8:   # train/data.load_text checks these too, after importing torch
        raise UsageError(f"--seq-len must be >= 8, got {cfg.seq_len}")
    if cfg.vocab_size < 31:   # 5 special tokens + 26 letters
        raise UsageError(f"--vocab-size must be >= 31, got {cfg.vocab_size}")


def model_config(cfg: Config):
    """(Bert, its config from the preset and the flags)."""
    from models.bert import Bert, BertConfig
    overrides = {k: getattr(cfg, k) for k in ("dim", "depth", "heads", "mlp_dim") if getattr(cfg, k) is not None}
    return Bert, BertConfig.preset(cfg.preset, dropout=cfg.dropout, fused_mlp=cfg.fused_mlp, **overrides)


def load(cfg: Config, model_cfg, resume_from=None):
    """The corpus (tokenized, in blocks of --seq-len) and the model config at its vocabulary; the
    tokenizer is kept in the run folder (tokenizer.json), and a resumed run reads it there."""
    from models.bert import Bert

    from .data import TOKENIZER_FILE, load_text, run_tokenizer
    from .session import Built
    tok = run_tokenizer(resume_from, cfg.dataset, cfg.vocab_size, ENTRY.prog, keeps=True) if resume_from else None
    data = load_text(cfg.dataset, cfg.seq_len, cfg.vocab_size, cfg.seed, tokenizer=tok)
    model_cfg = dataclasses.replace(model_cfg, vocab_size=data.vocab_size, max_len=max(model_cfg.max_len, cfg.seq_len))
    return Built(Bert, model_cfg, data, about=f"{data.name} ({len(data.train)} train sequences of {cfg.seq_len}, "
                                              f"vocab {data.vocab_size})",
                 files={TOKENIZER_FILE: data.tokenizer.to_str(pretty=True)})


def main(argv=None) -> int:
    return entry_main(Config, argv, ENTRY, check_flags, train)


def train(cfg: Config, argv=None) -> int:
    """The run: ``session.start``, then the loop (masking, forward, backward, ``run.update``:
    optimizer and mask step), then the final evaluation (``run.finish``: summary.json, plots)."""
    import torch

    from . import session
    from .data import mask_tokens
    run = session.start(cfg, argv, ENTRY, check_flags, lambda: model_config(cfg),
                        lambda m, resume_from: load(cfg, m, resume_from))
    cfg, model, data, sparsifier, optimizer = run.cfg, run.model, run.data, run.sparsifier, run.optimizer
    val = data.val if not cfg.eval_examples else data.val[:cfg.eval_examples]
    for step in run.steps(lambda: evaluate(model, val, data, cfg, run.device, run.amp)):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # masking: a function of (seed, step)
        inputs, labels = mask_tokens(data.batch(step, cfg.batch_size, cfg.seed), data.special,
                                     data.vocab_size, g, cfg.mask_prob)
        inputs, labels = (t.to(run.device, non_blocking=True) for t in run.ddp.shard(inputs, labels))
        optimizer.zero_grad(set_to_none=True)
        with sparsifier.capture(step):  # records layer inputs / output grads on update steps
            with run.amp():
                loss, logits, target = mlm_loss(run.net, inputs, labels)
            loss_value = loss.item()
            if not run.finite(loss_value, step):
                return 1
            loss.backward()
        run.update(step, loss_value, lambda: (logits.argmax(-1) == target).float().mean().item())
    if run.exit_code is not None:
        return run.exit_code
    vloss, vacc = evaluate(model, data.val, data, cfg, run.device, run.amp)
    tloss, tacc = evaluate(model, data.test, data, cfg, run.device, run.amp)
    scores = {"test": {"mlm_loss": tloss, "mlm_accuracy": tacc, "perplexity": math.exp(min(tloss, 50))},
              "val": {"mlm_loss": vloss, "mlm_accuracy": vacc}}
    return run.finish((vloss, vacc), (tloss, tacc), scores, f"test MLM loss {tloss:.4f}, masked accuracy {100 * tacc:.2f}%")


if __name__ == "__main__":
    sys.exit(main())
