"""Whole slides at their real size: bags written in chunks (and still atomically), the spill file,
the tissue mask's filters, and the opaque-tile shortcut of the region reader.

benchmarks/bench_wsi.py measures the sizes (a 40,000 x 30,000 px slide, slides of up to 20,000
tiles); these tests check, on small inputs with the limits lowered, that the paths it exercises
give the bags the ordinary paths give and leave nothing half written."""

from __future__ import annotations

import errno
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter
from random_data import FAST, assert_same_bags, write_cohort

from feature_extraction import bags, extractor
from feature_extraction.atomic import remove_stale_temps
from feature_extraction.bags import RowFile, read_bag, validate_bag, write_bag
from feature_extraction.embed import embed_cohort
from feature_extraction.wsi import WsiConfig

ATTRS = {"slide_id": "S1", "label": 1, "cache_key": "k"}


def row_file(tmp_path: Path, n: int = 23, dim: int = 5, seed: int = 0) -> tuple[np.ndarray, Path]:
    matrix = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    path = tmp_path / "rows.f32"
    matrix.tofile(path)
    return matrix, path


def small_chunks(monkeypatch, rows: int, dim: int) -> None:
    """Every bag written in place, ``rows`` rows per chunk."""
    monkeypatch.setattr(bags, "IN_MEMORY_BAG_BYTES", 0)
    monkeypatch.setattr(bags, "WRITE_CHUNK_BYTES", rows * dim * 4)


@pytest.mark.parametrize("rows", [None, [0, 1, 2, 5, 6, 7, 8, 13, 21, 22]])
def test_a_bag_written_in_chunks_from_a_row_file_equals_the_one_written_from_memory(
    tmp_path, monkeypatch, rows
):
    matrix, path = row_file(tmp_path)
    chosen = np.arange(len(matrix)) if rows is None else np.asarray(rows)
    coords = np.stack([chosen * 7, chosen * 3], axis=1)
    names = [f"t{i}" for i in chosen]
    write_bag(tmp_path / "memory.h5", matrix[chosen], coords, names, ATTRS)

    small_chunks(monkeypatch, rows=4, dim=5)
    source = RowFile(path, len(matrix), 5, None if rows is None else np.asarray(rows))
    assert source.shape == (len(chosen), 5) and len(source) == len(chosen)
    write_bag(tmp_path / "chunks.h5", source, coords, names, ATTRS)
    write_bag(tmp_path / "array_chunks.h5", matrix[chosen], coords, names, ATTRS)  # an array, in place too

    expected = read_bag(tmp_path / "memory.h5")
    for name in ("chunks.h5", "array_chunks.h5"):
        bag = read_bag(tmp_path / name)
        assert np.array_equal(bag.features, matrix[chosen]) and np.array_equal(bag.coords, expected.coords)
        assert bag.tile_names == expected.tile_names and bag.attrs == expected.attrs
        validate_bag(tmp_path / name, feature_dim=5)


def test_a_failure_mid_write_keeps_the_old_bag_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    matrix, path = row_file(tmp_path)
    bag = tmp_path / "S1.h5"
    write_bag(bag, matrix[:3], np.zeros((3, 2)), ["a", "b", "c"], ATTRS)
    before = bag.read_bytes()
    small_chunks(monkeypatch, rows=4, dim=5)

    class FillsTheDisk(RowFile):
        def chunks(self, n):
            for i, item in enumerate(super().chunks(n)):
                if i == 2:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                yield item

    with pytest.raises(OSError, match="No space left") as raised:
        write_bag(
            bag, FillsTheDisk(path, len(matrix), 5), np.zeros((len(matrix), 2)), ["x"] * len(matrix), ATTRS
        )
    assert raised.value.filename == str(bag)  # the message names the bag, not the hidden temporary
    assert bag.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["S1.h5", "rows.f32"]


def test_a_writer_killed_mid_write_leaves_no_bag_under_the_final_name(tmp_path, monkeypatch):
    matrix, path = row_file(tmp_path, n=40)
    small_chunks(monkeypatch, rows=4, dim=5)
    old = tmp_path / "old.h5"
    write_bag(old, matrix[:2], np.zeros((2, 2)), ["a", "b"], ATTRS)
    before = old.read_bytes()

    class DiesMidWrite(RowFile):
        def chunks(self, n):
            for i, item in enumerate(super().chunks(n)):
                if i == 3:
                    os._exit(9)  # as a kill -9 would: no cleanup, no exception handler runs
                yield item

    for target in (tmp_path / "new.h5", old):  # a first bag, and a bag being rewritten
        pid = os.fork()
        if pid == 0:  # the child writes and dies half-way
            write_bag(target, DiesMidWrite(path, 40, 5), np.zeros((40, 2)), ["x"] * 40, ATTRS)
            os._exit(0)
        assert os.waitpid(pid, 0)[1] != 0
        leftovers = list(tmp_path.glob(f".{target.name}.{pid}.tmp"))
        assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0  # half written, hidden
        assert remove_stale_temps(tmp_path) == leftovers  # swept as a dead writer's
    assert not (tmp_path / "new.h5").exists()
    assert old.read_bytes() == before


