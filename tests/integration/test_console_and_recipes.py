"""What a person sees: the optimizer recipe each model option selects, the run folder, progress and
final table, the default evaluation following the data, ``--help``, and opening any checkpoint in
open_clip."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.configs import FAST, compose_train, options

# -- every model option comes with an optimizer recipe (issue 17: used as given) ---------------
# What the optimizer actually gets (lr at step 0, end of warmup, mid-run; scaling only when asked) is
# tested in tests/unit/optim/test_recipes.py; these check which recipe each option selects.


def test_vit_b32_composes_to_open_clips_one_gpu_example():
    optim = compose_train(["model=vit_b32"]).optim
    assert optim.optimizer._target_ == "torch.optim.AdamW"
    assert list(optim.optimizer.betas) == [0.9, 0.98] and optim.optimizer.eps == 1e-6
    assert (optim.lr, optim.weight_decay, optim.warmup_steps) == (1e-3, 0.1, 10000)
    assert (optim.scale_with_batch, optim.reference_batch_size) == ("none", 128)


def test_every_model_option_brings_a_recipe_and_tiny_keeps_its_fast_one():
    for model in options("model"):
        optim = compose_train([f"model={model}"]).optim
        assert optim.scale_with_batch == "none"  # no option rescales what is typed
        if model == "tiny":  # the CPU default keeps its speed: lr 2e-3, 100 warmup steps
            assert (optim.lr, optim.warmup_steps, optim.reference_batch_size) == (2e-3, 100, None)
        else:  # the big towers: open_clip's one-GPU example (the vit_b32 diverged at lr 2e-3, warmup 100)
            values = (optim.lr, optim.weight_decay, optim.warmup_steps, optim.reference_batch_size)
            assert values == (1e-3, 0.1, 10000, 128)
            # open_clip_train's non-ViT betas and eps; LiT's timm ViT-L/16 keeps model=timm's recipe
            non_vit_recipe = ("rn50", "rn50_quickgelu", "convnext_tiny", "timm", "timm_vit_l16_in21k")
            expected = ([0.9, 0.999], 1e-8) if model in non_vit_recipe else ([0.9, 0.98], 1e-6)
            assert (list(optim.optimizer.betas), optim.optimizer.eps) == expected


def test_the_command_line_still_wins_over_a_models_recipe():
    for overrides in (["model=vit_b32", "optim=sgd"], ["optim=sgd", "model=vit_b32"]):
        optim = compose_train(overrides).optim
        assert optim.optimizer._target_ == "torch.optim.SGD" and optim.lr == 0.05


def test_every_model_option_still_composes_for_evaluate():
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="vlhub.configs", version_base="1.3"):
        for model in options("model"):  # the recipe's override needs an optim group there too
            assert compose(config_name="evaluate", overrides=[f"model={model}"]).model._target_


# -- the run folder, the progress bar and the log, the final table --------------------------


def test_the_console_shows_the_run_folder_a_table_and_log_lines_apart_from_the_bar(tmp_path, monkeypatch):
    """The default run in-process through Hydra's main, its console and the bar on one stream (as a
    terminal shows them): a log line written while the bar is drawn used to glue onto it."""
    import io
    import logging
    import re
    import sys

    import vlhub.train

    console = io.StringIO()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdout", console)
    monkeypatch.setattr(sys, "stderr", console)
    overrides = ["trainer.max_steps=4", "trainer.log_every_n_steps=2", "checkpoint.every_n_steps=1", "run.name=r"]
    fast = [o for o in FAST if not o.startswith(("trainer.max_steps", "trainer.log_every"))]
    monkeypatch.setattr(sys, "argv", ["train", *fast, *overrides])
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        vlhub.train.main()
    finally:
        for handler in root.handlers:
            if handler not in saved[0]:
                handler.close()
        root.handlers[:], root.level = saved
    text = console.getvalue()
    run_dir = (tmp_path / "runs/r").resolve()
    lines = [line for line in re.split(r"[\r\n]", text) if " - " in line]
    assert lines[0].endswith(f"run folder: {run_dir}") and lines[-1].endswith(f"run folder: {run_dir}")
    starts = [m.start() for m in re.finditer(r"\[\d{4}-\d\d-\d\d \d", text)]
    assert len(starts) > 8 and all(i == 0 or text[i - 1] in "\r\n" for i in starts), text  # none glued to the bar
    table = text[text.index("final metrics (step 4):") :].splitlines()[1:6]
    assert table[0].split() == ["metric", "value"] and set(table[1]) == {"-", " "}
    assert re.fullmatch(r"synthetic-zeroshot-top1 +0\.\d{4}", table[2])
    log = (run_dir / "train.log").read_text()
    steps = re.findall(r"step (\d)/4: loss \d+\.\d+, lr [\d.e-]+, \d+ samples/s", log)
    assert steps == ["2", "4"]  # every trainer.log_every_n_steps, in the run's own log file


# -- the default evaluation follows the data ------------------------------------------------


def test_real_data_is_not_scored_on_the_generated_shapes(tmp_path, caplog):
    import json
    import logging

    from tests.helpers.configs import run_train
    from vlhub.data import SyntheticShapes

    csv = SyntheticShapes(num_samples=16).write_csv(tmp_path / "data")
    with caplog.at_level(logging.INFO, logger="vlhub.train"):
        metrics = run_train(["data=csv", f"data.root={csv}", "data.workers=0"], tmp_path / "run")
    assert metrics == {}  # was synthetic-zeroshot-top1 on shapes unrelated to the CSV
    record = json.loads((tmp_path / "run/results.jsonl").read_text().splitlines()[-1])
    assert not any("synthetic" in key for key in record) and record["data/samples_read"] == 24
    hints = [r.getMessage() for r in caplog.records if r.getMessage().startswith("no evaluation")]
    assert len(hints) == 1 and "data.val=" in hints[0] and "eval=" in hints[0]


def test_each_data_option_picks_its_evaluation_and_the_command_line_wins():
    def tasks(overrides: list[str]) -> set[str]:
        evaluation = compose_train(overrides).eval
        return {name for name, node in evaluation.items() if name != "classnames" and "_target_" in str(node)}

    assert tasks([]) == {"synthetic"}
    for data in ("csv", "imagefolder", "wds", "blend"):
        assert tasks([f"data={data}"]) == set()  # plus data.val, when given
    assert tasks(["data=captionnet"]) == {"imagenet"}  # ImageNet-100, once eval.imagenet.root is set
    assert tasks(["data=csv", "eval=synthetic"]) == tasks(["eval=synthetic", "data=csv"]) == {"synthetic"}
    assert tasks(["data=captionnet", "eval=none"]) == set()


# -- --help lists the real choices -----------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy re-runs vlhub.train as __main__
def test_help_lists_every_groups_options_and_the_launchers_but_no_internal_folder(capsys):
    from tests.helpers.cli import run_module

    assert run_module("vlhub.train", ["--help"]) in (0, None)  # in this process: what `python -m` prints
    stdout = capsys.readouterr().out
    groups = dict(
        line.split(None, 1) for line in stdout.split("== Config groups")[1].split("==")[1].strip().splitlines()
    )
    groups_here = ("augment", "augment_views", "data", "eval", "experiment", "model", "objective", "optim")
    assert set(groups) == {*groups_here, "hydra/launcher"}
    for group in groups_here:
        listed = set(groups[group].split("(")[0].replace("[", "").replace("]", "").replace(",", " ").split())
        assert listed == set(options(group)), group
    assert {"local", "slurm", "[basic]"} <= set(groups["hydra/launcher"].replace(",", " ").split())
    assert "shared" not in stdout.split("== Config (")[0]  # eval/shared, data/shared, objective/shared
    assert "[tiny]" in groups["model"] and "[synthetic]" in groups["data"]


# -- any vlhub checkpoint opens in open_clip, with the README's code ----------------------------


def readme_block(marker: str) -> str:
    """The fenced python block holding ``marker`` in the README or the docs: the test runs what a reader copies."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    readme = "".join(page.read_text() for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))])
    blocks = readme.split("```python\n")[1:]
    return next(block.split("```")[0] for block in blocks if marker in block)


