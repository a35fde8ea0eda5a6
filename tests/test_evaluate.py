"""``python -m clam.evaluate`` and ``python -m clam.attention`` on random feature caches: the files,
their columns and value ranges, metrics that sklearn recomputes from predictions.csv, patient
aggregation, refused caches, one class only, more than two classes, CLAM-MB attention branches."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from random_data import (
    RandomSlide,
    cohort_slides,
    random_cache_config,
    write_cohort_folders,
    write_random_bag_folder,
    write_random_cache,
)
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    recall_score,
    roc_auc_score,
)

from clam import attention as attention_cli
from clam import evaluate as evaluate_cli
from clam.checkpoints import read_checkpoint, save_checkpoint
from clam.eval_config import EvaluateConfig
from clam.evaluation import evaluate
from clam.model import build_model
from clam.run_files import BEST_NAME, newest_run
from feature_extraction.bags import read_bag
from feature_extraction.errors import PipelineError
from feature_extraction.layout import CLASS_NAMES

FEATURE_DIM = 32
CACHE_KEY = random_cache_config(FEATURE_DIM).cache_key  # the real key of write_random_cache's default cache
N_BOOTSTRAP = 200  # the default (1,000) is tested in test_metrics; fewer keep these tests fast


def make_checkpoint(
    run_dir: Path,
    cache_dir: Path | None,
    *,
    model_type: str = "clam_sb",
    n_classes: int = 2,
    in_dim: int = FEATURE_DIM,
    cache_key: str | None = CACHE_KEY,
    seed: int = 0,
    signal_weight: float = 0.0,
) -> Path:
    """A best_model.pt in the layout clam.train writes: the spec's keys plus model_config, cache, class_names.

    ``signal_weight`` > 0 makes the model follow random_data's planted signal (the first
    FEATURE_DIM // 8 features), so that positive bags score higher."""
    torch.manual_seed(seed)
    model = build_model(model_type=model_type, in_dim=in_dim, n_classes=n_classes)
    if signal_weight:
        with torch.no_grad():
            first = model.attention_net[0]
            first.weight.zero_()
            first.bias.zero_()
            first.weight[0, : in_dim // 8] = 1.0  # hidden unit 0 = planted-signal strength
            classifiers = model.classifiers if model_type == "clam_sb" else None
            if classifiers is not None:
                classifiers.weight.zero_()
                classifiers.bias.zero_()
                classifiers.weight[1, 0] = signal_weight
                # relu(sum of 4 N(0,1)) averages ~0.8 without the signal, ~2.5 with a third of tiles at +1.5.
                classifiers.bias[1] = -signal_weight * 1.6
    cache = {}
    if cache_dir is not None:
        cache = {
            **json.loads((cache_dir / "cache.json").read_text()),
            "cache_dir": str(cache_dir),
            "cache_key": cache_key,
            "feature_dim": in_dim,
        }
    names = list(CLASS_NAMES) if n_classes == 2 else [f"class_{c}" for c in range(n_classes)]
    checkpoint = {
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": {},
        "epoch": 3,
        "loss": 0.5,
        "args": {
            "n_classes": n_classes,
            "backbone": "resnet50_trunc",
            "weights": "imagenet",
            "max_tiles": 100,
            "seed": 0,
            "features_dir": str(cache_dir.parent) if cache_dir else None,
            "model_type": model_type,
        },
        "model_config": model.config.to_dict(),
        "cache": cache,
        "class_names": names,
        "format_version": 1,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(run_dir / BEST_NAME, checkpoint)
    return run_dir / BEST_NAME


@pytest.fixture(scope="module")
def test_cohort(tmp_path_factory):
    """A train-split cohort of 10 patients (folders only; half of them with a plain and a ``_cnn``
    slide, so patients have one or two slides) whose bags are all in one random cache."""
    root = tmp_path_factory.mktemp("evaluate")
    slides = cohort_slides(n_patients=10, split="train", with_cnn=True, instances=(6, 30), seed=1)
    cache_dir = write_random_cache(root / "features", slides, feature_dim=FEATURE_DIM)
    data_dir = write_cohort_folders(root / "train", slides)
    return root, data_dir, cache_dir, slides


@pytest.fixture(scope="module")
def evaluated(test_cohort):
    root, data_dir, cache_dir, _ = test_cohort
    checkpoint = make_checkpoint(root / "runs" / "run_20260101_000000", cache_dir, signal_weight=2.0)
    config = EvaluateConfig(
        checkpoint=checkpoint,
        data_dir=data_dir,
        split="train",
        num_workers=0,
        n_bootstrap=N_BOOTSTRAP,
        top_k=3,
        progress=False,
    )
    return evaluate(config)


@contextlib.contextmanager
def logged_lines():
    """The messages clam logs at INFO and above meanwhile, as a list filled while it runs."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger, handler = logging.getLogger("clam"), Collect(logging.INFO)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_writes_every_output_inside_the_run_folder(evaluated, test_cohort):
    out = evaluated.output_dir
    assert out.parent.name == "run_20260101_000000" and out.name.startswith("eval_")
    for name in (
        "predictions.csv",
        "predictions_patient.csv",
        "metrics.json",
        "roc.png",
        "confusion_matrix.png",
    ):
        assert (out / name).stat().st_size > 0, name
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    slides = test_cohort[3]
    for slide in slides:
        assert (out / "attention" / f"{slide.slide_id}.csv").is_file()
        assert (out / "attention" / f"{slide.slide_id}_topk.png").stat().st_size > 0
        assert (out / "attention" / f"{slide.slide_id}_heatmap.png").stat().st_size > 0
    assert len(read_csv(out / "attention" / "index.csv")) == len(slides)


def test_predictions_have_the_documented_columns_and_valid_probabilities(evaluated, test_cohort):
    rows = read_csv(evaluated.output_dir / "predictions.csv")
    columns = [
        "slide_id",
        "patient_id",
        "class_folder",
        "label",
        "label_name",
        "prob_EGFR_negative",
        "prob_EGFR_positive",
        "predicted",
        "predicted_name",
        "n_tiles",
    ]
    assert list(rows[0]) == columns
    by_id = {s.slide_id: s for s in test_cohort[3]}
    assert {r["slide_id"] for r in rows} == set(by_id)
    for row in rows:
        slide = by_id[row["slide_id"]]
        probs = np.array([float(row["prob_EGFR_negative"]), float(row["prob_EGFR_positive"])])
        assert ((probs >= 0) & (probs <= 1)).all() and probs.sum() == pytest.approx(1.0, abs=1e-5)
        assert int(row["predicted"]) == int(np.argmax(probs))
        assert int(row["label"]) == slide.label and row["patient_id"] == slide.patient_id
        assert row["class_folder"] == slide.class_folder
        assert int(row["n_tiles"]) == slide.n_instances  # every instance, no subsampling


def test_patient_rows_are_the_mean_of_their_slides(evaluated):
    slides = read_csv(evaluated.output_dir / "predictions.csv")
    patients = read_csv(evaluated.output_dir / "predictions_patient.csv")
    assert len(patients) == len({r["patient_id"] for r in slides}) == 10
    for patient in patients:
        own = [r for r in slides if r["patient_id"] == patient["patient_id"]]
        assert int(patient["n_slides"]) == len(own)
        for column in ("prob_EGFR_negative", "prob_EGFR_positive"):
            assert float(patient[column]) == pytest.approx(np.mean([float(r[column]) for r in own]), abs=2e-6)
        positive, negative = float(patient["prob_EGFR_positive"]), float(patient["prob_EGFR_negative"])
        assert int(patient["predicted"]) == int(positive > negative)
    p000 = next(p for p in patients if p["patient_id"] == "P000")
    assert p000["n_slides"] == "2" and set(p000["slide_ids"].split(";")) == {
        "EGFR_negative__P000",
        "EGFR_negative_cnn__P000",
    }


@pytest.mark.parametrize(
    "level, table", [("per_slide", "predictions.csv"), ("per_patient", "predictions_patient.csv")]
)
def test_metrics_equal_sklearn_on_the_written_predictions(evaluated, level, table):
    metrics = json.loads((evaluated.output_dir / "metrics.json").read_text())[level]
    rows = read_csv(evaluated.output_dir / table)
    y = np.array([int(r["label"]) for r in rows])
    score = np.array([float(r["prob_EGFR_positive"]) for r in rows])
    pred = np.array([int(r["predicted"]) for r in rows])
    assert metrics["n"] == len(rows)
    assert metrics["auc"]["auc"] == pytest.approx(roc_auc_score(y, score), abs=1e-5)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert metrics["sensitivity"] == pytest.approx(recall_score(y, pred, pos_label=1))
    assert metrics["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0))
    assert metrics["f1"] == pytest.approx(f1_score(y, pred, pos_label=1))
    assert metrics["confusion_matrix"]["matrix"] == confusion_matrix(y, pred, labels=[0, 1]).tolist()
    auc = metrics["auc"]
    assert auc["n_bootstrap"] == N_BOOTSTRAP
    assert 0.0 <= auc["ci_low"] <= auc["auc"] <= auc["ci_high"] <= 1.0


def test_the_signal_following_model_separates_the_classes(evaluated):
    # The checkpoint reads random_data's planted signal, so the pipeline must report a high AUC.
    assert evaluated.metrics["per_slide"]["auc"]["auc"] > 0.9


def test_attention_scores_cover_every_tile_and_sum_to_one(evaluated, test_cohort):
    cache_dir = test_cohort[2]
    for slide in test_cohort[3]:
        rows = read_csv(evaluated.output_dir / "attention" / f"{slide.slide_id}.csv")
        assert list(rows[0]) == ["tile_name", "x", "y", "attention", "attention_raw", "rank"]
        bag = read_bag(cache_dir / f"{slide.slide_id}.h5")
        assert [r["tile_name"] for r in rows] == bag.tile_names
        assert [[int(r["x"]), int(r["y"])] for r in rows] == bag.coords.tolist()
        attention = np.array([float(r["attention"]) for r in rows])
        assert attention.min() >= 0 and attention.sum() == pytest.approx(1.0, abs=1e-5)
        ranks = np.array([int(r["rank"]) for r in rows])
        assert sorted(ranks) == list(range(1, len(rows) + 1))
        assert attention[ranks == 1][0] == attention.max()


def test_default_checkpoint_is_the_newest_runs_best_model(tmp_path):
    runs = tmp_path / "checkpoints"
    for name in ("run_20250101_000000", "run_20260102_000000", "run_20260101_000000"):
        (runs / name).mkdir(parents=True)
        (runs / name / BEST_NAME).write_bytes(b"x")
    (runs / "run_20270101_000000").mkdir()  # a run that has not saved a best model yet
    chosen = newest_run(runs)
    assert chosen.checkpoint == runs / "run_20260102_000000" / BEST_NAME and not chosen.crossval
    assert chosen.describe().endswith(": run_20260102_000000 (single run: best_model.pt)")
    # A newer cross-validation run (no best_model.pt of its own, one per fold) wins over them.
    cv = runs / "run_20260103_000000"
    for fold in (1, 2, 3):
        (cv / f"fold_{fold}").mkdir(parents=True)
        (cv / f"fold_{fold}" / BEST_NAME).write_bytes(b"x")
    (cv / "splits.csv").write_text("slide_id,patient_id,label,fold\n")
    chosen = newest_run(runs)
    assert chosen.checkpoint == cv and chosen.crossval and chosen.n_folds == 3
    assert f"newest run in {runs}: run_20260103_000000 (cross-validation, 3 folds" in chosen.describe()
    with pytest.raises(PipelineError, match="no training run"):
        newest_run(tmp_path / "empty")


def write_crossval_run(parent: Path, cache_dir: Path, n_folds: int = 2) -> None:
    """A --folds run as clam.train writes it, reduced to what evaluation reads: splits.csv, and per fold
    config.json and best_model.pt."""
    parent.mkdir(parents=True)
    (parent / "splits.csv").write_text("slide_id,patient_id,label,fold\nEGFR_negative__P900,P900,0,1\n")
    for fold in range(1, n_folds + 1):
        make_checkpoint(parent / f"fold_{fold}", cache_dir, seed=fold, signal_weight=2.0)
        (parent / f"fold_{fold}" / "config.json").write_text(
            json.dumps({"epoch": 3, "data": {"n_val_bags": 2}})
        )


def test_without_checkpoint_the_newest_run_is_evaluated_whatever_its_kind(
    test_cohort, tmp_path, monkeypatch, capsys
):
    """An older single run and a newer cross-validation run in clam/checkpoints: the newer one
    is evaluated (each fold's model and their ensemble), and the first line says which run and why."""
    root, data_dir, cache_dir, _ = test_cohort
    monkeypatch.setenv("CLAM_PROJECT_ROOT", str(tmp_path))
    runs = tmp_path / "clam" / "checkpoints"
    make_checkpoint(runs / "run_20260101_000000", cache_dir)
    write_crossval_run(runs / "run_20260102_000000", cache_dir)
    monkeypatch.chdir(tmp_path)
    code = evaluate_cli.main(
        [
            "--data_dir",
            str(data_dir),
            "--split",
            "train",
            "--num_workers",
            "0",
            "--n_bootstrap",
            "20",
            "--attention",
            "none",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == (
        "checkpoint: newest run in clam/checkpoints: run_20260102_000000 (cross-validation, "
        "2 folds: each fold's model and their ensemble)"
    )
    assert not list((runs / "run_20260101_000000").glob("eval_*"))  # the older single run is left alone
    (evaluated,) = (runs / "run_20260102_000000").glob("eval_*")
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert sorted(metrics["folds"]) == ["fold_1", "fold_2"] and "ensemble" in metrics
    assert all((evaluated / f"fold_{k}" / "predictions.csv").is_file() for k in (1, 2))


def test_a_cache_with_another_key_is_refused(test_cohort, tmp_path, capsys):
    root, data_dir, cache_dir, _ = test_cohort
    checkpoint = make_checkpoint(tmp_path / "run_20260101_000000", cache_dir, cache_key="another-key")
    config = EvaluateConfig(
        checkpoint=checkpoint, data_dir=data_dir, split="train", num_workers=0, progress=False
    )
    with pytest.raises(PipelineError, match="another-key"):
        evaluate(config)
    # The command line prints the message without a traceback and exits 2.
    code = evaluate_cli.main(
        [
            "--checkpoint",
            str(checkpoint),
            "--data_dir",
            str(data_dir),
            "--split",
            "train",
            "--num_workers",
            "0",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "another-key" in err and "Traceback" not in err
    assert not list(tmp_path.glob("run_*/eval_*/predictions.csv"))


def test_bags_of_another_cache_in_a_labels_csv_are_refused(test_cohort, tmp_path):
    root, _, cache_dir, slides = test_cohort
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "slide_id,label,patient_id\n" + "".join(f"{s.slide_id},{s.label},{s.patient_id}\n" for s in slides)
    )
    checkpoint = make_checkpoint(tmp_path / "run_20260101_000000", cache_dir, cache_key="another-key")
    config = EvaluateConfig(
        checkpoint=checkpoint, labels_csv=labels, features_dir=cache_dir, num_workers=0, progress=False
    )
    with pytest.raises(PipelineError, match="cache key"):
        evaluate(config)


def test_a_model_of_another_feature_dimension_is_refused(test_cohort, tmp_path):
    root, data_dir, cache_dir, _ = test_cohort
    checkpoint = make_checkpoint(tmp_path / "run_1", cache_dir, in_dim=FEATURE_DIM * 2)
    config = EvaluateConfig(
        checkpoint=checkpoint, data_dir=data_dir, split="train", num_workers=0, progress=False
    )
    with pytest.raises(PipelineError, match="feature dimension"):
        evaluate(config)


def test_one_class_only_reports_undefined_auc_without_crashing(tmp_path):
    slides = [s for s in cohort_slides(n_patients=8, split="test", with_cnn=False, seed=2) if s.label == 1]
    cache_dir = write_random_cache(tmp_path / "features", slides, feature_dim=FEATURE_DIM)
    data_dir = write_cohort_folders(tmp_path / "test", slides)
    checkpoint = make_checkpoint(tmp_path / "run_20260101_000000", cache_dir)
    with logged_lines() as lines:
        result = evaluate(
            EvaluateConfig(
                checkpoint=checkpoint,
                data_dir=data_dir,
                num_workers=0,
                n_bootstrap=50,
                attention="none",
                progress=False,
            )
        )
    metrics = json.loads((result.output_dir / "metrics.json").read_text())
    for level in ("per_slide", "per_patient"):
        assert metrics[level]["auc"]["auc"] is None and metrics[level]["auc"]["ci_low"] is None
        assert "only one class present" in metrics[level]["auc"]["reason"]
        assert metrics[level]["specificity"] is None and "specificity" in metrics[level]["undefined"]
        assert metrics[level]["accuracy"] is not None
    assert (result.output_dir / "roc.png").stat().st_size > 0
    assert not (result.output_dir / "attention").exists()
    assert any("undefined" in line for line in lines)


def test_more_than_two_classes_from_a_labels_csv(tmp_path):
    rng = np.random.default_rng(0)
    slides = [
        RandomSlide(f"S{i:02d}", f"P{i // 2:02d}", "", int(i // 2 % 3), "test", int(rng.integers(4, 12)))
        for i in range(18)
    ]
    labels_csv = write_random_bag_folder(tmp_path / "bags", slides, feature_dim=FEATURE_DIM)
    checkpoint = make_checkpoint(
        tmp_path / "run_20260101_000000", None, model_type="clam_mb", n_classes=3, cache_key=None
    )
    result = evaluate(
        EvaluateConfig(
            checkpoint=checkpoint,
            labels_csv=labels_csv,
            features_dir=tmp_path / "bags",
            num_workers=0,
            n_bootstrap=N_BOOTSTRAP,
            attention=("S00", "S05"),
            top_k=2,
            progress=False,
        )
    )
    rows = read_csv(result.output_dir / "predictions.csv")
    assert [c for c in rows[0] if c.startswith("prob_")] == ["prob_class_0", "prob_class_1", "prob_class_2"]
    y = np.array([int(r["label"]) for r in rows])
    probs = np.array([[float(r[f"prob_class_{c}"]) for c in range(3)] for r in rows])
    auc = result.metrics["per_slide"]["auc"]
    assert auc["auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"), abs=1e-5)
    assert auc["ci_low"] <= auc["auc"] <= auc["ci_high"]
    assert set(auc["per_class"]) == {"class_0", "class_1", "class_2"}
    assert np.array(result.metrics["per_patient"]["confusion_matrix"]["matrix"]).shape == (3, 3)
    # Maps only for the slides asked for; the tile images are unknown, the montage still draws.
    assert sorted(p.name for p in (result.output_dir / "attention").glob("*_topk.png")) == [
        "S00_topk.png",
        "S05_topk.png",
    ]
    # CLAM-MB: the map is the predicted class's branch.
    index = {r["slide_id"]: r for r in read_csv(result.output_dir / "attention" / "index.csv")}
    assert all(r["branch"] == r["predicted"] for r in index.values())


def test_unknown_attention_slide_is_refused(test_cohort, tmp_path):
    root, data_dir, cache_dir, _ = test_cohort
    checkpoint = make_checkpoint(tmp_path / "run_1", cache_dir)
    config = EvaluateConfig(
        checkpoint=checkpoint,
        data_dir=data_dir,
        split="train",
        num_workers=0,
        attention=("nope",),
        progress=False,
    )
    with pytest.raises(PipelineError, match="nope"):
        evaluate(config)


def test_attention_command_line_for_chosen_slides(test_cohort, tmp_path, capsys):
    root, data_dir, cache_dir, slides = test_cohort
    checkpoint = make_checkpoint(tmp_path / "run_20260101_000000", cache_dir, model_type="clam_mb")
    chosen = [slides[0].slide_id, slides[1].slide_id]
    code = attention_cli.main(
        [
            "--checkpoint",
            str(checkpoint),
            "--data_dir",
            str(data_dir),
            "--split",
            "train",
            "--num_workers",
            "0",
            "--slides",
            *chosen,
            "--top_k",
            "2",
        ]
    )
    assert code == 0
    out = Path(capsys.readouterr().out.strip().splitlines()[-1].split(": ", 1)[1])
    assert out.parent == checkpoint.parent and out.name.startswith("attention_")
    assert sorted(p.name for p in out.glob("*.csv")) == sorted([f"{s}.csv" for s in chosen] + ["index.csv"])
    assert not (out / "metrics.json").exists()


def test_evaluate_command_line_prints_a_summary(test_cohort, tmp_path, capsys):
    root, data_dir, cache_dir, _ = test_cohort
    checkpoint = make_checkpoint(tmp_path / "run_20260101_000000", cache_dir)
    out = tmp_path / "evaluation"
    code = evaluate_cli.main(
        [
            "--checkpoint",
            str(checkpoint),
            "--data_dir",
            str(data_dir),
            "--split",
            "train",
            "--num_workers",
            "0",
            "--n_bootstrap",
            "100",
            "--attention",
            "none",
            "--output_dir",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "AUC [95% CI]" in printed and "slide" in printed and "patient" in printed
    assert f"results: {out}" in printed
    assert json.loads((out / "metrics.json").read_text())["per_slide"]["auc"]["n_bootstrap"] == 100


def test_the_written_checkpoint_format_is_what_clam_train_writes(test_cohort, tmp_path):
    # Guards the helper above against drifting from the real checkpoints.
    checkpoint = read_checkpoint(make_checkpoint(tmp_path / "run_1", test_cohort[2]))
    for key in (
        "model_state_dict",
        "optimizer_state_dict",
        "epoch",
        "loss",
        "args",
        "model_config",
        "cache",
        "class_names",
    ):
        assert key in checkpoint
    assert checkpoint["cache"]["cache_key"] == CACHE_KEY


@pytest.mark.slow
def test_end_to_end_embeds_the_missing_test_slides_with_the_checkpoints_configuration(
    tiny_cohort, trained_on_tiny_cohort
):
    root, run_dir = trained_on_tiny_cohort
    checkpoint = read_checkpoint(run_dir / BEST_NAME)
    train_cache = Path(checkpoint["cache"]["cache_dir"])
    test_dir = tiny_cohort.split_dirs["test"]
    result = evaluate(
        EvaluateConfig(
            data_dir=test_dir,
            checkpoint=run_dir / BEST_NAME,
            num_workers=0,
            n_bootstrap=N_BOOTSTRAP,
            device="cpu",
            progress=False,
        )
    )
    rows = read_csv(result.output_dir / "predictions.csv")
    assert len(rows) == 2 and {r["class_folder"] for r in rows} == {"C-S-EGFR_positive", "C-S-EGFR_negative"}
    # The test slides went into the cache the model was trained on: same key, same folder.
    for row in rows:
        assert (train_cache / f"{row['slide_id']}.h5").is_file()
        assert (
            read_bag(train_cache / f"{row['slide_id']}.h5").attrs["cache_key"]
            == checkpoint["cache"]["cache_key"]
        )
    assert result.metrics["cache_key"] == checkpoint["cache"]["cache_key"]
    assert result.output_dir.parent == run_dir
    # The montage found the real tiles: coordinates come from the example cohort's tile names.
    scores = read_csv(result.output_dir / "attention" / f"{rows[0]['slide_id']}.csv")
    assert all(int(r["x"]) >= 0 and int(r["y"]) >= 0 for r in scores)
    index = read_csv(result.output_dir / "attention" / "index.csv")
    assert all(r["heatmap_png"] for r in index)


@pytest.mark.slow
def test_slides_embedded_to_another_key_than_the_checkpoints_are_refused(
    tiny_cohort, trained_on_tiny_cohort, tmp_path
):
    root, run_dir = trained_on_tiny_cohort
    checkpoint = read_checkpoint(run_dir / BEST_NAME)
    # As if the model had been trained on other weights: the key embedding gives now is not its key.
    checkpoint["cache"] = {
        **checkpoint["cache"],
        "cache_key": "0" * 64,
        "weights_digest": "f" * 64,
        "cache_dir": str(tmp_path / "features" / "gone"),
    }
    save_checkpoint(tmp_path / "run_1" / BEST_NAME, checkpoint)
    config = EvaluateConfig(
        data_dir=tiny_cohort.split_dirs["test"],
        checkpoint=tmp_path / "run_1" / BEST_NAME,
        features_dir=tmp_path / "features",
        num_workers=0,
        device="cpu",
        progress=False,
    )
    with pytest.raises(PipelineError, match="was trained on") as refused:
        evaluate(config)
    assert "weights_digest 'ffff" in str(refused.value) and "Nothing was embedded" in str(refused.value)
    assert not list((tmp_path / "run_1").glob("eval_*"))
    assert not list(tmp_path.rglob("*.h5"))  # refused before a tile was embedded, not after the whole split


def test_slides_that_failed_embedding_are_reported_not_reembedded(tmp_path):
    slides = cohort_slides(n_patients=6, split="test", with_cnn=False, seed=3)
    failed, embedded = slides[0], slides[1:]
    cache_dir = write_random_cache(tmp_path / "features", embedded, feature_dim=FEATURE_DIM)
    with open(cache_dir / "manifest.csv", "a", newline="") as handle:
        csv.writer(handle).writerow(
            [failed.slide_id, failed.patient_id, failed.class_folder, failed.label, "test", 0, "", "failed"]
        )
    data_dir = write_cohort_folders(tmp_path / "test", slides)
    checkpoint = make_checkpoint(tmp_path / "run_1", cache_dir)
    # The checkpoint's weights ("imagenet") cannot be had here: any embedding attempt would fail.
    result = evaluate(
        EvaluateConfig(
            checkpoint=checkpoint,
            data_dir=data_dir,
            num_workers=0,
            n_bootstrap=50,
            attention="none",
            progress=False,
        )
    )
    assert len(result.slides) == len(embedded)
    assert list(result.metrics["left_out"]) == [failed.slide_id]


# ---------------------------------------------------------------- leakage


def write_split_csv(run_dir: Path, rows: list[tuple[str, str, int, str]]) -> None:
    """A run's split.csv (clam.splits' columns): (slide_id, patient_id, label, set) per row."""
    from clam.run_files import SPLIT_COLUMNS, SPLIT_FILE

    with open(run_dir / SPLIT_FILE, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(SPLIT_COLUMNS)
        writer.writerows(rows)


def evaluate_quietly(checkpoint: Path, data_dir: Path, **kwargs):
    config = EvaluateConfig(
        checkpoint=checkpoint,
        data_dir=data_dir,
        split="train",
        num_workers=0,
        n_bootstrap=20,
        attention="none",
        progress=False,
        **kwargs,
    )
    with logged_lines() as lines:
        return evaluate(config), lines


def test_slides_and_patients_the_run_trained_or_validated_on_are_leakage(test_cohort, tmp_path):
    root, data_dir, cache_dir, slides = test_cohort
    checkpoint = make_checkpoint(tmp_path / "run_1", cache_dir)
    by_id = {s.slide_id: s for s in slides}
    # P000 has a plain and a _cnn slide: only the plain one was in training; the _cnn one is the same patient.
    train = ["EGFR_negative__P000", "EGFR_positive__P003"]
    val = ["EGFR_positive__P001", "EGFR_positive_cnn__P001"]
    write_split_csv(
        checkpoint.parent,
        [(s, by_id[s].patient_id, by_id[s].label, "train") for s in train]
        + [(s, by_id[s].patient_id, by_id[s].label, "val") for s in val]
        + [("EGFR_negative__X999", "X999", 0, "train")],
    )  # not in this cohort
    result, lines = evaluate_quietly(checkpoint, data_dir)
    leakage = json.loads((result.output_dir / "metrics.json").read_text())["leakage"]
    assert leakage["checked"] and leakage["split_file"] == str(checkpoint.parent / "split.csv")
    assert (leakage["n_slides"], leakage["n_patients"]) == (5, 3)
    assert leakage["n_evaluated_slides"] == len(slides)
    assert leakage["by_set"]["train"] == {
        "counts_as_leakage": True,
        "n_slides": 3,
        "n_slides_same_id": 2,
        "n_patients": 2,
        "slide_ids": ["EGFR_negative__P000", "EGFR_negative_cnn__P000", "EGFR_positive__P003"],
        "patient_ids": ["P000", "P003"],
    }
    assert leakage["by_set"]["val"]["n_slides"] == 2 and leakage["by_set"]["val"]["patient_ids"] == ["P001"]
    warnings = [part for line in lines for part in line.splitlines() if part.startswith("WARNING:")]
    assert len(warnings) == 2  # when found, and under the summary table
    assert f"5 of the {len(slides)} evaluated slides (3 of 10 patients)" in warnings[0]
    assert "optimistic" in warnings[0]
    assert "training set" in warnings[0] and "validation set" in warnings[0]
    assert "1 of them only by patient id" in warnings[0]
    assert "optimistic" in warnings[1] and "metrics.json: leakage" in warnings[1]


def test_an_external_cohort_and_a_held_out_test_set_are_not_leakage(test_cohort, tmp_path):
    root, data_dir, cache_dir, slides = test_cohort
    checkpoint = make_checkpoint(tmp_path / "run_1", cache_dir)
    # The run trained on other patients; some of the evaluated slides are its held-out "test" set.
    write_split_csv(
        checkpoint.parent,
        [(f"EGFR_positive__T{i}", f"T{i}", 1, "train") for i in range(4)]
        + [("EGFR_negative__V0", "V0", 0, "val")]
        + [(s.slide_id, s.patient_id, s.label, "test") for s in slides[:3]],
    )
    result, lines = evaluate_quietly(checkpoint, data_dir)
    leakage = result.metrics["leakage"]
    assert leakage["checked"] and leakage["n_slides"] == 0 and leakage["n_patients"] == 0
    assert leakage["message"] is None
    assert leakage["by_set"]["train"]["n_slides"] == 0 and leakage["by_set"]["val"]["n_slides"] == 0
    held_out = leakage["by_set"]["test"]
    assert held_out["counts_as_leakage"] is False and held_out["n_slides_same_id"] == 3
    assert not any("WARNING" in line or "leakage" in line for line in lines)


def test_a_checkpoint_without_its_split_file_is_evaluated_with_one_note(test_cohort, tmp_path):
    root, data_dir, cache_dir, _ = test_cohort
    checkpoint = make_checkpoint(tmp_path / "copied", cache_dir)
    result, lines = evaluate_quietly(checkpoint, data_dir)
    leakage = result.metrics["leakage"]
    assert leakage["checked"] is False and leakage["n_slides"] is None and "split.csv" in leakage["reason"]
    assert len([line for line in lines if "not checked for leakage" in line]) == 1
    assert not any(line.startswith("WARNING") for line in lines)
    (checkpoint.parent / "split.csv").write_text("slide_id,patient_id\nEGFR_negative__P000,P000\n")  # no set
    result, lines = evaluate_quietly(checkpoint, data_dir)
    assert (
        result.metrics["leakage"]["checked"] is False
        and "cannot be read" in result.metrics["leakage"]["reason"]
    )


def test_a_fold_without_split_csv_takes_its_split_from_the_parents_splits_csv(test_cohort, tmp_path):
    root, data_dir, cache_dir, slides = test_cohort
    parent = tmp_path / "run_cv"
    checkpoint = make_checkpoint(parent / "fold_2", cache_dir)
    with open(parent / "splits.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "patient_id", "label", "fold"])
        writer.writerow(["EGFR_negative__P000", "P000", 0, 1])  # fold 1 trains fold 2's model
        writer.writerow(["EGFR_positive__P001", "P001", 1, 2])  # fold 2 validates it
    result, _ = evaluate_quietly(checkpoint, data_dir)
    leakage = result.metrics["leakage"]
    assert leakage["split_file"] == str(parent / "splits.csv")
    assert leakage["by_set"]["train"]["patient_ids"] == ["P000"] and leakage["by_set"]["val"][
        "patient_ids"
    ] == ["P001"]
    assert leakage["n_slides"] == 4  # both patients have a plain and a _cnn slide


def test_the_command_line_warns_about_leakage(test_cohort, tmp_path, capsys):
    root, data_dir, cache_dir, slides = test_cohort
    checkpoint = make_checkpoint(tmp_path / "run_1", cache_dir)
    write_split_csv(checkpoint.parent, [(s.slide_id, s.patient_id, s.label, "train") for s in slides])
    code = evaluate_cli.main(
        [
            "--checkpoint",
            str(checkpoint),
            "--data_dir",
            str(data_dir),
            "--split",
            "train",
            "--num_workers",
            "0",
            "--n_bootstrap",
            "20",
            "--attention",
            "none",
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert f"WARNING: leakage: {len(slides)} of the {len(slides)} evaluated slides" in printed
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["leakage"]["n_slides"] == len(slides)


# ---------------------------------------------------------------- weights of mahmoodlab/CLAM


@pytest.mark.parametrize("multi_branch", [False, True])
def test_a_bare_clam_state_dict_is_evaluated_on_bags_of_a_labels_csv(tmp_path, capsys, multi_branch):
    from clam_reference import clam_state_dict

    from clam.checkpoints import load_checkpoint

    rng = np.random.default_rng(4)
    slides = [
        RandomSlide(f"S{i:02d}", f"P{i // 2:02d}", "", i // 2 % 2, "test", int(rng.integers(3, 15)))
        for i in range(8)
    ]
    labels_csv = write_random_bag_folder(tmp_path / "bags", slides, feature_dim=FEATURE_DIM)
    reference, state_dict = clam_state_dict(embed_dim=FEATURE_DIM, multi_branch=multi_branch)
    clam_results = tmp_path / "clam_results"
    clam_results.mkdir()
    checkpoint = clam_results / "s_0_checkpoint.pt"
    torch.save(state_dict, checkpoint)  # as CLAM's core_utils.train() saves it

    # A cohort folder cannot be used: the weights record no feature cache. The message says what to pass.
    code = evaluate_cli.main(
        ["--checkpoint", str(checkpoint), "--data_dir", str(tmp_path / "none"), "--num_workers", "0"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "bare CLAM state dict" in err and "--labels_csv" in err and "--features_dir" in err

    code = evaluate_cli.main(
        [
            "--checkpoint",
            str(checkpoint),
            "--labels_csv",
            str(labels_csv),
            "--features_dir",
            str(tmp_path / "bags"),
            "--num_workers",
            "0",
            "--n_bootstrap",
            "20",
            "--attention",
            "none",
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "bare CLAM state dict" in printed and "not checked for leakage" in printed
    rows = {r["slide_id"]: r for r in read_csv(tmp_path / "out" / "predictions.csv")}
    model = build_model("clam_mb" if multi_branch else "clam_sb", in_dim=FEATURE_DIM)
    load_checkpoint(checkpoint_path=checkpoint, model=model, optimizer=None, device="cpu")
    model.eval()
    for slide in slides:
        features = torch.from_numpy(read_bag(tmp_path / "bags" / f"{slide.slide_id}.h5").features)
        written = np.array(
            [float(rows[slide.slide_id][c]) for c in ("prob_EGFR_negative", "prob_EGFR_positive")]
        )
        with torch.no_grad():
            direct = model(features).probs[0].numpy()  # the model loaded directly
            clam = reference(features).numpy()  # CLAM's own forward pass
        np.testing.assert_allclose(written, direct, atol=2e-6)
        np.testing.assert_allclose(written, clam, atol=2e-6)
        assert int(rows[slide.slide_id]["label"]) == slide.label
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["checkpoint_format"] == "clam_state_dict" and metrics["epoch"] is None
    assert metrics["model_config"]["model_type"] == ("clam_mb" if multi_branch else "clam_sb")
    assert metrics["leakage"]["checked"] is False


@pytest.mark.slow
def test_a_model_trained_on_a_cache_folder_embeds_missing_slides_with_that_caches_weights(
    tiny_cohort, trained_on_tiny_cohort, tmp_path
):
    """Trained from a random-weights cache folder given as --features_dir, with --weights left at its
    default (imagenet): evaluation embeds new slides with the weights the cache records, not the default."""
    import shutil

    from clam.train import TrainConfig, train

    root, first_run = trained_on_tiny_cohort
    cache = Path(read_checkpoint(first_run / BEST_NAME)["cache"]["cache_dir"])
    copy = tmp_path / "features" / cache.name
    shutil.copytree(cache, copy, ignore=shutil.ignore_patterns("C-S-*"))  # the train split's bags only
    run_dir = train(
        TrainConfig(
            features_dir=str(copy),
            num_epochs=1,
            num_workers=0,
            device="cpu",
            progress=False,
            output_dir=str(tmp_path / "runs"),
        )
    )
    checkpoint = read_checkpoint(run_dir / BEST_NAME)
    assert checkpoint["args"]["weights"] == "imagenet" and checkpoint["cache"]["weights"] == "random"
    result = evaluate(
        EvaluateConfig(
            data_dir=tiny_cohort.split_dirs["test"],
            checkpoint=run_dir / BEST_NAME,
            num_workers=0,
            n_bootstrap=0,
            device="cpu",
            attention="none",
            progress=False,
        )
    )
    assert result.metrics["cache_key"] == checkpoint["cache"]["cache_key"]
    assert all((copy / f"{row['slide_id']}.h5").is_file() for row in result.slides)
