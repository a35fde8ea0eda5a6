"""Patient-level K-fold cross-validation (clam.crossval) and evaluation of its fold models."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from random_data import cohort_slides, write_random_cache

from clam import attention as attention_cli
from clam.crossval import cross_validate, evaluate_folds
from clam.data import BagRecord
from clam.eval_config import EvaluateConfig
from clam.folds import fold_splits, make_folds, read_folds, write_folds
from clam.metrics import auc_with_ci, epoch_metrics
from clam.run_files import SPLITS_FILE
from clam.train import TrainConfig, main
from feature_extraction.errors import PipelineError


def records(n_patients: int, seed: int = 0) -> list[BagRecord]:
    return [
        BagRecord(s.slide_id, s.patient_id, s.label, Path(f"{s.slide_id}.h5"), s.class_folder)
        for s in cohort_slides(n_patients, seed=seed)
    ]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cv")
    return write_random_cache(root / "features", cohort_slides(12, seed=3), feature_dim=16)


def quick(tmp_path: Path, cache: Path, **overrides) -> TrainConfig:
    return TrainConfig(
        **{
            "features_dir": str(cache),
            "num_epochs": 2,
            "num_workers": 0,
            "weights": "random",
            "output_dir": str(tmp_path / "runs"),
            "progress": False,
            "folds": 3,
            **overrides,
        }
    )


# ---------------------------------------------------------------- folds


def test_folds_are_disjoint_stratified_and_keep_patients_together():
    recs = records(40)
    folds = make_folds(recs, 4, seed=5)
    assert set(folds.values()) == {1, 2, 3, 4} and set(folds) == {r.patient_id for r in recs}  # one fold each
    for fold in range(1, 5):
        labels = [r.label for r in recs if folds[r.patient_id] == fold]
        patients = {r.patient_id for r in recs if folds[r.patient_id] == fold}
        assert len(patients) == 10
        assert sum(1 for p in patients if int(p[1:]) % 2) == 5  # 5 positive, 5 negative patients per fold
        assert set(labels) == {0, 1}
    assert make_folds(recs, 4, seed=5) == folds and make_folds(recs, 4, seed=6) != folds


def test_every_fold_has_three_patient_disjoint_parts():
    recs = records(20)
    folds = make_folds(recs, 4, seed=2)
    splits = fold_splits(recs, folds, 0.25, seed=2)
    for k, split in splits.items():
        parts = [{r.patient_id for r in part} for _, part in split.parts()]
        assert all(not (a & b) for i, a in enumerate(parts) for b in parts[i + 1 :])  # disjoint by patient
        assert sum(len(p) for _, p in split.parts()) == len(recs)  # every slide, once
        assert {r.patient_id for r in split.test} == {p for p, f in folds.items() if f == k}
        assert {r.label for r in split.val} == {0, 1}  # stratified: each class validates
    assert all(not s.val for s in fold_splits(recs, folds, 0.0, seed=2).values())


def test_splits_file_round_trip(tmp_path):
    recs = records(12)
    folds = make_folds(recs, 3, seed=1)
    splits = fold_splits(recs, folds, 0.2, seed=1)
    write_folds(tmp_path / SPLITS_FILE, recs, folds, splits)
    assert read_folds(tmp_path / SPLITS_FILE, recs) == (folds, splits)
    with pytest.raises(PipelineError, match="does not list"):
        read_folds(tmp_path / SPLITS_FILE, recs + records(14)[-2:])
    # A two-part file (slide_id, patient_id, label, fold) gives the test folds only.
    rows = read_csv(tmp_path / SPLITS_FILE)
    with open(tmp_path / "two_part.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "patient_id", "label", "fold"])
        writer.writerows([r["slide_id"], r["patient_id"], r["label"], r["fold"]] for r in rows)
    assert read_folds(tmp_path / "two_part.csv", recs) == (folds, None)
    # A patient tested outside its own fold is refused.
    bad = [dict(r) for r in rows]
    bad[0]["fold_1" if bad[0]["fold"] != "1" else "fold_2"] = "test"
    with open(tmp_path / "bad.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(bad)
    with pytest.raises(PipelineError, match="tested in its own fold only"):
        read_folds(tmp_path / "bad.csv", recs)


def test_too_many_folds_refused():
    with pytest.raises(PipelineError, match="more than the number of patients"):
        make_folds(records(6), 4, seed=0)  # 3 patients per class
    with pytest.raises(PipelineError, match="at least 2"):
        make_folds(records(6), 1, seed=0)


# ---------------------------------------------------------------- training and evaluation


def test_cross_validation_run_summary_and_evaluation(tmp_path, cache, capsys):
    parent = cross_validate(quick(tmp_path, cache), n_bootstrap=50)
    for k in (1, 2, 3):
        fold = parent / f"fold_{k}"
        assert {"config.json", "best_model.pt", "checkpoint_epoch_1.pt", "checkpoint_epoch_2.pt"} <= {
            p.name for p in fold.iterdir()
        }
        parts = read_csv(fold / "split.csv")
        test = {r["slide_id"] for r in parts if r["set"] == "test"}
        assert test == {r["slide_id"] for r in read_csv(parent / SPLITS_FILE) if r["fold"] == str(k)}
        assert {r["slide_id"]: r[f"fold_{k}"] for r in read_csv(parent / SPLITS_FILE)} == {
            r["slide_id"]: r["set"] for r in parts
        }
        patients = {
            name: {r["patient_id"] for r in parts if r["set"] == name} for name in ("train", "val", "test")
        }
        assert (
            patients["val"]
            and not (patients["val"] & patients["test"])
            and not (patients["train"] & patients["val"])
        )

    saved = read_csv(parent / SPLITS_FILE)
    by_patient: dict[str, set[str]] = {}
    for row in saved:
        by_patient.setdefault(row["patient_id"], set()).add(row["fold"])
    assert (
        len(saved) == len({r["slide_id"] for r in saved}) == len(cohort_slides(12, seed=3))
    )  # each bag once
    assert all(len(f) == 1 for f in by_patient.values())  # a patient's plain and _cnn bags in one fold
    assert any(r["slide_id"].startswith("EGFR_positive_cnn") for r in saved)

    summary = json.loads((parent / "summary.json").read_text())
    slides = read_csv(parent / "oof_predictions_slide.csv")
    patients = read_csv(parent / "oof_predictions.csv")
    assert len(patients) == 12 and len({p["patient_id"] for p in patients}) == 12
    for row in summary["folds"]:  # per-fold numbers equal those recomputed from the fold's test predictions
        mine = [s for s in slides if int(s["fold"]) == row["fold"]]
        assert {s["slide_id"] for s in mine} == {
            r["slide_id"]
            for r in read_csv(parent / f"fold_{row['fold']}" / "split.csv")
            if r["set"] == "test"
        }
        y = [int(s["label"]) for s in mine]
        probs = np.array([[float(s["prob_EGFR_negative"]), float(s["prob_EGFR_positive"])] for s in mine])
        again = epoch_metrics(y, probs, 2)
        assert again["auc"] == pytest.approx(row["test_auc"], abs=1e-5)
        assert again["balanced_accuracy"] == pytest.approx(row["test_balanced_accuracy"], abs=1e-9)
        assert row["selection"] == "lowest validation loss" and row["val_auc"] is not None
        assert 0.0 <= row["baseline_test_auc"] <= 1.0
    values = [r["test_auc"] for r in summary["folds"]]
    assert summary["mean"]["test_auc"] == pytest.approx(np.mean(values))
    assert summary["std"]["test_auc"] == pytest.approx(np.std(values, ddof=1))
    y = [int(p["label"]) for p in patients]
    probs = np.array([[float(p["prob_EGFR_negative"]), float(p["prob_EGFR_positive"])] for p in patients])
    pooled = auc_with_ci(y, probs, 2, 50, 0)
    assert summary["pooled_oof"]["auc"]["auc"] == pytest.approx(pooled.auc, abs=1e-5)
    assert summary["pooled_oof"]["auc"]["ci_low"] is not None
    base = np.array(
        [[float(p["baseline_prob_EGFR_negative"]), float(p["baseline_prob_EGFR_positive"])] for p in patients]
    )
    assert summary["pooled_oof"]["baseline_auc"]["auc"] == pytest.approx(
        auc_with_ci(y, base, 2, 0, 0).auc, abs=1e-5
    )
    table = read_csv(parent / "summary.csv")
    assert [r["fold"] for r in table] == ["1", "2", "3", "mean", "std"]

    # reuse of the splits file: identical folds in a new run
    again = cross_validate(
        quick(tmp_path, cache, folds=0, splits=str(parent / SPLITS_FILE), num_epochs=1), n_bootstrap=0
    )
    assert again != parent
    assert read_csv(again / SPLITS_FILE) == read_csv(parent / SPLITS_FILE)

    # evaluation of every fold's model and the ensemble
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text(
        "slide_id,label,patient_id\n"
        + "".join(f"{s['slide_id']},{s['label']},{s['patient_id']}\n" for s in slides)
    )
    result = evaluate_folds(
        EvaluateConfig(
            checkpoint=parent,
            labels_csv=labels_csv,
            features_dir=cache,
            output_dir=tmp_path / "eval",
            device="cpu",
            num_workers=0,
            n_bootstrap=20,
            attention="none",
            progress=False,
        )
    )
    assert set(result.metrics["folds"]) == {"fold_1", "fold_2", "fold_3"}
    assert all((tmp_path / "eval" / f"fold_{k}" / "metrics.json").is_file() for k in (1, 2, 3))
    ensemble = read_csv(tmp_path / "eval" / "predictions.csv")
    fold_preds = [read_csv(tmp_path / "eval" / f"fold_{k}" / "predictions.csv") for k in (1, 2, 3)]
    for i, row in enumerate(ensemble):
        mean = np.mean([float(f[i]["prob_EGFR_positive"]) for f in fold_preds])
        assert float(row["prob_EGFR_positive"]) == pytest.approx(mean, abs=2e-6)
    top = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert top["ensemble"]["per_patient"]["n"] == 12
    # every fold model trained on some of these patients: the ensemble says it is no held-out estimate
    assert top["leakage"]["folds_with_leakage"] == ["fold_1", "fold_2", "fold_3"]
    assert "not a held-out estimate" in top["leakage"]["message"]
    assert all(top["folds"][f"fold_{k}"]["leakage"]["n_slides"] > 0 for k in (1, 2, 3))
    # the fold baselines' ensemble, beside the models' on the same slides
    base = np.mean(
        [[float(f[i]["baseline_prob_EGFR_positive"]) for f in fold_preds] for i in range(len(ensemble))],
        axis=1,
    )
    assert [float(r["baseline_prob_EGFR_positive"]) for r in ensemble] == pytest.approx(
        base.tolist(), abs=2e-6
    )
    assert top["baseline"]["per_patient"]["n"] == 12

    # attention maps need one model: the parent folder is refused with a fold's checkpoint named
    code = attention_cli.main(
        ["--checkpoint", str(parent), "--labels_csv", str(labels_csv), "--features_dir", str(cache)]
    )
    assert code == 2
    assert f"--checkpoint {parent / 'fold_1' / 'best_model.pt'}" in capsys.readouterr().err


def test_single_class_fold_is_reported_not_crashed(tmp_path, cache):
    # A hand-made splits file whose fold 2 holds only negative patients.
    rows = read_csv(cache / "manifest.csv")
    splits = tmp_path / "splits.csv"
    with open(splits, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "patient_id", "label", "fold"])
        for row in rows:
            patient = row["patient_id"]
            label = int(patient[1:]) % 2
            fold = 2 if label == 0 and int(patient[1:]) < 6 else 1
            writer.writerow([row["slide_id"], patient, label, fold])
    assert (
        main(
            [
                "--features_dir",
                str(cache),
                "--splits",
                str(splits),
                "--num_epochs",
                "1",
                "--num_workers",
                "0",
                "--weights",
                "random",
                "--output_dir",
                str(tmp_path / "runs"),
                "--no_progress",
            ]
        )
        == 0
    )
    parent = next((tmp_path / "runs").iterdir())
    summary = json.loads((parent / "summary.json").read_text())
    fold2 = summary["folds"][1]
    assert fold2["test_auc"] is None and "undefined" in fold2["note"]
    assert (
        summary["mean"]["test_auc"] == summary["folds"][0]["test_auc"] and summary["std"]["test_auc"] is None
    )
    # a two-part file: validation parts drawn from the other folds' patients, and recorded
    saved = read_csv(parent / SPLITS_FILE)
    assert {r["fold_2"] for r in saved if r["fold"] == "1"} == {"train", "val"}

    # one fold resumes as a normal run, in its own folder and on its own split
    assert (
        main(
            [
                "--resume",
                str(parent / "fold_2" / "checkpoint_epoch_1.pt"),
                "--num_epochs",
                "2",
                "--no_progress",
            ]
        )
        == 0
    )
    assert json.loads((parent / "fold_2" / "config.json").read_text())["epoch"] == 2
    test = {r["patient_id"] for r in read_csv(parent / "fold_2" / "split.csv") if r["set"] == "test"}
    assert test == {"P000", "P002", "P004"}


def test_cli_refuses_too_many_folds(tmp_path, cache):
    assert (
        main(
            [
                "--features_dir",
                str(cache),
                "--folds",
                "7",
                "--weights",
                "random",
                "--output_dir",
                str(tmp_path / "runs"),
                "--no_progress",
            ]
        )
        != 0
    )
    assert not (tmp_path / "runs").exists()


def test_held_out_folds_remove_the_selection_bias_of_validating_on_the_test_patients(tmp_path):
    """Labels that the features do not carry (pure noise), many epochs, tiny folds: choosing each fold's
    epoch on the patients it is scored on (the old scheme) reports a pooled AUC well above what the
    models really do on unseen patients; the three-part folds report the held-out one."""
    import torch
    from random_data import transform_cache

    from clam.checkpoints import model_from_checkpoint
    from clam.inference import aggregate_patients
    from feature_extraction.bags import read_bag

    slides = cohort_slides(24, seed=4, instances=(6, 12))
    signal = write_random_cache(tmp_path / "signal", slides, feature_dim=8)
    rng = np.random.default_rng(1)
    noise = transform_cache(
        signal, tmp_path / "noise" / signal.name, lambda f, _: rng.normal(size=f.shape).astype(np.float32)
    )
    parent = cross_validate(
        quick(tmp_path, noise, folds=8, num_epochs=15, val_fraction=0.25, seed=1, learning_rate=1e-3),
        n_bootstrap=0,
    )
    summary = json.loads((parent / "summary.json").read_text())
    held_out = summary["pooled_oof"]["auc"]["auc"]

    # The old scheme: each fold's epoch chosen by the loss on its own test patients, scored on them.
    old = []
    for k in range(1, 9):
        test = [r for r in read_csv(parent / f"fold_{k}" / "split.csv") if r["set"] == "test"]
        features = [torch.from_numpy(read_bag(noise / f"{r['slide_id']}.h5").features) for r in test]
        labels = torch.tensor([int(r["label"]) for r in test])
        best = None
        for epoch in range(1, 16):
            model, _ = model_from_checkpoint(parent / f"fold_{k}" / f"checkpoint_epoch_{epoch}.pt")
            with torch.inference_mode():
                probs = torch.cat([model(f).probs for f in features])
            loss = float(torch.nn.functional.nll_loss(probs.log(), labels))
            if best is None or loss < best[0]:
                best = (loss, probs)
        old += [
            {
                "slide_id": r["slide_id"],
                "patient_id": r["patient_id"],
                "label": r["label"],
                "prob_EGFR_negative": float(p[0]),
                "prob_EGFR_positive": float(p[1]),
            }
            for r, p in zip(test, best[1])
        ]
    patients = aggregate_patients(old, ["EGFR_negative", "EGFR_positive"])
    optimistic = auc_with_ci(
        [p["label"] for p in patients],
        np.array([[p["prob_EGFR_negative"], p["prob_EGFR_positive"]] for p in patients]),
        2,
        0,
        0,
    ).auc
    assert optimistic > held_out + 0.2, (optimistic, held_out)  # measured: 0.80 against 0.38
    assert held_out < 0.75  # noise labels: the held-out estimate stays near chance
    text = (parent / "summary.csv").read_text()
    assert "test_auc" in text and "val_auc" in text
