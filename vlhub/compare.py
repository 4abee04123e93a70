"""``python -m vlhub.compare RUNS_DIR``: one table and one chart for the jobs of a sweep.

Every ``results.jsonl`` under RUNS_DIR (searched recursively, one per job folder) gives its
last record, the job's final metrics. ``RUNS_DIR/comparison.md`` has one row per job: the
swept values (the command-line overrides, recorded in each record's ``"overrides"``, that
differ between jobs), the step, and every final metric (blank where a job lacks one).
``RUNS_DIR/comparison.png`` draws each job's headline metric: zero-shot top-1 where the job
has it, else linear-probe top-1, else its own classifier's top-1, each bar saying which.

python -m vlhub.train -m +experiment=compare_objectives hydra.sweep.dir=runs/compare
python -m vlhub.compare runs/compare
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The record's run information: read for the row's label and step, not shown as metrics.
RUN_INFO_KEYS = ("step", "epoch", "objective", "model", "overrides")
# How each job is headlined, in order of preference: (metric key suffix, what the chart calls it).
HEADLINES = (("-zeroshot-top1", "zero-shot top-1"), ("-linear_probe-top1", "linear-probe top-1"),
             ("-classifier-top1", "classifier top-1"))  # fmt: skip


@dataclass
class JobResult:
    """One job's final record: its folder (relative to RUNS_DIR), overrides, step and metrics."""

    name: str
    overrides: dict[str, str]
    step: int | None
    metrics: dict[str, float]
    swept: dict[str, str] = field(default_factory=dict)

    def headline(self) -> tuple[str, str] | None:
        """(metric key, what it is) of the job's headline metric, or None when it has none."""
        for suffix, label in HEADLINES:
            key = next((k for k in self.metrics if k.endswith(suffix)), None)
            if key is not None:
                return key, label
        return None

    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.swept.items()) or self.name


def _natural(text: str) -> list[Any]:
    """Sort key that puts job 10 after job 9."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def read_job(path: Path, runs_dir: Path) -> JobResult | None:
    """The last record of one ``results.jsonl``; None when the file holds no record."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        return None
    record = json.loads(lines[-1])
    overrides = dict(item.split("=", 1) if "=" in item else (item, "") for item in record.get("overrides", []))
    metrics = {
        k: v
        for k, v in record.items()
        if k not in RUN_INFO_KEYS and (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)))
    }
    name = str(path.parent.relative_to(runs_dir)) if path.parent != runs_dir else runs_dir.name
    return JobResult(name, overrides, record.get("step"), metrics)


def list_jobs(runs_dir: Path) -> list[JobResult]:
    """Every job under ``runs_dir`` with a result, in folder order; swept values filled in."""
    if not runs_dir.is_dir():
        raise SystemExit(f"vlhub.compare: {runs_dir} is not a folder")
    paths = sorted(runs_dir.rglob("results.jsonl"), key=lambda p: _natural(str(p.relative_to(runs_dir))))
    jobs = [job for job in (read_job(p, runs_dir) for p in paths) if job is not None]
    if not jobs:
        raise SystemExit(f"vlhub.compare: no results.jsonl with a record under {runs_dir}")
    keys = list(dict.fromkeys(k for job in jobs for k in job.overrides))
    swept = [k for k in keys if len(jobs) == 1 or len({job.overrides.get(k) for job in jobs}) > 1]
    for job in jobs:
        job.swept = {k: job.overrides.get(k, "") for k in swept}
    return jobs


