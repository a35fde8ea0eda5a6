"""Training on caches of real size: the memory budget of --in_memory auto, batches capped by padded
instances, and float16 caches (--feature_dtype float16) read as float32."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import h5py
import numpy as np
import pytest
import torch
from random_data import cohort_slides, random_cache_config, write_random_cache

from clam import loading
from clam.bag_dataset import BagDataset, collate_bags
from clam.data import BagRecord, records_from_cache, validate_records
from clam.epochs import make_loader
from clam.loading import capped_batches, memory_budget, parse_bytes, plan_loading
from clam.train_config import TrainConfig
from clam.training import train
from feature_extraction import cache
from feature_extraction.bags import read_attrs, read_bag, read_features, validate_bag, write_bag
from feature_extraction.cache import CACHE_FORMAT, find_cache, read_cache_config
from feature_extraction.embed import EmbedConfig, build_parser
from feature_extraction.errors import BagError, PipelineError

CPU = torch.device("cpu")
ATTRS = {"slide_id": "s", "label": 0, "cache_key": "k"}


# ---------------------------------------------------------------- batches capped by padded instances


def test_batches_keep_the_order_and_stay_within_the_bag_and_instance_caps():
    lengths = [100, 30_000, 120, 90, 25_000, 40_000, 100, 100, 100]
    order = [4, 0, 2, 1, 3, 5, 6, 7, 8]
    batches = capped_batches(order, lengths, batch_size=16, max_instances=65_536)
    assert [i for batch in batches for i in batch] == order  # nothing dropped, nothing reordered
    for batch in batches:
        assert len(batch) <= 16
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 65_536
    assert [5] in batches  # longer than half the cap: with any other bag the batch would exceed it
    assert capped_batches(order, lengths, batch_size=1) == [[i] for i in order]
    small = capped_batches(range(40), [100] * 40, batch_size=16)
    assert [len(b) for b in small] == [16, 16, 8]  # bounded bags batch exactly as --batch_size says
    assert capped_batches([0, 1], [70_000, 70_000], 16, 65_536) == [[0], [1]]  # a huge bag alone


def test_a_cohort_of_100_to_30000_instances_never_pads_past_the_cap(monkeypatch):
    monkeypatch.setattr(loading, "MAX_BATCH_INSTANCES", 600)  # the constant, scaled down 100 x
    sizes = [1, 300, 2, 250, 3, 1, 1, 1, 1, 300]
    records = [
        BagRecord(f"s{i}", f"p{i}", i % 2, path=None, n_instances=n)  # type: ignore[arg-type]
        for i, n in enumerate(sizes)
    ]
    dataset = BagDataset(records, in_memory=False)
    dataset.features = [torch.ones(n, 4) for n in sizes]  # served from memory: no files needed
    plan = plan_loading(0, "yes", 0, CPU)
    for train_pass in (True, False):
        loader = make_loader(dataset, TrainConfig(batch_size=8, max_tiles=0), plan, CPU, 1, train_pass)
        batches = list(loader)
        assert sum(len(b.labels) for b in batches) == len(sizes)
        assert max(b.features.shape[0] * b.features.shape[1] for b in batches) <= 600
        assert max(len(b.labels) for b in batches) > 1  # small bags still share batches


# ---------------------------------------------------------------- the memory budget


def test_the_budget_is_half_the_available_memory_or_the_environment(monkeypatch):
    monkeypatch.delenv(loading.MEMORY_BUDGET_ENV, raising=False)
    monkeypatch.setattr(loading, "available_memory_bytes", lambda: 16 * 2**30)
    assert memory_budget()[0] == 8 * 2**30
    assert plan_loading(7 * 2**30, "auto", 4, CPU).in_memory
    streamed = plan_loading(9 * 2**30, "auto", 4, CPU)
    assert not streamed.in_memory and streamed.num_workers >= 1
    assert "over the budget of 8.0 GiB (0.5 x the 16.0 GiB available)" in streamed.reason
    monkeypatch.setenv(loading.MEMORY_BUDGET_ENV, "512M")
    assert memory_budget() == (512 * 2**20, "CLAM_MEMORY_BUDGET=512M")
    assert not plan_loading(2**30, "auto", 4, CPU).in_memory
    assert plan_loading(2**30, "yes", 4, CPU).in_memory  # --in_memory yes / no override the budget
    assert parse_bytes("1.5GiB") == 3 * 2**29 and parse_bytes("4096") == 4096 and parse_bytes("2t") == 2**41
    monkeypatch.setenv(loading.MEMORY_BUDGET_ENV, "lots")
    with pytest.raises(PipelineError, match="CLAM_MEMORY_BUDGET='lots' is not a size"):
        plan_loading(2**30, "auto", 4, CPU)


def test_available_memory_counts_reclaimable_page_cache():
    meminfo = {}
    for line in open("/proc/meminfo", encoding="ascii"):
        name, value = line.split(":")
        meminfo[name] = int(value.split()[0]) * 1024
    assert abs(loading.available_memory_bytes() - meminfo["MemAvailable"]) < 2**30
    assert loading.available_memory_bytes() >= meminfo["MemFree"] - 2**30


# ---------------------------------------------------------------- float16 caches


def test_float16_bags_store_half_and_read_back_as_float32(tmp_path):
    features = np.random.default_rng(0).normal(size=(50, 16)).astype(np.float32) * 10
    path = tmp_path / "bag.h5"
    write_bag(path, features, np.zeros((50, 2)), [str(i) for i in range(50)], ATTRS, "float16")
    with h5py.File(path) as h5:
        assert h5["features"].dtype == np.float16
    bag = read_bag(path)
    assert bag.features.dtype == np.float32
    assert np.abs(bag.features - features).max() <= np.abs(features).max() * 2**-11  # float16 rounding
    assert read_bag(path, dtype=None).features.dtype == np.float16
    rows = np.array([3, 7])
    assert np.array_equal(read_features(path, rows), bag.features[rows])
    assert validate_bag(path).feature_dtype == "float16"
    with pytest.raises(BagError, match="beyond float16's range"):
        write_bag(path, features * 1e4, np.zeros((50, 2)), [str(i) for i in range(50)], {}, "float16")
    with pytest.raises(ValueError, match="feature dtype 'int8'"):
        write_bag(path, features, np.zeros((50, 2)), [str(i) for i in range(50)], {}, "int8")


def test_the_dtype_is_in_the_cache_key_only_when_it_is_not_float32():
    plain = random_cache_config()
    fields = {f.name: getattr(plain, f.name) for f in dataclasses.fields(plain)}
    assert plain.feature_dtype == "float32"
    assert dataclasses.replace(plain, feature_dtype="float16").cache_key != plain.cache_key
    keyed = {k: v for k, v in fields.items() if k not in ("weights", "wsi_tiling", "feature_dtype")}
    before = json.dumps({**keyed, "cache_format": CACHE_FORMAT}, sort_keys=True).encode("utf-8")
    assert plain.cache_key == hashlib.sha256(before).hexdigest()  # the key caches had before the field


def test_embed_offers_feature_dtype_and_a_checkpoint_replays_it():
    args = build_parser().parse_args(["--feature_dtype", "float16"])
    assert args.feature_dtype == "float16" and build_parser().parse_args([]).feature_dtype == "float32"
    entry = {**random_cache_config(feature_dtype="float16").to_json(), "cache_dir": "x"}
    assert EmbedConfig.from_dict(entry).feature_dtype == "float16"


def half_cache(tmp_path, slides, **config):
    """A random cache of ``slides`` whose bags store float16, under the float16 configuration's key."""
    cache_dir = write_random_cache(tmp_path / "features", slides, feature_dtype="float16", **config)
    for path in cache_dir.glob("*.h5"):
        bag = read_bag(path)
        write_bag(path, bag.features, bag.coords, bag.tile_names, read_attrs(path), "float16")
    return cache_dir


