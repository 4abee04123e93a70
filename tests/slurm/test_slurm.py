"""Opt-in: sweeps, multi-task jobs, preemption and time limits on a real SLURM cluster through Hydra's
submitit launcher.

bash tests/slurm/start_local_cluster.sh && VLHUB_SLURM_TESTS=1 python -m pytest tests/slurm/test_slurm.py
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from tests.helpers.configs import FAST

pytestmark = pytest.mark.skipif(
    os.environ.get("VLHUB_SLURM_TESTS") != "1" or shutil.which("sbatch") is None,
    reason="set VLHUB_SLURM_TESTS=1 with a running SLURM cluster (tests/slurm/start_local_cluster.sh)",
)
SLURM = [
    "hydra/launcher=slurm",
    "hydra.launcher.partition=debug",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.timeout_min=10",
]


def _launch(tmp_path: Path, *overrides: str) -> None:
    command = [sys.executable, "-m", "vlhub.train", "-m", *SLURM, *FAST, f"hydra.sweep.dir={tmp_path}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_sweep_becomes_a_job_array(tmp_path):
    _launch(tmp_path, "optim.lr=1e-3,3e-4")
    for job in ("0", "1"):
        record = json.loads((tmp_path / job / "results.jsonl").read_text().splitlines()[-1])
        assert record["step"] == 3


def test_the_tasks_of_a_job_train_as_ranks(tmp_path):
    _launch(tmp_path, "hydra.launcher.tasks_per_node=2")
    checkpoint = torch.load(tmp_path / "0/checkpoints/latest.pt", weights_only=True)
    assert checkpoint["data"]["world_size"] == 2 and checkpoint["step"] == 3
    assert len((tmp_path / "0/results.jsonl").read_text().splitlines()) == 1  # rank 0 alone writes the record
    assert (tmp_path / "0/train_rank1.log").is_file()


# -- preemption and time limits: save at the signal, requeue, resume, end like an uninterrupted run ------
TRAIN = [
    "eval=none",
    "data.workers=0",
    "trainer.batch_size=8",
    "trainer.log_every_n_steps=1",
    "optim.scheduler=constant",
    "checkpoint.every_n_steps=0",  # a checkpoint before the end comes from the signal
    "logger.tensorboard=false",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _submit(tmp_path: Path, name: str, *overrides: str) -> subprocess.Popen:
    """Hydra's submitit_slurm launcher, in the background (it waits for the job, requeues included)."""
    command = [
        *[sys.executable, "-m", "vlhub.train", "-m", *SLURM, *TRAIN],
        *[f"hydra.sweep.dir={tmp_path}", f"hydra.launcher.name={name}", f"run.name={name}", *overrides],
    ]
    return subprocess.Popen(command, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _uninterrupted(tmp_path: Path, *overrides: str) -> dict:
    command = [sys.executable, "-m", "vlhub.train", *TRAIN, f"hydra.run.dir={tmp_path / 'straight'}", *overrides]
    result = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp_path / "straight/checkpoints/latest.pt", weights_only=True)


def _wait(condition, what: str, timeout: float = 600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _job_id(name: str) -> str:
    return subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True).stdout.strip()


def _logged_step(log: Path) -> int:
    steps = re.findall(r"step (\d+)/", log.read_text()) if log.is_file() else []
    return int(steps[-1]) if steps else 0


def _steps_at_signals(text: str, signal_name: str) -> list[tuple[int, int]]:
    """Per stop: (the last step logged before the signal was received, the step saved at)."""
    pairs, last = [], 0
    for line in text.splitlines():
        logged = re.search(r"step (\d+)/", line)
        last = int(logged.group(1)) if logged else last
        if f"received {signal_name}" in line:
            pairs.append([last, None])
        stopped = re.search(rf"stopped at step (\d+) on {signal_name}", line)
        if stopped:
            pairs[-1][1] = int(stopped.group(1))
    return [tuple(pair) for pair in pairs]


def _finish(launcher: subprocess.Popen, tmp_path: Path, straight: dict, max_steps: int) -> str:
    output = launcher.communicate(timeout=1200)[0]
    assert launcher.returncode == 0, output[-3000:]
    final = torch.load(tmp_path / "0/checkpoints/latest.pt", weights_only=True)
    assert final["step"] == max_steps
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, final["state_dict"][key]), key
    return (tmp_path / "0/train.log").read_text()


