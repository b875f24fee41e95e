"""PNG plots of a run: the training curves and the learned masks (matplotlib, Agg backend).

The mask plot forms each layer's dense boolean mask, which is fine once at the end of a run
(and is what the masks are for: tests, plots, export); large layers are max-pooled to at most
256 x 256 pixels so that every connection stays visible as density.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def plot_curves(history: dict, path: Path, title: str) -> None:
    """history: {"train": [(step, loss), ...], "eval": [(step, loss, metric), ...],
    "density": [(step, overall density), ...], "metric": name of the eval metric}."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    if history["train"]:
        s, loss = zip(*history["train"])
        axes[0].plot(s, loss, lw=0.8, label="train")
    if history["eval"]:
        s, loss, metric = zip(*history["eval"])
        axes[0].plot(s, loss, "o-", ms=3, label="val")
        axes[1].plot(s, metric, "o-", ms=3, color="C1")
    axes[0].set(xlabel="step", ylabel="loss", yscale="log")
    axes[0].legend()
    axes[1].set(xlabel="step", ylabel=f"val {history.get('metric', 'accuracy')}")
    if history["density"]:
        s, d = zip(*history["density"])
        axes[2].plot(s, d, color="C2")
    axes[2].set(xlabel="step", ylabel="stored density (DynaDiag: + candidates)", ylim=(0, 1.05))
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pooled(mask: torch.Tensor, max_side: int = 256) -> torch.Tensor:
    """Fraction of active connections per pixel, the longer side at most max_side pixels; one
    pooling factor for both sides, so the image keeps the layer's shape (192 x 64 stays 3:1)."""
    m = mask.float()[None, None]
    k = math.ceil(max(m.shape[2], m.shape[3]) / max_side)
    return F.avg_pool2d(m, (k, k), ceil_mode=True)[0, 0] if k > 1 else m[0, 0]


def plot_masks(layers: dict, path: Path, title: str, max_layers: int = 24) -> None:
    """One panel per sparse layer (rows: output neurons, columns: inputs; black = active)."""
    items = list(layers.items())[:max_layers]
    if not items:
        return
    cols = min(4, len(items))
    rows = math.ceil(len(items) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, layer) in zip(axes.flat, items):
        with torch.no_grad():
            img = _pooled(layer.mask().cpu())
        ax.imshow(img.numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest", aspect="equal")
        ax.set_title(f"{name}\n{layer.out_features}x{layer.in_features}, d={layer.density():.3f}", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
