"""Fault injection (see docs/reliability.md): malformed tiles and folders, unusable paths, broken
bags, a disk that fills up mid-write, two embed processes racing on one cache, and clam.train
killed by SIGKILL halfway through a checkpoint write.

Faults already covered elsewhere (kill -9 of embed, truncated/zero-byte tiles, 16-bit, CMYK,
corrupt or NaN bags, hostile checkpoints, ...) are referenced from docs/reliability.md, not repeated."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from feature_extraction import bags as bags_module
from feature_extraction.bags import read_bag, validate_bag, write_bag
from feature_extraction.cache import read_manifest
from feature_extraction.embed import embed_cohort, main
from feature_extraction.errors import BagError, PipelineError

from test_embed import FAST, ROOT, write_cohort

CLI = ["--backbone", "resnet18", "--weights", "random", "--runtime", "torch", "--num_workers", "0", "--quiet"]


def test_malformed_tiles_and_odd_names_are_embedded_or_skipped_by_name(tmp_path, capsys):
    data = write_cohort(tmp_path / "train", {"EGFR_positive": {"P1": 2}, "EGFR_negative": {"P2": 2}})
    slide = data / "EGFR_positive" / "P1"
    (slide / "error page.jpg").write_text("<!DOCTYPE html><html><body>502 Bad Gateway</body></html>")
    (slide / "noise.png").write_bytes(np.random.default_rng(0).bytes(4096))
    Image.new("RGB", (64, 64), (200, 100, 180)).save(slide / "cut.jpg")
    (slide / "cut.jpg").write_bytes((slide / "cut.jpg").read_bytes()[:300])  # a truncated JPEG
    Image.new("RGB", (1, 1), (200, 100, 180)).save(slide / "one_pixel.png")
    Image.new("RGB", (8000, 8000), (200, 100, 180)).save(slide / "huge.png", compress_level=1)
    odd = data / "EGFR_negative" / "Patiënt Ø 7"  # spaces and non-ASCII letters in folder and tile names
    odd.mkdir()
    Image.new("RGB", (32, 32), (190, 90, 170)).save(odd / "tuile à x0_y0.png")
    (data / "EGFR_negative" / "P_empty").mkdir()
    os.symlink(data / "EGFR_negative" / "P2", data / "EGFR_negative" / "P2" / "loop")  # a symlink loop

    code = main(["--data_dir", str(data), "--features_dir", str(tmp_path / "features"), *CLI])
    out = capsys.readouterr().out
    assert code == 0  # the run finished: there were embeddable slides
    assert "error page.jpg" in out and "noise.png" in out and "cut.jpg" in out and "EGFR_negative__P_empty" in out

    (cache_dir,) = (tmp_path / "features").iterdir()
    bag = read_bag(cache_dir / "EGFR_positive__P1.h5")
    assert sorted(bag.tile_names) == ["huge.png", "one_pixel.png", "tile_x0_y32.png", "tile_x32_y32.png"]
    assert bag.attrs["n_skipped"] == 3 and np.isfinite(bag.features).all()
    assert read_bag(cache_dir / "EGFR_negative__P2.h5").features.shape[0] == 2  # the loop was not followed
    assert read_bag(cache_dir / "EGFR_negative__Patiënt Ø 7.h5").tile_names == ["tuile à x0_y0.png"]
    rows = {row.slide_id: row for row in read_manifest(cache_dir)}
    assert rows["EGFR_negative__P_empty"].status == "failed"
    assert "no image tiles" in rows["EGFR_negative__P_empty"].error
    for path in cache_dir.glob("*.h5"):
        validate_bag(path, feature_dim=512)


@pytest.mark.parametrize("fault", ["no features", "inf"])
def test_a_bag_without_features_or_with_inf_is_refused_by_name(tmp_path, fault):
    import h5py  # only to forge a broken file; the pipeline itself opens .h5 files in bags.py alone

    path = tmp_path / "EGFR_positive__P1.h5"
    features = np.ones((3, 8), np.float32)
    features[1, 2] = np.inf
    write_bag(path, features, np.zeros((3, 2)), ["a", "b", "c"], {"cache_key": "k", "label": 1})
    if fault == "no features":
        with h5py.File(path, "a") as h5:
            del h5["features"]
    with pytest.raises(BagError, match="EGFR_positive__P1.h5"):
        validate_bag(path, feature_dim=8, cache_key="k")


def test_a_data_dir_that_does_not_exist_is_named(tmp_path, capsys):
    missing = tmp_path / "no_such_cohort"
    assert main(["--data_dir", str(missing), "--features_dir", str(tmp_path / "f"), *CLI]) != 0
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err
    assert not (tmp_path / "f").exists()


def test_a_features_dir_that_cannot_be_created_is_named(tmp_path, capsys):
    data = write_cohort(tmp_path / "train", {"EGFR_positive": {"P1": 1}, "EGFR_negative": {"P2": 1}})
    (tmp_path / "a_file").write_text("in the way")
    features = tmp_path / "a_file" / "features"
    assert main(["--data_dir", str(data), "--features_dir", str(features), *CLI]) == 2
    err = capsys.readouterr().err
    assert str(features) in err and "writable --features_dir" in err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores file permissions")
def test_a_read_only_features_dir_is_named(tmp_path, capsys):
    data = write_cohort(tmp_path / "train", {"EGFR_positive": {"P1": 1}, "EGFR_negative": {"P2": 1}})
    features = tmp_path / "features"
    features.mkdir()
    features.chmod(0o555)
    try:
        code = main(["--data_dir", str(data), "--features_dir", str(features), *CLI])
    finally:
        features.chmod(0o755)
    err = capsys.readouterr().err
    assert code == 2 and str(features) in err and "writable --features_dir" in err


def test_a_full_disk_mid_write_keeps_earlier_bags_and_leaves_no_partial_file(tmp_path, monkeypatch):
    data = write_cohort(tmp_path / "train", {"EGFR_positive": {"P1": 2, "P2": 2}, "EGFR_negative": {"P3": 2}})
    real = bags_module._to_attr
    written: list[str] = []

    def fill_the_disk_on_the_second_bag(value):
        # Called while the .h5 is open and half written: fail there as a full disk would.
        if isinstance(value, str) and value.startswith("EGFR_") and "__" in value and value not in written:
            written.append(value)
            if len(written) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(value)

    monkeypatch.setattr(bags_module, "_to_attr", fill_the_disk_on_the_second_bag)
    with pytest.raises(PipelineError, match="No space left") as raised:
        embed_cohort(data, features_dir=tmp_path / "features", **FAST)
    (cache_dir,) = (tmp_path / "features").iterdir()
    assert f"{written[1]}.h5" in str(raised.value) and "rerun" in str(raised.value)
    complete = sorted(p.stem for p in cache_dir.glob("*.h5"))
    assert written[0] in complete and written[1] not in complete  # earlier bag kept, the half-written one absent
    for path in cache_dir.glob("*.h5"):
        validate_bag(path, feature_dim=512)
    assert not [p for p in cache_dir.rglob("*") if p.is_file() and p.suffix == ".tmp"]

    monkeypatch.setattr(bags_module, "_to_attr", real)  # space freed: a rerun completes the cache
    report = embed_cohort(data, features_dir=tmp_path / "features", **FAST)
    assert report.n_reused == len(complete) and report.n_embedded == 3 - len(complete) and not report.failed


@pytest.mark.slow
def test_two_embed_processes_on_one_cache_do_not_corrupt_it(tmp_path):
    layout = {"EGFR_positive": {f"P{i}": 2 for i in range(4)}, "EGFR_negative": {f"N{i}": 2 for i in range(4)}}
    data = write_cohort(tmp_path / "train", layout)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "feature_extraction.embed", "--data_dir", str(data),
               "--features_dir", str(tmp_path / "features"), "--batch_size", "1", *CLI]
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in processes]
    for code, out, err in results:
        assert code == 0, err

    (cache_dir,) = (tmp_path / "features").iterdir()
    bags = sorted(cache_dir.glob("*.h5"))
    assert len(bags) == 8
    for path in bags:
        validate_bag(path, feature_dim=512)
    manifest = [row.slide_id for row in read_manifest(cache_dir)]
    assert sorted(manifest) == sorted(set(manifest)) and len(manifest) == 8
    assert not [p for p in cache_dir.rglob("*") if p.is_file() and p.suffix in (".tmp", ".lock")]


# Runs clam.train in a child that dies by SIGKILL halfway through writing its ``KILL_AT``-th torch.save
# (epoch 1 writes checkpoint_epoch_1.pt then best_model.pt; the 3rd save is checkpoint_epoch_2.pt).
_KILLED_TRAIN = """
import io, os, signal, sys, torch
real, calls = torch.save, [0]
def save(obj, f, *args, **kwargs):
    calls[0] += 1
    if calls[0] == int(os.environ["KILL_AT"]):
        buffer = io.BytesIO()
        real(obj, buffer)
        with open(f, "wb") as handle:
            handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            handle.flush()
            os.fsync(handle.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return real(obj, f, *args, **kwargs)
torch.save = save
from clam.train import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_minus_9_during_a_checkpoint_write_leaves_loadable_checkpoints_and_resume_continues(tmp_path):
    import torch

    from clam.checkpoints import model_from_checkpoint
    from tests.random_data import cohort_slides, write_cohort_folders, write_random_cache

    slides = cohort_slides(8, "train", seed=1)
    write_cohort_folders(tmp_path / "train", slides)
    write_random_cache(tmp_path / "features", slides, feature_dim=16)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CLAM_PROJECT_ROOT": str(tmp_path),
           "KILL_AT": "3"}
    args = ["--num_epochs", "3", "--max_tiles", "8", "--output_dir", str(tmp_path / "runs"), "--no_progress"]
    killed = subprocess.run([sys.executable, "-c", _KILLED_TRAIN, *args], env=env, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -9, killed.stderr
    (run,) = (tmp_path / "runs").iterdir()
    assert sorted(p.name for p in run.glob("*.pt")) == ["best_model.pt", "checkpoint_epoch_1.pt"]  # no half file
    for name in ("best_model.pt", "checkpoint_epoch_1.pt"):
        _, checkpoint = model_from_checkpoint(run / name)
        assert checkpoint["epoch"] == 1
    partial = [p.name for p in run.iterdir() if p.suffix == ".tmp"]
    assert all(name.startswith(".checkpoint_epoch_2.pt.") for name in partial)  # hidden, never under a final name

    resumed = subprocess.run([sys.executable, "-m", "clam.train", *args, "--resume", str(run / "checkpoint_epoch_1.pt")],
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert not [p for p in run.iterdir() if p.suffix == ".tmp"]  # the killed writer's temp file is cleared
    assert sorted(p.name for p in run.glob("checkpoint_epoch_*.pt")) == [f"checkpoint_epoch_{n}.pt" for n in (1, 2, 3)]
    last = torch.load(run / "checkpoint_epoch_3.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 3


def test_a_class_folder_of_loose_tiles_is_named(tmp_path, capsys):
    data = write_cohort(tmp_path / "train", {"EGFR_negative": {"P2": 1}})
    Image.new("RGB", (32, 32), (200, 120, 180)).save(data / "EGFR_positive" / "tile_0_0.png")
    assert main(["--data_dir", str(data), "--features_dir", str(tmp_path / "f"), *CLI]) != 0
    message = capsys.readouterr().err
    assert str(data / "EGFR_positive") in message and "<patient>/<tiles>" in message
