"""Fault injection (see docs/reliability.md): malformed tiles, image modes and odd names through a
whole embed run, folders (loose tiles, missing or read-only paths), broken bags refused before
training, a checkpoint whose pickle would run code, a disk that fills up mid-write, two embed
processes racing on one cache, embed killed by SIGKILL at several seeded-random points; and stage 2:
a full disk or a read-only folder while clam.train, cross-validation or clam.evaluate write, a bag
replaced under a running training, clam.train killed by SIGKILL at seeded-random points (mid
checkpoint write included) and resumed.

Faults covered elsewhere (decoder-level colour conversions, corrupt or NaN bags in clam.data, ...)
are referenced from docs/reliability.md, not repeated."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickletools
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from random_data import FAST, ROOT, assert_same_bags, write_cohort

from feature_extraction import bags as bags_module
from feature_extraction.bags import read_bag, validate_bag, write_bag
from feature_extraction.embed import embed_cohort, main
from feature_extraction.errors import BagError, PipelineError
from feature_extraction.layout import discover_slides
from feature_extraction.manifest import read_manifest

CLI = ["--backbone", "resnet18", "--weights", "random", "--runtime", "torch", "--num_workers", "0", "--quiet"]


def test_malformed_tiles_and_odd_names_are_embedded_or_skipped_by_name(tmp_path, capsys):
    data = write_cohort(tmp_path / "train", {"EGFR_positive": {"P1": 2}, "EGFR_negative": {"P2": 2}})
    slide = data / "EGFR_positive" / "P1"
    (slide / "error page.jpg").write_text("<!DOCTYPE html><html><body>502 Bad Gateway</body></html>")
    (slide / "noise.png").write_bytes(np.random.default_rng(0).bytes(4096))
    Image.new("RGB", (64, 64), (200, 100, 180)).save(slide / "cut.jpg")
    (slide / "cut.jpg").write_bytes((slide / "cut.jpg").read_bytes()[:300])  # a truncated JPEG
    Image.new("RGB", (64, 64), (200, 100, 180)).save(slide / "cut.png")
    (slide / "cut.png").write_bytes((slide / "cut.png").read_bytes()[:100])  # a truncated PNG
    (slide / "empty.png").write_bytes(b"")  # zero bytes
    Image.new("RGB", (1, 1), (200, 100, 180)).save(slide / "one_pixel.png")
    Image.new("RGB", (8000, 8000), (200, 100, 180)).save(slide / "huge.png", compress_level=1)
    # Decompression bombs: headers that claim 100 Mpx (above the 89 Mpx limit) and 2.5 Gpx, in a few bytes.
    (slide / "bomb_100mpx.png").write_bytes(png_header_claiming(10_000, 10_000))
    (slide / "bomb_2gpx.png").write_bytes(png_header_claiming(50_000, 50_000))
    os.symlink("self_loop.png", slide / "self_loop.png")  # a link to itself (ELOOP)
    odd = data / "EGFR_negative" / "Patiënt Ø 7"  # spaces and non-ASCII letters in folder and tile names
    odd.mkdir()
    Image.new("RGB", (32, 32), (190, 90, 170)).save(odd / "tuile à x0_y0.png")
    (data / "EGFR_negative" / "P_empty").mkdir()
    os.symlink(data / "EGFR_negative" / "P2", data / "EGFR_negative" / "P2" / "loop")  # a symlink loop

    code = main(["--data_dir", str(data), "--features_dir", str(tmp_path / "features"), *CLI])
    out = capsys.readouterr().out
    assert code == 0  # the run finished: there were embeddable slides
    skipped = [
        "error page.jpg",
        "noise.png",
        "cut.jpg",
        "cut.png",
        "empty.png",
        "bomb_100mpx.png",
        "bomb_2gpx.png",
        "self_loop.png",
    ]
    assert all(f"EGFR_positive__P1/{name}" in out for name in skipped) and "EGFR_negative__P_empty" in out
    assert "pixel limit" in out  # the bombs are refused from their headers, before any pixel is decoded

    (cache_dir,) = (tmp_path / "features").iterdir()
    bag = read_bag(cache_dir / "EGFR_positive__P1.h5")
    assert sorted(bag.tile_names) == ["huge.png", "one_pixel.png", "tile_x0_y32.png", "tile_x32_y32.png"]
    assert bag.attrs["n_skipped"] == len(skipped) and np.isfinite(bag.features).all()
    assert sorted(t["name"] for t in json.loads(bag.attrs["skipped_tiles"])) == sorted(skipped)
    assert read_bag(cache_dir / "EGFR_negative__P2.h5").features.shape[0] == 2  # the loop was not followed
    assert read_bag(cache_dir / "EGFR_negative__Patiënt Ø 7.h5").tile_names == ["tuile à x0_y0.png"]
    rows = {row.slide_id: row for row in read_manifest(cache_dir)}
    assert rows["EGFR_negative__P_empty"].status == "failed"
    assert "no image tiles" in rows["EGFR_negative__P_empty"].error
    for path in cache_dir.glob("*.h5"):
        validate_bag(path, feature_dim=512)


def test_tiles_of_every_image_mode_are_embedded_as_their_rgb_equivalents(tmp_path, capsys):
    """16-bit PNG, CMYK JPEG, RGBA, grayscale and palette tiles go through a whole run, and each gets the
    features of an 8-bit RGB PNG holding the colours it stands for (a twin tile in another slide)."""
    from feature_extraction.sources import decode_rgb

    data = write_cohort(tmp_path / "train", {"EGFR_positive": {"P_modes": 0}, "EGFR_negative": {"P_rgb": 0}})
    modes, twins = data / "EGFR_positive" / "P_modes", data / "EGFR_negative" / "P_rgb"
    modes.mkdir()
    twins.mkdir()
    rng = np.random.default_rng(3)
    rgb = (rng.integers(0, 90, (48, 48, 3)) + np.array([150, 80, 150])).astype(np.uint8)
    gray = rng.integers(0, 256, (48, 48)).astype(np.uint8)
    expected = {}

    Image.fromarray(gray.astype(np.uint16) * 257).save(modes / "gray16_x0_y0.png")  # 16-bit grayscale PNG
    expected["gray16_x0_y0.png"] = np.repeat(gray[..., None], 3, -1)
    Image.fromarray(gray, "L").save(modes / "gray_x48_y0.png")
    expected["gray_x48_y0.png"] = np.repeat(gray[..., None], 3, -1)
    palette = rng.integers(0, 256, (256, 3)).astype(np.uint8)
    indices = rng.integers(0, 256, (48, 48)).astype(np.uint8)
    paletted = Image.fromarray(indices, "P")
    paletted.putpalette(palette.tobytes())
    paletted.save(modes / "palette_x96_y0.png")
    expected["palette_x96_y0.png"] = palette[indices]
    alpha = np.where(rng.random((48, 48)) < 0.3, 0, 255).astype(np.uint8)  # transparent holes: white
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(modes / "rgba_x144_y0.png")
    expected["rgba_x144_y0.png"] = np.where(alpha[..., None] == 255, rgb, 255).astype(np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(modes / "cmyk_x192_y0.jpg", quality=95)
    cmyk = np.asarray(decode_rgb(modes / "cmyk_x192_y0.jpg"))  # JPEG is lossy: its own decode, checked close
    assert np.abs(cmyk.astype(int) - rgb).mean() < 8
    expected["cmyk_x192_y0.jpg"] = cmyk
    for name, pixels in expected.items():
        assert np.array_equal(np.asarray(decode_rgb(modes / name)), pixels), name
        Image.fromarray(pixels).save(twins / f"{Path(name).stem}.png")

    assert main(["--data_dir", str(data), "--features_dir", str(tmp_path / "features"), *CLI]) == 0
    assert "skipped" not in capsys.readouterr().out
    (cache_dir,) = (tmp_path / "features").iterdir()
    odd, plain = (
        read_bag(cache_dir / "EGFR_positive__P_modes.h5"),
        read_bag(cache_dir / "EGFR_negative__P_rgb.h5"),
    )
    assert sorted(odd.tile_names) == sorted(expected) and odd.attrs["n_skipped"] == 0
    assert not np.allclose(odd.features[0], odd.features[1])  # distinct tiles, distinct features
    twin_rows = {Path(name).stem: row for name, row in zip(plain.tile_names, plain.features)}
    for name, row in zip(odd.tile_names, odd.features):
        np.testing.assert_allclose(row, twin_rows[Path(name).stem], rtol=1e-4, atol=1e-5, err_msg=name)


class _CreatesAFileWhenUnpickled:
    """A pickle payload that runs code when loaded: ``open(marker, "w")`` creates the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_checkpoint_whose_pickle_would_run_code_is_refused_without_running_it(tmp_path):
    import torch

    from clam.checkpoints import model_from_checkpoint
    from clam.model import build_model
    from clam.train import load_checkpoint

    marker = tmp_path / "the payload ran"
    model = build_model(in_dim=8)
    torch.save(
        {"model_state_dict": model.state_dict(), "epoch": 1, "payload": _CreatesAFileWhenUnpickled(marker)},
        tmp_path / "evil.pt",
    )
    with pytest.raises(PipelineError, match="would run code"):
        load_checkpoint(checkpoint_path=tmp_path / "evil.pt", model=model, device="cpu")
    with pytest.raises(PipelineError, match="would run code"):
        model_from_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()  # refused without running it

    # The file does carry the payload: its pickle calls io.open, which is what an unguarded load
    # would run (read here with pickletools, which never executes anything) ...
    with zipfile.ZipFile(tmp_path / "evil.pt") as archive:
        pickled = next(archive.read(name) for name in archive.namelist() if name.endswith("data.pkl"))
    assert ("GLOBAL", "io open") in [(op.name, arg) for op, arg, _ in pickletools.genops(pickled)]
    # ... and running that call is what creates the marker.
    call, args = _CreatesAFileWhenUnpickled(marker).__reduce__()
    call(*args).close()
    assert marker.exists()


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels, followed by one scanline of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * (3 * width + 1)))
        + chunk(b"IEND", b"")
    )


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
    assert "Pass --data_dir" in err and "EGFR_positive/<patient>/<tiles>" in err  # what to do, and the layout
    assert not (tmp_path / "f").exists()


