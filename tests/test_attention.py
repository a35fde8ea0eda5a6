"""clam.heatmaps (and clam.tile_images): the per-tile scores file, the branch shown for CLAM-MB, the
tile-image lookup, where each tile lands on the heatmap, and the montage and heatmap figures on the
example cohort's real tiles."""

from __future__ import annotations

import csv
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clam.heatmaps import (
    SlideAttention,
    explain_slide,
    heatmap_layout,
    plot_heatmap,
    plot_topk,
    slide_attention,
    write_attention_csv,
    write_index,
)
from clam.tile_images import read_tile_image
from feature_extraction.bags import COORD_SENTINEL, FORMAT_VERSION, BagAttrs
from feature_extraction.example_cohort import load_ground_truth
from feature_extraction.layout import discover_slides
from feature_extraction.tile_folder import parse_coords

NAMES = ("EGFR_negative", "EGFR_positive")


def bag_attrs(**values) -> BagAttrs:
    """A stage-1 bag's attributes with ``values`` set (names not in BagAttrs land in ``extra``)."""
    required = {
        "format_version": FORMAT_VERSION,
        "feature_dim": 8,
        "n_instances": 1,
        "slide_id": "S1",
        "label": 1,
        "cache_key": "k",
    }
    return BagAttrs.from_attrs({**required, **values}, "S1.h5")


def make_slide(
    tile_names, coords, attrs=None, probs=(0.3, 0.7), branches: int = 1, seed: int = 0
) -> SlideAttention:
    rng = np.random.default_rng(seed)
    raw = rng.normal(size=(branches, len(tile_names)))
    attention = np.exp(raw) / np.exp(raw).sum(axis=1, keepdims=True)
    return slide_attention(
        "S1", "P1", 1, np.array(probs), attention, raw, tile_names, np.array(coords), NAMES, attrs
    )


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def positive_slide(tiny_cohort):
    """A positive slide of the tiny example cohort: its folder, tile names, coordinates, bag attributes."""
    split_dir = tiny_cohort.split_dirs["test"]
    record = next(r for r in load_ground_truth(split_dir).values() if r["label"] == 1)
    names = list(record["tiles"])
    attrs = bag_attrs(class_folder=record["class_folder"], patient_id=record["patient_id"])
    return split_dir, names, [parse_coords(n) for n in names], attrs, record


def test_clam_mb_shows_the_predicted_class_branch_and_sb_its_only_one():
    names = [f"t{i}.png" for i in range(5)]
    coords = [[COORD_SENTINEL, COORD_SENTINEL]] * 5
    raw = np.arange(10, dtype=float).reshape(2, 5) * np.array([[1.0], [-1.0]])
    attention = np.exp(raw) / np.exp(raw).sum(axis=1, keepdims=True)
    mb = slide_attention("S", "P", 0, np.array([0.8, 0.2]), attention, raw, names, np.array(coords), NAMES)
    assert mb.branch == 0 and mb.n_branches == 2 and np.allclose(mb.attention, attention[0])
    mb = slide_attention("S", "P", 0, np.array([0.1, 0.9]), attention, raw, names, np.array(coords), NAMES)
    assert mb.branch == 1 and np.allclose(mb.attention_raw, raw[1]) and mb.order[0] == 0
    sb = slide_attention(
        "S", "P", 0, np.array([0.1, 0.9]), attention[:1], raw[:1], names, np.array(coords), NAMES
    )
    assert sb.branch == 0 and sb.n_branches == 1 and sb.order[0] == 4


