"""``python -m vlhub.wise_ft``: WiSE-FT, weight-space ensembles of a zero-shot and a fine-tuned checkpoint.

    python -m vlhub.wise_ft zeroshot=runs/clip/checkpoints/latest.pt finetuned=runs/ft/checkpoints/latest.pt \\
        'alphas=[0,0.25,0.5,0.75,1]' eval=imagenet_shifts 'wise_ft.id_tasks=[imagenet]'

Each alpha's model (and objective heads) is (1 - alpha) * zeroshot + alpha * finetuned, evaluated on
the eval group's tasks with the objective's own scoring. Writes into the run folder ``wise_ft.md``
(one row per alpha), ``wise_ft.png`` (accuracy against alpha per task), ``wise_ft.jsonl`` and each
alpha's task files under ``eval/alpha_<alpha>/``. Checkpoints of different architectures fail
before any evaluation, naming what differs.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from vlhub.api import build_model, build_trained_objective, eval_transform, read_checkpoint, stored_model_config
from vlhub.config_keys import build_at
from vlhub.eval.scoring import default_scoring
from vlhub.eval.weight_interpolation import architecture_differences, interpolate, plot_wise_ft, render_wise_ft_table
from vlhub.evaluate import require_finite, resolve_device
from vlhub.launch import errors_reported
from vlhub.objectives import Objective, build_objective

log = logging.getLogger("vlhub.wise_ft")


def _alphas(values: Any, extrapolate: bool = False) -> list[int | float]:
    alphas = list(values) if isinstance(values, list | tuple) or OmegaConf.is_list(values) else [values]
    bad = [a for a in alphas if isinstance(a, bool) or not isinstance(a, int | float) or not math.isfinite(a)]
    if not alphas or bad:
        raise ValueError(f"alphas must be a non-empty list of numbers, e.g. 'alphas=[0,0.5,1]'; got {values}")
    outside = [a for a in alphas if not 0 <= a <= 1]
    if outside and not extrapolate:
        raise ValueError(
            f"alphas={list(alphas)}: {outside} lie outside [0, 1], beyond the two checkpoints (extrapolation); "
            "pass extrapolate=true to evaluate them anyway"
        )
    return alphas


def wise_ft(cfg: DictConfig, run_dir: Path) -> list[dict[str, Any]]:
    """Check both checkpoints and the tasks, then evaluate every alpha; returns one row per alpha."""
    alphas = _alphas(cfg.alphas, bool(cfg.get("extrapolate", False)))
    evaluator = build_at(cfg, "eval")  # before the models: a missing dataset folder fails fast
    id_tasks = list(cfg.wise_ft.id_tasks)
    unknown = sorted(set(id_tasks) - set(evaluator.tasks))
    if unknown:
        raise ValueError(f"wise_ft.id_tasks names {unknown}, not tasks of this eval group: {list(evaluator.tasks)}")
    zeroshot, finetuned = read_checkpoint(cfg.zeroshot), read_checkpoint(cfg.finetuned)
    configs = [stored_model_config(zeroshot), stored_model_config(finetuned)]
    if None in configs:
        raise ValueError("zeroshot= and finetuned= must both be vlhub checkpoints (they store their model config)")
    _check_same_architecture(cfg, zeroshot, finetuned, configs, False)  # the models first, before building one
    device = resolve_device(cfg.device)
    model = build_model(cfg.zeroshot, None, zeroshot).to(device).eval()
    zeroshot, objective = zero_shot_end(zeroshot, finetuned, model)
    _check_same_architecture(cfg, zeroshot, finetuned, configs)
    rows = []
    for alpha in alphas:
        weights = interpolate(zeroshot["state_dict"], finetuned["state_dict"], alpha)
        require_finite(weights, f"alphas: alpha={alpha}")  # an extrapolation can overflow
        model.load_open_clip_state_dict(weights)
        if objective is not None:
            objective.load_state_dict(interpolate(zeroshot["objective"], finetuned["objective"], alpha))
        scoring = objective.scoring(model) if objective is not None else default_scoring(model)
        metrics = evaluator.run(model, eval_transform(model), device, run_dir / "eval" / f"alpha_{alpha}", scoring)
        rows.append({"alpha": alpha, "scoring": scoring.record(), **metrics})
        log.info("alpha %s: %s", alpha, {k: round(v, 4) for k, v in metrics.items()})
    write_outputs(run_dir, rows, list(evaluator.tasks), id_tasks, str(cfg.zeroshot), str(cfg.finetuned))
    return rows


def _check_same_architecture(
    cfg: DictConfig, zeroshot: dict, finetuned: dict, configs: list, with_objective: bool = True
) -> None:
    differences = architecture_differences(zeroshot, finetuned, configs, with_objective)
    if differences:
        shown = "; ".join(differences[:8]) + (f"; ... ({len(differences)} in all)" if len(differences) > 8 else "")
        raise ValueError(f"zeroshot={cfg.zeroshot} and finetuned={cfg.finetuned} differ in architecture: {shown}")


def zero_shot_end(zeroshot: dict, finetuned: dict, model) -> tuple[dict, Objective | None]:
    """The zero-shot checkpoint and its objective, as alpha = 0 sees them.

    When the fine-tune's objective is another one whose start is a function of the model (a ``ce``
    head initialised from the zero-shot classifier), the zero-shot end is that objective freshly
    initialised on the zero-shot model; otherwise the checkpoint's own objective.
    """
    names = [(ckpt.get("objective_spec") or {}).get("name") for ckpt in (zeroshot, finetuned)]
    if names[0] != names[1] and finetuned.get("objective_spec") is not None:
        candidate = build_objective(finetuned["objective_spec"], model)
        if candidate.init_from_model:
            candidate.apply_init(model)
            candidate = candidate.to(next(model.parameters()).device).eval()
            state = {k: v.detach().cpu().clone() for k, v in candidate.state_dict().items()}
            return {**zeroshot, "objective_spec": finetuned["objective_spec"], "objective": state}, candidate
    return zeroshot, build_trained_objective(zeroshot, model)


def write_outputs(
    run_dir: Path, rows: list[dict[str, Any]], tasks: list[str], id_tasks: list[str], zeroshot: str, finetuned: str
) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "wise_ft.jsonl").open("w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    (run_dir / "wise_ft.md").write_text(render_wise_ft_table(rows, zeroshot, finetuned))
    drawn = plot_wise_ft(run_dir / "wise_ft.png", rows, tasks, id_tasks)
    log.info("wrote %s and %s (plotted %s)", run_dir / "wise_ft.md", run_dir / "wise_ft.png", drawn)


@hydra.main(config_path="pkg://vlhub.configs", config_name="wise_ft", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with errors_reported():  # an expected mistake (mismatched checkpoints, a bad alpha): one line and a hint
        wise_ft(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
