"""Run folders, atomic checkpoints, load_checkpoint as the specification shows it."""

from __future__ import annotations

import math
from datetime import datetime

import pytest
import torch

from clam.checkpoints import (
    CHECKPOINT_KEYS,
    EXTRA_KEYS,
    FORMAT_VERSION,
    build_checkpoint,
    model_from_checkpoint,
    read_checkpoint,
    read_model_file,
    save_checkpoint,
    saved_progress,
)
from clam.model import build_model
from clam.run_files import make_run_dir
from clam.train import load_checkpoint  # the import the specification shows
from feature_extraction.errors import PipelineError


def saved_checkpoint(path, model_type="clam_sb", in_dim=8):
    torch.manual_seed(0)
    model = build_model(model_type, in_dim=in_dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    output = model(torch.randn(1, 6, in_dim), None, torch.tensor([1]))
    (output.logits.sum() + output.instance_loss).backward()
    optimizer.step()
    save_checkpoint(
        path,
        {
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": optimizer.state_dict(),
            "epoch": 3,
            "loss": 0.25,
            "args": {"learning_rate": 1e-3, "data_dir": str(path.parent)},
            "model_config": model.config.to_dict(),
        },
    )
    return model, optimizer


def test_run_folders_are_unique_within_one_second(tmp_path):
    now = datetime(2026, 11, 28, 9, 30, 5)
    first, second, third = (make_run_dir(tmp_path / "clam" / "checkpoints", now) for _ in range(3))
    assert first.name == "run_20261128_093005"
    assert second.name == "run_20261128_093005_2" and third.name == "run_20261128_093005_3"
    assert all(p.is_dir() for p in (first, second, third))


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_load_checkpoint_restores_model_and_optimizer(tmp_path, device):
    path = tmp_path / "checkpoint_epoch_3.pt"
    model, optimizer = saved_checkpoint(path)
    fresh = build_model("clam_sb", in_dim=8)
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    loaded, loaded_optimizer, epoch, loss = load_checkpoint(
        checkpoint_path=path, model=fresh, optimizer=fresh_optimizer, device=device
    )
    assert loaded is fresh and loaded_optimizer is fresh_optimizer
    assert (epoch, loss) == (3, 0.25)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert loaded_optimizer.state_dict()["state"][0]["exp_avg"].equal(
        optimizer.state_dict()["state"][0]["exp_avg"]
    )
    assert next(loaded.parameters()).device.type == "cpu"


def test_load_checkpoint_without_optimizer(tmp_path):
    path = tmp_path / "best_model.pt"
    saved_checkpoint(path)
    model, optimizer, epoch, loss = load_checkpoint(
        checkpoint_path=path, model=build_model("clam_sb", in_dim=8), optimizer=None, device="cpu"
    )
    assert optimizer is None and epoch == 3 and loss == 0.25


def test_checkpoints_load_with_weights_only(tmp_path):
    path = tmp_path / "c.pt"
    saved_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert {"model_state_dict", "optimizer_state_dict", "epoch", "loss", "args"} <= set(checkpoint)
    assert not list(tmp_path.glob(".*tmp"))  # written under a temporary name, then renamed


class Payload:  # any class: unpickling it would run code of the pickle's choosing
    pass


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model_state_dict": {}, "payload": Payload()}, path)
    with pytest.raises(PipelineError, match="would run code"):
        load_checkpoint(checkpoint_path=path, model=build_model(in_dim=8), device="cpu")


def test_a_checkpoint_of_another_model_is_explained(tmp_path):
    path = tmp_path / "mb.pt"
    saved_checkpoint(path, model_type="clam_mb", in_dim=16)
    with pytest.raises(
        PipelineError, match="does not fit this model: it was saved from model_type=clam_mb.*in_dim=16"
    ):
        load_checkpoint(checkpoint_path=path, model=build_model("clam_sb", in_dim=8), device="cpu")


def test_missing_and_truncated_checkpoints_are_explained(tmp_path):
    with pytest.raises(PipelineError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pt")
    path = tmp_path / "cut.pt"
    saved_checkpoint(path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(PipelineError, match="cannot be read"):
        read_checkpoint(path)


def test_model_from_checkpoint_rebuilds_the_model_alone(tmp_path):
    path = tmp_path / "c.pt"
    model, _ = saved_checkpoint(path, model_type="clam_mb", in_dim=8)
    rebuilt, checkpoint = model_from_checkpoint(path, "cpu")
    assert not rebuilt.training and checkpoint["epoch"] == 3
    features = torch.randn(2, 5, 8)
    torch.testing.assert_close(rebuilt(features).probs, model.eval()(features).probs)


def test_only_plain_values_are_saved(tmp_path):
    with pytest.raises(TypeError, match="PosixPath"):
        save_checkpoint(tmp_path / "c.pt", {"model_state_dict": {}, "args": {"data_dir": tmp_path}})
    assert not (tmp_path / "c.pt").exists()


def test_devices_resolve_or_explain(tmp_path):
    path = tmp_path / "c.pt"
    saved_checkpoint(path)
    model, _ = model_from_checkpoint(path, "auto")
    assert next(model.parameters()).device.type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(PipelineError, match="no CUDA GPU"):
            model_from_checkpoint(path, "cuda")
    with pytest.raises(PipelineError, match="unknown device"):
        load_checkpoint(checkpoint_path=path, model=build_model(in_dim=8), device="tpu9")


def built_checkpoint(epoch: int = 2) -> dict:
    from clam.checkpoints import SavedProgress

    model = build_model("clam_sb", in_dim=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    history = [{"epoch": e, "val_loss": 1.0 / e} for e in range(1, epoch + 1)]
    return build_checkpoint(
        model,
        optimizer,
        SavedProgress(epoch, 0.5, 1, 0.4, epoch - 1, history),
        args={"inst_loss": "ce"},
        model_config=model.config.to_dict(),
        cache={},
        class_names=["EGFR_negative", "EGFR_positive"],
        versions={"clam": "0"},
        baseline={},
        feature_norm={"method": "none"},
    )


def test_the_checkpoint_holds_exactly_the_documented_keys_and_reads_back(tmp_path):
    import clam.checkpoints

    checkpoint = built_checkpoint()
    assert tuple(checkpoint) == CHECKPOINT_KEYS + EXTRA_KEYS
    assert (
        checkpoint["format_version"] == FORMAT_VERSION and checkpoint["metrics"] == checkpoint["history"][-1]
    )
    doc = " ".join(clam.checkpoints.__doc__.split())
    documented = [key for key in CHECKPOINT_KEYS + EXTRA_KEYS if f"``{key}``" in doc]
    assert documented == list(CHECKPOINT_KEYS + EXTRA_KEYS) and "``best``" not in doc
    save_checkpoint(tmp_path / "c.pt", checkpoint)
    progress = saved_progress(read_checkpoint(tmp_path / "c.pt"))
    assert (
        progress.epoch,
        progress.loss,
        progress.best_epoch,
        progress.best_loss,
        progress.epochs_since_best,
    ) == (2, 0.5, 1, 0.4, 1)
    assert progress.history == checkpoint["history"]


def test_a_newer_format_version_is_refused_and_older_ones_read(tmp_path):
    checkpoint = built_checkpoint()
    save_checkpoint(tmp_path / "newer.pt", {**checkpoint, "format_version": FORMAT_VERSION + 1})
    for read in (read_checkpoint, read_model_file):
        with pytest.raises(PipelineError, match=f"format version {FORMAT_VERSION + 1}, newer than this code"):
            read(tmp_path / "newer.pt")
    with pytest.raises(PipelineError, match="newer than this code"):
        load_checkpoint(checkpoint_path=tmp_path / "newer.pt", model=build_model(in_dim=8), device="cpu")
    unversioned = {k: v for k, v in checkpoint.items() if k != "format_version"}
    save_checkpoint(tmp_path / "old.pt", unversioned)
    assert read_checkpoint(tmp_path / "old.pt")["epoch"] == 2
    _, _, epoch, loss = load_checkpoint(checkpoint_path=tmp_path / "old.pt", model=build_model(in_dim=8))
    assert (epoch, loss) == (2, 0.5)


# ---------------------------------------------------------------- weights of mahmoodlab/CLAM


def _wrap_in_data_parallel(state_dict, where):
    # What nn.DataParallel adds: around the whole model, or (CLAM's relocate()) around attention_net.
    if where == "model":
        return {f"module.{k}": v for k, v in state_dict.items()}
    return {k.replace("attention_net.", "attention_net.module.", 1): v for k, v in state_dict.items()}


CLAM_LAYOUTS = {
    # name: (ReferenceCLAM arguments, DataParallel wrapping, expected model_type, model_size, n_classes)
    "sb_small": (dict(), None, "clam_sb", "small", 2),
    "sb_big_without_dropout": (dict(size="big", dropout=False), None, "clam_sb", "big", 2),
    "mb_three_classes": (dict(n_classes=3, multi_branch=True), None, "clam_mb", "small", 3),
    "old_sb_without_dropout": (dict(dropout=False, old_layout=True), None, "clam_sb", "small", 2),
    "old_mb_big_with_dropout": (
        dict(size="big", multi_branch=True, old_layout=True),
        None,
        "clam_mb",
        "big",
        2,
    ),
    "data_parallel_model": (dict(with_loss_buffers=True), "model", "clam_sb", "small", 2),
    "data_parallel_attention_net": (
        dict(old_layout=True, dropout=False),
        "attention_net",
        "clam_sb",
        "small",
        2,
    ),
}


@pytest.mark.parametrize("layout", sorted(CLAM_LAYOUTS))
def test_clam_state_dicts_load_and_predict_as_clam(tmp_path, layout):
    from clam_reference import clam_state_dict

    arguments, wrapped, model_type, model_size, n_classes = CLAM_LAYOUTS[layout]
    reference, state_dict = clam_state_dict(embed_dim=24, **arguments)
    if wrapped:
        state_dict = _wrap_in_data_parallel(state_dict, wrapped)
    path = tmp_path / "s_0_checkpoint.pt"
    torch.save(state_dict, path)  # what CLAM's training writes: the bare state dict
    features = torch.randn(9, 24)
    expected = reference(features)

    rebuilt, checkpoint = model_from_checkpoint(path, "cpu")  # settings from the tensor shapes
    config = rebuilt.config
    assert (config.model_type, config.model_size, config.in_dim, config.n_classes) == (
        model_type,
        model_size,
        24,
        n_classes,
    )
    assert getattr(config, "feature_norm", "none") == "none"  # CLAM feeds raw features
    assert checkpoint["checkpoint_format"] == "clam_state_dict" and "epoch" not in checkpoint
    torch.testing.assert_close(rebuilt(features).probs[0], expected, rtol=1e-5, atol=1e-6)

    # load_checkpoint, signature and return tuple unchanged; the optimizer is left as it was.
    model = build_model(model_type, in_dim=24, n_classes=n_classes, model_size=model_size, dropout=0.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = optimizer.state_dict()
    loaded, loaded_optimizer, epoch, loss = load_checkpoint(
        checkpoint_path=path, model=model, optimizer=optimizer, device="cpu"
    )
    assert loaded is model and loaded_optimizer is optimizer and optimizer.state_dict() == before
    assert epoch == 0 and math.isnan(loss)
    torch.testing.assert_close(loaded.eval()(features).probs[0], expected, rtol=1e-5, atol=1e-6)


def test_a_clam_state_dict_that_does_not_fit_the_model_is_explained(tmp_path):
    from clam_reference import clam_state_dict

    _, state_dict = clam_state_dict(embed_dim=24, multi_branch=True)
    torch.save(state_dict, tmp_path / "s_0_checkpoint.pt")
    with pytest.raises(
        PipelineError, match="does not fit this model: it was saved from model_type=clam_mb.*in_dim=24"
    ):
        load_checkpoint(
            checkpoint_path=tmp_path / "s_0_checkpoint.pt", model=build_model("clam_sb", in_dim=24)
        )


def test_clam_without_gated_attention_and_other_models_are_refused(tmp_path):
    from clam_reference import clam_state_dict

    _, ungated = clam_state_dict(embed_dim=24, gate=False)
    torch.save(ungated, tmp_path / "ungated.pt")
    with pytest.raises(PipelineError, match="without gated attention"):
        model_from_checkpoint(tmp_path / "ungated.pt")
    torch.save(
        {"fc.0.weight": torch.zeros(4, 8), "classifier.weight": torch.zeros(2, 4)}, tmp_path / "mil.pt"
    )
    with pytest.raises(PipelineError, match="not a CLAM_SB/CLAM_MB state dict.*fc.0.weight"):
        model_from_checkpoint(tmp_path / "mil.pt")
    _, state_dict = clam_state_dict(embed_dim=24)
    state_dict["attention_net.0.weight"] = torch.zeros(768, 24)  # a fork with another embedding width
    torch.save(state_dict, tmp_path / "wide.pt")
    with pytest.raises(PipelineError, match="not one of CLAM's sizes"):
        model_from_checkpoint(tmp_path / "wide.pt")


def test_a_clam_state_dict_cannot_be_resumed(tmp_path):
    from clam_reference import clam_state_dict

    torch.save(clam_state_dict(embed_dim=24)[1], tmp_path / "s_0_checkpoint.pt")
    with pytest.raises(PipelineError, match="bare state dict.*not resumed"):
        read_checkpoint(tmp_path / "s_0_checkpoint.pt")


def test_this_projects_weights_saved_bare_keep_their_feature_standardisation(tmp_path):
    from clam.model import ModelConfig

    if "feature_norm" not in ModelConfig.__dataclass_fields__:
        pytest.skip("this ModelConfig has no feature_norm")
    torch.manual_seed(0)
    model = build_model("clam_sb", in_dim=8, feature_norm="standard").eval()
    model.feature_norm.set_statistics(torch.arange(8.0), torch.full((8,), 2.0))
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    rebuilt, _ = model_from_checkpoint(tmp_path / "bare.pt")
    assert rebuilt.config.feature_norm == "standard"
    features = torch.randn(1, 5, 8)
    torch.testing.assert_close(rebuilt(features).probs, model(features).probs)
