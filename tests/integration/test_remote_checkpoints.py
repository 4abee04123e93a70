"""Issue 12, item 5: checkpoints in object storage, against a real S3 API server on localhost
(moto's server mode through s3fs; dummy credentials, no network)."""

import json
import logging
import os
import shutil
import sys
import time

import fsspec
import pytest
import torch
import yaml

import vlhub.run.remote_store as remote_module
import vlhub.train
from tests.helpers.configs import FAST, compose_train, run_train
from vlhub.engine.trainer import Trainer
from vlhub.errors import ConfigError
from vlhub.run.remote_store import RemoteError
from vlhub.run.secrets import mask_overrides, scrub_hydra_files

BUCKET = "vlhub-test"
SECRET = "s3cr3t-never-logged"
RESUME = ["optim.scheduler=constant", "checkpoint.every_n_steps=3", "checkpoint.keep=2", "eval.every_n_steps=3"]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free localhost port with one bucket; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    fsspec.filesystem("s3", client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True).mkdir(BUCKET)
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _remote(endpoint, prefix):
    """Overrides for ``checkpoint.remote``; the endpoint and a secret travel in remote_options."""
    return [
        f"checkpoint.remote=s3://{BUCKET}/{prefix}",
        f"+checkpoint.remote_options.client_kwargs.endpoint_url={endpoint}",
        f"+checkpoint.remote_options.secret={SECRET}",
        "+checkpoint.remote_options.key=testing",
        "checkpoint.remote_backoff_s=0.01",
    ]


def _fs(endpoint):
    return fsspec.filesystem("s3", client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)


