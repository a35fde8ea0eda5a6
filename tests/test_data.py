"""Bags for training: cache resolution, validation, datasets, padding, imbalance, splits."""

from __future__ import annotations

import logging
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from random_data import (
    cohort_slides,
    random_cache_config,
    refresh_manifest,
    write_cohort_folders,
    write_random_bag_folder,
    write_random_cache,
)

from clam.bag_dataset import BagDataset, collate_bags, instance_rows
from clam.data import (
    BagRecord,
    records_from_cache,
    records_from_labels_csv,
    resolve_cache,
    validate_records,
)
from clam.loading import epoch_order, inverse_frequency_weights, plan_loading
from clam.splits import assign_patient_folds, patient_labels, read_split, train_val_split, write_split
from feature_extraction.bags import bag_path, read_attrs, write_bag
from feature_extraction.cache import find_cache, read_cache_config
from feature_extraction.embed import EmbedConfig
from feature_extraction.errors import BagError, PipelineError
from feature_extraction.layout import discover_slides
from feature_extraction.manifest import read_manifest
from feature_extraction.sources import SlideSource


@pytest.fixture
def cache(tmp_path) -> Path:
    return write_random_cache(tmp_path / "features", cohort_slides(8), feature_dim=16)


def validated(cache_dir: Path):
    records = records_from_cache(cache_dir, None, "train")
    return validate_records(records, cache_dir, 2, read_cache_config(cache_dir), progress=False)


def test_records_from_cache_are_validated_with_sizes(cache):
    bags = validated(cache)
    assert len(bags.records) == len(cohort_slides(8))
    assert bags.feature_dim == 16 and bags.cache_key == read_cache_config(cache)["cache_key"]
    assert all(r.n_instances >= 5 for r in bags.records)
    # a patient's plain and _cnn bags share its patient id
    assert Counter(r.patient_id for r in bags.records)["P000"] == 2


def test_corrupt_bag_is_named(cache):
    victim = bag_path(cache, "EGFR_positive__P001")
    victim.write_bytes(victim.read_bytes()[:200])  # truncated
    with pytest.raises(BagError, match="EGFR_positive__P001.h5"):
        validated(cache)


def test_nan_bag_is_named(cache):
    path = bag_path(cache, "EGFR_negative__P002")
    features = np.ones((4, 16), np.float32)
    features[2, 3] = np.nan
    write_bag(
        path, features, np.zeros((4, 2)), ["a", "b", "c", "d"], read_attrs(path)
    )  # the same bag, but a NaN
    with pytest.raises(BagError, match=r"EGFR_negative__P002\.h5.*NaN"):
        validated(cache)


def test_bag_from_another_cache_is_refused(cache):
    other = write_random_cache(cache.parent, cohort_slides(2, seed=5), feature_dim=16, cache_key="otherkey")
    other_key = read_cache_config(other)["cache_key"]
    assert other_key != read_cache_config(cache)["cache_key"]  # another name, another real key
    # A bag of the other cache copied into this one, under a slide id of this cohort.
    bag_path(cache, "EGFR_negative__P000").write_bytes(bag_path(other, "EGFR_negative__P000").read_bytes())
    with pytest.raises(BagError, match=f"cache key '{other_key}'.*never mixed"):
        validated(cache)


def test_random_caches_have_the_real_key_of_their_configuration(cache):
    config = read_cache_config(cache)
    assert random_cache_config(16).cache_key == config["cache_key"] and len(config["cache_key"]) == 64
    assert cache.name == random_cache_config(16).folder_name
    assert all(r.status == "ok" for r in read_manifest(cache))


def test_mixed_caches_in_a_bag_folder_are_refused(tmp_path):
    slides = cohort_slides(4)
    labels_csv = write_random_bag_folder(tmp_path / "bags", slides, feature_dim=16)
    one = write_random_cache(tmp_path / "features", slides[:1], feature_dim=16, cache_key="keyA")
    bag_path(tmp_path / "bags", slides[0].slide_id).write_bytes(
        bag_path(one, slides[0].slide_id).read_bytes()
    )
    records = records_from_labels_csv(labels_csv, tmp_path / "bags")
    with pytest.raises(BagError, match="different feature caches"):
        validate_records(records, tmp_path / "bags", 2, progress=False)