def test_a_missing_class_folder_is_named_with_the_layout_it_expects(tmp_path, capsys):
    data = write_cohort(tmp_path / "train", {"EGFR_positive": {"P1": 1}})
    (data / "EGFR_negative").rmdir()
    assert main(["--data_dir", str(data), "--features_dir", str(tmp_path / "f"), *CLI]) == 2
    err = capsys.readouterr().err
    assert f"class folder {data / 'EGFR_negative'} is missing" in err
    assert "EGFR_negative/<patient>/<tiles>" in err and "(optional)" in err and "Traceback" not in err
    assert not (tmp_path / "f").exists()  # refused before anything was created


def test_a_features_dir_that_cannot_be_created_is_named(tmp_path, capsys):
    data = write_cohort(tmp_path / "train", {"EGFR_positive": {"P1": 1}, "EGFR_negative": {"P2": 1}})
    (tmp_path / "a_file").write_text("in the way")
    features = tmp_path / "a_file" / "features"
    assert main(["--data_dir", str(data), "--features_dir", str(features), *CLI]) == 2
    err = capsys.readouterr().err
    assert str(features) in err and "writable --features_dir" in err


def simulate_read_only_file_system(monkeypatch, root: Path) -> None:
    """From now on, in this process, every write under ``root`` fails with EROFS as on a read-only
    mount: creating folders, opening files to write (Python, os.open, HDF5), renaming, removing,
    linking and touching. Reads are untouched. Root ignores permission bits, so ``chmod`` alone
    cannot make a read-only folder when the tests run as root; this can."""
    import builtins
    import io

    import h5py

    top = os.path.realpath(root)

    def inside(path) -> bool:
        if isinstance(path, int):
            return False
        real = os.path.realpath(os.fsdecode(path))
        return real == top or real.startswith(top + os.sep)

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and inside(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND) and inside(path):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if inside(path) and not os.path.lexists(path):
            refuse(path)
        return real_mkdir(path, *args, **kwargs)  # an existing one: FileExistsError, as the kernel says

    def refusing(real, *paths_at):
        def call(*args, **kwargs):
            for i in paths_at:
                if i < len(args) and inside(args[i]):
                    refuse(args[i])
            return real(*args, **kwargs)

        return call

    class ReadOnlyH5File(h5py.File):
        def __init__(self, name, mode="r", *args, **kwargs):
            if mode != "r" and inside(name):
                refuse(name)
            super().__init__(name, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "mkdir", mkdir)
    for name, paths_at in [
        ("replace", (0, 1)),
        ("rename", (0, 1)),
        ("unlink", (0,)),
        ("remove", (0,)),
        ("rmdir", (0,)),
        ("utime", (0,)),
        ("link", (1,)),
        ("symlink", (1,)),
    ]:
        monkeypatch.setattr(os, name, refusing(getattr(os, name), *paths_at))
    monkeypatch.setattr(h5py, "File", ReadOnlyH5File)


@pytest.mark.parametrize("how", ["read-only file system (simulated EROFS)", "chmod 555 (not as root)"])
def test_a_read_only_features_dir_is_named(tmp_path, capsys, monkeypatch, how):
    data = write_cohort(tmp_path / "train", {"EGFR_positive": {"P1": 1}, "EGFR_negative": {"P2": 1}})
    features = tmp_path / "features"
    features.mkdir()
    if how.startswith("chmod"):
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            pytest.skip("root ignores file permissions; the simulated read-only file system covers root")
        features.chmod(0o555)
    else:
        simulate_read_only_file_system(monkeypatch, features)
    try:
        code = main(["--data_dir", str(data), "--features_dir", str(features), *CLI])
    finally:
        monkeypatch.undo()
        features.chmod(0o755)
    err = capsys.readouterr().err
    assert code == 2  # nothing can be done: no bag can be written
    assert str(features) in err and "writable --features_dir" in err and "Traceback" not in err
    assert not list(features.iterdir())


