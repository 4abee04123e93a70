"""``python -m vlhub.evaluate``: load a checkpoint, run the eval group's tasks, write results and a report.

    python -m vlhub.evaluate checkpoint=runs/my_run/checkpoints/latest.pt eval=retrieval eval.retrieval.root=/data/coco
    python -m vlhub.evaluate model=vit_b32 checkpoint=/ckpts/open_clip_epoch_32.pt eval=imagenet eval.imagenet.root=...

A vlhub checkpoint's stored training config gives the model (``model=`` is accepted and ignored
with a warning when it disagrees); a plain open_clip checkpoint needs ``model=``. Without a
checkpoint, ``model.pretrained=TAG`` (open_clip weights) is needed; an untrained, randomly initialised
model is scored only when asked for with ``allow_random_model=true``.
Writes ``<run dir>/results.json`` (one flat object), ``<run dir>/report.md`` (every metric, links to
the tables and plots tasks wrote under ``<run dir>/eval/<task>/``).
"""

from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import vlhub.config_help  # noqa: F401  (registers the resolvers of --help)
from vlhub.api import build_model, build_trained_objective, eval_transform, read_checkpoint, stored_model_config
from vlhub.config_keys import build_at
from vlhub.errors import ConfigError
from vlhub.eval.scoring import default_scoring
from vlhub.eval.weight_interpolation import PROVENANCE_KEYS
from vlhub.launch import PlainKeys, check_config, check_device, errors_reported
from vlhub.run.checkpoint import weights_from

log = logging.getLogger("vlhub.evaluate")
PLOT_SUFFIXES = (".png", ".jpg", ".svg")
TABLE_SUFFIXES = (".csv", ".json", ".md", ".txt")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def require_weights(checkpoint: str | None, pretrained: str | None, allow_random_model: bool) -> None:
    """Trained weights to score: a checkpoint, an open_clip ``model.pretrained``, or an explicit request."""
    if checkpoint or pretrained or allow_random_model:
        return
    raise ConfigError(
        "no checkpoint= and no model.pretrained=: this would score an untrained, randomly initialised model",
        hint="give checkpoint=PATH (a vlhub or open_clip checkpoint) or model.pretrained=TAG (open_clip weights); "
        "allow_random_model=true scores a random model on purpose",
    )


# The plain keys' types come from the code each is handed to (vlhub.launch.check_config).
PLAIN_KEYS: PlainKeys = {"": [(resolve_device, ""), (require_weights, "")]}


