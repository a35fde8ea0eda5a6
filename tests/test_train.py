"""``python -m clam.train``: the specification's commands, run layout, resume, variants."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from random_data import (
    cohort_slides,
    random_cache_config,
    write_cohort_folders,
    write_random_bag_folder,
    write_random_cache,
)

from clam.checkpoints import model_from_checkpoint
from clam.run_record import RunState
from clam.train import TrainConfig, load_checkpoint, main, train
from feature_extraction.bags import bag_path, read_attrs, read_bag, write_bag

REPO = Path(__file__).resolve().parents[1]
SPEC_KEYS = {"model_state_dict", "optimizer_state_dict", "epoch", "loss", "args"}


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A project root with the spec's train/ and test/ cohort folders and their feature cache."""
    train_slides = cohort_slides(12, "train", seed=1)
    test_slides = cohort_slides(6, "test", with_cnn=False, seed=2)
    write_cohort_folders(tmp_path / "train", train_slides)
    write_cohort_folders(tmp_path / "test", test_slides)
    write_random_cache(tmp_path / "features", train_slides + test_slides, feature_dim=24)
    monkeypatch.setenv("CLAM_PROJECT_ROOT", str(tmp_path))
    return tmp_path


def only_run(project: Path) -> Path:
    runs = sorted((project / "clam" / "checkpoints").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("run_")
    return runs[0]


def quick(tmp_path: Path, **overrides) -> TrainConfig:
    return TrainConfig(
        **{"num_epochs": 2, "output_dir": str(tmp_path / "runs"), "progress": False, **overrides}
    )


# ---------------------------------------------------------------- the specification's example commands


@pytest.mark.slow
def test_spec_python_m_clam_train_with_defaults(project):
    env = {**os.environ, "CLAM_PROJECT_ROOT": str(project), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "clam.train"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    run = only_run(project)
    assert {f"checkpoint_epoch_{n}.pt" for n in range(1, 11)} <= {p.name for p in run.iterdir()}
    assert "epoch 10/10" in result.stdout and "val loss" in result.stdout and "bacc" in result.stdout
    assert json.loads((run / "config.json").read_text())["args"]["num_epochs"] == 10


def test_spec_custom_data_dir(project):
    assert main(["--data_dir", str(project / "train"), "--no_progress"]) == 0
    config = json.loads((only_run(project) / "config.json").read_text())
    assert config["epoch"] == 10 and config["status"] == "finished"


def test_spec_train_on_test_data(project):
    assert main(["--data_dir", str(project / "test"), "--split", "test", "--no_progress"]) == 0
    split = (only_run(project) / "split.csv").read_text()
    assert "C-S-EGFR_positive__" in split and "EGFR_positive_cnn" not in split


def test_spec_custom_parameters(project):
    argv = [
        "--data_dir",
        str(project / "train"),
        "--split",
        "train",
        "--model_size",
        "big",
        "--dropout",
        "0.5",
        "--k_sample",
        "16",
        "--num_epochs",
        "50",
        "--learning_rate",
        "0.00001",
    ]
    assert (
        main(argv + ["--num_epochs", "2", "--no_progress"]) == 0
    )  # the spec's command, shortened to 2 epochs
    checkpoint = torch.load(only_run(project) / "checkpoint_epoch_2.pt", weights_only=True)
    assert checkpoint["model_config"]["model_size"] == "big" and checkpoint["model_config"]["k_sample"] == 16
    assert checkpoint["args"]["dropout"] == 0.5 and checkpoint["args"]["learning_rate"] == 1e-5


def test_spec_load_checkpoint_example(project):
    assert main(["--num_epochs", "2", "--no_progress"]) == 0
    run = only_run(project)
    model, _ = model_from_checkpoint(run / "best_model.pt", "cpu")
    optimizer = torch.optim.Adam(model.parameters())
    model, optimizer, epoch, loss = load_checkpoint(
        checkpoint_path=str(run / "checkpoint_epoch_2.pt"), model=model, optimizer=optimizer, device="cpu"
    )
    assert epoch == 2 and loss == json.loads((run / "config.json").read_text())["loss"]


# ---------------------------------------------------------------- run layout and contents


def test_run_layout_and_checkpoint_contents(project):
    run = train(TrainConfig(num_epochs=2, progress=False, val_fraction=0.3))
    assert run == only_run(project)
    assert {p.name for p in run.iterdir()} == {
        "config.json",
        "split.csv",
        "checkpoint_epoch_1.pt",
        "checkpoint_epoch_2.pt",
        "best_model.pt",
        "training.html",  # the run's page and its curves (tests/test_training_report.py)
        "curves.png",
    }
    config = json.loads((run / "config.json").read_text())
    history = config["metrics"]
    assert [row["epoch"] for row in history] == [1, 2]
    for key in (
        "train_loss",
        "train_auc",
        "train_balanced_accuracy",
        "val_loss",
        "val_auc",
        "val_balanced_accuracy",
    ):
        assert key in history[0]
    assert config["epoch"] == 2 and config["loss"] == history[-1]["val_loss"]
    best = min(history, key=lambda row: row["val_loss"])
    assert (config["best_epoch"], config["best_loss"]) == (best["epoch"], best["val_loss"])
    assert config["cache"]["cache_key"] == random_cache_config(24).cache_key
    assert config["imbalance"]["method"] == "loss" and len(config["imbalance"]["class_weights"]) == 2
    assert {"torch", "numpy", "h5py", "scikit-learn"} <= set(config["versions"])
    assert config["loader"]["in_memory"] is True and config["loader"]["num_workers"] == 0

    for epoch in (1, 2):
        checkpoint = torch.load(run / f"checkpoint_epoch_{epoch}.pt", weights_only=True)
        assert SPEC_KEYS <= set(checkpoint) and checkpoint["epoch"] == epoch
        assert checkpoint["args"]["learning_rate"] == 1e-4 and checkpoint["model_config"]["in_dim"] == 24
        assert "rng_state" in checkpoint and checkpoint["cache"]["feature_dim"] == 24
    best_checkpoint = torch.load(run / "best_model.pt", weights_only=True)
    assert best_checkpoint["epoch"] == best["epoch"]
    same_epoch = torch.load(run / f"checkpoint_epoch_{best['epoch']}.pt", weights_only=True)
    for key, value in same_epoch["model_state_dict"].items():
        assert torch.equal(best_checkpoint["model_state_dict"][key], value)


def test_without_validation_the_best_model_has_the_lowest_training_loss(project, tmp_path):
    run = train(quick(tmp_path, num_epochs=3, val_fraction=0.0, learning_rate=1e-3))
    config = json.loads((run / "config.json").read_text())
    assert "val_loss" not in config["metrics"][0]
    best = min(config["metrics"], key=lambda row: row["train_loss"])
    assert config["best_epoch"] == best["epoch"]
    assert torch.load(run / "best_model.pt", weights_only=True)["epoch"] == best["epoch"]


# ---------------------------------------------------------------- resume


def final_state(run: Path, epoch: int) -> dict:
    return torch.load(run / f"checkpoint_epoch_{epoch}.pt", weights_only=True)


def test_resume_ends_where_the_uninterrupted_run_ends(project, tmp_path):
    config = quick(tmp_path, num_epochs=3, batch_size=2, max_tiles=10)
    whole = train(config)
    first = train(TrainConfig(**{**config.__dict__, "num_epochs": 1}))
    # A library resume overrides only the names in ``explicit``: here the longer run.
    resumed = train(
        TrainConfig(**{**config.__dict__, "resume": str(first / "checkpoint_epoch_1.pt")}),
        explicit=frozenset({"num_epochs"}),
    )
    assert resumed == first  # continues in its own run folder
    a, b = final_state(whole, 3), final_state(resumed, 3)
    for key, value in a["model_state_dict"].items():
        assert torch.equal(value, b["model_state_dict"][key]), key
    assert a["loss"] == b["loss"]
    assert [row["train_loss"] for row in a["history"]] == [row["train_loss"] for row in b["history"]]
    assert torch.equal(
        a["optimizer_state_dict"]["state"][0]["exp_avg"], b["optimizer_state_dict"]["state"][0]["exp_avg"]
    )
    assert json.loads((resumed / "config.json").read_text())["epoch"] == 3


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of ``folder`` (hidden ones too): its bytes and mtime."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_bare_resume_continues_the_run_as_it_was_started(project, tmp_path, capsys):
    runs = tmp_path / "runs"
    args = [
        "--num_epochs",
        "3",
        "--patience",
        "5",
        "--max_tiles",
        "10",
        "--output_dir",
        str(runs),
        "--no_progress",
    ]
    assert main(args) == 0
    (whole,) = runs.iterdir()
    # The same run interrupted after epoch 1: its folder as it was then.
    cut = tmp_path / "cut" / whole.name
    cut.mkdir(parents=True)
    for name in ("split.csv", "checkpoint_epoch_1.pt"):
        shutil.copy2(whole / name, cut / name)
    capsys.readouterr()

    assert main(["--resume", str(cut / "checkpoint_epoch_1.pt")]) == 0  # nothing else typed
    assert "epoch 3/3" in capsys.readouterr().out
    assert sorted(p.name for p in cut.glob("checkpoint_epoch_*.pt")) == [
        f"checkpoint_epoch_{n}.pt" for n in (1, 2, 3)
    ]
    args_saved = final_state(cut, 3)["args"]
    assert (args_saved["num_epochs"], args_saved["patience"], args_saved["progress"]) == (3, 5, False)
    a, b = final_state(whole, 3), final_state(cut, 3)
    for key, value in a["model_state_dict"].items():
        assert torch.equal(value, b["model_state_dict"][key]), key  # bit-identical to the uninterrupted run
    assert [row["val_loss"] for row in a["history"]] == [row["val_loss"] for row in b["history"]]
    config = json.loads((cut / "config.json").read_text())
    assert (
        config["status"] == "finished"
        and config["args"]["num_epochs"] == 3
        and config["args"]["patience"] == 5
    )

    # A larger --num_epochs extends the run; the other arguments stay the run's.
    assert main(["--resume", str(cut / "checkpoint_epoch_3.pt"), "--num_epochs", "4"]) == 0
    assert "epoch 4/4" in capsys.readouterr().out
    assert final_state(cut, 4)["args"]["num_epochs"] == 4 and final_state(cut, 4)["args"]["patience"] == 5

    # A smaller one (or the run's own end again): said, exit 0, and nothing in the run folder changes.
    before = snapshot(cut)
    assert main(["--resume", str(cut / "checkpoint_epoch_4.pt"), "--num_epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "nothing to train" in out and "epoch 4" in out and "--num_epochs 2" in out
    assert main(["--resume", str(cut / "checkpoint_epoch_4.pt")]) == 0
    assert "nothing to train" in capsys.readouterr().out
    assert snapshot(cut) == before


def test_resume_refuses_to_change_the_run(project, tmp_path, capsys):
    run = train(quick(tmp_path, num_epochs=1))
    checkpoint = str(run / "checkpoint_epoch_1.pt")
    assert main(["--resume", checkpoint, "--learning_rate", "0.01", "--no_progress"]) == 2
    assert "--learning_rate (run: 0.0001, given: 0.01)" in capsys.readouterr().err
    assert main(["--resume", checkpoint, "--num_epochs", "2", "--no_progress"]) == 0  # more epochs is fine
    assert (run / "checkpoint_epoch_2.pt").is_file()


def test_resume_refuses_bags_re_embedded_since_the_checkpoint(project, tmp_path, capsys):
    run = train(quick(tmp_path, num_epochs=1))
    checkpoint = str(run / "checkpoint_epoch_1.pt")
    saved = torch.load(checkpoint, weights_only=True)["bag_versions"]
    trained = sorted(r["slide_id"] for r in csv.DictReader(open(run / "split.csv")) if r["set"] == "train")
    assert set(trained) <= set(saved)
    # a rerun of stage 1 rewrites one bag: same features, another embedding time
    bag = next((project / "features").glob(f"*/{trained[0]}.h5"))
    old = read_bag(bag)
    write_bag(bag, old.features, old.coords, old.tile_names, {**read_attrs(bag), "embedded_at": "2030-01-01"})
    assert main(["--resume", checkpoint, "--num_epochs", "2", "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert f"1 of the bags that {checkpoint} trained or validated on changed" in err and trained[0] in err
    assert not (run / "checkpoint_epoch_2.pt").exists()


# ---------------------------------------------------------------- instance loss and accuracy


def clam_instance_eval(model, bag: torch.Tensor, label: int) -> tuple[torch.Tensor, int, int]:
    """mahmoodlab/CLAM's ``inst_eval`` for the bag's class (CLAM-SB, no subtyping), written out on
    the model's (standardised) features: the instance loss and (correct, all) predictions."""
    if model.feature_norm is not None:
        bag = model.feature_norm(bag)
    h = model.attention_net[:3](bag)
    attention = torch.softmax(model.attention_net[3](h)[0].T, dim=1)  # (1, N)
    k = min(model.config.k_sample, len(bag) // 2)
    top = torch.topk(attention, k)[1][-1]
    bottom = torch.topk(-attention, k, dim=1)[1][-1]
    logits = model.instance_classifiers[label](torch.cat([h[top], h[bottom]]))
    targets = torch.cat([torch.ones(k), torch.zeros(k)]).long()
    predictions = torch.topk(logits, 1, dim=1)[1].squeeze(1)
    return torch.nn.functional.cross_entropy(logits, targets), int((predictions == targets).sum()), 2 * k


def test_the_model_computes_the_instance_loss_in_eval_mode_when_asked():
    from clam.model import build_model

    torch.manual_seed(0)
    model = build_model("clam_sb", in_dim=12, k_sample=3, dropout=0.0)
    bag, label = torch.randn(1, 11, 12), torch.tensor([1])
    trained = model.train()(bag, None, label)
    assert model.train()(bag, None, label, instance_eval=False).instance_loss is None
    assert model.eval()(bag, None, label).instance_loss is None  # eval mode, as before: no instance loss
    evaluated = model.eval()(bag, None, label, instance_eval=True)
    torch.testing.assert_close(evaluated.instance_loss, trained.instance_loss)  # no dropout: the same loss
    loss, correct, total = clam_instance_eval(model, bag[0], 1)
    torch.testing.assert_close(evaluated.instance_loss, loss)
    assert evaluated.instance_hits.tolist() == [correct, total] == trained.instance_hits.tolist()


def test_validation_logs_the_instance_loss_and_accuracy_and_monitors_the_bag_loss(project, tmp_path):
    from clam.bag_dataset import BagDataset
    from clam.splits import read_split
    from clam.training import load_bags

    config = quick(tmp_path, k_sample=2, val_fraction=0.3)
    run = train(config)
    history = json.loads((run / "config.json").read_text())["metrics"]
    for row in history:
        assert {"train_instance_loss", "train_inst_acc", "val_instance_loss", "val_inst_acc"} <= set(row)
        assert 0.0 <= row["train_inst_acc"] <= 1.0 and 0.0 <= row["val_inst_acc"] <= 1.0

    # The epoch-2 numbers, recomputed bag by bag with CLAM's validation code on the epoch-2 weights.
    model, _ = model_from_checkpoint(run / "checkpoint_epoch_2.pt", "cpu")
    split = read_split(run / "split.csv", load_bags(config).records)
    bags = BagDataset(split.val, 0, 0, False, in_memory=True, progress=False)
    bag_losses, instance_losses, correct, total = [], [], 0, 0
    with torch.inference_mode():
        for i in range(len(bags)):
            features, label, _ = bags[i]
            logits = model(features).logits
            bag_losses.append(torch.nn.functional.cross_entropy(logits, torch.tensor([label])))
            loss, right, n = clam_instance_eval(model, features, label)
            instance_losses.append(loss)
            correct, total = correct + right, total + n
    row = history[1]
    assert row["val_loss"] == pytest.approx(float(torch.stack(bag_losses).mean()), rel=1e-5)  # plain bag CE
    assert row["val_instance_loss"] == pytest.approx(float(torch.stack(instance_losses).mean()), rel=1e-5)
    assert row["val_inst_acc"] == pytest.approx(correct / total)
    assert json.loads((run / "config.json").read_text())["best_loss"] == min(r["val_loss"] for r in history)


# ---------------------------------------------------------------- --max_tiles and --sample_tiles


def test_max_tiles_cuts_bags_to_the_embedding_subset_and_sample_tiles_draws_per_epoch(
    project, tmp_path, caplog
):
    from clam.bag_dataset import BagDataset
    from clam.training import load_bags
    from feature_extraction.bags import read_bag
    from feature_extraction.sources import select_subset

    config = quick(tmp_path, max_tiles=10)
    caplog.set_level(logging.INFO)
    bags = load_bags(config)
    assert "bags hold more tiles" in caplog.text
    big = [r for r in bags.records if r.rows is not None]
    assert big and all(r.n_instances <= 10 for r in bags.records)
    for record in bags.records:
        bag = read_bag(record.path)
        expected = select_subset(bag.tile_names, record.slide_id, 10, 0)  # what embed --max_tiles 10 keeps
        assert record.n_instances == len(expected) and (record.rows is None) == (len(bag.tile_names) <= 10)
        for in_memory in (True, False):
            every = BagDataset(
                [record], 0, 0, True, in_memory, progress=False
            )  # --sample_tiles 0 (the default)
            for epoch in (1, 2):
                every.set_epoch(epoch)
                assert torch.equal(
                    every[0][0], torch.from_numpy(bag.features[expected])
                )  # every epoch: all of them
            assert torch.equal(
                BagDataset([record], 0, 0, False, in_memory, progress=False)[0][0], every[0][0]
            )
    # --sample_tiles 4: a fresh draw of 4 of the bag's 10 each training epoch, a fixed one for validation.
    record = big[0]
    features = read_bag(record.path).features[list(record.rows)]

    def rows_of(x):
        return sorted(next(i for i, f in enumerate(features) if np.array_equal(f, r)) for r in x.numpy())

    drawn = BagDataset([record], 4, 0, True, False, progress=False)
    draws = []
    for epoch in (1, 2, 3):
        drawn.set_epoch(epoch)
        draws.append(rows_of(drawn[0][0]))
    assert all(len(d) == 4 for d in draws) and len({tuple(d) for d in draws}) > 1
    val = BagDataset([record], 4, 0, False, True, progress=False)
    assert rows_of(val[0][0]) == rows_of(val[0][0]) and len(rows_of(val[0][0])) == 4

    run = train(config)  # the feature statistics, the baseline and both sides use the cut bags
    saved = json.loads((run / "config.json").read_text())
    assert saved["args"]["sample_tiles"] == 0 and saved["args"]["max_tiles"] == 10
    n_train = saved["data"]["n_train_bags"]
    assert saved["feature_norm"]["n_bags"] == n_train
    train_ids = {
        line.split(",")[0]
        for line in (run / "split.csv").read_text().splitlines()[1:]
        if line.endswith(",train")
    }
    assert saved["feature_norm"]["n_instances"] == sum(
        r.n_instances for r in bags.records if r.slide_id in train_ids
    )
    assert saved["baseline"]["train_auc"] is not None


def test_a_checkpoint_from_before_sample_tiles_resumes_drawing_max_tiles_per_epoch(project, tmp_path):
    cache_dir = next((project / "features").iterdir())
    # What such a run did: --max_tiles 10 drew 10 instances of each whole bag every epoch. Today that
    # is --max_tiles 0 --sample_tiles 10 (the cache given as a folder, so --max_tiles picks nothing).
    today = quick(tmp_path, features_dir=str(cache_dir), max_tiles=0, sample_tiles=10, num_epochs=3)
    whole = train(today)
    first = train(replace(today, num_epochs=1))
    old = torch.load(first / "checkpoint_epoch_1.pt", weights_only=True)
    old["args"] = {k: v for k, v in old["args"].items() if k != "sample_tiles"} | {"max_tiles": 10}
    torch.save(old, first / "checkpoint_epoch_1.pt")

    train(replace(today, resume=str(first / "checkpoint_epoch_1.pt")), explicit=frozenset({"num_epochs"}))
    resumed = final_state(first, 3)
    assert (resumed["args"]["max_tiles"], resumed["args"]["sample_tiles"]) == (10, 10)
    for key, value in final_state(whole, 3)["model_state_dict"].items():
        assert torch.equal(value, resumed["model_state_dict"][key]), key


# ---------------------------------------------------------------- optimiser


class _AdamWithoutFused(torch.optim.Adam):
    """Adam as torch < 2.4 behaves on a CPU: ``fused=True`` is refused."""

    def __init__(self, params, *args, fused=None, **kwargs):
        if fused:
            raise RuntimeError(
                "`fused=True` requires all the params to be floating point Tensors of supported "
                "devices: ['cuda']"
            )
        super().__init__(params, *args, **kwargs)


def test_adam_falls_back_from_fused_when_torch_refuses_it(project, tmp_path, monkeypatch):
    from clam.epochs import is_fused, make_optimizer

    model = torch.nn.Linear(3, 2)
    config = quick(tmp_path)
    assert is_fused(make_optimizer(model, config, torch.device("cpu")))  # this torch has it
    monkeypatch.setattr(torch.optim, "Adam", _AdamWithoutFused)
    optimizer = make_optimizer(model, config, torch.device("cpu"))
    assert not is_fused(optimizer) and len(optimizer.param_groups[0]["params"]) == 2  # every parameter
    run = train(config)  # a whole run on the fallback
    assert json.loads((run / "config.json").read_text())["optimizer"] == {"name": "Adam", "fused": False}
    # A torch older than 2.4 is not even asked for the fused kernel on a CPU.
    asked = []
    monkeypatch.setattr(
        torch.optim,
        "Adam",
        lambda params, **kwargs: asked.append(kwargs) or _AdamWithoutFused(params, **kwargs),
    )
    monkeypatch.setattr(torch, "__version__", "2.2.2+cpu")
    make_optimizer(model, config, torch.device("cpu"))
    assert asked == [{"lr": 1e-4, "weight_decay": 1e-5}]


def test_a_checkpoint_of_a_fused_run_resumes_on_the_fallback(project, tmp_path, monkeypatch):
    run = train(quick(tmp_path, num_epochs=1))
    assert torch.load(run / "checkpoint_epoch_1.pt", weights_only=True)["optimizer_state_dict"][
        "param_groups"
    ][0]["fused"]
    monkeypatch.setattr(torch.optim, "Adam", _AdamWithoutFused)  # e.g. resumed where torch is older
    train(
        quick(tmp_path, num_epochs=2, resume=str(run / "checkpoint_epoch_1.pt")),
        explicit=frozenset({"num_epochs"}),
    )
    saved = torch.load(run / "checkpoint_epoch_2.pt", weights_only=True)["optimizer_state_dict"][
        "param_groups"
    ][0]
    assert not saved["fused"]


# ---------------------------------------------------------------- variants and inputs


def test_mb_svm_subtyping_padded_batches(project, tmp_path):
    run = train(
        quick(
            tmp_path,
            model_type="clam_mb",
            instance_loss="svm",
            subtyping=True,
            batch_size=4,
            balance="sampler",
            model_size="big",
            k_sample=30,
        )
    )
    checkpoint = torch.load(run / "checkpoint_epoch_2.pt", weights_only=True)
    assert checkpoint["model_config"]["model_type"] == "clam_mb"
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in checkpoint["history"])
    assert json.loads((run / "config.json").read_text())["imbalance"]["class_weights"] is None


def test_streaming_from_disk_trains_like_memory(project, tmp_path):
    memory = train(quick(tmp_path, in_memory="yes", batch_size=3, max_tiles=8))
    stream = train(quick(tmp_path, in_memory="no", num_workers=1, batch_size=3, max_tiles=8))
    config = json.loads((stream / "config.json").read_text())
    assert config["loader"]["in_memory"] is False and config["loader"]["num_workers"] == 1
    a, b = final_state(memory, 2), final_state(stream, 2)
    for key, value in a["model_state_dict"].items():
        torch.testing.assert_close(value, b["model_state_dict"][key])


def test_labels_csv_and_a_folder_of_stamp_bags(tmp_path):
    slides = cohort_slides(8)
    labels_csv = write_random_bag_folder(tmp_path / "bags", slides, feature_dim=20, features_name="feats")
    run = train(quick(tmp_path, labels_csv=str(labels_csv), features_dir=str(tmp_path / "bags")))
    checkpoint = torch.load(run / "checkpoint_epoch_2.pt", weights_only=True)
    assert checkpoint["model_config"]["in_dim"] == 20 and checkpoint["cache"]["cache_key"] is None


def test_a_cache_folder_alone_is_enough(project, tmp_path):
    shutil.rmtree(project / "train")
    cache_dir = next((project / "features").iterdir())
    run = train(quick(tmp_path, features_dir=str(cache_dir)))
    assert json.loads((run / "config.json").read_text())["data"]["n_train_bags"] > 0


def test_corrupt_bag_stops_the_cli_with_its_name(project, capsys):
    cache_dir = next((project / "features").iterdir())
    victim = bag_path(cache_dir, "EGFR_negative__P002")
    victim.write_bytes(victim.read_bytes()[:300])
    assert main(["--no_progress"]) == 2
    assert "EGFR_negative__P002.h5" in capsys.readouterr().err
    assert not (project / "clam" / "checkpoints").exists()  # nothing trained, no run folder


def test_missing_cohort_is_explained(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLAM_PROJECT_ROOT", str(tmp_path))
    assert main(["--no_progress"]) == 2
    assert "EGFR_positive/<patient>/<tiles>" in capsys.readouterr().err


def test_help_says_what_k_sample_is(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "highest- and how many lowest-attention instances" in text
    for argument in (
        "--data_dir",
        "--split",
        "--max_tiles",
        "--num_workers",
        "--model_size",
        "--dropout",
        "--k_sample",
        "--n_classes",
        "--num_epochs",
        "--batch_size",
        "--learning_rate",
    ):
        assert argument in text


def test_early_stopping_counts_epochs_without_improvement():
    state = RunState()
    for epoch, loss in enumerate([1.0, 0.9, 0.95, 0.97], start=1):
        state.record(epoch, {"loss": 0.5}, {"loss": loss}, 1.0, patience=2)
        assert state.stopped_early == (epoch == 4)
    assert (state.best_epoch, state.best_loss) == (2, 0.9)


# ---------------------------------------------------------------- end to end on the example cohort


@pytest.mark.slow
def test_a_fresh_cohort_is_embedded_first_then_trained(tiny_cohort, tmp_path, capsys):
    data_dir = tiny_cohort.split_dirs["train"]
    argv = [
        "--data_dir",
        str(data_dir),
        "--features_dir",
        str(tmp_path / "features"),
        "--weights",
        "random",
        "--num_epochs",
        "1",
        "--output_dir",
        str(tmp_path / "runs"),
        "--num_workers",
        "0",
        "--no_progress",
    ]
    assert main(argv) == 0
    assert "embedding them first" in capsys.readouterr().out
    run = next((tmp_path / "runs").iterdir())
    config = json.loads((run / "config.json").read_text())
    assert config["cache"]["weights"] == "random" and config["cache"]["feature_dim"] == 1024
    assert config["data"]["n_train_bags"] + config["data"]["n_val_bags"] == 6
    assert main(argv) == 0  # the second run reuses the cache
    assert "embedding them first" not in capsys.readouterr().out
    cohort = tmp_path / "cohort"  # a tile changes: its slide is embedded again before training
    shutil.copytree(data_dir, cohort)
    tile = next(p for p in sorted(cohort.rglob("*.png")))
    tile.write_bytes(next(p for p in sorted(cohort.rglob("*.png")) if p != tile).read_bytes())
    assert main(["--data_dir", str(cohort)] + argv[2:]) == 0
    assert "embedding them first" in capsys.readouterr().out


def auc_on_test_split(checkpoint: Path, cache_dir: Path) -> float | None:
    """ROC AUC of ``checkpoint`` on the test split of ``cache_dir`` (every instance, as validation uses them)."""
    from clam.bag_dataset import BagDataset, collate_bags
    from clam.data import records_from_cache, validate_records
    from clam.metrics import roc_auc
    from feature_extraction.cache import read_cache_config

    model, saved = model_from_checkpoint(checkpoint, "cpu")
    args = saved["args"]
    bags = validate_records(
        records_from_cache(cache_dir, None, "test"),
        cache_dir,
        args["n_classes"],
        read_cache_config(cache_dir),
        progress=False,
    )
    dataset = BagDataset(
        bags.records, args.get("sample_tiles", 0), args["seed"], train=False, in_memory=True, progress=False
    )
    with torch.inference_mode():
        probs = torch.cat([model(collate_bags([dataset[i]]).features).probs for i in range(len(dataset))])
    return roc_auc([r.label for r in bags.records], probs.numpy(), args["n_classes"])[0]


@pytest.mark.slow
def test_default_training_on_the_example_cohort_reaches_a_test_auc_of_0_9(tmp_path):
    from feature_extraction.backbones import load_backbone
    from feature_extraction.embed import EmbedConfig, embed_cohort
    from feature_extraction.errors import PipelineError
    from feature_extraction.example_cohort import build_example_cohort

    try:  # the default backbone weights where this machine has them; else seeded random weights
        load_backbone("resnet50_trunc", "imagenet")
        weights = "imagenet"
    except PipelineError:
        weights = "random"
        print("ImageNet weights unavailable: this test runs with randomly initialised backbone weights")
    build_example_cohort(tmp_path, seed=0)
    run = train(
        TrainConfig(
            data_dir=str(tmp_path / "train"),
            features_dir=str(tmp_path / "features"),
            output_dir=str(tmp_path / "runs"),
            weights=weights,
            progress=False,
        )
    )  # embeds first
    report = embed_cohort(
        EmbedConfig(weights=weights, progress=False),
        tmp_path / "test",
        "test",
        features_dir=tmp_path / "features",
    )
    auc = auc_on_test_split(run / "best_model.pt", report.cache_dir)
    assert auc >= 0.9
    # The same bags x30 + 30 (a scale where CLAM on raw features wandered): standardised, the same AUC.
    from random_data import transform_cache

    scaled = transform_cache(
        report.cache_dir, tmp_path / "scaled" / report.cache_dir.name, lambda f, _: f * 30 + 30
    )
    rerun = train(TrainConfig(features_dir=str(scaled), output_dir=str(tmp_path / "runs"), progress=False))
    assert auc_on_test_split(rerun / "best_model.pt", scaled) == pytest.approx(auc, abs=1e-6)
