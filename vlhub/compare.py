"""``python -m vlhub.compare RUNS_DIR``: what differs between the jobs of a sweep, and what they scored.

``RUNS_DIR/comparison.md`` starts with the notes on bad input (one line each, naming the job
folder), the swept keys, the confounds (keys outside ``objective.*`` that differ between jobs and
no sweep explains, ``env.*`` included: vlhub/compare_jobs.py) and the values every job shares.
Then one row per group of jobs that differ only in ``trainer.seed``: the headline metric's mean
+- standard deviation over the seeds, and which other groups it is within noise of (Welch's
two-sample t-test, two-sided p > 0.05). Then one row per job: its swept values, step, headline,
samples seen, training time, training FLOPs per sample and every final metric.
``RUNS_DIR/comparison.png`` draws each group's mean with its standard deviation as an error bar
and each seed as a dot; confounded groups are hatched and named.

python -m vlhub.train -m +experiment=compare_objectives hydra.sweep.dir=runs/compare
python -m vlhub.compare runs/compare
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlhub.compare_jobs import (
    COST_KEYS,
    SEED,
    Job,
    confound_keys,
    confound_lines,
    fill_swept,
    find_jobs,
    mark_confounds,
    value_of,
)

# How each job is headlined, in order of preference: (metric key suffix, what the chart calls it).
HEADLINES = (("-zeroshot-top1", "zero-shot top-1"), ("-linear_probe-top1", "linear-probe top-1"),
             ("-classifier-top1", "classifier top-1"))  # fmt: skip
NOISE_P = 0.05  # two groups are within noise when Welch's test cannot tell them apart at this level
NOISE_RULE = f"Welch's two-sample t-test on the seeds' headline values, two-sided p > {NOISE_P}"


def headline(job: Job) -> tuple[str, str] | None:
    """(metric key, what it is) of the job's headline metric, or None when it has none."""
    for suffix, label in HEADLINES:
        key = next((k for k in job.metrics if k.endswith(suffix) and job.metrics[k] is not None), None)
        if key is not None:
            return key, label
    return None


def job_label(job: Job, keys: list[str]) -> str:
    return " ".join(f"{k}={job.swept[k]}" for k in keys if k in job.swept) or job.name


