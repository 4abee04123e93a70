"""WiSE-FT (Wortsman et al., 2022): weight-space ensembles of a zero-shot and a fine-tuned model.

theta(alpha) = (1 - alpha) * theta_zeroshot + alpha * theta_finetuned, for the model and the
objective's heads alike. Both checkpoints must be of one architecture: :func:`architecture_differences`
names what differs (model config, objective, parameter names and shapes). The report is one table
row per alpha; the plot draws each task's accuracy against alpha, in-distribution tasks solid and
shifted ones dashed (the WiSE-FT paper's figure).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

# Not part of the architecture: where a run's initial weights came from.
PROVENANCE_KEYS = ("pretrained", "timm_pretrained", "image_pretrained", "text_pretrained", "pretrained_skip")


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}.{key}").items()}
    return {prefix: value}


def _compare(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    return [
        f"{key}: {a.get(key, '<absent>')} != {b.get(key, '<absent>')}"
        for key in sorted(set(a) | set(b))
        if a.get(key, "<absent>") != b.get(key, "<absent>")
    ]


def _shapes(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, list[int]]:
    return {f"{prefix}.{key}": list(value.shape) for key, value in state.items()}


def architecture_differences(
    zeroshot: Mapping[str, Any],
    finetuned: Mapping[str, Any],
    model_configs: Sequence[Mapping | None],
    with_objective: bool = True,
) -> list[str]:
    """What differs between two checkpoints' architectures (empty: they interpolate).

    ``model_configs`` are the two stored model group configs (None for plain open_clip checkpoints);
    ``with_objective=False`` compares the models only.
    """
    configs = [
        _flatten({k: v for k, v in (config or {}).items() if k not in PROVENANCE_KEYS}, "model")
        for config in model_configs
    ]
    # The objective's name and its heads' shapes (below); its loss settings (locking, gathering) may differ.
    specs = [{"objective": (ckpt.get("objective_spec") or {}).get("name")} for ckpt in (zeroshot, finetuned)]
    shapes = [
        {**_shapes(ckpt["state_dict"], "state_dict"), **_shapes(ckpt.get("objective") or {}, "objective_state")}
        for ckpt in (zeroshot, finetuned)
    ]
    if not with_objective:
        specs = [{}, {}]
        shapes = [{k: v for k, v in side.items() if k.startswith("state_dict.")} for side in shapes]
    return _compare(*configs) + _compare(*specs) + _compare(*shapes)


def interpolate(
    zeroshot: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """(1 - alpha) * zeroshot + alpha * finetuned per tensor (``torch.lerp``: exact at 0 and 1);
    integer buffers (counters) are taken from the zero-shot side."""
    return {
        key: torch.lerp(value, finetuned[key].to(value.dtype), float(alpha)) if value.is_floating_point() else value
        for key, value in zeroshot.items()
    }


def accuracy_metric(metrics: Sequence[str], task: str) -> str | None:
    """The metric plotted for ``task``: its first top-1 accuracy (zero-shot or classifier), else its first."""
    own = [m for m in metrics if m.startswith(f"{task}-")]
    return next((m for m in own if m.endswith("top1")), own[0] if own else None)


def render_wise_ft_table(rows: Sequence[Mapping[str, Any]], zeroshot: str, finetuned: str) -> str:
    """Markdown: one row per alpha (as given), every metric as a fraction with 4 decimals."""
    metrics = [key for key in rows[0] if key not in ("alpha", "scoring")] if rows else []
    scoring = [f"scoring: {rows[0]['scoring']}", ""] if rows and "scoring" in rows[0] else []
    lines = [
        "# WiSE-FT",
        "",
        f"theta(alpha) = (1 - alpha) * theta_zeroshot + alpha * theta_finetuned; zeroshot=`{zeroshot}`, "
        f"finetuned=`{finetuned}`",
        "",
        *scoring,
        "| alpha | " + " | ".join(metrics) + " |",
        "|---:|" + "---:|" * len(metrics),
    ]
    lines += ["| " + " | ".join([str(row["alpha"]), *(f"{row[m]:.4f}" for m in metrics)]) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_wise_ft(
    path: Path, rows: Sequence[Mapping[str, Any]], tasks: Sequence[str], id_tasks: Sequence[str]
) -> dict[str, str]:
    """Accuracy against alpha, one line per task; returns task -> metric drawn."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window, never need a display
    import matplotlib.pyplot as plt

    alphas = [float(row["alpha"]) for row in rows]
    drawn: dict[str, str] = {}
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=110)
    for task in tasks:
        metric = accuracy_metric(list(rows[0]), task)
        if metric is None:
            continue
        drawn[task] = metric
        in_distribution = task in id_tasks
        ax.plot(
            alphas,
            [row[metric] for row in rows],
            linestyle="-" if in_distribution else "--",
            marker="o",
            label=f"{metric} ({'in-distribution' if in_distribution else 'shifted'})",
        )
    ax.set_xlabel("alpha (0 = zero-shot, 1 = fine-tuned)")
    ax.set_ylabel("accuracy")
    ax.set_title("WiSE-FT: weight-space interpolation", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return drawn
