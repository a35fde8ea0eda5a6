"""Bags for training: find (or make) the feature cache, list and validate its bags.

- ``resolve_cache`` finds the cache folder for a cohort, embedding missing slides first.
- ``records_from_cache`` / ``records_from_labels_csv`` list the bags as ``BagRecord``s.
- ``validate_records`` checks every bag before training and refuses mixed caches.
- ``limit_tiles`` cuts bags holding more than ``--max_tiles`` tiles (a cache embedded with more)
  to the seeded subset stage 1 would have embedded.

Serving the bags (``BagDataset``, ``collate_bags``, ``feature_statistics``) is in
``clam.bag_dataset``. Class weights, the order of each epoch and whether bags are read into
memory (the loading plan) are in ``clam.loading``.

Bags are opened only through ``feature_extraction.bags`` and their attributes read as
``BagAttrs``; whether a cache is current for a cohort is decided by ``feature_extraction.cache``.
Messages go to ``logging.getLogger(__name__)``.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from feature_extraction.bags import BAG_SUFFIX, BagAttrs, read_tile_names, validate_bag
from feature_extraction.cache import (
    as_int,
    covered_slides,
    find_cache,
    is_cache_dir,
    is_usable,
)
from feature_extraction.embed import EmbedConfig, embed_cohort
from feature_extraction.errors import BagError, PipelineError
from feature_extraction.layout import SPLIT_FOLDERS, discover_slides
from feature_extraction.manifest import STATUS_OK, read_manifest
from feature_extraction.sources import select_subset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BagRecord:
    """One bag to train on. ``label`` is a class index; ``n_instances`` is 0 until validated.

    ``rows``: the rows of the bag in use (sorted), when ``limit_tiles`` cut it to the ``--max_tiles``
    subset; None: every row. ``n_instances`` counts the rows in use. ``stamp``: the file's identity
    when it was validated (``bag_stamp``), so a bag replaced during training is noticed.
    ``version``: which embedding of the slide the bag holds (``bag_version``), recorded in the
    run's checkpoints so that --resume notices a slide re-embedded since."""

    slide_id: str
    patient_id: str
    label: int
    path: Path
    class_folder: str = ""
    n_instances: int = 0
    rows: tuple[int, ...] | None = None
    stamp: tuple[int, int, int] | None = None
    version: str = ""


def bag_stamp(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime in ns) of a bag file: a bag rewritten by stage 1 (always a new file,
    renamed into place) gets another. None when the file cannot be examined."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


def bag_version(attrs: BagAttrs | None, stamp: tuple[int, int, int] | None) -> str:
    """Which embedding of its slide a bag holds: a stage-1 bag's embedding time, tile-list digest
    and instance count (a re-embedded slide gets another), or another tool's bag's size in bytes
    (it records neither)."""
    if attrs is not None:
        return f"{attrs.embedded_at}|{attrs.tiles_digest}|{attrs.n_instances}"
    return f"size {stamp[1]}" if stamp else "missing"


def bag_versions(records: Sequence[BagRecord]) -> dict[str, str]:
    """The validated ``records``' versions by slide id, as a run's checkpoint stores them."""
    return {record.slide_id: record.version for record in records}


def changed_since(saved: dict[str, str], records: Sequence[BagRecord]) -> list[str]:
    """The slide ids of validated ``records`` whose bag is not the version ``saved`` names."""
    return sorted(r.slide_id for r in records if r.slide_id in saved and saved[r.slide_id] != r.version)


class BagChanged(BagError):
    """A bag was replaced or rewritten after it was validated, while training was running."""

    @classmethod
    def of(
        cls,
        record: BagRecord,
        then: str = "once embedding has finished, start training again, or continue "
        "with --resume from the run's last checkpoint.",
    ) -> BagChanged:
        return cls(
            f"bag {record.path} changed while training was running: it was replaced or rewritten (e.g. by a "
            "rerun of `python -m feature_extraction.embed`) after it was validated at the start of this run. "
            f"Training stops rather than mix old and new features: {then}"
        )


