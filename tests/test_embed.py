"""Stage 1 end to end: bags and manifest, reuse, changed slides, the max_tiles subset, bad tiles,
runtimes that agree with eager PyTorch, batches across slides, and resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from random_data import FAST, ROOT, assert_same_bags, bags_of, write_cohort, write_tile
from torchvision import transforms

from feature_extraction import embed as embed_module
from feature_extraction import extractor
from feature_extraction.backbones import load_backbone
from feature_extraction.bags import COORD_SENTINEL, read_bag, validate_bag
from feature_extraction.cache import read_cache_config
from feature_extraction.embed import EmbedConfig, embed_cohort, format_summary, main
from feature_extraction.errors import PipelineError
from feature_extraction.extractor import Outcome, compact_rows
from feature_extraction.manifest import read_manifest
from feature_extraction.runtime import NormalizedBackbone, onnxruntime_available, plan_compute, resolve_device
from feature_extraction.sources import select_subset
from feature_extraction.user_cache import user_cache_dir


def test_embed_writes_one_valid_bag_per_slide_and_a_manifest(tmp_path):
    data = write_cohort(tmp_path / "train")
    (data / "EGFR_positive" / "P1" / "notes.txt").write_text("ignored")
    write_tile(
        data / "EGFR_negative" / "P5" / "plain.png", np.random.default_rng(1)
    )  # no position in its name
    report = embed_cohort(FAST, data, features_dir=tmp_path / "features")

    assert report.n_embedded == 5 and report.n_reused == 0 and not report.failed
    assert report.cache_dir.parent == tmp_path / "features"
    assert report.cache_dir.name == f"resnet18-random-224px-max100-seed0-{report.cache_key[:8]}"
    assert [row.slide_id for row in report.slides] == [
        "EGFR_negative__P3",
        "EGFR_negative__P5",
        "EGFR_positive__P1",
        "EGFR_positive__P2",
        "EGFR_negative_cnn__P3",
    ]
    assert report.n_ignored_files == 1 and report.random_weights

    bag = read_bag(report.cache_dir / "EGFR_positive__P1.h5")
    assert bag.features.shape == (3, 512) and bag.features.dtype == np.float32
    assert bag.tile_names == ["tile_x0_y32.png", "tile_x32_y32.png", "tile_x64_y32.png"]
    assert bag.coords.tolist() == [[0, 32], [32, 32], [64, 32]]
    attrs = bag.attrs
    for key, value in dict(
        slide_id="EGFR_positive__P1",
        patient_id="P1",
        class_folder="EGFR_positive",
        label=1,
        split="train",
        backbone="resnet18",
        weights="random",
        weights_random=True,
        feature_dim=512,
        max_tiles=100,
        seed=0,
        tile_size=224,
        cache_key=report.cache_key,
        n_skipped=0,
    ).items():
        assert attrs[key] == value, key
    for key in ("weights_digest", "transform", "package_version", "tiles_digest", "skipped_tiles"):
        assert attrs[key] != ""
    assert read_bag(report.cache_dir / "EGFR_negative__P5.h5").coords.tolist() == [[COORD_SENTINEL] * 2]
    for slide_id in ("EGFR_negative__P3", "EGFR_negative_cnn__P3"):  # one patient, two bags
        assert read_bag(report.cache_dir / f"{slide_id}.h5").attrs["patient_id"] == "P3"

    for path in report.cache_dir.glob("*.h5"):
        validate_bag(path, feature_dim=512, cache_key=report.cache_key)
    config = read_cache_config(report.cache_dir)
    assert config["cache_key"] == report.cache_key and config["weights"] == "random"
    manifest = read_manifest(report.cache_dir)
    assert {row.slide_id: (row.status, row.n_tiles, row.label) for row in manifest} == {
        "EGFR_positive__P1": ("ok", 3, 1),
        "EGFR_positive__P2": ("ok", 2, 1),
        "EGFR_negative__P3": ("ok", 2, 0),
        "EGFR_negative_cnn__P3": ("ok", 2, 0),
        "EGFR_negative__P5": ("ok", 1, 0),
    }
    assert all(row.file.is_file() for row in manifest)
    leftovers = [p for p in report.cache_dir.rglob("*") if p.is_file() and p.suffix in (".tmp", ".lock")]
    assert not leftovers


def test_features_equal_eager_pytorch_on_the_decoded_tile(tmp_path):
    data = write_cohort(
        tmp_path / "train", {"EGFR_positive": {"P1": 2}, "EGFR_negative": {"P2": 1}}, size=256
    )
    report = embed_cohort(FAST, data, features_dir=tmp_path / "features")
    bag = read_bag(report.cache_dir / "EGFR_positive__P1.h5")

    backbone = load_backbone("resnet18", "random")
    spec = backbone.spec
    reference = transforms.Compose(
        [
            transforms.Resize(224),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(spec.mean, spec.std),
        ]
    )
    images = torch.stack(
        [
            reference(Image.open(data / "EGFR_positive" / "P1" / name).convert("RGB"))
            for name in bag.tile_names
        ]
    )
    with torch.inference_mode():
        expected = backbone.module(images).numpy()
    # Resampling differs slightly between PIL-on-uint8 and torchvision; the features agree to ~1%.
    np.testing.assert_allclose(bag.features, expected, rtol=0.05, atol=0.02 * np.abs(expected).max())

    wrapped = NormalizedBackbone(backbone.module, spec.mean, spec.std).eval()
    pixels = torch.stack(
        [
            torch.from_numpy(
                np.asarray(
                    Image.open(data / "EGFR_positive" / "P1" / name)
                    .convert("RGB")
                    .resize((224, 224), Image.BILINEAR)
                ).copy()
            )
            for name in bag.tile_names
        ]
    )
    with torch.inference_mode():
        np.testing.assert_allclose(bag.features, wrapped(pixels).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not onnxruntime_available(), reason="onnxruntime, onnx and onnxscript are not installed")
def test_onnx_runtime_features_match_eager_pytorch(tmp_path):
    data = write_cohort(tmp_path / "train")
    eager = embed_cohort(FAST, data, features_dir=tmp_path / "eager")
    onnx = embed_cohort(replace(FAST, runtime="onnxruntime"), data, features_dir=tmp_path / "onnx")
    assert onnx.runtime == "onnxruntime" and eager.runtime == "torch"
    assert eager.cache_dir.name == onnx.cache_dir.name  # the runtime does not change the cache
    assert list((user_cache_dir() / "onnx").glob("resnet18-*-224px-*.onnx"))  # per user, not per features dir
    for slide_id, bag in bags_of(onnx.cache_dir).items():
        expected = read_bag(eager.cache_dir / f"{slide_id}.h5").features
        assert np.abs(bag.features - expected).max() <= 1e-5 * np.abs(expected).max() + 1e-6
        assert bag.attrs["runtime"] == "onnxruntime"


def test_batches_spanning_slides_and_large_slide_buffers_give_the_same_bags(tmp_path, monkeypatch):
    data = write_cohort(tmp_path / "train")
    embed_cohort(replace(FAST, batch_size=1), data, features_dir=tmp_path / "one")
    monkeypatch.setattr(extractor, "SPILL_BYTES", 0)  # every slide gathered in a file-backed buffer
    report = embed_cohort(replace(FAST, batch_size=5), data, features_dir=tmp_path / "five")
    assert_same_bags(tmp_path / "one" / report.cache_dir.name, report.cache_dir)
    assert not list(report.cache_dir.glob(".*spill*"))


def test_rerun_recomputes_nothing_and_a_changed_slide_is_re_embedded(tmp_path):
    data = write_cohort(tmp_path / "train")
    first = embed_cohort(FAST, data, features_dir=tmp_path / "features")
    stamps = {p.name: p.stat().st_mtime_ns for p in first.cache_dir.glob("*.h5")}

    again = embed_cohort(FAST, data, features_dir=tmp_path / "features")
    assert (again.n_embedded, again.n_reused, again.n_tiles_embedded) == (0, 4, 0)
    assert again.plan is None  # not even a runner was built
    assert {p.name: p.stat().st_mtime_ns for p in first.cache_dir.glob("*.h5")} == stamps

    write_tile(data / "EGFR_positive" / "P2" / "tile_x64_y32.png", np.random.default_rng(5))
    write_tile(data / "EGFR_positive" / "P9" / "tile_x0_y0.png", np.random.default_rng(6))  # a new slide
    changed = embed_cohort(FAST, data, features_dir=tmp_path / "features")
    assert (changed.n_embedded, changed.n_reused) == (2, 3)
    after = {p.name: p.stat().st_mtime_ns for p in first.cache_dir.glob("*.h5")}
    assert [name for name in stamps if after[name] != stamps[name]] == ["EGFR_positive__P2.h5"]
    assert read_bag(first.cache_dir / "EGFR_positive__P2.h5").features.shape == (3, 512)

    overwritten = embed_cohort(replace(FAST, overwrite=True), data, features_dir=tmp_path / "features")
    assert overwritten.n_embedded == 5 and overwritten.n_reused == 0

    other = embed_cohort(replace(FAST, max_tiles=2), data, features_dir=tmp_path / "features")
    assert (
        other.cache_dir != first.cache_dir and other.n_embedded == 5
    )  # another configuration, another cache
    assert read_bag(first.cache_dir / "EGFR_positive__P1.h5").features.shape == (3, 512)


def test_max_tiles_takes_a_stable_seeded_subset(tmp_path):
    data = write_cohort(tmp_path / "train", {"EGFR_positive": {"P1": 9}, "EGFR_negative": {"P2": 2}})
    first = embed_cohort(replace(FAST, max_tiles=4, seed=7), data, features_dir=tmp_path / "a")
    second = embed_cohort(replace(FAST, max_tiles=4, seed=7), data, features_dir=tmp_path / "b")
    assert_same_bags(first.cache_dir, second.cache_dir, exact=True)

    bag = read_bag(first.cache_dir / "EGFR_positive__P1.h5")
    names = sorted(p.name for p in (data / "EGFR_positive" / "P1").iterdir())
    assert bag.tile_names == [names[i] for i in select_subset(names, "EGFR_positive__P1", 4, 7)]
    assert bag.attrs["n_available"] == 9 and bag.attrs["n_selected"] == 4 and bag.attrs["max_tiles"] == 4
    assert read_bag(first.cache_dir / "EGFR_negative__P2.h5").features.shape[0] == 2

    everything = embed_cohort(replace(FAST, max_tiles=0), data, features_dir=tmp_path / "a")
    assert "-maxall-" in everything.cache_dir.name
    assert read_bag(everything.cache_dir / "EGFR_positive__P1.h5").features.shape[0] == 9


def test_bad_tiles_are_skipped_and_named_and_an_unreadable_slide_gets_no_bag(tmp_path, capsys):
    data = write_cohort(tmp_path / "train")
    slide = data / "EGFR_positive" / "P1"
    (slide / "zero.png").write_bytes(b"")
    (slide / "text.jpg").write_text("not an image")
    (slide / "cut.png").write_bytes((slide / "tile_x0_y32.png").read_bytes()[:70])
    broken = data / "EGFR_positive" / "P2"
    for path in broken.iterdir():
        path.write_bytes(b"\x89PNG garbage")
    (data / "EGFR_negative" / "P8").mkdir()  # a patient folder without tiles

    code = main(
        [
            "--data_dir",
            str(data),
            "--features_dir",
            str(tmp_path / "features"),
            "--backbone",
            "resnet18",
            "--weights",
            "random",
            "--runtime",
            "torch",
            "--num_workers",
            "0",
            "--quiet",
        ]
    )
    out = capsys.readouterr()
    assert code == 0  # some slides were embedded
    assert "zero.png" in out.out and "text.jpg" in out.out and "cut.png" in out.out
    assert "EGFR_positive__P2" in out.out and "EGFR_negative__P8" in out.out
    assert "warning: --weights random" in out.out  # said even with --quiet

    cache_dir = next((tmp_path / "features").iterdir())
    bag = read_bag(cache_dir / "EGFR_positive__P1.h5")
    assert bag.features.shape[0] == 3 and "zero.png" not in bag.tile_names
    skipped = json.loads(bag.attrs["skipped_tiles"])
    assert sorted(t["name"] for t in skipped) == ["cut.png", "text.jpg", "zero.png"]
    assert bag.attrs["n_skipped"] == 3
    assert not (cache_dir / "EGFR_positive__P2.h5").exists()
    rows = {row.slide_id: row for row in read_manifest(cache_dir)}
    assert rows["EGFR_positive__P2"].status == "failed" and "could be read" in rows["EGFR_positive__P2"].error
    assert (
        rows["EGFR_negative__P8"].status == "failed" and "no image tiles" in rows["EGFR_negative__P8"].error
    )

    report = embed_cohort(
        FAST, data, features_dir=tmp_path / "features"
    )  # reused; failures retried, reported
    assert report.n_embedded == 0 and len(report.failed) == 2
    assert sorted(t.name for t in report.skipped_tiles) == ["cut.png", "text.jpg", "zero.png"]
    assert "skipped 3 unreadable tiles" in format_summary(report)


def test_a_slide_that_cannot_be_listed_fails_alone(tmp_path, monkeypatch):
    data = write_cohort(tmp_path / "train")
    real = embed_module.list_slide_tiles

    def list_or_fail(slide, max_tiles, seed, wsi=None, **kwargs):
        if slide.slide_id == "EGFR_positive__P2":
            raise PipelineError(f"{slide.path} is not a readable whole-slide image")
        return real(slide, max_tiles, seed, wsi, **kwargs)

    monkeypatch.setattr(embed_module, "list_slide_tiles", list_or_fail)
    report = embed_cohort(FAST, data, features_dir=tmp_path / "features")
    assert report.n_embedded == 3
    assert report.failed == [
        ("EGFR_positive__P2", f"{data / 'EGFR_positive' / 'P2'} is not a readable whole-slide image")
    ]
    assert {row.slide_id: row.status for row in report.slides}["EGFR_positive__P2"] == "failed"


def test_nothing_embeddable_exits_non_zero_and_a_missing_class_folder_shows_the_layout(tmp_path, capsys):
    data = tmp_path / "train"
    for folder in ("EGFR_positive/P1", "EGFR_negative/P2"):
        (data / folder).mkdir(parents=True)
        (data / folder / "a.png").write_bytes(b"")
    args = [
        "--features_dir",
        str(tmp_path / "f"),
        "--backbone",
        "resnet18",
        "--weights",
        "random",
        "--runtime",
        "torch",
        "--num_workers",
        "0",
        "--quiet",
    ]
    assert main(["--data_dir", str(data), *args]) == 1

    missing = write_cohort(tmp_path / "other", {"EGFR_positive": {"P1": 1}})
    (missing / "EGFR_negative").rmdir()
    assert main(["--data_dir", str(missing), *args]) == 2
    err = capsys.readouterr().err
    assert "EGFR_negative" in err and "EGFR_positive/<patient>/<tiles>" in err


def test_train_and_test_share_the_cache_and_each_report_lists_its_own_slides(tmp_path):
    train = write_cohort(tmp_path / "train")
    test = write_cohort(tmp_path / "test", {"C-S-EGFR_positive": {"T1": 2}, "C-S-EGFR_negative": {"T2": 1}})
    first = embed_cohort(FAST, train, "train", features_dir=tmp_path / "features")
    second = embed_cohort(FAST, test, "test", features_dir=tmp_path / "features")
    assert first.cache_dir == second.cache_dir
    assert [row.slide_id for row in second.slides] == ["C-S-EGFR_negative__T2", "C-S-EGFR_positive__T1"]
    assert {row.split for row in read_manifest(first.cache_dir)} == {"train", "test"}
    assert len(read_manifest(first.cache_dir)) == 6


def test_compact_moves_rows_in_place():
    features = np.arange(20, dtype=np.float32).reshape(10, 2)
    rows = [1, 2, 5, 9]
    expected = features[rows].copy()
    assert np.array_equal(compact_rows(features, rows), expected)


def test_cpu_plan_leaves_the_cores_to_the_backbone(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    plan = plan_compute("cpu", num_workers=4)
    assert plan.compute_threads == 2 and plan.num_workers == 1 and plan.precision == "fp32"
    monkeypatch.setenv("OMP_NUM_THREADS", "16")
    assert plan_compute("cpu", num_workers=4, runtime="torch").num_workers == 2
    assert plan_compute("cpu", num_workers=0).num_workers == 0
    with pytest.raises(PipelineError):
        plan_compute("cpu", precision="fp16")


@pytest.mark.slow
def test_kill_minus_9_then_rerun_gives_the_bags_of_an_uninterrupted_run(tmp_path):
    layout = {
        "EGFR_positive": {f"P{i}": 3 for i in range(5)},
        "EGFR_negative": {f"N{i}": 3 for i in range(5)},
    }
    data = write_cohort(tmp_path / "train", layout)
    args = [
        "--data_dir",
        str(data),
        "--backbone",
        "resnet18",
        "--weights",
        "random",
        "--runtime",
        "torch",
        "--num_workers",
        "0",
        "--batch_size",
        "1",
        "--quiet",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "feature_extraction.embed"]

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [*command, *args, "--features_dir", str(killed)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list(killed.glob("*/*.h5")):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    n_before = len(list(killed.glob("*/*.h5")))
    assert 0 < n_before < 10, "the kill must land mid-run"
    for path in killed.glob("*/*.h5"):
        validate_bag(path)  # every file under a bag's name is complete

    resumed = subprocess.run(
        [*command, *args, "--features_dir", str(killed)], env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"{10 - n_before} embedded" in resumed.stdout and f"{n_before} reused" in resumed.stdout
    embed_cohort(replace(FAST, batch_size=1), data, features_dir=tmp_path / "clean")
    (cache_dir,) = killed.iterdir()
    assert_same_bags(tmp_path / "clean" / cache_dir.name, cache_dir)
    assert not [p for p in cache_dir.rglob("*") if p.suffix in (".tmp", ".lock")]
    assert len(read_manifest(cache_dir)) == 10


def test_embed_config_round_trips_through_json_and_ignores_unknown_keys():
    from feature_extraction.wsi import WsiConfig

    config = EmbedConfig(
        backbone="resnet18",
        weights="random",
        max_tiles=7,
        seed=3,
        wsi=WsiConfig(tile_size=128),
        batch_size=2,
        device="cpu",
        overwrite=True,
        expected_cache_key="ab" * 32,
    )
    assert EmbedConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert EmbedConfig.from_dict({**FAST.to_dict(), "something_newer": 1}) == FAST
    assert Outcome.REUSED == "reused" and f"{Outcome.BY_OTHER}" == "by_other"  # manifest/CSV values unchanged


def test_a_checkpoints_cache_entry_replays_to_the_same_cache_key(tiny_cohort, tmp_path):
    """The ``cache`` entry of a checkpoint written by main 0d6f26e (cache.json plus cache_dir) replays:
    embedding with it gives the cache key the model was trained on, and a changed entry is refused."""
    from clam.checkpoints import read_checkpoint

    entry = read_checkpoint(ROOT / "tests" / "fixtures" / "main_0d6f26e" / "run" / "checkpoint_epoch_2.pt")[
        "cache"
    ]
    replay = EmbedConfig.from_dict({**entry, "runtime": "torch", "num_workers": 0, "progress": False})
    assert (replay.backbone, replay.weights, replay.max_tiles, replay.seed, replay.wsi) == (
        "resnet18",
        "random",
        100,
        0,
        None,
    )
    assert replay.expected_cache_key == entry["cache_key"]
    data = tiny_cohort.split_dirs["test"]
    report = embed_cohort(replay, data, "test", features_dir=tmp_path / "features")
    assert report.cache_key == entry["cache_key"] and report.cache_dir.name == Path(entry["cache_dir"]).name
    with pytest.raises(embed_module.CacheKeyMismatch):
        embed_cohort(replace(replay, max_tiles=50), data, "test", features_dir=tmp_path / "features")


def test_devices_resolve_to_torch_devices_or_explain(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("CPU") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    for bad in ("tpu9", "meta", "cuda:x", ""):
        with pytest.raises(PipelineError, match="unknown device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(PipelineError, match="no CUDA GPU"):
            resolve_device("cuda:0")
    else:
        monkeypatch.setenv("LOCAL_RANK", "0")
        assert resolve_device("cuda") == torch.device("cuda", 0)
        with pytest.raises(PipelineError, match="CUDA GPUs"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