def test_scores_csv_has_one_row_per_tile_in_bag_order(tmp_path):
    names = ["a.png", "sub/b.png", "c,with,commas.png"]
    slide = make_slide(names, [[0, 0], [256, 0], [COORD_SENTINEL, COORD_SENTINEL]])
    write_attention_csv(tmp_path / "S1.csv", slide)
    with open(tmp_path / "S1.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["tile_name"] for r in rows] == names
    assert [(int(r["x"]), int(r["y"])) for r in rows] == [(0, 0), (256, 0), (-1, -1)]
    attention = np.array([float(r["attention"]) for r in rows])
    assert attention.sum() == pytest.approx(1.0, abs=1e-6)
    assert np.allclose([float(r["attention_raw"]) for r in rows], slide.attention_raw, atol=1e-6)
    assert [int(r["rank"]) for r in rows] == list(np.argsort(np.argsort(-attention)) + 1)


def test_tile_images_are_found_in_the_cohort_layout(positive_slide, tmp_path):
    split_dir, names, coords, attrs, _ = positive_slide
    image = read_tile_image(split_dir, attrs, names[0], coords[0])
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (64, 64)
    assert read_tile_image(split_dir, attrs, "missing.png", (0, 0)) is None
    assert read_tile_image(None, attrs, names[0], coords[0]) is None
    whole_slide = replace(attrs, extra={"slide_kind": "wsi"})
    assert read_tile_image(split_dir, whole_slide, names[0], coords[0]) is None
    assert read_tile_image(split_dir, bag_attrs(), names[0], coords[0]) is None
    assert read_tile_image(split_dir, None, names[0], coords[0]) is None  # a bag not written by stage 1
    # Without a data folder (bags from a labels CSV), the slide folder recorded in the bag is used.
    slide_dir = split_dir / attrs.class_folder / attrs.patient_id
    assert read_tile_image(None, bag_attrs(source=str(slide_dir)), names[0], coords[0]).size == (64, 64)
    broken = tmp_path / attrs.class_folder / attrs.patient_id
    broken.mkdir(parents=True)
    (broken / "bad.png").write_bytes(b"not an image")
    assert read_tile_image(tmp_path, attrs, "bad.png", (0, 0)) is None


def _write_tiles(folder: Path, colour: tuple[int, int, int], n: int = 2) -> list[str]:
    folder.mkdir(parents=True)
    names = [f"x{64 * i}_y0.png" for i in range(n)]
    for name in names:
        Image.new("RGB", (64, 64), colour).save(folder / name)
    return names


def test_tile_images_of_a_patient_with_several_slides_are_found_before_and_after_a_move(tmp_path):
    """``tile_slides`` writes the slides of patient P012 as P012/A.svs/ and P012/B.svs/ (the slides
    <class>__P012__A and __B): each bag's tiles are found through its recorded source, and, once
    the data folder has moved, under --data_dir in the slide's own sub-folder, not its sibling's."""
    data = tmp_path / "data"
    colours = {"A.svs": (200, 30, 30), "B.svs": (30, 30, 200)}
    tiles = {
        name: _write_tiles(data / "EGFR_positive" / "P012" / name, colour) for name, colour in colours.items()
    }
    _write_tiles(data / "EGFR_negative" / "P001", (0, 0, 0))
    slides = {s.slide_id: s for s in discover_slides(data, "train")}
    assert {"EGFR_positive__P012__A", "EGFR_positive__P012__B"} <= set(slides)

    def attrs_of(slide):  # as the extractor records them
        return bag_attrs(
            slide_id=slide.slide_id,
            patient_id=slide.patient_id,
            class_folder=slide.class_folder,
            source=str(slide.path),
        )

    moved = tmp_path / "moved"
    for stem, name in (("A", "A.svs"), ("B", "B.svs")):
        attrs = attrs_of(slides[f"EGFR_positive__P012__{stem}"])
        for data_dir in (None, data):
            image = read_tile_image(data_dir, attrs, tiles[name][1], (64, 0))
            assert image is not None and image.getpixel((5, 5)) == colours[name]
    recorded = {stem: attrs_of(slides[f"EGFR_positive__P012__{stem}"]) for stem in "AB"}
    shutil.move(data, moved)
    for stem, name in (("A", "A.svs"), ("B", "B.svs")):
        assert (
            read_tile_image(None, recorded[stem], tiles[name][0], (0, 0)) is None
        )  # the recorded source is gone
        image = read_tile_image(moved, recorded[stem], tiles[name][0], (0, 0))
        assert image is not None and image.getpixel((5, 5)) == colours[name]
    # A patient folder that is itself the slide is still found under --data_dir after the move.
    single = attrs_of(slides["EGFR_negative__P001"])
    assert read_tile_image(moved, single, "x0_y0.png", (0, 0)).getpixel((5, 5)) == (0, 0, 0)


def test_a_whole_slide_patch_size_sets_the_heatmap_tile_extent():
    """The level-0 patch size a whole-slide reader records (in ``BagAttrs.extra``) is a tile's extent,
    not the step between the tiles that were drawn."""
    positions = [(0, 0), (400, 0)]
    names = [f"x{x}_y{y}.png" for x, y in positions]
    assert heatmap_layout(make_slide(names, positions), None).side == 400
    layout = heatmap_layout(make_slide(names, positions, bag_attrs(patch_size_level0=100)), None)
    assert layout.side == 100 and layout.scores.shape == (100, 500)


def test_explain_slide_writes_scores_montage_and_heatmap(positive_slide, tmp_path):
    split_dir, names, coords, attrs, record = positive_slide
    slide = make_slide(names, coords, attrs)
    row = explain_slide(tmp_path, slide, split_dir, top_k=2)
    assert row["heatmap_png"] == "S1_heatmap.png" and row["note"] == ""
    assert row["predicted"] == 1 and row["n_tiles"] == len(names)
    for name in ("S1.csv", "S1_topk.png", "S1_heatmap.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert is_png(tmp_path / "S1_topk.png") and is_png(tmp_path / "S1_heatmap.png")
    index = write_index(tmp_path, [row])
    with open(index, newline="") as handle:
        assert next(csv.DictReader(handle))["slide_id"] == "S1"


def test_no_heatmap_without_coordinates_but_a_montage_all_the_same(tmp_path):
    names = [f"tile{i}.png" for i in range(6)]
    slide = make_slide(names, [[COORD_SENTINEL, COORD_SENTINEL]] * 6)
    row = explain_slide(tmp_path, slide, None)
    assert row["heatmap_png"] == "" and "no coordinates" in row["note"]
    assert not (tmp_path / "S1_heatmap.png").exists()
    assert is_png(tmp_path / "S1_topk.png")


def test_heatmap_places_tiles_with_coordinates_and_counts_the_others(positive_slide, tmp_path):
    split_dir, names, coords, attrs, _ = positive_slide
    coords = list(coords)
    coords[0] = (COORD_SENTINEL, COORD_SENTINEL)
    slide = make_slide(names, coords, attrs, branches=2)
    layout = heatmap_layout(slide, split_dir)
    assert not layout.known[0] and layout.known[1:].all() and layout.have_images and not layout.thumbnail
    percentile = np.argsort(np.argsort(slide.attention)) / (len(names) - 1)  # no ties among random scores
    covered = np.zeros(layout.scores.shape, bool)
    for i in range(1, len(names)):
        left, top = layout.cell(slide.coords[i])
        cell = layout.scores[top : top + layout.side, left : left + layout.side]
        assert cell.shape == (layout.side, layout.side) and np.all(
            cell == percentile[i]
        )  # the tile's own colour
        tissue = np.asarray(layout.tissue)[top + layout.side // 2, left + layout.side // 2]
        assert tissue.tolist() != [255, 255, 255]  # its image is pasted under it
        covered[top : top + layout.side, left : left + layout.side] = True
    assert np.isnan(
        layout.scores[~covered]
    ).all()  # nothing drawn where no tile lies (and not the tile without xy)
    assert plot_heatmap(tmp_path / "map.png", slide, split_dir) is None
    assert is_png(tmp_path / "map.png")


def test_each_tile_lands_on_its_grid_cell_and_empty_cells_stay_empty():
    """Tiles of 100 px on a 3 x 2 grid with one cell missing: origin at the smallest position, scale 1
    (the slide is small), every tile's square holds its attention percentile, the missing cell is NaN."""
    positions = [(100, 50), (200, 50), (300, 50), (100, 150), (300, 150)]  # (200, 150) has no tile
    names = [f"x{x}_y{y}.png" for x, y in positions]
    slide = make_slide(names, positions)
    layout = heatmap_layout(slide, None)
    assert layout.origin.tolist() == [100, 50] and layout.scale == 1.0 and layout.side == 100
    assert layout.scores.shape == (200, 300) and not layout.have_images
    expected = np.full((200, 300), np.nan)
    ranks = np.argsort(np.argsort(slide.attention)) / (len(names) - 1)
    for (x, y), rank in zip(positions, ranks):
        assert layout.cell(np.array([x, y])) == (x - 100, y - 50)
        expected[y - 50 : y + 50, x - 100 : x] = rank
    np.testing.assert_array_equal(layout.scores, expected)
    assert np.isnan(layout.scores[100:200, 100:200]).all()  # the missing tile's cell
    assert ranks[np.argmax(slide.attention)] == 1.0 and ranks[np.argmin(slide.attention)] == 0.0


def test_a_large_slide_is_scaled_to_fit_and_tiles_keep_their_relative_places():
    positions = [(0, 0), (5000, 0), (0, 2500), (5000, 2500)]
    names = [f"x{x}_y{y}.png" for x, y in positions]
    slide = make_slide(names, positions)
    layout = heatmap_layout(slide, None)
    width = 5000 + 2500  # the step between tiles (2500) is their extent
    assert layout.scale == pytest.approx(1000 / width) and max(layout.scores.shape) == 1000
    assert layout.side == int(np.ceil(2500 * layout.scale))
    cells = [layout.cell(np.array(p)) for p in positions]
    assert cells == [(0, 0), (666, 0), (0, 333), (666, 333)]
    for (left, top), rank in zip(cells, np.argsort(np.argsort(slide.attention)) / 3):
        # The square's far edge may lie under the next tile (the side is rounded up): its inside is the tile's.
        assert np.all(layout.scores[top : top + layout.side - 1, left : left + layout.side - 1] == rank)
    assert heatmap_layout(make_slide(["a.png"], [[COORD_SENTINEL, COORD_SENTINEL]]), None) == (
        "tile names carry no coordinates, so the slide cannot be reassembled"
    )


@pytest.mark.parametrize("n_tiles", [1, 2, 5])
def test_small_bags_draw_without_error(tmp_path, n_tiles):
    names = [f"x{i * 100}_y0.png" for i in range(n_tiles)]
    slide = make_slide(names, [[i * 100, 0] for i in range(n_tiles)])
    plot_topk(tmp_path / "topk.png", slide, None, top_k=8)
    assert plot_heatmap(tmp_path / "map.png", slide, None) is None
    assert is_png(tmp_path / "topk.png") and is_png(tmp_path / "map.png")