def test_feature_dimension_mismatch_is_named(tmp_path):
    slides = cohort_slides(4)
    labels_csv = write_random_bag_folder(tmp_path / "bags", slides, feature_dim=16)
    write_random_bag_folder(tmp_path / "other" / "bags", slides[-1:], feature_dim=8)
    other_bag = bag_path(tmp_path / "other" / "bags", slides[-1].slide_id)
    bag_path(tmp_path / "bags", slides[-1].slide_id).write_bytes(other_bag.read_bytes())
    with pytest.raises(BagError, match=f"{slides[-1].slide_id}.h5: feature dimension 8, expected 16"):
        validate_records(
            records_from_labels_csv(labels_csv, tmp_path / "bags"), tmp_path / "bags", 2, progress=False
        )


def test_labels_csv_reads_stamp_feats_bags(tmp_path):
    slides = cohort_slides(4)
    labels_csv = write_random_bag_folder(tmp_path / "bags", slides, feature_dim=12, features_name="feats")
    bags = validate_records(
        records_from_labels_csv(labels_csv, tmp_path / "bags"), tmp_path / "bags", 2, progress=False
    )
    assert bags.feature_dim == 12 and bags.cache_key is None
    assert [r.label for r in bags.records] == [s.label for s in slides]
    features, label, _ = BagDataset(bags.records, 100, 0, True, in_memory=True, progress=False)[0]
    assert features.shape == (slides[0].n_instances, 12) and label == slides[0].label


def test_labels_csv_problems_are_explained(tmp_path):
    slides = cohort_slides(2)
    labels_csv = write_random_bag_folder(tmp_path / "bags", slides)
    bag_path(tmp_path / "bags", slides[0].slide_id).unlink()
    with pytest.raises(PipelineError, match=f"no bag in .*{slides[0].slide_id}"):
        records_from_labels_csv(labels_csv, tmp_path / "bags")
    labels_csv.write_text("slide_id,label\nX,maybe\n")
    with pytest.raises(PipelineError, match="'maybe' is neither"):
        records_from_labels_csv(labels_csv, tmp_path / "bags")
    labels_csv.write_text("slide,class\n")
    with pytest.raises(PipelineError, match="needs the columns"):
        records_from_labels_csv(labels_csv, tmp_path / "bags")


def test_label_outside_n_classes_is_refused(cache):
    records = records_from_cache(cache, None, "train")
    with pytest.raises(PipelineError, match="outside 0..0"):
        validate_records(records, cache, 1, progress=False)


def test_instance_draws_fresh_per_epoch_fixed_for_validation():
    first, second = instance_rows(50, 10, 0, "s", 1), instance_rows(50, 10, 0, "s", 2)
    assert len(first) == 10 and len(set(first)) == 10 and np.all(np.diff(first) > 0)
    assert not np.array_equal(first, second)
    assert np.array_equal(first, instance_rows(50, 10, 0, "s", 1))  # seeded
    assert np.array_equal(instance_rows(50, 10, 0, "s", None), instance_rows(50, 10, 0, "s", None))
    assert instance_rows(8, 10, 0, "s", 1) is None and instance_rows(50, 0, 0, "s", 1) is None


def test_memory_and_streaming_datasets_serve_the_same_instances(cache):
    records = validated(cache).records
    memory = BagDataset(records, 7, 3, True, in_memory=True, progress=False)
    stream = BagDataset(records, 7, 3, True, in_memory=False, progress=False)
    for epoch in (1, 2):
        memory.set_epoch(epoch)
        stream.set_epoch(epoch)
        for i in range(len(records)):
            a, b = memory[i][0], stream[i][0]
            assert a.shape == (min(7, records[i].n_instances), 16)
            assert torch.equal(a, b)