@dataclass
class Group:
    """Jobs that differ only in the seed, and their headline's statistics."""

    label: str
    jobs: list[Job]
    metric: tuple[str, str] | None = None
    values: list[float] = field(default_factory=list)
    within_noise: list[int] = field(default_factory=list)  # numbers of the groups within noise of this one

    @property
    def mean(self) -> float | None:
        return sum(self.values) / len(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation (n - 1), None with fewer than two seeds."""
        if len(self.values) < 2:
            return None
        mean = self.mean or 0.0
        return math.sqrt(sum((v - mean) ** 2 for v in self.values) / (len(self.values) - 1))

    @property
    def confounds(self) -> list[str]:
        return short_keys(list(dict.fromkeys(k for job in self.jobs for k in job.confounds)))


def short_keys(keys: list[str]) -> list[str]:
    """Keys as shown in a cell: several under one node (``augment.scale``, ``augment.jitter``) as ``augment.*``."""
    nodes = [key.split(".")[0] for key in keys]
    return list(dict.fromkeys(f"{n}.*" if nodes.count(n) > 1 else k for n, k in zip(nodes, keys)))


def welch_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided p of Welch's t-test; None with fewer than two values on a side."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy import stats

    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1) / len(a)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1) / len(b)
    if va + vb == 0:  # no spread at all: equal means are the same, any difference is not noise
        return 1.0 if ma == mb else 0.0
    t = (ma - mb) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return float(2 * stats.t.sf(abs(t), df))


def seed_groups(jobs: list[Job], swept: list[str], confounds: list[str]) -> list[Group]:
    """Jobs grouped by everything but the seed (swept values, confound values, objective settings)."""
    shown = [k for k in swept if k != SEED]
    groups: dict[tuple, Group] = {}
    for job in jobs:
        if not job.has_results():
            continue
        key = tuple(job.swept.get(k) for k in shown) + tuple(value_of(job, k) for k in confounds)
        key += tuple(sorted((k, v) for k, v in (job.config or {}).items() if k.startswith("objective.")))
        if key not in groups:
            groups[key] = Group(job_label(job, shown), [])
        groups[key].jobs.append(job)
    labels = Counter(g.label for g in groups.values())
    for g in groups.values():  # groups told apart only by a confound say which
        if labels[g.label] > 1:
            g.label += " [" + ", ".join(f"{k}={value_of(g.jobs[0], k)}" for k in confounds) + "]"
    for group in groups.values():
        group.metric = next((h for job in group.jobs if (h := headline(job)) is not None), None)
        if group.metric is not None:
            values = (job.metrics.get(group.metric[0]) for job in group.jobs)
            group.values = [float(v) for v in values if v is not None]
    ranked = sorted(groups.values(), key=lambda g: -(g.mean if g.mean is not None else -math.inf))
    for i, a in enumerate(ranked):
        for j, b in enumerate(ranked):
            p = welch_p(a.values, b.values) if i != j and a.metric == b.metric else None
            if p is not None and p > NOISE_P:
                a.within_noise.append(j + 1)
    return ranked


# -- the markdown --------------------------------------------------------------------------------------
def _cell(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]


def _step_cell(job: Job) -> str:
    return _cell(job.step) if job.final else f"not final (step {job.step})"


def _headline_cell(job: Job) -> str:
    found = headline(job)
    return f"{job.metrics[found[0]]:.4g} ({found[1]})" if found else ""


def job_rows(jobs: list[Job], swept: list[str]) -> tuple[list[str], list[list[str]], list[str]]:
    """The jobs table's header and rows, and ``key=value`` for each column equal in every row (moved out)."""
    metrics = list(dict.fromkeys(k for job in jobs for k in job.metrics if k not in COST_KEYS))
    header = ["job", *swept, "step", "headline", "samples seen", "train s", "FLOPs/sample", "confound", *metrics]
    rows = []
    for job in jobs:
        cost = [job.metrics.get(k) for k in COST_KEYS]
        cells = [_cell(cost[0]), _cell(cost[1], 3), _cell(cost[2], 3), ", ".join(short_keys(job.confounds))]
        cells += [_cell(job.metrics.get(k)) for k in metrics]
        rows.append([job.name, *(job.swept.get(k, "") for k in swept), _step_cell(job), _headline_cell(job), *cells])
    if len(rows) < 2:
        return header, rows, []
    same = [i for i in range(1, len(header)) if len({row[i] for row in rows}) == 1]
    same = [i for i in same if header[i] != "confound" or not rows[0][i]]  # a confound stays in every row
    shared = [f"{header[i]}={rows[0][i] or '(none)'}" for i in same if header[i] != "confound"]
    keep = [i for i in range(len(header)) if i not in same]
    return [header[i] for i in keep], [[row[i] for i in keep] for row in rows], shared


def group_rows(groups: list[Group]) -> list[list[str]]:
    rows = []
    for number, group in enumerate(groups, start=1):
        mean, std = group.mean, group.std
        shown = "" if mean is None else f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")
        flops = [job.metrics.get("train/flops_per_sample") for job in group.jobs]
        wall = [v for job in group.jobs if (v := job.metrics.get("train/wall_seconds")) is not None]
        rows.append(
            [
                str(number),
                group.label,
                str(len(group.values)),
                shown,
                group.metric[1] if group.metric else "",
                ", ".join(f"#{n}" for n in group.within_noise),
                _cell(flops[0], 3),
                _cell(sum(wall) / len(wall), 3) if wall else "",
                ", ".join(group.confounds),
            ]
        )
    return rows


def report_text(runs_dir: Path, jobs: list[Job], groups: list[Group], swept: list[str], confounds: list[str],
                notes: list[str]) -> str:  # fmt: skip
    scored = [job for job in jobs if job.has_results()]
    lines = [f"# Comparison of {len(scored)} jobs in {len(groups)} groups under {runs_dir}", ""]
    lines += [f"- {note}" for note in notes] + ([""] if notes else [])
    lines.append("**Swept:** " + (", ".join(f"`{k}`" for k in swept) or "nothing (no multirun.yaml)"))
    if confounds:
        lines.append("**Confounds** (differ between jobs, not swept; marked in the tables and the chart):")
        lines += [f"- {line}" for line in confound_lines(jobs, confounds)]
    else:
        lines.append("**Confounds:** none (every key outside `objective.*` that differs between jobs is swept)")
    if not scored:
        return "\n".join(lines) + "\n"
    header, rows, shared = job_rows(scored, swept)
    if shared:
        lines.append("**Same for every job:** " + ", ".join(shared))
    lines += ["", f"## Groups: jobs that differ only in `{SEED}` (mean ± standard deviation over seeds)", ""]
    lines.append(f"Within noise: {NOISE_RULE}; a group with one seed has no noise estimate.")
    lines.append("")
    header_g = ["#", "group", "seeds", "headline", "metric", "within noise of", "FLOPs/sample", "train s", "confound"]
    lines += _table(header_g, group_rows(groups))
    lines += ["", "## Jobs", ""] + _table(header, rows)
    return "\n".join(lines) + "\n"


# -- the chart ----------------------------------------------------------------------------------------
def default_chance(groups: list[Group]) -> float | None:
    """Chance top-1 when every headline is on the generated shapes (their class count), else None."""
    keys = [g.metric[0] for g in groups if g.metric is not None]
    if not keys or not all(k.startswith("synthetic-") for k in keys):
        return None
    from vlhub.data.synthetic import class_names

    return 1.0 / len(class_names())


def draw_chart(groups: list[Group], chance: float | None, title: str) -> Any:
    """Horizontal bars: each group's mean, its standard deviation as an error bar, each seed a dot.
    Labels are wrapped, never cut (constrained layout), and the legend sits below the axes."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window, never need a display
    import matplotlib.pyplot as plt

    shown = [g for g in groups if g.values]
    colours = {label: f"C{i}" for i, (_, label) in enumerate(HEADLINES)}
    ticks = []
    for g in shown:
        tick = textwrap.fill(g.label, 42) + f"\n({g.metric[1]}, n={len(g.values)})"
        ticks.append(tick + ("\nconfound: " + textwrap.fill(", ".join(g.confounds), 42) if g.confounds else ""))
    height = 1.8 + sum(0.22 * (t.count("\n") + 1) + 0.15 for t in ticks)
    fig, ax = plt.subplots(figsize=(10, height), dpi=110, layout="constrained")
    for row, g in enumerate(shown):
        confounded = bool(g.confounds)
        ax.barh(row, g.mean, xerr=g.std or 0.0, color=colours[g.metric[1]], label=g.metric[1], capsize=3,
                hatch="//" if confounded else None, edgecolor="black" if confounded else None)  # fmt: skip
        ax.plot(g.values, [row] * len(g.values), "o", color="black", markersize=3, label="one seed")
        ax.text(g.mean + (g.std or 0.0), row, f" {g.mean:.3f}", va="center", fontsize=8)
    ax.set_yticks(range(len(shown)), ticks, fontsize=8)
    ax.invert_yaxis()  # best group on top
    if chance is not None:
        ax.axvline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance ({chance:.3f})")
    top = max([max(g.values) for g in shown] + [g.mean + (g.std or 0) for g in shown] + [chance or 0.0, 0.0])
    ax.set_xlim(0, min(1.0, top * 1.2) if top > 0 else 1.0)
    ax.set_xlabel("top-1 accuracy (final evaluation): mean ± std over seeds; hatched: confounded")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    fig.legend(unique.values(), unique.keys(), fontsize=8, loc="outside lower center", ncol=5)
    ax.set_title(title, fontsize=10)
    return fig


@dataclass
class Comparison:
    """What ``vlhub.compare`` found under a folder: the jobs, their groups and the report's text."""

    jobs: list[Job]
    groups: list[Group]
    swept: list[str]
    confounds: list[str]
    notes: list[str]
    text: str


def compare_folder(runs_dir: Path) -> Comparison:
    """Read every job under ``runs_dir``; bad input becomes notes (one line each), never a stop."""
    if not runs_dir.is_dir():
        raise SystemExit(f"vlhub.compare: {runs_dir} is not a folder")
    notes: list[str] = []
    jobs = find_jobs(runs_dir, notes)
    if not jobs:
        notes.append(f"{runs_dir}: no jobs (no folder below it holds results.jsonl, config.yaml or .hydra/)")
    swept_set = fill_swept(jobs, runs_dir, notes)
    swept = sorted(swept_set, key=lambda k: (k == SEED, k))
    confounds = confound_keys(jobs, swept_set)
    mark_confounds(jobs, confounds)
    groups = seed_groups(jobs, swept, confounds)
    text = report_text(runs_dir, jobs, groups, swept, confounds, notes)
    return Comparison(jobs, groups, swept, confounds, notes, text)


def write_comparison(runs_dir: Path, chance: float | None = None) -> tuple[Path, Path | None]:
    """Write ``comparison.md`` (and ``comparison.png`` when a group has a headline) into ``runs_dir``."""
    found = compare_folder(runs_dir)
    for note in found.notes:
        print(f"vlhub.compare: {note}", file=sys.stderr)
    table_path, chart_path = runs_dir / "comparison.md", runs_dir / "comparison.png"
    table_path.write_text(found.text)
    if not any(g.values for g in found.groups):
        return table_path, None
    chance = chance if chance is not None else default_chance(found.groups)
    fig = draw_chart(found.groups, chance, f"Headline metric per group ({runs_dir.name})")
    fig.savefig(chart_path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return table_path, chart_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vlhub.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", type=Path, help="a sweep's folder: every job folder below it is compared")
    parser.add_argument("--chance", type=float, default=None, help="chance top-1 to draw (default: 1/30 on synthetic)")
    args = parser.parse_args(argv)
    table_path, chart_path = write_comparison(args.runs_dir, args.chance)
    print(f"wrote {table_path}")
    print(f"wrote {chart_path}" if chart_path else "no chart: no job has a headline metric")


if __name__ == "__main__":
    main()
