"""Tiles: listing, coordinates from names, the seeded max_tiles subset, robust decoding, the transform."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from feature_extraction import sources
from feature_extraction.bags import COORD_SENTINEL
from feature_extraction.layout import list_slide_tiles
from feature_extraction.sources import SlideSource, TileError, TileTransform, decode_rgb, select_subset
from feature_extraction.tile_folder import parse_coords


def _png(path, color=(200, 100, 150), size=(16, 16), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def _slide(folder, slide_id="EGFR_positive__P1"):
    return SlideSource(slide_id, "P1", "EGFR_positive", 1, "train", folder)


def test_listing_finds_images_in_any_case_and_subfolders_in_sorted_order(tmp_path):
    folder = tmp_path / "P1"
    for name in ("b.PNG", "a.jpg", "sub/c.Jpeg", "sub/deeper/d.TIFF", "e.tif", "f.bmp"):
        _png(folder / name, size=(8, 8))  # PIL picks the format from the extension
    (folder / "notes.txt").write_text("not a tile")
    (folder / "Thumbs.db").write_bytes(b"\0")
    _png(folder / ".hidden.png")
    _png(folder / ".cache" / "x.png")

    listing = list_slide_tiles(_slide(folder), max_tiles=0)

    assert [t.name for t in listing.tiles] == [
        "a.jpg",
        "b.PNG",
        "e.tif",
        "f.bmp",
        "sub/c.Jpeg",
        "sub/deeper/d.TIFF",
    ]
    assert listing.n_available == 6
    assert listing.ignored == ("Thumbs.db", "notes.txt")
    assert all(t.path == folder / t.name for t in listing.tiles)
    assert all(t.load().size == (8, 8) for t in listing.tiles)


def test_tiles_digest_changes_only_when_the_tiles_change(tmp_path):
    folder = tmp_path / "P1"
    first = _png(folder / "t_0_0.png")
    _png(folder / "t_16_0.png")
    digest = list_slide_tiles(_slide(folder)).tiles_digest
    assert list_slide_tiles(_slide(folder)).tiles_digest == digest
    (folder / "notes.txt").write_text("ignored files do not count")
    assert list_slide_tiles(_slide(folder)).tiles_digest == digest

    _png(folder / "t_32_0.png")
    added = list_slide_tiles(_slide(folder)).tiles_digest
    assert added != digest
    _png(first, color=(1, 2, 3), size=(20, 20))  # rewritten: new size and mtime
    os.utime(first, ns=(1, 1))
    assert list_slide_tiles(_slide(folder)).tiles_digest != added


@pytest.mark.parametrize(
    "name, expected",
    [
        ("tile_x1024_y2048.png", (1024, 2048)),
        ("slide-3_X512_Y256.jpg", (512, 256)),
        ("CMU-1 [x=1000,y=2000,w=512,h=512].png", (1000, 2000)),
        ("patch (1536,768).png", (1536, 768)),
        ("1024_2048.png", (1024, 2048)),
        ("P001_tile_300_400.tif", (300, 400)),
        ("sub/dir/x5_y6.png", (5, 6)),
        ("tile_5.png", (COORD_SENTINEL, COORD_SENTINEL)),
        ("max_box.png", (COORD_SENTINEL, COORD_SENTINEL)),
    ],
)
def test_coordinates_are_parsed_from_common_tile_names(name, expected):
    assert parse_coords(name) == expected


def test_subset_is_seeded_stable_sorted_and_moves_by_one_tile_when_one_is_added():
    names = [f"tile_{i:03d}.png" for i in range(50)]
    chosen = select_subset(names, "EGFR_positive__P1", 10, seed=0)
    assert len(chosen) == 10 and chosen == sorted(chosen)
    assert select_subset(names, "EGFR_positive__P1", 10, seed=0) == chosen  # same on every run
    assert select_subset(names, "EGFR_positive__P1", 10, seed=1) != chosen  # the seed matters
    assert select_subset(names, "EGFR_negative__P2", 10, seed=0) != chosen  # each slide its own draw
    assert select_subset(names, "s", 0, 0) == list(range(50)) == select_subset(names, "s", -1, 0)
    assert select_subset(names[:5], "s", 10, 0) == list(range(5))

    more = sorted(names + ["tile_extra.png"])
    kept_before = {names[i] for i in chosen}
    kept_after = {more[i] for i in select_subset(more, "EGFR_positive__P1", 10, seed=0)}
    assert len(kept_before - kept_after) <= 1


def test_subset_is_pinned_across_machines():
    # sha256 ranks depend on nothing platform-specific: these indices must never change
    # (if they do, bump SUBSET_RULE so old caches are not reused).
    names = [f"t{i}.png" for i in range(20)]
    assert select_subset(names, "EGFR_positive__P1", 5, seed=0) == [0, 1, 7, 17, 18]


def test_listing_takes_the_subset_and_records_all_tiles(tmp_path):
    folder = tmp_path / "P1"
    for i in range(12):
        _png(folder / f"tile_x{i * 16}_y0.png")
    listing = list_slide_tiles(_slide(folder), max_tiles=4, seed=3)
    assert listing.n_available == 12 and len(listing.tiles) == 4
    names = sorted(p.name for p in folder.iterdir())
    assert [t.name for t in listing.tiles] == [
        names[i] for i in select_subset(names, "EGFR_positive__P1", 4, 3)
    ]
    assert all((t.x, t.y) == parse_coords(t.name) for t in listing.tiles)


def test_rgba_and_la_are_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (0, 0, 255, 0)  # fully transparent
    rgba[0, 2] = (0, 0, 0, 128)  # half-transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = np.asarray(decode_rgb(tmp_path / "a.png"))
    assert out.shape == (4, 4, 3)
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 1]) == (255, 255, 255)
    assert all(abs(int(v) - 127) <= 1 for v in out[0, 2])

    la = Image.fromarray(np.stack([np.full((2, 2), 10, np.uint8), np.zeros((2, 2), np.uint8)], -1), "LA")
    la.save(tmp_path / "la.png")
    assert tuple(np.asarray(decode_rgb(tmp_path / "la.png"))[0, 0]) == (255, 255, 255)


def test_palette_grayscale_cmyk_and_bilevel_become_rgb(tmp_path):
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    palette.save(tmp_path / "p.png")
    assert tuple(np.asarray(decode_rgb(tmp_path / "p.png"))[0, 0]) == (10, 20, 30)

    transparent = Image.new("P", (4, 4), 1)
    transparent.putpalette([10, 20, 30, 40, 50, 60] + [0, 0, 0] * 254)
    transparent.save(tmp_path / "pt.png", transparency=1)
    assert tuple(np.asarray(decode_rgb(tmp_path / "pt.png"))[0, 0]) == (255, 255, 255)

    Image.new("L", (4, 4), 77).save(tmp_path / "l.png")
    assert tuple(np.asarray(decode_rgb(tmp_path / "l.png"))[0, 0]) == (77, 77, 77)
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    red = np.asarray(decode_rgb(tmp_path / "c.jpg"))[0, 0]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    Image.new("1", (4, 4), 1).save(tmp_path / "b.png")
    assert tuple(np.asarray(decode_rgb(tmp_path / "b.png"))[0, 0]) == (255, 255, 255)


def test_sixteen_bit_images_keep_their_full_range(tmp_path):
    gray = np.array([[0, 257 * 128, 65535, 1000]], np.uint16)
    Image.fromarray(gray).save(tmp_path / "g16.png")
    assert np.asarray(decode_rgb(tmp_path / "g16.png"))[0, :, 0].tolist() == [0, 128, 255, 4]

    tifffile = pytest.importorskip("tifffile")
    rgb = np.zeros((2, 2, 3), np.uint16)
    rgb[0, 0] = (65535, 257 * 100, 0)
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb)
    assert tuple(np.asarray(decode_rgb(tmp_path / "rgb16.tif"))[0, 0]) == (255, 100, 0)


def test_unreadable_files_raise_tile_error(tmp_path, monkeypatch):
    good = _png(tmp_path / "good.png", size=(64, 64))
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:60])
    for name in ("zero.png", "text.jpg", "truncated.png", "missing.png"):
        with pytest.raises(TileError):
            decode_rgb(tmp_path / name)
    with pytest.raises(TileError, match="empty file"):
        decode_rgb(tmp_path / "zero.png")

    monkeypatch.setattr(sources, "MAX_TILE_PIXELS", 32 * 32)  # a decompression bomb, in miniature
    with pytest.raises(TileError, match="pixel limit"):
        decode_rgb(good)


def test_transform_resizes_the_centred_square_to_the_input_size():
    transform = TileTransform(224, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    square = Image.fromarray(np.full((256, 256, 3), 90, np.uint8))
    out = transform(square)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8 and (out == 90).all()

    wide = np.zeros((100, 300, 3), np.uint8)
    wide[:, 100:200] = 255  # the centred square is white; the sides are cropped away
    resized = transform(Image.fromarray(wide))
    assert resized.shape == (224, 224, 3)
    assert (
        resized[:, 2:-2] == 255
    ).all()  # the outermost columns blend in their neighbours, as a resize does

    exact = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    assert (transform(Image.fromarray(exact)) == exact).all()  # already the right size: untouched
    assert transform.describe() != TileTransform(256, (0.5,) * 3, (0.2,) * 3).describe()


def _he_tiles(tmp_path, size: int) -> list:
    """Real H&E crops (the texture sources of the example cohort), saved as PNG and as JPEG."""
    from feature_extraction.example_tissue import crop_tile, load_texture_sources

    rng = np.random.default_rng(size)
    paths = []
    for i, source in enumerate(load_texture_sources(size) * 2):
        tile = Image.fromarray(crop_tile(rng, source, size))
        for suffix, options in ((".png", {}), (".jpg", {"quality": 90}), (".jpeg", {"quality": 60})):
            paths.append(tmp_path / f"t{size}_{i}{suffix}")
            tile.save(paths[-1], **options)
    gray = tmp_path / f"gray{size}.jpg"
    Image.fromarray(np.asarray(Image.open(paths[0]).convert("L"))).save(gray, quality=85)
    return [*paths, gray]


@pytest.mark.parametrize("size", [256, 512])
def test_fast_decoders_give_pillows_pixels_on_real_he_tiles(tmp_path, size):
    pytest.importorskip("simplejpeg")
    pytest.importorskip("imagecodecs")
    assert sources.fast_decoders() == {"jpeg": "simplejpeg", "png": "imagecodecs"}
    for path in _he_tiles(tmp_path, size):
        fast = sources.fast_decode(path)
        assert fast is not None, path.name  # the fast path really ran
        pil = np.asarray(sources.pil_decode_rgb(path))
        assert fast.shape == pil.shape == (size, size, 3) and fast.dtype == np.uint8
        assert np.array_equal(fast, pil), path.name
        assert np.array_equal(np.asarray(decode_rgb(path)), pil)


def test_files_the_fast_decoders_do_not_take_go_through_pillow(tmp_path):
    pytest.importorskip("simplejpeg")
    pytest.importorskip("imagecodecs")
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb).save(tmp_path / "trns.png", transparency=(1, 2, 3))  # a transparent colour
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(np.array([[0, 65535]], np.uint16)).save(tmp_path / "g16.png")
    Image.fromarray(rgb).save(tmp_path / "tile.bmp")
    for name in ("trns.png", "rgba.png", "cmyk.jpg", "g16.png", "tile.bmp"):
        assert sources.fast_decode(tmp_path / name) is None, name
    assert tuple(np.asarray(decode_rgb(tmp_path / "trns.png"))[0, 0]) == (255, 255, 255)  # on white

    good = tmp_path / "good.jpg"
    Image.fromarray(rgb).resize((64, 64)).save(good)
    (tmp_path / "truncated.jpg").write_bytes(good.read_bytes()[:-200])
    assert sources.fast_decode(tmp_path / "truncated.jpg") is None  # strict: refused, not padded
    with pytest.raises(TileError):
        decode_rgb(tmp_path / "truncated.jpg")  # and Pillow names the error


def test_without_the_fast_decoders_pillow_decodes_everything(tmp_path, monkeypatch):
    paths = _he_tiles(tmp_path, 256)[:3]
    with_fast = [np.asarray(decode_rgb(path)) for path in paths]
    monkeypatch.setattr(sources, "_FAST_DECODERS", {"simplejpeg": None, "imagecodecs": None})
    assert sources.fast_decoders() == {"jpeg": "pillow", "png": "pillow"}
    assert all(sources.fast_decode(path) is None for path in paths)
    for path, expected in zip(paths, with_fast):
        assert np.array_equal(np.asarray(decode_rgb(path)), expected)