def require_finite(state: dict[str, torch.Tensor], what: str) -> None:
    """Weights with a NaN or an infinity score at chance: refuse them, naming the first such tensor."""
    bad = [key for key, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise ConfigError(
            f"{what}: {len(bad)} weight tensor(s) hold NaN or infinite values ({', '.join(bad[:3])}); "
            "their scores would be meaningless",
            hint="evaluate an earlier checkpoint of the run (checkpoints/step_<N>.pt)",
        )


def _model_config(cfg: DictConfig, checkpoint: dict | None, model_given: bool, model_choice: str) -> dict | None:
    """The model config to build from: the command line's unless a vlhub checkpoint stores one."""
    given: dict = OmegaConf.to_container(cfg.model, resolve=True)  # type: ignore[assignment]
    stored = stored_model_config(checkpoint) if checkpoint is not None else None
    if stored is None:
        return given if model_given or checkpoint is None else None
    initial = dict.fromkeys(PROVENANCE_KEYS)  # where the initial weights came from: not the architecture
    if model_given and {**given, **initial} != {**stored, **initial}:
        log.warning(
            "model=%s differs from the model stored in checkpoint=%s; using the stored one",
            model_choice,
            cfg.checkpoint,
        )
    return None


def evaluate(cfg: DictConfig, run_dir: Path, model_given: bool = True, model_choice: str = "?") -> dict[str, Any]:
    """Build the tasks (checking their data first), load the model, run every task; returns the record."""
    check_config(cfg, PLAIN_KEYS)
    check_device(cfg.device, "device")
    require_weights(cfg.checkpoint, cfg.model.get("pretrained"), cfg.allow_random_model)
    evaluator = build_at(cfg, "eval")  # before the model: a missing dataset folder fails fast
    checkpoint = read_checkpoint(cfg.checkpoint) if cfg.checkpoint else None
    model = build_model(cfg.checkpoint, _model_config(cfg, checkpoint, model_given, model_choice), checkpoint)
    require_finite(model.state_dict(), f"checkpoint={cfg.checkpoint}" if cfg.checkpoint else _weights(cfg))
    device = resolve_device(cfg.device)
    model = model.to(device).eval()
    with weights_from(f"checkpoint={cfg.checkpoint}"):  # a head of the wrong shape names the file
        objective = build_trained_objective(checkpoint, model) if checkpoint is not None else None
    scoring = objective.scoring(model) if objective is not None else default_scoring(model)
    metrics = evaluator.run(model, eval_transform(model), device, run_dir / "eval", scoring)
    run_info = (checkpoint or {}).get("run_info", {})
    record = {
        "checkpoint": str(cfg.checkpoint) if cfg.checkpoint else None,
        "weights": _weights(cfg),
        "step": (checkpoint or {}).get("step"),
        "epoch": (checkpoint or {}).get("epoch"),
        "objective": run_info.get("objective"),
        "model": run_info.get("model", model_choice),
        "scoring": scoring.record(),  # which scoring produced each kind of metric
        **metrics,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    (run_dir / "report.md").write_text(render_report(record, list(evaluator.tasks), run_dir))
    log.info("wrote %s and %s", run_dir / "results.json", run_dir / "report.md")
    if evaluator.tasks and not metrics:  # every task skipped itself: not a success that scored nothing
        raise ConfigError(
            f"eval: none of {', '.join(evaluator.tasks)} produced a metric (the log lines above say why each "
            "was skipped)",
            "objective=ce scores only classes it was trained on (objective.class_names); "
            "eval=probe eval.probe.train=DIR/train eval.probe.test=DIR/val works for every objective",
        )
    return record


def _weights(cfg: DictConfig) -> str:
    if cfg.checkpoint:
        return f"checkpoint {cfg.checkpoint}"
    if cfg.model.get("pretrained"):
        return f"model.pretrained={cfg.model.pretrained}"
    return "random initialisation (allow_random_model=true)"


def _format(value: float) -> str:
    return f"{value:.4f}" if abs(value) <= 1 else f"{value:.2f}"


def render_report(record: dict[str, Any], tasks: list[str], run_dir: Path) -> str:
    """Markdown: what was evaluated, one table of metrics per task, then links to its files."""
    header = {k: v for k, v in record.items() if not isinstance(v, float) or k in ("step", "epoch")}
    lines = ["# Evaluation report", ""]
    lines += [f"- **{key}**: `{value}`" for key, value in header.items()]
    lines += [f"- **written**: {datetime.datetime.now().isoformat(timespec='seconds')}", ""]
    metrics = {k: v for k, v in record.items() if k not in header}
    # Longest task names first, so a task named "imagenet" does not claim "imagenet_v2-..." keys.
    owners = sorted(tasks, key=len, reverse=True)
    for task in tasks:
        mine = {k: v for k, v in metrics.items() if next((t for t in owners if k.startswith(f"{t}-")), None) == task}
        lines += [f"## {task}", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {key.removeprefix(task + '-')} | {_format(value)} |" for key, value in mine.items()]
        lines += ["", *_file_links(run_dir, task)]
    return "\n".join(lines).rstrip() + "\n"


def _file_links(run_dir: Path, task: str) -> list[str]:
    folder = run_dir / "eval" / task
    if not folder.is_dir():
        return []
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    links = [f"![{p.name}]({p.relative_to(run_dir).as_posix()})" for p in files if p.suffix in PLOT_SUFFIXES]
    links += [f"- [{p.name}]({p.relative_to(run_dir).as_posix()})" for p in files if p.suffix in TABLE_SUFFIXES]
    return [*links, ""] if links else []


@hydra.main(config_path="pkg://vlhub.configs", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    given = any(o.lstrip("+~").split("=")[0].split(".")[0] == "model" for o in hydra_cfg.overrides.task)
    with errors_reported():  # an expected mistake: one line and a hint, no traceback
        evaluate(cfg, Path(hydra_cfg.runtime.output_dir), given, hydra_cfg.runtime.choices.get("model", "?"))


if __name__ == "__main__":
    main()