def changed_bags(records: Iterable[BagRecord]) -> list[BagRecord]:
    """The records whose file is no longer the one validated (records without a stamp are not checked)."""
    return [r for r in records if r.stamp is not None and bag_stamp(r.path) != r.stamp]


@dataclass(frozen=True)
class BagSet:
    """The validated bags of one cache, and what the cache is."""

    records: tuple[BagRecord, ...]
    feature_dim: int
    cache_key: str | None
    cache_dir: Path
    cache_config: dict  # cache.json ({} for a plain folder of bags)
    value_bytes: int = 4  # bytes per stored feature value (2 for a float16 cache), the widest bag's

    @property
    def total_bytes(self) -> int:
        """The features in use, in bytes as stored: what reading them all costs, in memory or from disk."""
        return sum(r.n_instances for r in self.records) * self.feature_dim * self.value_bytes


# ---------------------------------------------------------------- finding the cache


def resolve_cache(
    features_dir: Path,
    data_dir: Path | None,
    split: str,
    *,
    backbone: str,
    weights: str,
    max_tiles: int,
    seed: int,
    device: str = "auto",
) -> tuple[Path, set[str] | None]:
    """The cache folder to train from and the slide ids of ``data_dir`` (None: all of the split).

    ``features_dir`` holding ``cache.json`` is used as is. Otherwise a compatible cache that
    covers every slide of ``data_dir`` is reused (``cache.find_cache``); failing that, the
    missing slides are embedded first with ``feature_extraction.embed.embed_cohort``, into the
    same cache. Whole-slide images are tiled with the default tiling (``WsiConfig()``); other
    tiling means running ``python -m feature_extraction.embed`` with its ``--wsi_*`` options first
    and passing the cache folder it prints as ``features_dir``."""
    features_dir = Path(features_dir)
    if is_cache_dir(features_dir):
        if data_dir is None:
            return features_dir, None
        slide_ids = {s.slide_id for s in discover_slides(data_dir, split)}
        missing = slide_ids - covered_slides(features_dir, slide_ids)
        if missing:
            raise PipelineError(
                f"feature cache {features_dir} has no bag for {len(missing)} of the {len(slide_ids)} slides "
                f"of {data_dir} (--split {split}), e.g. {sorted(missing)[0]}. Pass --features_dir "
                f"{features_dir.parent} to embed them, or run `python -m feature_extraction.embed "
                f"--data_dir {data_dir} --split {split}`."
            )
        return features_dir, slide_ids
    slides = discover_slides(data_dir, split)
    slide_ids = {s.slide_id for s in slides}
    if not slide_ids:
        raise PipelineError(f"{data_dir} holds no patient folders for --split {split}.")
    found = find_cache(features_dir, backbone, weights, max_tiles, seed, slides)
    if found is not None:
        log.info(f"feature cache: {found} (all {len(slide_ids)} slides of {data_dir} embedded)")
        return found, slide_ids
    log.info(
        f"feature cache: no cache in {features_dir} holds current {backbone}/{weights} features of all "
        f"{len(slide_ids)} slides of {data_dir} (--split {split}); embedding them first "
        "(same as `python -m feature_extraction.embed`; whole-slide images with the default tiling, 256 px "
        "tiles at 20x: for other tiling, stop and run `python -m feature_extraction.embed "
        f"--data_dir {data_dir} --split {split}` with the --wsi_* options first, then pass the cache folder "
        "it prints as --features_dir)."
    )
    config = EmbedConfig(
        backbone=backbone,
        weights=weights,
        max_tiles=max_tiles,
        seed=seed,
        device=device,  # decode workers and batch size: embed's "auto" (clam's --num_workers loads bags)
    )
    report = embed_cohort(config, data_dir, split, features_dir)
    log.info(f"feature cache: {report.cache_dir}")
    return Path(report.cache_dir), slide_ids


