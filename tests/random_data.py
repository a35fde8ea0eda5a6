"""Test data made by code: feature caches of random bags, cohort folders of tiles, labels CSVs.

Caches are built through the real API, as stage 1 builds them: an ``ExtractionConfig`` (so the
cache key is the real key of a real configuration), ``cache.open_cache`` (the folder and its
``cache.json``), ``bags.write_bag`` with ``BagAttrs`` at ``bags.bag_path``, and the manifest
rebuilt from the bags by ``cache.collect_manifest`` / ``manifest.write_manifest``. Positive bags carry
a planted signal in some instances, so a model can learn the labels in a few epochs.

Tile cohorts (``write_cohort``, ``write_tile``) are PNG tiles in the spec's folder layout, for
the tests that run stage 1 itself; ``assert_same_bags`` compares two caches bag by bag.
"""

from __future__ import annotations

import csv
import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from feature_extraction.bags import BagAttrs, bag_path, read_attrs, read_bag, write_bag
from feature_extraction.cache import ExtractionConfig, collect_manifest, open_cache
from feature_extraction.embed import EmbedConfig
from feature_extraction.layout import SPLIT_FOLDERS, slide_id_for
from feature_extraction.manifest import write_manifest
from feature_extraction.sources import SUBSET_RULE, TileTransform

ROOT = Path(__file__).resolve().parents[1]
# Stage 1 at its fastest: a small random backbone, eager PyTorch, no decode workers, no progress bar.
FAST = EmbedConfig(backbone="resnet18", weights="random", runtime="torch", num_workers=0, progress=False)
LAYOUT = {"EGFR_positive": {"P1": 3, "P2": 2}, "EGFR_negative": {"P3": 2}, "EGFR_negative_cnn": {"P3": 2}}

DEFAULT_CACHE_NAME = "resnet50_trunc-imagenet-224px-max100-seed0-testkey0"
# The configuration of a random cache, but for its feature_dim and weights digest (see random_cache_config).
DEFAULT_CACHE_CONFIG = {
    "backbone": "resnet50_trunc",
    "weights": "imagenet",
    "transform": TileTransform(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).describe(),
    "input_size": 224,
    "max_tiles": 100,
    "seed": 0,
    "subset_rule": SUBSET_RULE,
}


@dataclass(frozen=True)
class RandomSlide:
    slide_id: str
    patient_id: str
    class_folder: str
    label: int
    split: str
    n_instances: int


def cohort_slides(
    n_patients: int = 8,
    split: str = "train",
    with_cnn: bool = True,
    instances: tuple[int, int] = (5, 40),
    seed: int = 0,
) -> list[RandomSlide]:
    """Half the patients positive; with ``with_cnn`` every other patient also has a ``_cnn`` slide."""
    rng = np.random.default_rng(seed)
    folders = {
        label: [f for f, (lab, required) in SPLIT_FOLDERS[split].items() if lab == label] for label in (0, 1)
    }
    slides = []
    for p in range(n_patients):
        label = p % 2
        patient_id = f"P{p:03d}"
        names = folders[label] if (with_cnn and p % 4 < 2) else folders[label][:1]
        for folder in names:
            n = int(rng.integers(instances[0], instances[1] + 1))
            slides.append(RandomSlide(slide_id_for(folder, patient_id), patient_id, folder, label, split, n))
    return slides


def random_cache_config(
    feature_dim: int = 32, cache_key: str = DEFAULT_CACHE_NAME, **config
) -> ExtractionConfig:
    """The real configuration of a random cache. ``cache_key`` names the cache: the weights digest is
    the sha256 of that name, so two names give two real cache keys; ``config`` overrides fields
    of DEFAULT_CACHE_CONFIG (e.g. ``max_tiles=50``)."""
    digest = hashlib.sha256(cache_key.encode("utf-8")).hexdigest()
    return ExtractionConfig(
        **{**DEFAULT_CACHE_CONFIG, **config, "weights_digest": digest, "feature_dim": feature_dim}
    )


def random_bag_attrs(slide: RandomSlide, config: ExtractionConfig | None) -> BagAttrs:
    """The attributes stage 1 would write for ``slide`` in the cache of ``config`` (None: a bag of no cache)."""
    return BagAttrs(
        slide_id=slide.slide_id,
        patient_id=slide.patient_id,
        class_folder=slide.class_folder,
        label=slide.label,
        split=slide.split,
        source=f"{slide.split}/{slide.class_folder}/{slide.patient_id}",
        cache_key=config.cache_key if config else "",
        backbone=config.backbone if config else "",
        weights=config.weights if config else "",
        weights_digest=config.weights_digest if config else "",
        weights_random=False,
        weights_source="tests/random_data.py",
        transform=config.transform if config else "",
        tile_size=config.input_size if config else 0,
        max_tiles=config.max_tiles if config else 0,
        seed=config.seed if config else 0,
        subset_rule=config.subset_rule if config else "",
        tiles_digest="",
        n_available=slide.n_instances,  # made of no tiles: never stale against a folder
        n_selected=slide.n_instances,
        n_skipped=0,
        skipped_tiles=(),
        n_ignored_files=0,
        package_version="test",
        runtime="random",
        precision="fp32",
        device="cpu",
        embedded_at="2026-01-01T00:00:00+00:00",
    )