def test_the_readmes_code_opens_a_tiny_checkpoint_in_open_clip_bit_for_bit(tmp_path):
    import open_clip

    import vlhub
    from tests.helpers.configs import run_train

    # The tiny model (no open_clip name), here with a logit bias in the model (as open_clip's SigLIP
    # models have): the stored config must rebuild both.
    run_train(["eval=none", "+model.init_logit_bias=-10.0", "trainer.max_steps=1"], tmp_path / "run")
    path = tmp_path / "run/checkpoints/latest.pt"
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["open_clip_arch"] is None and "logit_bias" in checkpoint["state_dict"]
    code = readme_block("open_clip.add_model_config")
    assert 'path = "runs/my_run/checkpoints/latest.pt"' in code
    scope: dict = {}
    exec(code.replace("runs/my_run/checkpoints/latest.pt", str(path)), scope)  # noqa: S102
    model, tokenizer = scope["model"].eval(), scope["tokenizer"]
    assert isinstance(model, open_clip.CLIP)
    theirs = model.state_dict()
    assert set(theirs) == set(checkpoint["state_dict"])
    assert all(torch.equal(theirs[k], v.reshape(theirs[k].shape)) for k, v in checkpoint["state_dict"].items())
    ours, preprocess, our_tokenizer = vlhub.load(path)
    images, texts = torch.randn(2, 3, 32, 32), ["a red circle", "a blue star"]
    assert torch.equal(tokenizer(texts), our_tokenizer(texts))
    with torch.no_grad():
        assert torch.equal(model.encode_image(images, normalize=True), ours.encode_image(images))
        assert torch.equal(model.encode_text(tokenizer(texts), normalize=True), ours.encode_text(tokenizer(texts)))
