"""Train a GPT-style causal language model whose attention and MLP linears are always-sparse
layers, with a DST method.

    python -m train.gpt --method srigl --sparsity 0.9      # pydoc text, 2 CPU cores, see RESULTS.md
    python -m train.gpt --method dense
    python -m train.gpt --method rigl --preset small --dataset wikitext --seq-len 256 --device cuda
    python -m train.eval runs/gpt/srigl-s0.9-seed0         # test perplexity, and a few sampled lines

The corpus is the BERT trainer's (train/data.load_text): the stdlib's ``pydoc_data.topics`` by
default (offline); ``--dataset`` also takes a local .txt file or folder, a Hugging Face dataset
name or a .parquet file with a text column. A lower-cased WordPiece tokenizer is trained on it,
cached in data_cache/ and kept in the run folder (tokenizer.json: --resume and train.eval read
that one). Each sequence is --seq-len tokens and its --seq-len next tokens.
Metrics: next-token loss (mean cross-entropy over every position), perplexity = exp(loss), and
next-token accuracy. Writes to runs/gpt/<method>-s<sparsity>-seed<seed>/ (or --out-dir) the
same files as train.vit / train.bert; --resume, torchrun and train.eval work the same way.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass

# Only the standard library at import: --help and flag errors return before torch, the kernels
# and the data load (the functions below import them when called).
from .flags import Entry, TrainerFlags, UsageError, check_common, entry_main

ENTRY = Entry("gpt", title="GPT", metric="next-token accuracy", loss_label="LM loss",
              metric_label="next-token accuracy")


@dataclass
class GPTFlags:
    """The GPT trainer's own flags (TrainerFlags has the shared ones)."""
    # data
    dataset: str = "pydoc"          # pydoc (stdlib text) | .txt file / folder | Hugging Face name | .parquet
    vocab_size: int = 4096          # WordPiece vocabulary trained on the corpus
    seq_len: int = 64               # tokens per training sequence (the model's max_len is at least this)
    # model (None = the preset's value)
    preset: str = "tiny"            # micro | tiny (2x128) | mini | small (GPT-2 small) | medium (GPT-2 medium)
    dropout: float = 0.1            # dropout on embeddings / attention / MLP / residuals
    # optimisation
    steps: int = 600                # optimizer steps (the DST schedules scale with it)
    batch_size: int = 32            # sequences per step
    lr: float = 1e-3                # peak learning rate (after warm-up; cosine decay to 0)
    weight_decay: float = 0.01      # on weights / sparse values only
    # evaluation, logging, checkpoints
    eval_examples: int = 0          # validation sequences per pass (0 = all); the final test uses all


@dataclass
class Config(TrainerFlags, GPTFlags):
    """Train a GPT-style causal LM with sparse qkv / attention-out / fc1 / fc2 layers and a DST method."""


def lm_loss(model, blocks):
    """(mean next-token cross-entropy, logits [B, N - 1, V], targets [B, N - 1]) of token blocks [B, N]."""
    import torch.nn.functional as F
    logits = model(blocks[:, :-1]).float()
    target = blocks[:, 1:]
    return F.cross_entropy(logits.flatten(0, 1), target.flatten()), logits, target


def evaluate(model, blocks, device, amp):
    """(next-token loss, next-token accuracy) over every position of ``blocks``."""
    from .common import token_metrics
    return token_metrics(model, (lambda i=i: lm_loss(model, blocks[i:i + 64].to(device))
                                 for i in range(0, len(blocks), 64)), amp)


def check_flags(cfg: Config) -> None:
    """The checks that need no import beyond the standard library (UsageError)."""
    check_common(cfg)
    if not 0 <= cfg.dropout < 1:
        raise UsageError(f"--dropout must lie in [0, 1), got {cfg.dropout}")
    if cfg.seq_len < 8:   # train/data.load_text checks it too, after importing torch
        raise UsageError(f"--seq-len must be >= 8, got {cfg.seq_len}")
    if cfg.vocab_size < 31:   # 5 special tokens + 26 letters
        raise UsageError(f"--vocab-size must be >= 31, got {cfg.vocab_size}")