def test_collate_pads_and_masks():
    items = [(torch.ones(3, 4), 1, 0), (torch.ones(5, 4) * 2, 0, 1)]
    batch = collate_bags(items)
    assert batch.features.shape == (2, 5, 4)
    assert batch.mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert batch.features[0, 3:].abs().sum() == 0
    assert batch.labels.tolist() == [1, 0] and batch.indices.tolist() == [0, 1]
    assert collate_bags([(torch.ones(3, 4), 1, 0)] * 2).mask is None  # nothing padded


def test_class_weights_average_one_per_bag():
    weights = inverse_frequency_weights([30, 10])
    assert weights == pytest.approx([40 / 60, 40 / 20])
    assert (30 * weights[0] + 10 * weights[1]) / 40 == pytest.approx(1.0)
    assert inverse_frequency_weights([5, 0]) == [1.0, 0.0]


def test_loading_plan_never_oversubscribes(monkeypatch):
    monkeypatch.setattr("clam.loading.available_cores", lambda: 2)
    cpu = torch.device("cpu")
    memory = plan_loading(10 << 20, "auto", 4, cpu)
    assert memory.in_memory and memory.num_workers == 0
    stream = plan_loading(10 << 20, "no", 4, cpu)
    assert not stream.in_memory and stream.num_workers == 1 and stream.torch_threads == 1
    assert plan_loading(1 << 60, "auto", 4, cpu).in_memory is False  # larger than memory: stream
    assert plan_loading(10 << 20, "no", 0, cpu).num_workers == 0


# ---------------------------------------------------------------- finding or making the cache


def test_find_cache_reuses_a_cache_with_enough_tiles(tmp_path):
    slides = cohort_slides(4)
    sources = discover_slides(write_cohort_folders(tmp_path / "train", slides), "train")
    small = write_random_cache(tmp_path / "features", slides, max_tiles=50)
    big = write_random_cache(tmp_path / "features", slides, max_tiles=500)
    find = lambda *args: find_cache(tmp_path / "features", "resnet50_trunc", *args)  # noqa: E731
    assert find("imagenet", 100, 0, sources) == big  # 50 tiles cannot serve a draw of 100
    assert find("imagenet", 50, 0, sources) == small  # the exact configuration first
    assert find("random", 50, 0, sources) is None
    extra = SlideSource("EGFR_negative__P999", "P999", "EGFR_negative", 0, "train", tmp_path)
    assert find("imagenet", 50, 0, sources + [extra]) is None  # a slide without a bag


def test_missing_slides_are_embedded_first_and_said(tmp_path, monkeypatch, caplog):
    slides = cohort_slides(4)
    data_dir = write_cohort_folders(tmp_path / "train", slides)
    existing = write_random_cache(tmp_path / "features", slides[:-1])  # the last slide is not embedded yet
    calls = []

    def embed_cohort(config, data_dir, split, features_dir):  # stands in for stage 1: completes the cache
        calls.append((config, Path(data_dir), split, features_dir))
        write_random_cache(tmp_path / "features", slides)
        return types.SimpleNamespace(cache_dir=existing)

    monkeypatch.setattr("clam.data.embed_cohort", embed_cohort)
    caplog.set_level(logging.INFO)
    cache_dir, ids = resolve_cache(
        tmp_path / "features",
        data_dir,
        "train",
        backbone="resnet50_trunc",
        weights="random",
        max_tiles=30,
        seed=4,
        device="cpu",
    )
    assert cache_dir == existing and ids == {s.slide_id for s in slides}
    ((config, called_dir, split, features_dir),) = calls
    assert called_dir == data_dir and split == "train"
    assert features_dir == tmp_path / "features"
    # decode workers and batch size stay embed's "auto": clam's --num_workers counts bag loaders
    assert config == EmbedConfig(
        backbone="resnet50_trunc", weights="random", max_tiles=30, seed=4, device="cpu"
    )
    assert config.num_workers == config.batch_size == "auto"
    assert "embedding them first" in caplog.text


