"""Fixed costs: the per-user cache of ONNX exports and BatchNorm calibrations, and the imports a
command does not need (docs/embedding.md, "The per-user cache"; docs/benchmarks.md, "Fixed costs")."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from feature_extraction import onnx_export, random_weights, runtime, user_cache
from feature_extraction.backbones import BackboneSpec, LoadedBackbone, load_backbone, weights_digest
from feature_extraction.runtime import export_onnx, onnxruntime_available, plan_compute

ROOT = Path(__file__).resolve().parents[1]
needs_onnx = pytest.mark.skipif(
    not onnxruntime_available(), reason="onnxruntime, onnx and onnxscript are not installed"
)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh per-user cache of this test only."""
    folder = tmp_path / "user cache"
    monkeypatch.setenv(user_cache.CACHE_ENV, str(folder))
    return folder


def tiny_backbone(seed: int = 0) -> LoadedBackbone:
    """A small convolutional backbone (32 px in, 8-d out): exports in a fraction of a second."""

    def build() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    spec = BackboneSpec("tiny", 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 8, build)
    torch.manual_seed(seed)
    module = build().eval().requires_grad_(False)
    return LoadedBackbone(spec, module, "random", weights_digest(module), f"seed {seed}")


@pytest.fixture
def count_exports(monkeypatch) -> list[Path]:
    """The paths onnx_export._export writes, in order (it still exports)."""
    calls: list[Path] = []
    real = onnx_export._export

    def counting(backbone, path):
        calls.append(path)
        real(backbone, path)

    monkeypatch.setattr(onnx_export, "_export", counting)
    return calls


# ------------------------------------------------------------------------------ where the cache is


def test_the_cache_folder_follows_the_env_var_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv(user_cache.CACHE_ENV, str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache.user_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(user_cache.CACHE_ENV)
    assert user_cache.user_cache_dir() == tmp_path / "xdg" / "clam-egfr"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_cache.user_cache_dir() == tmp_path / "home" / ".cache" / "clam-egfr"


# ------------------------------------------------------------------------------------ ONNX exports


@needs_onnx
def test_one_export_serves_two_features_dirs(cache, tmp_path, count_exports):
    backbone = tiny_backbone()
    first = export_onnx(backbone, tmp_path / "features A")
    second = export_onnx(backbone, tmp_path / "features B")
    assert first == second and first.parent == cache / "onnx"
    assert count_exports == [first]  # the second features dir did not export
    assert not (tmp_path / "features A" / ".onnx").exists()
    record = json.loads(user_cache.sidecar_path(first).read_text())
    assert record["key"]["weights_digest"] == backbone.weights_digest
    assert record["key"]["input_size"] == 32 and record["key"]["opset"] == onnx_export.ONNX_OPSET
    assert record["key"]["torch"] == torch.__version__ and record["key"]["onnxruntime"]
    assert record["size"] == first.stat().st_size


@needs_onnx
def test_the_runner_of_a_second_features_dir_reuses_the_export(cache, tmp_path, count_exports, caplog):
    caplog.set_level(logging.INFO, logger="feature_extraction")
    backbone = tiny_backbone()
    plan = plan_compute("cpu", runtime="onnxruntime", batch_size=2, num_workers=0)
    tiles = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    features = []
    for folder in ("A", "B"):
        runner = runtime.build_runner(backbone, plan, tmp_path / folder)
        assert runner.name == "onnxruntime"
        features.append(runner.start(tiles)())
        runner.close()
    assert len(count_exports) == 1
    assert sum("exporting tiny to ONNX" in r.getMessage() for r in caplog.records) == 1
    assert (features[0] == features[1]).all()


@needs_onnx
def test_a_changed_key_exports_anew(cache, tmp_path, count_exports, monkeypatch):
    first = export_onnx(tiny_backbone(seed=0), tmp_path)
    other_weights = export_onnx(tiny_backbone(seed=1), tmp_path)
    assert other_weights != first
    real_version = onnx_export._version
    monkeypatch.setattr(
        onnx_export,
        "_version",
        lambda package: "0.0-other" if package == "onnxruntime" else real_version(package),
    )
    other_runtime = export_onnx(tiny_backbone(seed=0), tmp_path)
    assert len({first, other_weights, other_runtime}) == 3
    assert count_exports == [first, other_weights, other_runtime]
    assert all(
        user_cache.verified(p, json.loads(user_cache.sidecar_path(p).read_text())["key"])
        for p in count_exports
    )


@needs_onnx
@pytest.mark.parametrize("damage", ["truncated", "one byte changed", "no record", "record of another file"])
def test_a_partial_or_corrupt_export_is_detected_and_rebuilt(cache, tmp_path, count_exports, damage):
    backbone = tiny_backbone()
    path = export_onnx(backbone, tmp_path)
    good = path.read_bytes()
    sidecar = user_cache.sidecar_path(path)
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "one byte changed":
        path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    elif damage == "no record":
        sidecar.unlink()
    else:
        record = json.loads(sidecar.read_text())
        sidecar.write_text(json.dumps({**record, "sha256": "0" * 64}))
    assert not user_cache.verified(path, onnx_export.onnx_key(backbone))
    assert export_onnx(backbone, tmp_path) == path
    assert count_exports == [path, path]  # exported again
    assert user_cache.verified(path, onnx_export.onnx_key(backbone))
    assert path.stat().st_size == len(good)


@needs_onnx
def test_two_exporters_at_once_export_once(cache, tmp_path, monkeypatch):
    """The build lock: a second process (here a thread with its own lock file handle) waits for the
    first export, then finds it instead of exporting again."""
    exports: list[Path] = []
    real = onnx_export._export

    def slow(backbone, path):
        exports.append(path)
        time.sleep(0.5)
        real(backbone, path)

    monkeypatch.setattr(onnx_export, "_export", slow)
    backbone = tiny_backbone()
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda d=d: results.append(export_onnx(backbone, tmp_path / d))) for d in "AB"
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(exports) == 1 and len(set(results)) == 1
    assert user_cache.verified(results[0], onnx_export.onnx_key(backbone))


