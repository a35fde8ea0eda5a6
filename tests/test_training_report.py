"""training.html and curves.png in every run folder (clam.training_report), and ``--tensorboard``."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import shutil
import sys
from collections import defaultdict
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from PIL import Image
from random_data import cohort_slides, write_random_cache

from clam.crossval import cross_validate
from clam.train import TrainConfig, main, train
from clam.training_report import write_training_report
from feature_extraction.errors import PipelineError

HOSTILE = "<script>alert(1)</script> \"quoted\" 'single' & more"


class Page(HTMLParser):
    """The parts of a page the tests read: the rows of each table with an id (cell texts), every
    element's tag and attributes, and the text outside tags."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = defaultdict(list)
        self.body: dict[str, list[list[str]]] = defaultdict(list)  # the rows with a td cell
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.elements.append((tag, attributes))
        if tag == "table":
            self._table = attributes.get("id")
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []
            row = self.tables[self._table][-1]
            if tag == "td" and not any(r is row for r in self.body[self._table]):
                self.body[self._table].append(row)

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def read_page(run: Path) -> Page:
    return Page((run / "training.html").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return write_random_cache(
        tmp_path_factory.mktemp("report") / "features", cohort_slides(10, seed=4), feature_dim=16
    )


def quick(tmp_path: Path, cache: Path, **overrides) -> TrainConfig:
    return TrainConfig(
        **{
            "features_dir": str(cache),
            "num_epochs": 3,
            "num_workers": 0,
            "output_dir": str(tmp_path / "runs"),
            "progress": False,
            **overrides,
        }
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache) -> Path:
    return train(quick(tmp_path_factory.mktemp("run"), cache, learning_rate=1e-3))


# ---------------------------------------------------------------- the page of one run


def test_a_run_writes_its_page_and_curves(run):
    assert {"training.html", "curves.png"} <= {p.name for p in run.iterdir()}
    assert not list(run.glob(".*.tmp"))  # written atomically
    with Image.open(run / "curves.png") as image:
        assert image.format == "PNG" and image.width > 1000 and image.height > 300
    config = json.loads((run / "config.json").read_text())
    page = read_page(run)

    # every epoch, with its numbers as config.json has them
    rows = page.body["epoch-table"]
    assert [int(row[0]) for row in rows] == [row["epoch"] for row in config["metrics"]] == [1, 2, 3]
    for row, metrics in zip(rows, config["metrics"]):
        # epoch | train loss, auc, balanced accuracy, inst acc | val loss, auc, balanced accuracy, inst acc
        assert row[1] == f"{metrics['train_loss']:.3f}" and row[5] == f"{metrics['val_loss']:.3f}"
        assert row[3] == f"{metrics['train_balanced_accuracy']:.3f}"
        assert row[7] == f"{metrics['val_balanced_accuracy']:.3f}"
    # the best epoch: said, highlighted in the table, and marked on the curves (its legend)
    text = " ".join(" ".join(page.text).split())
    assert f"Epoch {config['best_epoch']} has the lowest validation loss" in text
    highlighted = [row for row in page.tables["epoch-table"] if row and row[0] == str(config["best_epoch"])]
    assert highlighted and ("tr", {"class": "best"}) in page.elements
    assert ("img", {"class": "curves", "src": "curves.png"}) in [
        (tag, {k: v for k, v in attrs.items() if k in ("class", "src")}) for tag, attrs in page.elements
    ]
    # every argument
    arguments = {row[0]: row[1] for row in page.tables["arguments-table"]}
    assert set(arguments) == set(config["args"])
    assert arguments["num_epochs"] == "3" and arguments["learning_rate"] == "0.001"
    assert arguments["features_dir"] == config["args"]["features_dir"]
    # the baseline's validation figure
    assert f"validation AUC {config['baseline']['val_auc']:.3f}" in text
    # the version and the date
    assert f"clam-egfr {config['versions']['clam']}" in text and config["updated"] in text
    # no network, no script
    assert not any(tag == "script" for tag, _ in page.elements)
    assert (
        "http://" not in (run / "training.html").read_text()
        and "https://" not in (run / "training.html").read_text()
    )
    assert "RANDOM weights" not in text


def test_the_split_table_counts_patients_and_slides_of_each_class_in_each_part(run):
    with open(run / "split.csv", newline="") as handle:
        split = list(csv.DictReader(handle))
    expected = {}
    for part, name in (("train", "training"), ("val", "validation")):
        cells = []
        for label in (0, 1):
            rows = [r for r in split if r["set"] == part and r["label"] == str(label)]
            cells.append(f"{len({r['patient_id'] for r in rows})} / {len(rows)}")
        rows = [r for r in split if r["set"] == part]
        expected[name] = [*cells, f"{len({r['patient_id'] for r in rows})} / {len(rows)}"]
    table = read_page(run).tables["split-table"]
    assert table[0] == ["part", "EGFR_negative", "EGFR_positive", "all"]
    assert {row[0]: row[1:] for row in table[1:]} == expected


def test_re_rendering_from_the_files_alone_gives_the_same_page(run, tmp_path, monkeypatch):
    page, curves = (run / "training.html").read_bytes(), (run / "curves.png").read_bytes()
    (run / "training.html").unlink()
    (run / "curves.png").unlink()

    def forbidden(*args, **kwargs):
        raise AssertionError("the report reads only config.json and split.csv")

    monkeypatch.setattr(torch, "load", forbidden)  # no checkpoint
    monkeypatch.setattr("h5py.File", forbidden)  # no bag
    assert write_training_report(run) == run / "training.html"
    assert (run / "training.html").read_bytes() == page
    assert (run / "curves.png").read_bytes() == curves


def test_a_resumed_run_rewrites_its_page_with_every_epoch(tmp_path, cache):
    first = train(quick(tmp_path, cache, num_epochs=1))
    assert [row[0] for row in read_page(first).body["epoch-table"]] == ["1"]
    config = quick(tmp_path, cache, num_epochs=3, resume=str(first / "checkpoint_epoch_1.pt"))
    assert train(config, explicit=frozenset({"num_epochs"})) == first
    page = read_page(first)
    assert [row[0] for row in page.body["epoch-table"]] == ["1", "2", "3"]
    assert "epoch 3 of 3" in " ".join(" ".join(page.text).split())


def test_everything_on_the_page_is_escaped(tmp_path, cache):
    run = train(quick(tmp_path / HOSTILE, cache, num_epochs=1))
    assert HOSTILE in str(run)
    # a config.json whose values were written by hand, in the places the page shows them
    config = json.loads((run / "config.json").read_text())
    config["cache"]["backbone"] = HOSTILE
    config["baseline"]["method"] = HOSTILE
    config["data"]["class_names"] = [HOSTILE, "EGFR_positive"]
    config["args"][HOSTILE] = HOSTILE
    (run / "config.json").write_text(json.dumps(config))
    write_training_report(run)
    raw = (run / "training.html").read_text()
    assert "<script>" not in raw and "&lt;script&gt;alert(1)&lt;/script&gt;" in raw
    assert "&#34;quoted&#34;" in raw and "&#39;single&#39;" in raw and "&amp; more" in raw
    page = read_page(run)
    assert not any(tag == "script" for tag, _ in page.elements)
    assert HOSTILE in "".join(page.text)  # shown as text, unchanged
    assert page.tables["split-table"][0][1] == " ".join(HOSTILE.split())
    assert {row[0]: row[1] for row in page.tables["arguments-table"]}[" ".join(HOSTILE.split())]


def test_features_from_random_weights_get_a_banner(tmp_path):
    cache = write_random_cache(
        tmp_path / "features", cohort_slides(6, seed=2), feature_dim=8, weights="random"
    )
    run = train(quick(tmp_path, cache, num_epochs=1))
    page = read_page(run)
    assert ("p", {"class": "banner", "id": "random-weights"}) in page.elements
    assert "RANDOM weights" in "".join(page.text)


def test_a_page_that_cannot_be_rendered_does_not_lose_the_run(tmp_path, cache, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise ValueError("no figure today")

    monkeypatch.setattr("clam.training_report._plot_curves", broken)
    with caplog.at_level(logging.WARNING, logger="clam.training_report"):
        run = train(quick(tmp_path, cache, num_epochs=2))
    assert {"best_model.pt", "checkpoint_epoch_2.pt", "config.json"} <= {p.name for p in run.iterdir()}
    assert json.loads((run / "config.json").read_text())["status"] == "finished"
    assert not (run / "training.html").exists()
    (warning,) = [r for r in caplog.records if r.name == "clam.training_report"]
    assert "no figure today" in warning.message and "checkpoints are saved" in warning.message
    assert f"python -m clam.report {run}" in warning.message


def test_a_folder_that_is_no_run_is_named(tmp_path):
    with pytest.raises(PipelineError, match="holds no config.json: it is not a training run folder"):
        write_training_report(tmp_path)


def test_old_config_json_files_still_render(run, tmp_path):
    """A run folder of an earlier version: no baseline, no status, no balanced accuracy per epoch."""
    old = tmp_path / "old_run"
    old.mkdir()
    shutil.copy2(run / "split.csv", old / "split.csv")
    config = json.loads((run / "config.json").read_text())
    for key in ("baseline", "status", "feature_norm", "optimizer", "updated"):
        config.pop(key)
    for row in config["metrics"]:
        row.pop("train_balanced_accuracy")
        row.pop("val_balanced_accuracy")
    (old / "config.json").write_text(json.dumps(config))
    write_training_report(old)
    page = read_page(old)
    assert [row[0] for row in page.body["epoch-table"]] == ["1", "2", "3"]
    assert all(row[3] == "n/a" for row in page.body["epoch-table"])
    assert "This run records no baseline." in "".join(page.text)


# ---------------------------------------------------------------- cross-validation


def test_each_fold_gets_its_page_and_the_parent_links_them(tmp_path, cache):
    parent = cross_validate(quick(tmp_path, cache, num_epochs=1, folds=2), n_bootstrap=20)
    page = read_page(parent)
    links = [attrs.get("href") for tag, attrs in page.elements if tag == "a"]
    assert {"fold_1/training.html", "fold_2/training.html", "summary.json"} <= set(links)
    assert [row[0] for row in page.tables["fold-table"][1:]] == ["fold_1", "fold_2"]
    summary = json.loads((parent / "summary.json").read_text())
    for row, fold in zip(page.tables["fold-table"][1:], summary["folds"]):
        assert row[6] == (f"{fold['test_auc']:.3f}" if fold["test_auc"] is not None else "n/a")
    for k in (1, 2):
        fold_page = read_page(parent / f"fold_{k}")
        assert (parent / f"fold_{k}" / "curves.png").is_file()
        assert "../training.html" in [attrs.get("href") for tag, attrs in fold_page.elements if tag == "a"]
        parts = [row[0] for row in fold_page.tables["split-table"][1:]]
        assert parts == ["training", "validation", "held-out test (this fold's patients)"]
    # a --resume of one fold refreshes the parent's page too
    resumed = replace(
        quick(tmp_path, cache, num_epochs=2), resume=str(parent / "fold_1" / "checkpoint_epoch_1.pt")
    )
    train(resumed, explicit=frozenset({"num_epochs"}))
    epochs = {row[0]: row[2] for row in read_page(parent).tables["fold-table"][1:]}
    assert epochs == {"fold_1": "2", "fold_2": "1"}


# ---------------------------------------------------------------- --tensorboard


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_writes_the_scalars_of_every_epoch_under_the_run_folder(tmp_path, cache):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = train(quick(tmp_path, cache, num_epochs=2, tensorboard=True))
    # a resume adds its epochs to the same folder
    resumed = replace(quick(tmp_path, cache, num_epochs=3), resume=str(first / "checkpoint_epoch_2.pt"))
    train(resumed, explicit=frozenset({"num_epochs"}))
    assert list((first / "tensorboard").glob("events.out.tfevents.*"))
    config = json.loads((first / "config.json").read_text())
    steps: dict[str, dict[int, float]] = defaultdict(dict)
    for events in sorted((first / "tensorboard").glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            steps[tag].update({e.step: e.value for e in accumulator.Scalars(tag)})
    for tag in ("train/loss", "val/loss", "train/auc", "val/auc", "val/balanced_accuracy", "learning_rate"):
        assert sorted(steps[tag]) == [1, 2, 3], tag
    for row in config["metrics"]:
        assert steps["val/loss"][row["epoch"]] == pytest.approx(row["val_loss"], rel=1e-6)
        assert steps["train/balanced_accuracy"][row["epoch"]] == pytest.approx(row["train_balanced_accuracy"])
    assert steps["learning_rate"][1] == pytest.approx(1e-4)


def hide_tensorboard(monkeypatch) -> None:
    """As if the tensorboard package were not installed."""
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    for name in [n for n in sys.modules if n.startswith("torch.utils.tensorboard")]:
        monkeypatch.delitem(sys.modules, name)


def test_without_tensorboard_the_flag_says_what_to_install(tmp_path, cache, monkeypatch, capsys):
    hide_tensorboard(monkeypatch)
    runs = tmp_path / "runs"
    args = ["--features_dir", str(cache), "--num_epochs", "1", "--output_dir", str(runs), "--tensorboard"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--tensorboard needs the tensorboard package" in err and "pip install tensorboard" in err
    assert "clam-egfr[tensorboard]" in err and "Traceback" not in err
    assert main([*args, "--folds", "2"]) == 2  # cross-validation too, before any fold
    assert "pip install tensorboard" in capsys.readouterr().err
    with pytest.raises(PipelineError, match="pip install tensorboard"):  # the library, too
        train(quick(tmp_path, cache, tensorboard=True))
    assert not runs.exists()  # refused before a run folder was made
    assert main(args[:-1]) == 0  # without the flag, the same run trains


def test_clam_report_writes_a_run_folders_page_again(run, tmp_path, capsys):
    """`python -m clam.report RUN_DIR` gives a run folder its page again, from the files alone."""
    from clam import report as report_cli

    copy = tmp_path / run.name
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("training.html", "curves.png"))
    assert report_cli.main([str(copy)]) == 0
    assert capsys.readouterr().out.strip() == str(copy / "training.html")
    assert (copy / "curves.png").is_file()
    # the same page, but for the folder it now lies in
    expected = (run / "training.html").read_text().replace(str(run), str(copy))
    assert (copy / "training.html").read_text() == expected
