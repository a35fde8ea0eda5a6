"""The cohort an evaluation runs on: the bags of ``--data_dir`` in the checkpoint's feature cache
(embedding the slides it lacks first, with the checkpoint's backbone, weights and tile subset), or
the bags of ``--labels_csv`` in ``--features_dir``; a cache or bag with another key than the
checkpoint's is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from clam.data import BagRecord, records_from_cache, records_from_labels_csv, validate_records
from clam.eval_config import EvaluateConfig
from clam.inference import LoadedModel
from feature_extraction.bags import bag_path
from feature_extraction.cache import is_cache_dir, read_cache_config
from feature_extraction.embed import CacheKeyMismatch, EmbedConfig, embed_cohort
from feature_extraction.errors import PipelineError
from feature_extraction.layout import default_data_dir, default_features_dir, discover_slides
from feature_extraction.manifest import STATUS_FAILED, read_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cohort:
    """The validated bags to evaluate, and the slides that have none (with the reason)."""

    records: tuple[BagRecord, ...]
    cache_dir: Path
    cache_key: str | None
    left_out: dict[str, str] = field(default_factory=dict)


def cohort_bags(config: EvaluateConfig, loaded: LoadedModel) -> Cohort:
    """The bags to evaluate: from ``--labels_csv`` and ``--features_dir``, else the slides of
    ``--data_dir``/``--split`` in the checkpoint's feature cache, embedding those it lacks.

    Raises PipelineError when the cache (or a bag) has another key than the checkpoint's, when
    a bag's feature dimension differs from the model's, or when nothing can be evaluated."""
    if config.labels_csv is not None:
        records = records_from_labels_csv(config.labels_csv, config.features_dir)
        cache_dir = Path(config.features_dir)
        return _validated(records, cache_dir, loaded, {}, config.progress)
    if loaded.is_clam_state_dict:
        raise PipelineError(
            f"checkpoint {loaded.path} is a bare CLAM state dict (weights only, as mahmoodlab/CLAM saves them): it "
            "records no feature cache, so the slides of a data folder cannot be embedded to match it. Pass "
            "--labels_csv (slide_id,label[,patient_id]) and --features_dir (the folder of <slide_id>.h5 bags made "
            "with the feature extractor it was trained with)."
        )
    data_dir = Path(config.data_dir or default_data_dir(config.split))
    slides = discover_slides(data_dir, config.split)
    if not slides:
        raise PipelineError(f"{data_dir} holds no patient folders for --split {config.split}.")
    slide_ids = {s.slide_id for s in slides}
    cache_dir = _checkpoint_cache_dir(config, loaded)
    if _not_embedded(cache_dir, slide_ids):
        cache_dir = _embed_missing(config, loaded, data_dir, cache_dir, slide_ids)
    _check_cache_key(cache_dir, loaded)
    records = records_from_cache(cache_dir, slide_ids, config.split)
    cohort = _validated(records, cache_dir, loaded, read_cache_config(cache_dir), config.progress)
    errors = {row.slide_id: row.error for row in read_manifest(cache_dir)}
    left_out = {
        s: f"no bag in the feature cache: {errors.get(s) or 'stage 1 found no readable tile'}"
        for s in sorted(slide_ids - {r.slide_id for r in cohort.records})
    }
    return Cohort(cohort.records, cohort.cache_dir, cohort.cache_key, left_out)


def _checkpoint_cache_dir(config: EvaluateConfig, loaded: LoadedModel) -> Path:
    """The cache folder to look in: ``--features_dir`` itself if it is a cache, else the folder of
    the checkpoint's cache name inside ``--features_dir`` (default: the one it was trained from)."""
    if loaded.cache_key is None:
        raise PipelineError(
            f"checkpoint {loaded.path} records no feature cache (it was trained on bags from a labels CSV), "
            "so the slides of a data folder cannot be embedded to match it. Pass --labels_csv and --features_dir."
        )
    trained_dir = Path(str(loaded.cache.get("cache_dir") or ""))
    if config.features_dir is not None:
        features_dir = Path(config.features_dir)
        return features_dir if is_cache_dir(features_dir) else features_dir / trained_dir.name
    # Where training found it; else the project's default cache folder (a project moved elsewhere).
    moved = default_features_dir() / trained_dir.name
    return moved if not is_cache_dir(trained_dir) and is_cache_dir(moved) else trained_dir


def _not_embedded(cache_dir: Path, slide_ids: set[str]) -> list[str]:
    """Slides with neither a bag nor a recorded failure (no readable tile) in ``cache_dir``.

    Failed slides are not retried here: that would load the backbone (and need its weights,
    perhaps unavailable offline) on every evaluation; ``python -m feature_extraction.embed`` retries them."""
    if not is_cache_dir(cache_dir):
        return sorted(slide_ids)
    failed = {row.slide_id for row in read_manifest(cache_dir) if row.status == STATUS_FAILED}
    return sorted(s for s in slide_ids if s not in failed and not bag_path(cache_dir, s).is_file())


