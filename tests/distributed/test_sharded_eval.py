"""Sharded evaluation: two gloo ranks, each encoding half of every dataset, give one process's numbers exactly."""

import datetime
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import vlhub.eval.sharding as sharding
from tests.helpers.eval_folders import write_karpathy_set
from tests.helpers.models import micro_model
from tests.helpers.ranks import as_rank, free_port, set_rank_environment
from vlhub.api import eval_transform
from vlhub.data import SyntheticShapes
from vlhub.eval import Evaluator, SyntheticZeroShot
from vlhub.eval.linear_probe import LinearProbeTask, extract_features
from vlhub.eval.retrieval import PairValidationTask, RetrievalTask, encode_texts_sharded
from vlhub.eval.scoring import EmbeddingScorer, Scoring

# 60 images in batches of 16: four batches (16, 16, 16, 12), two per rank; the retrieval set's
# 7 images make an odd number of batches of 2, and 21 captions of 3.
BATCH = 16


def _evaluate(root: Path) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Every task of the synthetic presets (zero-shot, probe, val pairs, retrieval), and raw gathered outputs."""
    torch.manual_seed(0)
    model = micro_model().eval()
    transform = eval_transform(model)
    tasks = {
        "synthetic": SyntheticZeroShot(num_samples=60, image_size=32),
        "probe": LinearProbeTask(
            SyntheticShapes(num_samples=90, split="train", image_size=32),
            SyntheticShapes(num_samples=60, split="val", image_size=32),
            k=5,
        ),
        "val": PairValidationTask(SyntheticShapes(num_samples=50, split="val", image_size=32)),
        "retrieval": RetrievalTask(str(root)),
    }
    evaluator = Evaluator(batch_size=BATCH, workers=0, **tasks)
    # The probe on the zero-shot task too (how image-only objectives are scored).
    scoring = Scoring(zero_shot=EmbeddingScorer(model), probe=True)
    metrics = evaluator.run(model, transform, torch.device("cpu"), None, scoring)
    features, labels = extract_features(model, tasks["synthetic"].source, transform, torch.device("cpu"), BATCH)
    captions = [c for captions in tasks["retrieval"].captions for c in captions]
    texts = encode_texts_sharded(model, captions, torch.device("cpu"), 3)
    return metrics, {"features": features, "labels": labels, "texts": texts}


def _rank_main(rank: int, port: int, root: str, out: str) -> None:
    with as_rank(rank, port, init=True):
        result = _evaluate(Path(root))
    Path(out, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))


@pytest.mark.slow
def test_two_ranks_evaluate_exactly_like_one_process(tmp_path):
    root = write_karpathy_set(tmp_path / "coco", num_test=7, image_size=32)
    # fork: the ranks inherit this process's imports (seconds each on 2 shared cores)
    mp.start_processes(_rank_main, args=(free_port(), str(root), str(tmp_path)), nprocs=2, start_method="fork")
    single_metrics, single_outputs = _evaluate(root)
    assert any(k.endswith("linear_probe-top1") for k in single_metrics)
    assert any(k.startswith("retrieval-") for k in single_metrics)
    assert any(k.startswith("val-") for k in single_metrics)
    for rank in (0, 1):
        metrics, outputs = pickle.loads((tmp_path / f"rank{rank}.pkl").read_bytes())
        assert metrics == single_metrics  # exactly, every key
        for name, tensor in single_outputs.items():
            assert torch.equal(outputs[name], tensor), name


@pytest.mark.parametrize("items,batch,ranks", [(60, 16, 2), (7, 2, 2), (5, 4, 3), (100, 7, 4), (0, 4, 2)])
def test_shares_are_whole_batches_in_order(monkeypatch, items, batch, ranks):
    shares = []
    for rank in range(ranks):
        monkeypatch.setattr(sharding, "rank", lambda rank=rank: rank)
        monkeypatch.setattr(sharding, "world_size", lambda: ranks)
        shares.append(sharding.batch_share(items, batch))
    assert [i for share in shares for i in share] == list(range(items))  # a partition, in rank order
    assert all(share.start % batch == 0 for share in shares)  # each starts on a one-process batch boundary
    sizes = [-(-len(share) // batch) for share in shares]
    assert max(sizes) - min(sizes) <= 1  # batches dealt out evenly


def _wait_rank_main(rank: int, port: int, out: str, patient: bool) -> None:
    import time

    from vlhub.parallel import collectives

    set_rank_environment(rank, port)  # no teardown below: under the short timeout a peer may already be gone
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=2))
    try:
        collectives.patient_group()  # every rank, before rank 0's long work
        if rank == 0:
            time.sleep(4)  # a linear-probe fit longer than the process group's timeout
        got = collectives.broadcast_object("fitted" if rank == 0 else None, patient=patient)
        Path(out, f"rank{rank}").write_text(str(got))
    except Exception as error:  # noqa: BLE001 (the test reads what happened)
        Path(out, f"rank{rank}").write_text(f"{type(error).__name__}")
    os._exit(0)  # no teardown: under the short timeout a peer may already be gone


@pytest.mark.parametrize("patient", [True, False])
def test_rank_zeros_long_fit_is_waited_for_beyond_the_process_group_timeout(tmp_path, patient):
    mp.start_processes(_wait_rank_main, args=(free_port(), str(tmp_path), patient), nprocs=2, start_method="fork")
    waited = (tmp_path / "rank1").read_text()
    assert (waited == "fitted") is patient, waited  # impatient: the default group's 2 s timeout fires