def test_a_read_only_features_dir_holding_the_complete_cache_is_reused_and_missing_bags_are_named(
    tmp_path, capsys, monkeypatch
):
    data = write_cohort(tmp_path / "train", {"EGFR_positive": {"P1": 1}, "EGFR_negative": {"P2": 1}})
    features = tmp_path / "features"
    args = ["--data_dir", str(data), "--features_dir", str(features), *CLI]
    assert main(args) == 0
    (cache_dir,) = features.iterdir()
    before = {p: p.read_bytes() for p in cache_dir.rglob("*") if p.is_file()}
    capsys.readouterr()

    simulate_read_only_file_system(monkeypatch, features)
    assert main(args) == 0  # every bag is there: a shared read-only cache is usable as it is
    out = capsys.readouterr().out
    assert "0 embedded" in out and "2 reused" in out
    assert {p: p.read_bytes() for p in cache_dir.rglob("*") if p.is_file()} == before

    write_cohort(tmp_path / "train", {"EGFR_positive": {"P3": 1}}, seed=1)  # a new slide: it needs a bag
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(cache_dir) in err and "writable --features_dir" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in cache_dir.rglob("*") if p.is_file()} == before


def test_clam_train_trains_from_a_complete_cache_on_a_read_only_features_dir(tmp_path, monkeypatch):
    from random_data import cohort_slides, write_cohort_folders, write_random_cache

    from clam.train import main as train_main

    slides = cohort_slides(8, "train", seed=1)
    write_cohort_folders(tmp_path / "train", slides)
    write_random_cache(tmp_path / "features", slides, feature_dim=16)
    monkeypatch.setenv("CLAM_PROJECT_ROOT", str(tmp_path))
    simulate_read_only_file_system(monkeypatch, tmp_path / "features")
    assert train_main(["--no_progress", "--num_epochs", "1", "--output_dir", str(tmp_path / "runs")]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "best_model.pt").is_file()


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
        embed_cohort(FAST, data, features_dir=tmp_path / "features")
    (cache_dir,) = (tmp_path / "features").iterdir()
    assert f"{written[1]}.h5" in str(raised.value) and "rerun" in str(raised.value)
    complete = sorted(p.stem for p in cache_dir.glob("*.h5"))
    assert (
        written[0] in complete and written[1] not in complete
    )  # earlier bag kept, the half-written one absent
    for path in cache_dir.glob("*.h5"):
        validate_bag(path, feature_dim=512)
    assert not [p for p in cache_dir.rglob("*") if p.is_file() and p.suffix == ".tmp"]

    monkeypatch.setattr(bags_module, "_to_attr", real)  # space freed: a rerun completes the cache
    report = embed_cohort(FAST, data, features_dir=tmp_path / "features")
    assert report.n_reused == len(complete) and report.n_embedded == 3 - len(complete) and not report.failed


@pytest.mark.slow
def test_two_embed_processes_on_one_cache_do_not_corrupt_it(tmp_path):
    layout = {
        "EGFR_positive": {f"P{i}": 2 for i in range(4)},
        "EGFR_negative": {f"N{i}": 2 for i in range(4)},
    }
    data = write_cohort(tmp_path / "train", layout)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable,
        "-m",
        "feature_extraction.embed",
        "--data_dir",
        str(data),
        "--features_dir",
        str(tmp_path / "features"),
        "--batch_size",
        "1",
        *CLI,
    ]
    processes = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), *p.communicate()) for p in processes]
    for code, _out, err in results:
        assert code == 0, err

    (cache_dir,) = (tmp_path / "features").iterdir()
    bags = sorted(cache_dir.glob("*.h5"))
    assert len(bags) == 8
    for path in bags:
        validate_bag(path, feature_dim=512)
    manifest = [row.slide_id for row in read_manifest(cache_dir)]
    assert sorted(manifest) == sorted(set(manifest)) and len(manifest) == 8
    assert not [p for p in cache_dir.rglob("*") if p.is_file() and p.suffix in (".tmp", ".lock")]


def test_a_class_folder_of_loose_tiles_is_named(tmp_path, capsys):
    data = write_cohort(tmp_path / "train", {"EGFR_negative": {"P2": 1}})
    Image.new("RGB", (32, 32), (200, 120, 180)).save(data / "EGFR_positive" / "tile_0_0.png")
    assert main(["--data_dir", str(data), "--features_dir", str(tmp_path / "f"), *CLI]) != 0
    message = capsys.readouterr().err
    assert str(data / "EGFR_positive") in message and "<patient>/<tiles>" in message


# Runs `python -m feature_extraction.embed` (through runpy, as -m does) and stops for good at the
# PAUSE_AT-th event of kind PAUSE_KIND, after writing PAUSE_MARKER, so that the parent kills it with
# SIGKILL from outside at exactly that point. Kinds (counted per kind, so the point is the same on
# every run whatever the threads do):
#   tile      about to decode a tile (main thread)
#   lock      a slide's lock just taken, nothing of the slide written yet (manifest lock not counted)
#   half_bag  a bag's hidden temp .h5 holds the first half of its bytes (writer thread)
#   full_bag  a bag's hidden temp .h5 complete and fsynced, not yet renamed to <slide_id>.h5
#   manifest  manifest.csv complete under its hidden temp name, not yet renamed
_PAUSED_EMBED = """
import os, pathlib, runpy, sys, threading, time
from feature_extraction import bags, cache, manifest, sources as tiles
kind, at, marker = os.environ["PAUSE_KIND"], int(os.environ["PAUSE_AT"]), os.environ["PAUSE_MARKER"]
seen, mutex = [0], threading.Lock()

def event(name, detail):
    if name != kind:
        return
    with mutex:
        seen[0] += 1
        hit = seen[0] == at
    if hit:
        with open(marker + ".part", "w", encoding="utf-8") as handle:
            handle.write(str(detail))
        real_replace(marker + ".part", marker)  # the parent sees the marker only once it is complete
        while True:
            time.sleep(1)  # the parent sends SIGKILL now

real_load, real_acquire = tiles.TileRef.load, cache.SlideLocks.try_acquire
real_write_bytes, real_replace = pathlib.Path.write_bytes, os.replace

def load(self):
    event("tile", self.path)
    return real_load(self)

def try_acquire(self, slide_id):
    taken = real_acquire(self, slide_id)
    if taken and slide_id != manifest.MANIFEST_LOCK:
        event("lock", slide_id)
    return taken

def write_bytes(self, data):
    if self.name.startswith(".") and bags.BAG_SUFFIX + "." in self.name and self.name.endswith(".tmp"):
        view = memoryview(data)
        with open(self, "wb") as handle:  # as a kill mid-write would leave it
            handle.write(view[: len(view) // 2])
        event("half_bag", self)
    return real_write_bytes(self, data)

def replace(src, dst, *args, **kwargs):
    if str(dst).endswith(bags.BAG_SUFFIX):
        event("full_bag", src)
    elif os.path.basename(str(dst)) == manifest.MANIFEST_CSV:
        event("manifest", src)
    return real_replace(src, dst, *args, **kwargs)

tiles.TileRef.load, cache.SlideLocks.try_acquire = load, try_acquire
pathlib.Path.write_bytes, os.replace = write_bytes, replace
sys.argv[0] = "feature_extraction.embed"
runpy.run_module("feature_extraction.embed", run_name="__main__", alter_sys=True)
"""