def test_training_reads_a_float16_cache_as_float32_holding_half_in_memory(tmp_path):
    slides = cohort_slides(8, instances=(20, 40))
    cache_dir = half_cache(tmp_path, slides)
    assert read_cache_config(cache_dir)["feature_dtype"] == "float16"
    bags = validate_records(
        records_from_cache(cache_dir, None, "train"), cache_dir, 2, read_cache_config(cache_dir), False
    )
    assert bags.value_bytes == 2
    assert bags.total_bytes == sum(s.n_instances for s in slides) * 32 * 2
    in_memory = BagDataset(bags.records, in_memory=True, progress=False)
    streamed = BagDataset(bags.records, in_memory=False)
    assert in_memory.features[0].dtype == torch.float16  # held as stored
    for i in range(len(bags.records)):
        assert in_memory[i][0].dtype == streamed[i][0].dtype == torch.float32
        assert torch.equal(in_memory[i][0], streamed[i][0])
    batch = collate_bags([in_memory[0], in_memory[1]])
    assert batch.features.dtype == torch.float32
    run = train(
        TrainConfig(
            features_dir=str(cache_dir), num_epochs=1, batch_size=4, output_dir=str(tmp_path / "runs")
        )
    )
    config = json.loads((run / "config.json").read_text())
    assert config["metrics"][0]["epoch"] == 1 and np.isfinite(config["metrics"][0]["train_loss"])
    assert (
        config["loader"]["in_memory"] and f"{bags.total_bytes / 2**20:.1f} MiB" in config["loader"]["reason"]
    )


def test_find_cache_prefers_float32_features_to_float16(tmp_path, monkeypatch):
    slides = cohort_slides(4, instances=(5, 8))
    half = half_cache(tmp_path, slides)
    full = write_random_cache(tmp_path / "features", slides)
    monkeypatch.setattr(cache, "holds_every_tile", lambda *a, **k: True)
    monkeypatch.setattr(cache, "cache_is_current", lambda *a, **k: True)
    assert find_cache(tmp_path / "features", "resnet50_trunc", "imagenet", 100, 0, []) == full
    full_json = full / "cache.json"
    full_json.unlink()
    assert find_cache(tmp_path / "features", "resnet50_trunc", "imagenet", 100, 0, []) == half