def write_random_bag(
    path: Path,
    slide: RandomSlide,
    feature_dim: int,
    config: ExtractionConfig | None,
    rng: np.random.Generator,
    signal: float = 1.5,
) -> None:
    """One bag of random features for ``slide``; ``config`` is the configuration of its cache
    (None: a bag of a plain folder, with an empty cache key)."""
    features = rng.normal(size=(slide.n_instances, feature_dim)).astype(np.float32)
    if slide.label == 1:  # a third of a positive bag's instances carry the signal
        hit = rng.random(slide.n_instances) < 1 / 3
        hit[0] = True
        features[hit, : max(1, feature_dim // 8)] += signal
    coords = np.stack([np.arange(slide.n_instances) * 224, np.zeros(slide.n_instances)], axis=1)
    names = [f"{x * 224}_0.png" for x in range(slide.n_instances)]
    write_bag(path, features, coords, names, random_bag_attrs(slide, config))


def write_random_cache(
    features_dir: Path,
    slides: list[RandomSlide],
    feature_dim: int = 32,
    cache_key: str = DEFAULT_CACHE_NAME,
    seed: int = 0,
    **config,
) -> Path:
    """The cache folder of ``random_cache_config(feature_dim, cache_key, **config)`` under
    ``features_dir`` (cache.json, manifest.csv, one bag per slide); its real key is in cache.json."""
    extraction = random_cache_config(feature_dim, cache_key, **config)
    cache_dir = open_cache(features_dir, extraction)
    rng = np.random.default_rng(seed)
    for slide in slides:
        write_random_bag(bag_path(cache_dir, slide.slide_id), slide, feature_dim, extraction, rng)
    refresh_manifest(cache_dir)
    return cache_dir


def transform_cache(cache: Path, out: Path, fn) -> Path:
    """A copy of ``cache`` with every bag's features replaced by ``fn(features, slide_id)``."""
    shutil.copytree(cache, out)
    for path in out.glob("*.h5"):
        bag = read_bag(path)
        write_bag(path, fn(bag.features, path.stem), bag.coords, bag.tile_names, read_attrs(path))
    return out


def refresh_manifest(cache_dir: Path) -> None:
    """Rebuild manifest.csv from the bags on disk, as stage 1 does."""
    write_manifest(cache_dir, collect_manifest(cache_dir))


def write_cohort_folders(data_dir: Path, slides: list[RandomSlide]) -> Path:
    """The spec's folder layout for ``slides`` (empty patient folders, no tiles)."""
    for slide in slides:
        folder = Path(data_dir) / slide.class_folder / slide.patient_id
        folder.mkdir(parents=True, exist_ok=True)
    for folder, (_, required) in SPLIT_FOLDERS[slides[0].split].items():
        if required:
            (Path(data_dir) / folder).mkdir(parents=True, exist_ok=True)
    return Path(data_dir)


def write_random_bag_folder(
    bags_dir: Path,
    slides: list[RandomSlide],
    feature_dim: int = 32,
    features_name: str = "features",
    seed: int = 0,
) -> Path:
    """A plain folder of bags (no cache.json) and a labels CSV ``labels.csv`` next to it."""
    rng = np.random.default_rng(seed)
    bags_dir = Path(bags_dir)
    bags_dir.mkdir(parents=True, exist_ok=True)
    for slide in slides:
        write_random_bag(bag_path(bags_dir, slide.slide_id), slide, feature_dim, None, rng)
    if features_name != "features":
        # Simulate a bag written by STAMP, which names the matrix 'feats'.
        for slide in slides:
            with h5py.File(bag_path(bags_dir, slide.slide_id), "r+") as h5:
                h5.move("features", features_name)
    labels_csv = bags_dir.parent / "labels.csv"
    with open(labels_csv, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "label", "patient_id"])
        for slide in slides:
            writer.writerow([slide.slide_id, slide.label, slide.patient_id])
    return labels_csv


# ---------------------------------------------------------------- tile cohorts, for stage 1 itself


def write_cohort(root: Path, layout=None, size: int = 32, seed: int = 0) -> Path:
    """Tiles ``tile_x{X}_y{Y}.png`` of H&E-ish random colours in the spec's layout; returns ``root``."""
    rng = np.random.default_rng(seed)
    layout = layout or LAYOUT
    for folder in ("EGFR_positive", "EGFR_negative"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for folder, patients in layout.items():
        for patient, n_tiles in patients.items():
            for i in range(n_tiles):
                write_tile(root / folder / patient / f"tile_x{i * size}_y{size}.png", rng, size)
    return root


def write_tile(path: Path, rng: np.random.Generator, size: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 90, (size, size, 3)) + np.array([150, 80, 150])
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def bags_of(cache_dir: Path) -> dict[str, object]:
    return {p.stem: read_bag(p) for p in sorted(cache_dir.glob("*.h5"))}


def assert_same_bags(left: Path, right: Path, exact: bool = False) -> None:
    """The two caches hold the same bags: tile names, coordinates, attributes (but the embedding
    time) and features (to float32 rounding, or ``exact``ly)."""
    a, b = bags_of(left), bags_of(right)
    assert a.keys() == b.keys() and a
    for slide_id in a:
        assert a[slide_id].tile_names == b[slide_id].tile_names, slide_id
        assert np.array_equal(a[slide_id].coords, b[slide_id].coords)
        if exact:
            assert np.array_equal(a[slide_id].features, b[slide_id].features), slide_id
        else:
            np.testing.assert_allclose(a[slide_id].features, b[slide_id].features, rtol=1e-4, atol=1e-5)
        volatile = {"embedded_at"}
        assert {k: v for k, v in a[slide_id].attrs.items() if k not in volatile} == {
            k: v for k, v in b[slide_id].attrs.items() if k not in volatile
        }
