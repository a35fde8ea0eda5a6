"""Stage 1: embed every tile of a cohort with a backbone into one HDF5 bag per slide.

    python -m feature_extraction.embed --data_dir train --split train --backbone resnet50_trunc

``embed_cohort(EmbedConfig(...), data_dir, split)`` is the library function behind the command
(see docs/embedding.md); the engine that turns tiles into bags is ``feature_extraction.extractor``.
It lists every slide's tiles, embeds those whose bag is not current into the cache folder of
the configuration (``cache.open_cache``) and, once every process is done (torchrun ranks share
the slides), rank 0 rewrites the manifest from the bags on disk.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from feature_extraction.backbones import (
    BACKBONES,
    DEFAULT_BACKBONE,
    LoadedBackbone,
    backbone_table,
    describe,
    load_backbone,
    resolve_weights,
)
from feature_extraction.bags import FEATURE_DTYPES, read_bag_attrs
from feature_extraction.cache import ExtractionConfig, collect_manifest, open_cache
from feature_extraction.errors import PipelineError, cli_main
from feature_extraction.extractor import EmbeddingRun, Outcome, shard_order
from feature_extraction.layout import (
    SPLITS,
    default_data_dir,
    default_features_dir,
    discover_slides,
    list_slide_tiles,
)
from feature_extraction.manifest import STATUS_OK, ManifestRow, write_manifest
from feature_extraction.reporting import configure_cli_logging
from feature_extraction.runtime import (
    AUTO,
    DEVICES,
    PRECISIONS,
    RUNTIMES,
    ComputePlan,
    auto_or_count,
    plan_compute,
    rank_and_world,
)
from feature_extraction.sources import SUBSET_RULE, SlideSource, SlideTiles, TileTransform
from feature_extraction.throughput import Throughput, append_run_record
from feature_extraction.weights import read_weights_map
from feature_extraction.wsi import WsiConfig, add_wsi_arguments, require_openslide, wsi_config_from_args
from feature_extraction.wsi_plan import PLAN_CACHE_FOLDER

log = logging.getLogger("feature_extraction.embed")  # not __name__: that is "__main__" under python -m


@dataclass(frozen=True)
class EmbedConfig:
    """What an embedding run is asked for, apart from where the slides are and where the cache goes.

    ``backbone``, ``weights``, ``max_tiles``, ``seed`` and ``wsi`` decide the features (and so the
    cache); the others decide how they are computed. ``max_tiles <= 0`` embeds every tile. ``wsi``
    says how whole-slide images are tiled (docs/wsi.md; default settings when None).
    ``overwrite`` re-embeds the cohort's slides even when their bags are current.
    ``expected_cache_key``: raise CacheKeyMismatch, before any tile is embedded, if this
    configuration's cache key is another (a model trained on one cache evaluated on slides
    embedded anew). ``to_dict`` / ``from_dict`` round-trip it through JSON."""

    backbone: str = DEFAULT_BACKBONE
    weights: str = "imagenet"  # imagenet (ResNets), hub (encoders), random (testing), or a weights path
    max_tiles: int = 100
    seed: int = 0
    wsi: WsiConfig | None = None
    batch_size: int | str | None = AUTO  # "auto" (or None): runtime.plan_compute chooses
    num_workers: int | str = AUTO  # "auto": runtime.plan_compute chooses
    device: str = "auto"
    precision: str = "auto"
    runtime: str = "auto"
    overwrite: bool = False
    progress: bool = True
    expected_cache_key: str | None = None
    feature_dtype: str = "float32"  # how bags store the features (float16: half the disk; read as float32)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "weights": str(self.weights), "wsi": self.wsi.as_dict() if self.wsi else None}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EmbedConfig:
        """The inverse of ``to_dict``; unknown keys are ignored. It also replays a training
        checkpoint's ``cache`` entry (cache.json plus ``cache_dir``): its ``wsi_tiling`` (JSON) gives
        ``wsi`` and its ``cache_key`` gives ``expected_cache_key``, so the replay must reproduce
        the features the model was trained on."""
        known = {f.name for f in fields(cls)}
        kept = {k: v for k, v in values.items() if k in known}
        if "expected_cache_key" not in kept and values.get("cache_key"):
            kept["expected_cache_key"] = str(values["cache_key"])
        wsi = kept.pop("wsi", None) or values.get("wsi_tiling") or None
        if isinstance(wsi, str):
            wsi = json.loads(wsi)
        for key in ("max_tiles", "seed", "num_workers", "batch_size"):
            if kept.get(key) not in (None, AUTO):
                kept[key] = int(kept[key])
        if "weights" in kept:
            kept["weights"] = str(kept["weights"])
        return cls(**kept, wsi=WsiConfig.from_dict(wsi) if isinstance(wsi, Mapping) else wsi)


@dataclass(frozen=True)
class SkippedTile:
    slide_id: str
    name: str
    reason: str


@dataclass
class EmbedReport:
    """What ``embed_cohort`` did. ``slides`` holds the manifest rows of this data_dir/split
    in discovery order; ``failed`` pairs (slide_id, reason) for slides without a bag."""

    cache_dir: Path
    config: ExtractionConfig
    cache_key: str
    slides: list[ManifestRow]
    n_embedded: int  # bags written by this process
    n_reused: int  # bags that were already current
    n_by_others: int  # bags written meanwhile by another process (torchrun ranks, a parallel run)
    failed: list[tuple[str, str]]
    skipped_tiles: list[SkippedTile]
    n_ignored_files: int  # non-image files in the slide folders
    n_tiles_embedded: int  # tiles through the backbone in this process
    embed_seconds: float  # time spent embedding (0 when nothing needed it)
    plan: ComputePlan | None  # None when nothing was embedded
    runtime: str = ""
    random_weights: bool = False
    throughput: Throughput | None = None  # where the embedding time went (None when nothing was embedded)

    @property
    def tiles_per_second(self) -> float:
        return self.n_tiles_embedded / self.embed_seconds if self.embed_seconds > 0 else 0.0


class CacheKeyMismatch(PipelineError):
    """The configuration of an ``embed_cohort`` call does not give the cache key it was asked for."""

    def __init__(self, config: ExtractionConfig) -> None:
        super().__init__(f"this configuration gives cache key {config.cache_key!r}, not the one expected")
        self.config = config


def embed_cohort(
    config: EmbedConfig, data_dir: str | Path, split: str = "train", features_dir: str | Path | None = None
) -> EmbedReport:
    """Embed the slides of ``data_dir`` (layout of ``split``) as ``config`` says, into the cache of
    the configuration under ``features_dir`` (default: <project root>/features); reuse every bag
    that is already current.

    Raises PipelineError for an unusable input or set-up (bad folder, missing weights),
    CacheKeyMismatch when ``config.expected_cache_key`` is not this configuration's key;
    unreadable tiles and slides are skipped and reported."""
    started = time.time()
    slides = discover_slides(data_dir, split)
    if not slides:
        raise PipelineError(
            f"{data_dir} has the class folders of --split {split} but no patient folder in them"
        )
    require_openslide(slides)  # whole-slide images without OpenSlide: stop once, before any work
    loaded = load_backbone(config.backbone, config.weights)
    rank, world = rank_and_world()
    if loaded.is_random:
        log.warning(
            "--weights random: the backbone is randomly initialised (fixed seed). Its features only "
            "test the pipeline; the cache folder and every bag say weights=random."
        )
    extraction, transform = _extraction_config(config, loaded, slides)
    if config.expected_cache_key is not None and extraction.cache_key != config.expected_cache_key:
        raise CacheKeyMismatch(extraction)
    features_dir = Path(features_dir) if features_dir is not None else default_features_dir()
    cache_dir = open_cache(features_dir, extraction)
    log.info(f"{describe(loaded)}\ncache {cache_dir}")

    # Bad options fail before any work.
    plan = plan_compute(
        config.device,
        config.precision,
        config.runtime,
        config.batch_size,
        config.num_workers,
        cpu_onnx=loaded.spec.cpu_onnx,
    )
    job = EmbeddingRun(
        cache_dir,
        extraction,
        loaded,
        transform,
        features_dir,
        plan,
        newer_than=started if config.overwrite else None,
        run_started=started,
        progress=config.progress and rank == 0,  # one progress bar under torchrun
    )
    listings = []
    for slide in slides:
        try:
            listings.append(
                list_slide_tiles(
                    slide,
                    extraction.max_tiles,
                    extraction.seed,
                    config.wsi,
                    plan_cache=features_dir / PLAN_CACHE_FOLDER,
                )
            )
        except (
            PipelineError
        ) as error:  # e.g. an unreadable whole-slide file: this slide fails, the run goes on
            # recorded in the pass, under the slide's lock and by one rank only, like any slide without tiles
            listings.append(SlideTiles(slide, (), 0, (), "", reason=str(error)))
    listings = [listings[i] for i in shard_order(len(listings), rank, world)]
    try:
        job.run(listings)
    finally:
        job.close()
    if job.throughput() is not None:  # the run log: one line per run and process that embedded tiles
        append_run_record(cache_dir, job.throughput(), rank=rank, world=world, embed_seconds=job.seconds)

    rows = collect_manifest(cache_dir)
    if rank == 0:
        write_manifest(cache_dir, rows)
    return _report(job, listings, slides, rows, cache_dir, extraction, loaded)


def _extraction_config(
    config: EmbedConfig, loaded: LoadedBackbone, slides: list[SlideSource]
) -> tuple[ExtractionConfig, TileTransform]:
    """The cache configuration of ``config`` with these weights, and the tile transform."""
    spec = loaded.spec
    if config.feature_dtype not in FEATURE_DTYPES:
        raise PipelineError(f"--feature_dtype {config.feature_dtype}: use one of {FEATURE_DTYPES}")
    transform = TileTransform(spec.input_size, spec.mean, spec.std, spec.resize_size)
    extraction = ExtractionConfig(
        backbone=spec.name,
        weights=loaded.weights,
        weights_digest=loaded.weights_digest,
        transform=transform.describe(),
        input_size=spec.input_size,
        max_tiles=max(0, int(config.max_tiles)),
        seed=int(config.seed),
        feature_dim=spec.feature_dim,
        subset_rule=SUBSET_RULE,
        feature_dtype=config.feature_dtype,
        wsi_tiling=(
            json.dumps((config.wsi or WsiConfig()).as_dict(), sort_keys=True)
            if any(slide.kind == "wsi" for slide in slides)
            else ""
        ),
    )
    return extraction, transform


def _report(
    job: EmbeddingRun,
    listings: list[SlideTiles],
    slides: list[SlideSource],
    rows: list[ManifestRow],
    cache_dir: Path,
    config: ExtractionConfig,
    loaded: LoadedBackbone,
) -> EmbedReport:
    by_id = {row.slide_id: row for row in rows}
    failed, skipped = [], []
    for slide in slides:
        row = by_id.get(slide.slide_id)
        if row is None:
            failed.append((slide.slide_id, "no bag and no failure record (interrupted?)"))
        elif row.status != STATUS_OK:
            failed.append((slide.slide_id, row.error or row.status))
    for slide in slides:
        row = by_id.get(slide.slide_id)
        if row is None or row.status != STATUS_OK or row.n_skipped == 0:
            continue
        for tile in read_bag_attrs(row.file).skipped_tiles:
            skipped.append(SkippedTile(slide.slide_id, tile["name"], tile["reason"]))
    counts = {kind: sum(v == kind for v in job.outcome.values()) for kind in Outcome}
    return EmbedReport(
        cache_dir=cache_dir,
        config=config,
        cache_key=config.cache_key,
        slides=[by_id[s.slide_id] for s in slides if s.slide_id in by_id],
        n_embedded=counts[Outcome.EMBEDDED],
        n_reused=counts[Outcome.REUSED],
        n_by_others=counts[Outcome.BY_OTHER],
        failed=failed,
        skipped_tiles=skipped,
        n_ignored_files=sum(len(listing.ignored) for listing in listings),
        n_tiles_embedded=job.n_tiles,
        embed_seconds=job.seconds,
        plan=job.plan if job.runner else None,
        runtime=job.runner.name if job.runner else "",
        random_weights=loaded.is_random,
        throughput=job.throughput(),
    )


# --------------------------------------------------------------------------------------- the CLI


def format_summary(report: EmbedReport, max_names: int = 20) -> str:
    """The end-of-run summary: slides embedded / reused / failed, skipped tiles by name, cache folder."""
    lines = []
    speed = (
        f" ({report.n_tiles_embedded} tiles, {report.tiles_per_second:.1f} tiles/s, {report.runtime})"
        if report.n_embedded
        else ""
    )
    lines.append(
        f"slides: {report.n_embedded} embedded{speed}, {report.n_reused} reused, "
        f"{len(report.failed)} failed"
        + (f", {report.n_by_others} by other processes" if report.n_by_others else "")
    )
    if report.failed:
        lines.append("failed slides (no bag):")
        lines += [f"  {slide_id}: {reason}" for slide_id, reason in report.failed[:max_names]]
        if len(report.failed) > max_names:
            lines.append(f"  ... and {len(report.failed) - max_names} more (manifest.csv, status=failed)")
    if report.skipped_tiles:
        lines.append(f"skipped {len(report.skipped_tiles)} unreadable tiles:")
        lines += [f"  {t.slide_id}/{t.name}: {t.reason}" for t in report.skipped_tiles[:max_names]]
        if len(report.skipped_tiles) > max_names:
            lines.append(
                f"  ... and {len(report.skipped_tiles) - max_names} more (bag attribute skipped_tiles)"
            )
    if report.throughput is not None and report.n_tiles_embedded:
        lines.append(f"time: {report.throughput.describe()}")
    if report.n_ignored_files:
        lines.append(f"ignored {report.n_ignored_files} non-image files in the slide folders")
    if report.random_weights:
        lines.append("WARNING: weights=random: these features only test the pipeline")
    rank, world = rank_and_world()
    if world > 1:
        lines = [f"[rank {rank}/{world}] {line}" for line in lines]
    lines.append(
        f"cache: {report.cache_dir}  (key {report.cache_key[:16]}..., {len(report.slides)} slides of this split)"
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m feature_extraction.embed",
        description="Embed every tile with a backbone (CLAM's ResNet-50 or a pathology foundation model) into one "
        "HDF5 bag per slide (a reusable feature cache).",
    )
    parser.add_argument(
        "--data_dir", type=Path, default=None, help="cohort folder (default: <project root>/<split>)"
    )
    parser.add_argument(
        "--split", choices=SPLITS, default="train", help="class-folder layout to read (default: train)"
    )
    parser.add_argument(
        "--max_tiles",
        type=int,
        default=100,
        help="tiles per slide, a seeded random subset when there are more; 0 or less: all (default: 100)",
    )
    parser.add_argument(
        "--num_workers",
        type=auto_or_count(0),
        default=AUTO,
        help="tile-decoding worker processes (default: auto: all cores but one on a GPU; on a CPU 4, and "
        "there at most ceil(threads / 8), an explicit number too: 1 for up to 8 threads, 2 for 9 to 16, ...; "
        "threads: OMP_NUM_THREADS when set, else the usable cores, all of which the backbone uses)",
    )
    parser.add_argument(
        "--batch_size",
        type=auto_or_count(1),
        default=AUTO,
        help="tiles per forward pass (default: auto: on CUDA the largest power of two up to 512 that fits "
        "the free memory, 256 on MPS, 16 with ONNX Runtime and 8 eager on a CPU)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the max_tiles subset (default: 0)")
    parser.add_argument(
        "--feature_dtype",
        choices=FEATURE_DTYPES,
        default="float32",
        help="how bags store the features: float16 halves disk and reading, training reads them as "
        "float32; part of the cache key (default: float32)",
    )
    _add_backbone_arguments(parser)
    parser.add_argument(
        "--features_dir", type=Path, default=None, help="cache root (default: <project root>/features)"
    )
    parser.add_argument("--device", default="auto", help=f"{'|'.join(DEVICES)}|cuda:N (default: auto)")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: fp16 autocast on a GPU, fp32 on a CPU (default: auto)",
    )
    parser.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="auto",
        help="auto: ONNX Runtime on a CPU when installed for the ResNets, else PyTorch (default: auto)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="re-embed this cohort's slides even if their bags are current",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bar or log lines, only warnings and the summary"
    )
    add_wsi_arguments(parser)
    return parser


def _add_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    """--backbone, --weights, --weights_map and --list_backbones."""
    parser.add_argument(
        "--backbone",
        choices=sorted(BACKBONES),
        default=DEFAULT_BACKBONE,
        help=f"feature extractor (default: {DEFAULT_BACKBONE}, CLAM's ResNet-50 to layer3, 1024-d)",
    )
    parser.add_argument(
        "--weights",
        default=None,
        help="imagenet (the ResNets: torchvision's, from the torch hub cache), hub (the foundation-model "
        "encoders: their authors' file from the Hugging Face hub cache), random (testing only), or a "
        "state-dict file (.pth/.bin/.safetensors) or hub-style folder (default: the --weights_map entry "
        "of the backbone, else imagenet for the ResNets and hub for the encoders)",
    )
    parser.add_argument(
        "--weights_map",
        type=Path,
        default=None,
        help='JSON or TOML file mapping backbone names to weight files, e.g. {"uni_v1": "/models/uni.bin"}; '
        "used when --weights is not given",
    )
    parser.add_argument(
        "--list_backbones",
        action="store_true",
        help="print every backbone (architecture, input, dim, params, licence, weights found here) and exit",
    )


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_cli_logging(quiet=args.quiet or rank_and_world()[0] != 0)  # one rank's log lines under torchrun
    weights_map = read_weights_map(args.weights_map) if args.weights_map else {}
    if args.list_backbones:
        print(backbone_table(weights_map))
        return 0
    config = EmbedConfig(
        backbone=args.backbone,
        weights=resolve_weights(args.backbone, args.weights, weights_map),
        max_tiles=args.max_tiles,
        seed=args.seed,
        wsi=wsi_config_from_args(args),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        precision=args.precision,
        runtime=args.runtime,
        overwrite=args.overwrite,
        progress=not args.quiet,
        feature_dtype=args.feature_dtype,
    )
    data_dir = args.data_dir if args.data_dir is not None else default_data_dir(args.split)
    report = embed_cohort(config, data_dir, args.split, args.features_dir)
    print(format_summary(report))
    usable = sum(row.status == STATUS_OK for row in report.slides)
    if usable == 0:
        print("error: no slide could be embedded; see the reasons above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
