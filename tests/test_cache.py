"""The cache: its key and folder name, cache.json, the manifest derived from disk, freshness, the
slide locks; and the typed attributes of a bag (``bags.BagAttrs``), which the cache reads."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from random_data import RandomSlide, random_bag_attrs

from feature_extraction import bags, manifest
from feature_extraction import locks as locks_module
from feature_extraction.bags import (
    BagAttrs,
    bag_path,
    read_attrs,
    read_bag,
    read_bag_attrs,
    validate_bag,
    write_bag,
)
from feature_extraction.cache import (
    ExtractionConfig,
    collect_manifest,
    current_bag,
    find_cache,
    open_cache,
    read_cache_config,
    slide_status,
    sweep_leftovers,
    write_failure,
)
from feature_extraction.errors import BagError, PipelineError
from feature_extraction.locks import SlideLocks
from feature_extraction.manifest import read_manifest, write_manifest
from feature_extraction.sources import SlideSource

CONFIG = ExtractionConfig(
    backbone="resnet50_trunc",
    weights="imagenet",
    weights_digest="ab" * 32,
    transform="resize(224)",
    input_size=224,
    max_tiles=100,
    seed=0,
    feature_dim=1024,
    subset_rule="sha256-rank",
)


def test_the_key_covers_everything_that_changes_a_feature_and_the_name_is_readable():
    changes = dict(
        backbone="resnet50",
        weights_digest="cd" * 32,
        transform="other",
        input_size=256,
        max_tiles=50,
        seed=1,
        feature_dim=2048,
        subset_rule="numpy",
    )
    for name, value in changes.items():
        assert dataclasses.replace(CONFIG, **{name: value}).cache_key != CONFIG.cache_key, name
    # The label is for people: the same weights from the hub or a file give the same features.
    assert dataclasses.replace(CONFIG, weights="file-resnet50").cache_key == CONFIG.cache_key
    assert CONFIG.folder_name == f"resnet50_trunc-imagenet-224px-max100-seed0-{CONFIG.cache_key[:8]}"
    assert dataclasses.replace(CONFIG, max_tiles=0).folder_name.startswith(
        "resnet50_trunc-imagenet-224px-maxall-seed0-"
    )


def test_open_cache_writes_cache_json_and_refuses_a_folder_of_another_key(tmp_path):
    cache_dir = open_cache(tmp_path, CONFIG)
    assert cache_dir == tmp_path / CONFIG.folder_name
    found = read_cache_config(cache_dir)
    for key in (
        "cache_key",
        "backbone",
        "weights",
        "weights_digest",
        "feature_dim",
        "max_tiles",
        "seed",
        "transform",
    ):
        assert key in found
    assert found["cache_key"] == CONFIG.cache_key
    assert open_cache(tmp_path, CONFIG) == cache_dir  # reopening is fine

    (cache_dir / "cache.json").write_text(json.dumps({**found, "cache_key": "0" * 64}))
    with pytest.raises(PipelineError, match="move it away"):
        open_cache(tmp_path, CONFIG)
    with pytest.raises(PipelineError, match="not a feature cache"):
        read_cache_config(tmp_path)


def _bag(cache_dir, slide_id, split="train", n=3, key=CONFIG.cache_key, digest="d1"):
    class_folder, _, patient_id = slide_id.partition("__")
    attrs = dataclasses.replace(
        random_bag_attrs(RandomSlide(slide_id, patient_id, class_folder, 1, split, n), CONFIG),
        cache_key=key,
        tiles_digest=digest,
        n_available=n + 1,
        n_skipped=1,
        source=f"/data/{slide_id}",
        skipped_tiles=({"name": "t9", "reason": "truncated"},),
    )
    write_bag(
        bag_path(cache_dir, slide_id),
        np.ones((n, 4), np.float32),
        np.zeros((n, 2)),
        [f"t{i}" for i in range(n)],
        attrs,
    )


def _cache_of(features_dir: Path, n_available: dict[str, int], **config) -> Path:
    """A cache of CONFIG with ``config`` changed, one bag per slide of ``n_available`` (slide id -> tiles
    found), holding the tiles its max_tiles subset keeps."""
    extraction = dataclasses.replace(CONFIG, **config)
    cache_dir = open_cache(features_dir, extraction)
    for slide_id, found in n_available.items():
        n = found if extraction.max_tiles <= 0 else min(found, extraction.max_tiles)
        class_folder, _, patient_id = slide_id.partition("__")
        attrs = dataclasses.replace(
            random_bag_attrs(RandomSlide(slide_id, patient_id, class_folder, 1, "train", n), extraction),
            n_available=found,
            n_selected=n,
        )
        write_bag(
            bag_path(cache_dir, slide_id),
            np.ones((n, 4), np.float32),
            np.zeros((n, 2)),
            [f"t{i}" for i in range(n)],
            attrs,
        )
    write_manifest(cache_dir, collect_manifest(cache_dir))
    return cache_dir


def test_a_cache_of_another_seed_serves_only_slides_it_holds_whole(tmp_path):
    """``clam.train --seed 1`` must not train on seed 0's subset of a slide with more than --max_tiles
    tiles: a cache of another seed serves only when every slide needed has all its tiles in its bag."""
    features = tmp_path / "features"
    tiles = {"EGFR_positive__P1": 150, "EGFR_negative__P2": 40}  # P1 has more tiles than --max_tiles
    slides = {
        s: SlideSource(s, s.partition("__")[2], s.partition("__")[0], 1, "train", tmp_path / s) for s in tiles
    }
    big, small = slides["EGFR_positive__P1"], slides["EGFR_negative__P2"]
    seed0 = _cache_of(features, tiles)  # max100-seed0

    def find(max_tiles, seed, wanted):
        return find_cache(features, "resnet50_trunc", "imagenet", max_tiles, seed, wanted)

    assert find(100, 0, [big, small]) == seed0  # its own configuration
    assert find(50, 0, [big, small]) == seed0  # the same seed, more tiles: the nested subset is cut to 50
    assert find(100, 1, [big, small]) is None  # seed 0's 100 of P1's 150 tiles are not seed 1's: embed anew
    assert find(50, 1, [big, small]) is None
    assert find(100, 1, [small]) == seed0  # P2's bag holds all its 40 tiles, whatever the seed
    assert find(50, 1, [small]) == seed0  # (and the trainer's cut to 50 leaves them all)
    assert find(30, 1, [small]) == seed0  # all 40 held: the trainer cuts them to seed 1's 30
    everything = _cache_of(features, tiles, max_tiles=0)  # maxall-seed0: every tile of every slide
    assert find(100, 1, [big, small]) == everything  # cut to seed 1's own subset by the trainer
    assert find(100, 0, [big, small]) == seed0  # the exact configuration first
    seed1 = _cache_of(features, tiles, seed=1)
    assert find(100, 1, [big, small]) == seed1


def test_manifest_is_derived_from_bags_and_failure_records(tmp_path):
    cache_dir = open_cache(tmp_path, CONFIG)
    _bag(cache_dir, "EGFR_positive__P1")
    _bag(cache_dir, "C-S-EGFR_negative__T1", split="test", n=2)
    _bag(cache_dir, "EGFR_negative__P2", key="another")
    bag_path(cache_dir, "EGFR_negative__P3").write_bytes(b"half a file")
    write_failure(
        cache_dir,
        dict(
            slide_id="EGFR_negative__P4",
            patient_id="P4",
            class_folder="EGFR_negative",
            label=0,
            split="train",
            reason="no image tiles",
            tiles_digest="d4",
        ),
    )
    write_failure(cache_dir, dict(slide_id="EGFR_positive__P1", reason="an old failure, since fixed"))

    rows = {row.slide_id: row for row in collect_manifest(cache_dir)}
    assert rows["EGFR_positive__P1"].status == "ok" and rows["EGFR_positive__P1"].n_tiles == 3
    assert rows["EGFR_positive__P1"].n_skipped == 1 and rows["EGFR_positive__P1"].label == 1
    assert rows["C-S-EGFR_negative__T1"].split == "test"
    assert rows["EGFR_negative__P2"].status == "invalid" and "cache key" in rows["EGFR_negative__P2"].error
    assert rows["EGFR_negative__P3"].status == "invalid" and rows["EGFR_negative__P3"].patient_id == "P3"
    assert (
        rows["EGFR_negative__P4"].status == "failed" and rows["EGFR_negative__P4"].error == "no image tiles"
    )
    assert [r.split for r in collect_manifest(cache_dir)] == ["", "test"] + [
        "train"
    ] * 3  # unreadable: split unknown

    write_manifest(cache_dir, list(rows.values()))
    again = {row.slide_id: row for row in read_manifest(cache_dir)}
    assert again == rows  # file paths come back absolute
    assert "EGFR_positive__P1.h5" in (cache_dir / "manifest.csv").read_text()  # stored relative
    assert not list(cache_dir.glob(".*.tmp"))


def test_read_manifest_of_a_missing_cache_says_to_run_embed(tmp_path):
    with pytest.raises(PipelineError, match="feature_extraction.embed"):
        read_manifest(tmp_path)


def test_current_bag_needs_the_same_key_and_tiles(tmp_path):
    cache_dir = open_cache(tmp_path, CONFIG)
    _bag(cache_dir, "EGFR_positive__P1", digest="d1")
    assert current_bag(cache_dir, "EGFR_positive__P1", CONFIG.cache_key, "d1").slide_id == "EGFR_positive__P1"
    assert current_bag(cache_dir, "EGFR_positive__P1", CONFIG.cache_key, "changed") is None
    assert current_bag(cache_dir, "EGFR_positive__P1", "other key", "d1") is None
    assert current_bag(cache_dir, "EGFR_positive__P9", CONFIG.cache_key, "d1") is None
    assert (
        current_bag(cache_dir, "EGFR_positive__P1", CONFIG.cache_key, "d1", newer_than=time.time() + 60)
        is None
    )
    bag_path(cache_dir, "EGFR_positive__P2").write_bytes(b"half a file")
    assert current_bag(cache_dir, "EGFR_positive__P2", CONFIG.cache_key, "d1") is None


def test_slide_status_is_ok_for_a_current_bag_and_failed_only_for_a_failure_of_this_run(tmp_path):
    cache_dir = open_cache(tmp_path, CONFIG)
    _bag(cache_dir, "EGFR_positive__P1", digest="d1")
    assert slide_status(cache_dir, "EGFR_positive__P1", CONFIG.cache_key, "d1") == manifest.STATUS_OK
    record = dict(
        slide_id="EGFR_negative__P2",
        cache_key=CONFIG.cache_key,
        tiles_digest="d2",
        reason="no tiles",
        written_at=time.time(),
    )
    write_failure(cache_dir, record)
    status = lambda **kw: slide_status(cache_dir, "EGFR_negative__P2", CONFIG.cache_key, "d2", **kw)  # noqa: E731
    assert status(failed_since=time.time() - 10) == manifest.STATUS_FAILED
    assert status(failed_since=time.time() + 60) is None  # recorded by an earlier run: retried
    assert status() is None
    assert slide_status(cache_dir, "EGFR_negative__P2", CONFIG.cache_key, "changed", failed_since=0.0) is None


def test_bag_attributes_have_one_typed_definition_that_writes_reads_and_validates(tmp_path):
    cache_dir = open_cache(tmp_path, CONFIG)
    _bag(cache_dir, "EGFR_positive__P1")
    path = bag_path(cache_dir, "EGFR_positive__P1")
    typed = read_bag_attrs(path)
    assert (
        isinstance(typed, BagAttrs) and typed.label == 1 and typed.n_instances == 3 and typed.feature_dim == 4
    )
    assert typed.format_version == bags.FORMAT_VERSION == 1
    assert typed.skipped_tiles == ({"name": "t9", "reason": "truncated"},)
    stored = read_attrs(path)  # the keys and values on disk are those of BagAttrs.to_attrs
    assert json.loads(stored["skipped_tiles"]) == [{"name": "t9", "reason": "truncated"}]
    assert set(stored) == {f.name for f in dataclasses.fields(BagAttrs)} - {"extra"}
    assert read_bag(path).typed_attrs == typed and validate_bag(path).bag_attrs == typed
    with_extra = dataclasses.replace(typed, extra={"slide_kind": "wsi", "slide_id": "not this"})
    write_bag(path, np.ones((2, 4), np.float32), np.zeros((2, 2)), ["a", "b"], with_extra)
    again = read_bag_attrs(path)
    assert again.extra == {"slide_kind": "wsi"} and again.slide_id == "EGFR_positive__P1"  # named fields win
    assert again.n_instances == 2  # always that of the file

    write_bag(path, np.ones((2, 4), np.float32), np.zeros((2, 2)), ["a", "b"], {"slide_id": "x", "label": 1})
    with pytest.raises(
        BagError, match=r"EGFR_positive__P1\.h5.*lacks the attributes \['cache_key'\].*re-embed"
    ):
        read_bag_attrs(path)
    write_bag(path, np.ones((2, 4), np.float32), np.zeros((2, 2)), ["a", "b"], {**stored, "label": "one"})
    with pytest.raises(BagError, match="attribute label='one' is not a int"):
        read_bag_attrs(path)


def test_a_bag_of_another_format_version_is_upgraded_or_refused_by_name(tmp_path, monkeypatch):
    cache_dir = open_cache(tmp_path, CONFIG)
    _bag(cache_dir, "EGFR_positive__P1")
    path = bag_path(cache_dir, "EGFR_positive__P1")
    monkeypatch.setattr(bags, "FORMAT_VERSION", 2)  # as if this were a newer clam-egfr: version 1 is older
    with pytest.raises(BagError, match=r"format_version 1, which this clam-egfr cannot upgrade.*re-embed"):
        read_bag_attrs(path)
    monkeypatch.setitem(bags._UPGRADES, 1, lambda raw: {**raw, "weights": raw["weights"].upper()})
    assert read_bag_attrs(path).weights == "IMAGENET" and read_bag_attrs(path).format_version == 2
    monkeypatch.setattr(bags, "FORMAT_VERSION", 0)  # as if this were an older clam-egfr
    with pytest.raises(BagError, match="newer than this clam-egfr reads"):
        read_bag_attrs(path)


def test_a_lock_is_exclusive_until_released(tmp_path):
    first, second = SlideLocks(tmp_path), SlideLocks(tmp_path)
    assert first.try_acquire("S1")
    assert not second.try_acquire("S1")  # same pid, but held: alive
    assert second.held_by_other("S1") and not first.held_by_other("S1")
    first.release("S1")
    assert second.try_acquire("S1") and not first.try_acquire("S1")
    second.release_all()
    assert not list((tmp_path / ".locks").iterdir())


def test_locks_of_dead_processes_and_unrefreshed_locks_are_taken_over(tmp_path, monkeypatch):
    locks = SlideLocks(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid is free
    (tmp_path / ".locks" / "S1.lock").write_text(f"{locks.host} {dead.pid} 0\n")
    assert not locks.held_by_other("S1")
    assert locks.try_acquire("S1")

    foreign = tmp_path / ".locks" / "S2.lock"
    foreign.write_text("another-node 12345 0\n")
    assert locks.held_by_other("S2") and not locks.try_acquire("S2")  # another host: trust it while fresh
    old = time.time() - locks_module.LOCK_STALE_SECONDS - 10
    os.utime(foreign, (old, old))
    assert locks.try_acquire("S2")
    assert (tmp_path / ".locks" / "S2.lock").read_text().split()[1] == str(os.getpid())

    before = (tmp_path / ".locks" / "S1.lock").stat().st_mtime
    os.utime(tmp_path / ".locks" / "S1.lock", (before - 100, before - 100))
    locks.refresh(force=True)
    assert (tmp_path / ".locks" / "S1.lock").stat().st_mtime > before - 50


def test_sweep_removes_what_a_killed_run_left_and_spares_live_work(tmp_path):
    cache_dir = open_cache(tmp_path, CONFIG)
    locks = SlideLocks(cache_dir)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (cache_dir / ".locks" / "S1.lock").write_text(f"{locks.host} {dead.pid} 0\n")
    (cache_dir / f".S1.h5.{dead.pid}.tmp").write_bytes(b"half a bag")
    (cache_dir / f".S1.spill.{dead.pid}.tmp").write_bytes(b"rows")
    (cache_dir / ".locks" / "S2.lock").write_text("another-node 777 0\n")  # alive elsewhere
    (cache_dir / ".S2.h5.777.tmp").write_bytes(b"being written")
    (cache_dir / ".locks" / "manifest.csv.lock").write_text(
        "another-node 778 0\n"
    )  # being replaced elsewhere
    (cache_dir / ".manifest.csv.778.tmp").write_text("new")
    (cache_dir / ".failed" / f".S1.json.{dead.pid}.tmp").write_text("{")  # a failure record, killed mid-write
    (cache_dir / ".failed" / ".S2.json.777.tmp").write_text("{")  # being written under a live lock
    (cache_dir / ".failed" / ".S3.json.5.tmp").write_text("{")  # fresh, and no lock: nobody is writing it
    odd = cache_dir / ".failed" / ".notes.tmp"  # no owner can be told from the name: goes once old
    odd.write_text("?")
    os.utime(odd, (time.time() - locks_module.LOCK_STALE_SECONDS - 1,) * 2)

    sweep_leftovers(cache_dir, locks)
    left = sorted(p.name for p in cache_dir.rglob("*") if p.is_file() and p.name != "cache.json")
    assert left == [
        ".S2.h5.777.tmp",
        ".S2.json.777.tmp",
        ".manifest.csv.778.tmp",
        "S2.lock",
        "manifest.csv.lock",
    ]


def test_the_manifest_is_replaced_under_a_lock_and_a_killed_writers_temp_file_is_swept(tmp_path, monkeypatch):
    cache_dir = open_cache(tmp_path, CONFIG)
    locks = SlideLocks(cache_dir)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (cache_dir / ".locks" / "manifest.csv.lock").write_text(
        f"{locks.host} {dead.pid} 0\n"
    )  # killed mid-write
    (cache_dir / f".manifest.csv.{dead.pid}.tmp").write_text("slide_id,half a row")
    sweep_leftovers(cache_dir, locks)
    assert not list(cache_dir.glob(".manifest.csv.*")) and not list((cache_dir / ".locks").iterdir())

    (cache_dir / ".locks" / "manifest.csv.lock").write_text("another-node 778 0\n")  # a live writer elsewhere
    monkeypatch.setattr(manifest, "MANIFEST_LOCK_WAIT_SECONDS", 0.2)
    with pytest.raises(PipelineError, match="manifest.csv.lock has been held"):
        write_manifest(cache_dir, [])
    (cache_dir / ".locks" / "manifest.csv.lock").unlink()
    write_manifest(cache_dir, [])
    assert read_manifest(cache_dir) == [] and not list((cache_dir / ".locks").iterdir())