@needs_onnx
def test_an_unwritable_user_cache_falls_back_to_the_features_dir(cache, tmp_path, monkeypatch):
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text("a file where the cache folder should be")  # cannot be created
    path = export_onnx(tiny_backbone(), tmp_path / "features")
    assert path.parent == tmp_path / "features" / ".onnx"


# --------------------------------------------------------------------------- BatchNorm calibration


def test_the_calibration_is_computed_once_and_gives_the_same_weights(cache, monkeypatch):
    fresh = load_backbone("resnet18", "random")  # computes and stores the statistics
    stored = list((cache / "calibration").glob("resnet18-*.pt"))
    assert len(stored) == 1 and user_cache.sidecar_path(stored[0]).is_file()

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated again instead of reading the cache")

    monkeypatch.setattr(random_weights, "calibrate_on_noise", no_calibration)
    cached = load_backbone("resnet18", "random")
    assert cached.weights_digest == fresh.weights_digest  # bit for bit
    for (name, a), (_, b) in zip(fresh.module.state_dict().items(), cached.module.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_corrupt_calibration_is_computed_again(cache):
    fresh = load_backbone("resnet18", "random")
    (stored,) = (cache / "calibration").glob("resnet18-*.pt")
    stored.write_bytes(stored.read_bytes()[:100])
    again = load_backbone("resnet18", "random")
    assert again.weights_digest == fresh.weights_digest
    key = json.loads(user_cache.sidecar_path(stored).read_text())["key"]
    assert user_cache.verified(stored, key)  # rewritten whole


def test_without_a_writable_cache_the_calibration_still_runs(cache, monkeypatch):
    reference = load_backbone("resnet18", "random").weights_digest
    cache.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv(user_cache.CACHE_ENV, str(cache / "calibration.txt" / "below a file"))
    (cache / "calibration.txt").write_text("")
    assert load_backbone("resnet18", "random").weights_digest == reference


# -------------------------------------------------------------------------- imports not needed


def loaded_modules(statement: str) -> set[str]:
    """The top-level packages in sys.modules after ``statement`` in a fresh interpreter."""
    code = (
        f"{statement}\nimport sys, json\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_embedding_does_not_import_scikit_learn_or_matplotlib():
    loaded = loaded_modules("import feature_extraction.embed")
    assert {"feature_extraction", "torch"} <= loaded
    assert not loaded & {"sklearn", "matplotlib", "scipy", "clam"}


def test_training_on_cached_bags_does_not_import_figures_or_the_backbones():
    """clam.train reads bags: matplotlib (evaluation's figures), torchvision (the ResNets, built only
    when slides must be embedded) and ONNX are not loaded by importing it."""
    loaded = loaded_modules("import clam.train")
    assert {"clam", "torch", "sklearn"} <= loaded
    assert not loaded & {"matplotlib", "torchvision", "onnx", "onnxruntime", "onnxscript"}
