"""A mismatched torch/torchvision pair fails at ``import vlhub`` naming both versions."""

import pytest

from vlhub import torch_pair


@pytest.mark.parametrize(
    "torch_version, torchvision_version, matches",
    [
        ("2.6.0", "0.21.0", True),  # pytorch.org's pairing table
        ("2.14.1+cu130", "0.29.1+cu130", True),
        ("2.5.1+cpu", "0.20.1+cpu", True),
        ("2.6.0+cpu", "0.20.1", False),  # two releases apart
        ("2.6.0+cpu", "0.21.0+cu124", False),  # a CPU torch beside a CUDA torchvision
        ("3.0.0", "1.0.0", True),  # outside the scheme: not judged
    ],
)
def test_the_pair_is_judged_by_pytorchs_release_table(torch_version, torchvision_version, matches):
    assert (torch_pair.mismatch(torch_version, torchvision_version) is None) == matches


def test_a_mismatch_is_one_line_naming_both_versions(monkeypatch):
    versions = {"torch": "2.6.0+cpu", "torchvision": "0.22.0"}
    monkeypatch.setattr(torch_pair.metadata, "version", versions.__getitem__)
    with pytest.raises(ImportError) as raised:
        torch_pair.check_torch_pair()
    message = str(raised.value)
    assert "\n" not in message and "torch 2.6.0+cpu" in message and "torchvision 0.22.0" in message
    monkeypatch.setattr(torch_pair.metadata, "version", {"torch": "2.7.0", "torchvision": "0.22.0"}.__getitem__)
    torch_pair.check_torch_pair()  # the matching pair passes