def model_config(cfg: Config):
    """(GPT, its config from the preset and the flags)."""
    from models.gpt import GPT, GPTConfig
    overrides = {k: getattr(cfg, k) for k in ("dim", "depth", "heads", "mlp_dim") if getattr(cfg, k) is not None}
    return GPT, GPTConfig.preset(cfg.preset, dropout=cfg.dropout, fused_mlp=cfg.fused_mlp, **overrides)


def load_text(cfg: Config, tokenizer=None):
    """The corpus in blocks of --seq-len + 1 tokens: a block's first --seq-len tokens are the input,
    its last --seq-len the targets. ``tokenizer``: a run's (train/data.run_tokenizer), else the
    corpus's WordPiece (trained, or from data_cache/)."""
    from .data import load_text as load
    return load(cfg.dataset, cfg.seq_len + 1, cfg.vocab_size, cfg.seed, tokenizer=tokenizer)


def load(cfg: Config, model_cfg, resume_from=None):
    """The corpus and the model config at its vocabulary; the tokenizer is kept in the run folder
    (tokenizer.json), and a resumed run reads it there."""
    from models.gpt import GPT

    from .data import TOKENIZER_FILE, run_tokenizer
    from .session import Built
    tok = run_tokenizer(resume_from, cfg.dataset, cfg.vocab_size, ENTRY.prog, keeps=True) if resume_from else None
    data = load_text(cfg, tok)
    model_cfg = dataclasses.replace(model_cfg, vocab_size=data.vocab_size, max_len=max(model_cfg.max_len, cfg.seq_len))
    return Built(GPT, model_cfg, data, about=f"{data.name} ({len(data.train)} train sequences of {cfg.seq_len}, "
                                             f"vocab {data.vocab_size})",
                 files={TOKENIZER_FILE: data.tokenizer.to_str(pretty=True)})


def main(argv=None) -> int:
    return entry_main(Config, argv, ENTRY, check_flags, train)


def train(cfg: Config, argv=None) -> int:
    """The run: ``session.start``, then the loop (forward, backward, ``run.update``: optimizer and
    mask step), then the final evaluation (``run.finish``: summary.json, plots)."""
    from . import session
    run = session.start(cfg, argv, ENTRY, check_flags, lambda: model_config(cfg),
                        lambda m, resume_from: load(cfg, m, resume_from))
    cfg, model, data, sparsifier, optimizer = run.cfg, run.model, run.data, run.sparsifier, run.optimizer
    val = data.val if not cfg.eval_examples else data.val[:cfg.eval_examples]
    for step in run.steps(lambda: evaluate(model, val, run.device, run.amp)):
        (blocks,) = run.ddp.shard(data.batch(step, cfg.batch_size, cfg.seed))
        blocks = blocks.to(run.device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with sparsifier.capture(step):  # records layer inputs / output grads on update steps
            with run.amp():
                loss, logits, target = lm_loss(run.net, blocks)
            loss_value = loss.item()
            if not run.finite(loss_value, step):
                return 1
            loss.backward()
        run.update(step, loss_value, lambda: (logits.argmax(-1) == target).float().mean().item())
    if run.exit_code is not None:
        return run.exit_code
    vloss, vacc = evaluate(model, data.val, run.device, run.amp)
    tloss, tacc = evaluate(model, data.test, run.device, run.amp)
    scores = {"test": {"lm_loss": tloss, "perplexity": math.exp(min(tloss, 50)), "accuracy": tacc},
              "val": {"lm_loss": vloss, "perplexity": math.exp(min(vloss, 50)), "accuracy": vacc}}
    return run.finish((vloss, vacc), (tloss, tacc), scores,
                      f"test perplexity {scores['test']['perplexity']:.2f} (loss {tloss:.4f}), "
                      f"next-token accuracy {100 * tacc:.2f}%")


if __name__ == "__main__":
    sys.exit(main())