def _pointer(endpoint, prefix):
    fs = _fs(endpoint)
    try:
        return json.loads(fs.cat_file(f"{BUCKET}/{prefix}/latest.json"))
    except FileNotFoundError:
        return None


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def test_a_killed_run_whose_folder_is_gone_resumes_from_the_remote_and_ends_as_an_uninterrupted_run(
    s3, tmp_path, monkeypatch
):
    overrides = [*RESUME, "logger.tensorboard=true", "trainer.max_steps=6"]
    run_train(overrides, tmp_path / "straight")

    real_step, calls = Trainer.train_on_batch, []

    def killed_after_the_step_3_upload(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the kill: after the step-3 checkpoint reached the remote
            deadline = time.time() + 30
            while (_pointer(s3, "run") or {}).get("step") != 3 and time.time() < deadline:
                time.sleep(0.05)
            raise KeyboardInterrupt("preempted")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(Trainer, "train_on_batch", killed_after_the_step_3_upload)
    run_dir = tmp_path / "node1"
    with pytest.raises(KeyboardInterrupt):
        run_train([*overrides, *_remote(s3, "run")], run_dir)
    assert _pointer(s3, "run")["step"] == 3
    shutil.rmtree(run_dir)  # the node and its disk are gone
    monkeypatch.setattr(Trainer, "train_on_batch", real_step)

    run_train([*overrides, *_remote(s3, "run")], run_dir)  # the same command on a new node
    final = torch.load(run_dir / "checkpoints/latest.pt", weights_only=True)
    assert final["step"] == 6
    straight = _weights(tmp_path / "straight/checkpoints/latest.pt")
    for key, value in straight.items():
        assert torch.equal(value, final["state_dict"][key]), key
    # The restored results.jsonl and TensorBoard files: step 3's record and events from both nodes.
    steps = [json.loads(line)["step"] for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert steps == [3, 6]
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    # The remote moved on to the end: pointer, the run's newest checkpoints, the final logs.
    fs = _fs(s3)
    assert _pointer(s3, "run")["step"] == 6 and _pointer(s3, "run")["run_id"] == final["run_id"]
    names = {p.rsplit("/", 1)[-1] for p in fs.find(f"{BUCKET}/run/checkpoints")}
    assert names == {"step_3.pt", "step_6.pt"}
    remote_steps = [json.loads(line)["step"] for line in fs.cat_file(f"{BUCKET}/run/results.jsonl").splitlines()]
    assert remote_steps == [3, 6]
    assert not (run_dir / ".remote_upload").exists()


def test_a_failed_upload_is_retried_and_latest_never_names_a_partial_file(s3, tmp_path, monkeypatch, caplog):
    real_url_to_fs, failures, pointed = fsspec.core.url_to_fs, [], []

    def flaky_url_to_fs(url, **options):
        fs, root = real_url_to_fs(url, **options)
        real_put, real_mv = fs.put_file, fs.mv

        def put_file(local, target, **kwargs):
            if local.endswith(".pt") and len(failures) < 3:  # half the bytes arrive, then the link drops
                failures.append(target)
                with open(local, "rb") as handle:
                    fs.pipe_file(target, handle.read()[:1000])
                raise ConnectionError("injected: connection reset during upload")
            return real_put(local, target, **kwargs)

        def mv(source, target, **kwargs):
            if target.endswith("latest.json"):  # every pointer names a complete checkpoint
                pointer = json.loads(fs.cat_file(source))
                data = fs.cat_file(f"{root}/{pointer['path']}")
                assert len(data) == pointer["size"]
                pointed.append(pointer["step"])
            return real_mv(source, target, **kwargs)

        monkeypatch.setattr(fs, "put_file", put_file)
        monkeypatch.setattr(fs, "mv", mv)
        return fs, root

    monkeypatch.setattr(remote_module.fsspec.core, "url_to_fs", flaky_url_to_fs)
    caplog.set_level(logging.INFO)
    _fs(s3).pipe_file(f"{BUCKET}/flaky/checkpoints/step_0.pt.dead1234.uploading", b"left by a killed upload")
    overrides = ["eval=none", "trainer.max_steps=3", "checkpoint.every_n_steps=1", *_remote(s3, "flaky")]
    cfg = compose_train([*(o for o in FAST if not o.startswith("eval.synthetic")), *overrides])
    vlhub.train.train(cfg, tmp_path, {"model": "tiny", "objective": "clip"}, overrides)

    assert len(failures) == 3 and all(".uploading" in target for target in failures)
    assert "retrying" in caplog.text
    assert pointed and pointed[-1] == 3
    fs = _fs(s3)
    assert not [p for p in fs.find(f"{BUCKET}/flaky") if p.endswith(".uploading")]
    local = torch.load(tmp_path / "checkpoints/latest.pt", weights_only=True)
    with fs.open(f"{BUCKET}/flaky/checkpoints/step_3.pt", "rb") as handle:
        uploaded = torch.load(handle, weights_only=True)
    assert uploaded["step"] == 3
    assert all(torch.equal(value, local["state_dict"][key]) for key, value in uploaded["state_dict"].items())
    # The credentials from remote_options appear nowhere: results, the stored config, checkpoints, logs.
    for path in (tmp_path / "results.jsonl", tmp_path / "config.yaml"):
        assert SECRET not in path.read_text()
    assert local["config"]["checkpoint"]["remote_options"]["secret"] == "***"
    assert SECRET not in json.dumps(local["run_info"]) and SECRET not in caplog.text
    assert SECRET not in fs.cat_file(f"{BUCKET}/flaky/results.jsonl").decode()


def test_a_final_upload_that_keeps_failing_is_an_error_at_the_end_of_the_run(s3, tmp_path, monkeypatch):
    real_url_to_fs = fsspec.core.url_to_fs

    def broken_url_to_fs(url, **options):
        fs, root = real_url_to_fs(url, **options)

        def put_file(local, target, **kwargs):
            raise ConnectionError("injected: the endpoint went away")

        monkeypatch.setattr(fs, "put_file", put_file)
        return fs, root

    monkeypatch.setattr(remote_module.fsspec.core, "url_to_fs", broken_url_to_fs)
    overrides = ["eval=none", "trainer.max_steps=2", "checkpoint.remote_retries=1", *_remote(s3, "broken")]
    with pytest.raises(RemoteError, match=r"checkpoint.remote=s3://vlhub-test/broken: the checkpoint of step 2"):
        run_train(overrides, tmp_path)
    assert (tmp_path / "checkpoints/step_2.pt").is_file()  # the local run folder keeps it
    assert _pointer(s3, "broken") is None


def test_an_unreachable_remote_fails_at_launch_naming_the_key(tmp_path):
    unreachable = [
        f"checkpoint.remote=s3://{BUCKET}/run",
        "+checkpoint.remote_options.client_kwargs.endpoint_url=http://127.0.0.1:9",
        "+checkpoint.remote_options.config_kwargs.retries.max_attempts=1",
        "+checkpoint.remote_options.key=testing",
        f"+checkpoint.remote_options.secret={SECRET}",
    ]
    with pytest.raises(RemoteError, match=r"checkpoint.remote=s3://vlhub-test/run is not writable") as caught:
        run_train(["eval=none", *unreachable], tmp_path)
    assert SECRET not in str(caught.value)
    assert not (tmp_path / "checkpoints").exists()  # nothing trained, nothing written
    with pytest.raises(RemoteError, match="must not carry credentials"):
        run_train(["eval=none", f"checkpoint.remote=s3://AKIA:{SECRET}@{BUCKET}/run"], tmp_path)
    with pytest.raises(ConfigError, match="checkpoint.remote_backoff_s='slow': expected float"):
        run_train(["eval=none", "checkpoint.remote_backoff_s=slow"], tmp_path)


def test_a_new_run_refuses_a_remote_that_holds_another_run(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)  # the endpoint from the environment, no remote_options
    overrides = ["eval=none", "trainer.max_steps=1", f"checkpoint.remote=s3://{BUCKET}/taken"]
    run_train(overrides, tmp_path / "first")
    with pytest.raises(RemoteError, match="holds another run's checkpoints"):
        run_train([*overrides, "checkpoint.resume=null"], tmp_path / "second")


def test_secrets_are_masked_in_overrides_and_hydra_files(tmp_path):
    overrides = [f"+checkpoint.remote_options.secret={SECRET}", "checkpoint.remote=s3://b/p", "trainer.max_steps=3"]
    assert mask_overrides(overrides) == ["+checkpoint.remote_options.secret=***", *overrides[1:]]
    assert mask_overrides([f"+checkpoint.remote_options={{key:a,secret:{SECRET}}}"]) == [
        "+checkpoint.remote_options=***"
    ]
    hydra_dir = tmp_path / ".hydra"
    hydra_dir.mkdir()
    (hydra_dir / "config.yaml").write_text(yaml.safe_dump({"checkpoint": {"remote_options": {"secret": SECRET}}}))
    (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    joined = {"hydra": {"job": {"override_dirname": ",".join(overrides)}, "overrides": {"task": overrides}}}
    (hydra_dir / "hydra.yaml").write_text(yaml.safe_dump(joined))
    scrub_hydra_files(tmp_path)
    assert not [p.name for p in hydra_dir.iterdir() if SECRET in p.read_text()]
    assert yaml.safe_load((hydra_dir / "config.yaml").read_text())["checkpoint"]["remote_options"]["secret"] == "***"


def test_a_file_url_remote_takes_whole_files_and_keeps_the_newest(tmp_path):
    from vlhub.run.remote_restore import restore_from_remote
    from vlhub.run.remote_store import RemoteStore

    store = RemoteStore(f"file://{tmp_path / 'remote'}")
    store.probe()
    source = tmp_path / "step_5.pt"
    torch.save({"step": 5, "run_id": "r1"}, source)
    store.put(source, "checkpoints/step_5.pt")  # parents made; no temporary name left behind
    store.write_pointer({"step": 5, "path": "checkpoints/step_5.pt", "size": source.stat().st_size, "run_id": "r1"})
    assert sorted(p.name for p in (tmp_path / "remote").rglob("*")) == ["checkpoints", "latest.json", "step_5.pt"]
    run_dir = tmp_path / "run"
    assert restore_from_remote(store, run_dir, run_dir / "checkpoints", None) == 5
    assert torch.load(run_dir / "checkpoints/step_5.pt", weights_only=True)["step"] == 5
    assert json.loads((run_dir / "run.json").read_text()) == {"run_id": "r1"}
    with pytest.raises(RemoteError, match="holds run r1"):
        restore_from_remote(store, run_dir, run_dir / "checkpoints", "another-run")
    (tmp_path / "remote/checkpoints/step_5.pt").write_bytes(b"torn")  # damaged behind our back
    with pytest.raises(RemoteError, match="the remote copy is damaged"):
        restore_from_remote(store, tmp_path / "run2", tmp_path / "run2/checkpoints", None)
    assert not (tmp_path / "run2/checkpoints/step_5.pt").exists()


@pytest.mark.skipif(not os.environ.get("VLHUB_LONG_TESTS"), reason="slow uploads (~8 s): VLHUB_LONG_TESTS=1")
def test_slow_uploads_do_not_stall_training(s3, tmp_path, monkeypatch):
    real_url_to_fs, fit_time = fsspec.core.url_to_fs, []

    def slow_url_to_fs(url, **options):
        fs, root = real_url_to_fs(url, **options)
        real_put = fs.put_file

        def put_file(local, target, **kwargs):
            if local.endswith(".pt"):
                time.sleep(3)
            return real_put(local, target, **kwargs)

        monkeypatch.setattr(fs, "put_file", put_file)
        return fs, root

    real_fit = Trainer.fit

    def timed_fit(self, run):
        start = time.perf_counter()
        try:
            return real_fit(self, run)
        finally:
            fit_time.append(time.perf_counter() - start)

    monkeypatch.setattr(remote_module.fsspec.core, "url_to_fs", slow_url_to_fs)
    monkeypatch.setattr(Trainer, "fit", timed_fit)
    started = time.perf_counter()
    run_train(["eval=none", "trainer.max_steps=4", "checkpoint.every_n_steps=1", *_remote(s3, "slow")], tmp_path)
    # Four checkpoints, each upload at least 3 s: the loop ran on while they were uploaded.
    assert fit_time[0] < 3 <= time.perf_counter() - started
    assert _pointer(s3, "slow")["step"] == 4


# -- issue 20: a pointer or listing that leads outside the prefix reads nothing ------------------------
OPENED: list[str] = []  # every path opened while a test records (an audit hook cannot be removed)
_RECORDING: list[bool] = []


def _record_opens(event, args):
    if _RECORDING and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_record_opens)


@pytest.mark.parametrize("how", ["dotdot", "symlink", "linked_log", "other_name"])
def test_a_remote_pointer_never_opens_a_file_outside_the_prefix(tmp_path, how):
    from vlhub.run.remote_restore import restore_from_remote
    from vlhub.run.remote_store import RemoteStore

    outside = tmp_path / "srv/secret.txt"
    outside.parent.mkdir(parents=True)
    outside.write_text("root:$6$hash:19000::::::\n")
    prefix = tmp_path / "srv/remote/run"
    (prefix / "checkpoints").mkdir(parents=True)
    path = {"dotdot": "../../../../../../../../.." + str(outside), "other_name": "checkpoint.remote"}.get(
        how, "checkpoints/step_5.pt"
    )
    if how == "symlink":
        (prefix / "checkpoints/step_5.pt").symlink_to(outside)
    if how == "linked_log":  # a genuine checkpoint, but a log beside it links outside
        torch.save({"step": 5, "run_id": "abc"}, prefix / "checkpoints/step_5.pt")
        (prefix / "results.jsonl").symlink_to(outside)
    (prefix / "latest.json").write_text(json.dumps({"step": 5, "path": path, "run_id": "abc"}))
    store, run_dir = RemoteStore(f"file://{prefix}"), tmp_path / "run"
    OPENED.clear()
    _RECORDING.append(True)
    try:
        with pytest.raises(RemoteError, match=r"checkpoint.remote=file://.*refused") as caught:
            restore_from_remote(store, run_dir, run_dir / "checkpoints", None)
    finally:
        _RECORDING.clear()
    assert ("latest.json" in str(caught.value)) == (how in ("dotdot", "other_name"))  # the pointer is named
    assert OPENED and not [p for p in OPENED if os.path.realpath(p) == str(outside.resolve())]
    assert not [p for p in run_dir.rglob("*") if p.is_file() and p.read_bytes() == outside.read_bytes()]


def test_a_refused_url_with_credentials_leaves_them_in_no_hydra_file(tmp_path):
    url = f"s3://AKIAFAKE:{SECRET}@{BUCKET}/x"
    overrides = ["eval=none", f"checkpoint.remote={url}"]
    made, kept = tmp_path / "made", tmp_path / "kept"
    for run_dir in (made, kept):  # what Hydra wrote before vlhub ran
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / ".hydra/overrides.yaml").write_text(yaml.safe_dump(overrides))
        (run_dir / ".hydra/config.yaml").write_text(yaml.safe_dump({"checkpoint": {"remote": url}}))
        hydra = {"hydra": {"job": {"override_dirname": ",".join(overrides)}, "overrides": {"task": overrides}}}
        (run_dir / ".hydra/hydra.yaml").write_text(yaml.safe_dump(hydra))
    (kept / "notes.txt").write_text("here before the launch\n")  # not this launch's folder: kept, masked
    for run_dir in (made, kept):
        with pytest.raises(RemoteError, match="must not carry credentials") as caught:
            run_train(overrides, run_dir)
        assert SECRET not in str(caught.value)
    assert not made.exists()
    assert sorted(p.name for p in (kept / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert not [p for p in kept.rglob("*") if p.is_file() and SECRET in p.read_text()]
    assert yaml.safe_load((kept / ".hydra/config.yaml").read_text())["checkpoint"]["remote"] == f"s3://***@{BUCKET}/x"
    assert mask_overrides([f"checkpoint.remote={url}"]) == [f"checkpoint.remote=s3://***@{BUCKET}/x"]
