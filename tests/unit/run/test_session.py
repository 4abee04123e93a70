"""The run session (vlhub/run/session.py): what a launch leaves in its run folder and on its remote.

One process, no process group, no model: payloads are small dicts of tensors, saved the way the
trainer saves them (through the session), so each test runs in well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlhub.parallel.environment import get_dist_info
from vlhub.run.checkpoint import Checkpointer
from vlhub.run.lock import RunFolderError
from vlhub.run.remote_store import RemoteStore
from vlhub.run.session import CheckpointSettings, RunSession

CONFIG = {"trainer": {"max_steps": 10, "seed": 0}}


def settings(remote: str | None = None, resume: str | None = "auto", keep: int = 2) -> CheckpointSettings:
    return CheckpointSettings(
        every_n_steps=3,
        keep=keep,
        resume=resume,
        move_aside=False,
        allow_config_change=False,
        remote=remote,
        remote_options={},
        remote_retries=0,
        remote_backoff_s=0.0,
        lock_stale_after_s=120.0,
    )


def hydra_made(run_dir: Path) -> Path:
    """A run folder as Hydra leaves it before vlhub runs: ``.hydra/`` and nothing else."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("[]\n")
    return run_dir


def payload(step: int) -> dict:
    return {"step": step, "config": CONFIG, "state_dict": {"w": torch.full((4,), float(step))}}


@pytest.fixture
def uploads(monkeypatch) -> list[str]:
    """The remote paths each upload wrote, in order (the real upload runs)."""
    done: list[str] = []
    real_put = RemoteStore.put

    def put(store, local, relative):
        real_put(store, local, relative)
        done.append(relative)

    monkeypatch.setattr(RemoteStore, "put", put)
    return done


def test_a_save_through_the_session_writes_the_checkpoint_and_uploads_it_once(tmp_path, uploads):
    remote = tmp_path / "remote"
    run_dir = hydra_made(tmp_path / "run")
    with RunSession(run_dir) as run:
        start = run.open(settings(f"file://{remote}"), CONFIG, get_dist_info("cpu"))
        path = run.save(payload(3))
        run.track(lambda: 3)
        run.finish()
    assert path == run_dir / "checkpoints" / "step_3.pt"
    local = torch.load(path, weights_only=True)
    assert local["step"] == 3 and local["run_id"] == start.run_id  # the run's id, stamped by the session
    assert [p for p in uploads if p.startswith("checkpoints/")] == ["checkpoints/step_3.pt"]  # one upload
    pointer = json.loads((remote / "latest.json").read_text())
    assert pointer["step"] == 3 and pointer["path"] == "checkpoints/step_3.pt" and pointer["run_id"] == start.run_id
    assert (remote / "checkpoints/step_3.pt").read_bytes() == path.read_bytes()
    assert json.loads((remote / "run.json").read_text())["run_id"] == start.run_id  # the logs went with it
    assert not (run_dir / "run.lock").exists()  # released on close


def test_the_checkpointer_alone_writes_only_local_files(tmp_path, uploads):
    """The checkpoint files know nothing of the remote: only a save through the session uploads."""
    remote = tmp_path / "remote"
    with RunSession(hydra_made(tmp_path / "run")) as run:
        run.open(settings(f"file://{remote}", keep=5), CONFIG, get_dist_info("cpu"))
        assert run.checkpointer is not None
        run.checkpointer.save(payload(3))  # the files only
        run.save(payload(6))
        run.track(lambda: 6)
        run.finish()
    assert [p for p in uploads if p.startswith("checkpoints/")] == ["checkpoints/step_6.pt"]
    assert sorted(p.name for p in (remote / "checkpoints").iterdir()) == ["step_6.pt"]
    with pytest.raises(TypeError, match="remote"):
        Checkpointer(tmp_path / "c", every_n_steps=1, keep=1, resume=None, remote=f"file://{remote}")


def test_a_second_launch_resumes_what_the_first_saved_once(tmp_path):
    run_dir = hydra_made(tmp_path / "run")
    with RunSession(run_dir) as first:
        started = first.open(settings(), CONFIG, get_dist_info("cpu"))
        assert first.load_for_resume() is None  # a fresh run
        first.save(payload(3))
    with RunSession(run_dir) as second:
        start = second.open(settings(), CONFIG, get_dist_info("cpu"))
        assert (start.run_id, start.step) == (started.run_id, 3)
        resumed = second.load_for_resume()
        assert resumed["step"] == 3 and torch.equal(resumed["state_dict"]["w"], torch.full((4,), 3.0))
        assert second.load_for_resume() is None  # handed over once
        assert second.resume_from == f"checkpoint={run_dir / 'checkpoints' / 'step_3.pt'}"
    launches = json.loads((run_dir / "run.json").read_text())["launches"]
    assert [launch["step"] for launch in launches] == [0, 3]


def test_a_new_node_restores_the_run_from_the_remote(tmp_path):
    remote = f"file://{tmp_path / 'remote'}"
    with RunSession(hydra_made(tmp_path / "node1")) as run:
        started = run.open(settings(remote), CONFIG, get_dist_info("cpu"))
        run.save(payload(3))
        run.track(lambda: 3)
        run.finish()
    with RunSession(hydra_made(tmp_path / "node2")) as run:  # an empty folder on another node
        start = run.open(settings(remote), CONFIG, get_dist_info("cpu"))
        assert (start.run_id, start.step) == (started.run_id, 3)
        assert torch.equal(run.load_for_resume()["state_dict"]["w"], torch.full((4,), 3.0))


def test_a_failed_launch_leaves_no_folder_unless_it_trained(tmp_path):
    run_dir = hydra_made(tmp_path / "run")
    with pytest.raises(RuntimeError, match="failed while building"), RunSession(run_dir) as run:
        run.open(settings(), CONFIG, get_dist_info("cpu"))
        assert (run_dir / "run.json").is_file() and (run_dir / "run.lock").is_file()
        raise RuntimeError("failed while building")
    assert not run_dir.exists()

    trained = hydra_made(tmp_path / "trained")
    with pytest.raises(RuntimeError, match="failed at step 2"), RunSession(trained) as run:
        run.open(settings(), CONFIG, get_dist_info("cpu"))
        run.track(lambda: 2)
        raise RuntimeError("failed at step 2")
    assert (trained / "run.json").is_file() and not (trained / "run.lock").exists()


def test_a_launch_refused_by_the_folder_removes_nothing_of_the_run_there(tmp_path):
    run_dir = hydra_made(tmp_path / "run")
    with RunSession(run_dir) as run:
        run.open(settings(), CONFIG, get_dist_info("cpu"))
        run.save(payload(3))
    refused = pytest.raises(RunFolderError, match="another run's checkpoints")  # resume=null: a new run
    with refused, RunSession(run_dir) as run:
        run.open(settings(resume=None), CONFIG, get_dist_info("cpu"))
    assert (run_dir / "checkpoints" / "step_3.pt").is_file() and not (run_dir / "run.lock").exists()
