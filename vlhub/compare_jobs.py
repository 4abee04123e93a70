"""The jobs under a folder, as ``python -m vlhub.compare`` reads them: what each ran and what it scored.

A job is a folder holding ``results.jsonl``, ``config.yaml`` (the resolved config that trained it,
written by vlhub/run/resume.py) or Hydra's ``.hydra/``. Its final record is the last
evaluation record of ``results.jsonl``; ``run.json`` lists each launch's code revision, torch
release, device and number of ranks (vlhub/run/identity.py), compared as ``env.*`` keys.

Swept keys are those given several values in a sweep's ``multirun.yaml`` (``hydra.sweeper.params``
and the command line, ``hydra.overrides.task``); a group (``augment``) covers every key under it.
Any other key that differs between jobs is a confound, except ``objective.*`` (the objective's own
settings), ``trainer.seed`` (jobs that differ only in it are seeds of one group) and keys that
cannot change a result (``IGNORED``). Bad input is one note naming the job folder, never a stop.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from vlhub.run.config_changes import flatten

SEED = "trainer.seed"
# Keys that cannot change what a job scores: never a confound.
IGNORED = ("logger.", "checkpoint.", "run.name", "trainer.log_every_n_steps")
# Record keys that describe the run rather than measure it.
RUN_INFO_KEYS = ("step", "epoch", "objective", "model", "overrides", "event", "changes")
COST_KEYS = ("train/samples_seen", "train/wall_seconds", "train/flops_per_sample")
_MISSING = "(not recorded)"


@dataclass
class Job:
    """One job: its folder (relative to RUNS_DIR), final record and what it ran with."""

    name: str
    folder: Path
    overrides: dict[str, str]
    step: int | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)
    final: bool = True  # False when results.jsonl ends in a torn line or before trainer.max_steps
    config: dict[str, str] | None = None  # flattened config.yaml and env.*, each value as JSON text
    swept: dict[str, str] = field(default_factory=dict)  # the swept values shown for the job
    confounds: list[str] = field(default_factory=list)  # keys where this job differs from the others

    def has_results(self) -> bool:
        return self.step is not None


def natural(text: str) -> list[Any]:
    """Sort key that puts job 10 after job 9."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _override_key(item: str) -> tuple[str, str]:
    key, _, value = item.partition("=")
    return key.lstrip("+~"), value


def read_results(path: Path, notes: list[str]) -> tuple[dict[str, Any] | None, bool]:
    """The last evaluation record of a ``results.jsonl`` and whether its last line was whole.

    A torn or non-object line is skipped with one note naming the file and line."""
    record, whole = None, True
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            parsed = json.loads(line)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            notes.append(f"{path} line {number}: not a JSON object (a torn write?), skipped")
            whole = False
            continue
        whole = True
        if "event" not in parsed:  # "config_changed" and other events are not evaluations
            record = parsed
    return record, whole


def _environment(folder: Path) -> dict[str, Any]:
    """``env.*`` keys from ``run.json``: each launch's value, joined with `` + `` when they differ."""
    try:
        launches = json.loads((folder / "run.json").read_text()).get("launches") or []
    except (OSError, ValueError, AttributeError):
        return {}
    values: dict[str, list[str]] = {}
    for launch in launches if isinstance(launches, list) else []:
        for key, value in launch.items() if isinstance(launch, dict) else ():
            if key != "step" and str(value) not in values.setdefault(f"env.{key}", []):
                values[f"env.{key}"].append(str(value))
    return {key: " + ".join(found) for key, found in values.items()}


def read_job(folder: Path, runs_dir: Path, notes: list[str]) -> Job:
    name = str(folder.relative_to(runs_dir)) if folder != runs_dir else runs_dir.name
    overrides: list[str] = []
    hydra_overrides = folder / ".hydra" / "overrides.yaml"
    if hydra_overrides.is_file():
        overrides = list(yaml.safe_load(hydra_overrides.read_text()) or [])
    job = Job(name, folder, {})
    if (folder / "config.yaml").is_file():
        config = yaml.safe_load((folder / "config.yaml").read_text()) or {}
        flat = {**flatten(config), **_environment(folder)}
        job.config = {key: json.dumps(value, sort_keys=True) for key, value in flat.items()}
    results = folder / "results.jsonl"
    if not results.is_file():
        notes.append(f"job {name}: no results.jsonl (failed or not evaluated yet)")
    else:
        record, whole = read_results(results, notes)
        if record is None:
            notes.append(f"job {name}: results.jsonl holds no evaluation record")
        else:
            overrides = list(record.get("overrides") or overrides)
            job.step = int(record.get("step") or 0)
            job.metrics = {
                k: v
                for k, v in record.items()
                if k not in RUN_INFO_KEYS and (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)))
            }
            max_steps = json.loads((job.config or {}).get("trainer.max_steps", "null"))
            job.final = whole and not (isinstance(max_steps, int) and job.step < max_steps)
    job.overrides = dict(_override_key(item) for item in overrides)
    if job.config is None and job.has_results():
        notes.append(f"job {name}: no config.yaml, so its config is not compared")
    return job