def kill_at_pause(script: str, argv: list[str], env: dict, kind: str, at: int, marker: Path) -> None:
    """Run ``script`` (one of the _PAUSED_* programs) with ``argv`` until it pauses at its ``at``-th
    ``kind`` event and writes ``marker``, then kill -9 it there."""
    process = subprocess.Popen(
        [sys.executable, "-c", script, *argv],
        env={**env, "PAUSE_KIND": kind, "PAUSE_AT": str(at), "PAUSE_MARKER": str(marker)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    stderr = process.communicate()[1]
    assert marker.exists(), f"never reached {kind} #{at}:\n{stderr}"
    assert process.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_kill_minus_9_at_seeded_random_points_then_rerun_gives_the_bags_of_an_uninterrupted_run(
    tmp_path, tiny_cohort
):
    data = tiny_cohort.split_dirs["train"]
    slides = discover_slides(data, "train")
    n_tiles = {s.slide_id: len(list(s.path.glob("*.png"))) for s in slides}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    reference = embed_cohort(
        replace(FAST, batch_size=1), data, features_dir=tmp_path / "clean"
    )  # uninterrupted
    rng = np.random.default_rng(6)  # fixed: the same kill points on every run

    def embed(features: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "feature_extraction.embed",
            "--data_dir",
            str(data),
            "--features_dir",
            str(features),
            "--batch_size",
            "1",
            *CLI,
        ]

    def bags_on_disk(features: Path) -> dict[str, tuple[int, int]]:
        """slide_id -> (inode, mtime) of every bag; each file under a bag's name must be complete."""
        found = {}
        for path in features.glob("*/*.h5"):
            if not path.name.startswith("."):
                validate_bag(path, feature_dim=512)
                found[path.stem] = (path.stat().st_ino, path.stat().st_mtime_ns)
        return found

    def rerun_and_check(features: Path, before: dict[str, tuple[int, int]]) -> None:
        rerun = subprocess.run(embed(features), env=env, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr
        n_missing = len(slides) - len(before)
        assert f"{n_missing} embedded" in rerun.stdout and f"{len(before)} reused" in rerun.stdout, (
            rerun.stdout
        )
        after = bags_on_disk(features)
        assert {k: after[k] for k in before} == before  # the complete bags were reused, not rewritten
        (cache_dir,) = features.iterdir()
        assert [row.slide_id for row in read_manifest(cache_dir)] == sorted(s.slide_id for s in slides)
        assert not [p for p in cache_dir.rglob("*") if p.suffix in (".tmp", ".lock")]
        assert_same_bags(reference.cache_dir, cache_dir)  # equal (exactly so on a CPU)

    # 1. A plain run killed at a random moment of its embedding: a seeded fraction of the time the
    #    uninterrupted run took, counted from the first slide lock (the kill may land anywhere: decoding,
    #    the backbone, HDF5 writes, renames; if the run is faster than that, it finishes instead).
    features = tmp_path / "timed"
    process = subprocess.Popen(embed(features), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while (
        process.poll() is None
        and not list(features.glob("*/.locks/*__*.lock"))
        and time.monotonic() < deadline
    ):
        time.sleep(0.005)
    delay = float(rng.uniform(0.0, 1.0)) * reference.embed_seconds
    try:
        process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
    assert process.wait() in (0, -signal.SIGKILL)
    before = bags_on_disk(features)
    print(f"killed {delay:.2f} s into the embedding: {len(before)} of {len(slides)} bags complete")
    rerun_and_check(features, before)

    # 2. Three kills at events of three different kinds, each at a random occurrence among those the
    #    remaining work reaches (so each lands mid-run and leaves work for the next run), then one
    #    while the manifest is replaced (the last write of a run); then a plain rerun.
    features = tmp_path / "paused"
    points = [
        (str(kind), 0) for kind in rng.choice(["tile", "lock", "half_bag", "full_bag"], 3, replace=False)
    ]
    done: dict[str, tuple[int, int]] = {}
    for kind, at in [*points, ("manifest", 1)]:
        missing = [s.slide_id for s in slides if s.slide_id not in done]
        if kind != "manifest":
            at = int(
                rng.integers(1, (sum(n_tiles[s] for s in missing) if kind == "tile" else len(missing)) + 1)
            )
        marker = tmp_path / f"paused_{kind}_{at}"
        kill_at_pause(_PAUSED_EMBED, embed(features)[3:], env, kind, at, marker)
        if kind in ("half_bag", "full_bag", "manifest"):
            left = Path(marker.read_text(encoding="utf-8"))  # the hidden temp file it was writing
            assert left.name.startswith(".") and left.name.endswith(".tmp") and left.exists()
        now = bags_on_disk(features)
        assert {k: now.get(k) for k in done} == done  # no complete bag lost or rewritten
        done = now
        print(f"killed at {kind} #{at}: {len(done)} of {len(slides)} bags complete")
    assert len(done) == len(slides)  # the run killed at the manifest had written every bag
    rerun_and_check(features, done)


def test_loose_tiles_beside_patient_folders_are_named_once_and_the_run_goes_on(tmp_path, capsys, caplog):
    data = write_cohort(tmp_path / "train", {"EGFR_positive": {"P1": 2}, "EGFR_negative": {"P2": 2}})
    class_dir = data / "EGFR_positive"
    for name in ("tile_x0_y0.png", "tile_x32_y0.jpg", "tile_x64_y0.png"):
        Image.new("RGB", (32, 32), (200, 120, 180)).save(class_dir / name)
    (class_dir / "notes.txt").write_text("not an image: not counted")

    with caplog.at_level("WARNING", logger="feature_extraction.layout"):
        discover_slides(
            data, "train"
        )  # clam.train lists the cohort, then the embedding it starts lists it again
        code = main(["--data_dir", str(data), "--features_dir", str(tmp_path / "features"), *CLI])
    assert code == 0  # the run goes on
    (warning,) = [r for r in caplog.records if r.name == "feature_extraction.layout"]  # said once
    message = warning.getMessage()
    assert warning.levelname == "WARNING" and str(class_dir) in message and "3 loose image files" in message
    assert "NOT embedded" in message and "Move them into the folder of the patient" in message
    assert f"{class_dir}/<patient>/<tiles>" in message
    (cache_dir,) = (tmp_path / "features").iterdir()
    assert sorted(p.stem for p in cache_dir.glob("*.h5")) == ["EGFR_negative__P2", "EGFR_positive__P1"]
    assert (
        read_bag(cache_dir / "EGFR_positive__P1.h5").features.shape[0] == 2
    )  # the loose tiles are in no bag


def test_the_loose_tile_warning_reaches_stderr_of_the_command(tmp_path):
    data = write_cohort(tmp_path / "train", {"EGFR_positive": {"P1": 1}, "EGFR_negative": {"P2": 1}})
    Image.new("RGB", (32, 32), (200, 120, 180)).save(data / "EGFR_negative" / "stray.png")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    code = "import sys; from feature_extraction.layout import discover_slides; discover_slides(sys.argv[1])"
    listed = subprocess.run(
        [sys.executable, "-c", code, str(data)], env=env, capture_output=True, text=True, timeout=120
    )
    assert listed.returncode == 0, listed.stderr
    assert listed.stderr.count("loose image file") == 1 and str(data / "EGFR_negative") in listed.stderr


@pytest.mark.parametrize(
    "fault, says",
    [
        ("truncated", "truncated or corrupt"),
        ("no features", "no 'features'"),
        ("NaN", "NaN"),
        ("Inf", "Inf"),
        ("wrong dimension", "feature dimension 8, expected 16"),
        ("another cache key", "cache key 'otherkey'"),
    ],
)
def test_a_broken_bag_stops_clam_train_by_name_before_training(tmp_path, monkeypatch, capsys, fault, says):
    import h5py  # only to forge a broken file
    from random_data import cohort_slides, write_cohort_folders, write_random_cache

    from clam.train import main as train_main

    slides = cohort_slides(8, "train", seed=1)
    write_cohort_folders(tmp_path / "train", slides)
    cache_dir = write_random_cache(tmp_path / "features", slides, feature_dim=16)
    monkeypatch.setenv("CLAM_PROJECT_ROOT", str(tmp_path))
    victim = cache_dir / f"{slides[-1].slide_id}.h5"
    bag = read_bag(victim)
    features, attrs = bag.features.copy(), dict(bag.attrs)
    if fault == "truncated":
        victim.write_bytes(victim.read_bytes()[:300])
    elif fault == "no features":
        with h5py.File(victim, "a") as h5:
            del h5["features"]
    else:
        if fault == "NaN":
            features[1, 2] = np.nan
        elif fault == "Inf":
            features[1, 2] = -np.inf
        elif fault == "wrong dimension":
            features = features[:, :8]
        else:
            attrs["cache_key"] = "otherkey"
        attrs.pop("feature_dim", None), attrs.pop("n_instances", None), attrs.pop("format_version", None)
        write_bag(victim, features, bag.coords, bag.tile_names, attrs)

    assert train_main(["--no_progress", "--num_epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert str(victim) in err and says in err and "Traceback" not in err
    assert not (tmp_path / "clam" / "checkpoints").exists()  # refused before training: no run folder


# ------------------------------------------------------------ real file systems (root with mount rights)


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "4m"):
    """A real tmpfs of ``size`` mounted at ``path`` (skips the test where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
        )
        if shutil.which("mount")
        else None
    )
    if mounted is None or mounted.returncode != 0:
        pytest.skip(
            "mounting a tmpfs needs root with mount rights; the simulated file systems cover the rest"
        )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True, capture_output=True)


def test_a_real_read_only_mount_is_reused_when_complete_and_named_when_a_bag_is_missing(tmp_path, capsys):
    data = write_cohort(tmp_path / "train", {"EGFR_positive": {"P1": 1}, "EGFR_negative": {"P2": 1}})
    with tmpfs(tmp_path / "features") as features:
        args = ["--data_dir", str(data), "--features_dir", str(features), *CLI]
        assert main(args) == 0
        (cache_dir,) = features.iterdir()
        before = {p: p.read_bytes() for p in cache_dir.rglob("*") if p.is_file()}
        remount(features, "ro")
        capsys.readouterr()
        assert main(args) == 0  # every bag is there: a read-only shared cache is used as it is
        assert "0 embedded" in capsys.readouterr().out
        write_cohort(tmp_path / "train", {"EGFR_positive": {"P3": 1}}, seed=1)  # a new slide needs a bag
        assert main(args) == 2
        err = capsys.readouterr().err
        assert str(cache_dir) in err and "writable --features_dir" in err and "Traceback" not in err
        assert {p: p.read_bytes() for p in cache_dir.rglob("*") if p.is_file()} == before


def test_a_really_full_disk_keeps_earlier_bags_and_a_rerun_with_space_resumes(tmp_path, capsys):
    data = write_cohort(tmp_path / "train", {"EGFR_positive": {"P1": 2}, "EGFR_negative": {"P2": 2}})
    with tmpfs(tmp_path / "features", size="2m") as features:
        args = ["--data_dir", str(data), "--features_dir", str(features), *CLI]
        assert main(args) == 0
        (cache_dir,) = features.iterdir()
        first = {p.name: p.read_bytes() for p in cache_dir.glob("*.h5")}
        write_cohort(tmp_path / "train", {"EGFR_positive": {f"P{i}": 24 for i in range(3, 6)}}, seed=1)
        filler = features / "filler"
        stat = os.statvfs(features)
        filler.write_bytes(
            b"\0" * (stat.f_bavail * stat.f_frsize - 24 * 1024)
        )  # 24 KiB left: a lock, not a bag
        capsys.readouterr()

        assert main(args) != 0
        err = capsys.readouterr().err
        assert "Traceback" not in err and str(cache_dir) in err, err
        assert "No space left on device" in err and "free space" in err, err
        assert {p.name: p.read_bytes() for p in cache_dir.glob("*.h5")} == first  # earlier bags untouched
        for path in cache_dir.glob("*.h5"):
            validate_bag(path, feature_dim=512)  # nothing under a bag's name is half written

        filler.unlink()
        assert main(args) == 0  # space again: the rerun embeds what is missing, reuses the rest
        assert "3 embedded" in capsys.readouterr().out
        assert len(list(cache_dir.glob("*.h5"))) == 5
        assert not list(cache_dir.rglob("*.tmp"))


# ------------------------------------------------------------ stage 2 (clam.train, clam.evaluate) under faults


def simulate_full_disk(monkeypatch, root: Path, name: str, nth: int = 1) -> list[Path]:
    """From now on, in this process, the ``nth`` write of a file called ``name`` under ``root`` (its
    hidden temporary file, as atomic writes make it) fails like a disk that fills up: half of the
    first chunk is written, then ENOSPC. Every write goes through Python's ``open`` (checkpoints
    too: they are serialised in memory and written with one plain write). Returns the paths hit."""
    import builtins
    import io

    top = os.path.realpath(root)
    seen, hit = [0], []
    real_open = builtins.open

    class FillingFile:
        def __init__(self, handle) -> None:
            self._handle = handle

        def write(self, data):
            self._handle.write(data[: len(data) // 2])
            self._handle.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, attribute):
            return getattr(self._handle, attribute)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._handle.close()

    def final_name(path: str) -> str:
        base = os.path.basename(path)
        return base[1:].rsplit(".", 2)[0] if base.startswith(".") and base.endswith(".tmp") else base

    def open_(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if isinstance(file, int) or not any(c in mode for c in "wax+"):
            return handle
        real = os.path.realpath(os.fsdecode(file))
        if real.startswith(top + os.sep) and final_name(real) == name:
            seen[0] += 1
            if seen[0] == nth:
                hit.append(Path(real))
                return FillingFile(handle)
        return handle

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    return hit


@pytest.fixture
def train_cohort(tmp_path, monkeypatch) -> Path:
    """A project root with a train cohort of 8 patients and its random feature cache (16-d bags)."""
    from random_data import cohort_slides, write_cohort_folders, write_random_cache

    slides = cohort_slides(8, "train", seed=1)
    write_cohort_folders(tmp_path / "train", slides)
    write_random_cache(tmp_path / "features", slides, feature_dim=16)
    monkeypatch.setenv("CLAM_PROJECT_ROOT", str(tmp_path))
    return tmp_path


def same_weights(a: Path, b: Path) -> bool:
    import torch

    x, y = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    return x["epoch"] == y["epoch"] and all(
        torch.equal(v, y["model_state_dict"][k]) for k, v in x["model_state_dict"].items()
    )


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "name, nth", [("split.csv", 1), ("best_model.pt", 1), ("config.json", 2), ("checkpoint_epoch_2.pt", 1)]
)
def test_a_full_disk_while_clam_train_writes_gives_one_message_and_resume_ends_as_uninterrupted(
    train_cohort, tmp_path, capsys, name, nth
):
    import re

    from clam.train import main as train_main

    args = ["--num_epochs", "3", "--no_progress"]
    assert train_main([*args, "--output_dir", str(tmp_path / "reference")]) == 0
    (reference,) = (tmp_path / "reference").iterdir()
    runs = tmp_path / "runs"
    capsys.readouterr()

    with pytest.MonkeyPatch.context() as disk:
        hit = simulate_full_disk(disk, runs, name, nth)
        code = train_main([*args, "--output_dir", str(runs)])
    err = capsys.readouterr().err
    assert hit and code == 2, err
    assert "Traceback" not in err and err.count("error:") == 1
    target = hit[0].parent / name
    assert (
        f"cannot write {target} ([Errno 28] No space left on device)" in err and "free space there" in err
    ), err
    assert not [p for p in runs.rglob("*") if p.name.endswith(".tmp")]  # the half-written temp file is gone

    if name == "split.csv":  # at the start: nothing trained, no run folder left behind
        assert "Nothing was trained" in err and not list(runs.iterdir())
        assert train_main([*args, "--output_dir", str(runs)]) == 0
        (run,) = runs.iterdir()
    elif name == "best_model.pt":  # epoch 1's first write: nothing to resume from
        assert "No epoch was saved yet: run the command again" in err
        (failed,) = runs.iterdir()
        assert sorted(p.name for p in failed.iterdir()) == ["split.csv"]
        assert train_main([*args, "--output_dir", str(runs)]) == 0
        (run,) = [p for p in runs.iterdir() if p != failed]
    else:  # epoch 2: epoch 1's files stay complete, and the message says how to go on
        (run,) = runs.iterdir()
        resume = re.search(r"--resume (\S+)", err).group(1)
        assert (
            resume == str(run / "checkpoint_epoch_1.pt")
            and "checkpoint_epoch_1.pt and best_model.pt are intact" in err
        )
        assert not (run / "checkpoint_epoch_2.pt").exists()
        for saved in ("checkpoint_epoch_1.pt", "best_model.pt"):
            from clam.checkpoints import model_from_checkpoint

            model_from_checkpoint(run / saved)  # loads
        assert same_weights(run / "checkpoint_epoch_1.pt", reference / "checkpoint_epoch_1.pt")
        assert train_main(["--resume", resume]) == 0  # space again: continue where it stopped
    for saved in ("checkpoint_epoch_3.pt", "best_model.pt"):
        assert same_weights(run / saved, reference / saved), saved
    config = json.loads((run / "config.json").read_text())
    assert config["status"] == "finished"
    assert [r["val_loss"] for r in config["metrics"]] == [
        r["val_loss"] for r in json.loads((reference / "config.json").read_text())["metrics"]
    ]
    assert not [p for p in runs.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("how", ["read-only file system (simulated EROFS)", "chmod 555 (not as root)"])
def test_a_read_only_output_dir_or_run_folder_is_named_and_left_unchanged(
    train_cohort, tmp_path, capsys, how
):
    from clam.train import main as train_main

    if how.startswith("chmod") and hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("root ignores file permissions; the simulated read-only file system covers root")

    def read_only(monkeypatch, folder: Path) -> None:
        if how.startswith("chmod"):
            folder.chmod(0o555)  # restored by the caller
        else:
            simulate_read_only_file_system(monkeypatch, folder)

    runs = tmp_path / "runs"
    runs.mkdir()
    with pytest.MonkeyPatch.context() as fs:
        read_only(fs, runs)
        try:
            code = train_main(["--num_epochs", "1", "--no_progress", "--output_dir", str(runs)])
        finally:
            runs.chmod(0o755)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert (
        f"cannot create a run folder in {runs} (" in err
        and "pass a writable --output_dir" in err
        and "No run was started" in err
    )
    assert not list(runs.iterdir())

    # A run folder that became read-only: --resume says which file it could not write; nothing changes.
    assert train_main(["--num_epochs", "1", "--no_progress", "--output_dir", str(runs)]) == 0
    (run,) = runs.iterdir()
    before = files_of(run)
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as fs:
        read_only(fs, run)
        try:
            code = train_main(["--resume", str(run / "checkpoint_epoch_1.pt"), "--num_epochs", "2"])
        finally:
            run.chmod(0o755)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("error:") == 1, err
    assert f"cannot write {run}{os.sep}" in err and (
        "Read-only file system" in err or "Permission denied" in err
    )
    assert f"--resume {run / 'checkpoint_epoch_1.pt'}" in err
    assert files_of(run) == before


def test_a_full_disk_while_cross_validation_writes_its_summary_is_one_message(train_cohort, tmp_path, capsys):
    from clam.train import main as train_main

    runs = tmp_path / "runs"
    with pytest.MonkeyPatch.context() as disk:
        hit = simulate_full_disk(disk, runs, "summary.json")
        code = train_main(["--folds", "2", "--num_epochs", "1", "--no_progress", "--output_dir", str(runs)])
    err = capsys.readouterr().err
    assert hit and code == 2 and "Traceback" not in err, err
    (parent,) = runs.iterdir()
    assert f"cannot write {parent / 'summary.json'} ([Errno 28] No space left on device)" in err
    assert "free space there" in err and "run the command again" in err
    assert (parent / "fold_1" / "best_model.pt").is_file() and (parent / "fold_2" / "best_model.pt").is_file()
    assert not (parent / "summary.json").exists() and not list(parent.rglob("*.tmp"))


@pytest.mark.parametrize("name", ["predictions.csv", "roc.png"])
def test_a_full_disk_while_evaluate_writes_predictions_or_figures_is_one_message(
    train_cohort, tmp_path, capsys, name
):
    from clam.evaluate import main as evaluate_main
    from clam.train import main as train_main

    assert train_main(["--num_epochs", "1", "--no_progress", "--output_dir", str(tmp_path / "runs")]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    out = tmp_path / "evaluation"
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as disk:
        hit = simulate_full_disk(disk, out, name)
        code = evaluate_main(
            [
                "--checkpoint",
                str(run / "best_model.pt"),
                "--data_dir",
                str(train_cohort / "train"),
                "--split",
                "train",
                "--num_workers",
                "0",
                "--n_bootstrap",
                "50",
                "--attention",
                "none",
                "--output_dir",
                str(out),
            ]
        )
    err = capsys.readouterr().err
    assert hit and code == 2 and "Traceback" not in err and err.count("error:") == 1, err
    assert (
        f"cannot write {out / name} ([Errno 28] No space left on device)" in err and "free space there" in err
    )
    assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize("loading", ["streamed, main process", "streamed, loader worker", "in memory"])
def test_a_bag_replaced_under_a_running_training_is_named(train_cohort, tmp_path, loading, caplog):
    import logging

    import numpy as np

    from clam.data import BagChanged
    from clam.train import TrainConfig, train
    from feature_extraction.bags import read_bag, write_bag

    cache_dir = next((train_cohort / "features").iterdir())
    victim = sorted(cache_dir.glob("*.h5"))[0]

    class ReplaceAfterEpoch1(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith(
                "epoch 1/"
            ):  # a rerun of embed replaces a bag (a new file renamed in)
                bag = read_bag(victim)
                write_bag(
                    victim,
                    bag.features + np.float32(1.0),
                    bag.coords,
                    bag.tile_names,
                    {
                        k: v
                        for k, v in bag.attrs.items()
                        if k not in ("feature_dim", "n_instances", "format_version")
                    },
                )

    config = TrainConfig(
        num_epochs=3,
        progress=False,
        output_dir=str(tmp_path / "runs"),
        in_memory="yes" if loading == "in memory" else "no",
        num_workers=1 if "worker" in loading else 0,
    )
    caplog.set_level(logging.INFO, logger="clam")
    clam_logger, replacer = logging.getLogger("clam"), ReplaceAfterEpoch1()
    clam_logger.addHandler(replacer)
    try:
        if (
            loading == "in memory"
        ):  # read once before the first epoch: the run goes on with what it read, and says so
            run = train(config)
        else:
            with pytest.raises(BagChanged) as raised:
                train(config)
    finally:
        clam_logger.removeHandler(replacer)
    if loading == "in memory":
        warnings = [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.WARNING and r.getMessage().startswith("bag")
        ]
        assert len(warnings) == 1 and str(victim) in warnings[0] and "read it into memory" in warnings[0]
        assert "--resume or a new run will read the new bag" in warnings[0]
        assert json.loads((run / "config.json").read_text())["status"] == "finished"
        return
    message = str(raised.value)
    (run,) = (tmp_path / "runs").iterdir()
    assert str(victim) in message and "changed while training was running" in message
    assert (
        f"once embedding has finished, continue with: python -m clam.train --resume {run / 'checkpoint_epoch_1.pt'}"
        in message
    )
    assert "Traceback" not in message and "worker" not in message
    assert not (run / "checkpoint_epoch_2.pt").exists()


# Runs `python -m clam.train` (through runpy, as -m does) and stops for good at the PAUSE_AT-th event of
# kind PAUSE_KIND, after writing PAUSE_MARKER, so that the parent kills it with SIGKILL from outside at
# exactly that point. Kinds (counted per kind, from the start of this process):
#   batch            a batch of bags collated, about to be trained on (or validated)
#   half_checkpoint  a .pt's hidden temp file (best_model.pt or checkpoint_epoch_N.pt) holds half its bytes
#   full_checkpoint  a .pt's temp file complete and fsynced, not yet renamed
#   config           config.json complete under its temp name, not yet renamed
_PAUSED_TRAIN = """
import os, pathlib, runpy, sys, time
from clam import bag_dataset
kind, at, marker = os.environ["PAUSE_KIND"], int(os.environ["PAUSE_AT"]), os.environ["PAUSE_MARKER"]
seen = [0]

def event(name, detail):
    if name != kind:
        return
    seen[0] += 1
    if seen[0] == at:
        with open(marker + ".part", "w", encoding="utf-8") as handle:
            handle.write(str(detail))
        real_replace(marker + ".part", marker)  # the parent sees the marker only once it is complete
        while True:
            time.sleep(1)  # the parent sends SIGKILL now

real_collate, real_write_bytes, real_replace = bag_dataset.collate_bags, pathlib.Path.write_bytes, os.replace

def collate(items):
    event("batch", len(items))
    return real_collate(items)

def write_bytes(self, payload):
    if self.name.startswith(".") and ".pt." in self.name and self.name.endswith(".tmp"):
        view = memoryview(payload)
        with open(self, "wb") as handle:  # as a kill mid-write would leave it
            handle.write(view[: len(view) // 2])
            handle.flush()
            os.fsync(handle.fileno())
        event("half_checkpoint", self)
    return real_write_bytes(self, payload)

def replace(src, dst, *args, **kwargs):
    name = os.path.basename(str(dst))
    if name.endswith(".pt"):
        event("full_checkpoint", src)
    elif name == "config.json":
        event("config", src)
    return real_replace(src, dst, *args, **kwargs)

bag_dataset.collate_bags, pathlib.Path.write_bytes, os.replace = collate, write_bytes, replace
sys.argv[0] = "clam.train"
runpy.run_module("clam.train", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_kill_minus_9_of_clam_train_at_seeded_random_points_then_resume_gives_the_uninterrupted_weights(
    tmp_path,
):
    from random_data import cohort_slides, write_cohort_folders, write_random_cache

    from clam.checkpoints import model_from_checkpoint

    slides = cohort_slides(6, "train", instances=(5, 20), seed=1)
    write_cohort_folders(tmp_path / "train", slides)
    write_random_cache(tmp_path / "features", slides, feature_dim=16)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CLAM_PROJECT_ROOT": str(tmp_path)}
    n_epochs = 4
    args = ["--num_epochs", str(n_epochs), "--num_workers", "0", "--no_progress"]
    reference = subprocess.run(
        [sys.executable, "-m", "clam.train", *args, "--output_dir", str(tmp_path / "reference")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )  # uninterrupted
    assert reference.returncode == 0, reference.stderr
    (reference_run,) = (tmp_path / "reference").iterdir()
    data = json.loads((reference_run / "config.json").read_text())["data"]
    assert data["n_val_bags"] <= 16  # one validation batch per epoch
    per_epoch = {"batch": data["n_train_bags"] + 1, "half_checkpoint": 1, "full_checkpoint": 1, "config": 1}
    rng = np.random.default_rng(11)  # fixed: the same kill points on every run
    runs = tmp_path / "runs"

    def checkpoints(run: Path) -> dict[int, Path]:
        return {int(p.stem.rsplit("_", 1)[1]): p for p in run.glob("checkpoint_epoch_*.pt")}

    def killed_at(kind: str, at: int, argv: list[str]) -> Path:
        marker = tmp_path / f"paused_{kind}_{at}_{len(list(tmp_path.glob('paused_*')))}"
        kill_at_pause(_PAUSED_TRAIN, argv, env, kind, at, marker)
        return Path(marker.read_text(encoding="utf-8")) if kind != "batch" else None

    # 1. A fresh run killed at a seeded batch after epoch 1 was saved; 2. three more kills, each resumed
    #    from the newest checkpoint and killed at a seeded occurrence of an event among those the
    #    remaining epochs reach: halfway through writing a .pt always, and two of {a .pt complete but not
    #    renamed, config.json complete but not renamed, a batch}. Every kill lands before the last
    #    epoch's checkpoint is renamed (it is each epoch's last write), so each leaves work to resume;
    #    3. a plain --resume to the end.
    points = [("batch", int(rng.integers(per_epoch["batch"] + 1, n_epochs * per_epoch["batch"] + 1)), None)]
    kinds = [
        str(k)
        for k in rng.permutation(
            ["half_checkpoint", *rng.choice(["full_checkpoint", "config", "batch"], 2, replace=False)]
        )
    ]
    done: dict[int, Path] = {}
    for step in range(1 + len(kinds)):
        if step == 0:
            kind, at, _ = points[0]
            argv = [*args, "--output_dir", str(runs)]
        else:
            (run,) = runs.iterdir()
            last = max(checkpoints(run))
            assert last < n_epochs
            kind = kinds[step - 1]
            at = int(rng.integers(1, (n_epochs - last) * per_epoch[kind] + 1))
            argv = ["--resume", str(checkpoints(run)[last])]
        left = killed_at(kind, at, argv)
        (run,) = runs.iterdir()
        now = checkpoints(run)
        assert set(done) <= set(now)  # no complete checkpoint lost
        for epoch, path in now.items():
            _, saved = model_from_checkpoint(path)  # every file under a checkpoint's name is complete
            assert saved["epoch"] == epoch
        if (run / "best_model.pt").exists():
            model_from_checkpoint(run / "best_model.pt")
        if left is not None:  # the temp file it was writing: hidden, never under the final name
            assert left.name.startswith(".") and left.name.endswith(".tmp") and left.exists()
        print(f"killed at {kind} #{at}: checkpoints of epochs {sorted(now)}")
        done = now

    (run,) = runs.iterdir()
    resumed = subprocess.run(
        [sys.executable, "-m", "clam.train", "--resume", str(checkpoints(run)[max(done)])],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]  # killed writers' temp files are cleared
    assert sorted(checkpoints(run)) == list(range(1, n_epochs + 1))
    for name in (f"checkpoint_epoch_{n_epochs}.pt", "best_model.pt"):
        assert same_weights(run / name, reference_run / name), name
    config, expected = (json.loads((r / "config.json").read_text()) for r in (run, reference_run))
    assert config["status"] == expected["status"] == "finished"
    assert [(r["epoch"], r["train_loss"], r["val_loss"]) for r in config["metrics"]] == [
        (r["epoch"], r["train_loss"], r["val_loss"]) for r in expected["metrics"]
    ]


def test_a_really_full_disk_under_clam_train_is_one_message_and_resume_ends_as_uninterrupted(
    train_cohort, tmp_path, capsys
):
    from clam.train import main as train_main

    args = ["--no_progress", "--num_workers", "0"]
    assert train_main([*args, "--num_epochs", "3", "--output_dir", str(tmp_path / "reference")]) == 0
    (reference,) = (tmp_path / "reference").iterdir()
    with tmpfs(tmp_path / "runs", size="24m") as runs:
        assert train_main([*args, "--num_epochs", "1", "--output_dir", str(runs)]) == 0
        (run,) = runs.iterdir()
        kept = {name: (run / name).read_bytes() for name in ("checkpoint_epoch_1.pt", "best_model.pt")}
        filler = runs / "filler"
        stat = os.statvfs(runs)
        filler.write_bytes(
            b"\0" * (stat.f_bavail * stat.f_frsize - 512 * 1024)
        )  # 512 KiB left: no checkpoint fits
        capsys.readouterr()

        resume = ["--resume", str(run / "checkpoint_epoch_1.pt"), "--num_epochs", "3"]
        assert train_main(resume) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("error:") == 1, err
        assert (
            f"cannot write {run}{os.sep}" in err
            and "No space left on device" in err
            and "free space there" in err
        )
        assert f"--resume {run / 'checkpoint_epoch_1.pt'}" in err
        assert {
            name: (run / name).read_bytes() for name in kept
        } == kept  # the complete checkpoints are untouched
        assert not (run / "checkpoint_epoch_2.pt").exists() and not [
            p for p in run.iterdir() if p.name.endswith(".tmp")
        ]

        filler.unlink()
        assert train_main(resume) == 0  # space again
        for name in ("checkpoint_epoch_3.pt", "best_model.pt"):
            assert same_weights(run / name, reference / name), name


def test_ctrl_c_of_clam_train_names_the_resume_command(tmp_path, monkeypatch, capsys):
    from random_data import cohort_slides, write_random_cache

    import clam.train as train_module
    import clam.training as training_module

    cache = write_random_cache(tmp_path / "features", cohort_slides(6, seed=2), feature_dim=8)
    real = training_module.train_one_epoch

    def interrupt_in_epoch_2(*args, **kwargs):
        if kwargs.get("desc", args[-1] if isinstance(args[-1], str) else "") == "epoch 2":
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(training_module, "train_one_epoch", interrupt_in_epoch_2)  # looked up there
    assert (
        train_module.main(
            [
                "--features_dir",
                str(cache),
                "--num_epochs",
                "3",
                "--output_dir",
                str(tmp_path / "runs"),
                "--no_progress",
            ]
        )
        == 130
    )
    run = next((tmp_path / "runs").iterdir())
    err = capsys.readouterr().err
    assert f"continue with: python -m clam.train --resume {run / 'checkpoint_epoch_1.pt'}" in err
    assert "rerun the same command" not in err