# ---------------------------------------------------------------- listing bags


def records_from_cache(cache_dir: Path, slide_ids: set[str] | None, split: str) -> list[BagRecord]:
    """Bags of ``slide_ids`` (None: every slide of ``split`` in the manifest), in manifest order.

    Slides without a usable bag (stage 1 found no readable tile, or the bag is invalid) are
    left out and named in a warning."""
    cache_dir = Path(cache_dir)
    records, unusable = [], []
    for row in read_manifest(cache_dir):
        # An unreadable bag has no split on record: name it rather than drop it silently.
        in_split = row.split == split or (not row.split and row.status != STATUS_OK)
        if (row.slide_id not in slide_ids) if slide_ids is not None else not in_split:
            continue
        if not is_usable(row):
            unusable.append(f"{row.slide_id} ({row.status}{': ' + row.error if row.error else ''})")
            continue
        records.append(
            BagRecord(
                row.slide_id, row.patient_id or row.slide_id, int(row.label), Path(row.file), row.class_folder
            )
        )
    if unusable:
        log.warning(
            f"{len(unusable)} slides have no usable bag in {cache_dir} and are left out: "
            + "; ".join(unusable[:5])
            + (" ..." if len(unusable) > 5 else "")
        )
    if not records:
        raise PipelineError(f"feature cache {cache_dir} holds no usable bags for --split {split}.")
    return records


# Class folder names (EGFR_positive, EGFR_negative_cnn, C-S-EGFR_positive, ...) may stand for labels.
_FOLDER_LABELS = {
    folder: label for folders in SPLIT_FOLDERS.values() for folder, (label, _) in folders.items()
}


def _parse_label(value, source: Path) -> int:
    text = str(value).strip()
    if text in _FOLDER_LABELS:
        return _FOLDER_LABELS[text]
    try:
        return int(float(text))
    except ValueError:
        raise PipelineError(
            f"{source}: label {text!r} is neither a class index (0, 1, ...) nor a class folder name "
            f"({', '.join(sorted(_FOLDER_LABELS))})."
        ) from None