def test_the_preemption_signal_saves_within_a_step_and_the_requeued_job_ends_like_an_uninterrupted_run(tmp_path):
    name, max_steps = f"vlhub_preempt_{uuid.uuid4().hex[:6]}", 40
    launcher = _submit(tmp_path, name, f"trainer.max_steps={max_steps}")
    job = _wait(lambda: _job_id(name), "the job")
    log = tmp_path / "0/train.log"
    seen = _wait(lambda: _logged_step(log) >= 5 and _logged_step(log), "step 5")
    # The launcher config's signal (submitit's USR2), as SLURM sends it before a preemption.
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    straight = _uninterrupted(tmp_path, f"trainer.max_steps={max_steps}")
    text = _finish(launcher, tmp_path, straight, max_steps)
    [(before, stopped)] = _steps_at_signals(text, "SIGUSR2")
    print(f"signalled (scancel) after step {seen}; received after step {before}; saved at step {stopped}")
    assert stopped in (before, before + 1)  # the step in progress when it arrived, finished and saved
    assert f"resumed from step {stopped}" in text
    assert (tmp_path / f"0/checkpoints/step_{stopped}.pt").is_file()


def test_a_job_at_its_time_limit_saves_requeues_and_ends_like_an_uninterrupted_run(tmp_path):
    # A 3-minute limit and the warning signal 90 s before it (SLURM sends it up to 60 s early): the
    # first job is stopped mid-run (0.04 s a step on this machine when quiet, about 0.1 s under load: 1,200
    # steps once finished before the signal); a requeued job waits 2 minutes to start.
    name, max_steps = f"vlhub_timeout_{uuid.uuid4().hex[:6]}", 3000
    limits = ["hydra.launcher.timeout_min=3", "hydra.launcher.signal_delay_s=90", "hydra.launcher.max_num_timeout=10"]
    launcher = _submit(tmp_path, name, f"trainer.max_steps={max_steps}", *limits)
    straight = _uninterrupted(tmp_path, f"trainer.max_steps={max_steps}")
    text = _finish(launcher, tmp_path, straight, max_steps)
    stops = _steps_at_signals(text, "SIGUSR2")
    print(f"(last step logged when the signal arrived, step saved) per job: {stops}; finished at {max_steps}")
    assert stops and all(saved in (before, before + 1) for before, saved in stops)
    assert all(f"resumed from step {saved}" in text for _, saved in stops)


def test_outside_submitit_usr1_saves_and_the_job_requeues_itself_with_scontrol(tmp_path):
    # A plain sbatch script: srun starts the training, no submitit anywhere.
    name, max_steps = f"vlhub_sbatch_{uuid.uuid4().hex[:6]}", 40
    train = [
        sys.executable,
        "-m",
        "vlhub.train",
        *TRAIN,
        f"trainer.max_steps={max_steps}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"#SBATCH --job-name={name} --requeue --time=10 --cpus-per-task=1\n"
        f"#SBATCH --open-mode=append --output={tmp_path}/slurm-%j.out\n"
        f"srun --ntasks=1 {' '.join(train)}\n"
    )
    job = subprocess.run(["sbatch", "--parsable", str(script)], cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert job.returncode == 0, job.stderr
    job_id = job.stdout.strip().split(";")[0]
    log = tmp_path / "run/train.log"
    seen = _wait(lambda: _logged_step(log) >= 5 and _logged_step(log), "step 5")
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
    straight = _uninterrupted(tmp_path, f"trainer.max_steps={max_steps}")
    _wait(lambda: _logged_step(log) == max_steps and not _job_id(name), "the requeued job to finish", timeout=900)
    final = torch.load(tmp_path / "run/checkpoints/latest.pt", weights_only=True)
    assert final["step"] == max_steps
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, final["state_dict"][key]), key
    text = log.read_text()
    assert "on SIGUSR1: requeueing SLURM job" in text
    [(before, stopped)] = _steps_at_signals(text, "SIGUSR1")
    print(f"signalled (scancel) after step {seen}; received after step {before}; saved at {stopped}; requeued")
    assert stopped in (before, before + 1) and f"resumed from step {stopped}" in text