def find_jobs(runs_dir: Path, notes: list[str]) -> list[Job]:
    """Every job folder under ``runs_dir`` in folder order (a previous run moved aside is not one)."""
    markers = [*runs_dir.rglob("results.jsonl"), *runs_dir.rglob("config.yaml"), *runs_dir.rglob(".hydra")]
    folders = {p.parent for p in markers if p.name != "config.yaml" or p.parent.name != ".hydra"}
    folders = {f for f in folders if not any(part.startswith("moved_") for part in f.relative_to(runs_dir).parts)}
    ordered = sorted(folders, key=lambda f: natural(str(f.relative_to(runs_dir))))
    return [read_job(folder, runs_dir, notes) for folder in ordered]


# -- what was swept ------------------------------------------------------------------------------------
def _several(overrides: list[str]) -> set[str]:
    """The keys given several values by these overrides (the last value given for a key wins)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = {o.key_or_group: o for o in OverridesParser.create().parse_overrides(overrides)}
    return {key for key, o in parsed.items() if o.is_sweep_override() and len(list(o.sweep_string_iterator())) > 1}


def _resolved(value: Any) -> Any:
    """A sweeper value as the sweep read it: Hydra stores ``${vlhub_objectives:}`` unresolved."""
    if isinstance(value, str) and "${" in value:
        import vlhub.config_resolvers  # noqa: F401  (registers the resolvers the presets use)

        return OmegaConf.create({"value": value}).value
    return value


def swept_keys(sweep_file: Path, notes: list[str]) -> set[str]:
    """The keys a sweep's ``multirun.yaml`` gives several values: sweeper params, then the command line."""
    try:
        hydra_cfg = (yaml.safe_load(sweep_file.read_text()) or {}).get("hydra", {})
        params = (hydra_cfg.get("sweeper") or {}).get("params") or {}
        overrides = [f"{key}={_resolved(value)}" for key, value in params.items()]
        overrides += list((hydra_cfg.get("overrides") or {}).get("task") or [])
        return _several(overrides)
    except Exception as error:  # an unreadable sweep record: say so, compare the rest
        notes.append(f"{sweep_file}: cannot read the sweep's parameters ({type(error).__name__}: {error})")
        return set()


def sweep_of(job: Job, runs_dir: Path) -> Path | None:
    """The ``multirun.yaml`` of the sweep a job belongs to: the nearest one above it, within RUNS_DIR."""
    for folder in (job.folder, *job.folder.parents):
        if (folder / "multirun.yaml").is_file():
            return folder / "multirun.yaml"
        if folder == runs_dir:
            return None
    return None


def _covered(key: str, prefixes: set[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def fill_swept(jobs: list[Job], runs_dir: Path, notes: list[str]) -> set[str]:
    """Each job's swept values; returns every swept key. A swept key a job lacks is a note."""
    by_sweep: dict[Path, set[str]] = {}
    every: set[str] = set()
    for job in jobs:
        sweep = sweep_of(job, runs_dir)
        if sweep is not None and sweep not in by_sweep:
            by_sweep[sweep] = swept_keys(sweep, notes)
        keys = by_sweep.get(sweep, set()) if sweep is not None else set()
        every |= keys
        for key in sorted(keys):
            flat = job.config or {}
            if key in job.overrides:
                job.swept[key] = job.overrides[key]
            elif key in flat:
                job.swept[key] = str(json.loads(flat[key]))
            elif job.config is not None and any(k.startswith(key + ".") for k in flat):
                job.swept[key] = "(from its config)"
            else:
                notes.append(f"job {job.name}: swept key {key} not found in its config or overrides")
    return every


# -- what differs --------------------------------------------------------------------------------------
def differing_keys(jobs: list[Job]) -> list[str]:
    """Config and env keys whose value is not the same in every job that has a config."""
    configs = [job.config for job in jobs if job.config is not None]
    keys = sorted({key for config in configs for key in config})
    return [key for key in keys if len({config.get(key, _MISSING) for config in configs}) > 1]


def confound_keys(jobs: list[Job], swept: set[str]) -> list[str]:
    """The differing keys that no sweep explains: not swept, not objective.*, not the seed, not ignored."""
    return [
        key
        for key in differing_keys(jobs)
        if not _covered(key, swept | {"objective", SEED}) and not key.startswith(IGNORED)
    ]


def value_of(job: Job, key: str) -> str:
    """A job's value of a config key as shown in the report."""
    text = (job.config or {}).get(key)
    if text is None:
        return _MISSING
    value = json.loads(text)
    return value if isinstance(value, str) else json.dumps(value)


def mark_confounds(jobs: list[Job], keys: list[str]) -> None:
    """For each confound key, the jobs off its most common value (every job when none is most common)."""
    compared = [job for job in jobs if job.config is not None]
    for key in keys:
        counts = Counter(value_of(job, key) for job in compared).most_common()
        mode = counts[0][0] if len(counts) == 1 or counts[0][1] > counts[1][1] else None
        for job in compared:
            if value_of(job, key) != mode:
                job.confounds.append(key)


def confound_lines(jobs: list[Job], keys: list[str]) -> list[str]:
    """One line per confound key: each value and the jobs that ran with it."""
    lines = []
    for key in keys:
        holders: dict[str, list[str]] = {}
        for job in jobs:
            if job.config is not None:
                holders.setdefault(value_of(job, key), []).append(job.name)
        shown = "; ".join(f"{value} (job{'s' if len(n) > 1 else ''} {', '.join(n)})" for value, n in holders.items())
        lines.append(f"`{key}`: {shown}")
    return lines