def test_a_cache_folder_is_used_as_is_and_gaps_are_named(tmp_path):
    slides = cohort_slides(4)
    cache_dir = write_random_cache(tmp_path / "features", slides[:-1])
    assert resolve_cache(cache_dir, None, "train", backbone="x", weights="y", max_tiles=1, seed=0) == (
        cache_dir,
        None,
    )
    data_dir = write_cohort_folders(tmp_path / "train", slides)
    with pytest.raises(PipelineError, match=f"no bag for 1 of the {len(slides)} slides"):
        resolve_cache(cache_dir, data_dir, "train", backbone="x", weights="y", max_tiles=1, seed=0)


def test_slides_without_a_usable_bag_are_left_out_and_named(cache, caplog):
    bag_path(cache, "EGFR_positive__P003").unlink()
    refresh_manifest(cache)
    (cache / "EGFR_negative__P000.h5").write_bytes(b"not hdf5")
    refresh_manifest(cache)
    records = records_from_cache(cache, None, "train")
    assert {r.slide_id for r in records}.isdisjoint({"EGFR_positive__P003", "EGFR_negative__P000"})
    (warning,) = [r for r in caplog.records if r.name == "clam.data" and r.levelno == logging.WARNING]
    assert "EGFR_negative__P000 (invalid" in warning.getMessage()


# ---------------------------------------------------------------- splits


def test_split_keeps_patients_together_and_is_stratified(cache):
    records = validated(cache).records
    split = train_val_split(records, 0.25, seed=3)
    train_patients = {r.patient_id for r in split.train}
    val_patients = {r.patient_id for r in split.val}
    assert train_patients.isdisjoint(val_patients)
    assert train_patients | val_patients == {r.patient_id for r in records}
    assert {r.label for r in split.val} == {0, 1}  # one patient of each label
    assert len(val_patients) == 2
    reordered = train_val_split(list(reversed(records)), 0.25, seed=3)  # membership ignores input order
    assert {r.slide_id for r in reordered.val} == {r.slide_id for r in split.val}
    assert train_val_split(records, 0.0, 0).val == ()


def test_split_round_trips_through_its_file(cache, tmp_path):
    records = validated(cache).records
    split = train_val_split(records, 0.25, seed=0)
    write_split(tmp_path / "split.csv", split)
    assert read_split(tmp_path / "split.csv", records) == split
    with pytest.raises(PipelineError, match="does not list"):
        read_split(tmp_path / "split.csv", records + (records[0].__class__("new", "P9", 0, Path("x")),))


def test_patient_folds_are_disjoint_stratified_and_seeded():
    labels = {f"P{i:02d}": int(i < 12) for i in range(30)}  # 12 positive, 18 negative patients
    folds = assign_patient_folds(labels, 5, seed=0)
    assert set(folds) == set(labels) and set(folds.values()) == set(range(5))
    for fold in range(5):
        members = [p for p, f in folds.items() if f == fold]
        assert len(members) == 6
        assert sum(labels[p] for p in members) in (2, 3)
    assert folds == assign_patient_folds(dict(reversed(list(labels.items()))), 5, seed=0)
    assert folds != assign_patient_folds(labels, 5, seed=1)


def test_patient_with_two_labels_is_refused(cache):
    records = list(validated(cache).records)
    records.append(records[0].__class__("x", records[0].patient_id, 1 - records[0].label, Path("x")))
    with pytest.raises(PipelineError, match="two labels"):
        patient_labels(records)


def test_epoch_order_is_seeded_per_epoch_and_can_balance_classes():
    records = [
        BagRecord(f"s{i}", f"P{i}", int(i < 5), Path(f"s{i}.h5")) for i in range(50)
    ]  # 5 positive, 45 negative
    first = epoch_order(records, 2, seed=0, epoch=1, balanced=False)
    assert sorted(first) == list(range(50)) and first == epoch_order(records, 2, 0, 1, False)
    assert first != epoch_order(records, 2, 0, 2, False)
    drawn = [records[i].label for epoch in range(1, 21) for i in epoch_order(records, 2, 0, epoch, True)]
    assert 0.4 < sum(drawn) / len(drawn) < 0.6  # positives drawn about half the time, not 10%
