"""Random but well-formed test data: feature caches of HDF5 bags, cohort folders, labels CSVs.

Bags are written through ``feature_extraction.bags.write_bag`` only, in the cache layout of
docs/design.md (``cache.json``, ``manifest.csv``, ``<slide_id>.h5``). Positive bags carry a
planted signal in some instances, so a model can learn the labels in a few epochs.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from feature_extraction.bags import bag_path, write_bag
from feature_extraction.cache import CACHE_JSON, collect_manifest, write_manifest
from feature_extraction.layout import SPLIT_FOLDERS, slide_id_for

DEFAULT_CACHE_CONFIG = {
    "cache_format": 1,
    "backbone": "resnet50_trunc",
    "weights": "imagenet",
    "weights_digest": "0" * 64,
    "transform": "resize 224, normalize mean (0.485, 0.456, 0.406) std (0.229, 0.224, 0.225)",
    "input_size": 224,
    "max_tiles": 100,
    "seed": 0,
    "subset_rule": "random test subset",
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
    folders = {label: [f for f, (lab, required) in SPLIT_FOLDERS[split].items() if lab == label]
               for label in (0, 1)}
    slides = []
    for p in range(n_patients):
        label = p % 2
        patient_id = f"P{p:03d}"
        names = folders[label] if (with_cnn and p % 4 < 2) else folders[label][:1]
        for folder in names:
            n = int(rng.integers(instances[0], instances[1] + 1))
            slides.append(RandomSlide(slide_id_for(folder, patient_id), patient_id, folder, label, split, n))
    return slides


def write_random_bag(
    path: Path,
    slide: RandomSlide,
    feature_dim: int,
    cache_key: str | None,
    rng: np.random.Generator,
    signal: float = 1.5,
) -> None:
    features = rng.normal(size=(slide.n_instances, feature_dim)).astype(np.float32)
    if slide.label == 1:  # a third of a positive bag's instances carry the signal
        hit = rng.random(slide.n_instances) < 1 / 3
        hit[0] = True
        features[hit, : max(1, feature_dim // 8)] += signal
    coords = np.stack([np.arange(slide.n_instances) * 224, np.zeros(slide.n_instances)], axis=1)
    attrs = {
        "slide_id": slide.slide_id,
        "patient_id": slide.patient_id,
        "class_folder": slide.class_folder,
        "label": slide.label,
        "split": slide.split,
    }
    if cache_key is not None:
        attrs["cache_key"] = cache_key
    write_bag(path, features, coords, [f"{x * 224}_0.png" for x in range(slide.n_instances)], attrs)


def write_random_cache(
    features_dir: Path,
    slides: list[RandomSlide],
    feature_dim: int = 32,
    cache_key: str = "resnet50_trunc-imagenet-224px-max100-seed0-testkey0",
    seed: int = 0,
    **config,
) -> Path:
    """A cache folder ``features_dir/<cache_key>/`` with cache.json, manifest.csv and one bag per slide."""
    cache_dir = Path(features_dir) / cache_key
    cache_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for slide in slides:
        write_random_bag(bag_path(cache_dir, slide.slide_id), slide, feature_dim, cache_key, rng)
    cache_config = {**DEFAULT_CACHE_CONFIG, **config, "cache_key": cache_key, "feature_dim": feature_dim}
    (cache_dir / CACHE_JSON).write_text(json.dumps(cache_config, indent=2))
    refresh_manifest(cache_dir)
    return cache_dir


def refresh_manifest(cache_dir: Path) -> None:
    """Rebuild manifest.csv from the bags on disk, as stage 1 does."""
    write_manifest(cache_dir, collect_manifest(cache_dir))


def write_cohort_folders(data_dir: Path, slides: list[RandomSlide]) -> Path:
    """The spec's folder layout for ``slides`` (patient folders, one placeholder tile name each)."""
    for slide in slides:
        folder = Path(data_dir) / slide.class_folder / slide.patient_id
        folder.mkdir(parents=True, exist_ok=True)
    for folder, (_, required) in SPLIT_FOLDERS[slides[0].split].items():
        if required:
            (Path(data_dir) / folder).mkdir(parents=True, exist_ok=True)
    return Path(data_dir)


def write_random_bag_folder(
    bags_dir: Path, slides: list[RandomSlide], feature_dim: int = 32, features_name: str = "features", seed: int = 0
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