def _embed_missing(
    config: EvaluateConfig, loaded: LoadedModel, data_dir: Path, cache_dir: Path, slide_ids: set[str]
) -> Path:
    if is_cache_dir(cache_dir):
        _check_cache_key(cache_dir, loaded)  # refuse before spending time embedding
    missing = _not_embedded(cache_dir, slide_ids)
    backbone = loaded.cache.get("backbone") or loaded.args.get("backbone")
    # The cache records what the features really came from ("imagenet", "hub", "random", or "file-<stem>" for a
    # weights file, whose path only the arguments hold); --weights may be a default that a cache folder
    # given as --features_dir overrode.
    recorded = loaded.cache.get("weights")
    weights = (
        recorded if recorded in ("imagenet", "hub", "random") else loaded.args.get("weights") or recorded
    )
    max_tiles, seed = int(loaded.cache.get("max_tiles", 0)), int(loaded.cache.get("seed", 0))
    log.info(
        f"feature cache: {len(missing)} of {len(slide_ids)} slides of {data_dir} are not in {cache_dir}; "
        f"embedding them first with the checkpoint's {backbone} / {weights} (max_tiles {max_tiles}, "
        f"seed {seed})."
    )
    # The checkpoint's cache entry replays: whole slides are tiled as for training (its wsi_tiling),
    # and a configuration that no longer gives its cache key is refused before a tile is embedded.
    replay = EmbedConfig.from_dict(
        {
            **loaded.cache,
            "backbone": backbone,
            "weights": weights,
            "max_tiles": max_tiles,
            "seed": seed,
            "device": config.device,  # decode workers: embed's "auto" (--num_workers here loads bags)
            "progress": config.progress,
            "expected_cache_key": loaded.cache_key,
        }
    )
    try:
        report = embed_cohort(replay, data_dir, config.split, cache_dir.parent)
    except CacheKeyMismatch as mismatch:
        raise PipelineError(
            f"embedding {data_dir} with the checkpoint's backbone {backbone!r} and weights {weights!r} now gives "
            f"cache key {mismatch.config.cache_key!r}, but {loaded.path} was trained on {loaded.cache_key!r}: "
            f"{_key_difference(mismatch.config, loaded.cache)}. Its predictions on these features would be "
            "meaningless; use the weights the model was trained with, or retrain. Nothing was embedded."
        ) from None
    return Path(report.cache_dir)


def _key_difference(config, trained: dict) -> str:
    """Which recorded fields of the training cache differ from ``config`` (an ExtractionConfig)."""
    now = {k: v for k, v in asdict(config).items() if k != "weights"}
    changed = [k for k, v in now.items() if k in trained and str(trained[k]) != str(v)]
    if not changed:
        return "the weights or the transform changed since training"
    return "changed since training: " + ", ".join(
        f"{k} {str(trained[k])[:40]!r} -> {str(now[k])[:40]!r}" for k in changed
    )


def _check_cache_key(cache_dir: Path, loaded: LoadedModel) -> None:
    found = read_cache_config(cache_dir).get("cache_key")
    if found != loaded.cache_key:
        raise PipelineError(
            f"feature cache {cache_dir} has key {found!r}, but {loaded.path} was trained on features with key "
            f"{loaded.cache_key!r} (another backbone, weights, transform or tile subset). The model cannot be "
            "evaluated on these features: pass the --features_dir it was trained with, or let evaluation embed "
            "the slides by pointing --features_dir at a folder of caches."
        )


def _validated(
    records: Sequence[BagRecord], cache_dir: Path, loaded: LoadedModel, cache_config: dict, progress: bool
) -> Cohort:
    expected = {"cache_key": loaded.cache_key, "feature_dim": loaded.feature_dim}
    bagset = validate_records(records, cache_dir, loaded.n_classes, {**cache_config, **expected}, progress)
    if loaded.is_clam_state_dict:
        # Nothing records which extractor CLAM's features came from: only the dimension is checked.
        log.info(
            f"note: {loaded.path} records no feature extractor; the bags in {cache_dir} have the feature "
            f"dimension it expects ({loaded.feature_dim}), but make sure they come from the extractor it was "
            "trained with (CLAM's default: ResNet50 truncated after layer 3, ImageNet weights, 1024 features)."
        )
    elif loaded.cache_key is None and bagset.cache_key is not None:
        raise PipelineError(
            f"the bags in {cache_dir} come from feature cache {bagset.cache_key!r}, but {loaded.path} was trained "
            "on bags without a cache key (a labels CSV of foreign bags). Evaluate it on bags of the same origin."
        )
    return Cohort(bagset.records, Path(cache_dir), bagset.cache_key)
