"""A run's safety: a checkpoint is data (never code), a run folder holds one run (its lock), leftovers are
cleaned, and a torn, foreign or unwritable checkpoint is named in one line."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time

import pytest
import torch
import yaml
from hydra import compose, initialize_config_module

import vlhub
from tests.helpers.configs import FAST, compose_train, run_train
from vlhub.registry import UnsafeConfigError
from vlhub.run.checkpoint import Checkpointer
from vlhub.run.config_changes import config_changes
from vlhub.run.folder import remove_failed_launch
from vlhub.run.lock import RunFolderError, RunLock

BASE = ["eval=none", "trainer.max_steps=2", "checkpoint.every_n_steps=1", "checkpoint.keep=2"]
# The node found in the attack: Hydra blocks os.system, not open.
ATTACK = {"_target_": "builtins.dict", "x": {"_target_": "builtins.open", "_args_": ["victim.txt", "w"]}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished two-step run folder; tests copy it before changing anything."""
    run_dir = tmp_path_factory.mktemp("trained")
    run_train(BASE, run_dir)
    return run_dir


@pytest.fixture
def run_copy(trained, tmp_path):
    return shutil.copytree(trained, tmp_path / "run")


def _never_build(monkeypatch):
    import vlhub.models.open_clip_models as builders

    def never(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(builders.open_clip, "CustomTextCLIP", never)


# -- a checkpoint cannot run code --------------------------------------------------------------
def _poisoned(trained, tmp_path, model_node):
    checkpoint = torch.load(trained / "checkpoints/latest.pt", weights_only=True)
    checkpoint["config"]["model"] = model_node
    torch.save(checkpoint, tmp_path / "poisoned.pt")
    return tmp_path / "poisoned.pt"


def test_a_stored_target_is_never_instantiated_by_any_loader(trained, tmp_path, monkeypatch):
    from hydra.utils import instantiate

    from vlhub import benchmark_bridge
    from vlhub.evaluate import evaluate

    monkeypatch.chdir(tmp_path)
    (tmp_path / "decoy.txt").write_text("precious")
    decoy = {**ATTACK, "x": {**ATTACK["x"], "_args_": ["decoy.txt", "w"]}}
    instantiate(decoy)["x"].close()  # the attack is real: instantiate truncates the file
    assert (tmp_path / "decoy.txt").read_text() == ""

    (tmp_path / "victim.txt").write_text("precious")
    path = _poisoned(trained, tmp_path, ATTACK)
    with pytest.raises(UnsafeConfigError, match=r"config.model of checkpoint=.*_target_='builtins.dict'"):
        vlhub.load(path)
    with pytest.raises(UnsafeConfigError, match="builtins.dict"):
        benchmark_bridge.load_vlhub(pretrained=str(path))
    with initialize_config_module(config_module="vlhub.configs", version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[f"checkpoint={path}", "eval=none", "device=cpu"])
    with pytest.raises(UnsafeConfigError, match="builtins.dict"):
        evaluate(cfg, tmp_path / "eval_run", model_given=False)
    # Resuming never builds the stored model node: the config check refuses the changed model first.
    with pytest.raises(RunFolderError, match="model._target_"):
        run_train([*BASE, f"checkpoint.resume={path}"], tmp_path / "resumed")
    # A registered builder with a nested target among its arguments is refused too, naming the key.
    nested = {"_target_": "vlhub.models.build_open_clip_model", "config": ATTACK["x"]}
    with pytest.raises(UnsafeConfigError, match=r"config.model of checkpoint=.*\.config\._target_"):
        vlhub.load(_poisoned(trained, tmp_path, nested))
    assert (tmp_path / "victim.txt").read_text() == "precious"


def test_the_safe_loader_still_builds_registered_models_and_objectives(trained):
    loaded = vlhub.load(trained / "checkpoints/latest.pt")
    assert loaded.objective is not None and not loaded.model.training


# -- a run folder holds one run ------------------------------------------------------------------
def test_a_fresh_start_over_another_runs_checkpoints_fails_then_moves_them_aside(run_copy):
    old_step2 = torch.load(run_copy / "checkpoints/step_2.pt", weights_only=True)
    fresh = [*BASE, "checkpoint.resume=null", "trainer.seed=1", "trainer.max_steps=1"]
    with pytest.raises(RunFolderError, match=r"another run's checkpoints.*checkpoint.move_aside=true"):
        run_train(fresh, run_copy)
    assert torch.equal(  # untouched
        torch.load(run_copy / "checkpoints/step_2.pt", weights_only=True)["state_dict"]["visual.conv1.weight"],
        old_step2["state_dict"]["visual.conv1.weight"],
    )
    run_train([*fresh, "checkpoint.move_aside=true"], run_copy)
    moved = next(run_copy.glob("moved_*"))
    assert sorted(p.name for p in (moved / "checkpoints").iterdir()) == ["latest.pt", "step_1.pt", "step_2.pt"]
    new = torch.load(run_copy / "checkpoints/latest.pt", weights_only=True)
    assert new["step"] == 1 and new["config"]["trainer"]["seed"] == 1
    assert new["run_id"] != old_step2["run_id"] == json.loads((moved / "run.json").read_text())["run_id"]
    assert json.loads((run_copy / "run.json").read_text())["run_id"] == new["run_id"]
    # resume=auto now continues the new run (seed 1), never the old seed-0 step_2.
    run_train([*BASE, "trainer.seed=1"], run_copy)
    resumed = torch.load(run_copy / "checkpoints/latest.pt", weights_only=True)
    assert resumed["step"] == 2 and resumed["run_id"] == new["run_id"]
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == ["latest.pt", "step_1.pt", "step_2.pt"]


def test_auto_resume_reads_latest_and_skips_torn_step_files(run_copy):
    checkpoints = run_copy / "checkpoints"
    (checkpoints / "step_2.pt").unlink()  # the run's newest state is only in latest.pt
    (checkpoints / "step_29.pt").write_bytes(b"garbage from an old writer")
    whole = (checkpoints / "latest.pt").read_bytes()
    (checkpoints / "step_30.pt").write_bytes(whole[: len(whole) // 2])
    run_train([*BASE, "trainer.max_steps=3"], run_copy)
    final = torch.load(checkpoints / "latest.pt", weights_only=True)
    assert final["step"] == 3 and final["scheduler"]["last_epoch"] == 3  # resumed from 2, not from 0
    assert (checkpoints / "step_29.pt").exists() and (checkpoints / "step_30.pt").exists()  # not its files


def test_rotation_deletes_only_the_runs_own_files(tmp_path):
    theirs = Checkpointer(tmp_path, every_n_steps=1, keep=1, resume="auto")
    theirs.run_id = "theirs"
    theirs.save({"step": 7})
    ours = Checkpointer(tmp_path, every_n_steps=1, keep=1, resume="auto")
    ours.run_id = "ours"
    for step in (1, 2, 3):
        ours.save({"step": step})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt", "step_3.pt", "step_7.pt"]
    assert ours.load_newest({"ours"})["step"] == 3


# -- two runs in one folder ----------------------------------------------------------------------
def _foreign_lock(run_dir, age_s=0.0, job="4242"):
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = {"host": "gpu-node-17", "pid": 31337, "slurm_job_id": job, "token": "x", "heartbeat": time.time() - age_s}
    (run_dir / "run.lock").write_text(json.dumps(holder))


def test_a_second_run_in_a_locked_folder_fails_at_once_naming_the_holder(run_copy, monkeypatch):
    _never_build(monkeypatch)
    _foreign_lock(run_copy)
    before = sorted(p.name for p in (run_copy / "checkpoints").iterdir())
    with pytest.raises(RunFolderError, match=r"in use by another run \(host gpu-node-17, pid 31337, SLURM job 4242"):
        run_train([*BASE, "trainer.max_steps=4"], run_copy)
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == before
    # Two launches from live processes: the second fails while the first holds the lock.
    (run_copy / "run.lock").unlink()
    first = RunLock.acquire(run_copy / "run.lock")
    try:
        with pytest.raises(RunFolderError, match=f"host {socket.gethostname()}, pid {os.getpid()}"):
            RunLock.acquire(run_copy / "run.lock")
        assert first.refresh()  # the heartbeat
    finally:
        first.release()
    assert not (run_copy / "run.lock").exists()


def test_two_launches_at_once_the_second_fails_and_the_first_finishes_alone(tmp_path):
    from vlhub.train import train

    fast = [o for o in FAST if not o.startswith("eval.synthetic")]
    overrides = [*fast, *BASE, "checkpoint.keep=1", "trainer.max_steps=8"]
    first_cfg, second_cfg = compose_train(overrides), compose_train(overrides)
    choices = {"model": "tiny", "objective": "clip"}
    first = threading.Thread(target=train, args=(first_cfg, tmp_path, choices))
    first.start()
    deadline = time.time() + 60
    while not (tmp_path / "run.lock").exists() and time.time() < deadline:
        time.sleep(0.01)
    holder = f"in use by another run \\(host {socket.gethostname()}, pid {os.getpid()}"
    with pytest.raises(RunFolderError, match=holder):
        train(second_cfg, tmp_path, choices)
    first.join()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest.pt", "step_8.pt"]
    assert not (tmp_path / "run.lock").exists()


def _hydra_wrote(run_dir, text="{}\n"):
    """What Hydra writes into the run folder before vlhub runs."""
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
        (run_dir / ".hydra" / name).write_text(text)
    (run_dir / "train.log").write_text("[INFO] - launched\n")


def _files(run_dir):
    return sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file())


def _launch(cfg, run_dir, errors):
    try:
        vlhub.train.train(cfg, run_dir, {"model": "tiny", "objective": "clip"})
    except BaseException as error:  # noqa: BLE001 (the test reads it)
        errors.append(error)


@pytest.mark.parametrize("attempt", range(10 if os.environ.get("VLHUB_LONG_TESTS") else 2))
def test_two_launches_at_the_same_moment_the_loser_removes_nothing_of_the_winner(tmp_path, monkeypatch, attempt):
    from vlhub.engine.trainer import Trainer

    real_fit, in_fit, loser_done = Trainer.fit, threading.Event(), threading.Event()

    def fit_once_the_loser_failed(self, run):
        in_fit.set()
        assert loser_done.wait(60)
        return real_fit(self, run)

    monkeypatch.setattr(Trainer, "fit", fit_once_the_loser_failed)
    _hydra_wrote(tmp_path)
    fast = [o for o in FAST if not o.startswith("eval.synthetic")]
    configs = [compose_train([*fast, *BASE]) for _ in range(3)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)
    launches = [
        threading.Thread(target=lambda c=c: (barrier.wait(), _launch(c, tmp_path, errors))) for c in configs[:2]
    ]
    for launch in launches:
        launch.start()
    deadline = time.time() + 60
    while not (in_fit.is_set() and errors) and time.time() < deadline:
        time.sleep(0.01)
    assert len(errors) == 1 and isinstance(errors[0], RunFolderError) and "in use by another run" in str(errors[0])
    winner = _files(tmp_path)
    assert {".hydra/config.yaml", "train.log", "run.lock", "run.json", "config.yaml"} <= set(winner)
    with pytest.raises(RunFolderError, match="in use by another run"):  # a third launch: still locked
        vlhub.train.train(configs[2], tmp_path, {"model": "tiny", "objective": "clip"})
    assert _files(tmp_path) == winner
    loser_done.set()
    for launch in launches:
        launch.join()
    assert len(errors) == 1  # the winner trained to the end
    assert {".hydra/config.yaml", "train.log", "run.json", "config.yaml", "checkpoints/step_2.pt"} <= set(
        _files(tmp_path)
    )
    assert not (tmp_path / "run.lock").exists()


def test_a_run_whose_lock_was_taken_over_stops_before_its_next_write(tmp_path, monkeypatch):
    from vlhub.engine.trainer import Trainer

    real_fit, real_refresh = Trainer.fit, RunLock.refresh
    suspended, in_fit = threading.Event(), threading.Event()
    suspended.set()

    def fit_after_the_suspension(self, run):
        in_fit.set()
        while suspended.is_set():
            time.sleep(0.01)
        return real_fit(self, run)

    def refresh(self):  # a suspended (SIGSTOP) process refreshes no heartbeat
        return True if suspended.is_set() else real_refresh(self)

    monkeypatch.setattr(Trainer, "fit", fit_after_the_suspension)
    monkeypatch.setattr(RunLock, "refresh", refresh)
    fast = [o for o in FAST if not o.startswith("eval.synthetic")]
    cfg = compose_train([*fast, *BASE, "trainer.max_steps=4", "checkpoint.lock_stale_after_s=0.4"])
    errors: list[BaseException] = []
    first = threading.Thread(target=_launch, args=(cfg, tmp_path, errors))
    first.start()
    assert in_fit.wait(60)
    time.sleep(0.5)
    second = RunLock.acquire(tmp_path / "run.lock", stale_after_s=0.4)  # the second launch takes it over
    suspended.clear()
    first.join(60)
    assert len(errors) == 1 and isinstance(errors[0], RunFolderError), errors
    assert "was taken over by another launch" in str(errors[0]) and "checkpoint.lock_stale_after_s" in str(errors[0])
    assert not list(tmp_path.glob("checkpoints/*"))  # stopped before its first write after the takeover
    assert json.loads((tmp_path / "run.lock").read_text())["token"] == second.token  # the new holder's lock stays
    assert (tmp_path / "run.json").is_file()
    second.release()


@pytest.mark.parametrize("refused", ["max_steps_0", "data_root_unset", "empty_shards"])
def test_a_refused_launch_removes_the_run_folder_it_made_and_no_other(tmp_path, refused):
    empty = tmp_path / "shards" / "empty-000000.tar"
    empty.parent.mkdir()
    tarfile.open(empty, "w").close()  # a valid tar without a member
    overrides = {
        "max_steps_0": ["trainer.max_steps=0"],  # refused when the trainer is built, under the run's lock
        "data_root_unset": ["data=csv"],  # refused by the launch check, before the lock
        "empty_shards": ["data=wds", f'data.root="{empty}"'],  # when the data source is built
    }[refused]
    made, kept = tmp_path / "made", tmp_path / "kept"
    _hydra_wrote(made)
    _hydra_wrote(kept)
    (kept / "notes.txt").write_text("the user's notes, here before the launch\n")
    for run_dir in (made, kept):
        with pytest.raises(Exception, match="trainer.max_steps|data.root|hold no samples"):
            run_train([*BASE, *overrides], run_dir)
    assert not made.exists()
    before = {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "notes.txt", "train.log"}
    assert before <= set(_files(kept))


def test_a_stale_lock_or_this_jobs_own_lock_is_taken_over(tmp_path, monkeypatch):
    _foreign_lock(tmp_path, age_s=600)
    RunLock.acquire(tmp_path / "run.lock").release()
    _foreign_lock(tmp_path, job="4242")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # a requeued job, maybe on another host
    lock = RunLock.acquire(tmp_path / "run.lock")
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()
    monkeypatch.delenv("SLURM_JOB_ID")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder = {"host": socket.gethostname(), "pid": int(gone.stdout), "heartbeat": time.time(), "token": "x"}
    (tmp_path / "run.lock").write_text(json.dumps(holder))  # a crashed run on this host
    RunLock.acquire(tmp_path / "run.lock").release()


def test_the_heartbeat_is_refreshed_while_the_run_lives(tmp_path, monkeypatch):
    lock = RunLock.acquire(tmp_path / "run.lock", stale_after_s=0.08)  # a heartbeat every 0.02 s
    first = json.loads((tmp_path / "run.lock").read_text())["heartbeat"]
    deadline = time.time() + 10
    while json.loads((tmp_path / "run.lock").read_text())["heartbeat"] == first and time.time() < deadline:
        time.sleep(0.02)
    assert json.loads((tmp_path / "run.lock").read_text())["heartbeat"] > first
    lock.release()
    assert not (tmp_path / "run.lock").exists()


# -- a rerun with a changed config -----------------------------------------------------------------
def test_a_changed_config_on_a_finished_run_fails_listing_the_keys_and_keeps_the_record(run_copy, caplog):
    record = (run_copy / "config.yaml").read_text()
    lr = compose_train().optim.lr
    assert yaml.safe_load(record)["optim"]["lr"] == lr
    with pytest.raises(RunFolderError, match=rf"optim.lr: {lr!r} -> 0.0001.*checkpoint.allow_config_change=true"):
        run_train([*BASE, "optim.lr=1e-4"], run_copy)
    assert (run_copy / "config.yaml").read_text() == record
    with caplog.at_level(logging.WARNING):
        assert run_train(BASE, run_copy) == {}
    assert "finished at step 2" in caplog.text and "raise trainer.max_steps" in caplog.text
    assert (run_copy / "config.yaml").read_text() == record


def test_allow_config_change_continues_and_is_recorded(run_copy):
    run_train([*BASE, "trainer.max_steps=3", "optim.lr=1e-4", "checkpoint.allow_config_change=true"], run_copy)
    records = [json.loads(line) for line in (run_copy / "results.jsonl").read_text().splitlines()]
    change = next(r for r in records if r.get("event") == "config_changed")
    assert change["step"] == 2 and change["changes"]["optim.lr"][1] == 1e-4
    assert yaml.safe_load((run_copy / "config.yaml").read_text())["optim"]["lr"] == 1e-4


def test_only_the_listed_keys_may_change_on_resume():
    old = {"trainer": {"max_steps": 2, "seed": 0, "compile_mode": "a"}, "eval": {}, "data": {"workers": 2}}
    new = {"trainer": {"max_steps": 9, "seed": 1, "compile_mode": "b"}, "eval": {"x": {"y": 1}}, "data": {"workers": 0}}
    assert config_changes(old, new) == {"trainer.seed": [0, 1]}


# -- leftovers --------------------------------------------------------------------------------------
def test_tmp_files_and_results_past_the_checkpoint_are_dropped_on_resume(run_copy):
    (run_copy / "checkpoints/.step_3.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    with (run_copy / "results.jsonl").open("a") as handle:  # evaluated at step 3, killed before its checkpoint
        handle.write(json.dumps({"step": 3, "data/bad_samples": 0}) + "\n" + '{"step": 4, "data/b')  # torn
    run_train([*BASE, "trainer.max_steps=3"], run_copy)
    assert not list((run_copy / "checkpoints").glob("*.tmp"))
    steps = [json.loads(line)["step"] for line in (run_copy / "results.jsonl").read_text().splitlines()]
    assert steps.count(3) == 1 and steps == sorted(steps)


def test_a_failed_launch_leaves_no_empty_run_folder(tmp_path):
    run_dir = tmp_path / "runs/csv_run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra/config.yaml").write_text("{}\n")
    (run_dir / "train.log").write_text("")
    with pytest.raises(Exception, match="no such CSV file"):
        run_train(["data=csv", f"data.root={tmp_path / 'missing.csv'}"], run_dir)
    assert not run_dir.exists()
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "results.jsonl").write_text("{}\n")  # something trained here: kept
    remove_failed_launch(run_dir, created=True)
    assert run_dir.exists()


# -- a torn resume file ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_a_torn_resume_file_fails_before_anything_is_built(trained, tmp_path, monkeypatch, kind):
    whole = (trained / "checkpoints/latest.pt").read_bytes()
    torn = tmp_path / f"{kind}.pt"
    torn.write_bytes(whole[: len(whole) // 3] if kind == "truncated" else b"\x80\x02garbage" * 50)
    _never_build(monkeypatch)
    with pytest.raises(Exception, match=rf"checkpoint.resume={torn} is not a readable checkpoint") as error:
        run_train([*BASE, f"checkpoint.resume={torn}"], tmp_path / "run")
    assert "weights_only=False" not in str(error.value)


def test_a_resume_file_that_is_no_training_checkpoint_is_named(tmp_path, monkeypatch):
    torch.save({"state_dict": {}}, tmp_path / "weights.pt")  # e.g. a plain open_clip file
    _never_build(monkeypatch)
    with pytest.raises(RunFolderError, match=r"checkpoint.resume=.*weights.pt is not a vlhub training checkpoint"):
        run_train([*BASE, f"checkpoint.resume={tmp_path / 'weights.pt'}"], tmp_path / "run")


# -- checkpoint faults are one line naming the file ----------------------------------------
def _one_line(capsys, action) -> str:
    from vlhub.launch import errors_reported

    with pytest.raises(SystemExit) as exit_info, errors_reported():
        action()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    lines = [line[line.find("error: ") :] if "error: " in line else line for line in err.splitlines()]
    lines = [line for line in lines if line.strip() and not line.startswith("train:")]  # the progress bar
    assert "Traceback (most recent call last)" not in err and len(lines) == 2 and lines[1].startswith("hint: "), err
    return lines[0]


def test_a_truncated_resume_file_is_one_line_without_a_traceback(trained, tmp_path, capsys):
    whole = (trained / "checkpoints/latest.pt").read_bytes()
    (tmp_path / "torn.pt").write_bytes(whole[: len(whole) // 3])
    line = _one_line(capsys, lambda: run_train([*BASE, f"checkpoint.resume={tmp_path / 'torn.pt'}"], tmp_path / "r"))
    assert line.startswith(f"error: checkpoint.resume={tmp_path / 'torn.pt'} is not a readable checkpoint")


def test_a_full_disk_during_a_checkpoint_says_so_naming_the_file_and_keeps_the_previous(tmp_path, monkeypatch, capsys):
    import errno
    import io

    import vlhub.run.checkpoint as checkpoint_module

    real_fdopen, saves = os.fdopen, []

    class FullDisk(io.RawIOBase):  # the disk fills 1000 bytes into the second checkpoint
        def __init__(self, handle):
            self.handle, self.written = handle, 0

        def writable(self):
            return True

        def write(self, data):
            self.written += len(data)
            if len(saves) == 2 and self.written > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.handle.write(data)

        def flush(self):
            self.handle.flush()

        def fileno(self):
            return self.handle.fileno()

        def close(self):
            self.handle.close()

    def fdopen(fd, mode="r", *args, **kwargs):
        handle = real_fdopen(fd, mode, *args, **kwargs)
        if mode == "wb":
            saves.append(1)
            return FullDisk(handle)
        return handle

    monkeypatch.setattr(checkpoint_module.os, "fdopen", fdopen)
    line = _one_line(capsys, lambda: run_train(BASE, tmp_path))
    assert line == f"error: no space left on device writing the checkpoint {tmp_path / 'checkpoints/step_2.pt'} " + (
        "(nothing of it was kept; the previous checkpoints are whole): free space, or lower checkpoint.keep, and resume"
    )
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest.pt", "step_1.pt"]
    assert torch.load(tmp_path / "checkpoints/latest.pt", weights_only=True)["step"] == 1


def test_a_checkpoint_folder_that_cannot_be_written_fails_at_launch(run_copy, monkeypatch, capsys):
    import tempfile

    import vlhub.run.checkpoint as checkpoint_module

    def read_only(*args, dir=None, **kwargs):  # tests run as root, which chmod cannot stop
        raise PermissionError(13, "Permission denied", str(dir))

    monkeypatch.setattr(checkpoint_module.tempfile, "NamedTemporaryFile", read_only)
    _never_build(monkeypatch)
    line = _one_line(capsys, lambda: run_train([*BASE, "trainer.max_steps=4"], run_copy))
    assert line == (
        f"error: the checkpoint folder {run_copy / 'checkpoints'} is not writable (Permission denied): fix its "
        "permissions, or use another run folder (run.name=... or hydra.run.dir=...)"
    )
    monkeypatch.setattr(checkpoint_module.tempfile, "NamedTemporaryFile", tempfile.NamedTemporaryFile)


def test_a_checkpoint_with_a_wrong_tensor_shape_names_the_file_everywhere(trained, tmp_path):
    from tests.helpers.configs import FAST_EVAL, compose_evaluate
    from vlhub.api import build_model, read_checkpoint
    from vlhub.evaluate import evaluate
    from vlhub.run.checkpoint import CheckpointError

    saved = torch.load(trained / "checkpoints/latest.pt", weights_only=True)
    saved["state_dict"]["positional_embedding"] = saved["state_dict"]["positional_embedding"][:-1]
    bad = tmp_path / "bad_shape.pt"
    torch.save(saved, bad)
    fits = r"does not fit this model: size mismatch for .*positional_embedding"
    with pytest.raises(CheckpointError, match=rf"^checkpoint={bad} {fits}"):
        build_model(str(bad), None, read_checkpoint(str(bad)))  # what the CLIP_benchmark bridge calls
    with pytest.raises(CheckpointError, match=rf"^checkpoint={bad} {fits}"):
        evaluate(compose_evaluate([f"checkpoint={bad}", *FAST_EVAL]), tmp_path / "eval")
    with pytest.raises(CheckpointError, match=rf"^checkpoint.resume={bad} {fits}"):
        run_train([*BASE, "trainer.max_steps=4", f"checkpoint.resume={bad}"], tmp_path / "run")


def test_a_run_folder_where_the_log_cannot_be_written_is_one_line(tmp_path):
    import logging.config

    from omegaconf import OmegaConf

    with initialize_config_module(config_module="vlhub.configs", version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True)
    handler = OmegaConf.to_container(cfg.hydra.job_logging.handlers.file, resolve=False)
    (tmp_path / "train.log").mkdir()  # as root, chmod cannot make the folder read-only; this fails the same way
    handler.update(filename=str(tmp_path / "train.log"))
    handler.pop("formatter", None)
    with pytest.raises(SystemExit) as caught:  # the factory Hydra's logging set-up calls, and what it gets
        logging.config.DictConfigurator({"version": 1}).configure_handler(handler)
    assert str(caught.value.code) == (
        f"error: the run folder {tmp_path} is not writable: its log {tmp_path / 'train.log'} cannot be opened "
        "(Is a directory)\nhint: fix its permissions, or use another run folder (run.name=... or hydra.run.dir=...)"
    )