def test_large_slides_are_gathered_in_a_spill_file_and_give_the_bags_of_the_in_memory_path(
    tmp_path, monkeypatch
):
    data = write_cohort(tmp_path / "train", {"EGFR_positive": {"P1": 7, "P2": 3}, "EGFR_negative": {"P3": 5}})
    (data / "EGFR_positive" / "P1" / "tile_x96_y32.png").write_bytes(
        b"not a png"
    )  # a skipped row in the file
    reference = embed_cohort(replace(FAST, batch_size=4), data, features_dir=tmp_path / "memory")

    spills: list[Path] = []
    real_put = extractor._SlideBuffer.put

    def put(self, row, vector):
        assert self.features is None and self.spill_fd is not None  # no slide-sized array in memory
        spills.append(self.spill)
        real_put(self, row, vector)

    monkeypatch.setattr(extractor._SlideBuffer, "put", put)
    monkeypatch.setattr(extractor, "SPILL_BYTES", 0)
    small_chunks(monkeypatch, rows=2, dim=512)
    report = embed_cohort(replace(FAST, batch_size=4), data, features_dir=tmp_path / "spilled")
    assert len(set(spills)) == 3 and report.n_embedded == 3
    assert_same_bags(reference.cache_dir, report.cache_dir)
    assert read_bag(report.cache_dir / "EGFR_positive__P1.h5").features.shape == (6, 512)
    assert not [p for p in report.cache_dir.rglob("*") if p.name.endswith(".tmp")]  # spill files removed


# --------------------------------------------------------------------------- the tissue mask and regions


def pil_tissue_mask(thumbnail: Image.Image, config: WsiConfig, pixel_um: float) -> np.ndarray:
    """The mask as PIL's rank filters computed it before scipy's separable filters replaced them."""
    from feature_extraction.wsi_plan import otsu_threshold

    saturation = np.asarray(thumbnail.convert("HSV").filter(ImageFilter.MedianFilter(5)))[..., 1]
    low, high = config.saturation_range
    threshold = int(np.clip(otsu_threshold(saturation), low, high))
    mask = Image.fromarray(np.where(saturation > threshold, 255, 0).astype(np.uint8))
    size = max(3, 2 * round(config.morphology_um / pixel_um / 2) + 1)
    mask = mask.filter(ImageFilter.MaxFilter(size)).filter(ImageFilter.MinFilter(size))
    mask = mask.filter(ImageFilter.MinFilter(size)).filter(ImageFilter.MaxFilter(size))
    return np.asarray(mask) > 127


@pytest.mark.parametrize("pixel_um", [8.0, 2.0, 0.7])
def test_the_tissue_mask_is_the_one_pil_rank_filters_give(pixel_um):
    from feature_extraction.example_tissue import procedural_he
    from feature_extraction.wsi_plan import tissue_mask

    rng = np.random.default_rng(3)
    canvas = np.full((300, 420, 3), 240, np.uint8)
    canvas[40:260, 60:300] = procedural_he(rng, 220, 240)
    canvas[10:14, 380:384] = (150, 60, 140)  # a speck on the glass
    canvas += rng.integers(0, 6, canvas.shape, dtype=np.uint8)  # grain
    thumbnail = Image.fromarray(canvas)
    config = WsiConfig()
    mask, _ = tissue_mask(thumbnail, config, pixel_um)
    expected = pil_tissue_mask(thumbnail, config, pixel_um)
    assert mask.dtype == bool and mask.shape == expected.shape
    assert np.array_equal(mask, expected) and 0.2 < mask.mean() < 0.8


def test_an_opaque_region_skips_the_alpha_paste_and_a_transparent_one_shows_the_background():
    from feature_extraction.wsi import _flatten

    rgba = np.random.default_rng(0).integers(0, 256, (16, 16, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    opaque = Image.fromarray(rgba, "RGBA")
    assert np.array_equal(np.asarray(_flatten(opaque, (1, 2, 3))), rgba[..., :3])
    rgba[:8, :, 3] = 0  # outside the scanned area
    out = np.asarray(_flatten(Image.fromarray(rgba, "RGBA"), (1, 2, 3)))
    assert (out[:8] == (1, 2, 3)).all() and np.array_equal(out[8:], rgba[8:, :, :3])
