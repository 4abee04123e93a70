"""The documentation: the site builds with ``--strict`` (a broken link, a page left out of the nav or an
API object that does not resolve fails), and every command block marked ``<!-- cpu-test -->`` runs."""

from __future__ import annotations

import importlib.util
import itertools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.cli import run_module

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- cpu-test -->"  # alone on the line before a fenced block
# What every marked vlhub.train line gets unless it sets the key itself: 2 steps, small everything.
TINY_TRAIN = {
    "trainer.max_steps": "2",
    "trainer.batch_size": "8",
    "trainer.log_every_n_steps": "1",
    "data.workers": "0",
    "eval.workers": "0",
    "eval.batch_size": "64",
    "logger.tensorboard": "false",
    "optim.warmup_steps": "1",
}
RUN_NUMBERS = itertools.count()
TINY_EVALUATE = {"eval.workers": "0", "eval.batch_size": "64"}


def pages_in_nav_order() -> list[Path]:
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    return [ROOT / "docs" / next(iter(entry.values())) for entry in nav]


def marked_commands() -> list[tuple[str, str]]:
    """(page, command) for each command line of each marked block; ``\\`` continues a line."""
    commands = []
    for page in pages_in_nav_order():
        text = page.read_text()
        for block in re.split(rf"^{re.escape(MARKER)}$", text, flags=re.MULTILINE)[1:]:
            body = block.split("```", 2)[1].split("\n", 1)[1]  # the fence's language tag dropped
            for line in body.replace("\\\n", " ").splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    commands.append((page.name, line))
    return commands


def with_tiny_settings(args: list[str], tiny: dict[str, str]) -> list[str]:
    given = {arg.split("=", 1)[0].lstrip("+~") for arg in args if "=" in arg}
    extra = [f"{key}={value}" for key, value in tiny.items() if key not in given]
    synthetic_eval = all(not a.startswith("eval=") or a == "eval=synthetic" for a in args) and not any(
        a.startswith("data=") and a != "data=synthetic" and not any(b == "eval=synthetic" for b in args) for a in args
    )
    if synthetic_eval and "eval.synthetic.num_samples" not in given:
        extra.append("eval.synthetic.num_samples=60")
    return args + extra


def run_command(line: str, page: str) -> None:
    """Run one documented command in this process (``python -m MODULE`` or ``python -c CODE``)."""
    words = shlex.split(line, comments=True)
    assert words[0] == "python", f"only python commands are run here: {line}"
    if words[1] == "-c":
        exec(compile(words[2], "<docs>", "exec"), {"__name__": "__main__"})  # noqa: S102
        return
    assert words[1] == "-m", line
    module, args = words[2], words[3:]
    if module == "vlhub.train" and "--help" not in args:
        args = with_tiny_settings(args, TINY_TRAIN)
        if not any(arg.startswith(("run.name=", "hydra.run.dir=")) for arg in args):
            # Runs named by the second they start would share a folder when two start in one second.
            args.append(f"hydra.run.dir=runs/docs_{next(RUN_NUMBERS)}")
    elif module == "vlhub.evaluate":
        args = with_tiny_settings(args, TINY_EVALUATE)
    code = run_module(module, args)
    assert code in (0, None), f"docs/{page}: {line!r} exited with {code}"


def test_the_site_builds_strictly(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        pytest.skip("mkdocs and mkdocstrings are not installed (pip install -e '.[dev]' installs them)")
    # Not -q: mkdocs' quiet mode hides the warnings that --strict counts (a broken link would pass).
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    api = (tmp_path / "site/api/index.html").read_text()
    # mkdocstrings read the docstrings: the interfaces' methods and the registries are on the page.
    assert all(name in api for name in ("represent", "after_step", "TowerOutput", "LoadedModel", "OBJECTIVES"))


def test_every_page_is_in_the_nav_and_the_readme_links_resolve():
    pages = {path.name for path in (ROOT / "docs").glob("*.md")}
    assert pages == {path.name for path in pages_in_nav_order()}
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / target).is_file(), target


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy re-runs vlhub.train as __main__
def test_the_docs_cpu_commands_run(tmp_path, monkeypatch):
    commands = marked_commands()
    assert {page for page, _ in commands} >= {"index.md", "data.md", "evaluation.md", "runs.md", "recipes.md"}
    monkeypatch.chdir(tmp_path)  # one folder for all, in nav order: a later block may use an earlier run
    for page, line in commands:
        run_command(line, page)
    assert (tmp_path / "runs/my_run/checkpoints/latest.pt").is_file()
    records = (tmp_path / "runs/my_run/results.jsonl").read_text().splitlines()
    assert '"step": 4' in records[-1]  # the resumed run went on from 2 to 4


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
def test_help_puts_checkpoint_first_and_describes_each_plain_key_from_its_yaml(capsys):
    for module in ("vlhub.evaluate", "vlhub.train"):
        run_command(f"python -m {module} --help", "help")
    evaluate_help, train_help = capsys.readouterr().out.split("python -m vlhub.train", 1)
    assert evaluate_help.splitlines()[0].startswith("python -m vlhub.evaluate checkpoint=PATH")
    groups = evaluate_help.split("== Config groups")[1].split("==")[1].strip().splitlines()
    assert [line.split()[0] for line in groups] == ["eval", "model"]  # not the training-only groups
    for name, text in (("evaluate", evaluate_help), ("train", train_help)):
        # Each plain key with its comment, as the YAML says it (one place), e.g. trainer.batch_size's "per rank".
        yaml_lines = (ROOT / "configs" / f"{name}.yaml").read_text().splitlines()
        keys = text.split("== Plain keys")[1].split("==")[1]
        for line in yaml_lines:
            if "#" in line and line.startswith(("checkpoint:", "device:", "  batch_size:", "  resume:")):
                assert line in keys.splitlines(), line