def jobs_without_results(runs_dir: Path) -> list[str]:
    """Job folders (those Hydra wrote ``.hydra/`` into) that left no result: failed or unfinished."""
    folders = [d.parent for d in runs_dir.rglob(".hydra") if not (d.parent / "results.jsonl").is_file()]
    return sorted((str(folder.relative_to(runs_dir)) for folder in folders), key=_natural)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def comparison_table(jobs: list[JobResult]) -> str:
    """The markdown table: job, swept values, step, headline, then the union of final metrics."""
    swept = list(jobs[0].swept)
    metrics = list(dict.fromkeys(k for job in jobs for k in job.metrics))
    header = ["job", *swept, "step", "headline", *metrics]
    rows = []
    for job in jobs:
        headline = job.headline()
        value = job.metrics[headline[0]] if headline else None
        shown = f"{value:.4g} ({headline[1]})" if headline and value is not None else ""
        cells = [_cell(job.metrics.get(k)) for k in metrics]
        rows.append([job.name, *job.swept.values(), _cell(job.step), shown, *cells])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def default_chance(jobs: list[JobResult]) -> float | None:
    """Chance top-1 when every headline is on the generated shapes (their class count), else None."""
    keys = [h[0] for job in jobs if (h := job.headline()) is not None]
    if not keys or not all(k.startswith("synthetic-") for k in keys):
        return None
    from vlhub.data.synthetic import class_names

    return 1.0 / len(class_names())


def _task(key: str, label: str) -> str:
    """The evaluation task of a headline key: ``synthetic`` of ``synthetic-zeroshot-top1``."""
    suffix = next(suffix for suffix, name in HEADLINES if name == label)
    return key[: -len(suffix)]


def plot_headlines(path: Path, jobs: list[JobResult], chance: float | None, title: str) -> None:
    """Horizontal bars, one per job with a headline metric, coloured and labelled by which metric it is."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window, never need a display
    import matplotlib.pyplot as plt

    shown = [(job, h) for job in jobs if (h := job.headline()) is not None and job.metrics[h[0]] is not None]
    colours = {label: f"C{i}" for i, (_, label) in enumerate(HEADLINES)}
    fig, ax = plt.subplots(figsize=(9, 1.6 + 0.45 * max(1, len(shown))), dpi=110)
    for row, (job, (key, label)) in enumerate(shown):
        value = job.metrics[key]
        ax.barh(row, value, color=colours[label], label=label)
        ax.text(value, row, f" {value:.3f}", va="center", fontsize=8)
    ticks = [f"{job.label()}\n({label}, {_task(key, label)})" for job, (key, label) in shown]
    ax.set_yticks(range(len(shown)), ticks, fontsize=8)
    ax.invert_yaxis()  # first job on top
    if chance is not None:
        ax.axvline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance ({chance:.3f})")
    top = max([job.metrics[key] for job, (key, _) in shown] + [chance or 0.0, 0.0])
    ax.set_xlim(0, min(1.0, top * 1.15) if top > 0 else 1.0)
    ax.set_xlabel("top-1 accuracy (final evaluation)")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=4)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_comparison(runs_dir: Path, chance: float | None = None) -> tuple[Path, Path]:
    """Write ``comparison.md`` and ``comparison.png`` into ``runs_dir``; returns their paths."""
    jobs = list_jobs(runs_dir)
    chance = chance if chance is not None else default_chance(jobs)
    text = f"# Comparison of {len(jobs)} jobs under {runs_dir}\n\n" + comparison_table(jobs)
    missing = jobs_without_results(runs_dir)
    if missing:
        text += "\nJobs without results (failed or unfinished): " + ", ".join(missing) + "\n"
    table_path, chart_path = runs_dir / "comparison.md", runs_dir / "comparison.png"
    table_path.write_text(text)
    plot_headlines(chart_path, jobs, chance, f"Headline metric per job ({runs_dir.name})")
    return table_path, chart_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vlhub.compare", description=__doc__.split("\n\n")[1])
    parser.add_argument("runs_dir", type=Path, help="a sweep's folder: every results.jsonl below it is one job")
    parser.add_argument("--chance", type=float, default=None, help="chance top-1 to draw (default: 1/30 on synthetic)")
    args = parser.parse_args(argv)
    table_path, chart_path = write_comparison(args.runs_dir, args.chance)
    print(f"wrote {table_path}")
    print(f"wrote {chart_path}")


if __name__ == "__main__":
    main()