def records_from_labels_csv(labels_csv: Path, bags_dir: Path | None) -> list[BagRecord]:
    """Bags ``bags_dir/<slide_id>.h5`` labelled by a CSV with columns slide_id, label[, patient_id]."""
    if not bags_dir:
        raise PipelineError("--labels_csv needs --features_dir: the folder holding <slide_id>.h5 bags.")
    labels_csv, bags_dir = Path(labels_csv), Path(bags_dir)
    if not labels_csv.is_file():
        raise PipelineError(f"labels CSV {labels_csv} does not exist.")
    with open(labels_csv, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        if "slide_id" not in columns or "label" not in columns:
            raise PipelineError(
                f"labels CSV {labels_csv} needs the columns slide_id,label[,patient_id]; found {columns}."
            )
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    records, missing, seen = [], [], set()
    for row in rows:
        slide_id = row["slide_id"]
        if not slide_id or slide_id in seen:
            raise PipelineError(f"labels CSV {labels_csv}: slide_id {slide_id!r} is empty or repeated.")
        seen.add(slide_id)
        label = _parse_label(row["label"], labels_csv)
        path = bags_dir / f"{slide_id}{BAG_SUFFIX}"
        if not path.is_file():
            missing.append(slide_id)
            continue
        records.append(BagRecord(slide_id, row.get("patient_id") or slide_id, label, path))
    if missing:
        raise PipelineError(
            f"{len(missing)} slides of {labels_csv} have no bag in {bags_dir} (expected <slide_id>{BAG_SUFFIX}), "
            f"e.g. {missing[0]}."
        )
    if not records:
        raise PipelineError(f"labels CSV {labels_csv} lists no slides.")
    return records


def validate_records(
    records: Sequence[BagRecord],
    cache_dir: Path,
    n_classes: int,
    cache_config: dict | None = None,
    progress: bool = True,
) -> BagSet:
    """Validate every bag (see ``bags.validate_bag``) and return them with their sizes.

    Raises BagError naming the first bad bag and why, and when bags disagree on the feature
    dimension or come from different caches; PipelineError when a label is out of range."""
    cache_config = cache_config or {}
    expected_key = cache_config.get("cache_key") or None
    feature_dim = as_int(cache_config.get("feature_dim")) or None
    keys: dict[str | None, str] = {}
    checked, value_bytes = [], 2
    for record in tqdm(records, desc="validating bags", unit="bag", disable=not progress, leave=False):
        if not 0 <= record.label < n_classes:
            raise PipelineError(
                f"slide {record.slide_id}: label {record.label} is outside 0..{n_classes - 1} "
                f"(--n_classes {n_classes})."
            )
        stamp = bag_stamp(record.path)  # before: a bag replaced from here on counts as changed
        summary = validate_bag(record.path, feature_dim=feature_dim, cache_key=expected_key)
        feature_dim = summary.feature_dim
        value_bytes = max(value_bytes, np.dtype(summary.feature_dtype).itemsize)
        typed = summary.bag_attrs  # None for another tool's bag (CLAM, TRIDENT or STAMP, from a labels CSV)
        key = (typed.cache_key if typed is not None else summary.attrs.get("cache_key")) or None
        keys.setdefault(key, record.slide_id)
        if len(keys) > 1:
            listed = "; ".join(f"{k!r} (e.g. {s})" for k, s in keys.items())
            raise BagError(
                f"bags in {cache_dir} come from different feature caches: {listed}. "
                "Bags of different caches are never mixed: keep each cache in its own folder."
            )
        if typed is not None and cache_config and typed.label != record.label:
            raise BagError(
                f"bag {record.path}: label attribute {typed.label} disagrees with the manifest's "
                f"{record.label}. Re-embed this slide."
            )
        checked.append(
            replace(record, n_instances=summary.n_instances, stamp=stamp, version=bag_version(typed, stamp))
        )
    _check_patient_labels(checked)
    return BagSet(
        tuple(checked),
        int(feature_dim or 0),
        next(iter(keys)) if keys else None,
        Path(cache_dir),
        cache_config,
        value_bytes,
    )


def _check_patient_labels(records: Iterable[BagRecord]) -> None:
    labels: dict[str, BagRecord] = {}
    for record in records:
        first = labels.setdefault(record.patient_id, record)
        if first.label != record.label:
            raise PipelineError(
                f"patient {record.patient_id} has slides of two labels ({first.slide_id}: "
                f"{first.label}, {record.slide_id}: {record.label}); fix the labels."
            )


def limit_tiles(bags: BagSet, max_tiles: int, seed: int) -> tuple[BagSet, int]:
    """Cut every bag holding more than ``max_tiles`` instances to the ``max_tiles`` tiles that
    stage 1's subset rule (``sources.select_subset``: sha256 rank of seed, slide id and tile name)
    keeps among its tiles. For a bag of a cache embedded with more tiles and the same seed, or
    holding every tile of its slide (the only bags ``cache.find_cache`` takes from a cache of
    another seed), this is exactly the subset an embedding with ``max_tiles`` holds (the rank is
    nested). Returns the bags and how many were cut; ``max_tiles <= 0`` cuts none."""
    if max_tiles <= 0 or all(r.n_instances <= max_tiles for r in bags.records):
        return bags, 0
    records, cut = [], 0
    for record in bags.records:
        if record.n_instances > max_tiles:
            kept = select_subset(read_tile_names(record.path), record.slide_id, max_tiles, seed)
            record = replace(record, rows=tuple(kept), n_instances=len(kept))
            cut += 1
        records.append(record)
    return replace(bags, records=tuple(records)), cut
