"""PNG plots of a run: the training curves, the learned masks and the mask churn (matplotlib,
Agg backend).

The mask plot forms each layer's dense boolean mask, which is fine once at the end of a run
(and is what the masks are for: tests, plots, export); large layers are max-pooled to at most
256 x 256 pixels so that every connection stays visible as density.

The churn plot is drawn from the run's metrics.jsonl (the source of truth), from the rows that
``mask_rows`` makes: ``split="mask"`` at every mask update (per layer: kept / dropped / grown
element counts and the method's extras: SRigL's k and ablated neurons, DynaDiag's replaced
diagonals) and, while DynaDiag's gates are on, ``split="gates"`` (per layer: the stored
diagonals' offsets and scores, K and the temperature T, from which ``gate_values`` gives the
gates a = clamp(K softmax(scores / T), 0, 1)) at every log step and after every resample. A
gates row holds 2 (K + C) numbers per layer (active plus candidate diagonals), never
O(out * in): ViT-B at b = 16 about 4,000 numbers, 40 KB a row, and only until the freeze.
"""
from __future__ import annotations

import json
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


def _round(values, digits: int = 5) -> list[float]:
    return [float(f"{v:.{digits}g}") for v in values]


def mask_rows(step: int, stats: dict | None, sparsifier, log: bool) -> list[dict]:
    """The metrics.jsonl rows of the masks' history at ``step``, after ``sparsifier.step``
    returned ``stats``: a "mask" row when masks changed, and a "gates" row (DynaDiag before its
    freeze) on log steps (``log``) and after each resample. Reads only; changes nothing."""
    rows = []
    if stats is not None:
        rows.append({"step": step, "split": "mask", "drop_fraction": float(stats["drop_fraction"]),
                     "seconds": float(stats["seconds"]),
                     "layers": {name: {k: (v if isinstance(v, (bool, int, str)) else float(v)) for k, v in layer.items()}
                                for name, layer in stats["layers"].items()}})
    if sparsifier is None or not (log or stats is not None):
        return rows
    gates = {}
    for name, layer in sparsifier.layers.items():
        if getattr(layer, "scores", None) is None:
            continue
        with torch.no_grad():
            gates[name] = {"P": int(layer.geometry[3]), "k": int(layer.k_target),
                           "temperature": float(layer.temperature),
                           "offsets": layer.offsets.tolist(), "scores": _round(layer.scores.tolist())}
    if gates:
        rows.append({"step": step, "split": "gates", "layers": gates})
    return rows


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl file (ValueError naming the file and line on a bad one)."""
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i} is not a JSON line: {e}") from None
    return rows


def churn_matrix(mask: list[dict], key: str) -> tuple[list[str], list[int], list[list[float]]]:
    """(layer names, update steps, [layer][update] fraction): ``key`` ("dropped" or "grown")
    over the layer's nnz before the update (kept + dropped), NaN where a row lacks the layer."""
    names = list(dict.fromkeys(n for r in mask for n in r["layers"]))
    steps = [r["step"] for r in mask]
    grid = []
    for name in names:
        line = []
        for r in mask:
            c = r["layers"].get(name)
            old = c and c["kept"] + c["dropped"]
            line.append(c[key] / old if old else math.nan)
        grid.append(line)
    return names, steps, grid


def gate_values(entry: dict) -> list[float]:
    """The gates a = clamp(K softmax(scores / T), 0, 1) of one layer's entry of a gates row
    (``DiagLinear.gate``)."""
    scores = torch.tensor(entry["scores"], dtype=torch.float64)
    return (entry["k"] * torch.softmax(scores / entry["temperature"], 0)).clamp(0, 1).tolist()


def gate_matrix(gates: list[dict], name: str) -> tuple[list[int], list[list[float]]]:
    """(steps, [P][row] gate value) of one layer: NaN for a diagonal not stored at that row."""
    rows = [r for r in gates if name in r["layers"]]
    P = rows[0]["layers"][name]["P"]
    grid = [[math.nan] * len(rows) for _ in range(P)]
    for j, r in enumerate(rows):
        g = r["layers"][name]
        for o, a in zip(g["offsets"], gate_values(g)):
            grid[o][j] = a
    return [r["step"] for r in rows], grid


def plot_churn(metrics_path: Path, path: Path, title: str, max_gate_layers: int = 8) -> bool:
    """churn.png from ``metrics_path`` (metrics.jsonl): per mask update and layer the fraction of
    the weights dropped and grown (heat maps), the kept / dropped / grown totals over all layers,
    and - for DynaDiag - each layer's gate value per diagonal offset over the steps (blank: not
    stored). Returns False (no file) when the run has no mask update and no gate row."""
    rows = read_jsonl(metrics_path)
    mask = [r for r in rows if r.get("split") == "mask"]
    gates = [r for r in rows if r.get("split") == "gates"]
    if not mask and not gates:
        return False
    gate_names = list(dict.fromkeys(n for r in gates for n in r["layers"]))[:max_gate_layers]
    gate_rows = math.ceil(len(gate_names) / 4)
    n_rows = (1 if mask else 0) + gate_rows
    fig = plt.figure(figsize=(14, 3.8 * n_rows))
    grid = fig.add_gridspec(n_rows, 4)
    if mask:
        names, steps, _ = churn_matrix(mask, "dropped")
        for col, key in enumerate(("dropped", "grown")):
            ax = fig.add_subplot(grid[0, col])
            _, _, m = churn_matrix(mask, key)
            im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
            ax.set(title=f"{key} / nnz before the update", xlabel="mask update (step)")
            ax.set_yticks(range(len(names)), names, fontsize=max(4, 8 - len(names) // 8))
            ticks = list(range(0, len(steps), max(1, len(steps) // 8)))
            ax.set_xticks(ticks, [str(steps[i]) for i in ticks], fontsize=7)
            fig.colorbar(im, ax=ax, fraction=0.046)
        ax = fig.add_subplot(grid[0, 2:])
        for key in ("kept", "dropped", "grown"):
            ax.plot(steps, [sum(c[key] for c in r["layers"].values()) for r in mask], "o-", ms=3, label=key)
        ax.set(xlabel="step", ylabel="weights (all sparse layers)", yscale="symlog", title="per mask update")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    for i, name in enumerate(gate_names):
        ax = fig.add_subplot(grid[(1 if mask else 0) + i // 4, i % 4])
        steps, m = gate_matrix(gates, name)
        im = ax.imshow(m, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest", origin="lower",
                       extent=(-0.5, len(steps) - 0.5, -0.5, len(m) - 0.5))
        fig.colorbar(im, ax=ax, fraction=0.046, label="gate a (blank: not stored)")
        ticks = list(range(0, len(steps), max(1, len(steps) // 5)))
        ax.set_xticks(ticks, [str(steps[t]) for t in ticks], fontsize=7)
        ax.set(title=f"{name}: gate per diagonal", xlabel="step (log rows)", ylabel="diagonal offset")
        ax.title.set_fontsize(8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
