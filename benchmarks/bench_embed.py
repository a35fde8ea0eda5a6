"""Embedding throughput, in one run on the same tiles: the ``## Embedding`` section of docs/benchmarks.md.

    python benchmarks/bench_embed.py --write         # CPU: 400 tiles; GPU: 8192 tiles; writes the page
    python benchmarks/bench_embed.py                 # the same, printed only
    python benchmarks/bench_embed.py --n_tiles 40    # a quick smoke test, printed only
    python benchmarks/bench_embed.py --backbone uni_v1 --n_tiles 16 --repeats 1   # any registered encoder
    python benchmarks/bench_embed.py --device cuda --precision fp16 --format jpeg --json out.json

The section is printed to stdout; only ``--write`` replaces it in docs/benchmarks.md (or ``--out``);
``--json`` also writes the figures as JSON (what ``benchmarks/gpu_check.sh`` reads).

Four figures, tiles per second (medians of ``--repeats`` interleaved rounds):

- end to end: ``embed_cohort`` on a cohort of 256 px H&E-like PNG (or ``--format jpeg``) tiles, timed over its
  embedding pass (starting the decode workers, decoding, resizing, the backbone, HDF5
  writes); listing the folders, loading the model and the one-off ONNX export are not timed;
- limit: the same runner, batch size and threads on uint8 tiles already in memory: what
  the backbone alone allows, the ceiling of the end-to-end figure;
- decode limit: a DataLoader with the same workers and batch size that only decodes and
  resizes the same files (``decode_rgb`` and ``TileTransform``, as embed's workers do) and
  hands the uint8 batches over (pinned on a GPU): what decoding alone allows;
- peer: CLAM's recipe on the same files: a Dataset that opens each tile with PIL, resizes
  it, ``ToTensor`` + ``Normalize``, a torch DataLoader with the same batch size and workers,
  and the eager fp32 NCHW model (fp32 on a GPU too, as CLAM does).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dataclasses import replace  # noqa: E402

from report import load_average, machine, publish  # noqa: E402

from feature_extraction.backbones import BACKBONES, DEFAULT_BACKBONE, load_backbone  # noqa: E402
from feature_extraction.embed import EmbedConfig, embed_cohort  # noqa: E402
from feature_extraction.runtime import available_cores, build_runner, plan_compute  # noqa: E402
from feature_extraction.throughput import settle_batch_size  # noqa: E402

SECTION = "## Embedding"
UNIQUE_TILES = 256  # distinct images; more tiles repeat their bytes (decoding costs the same)
JPEG_QUALITY = 90


def he_tile(rng: np.random.Generator, size: int = 256) -> Image.Image:
    """An H&E-looking tile: eosin-pink stroma of smooth texture, haematoxylin nuclei, grain.

    Compresses like a real H&E PNG (about 100-130 KB at 256 px), so decoding costs what it
    costs on real tiles."""
    coarse = rng.random((size // 16 + 2, size // 16 + 2, 1))
    texture = (
        np.asarray(
            Image.fromarray((coarse[..., 0] * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC),
            dtype=np.float32,
        )[..., None]
        / 255.0
    )
    pink, white = np.array([235, 150, 190], np.float32), np.array([245, 235, 240], np.float32)
    image = white * (1 - texture) + pink * texture
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(int(rng.integers(20, 60))):
        cy, cx, r = rng.integers(0, size), rng.integers(0, size), rng.integers(3, 9)
        nucleus = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        image[nucleus] = np.array([90, 60, 150], np.float32) + rng.normal(0, 10, 3)
    image += rng.normal(0, 6, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB")


def build_cohort(
    root: Path, n_tiles: int, tiles_per_slide: int = 25, seed: int = 0, fmt: str = "png"
) -> list[Path]:
    """The spec's train layout with ``n_tiles`` 256 px PNG (or JPEG, quality 90) tiles; returns the
    tile paths."""
    rng = np.random.default_rng(seed)
    encoded = []
    for _ in range(min(n_tiles, UNIQUE_TILES)):
        buffer = io.BytesIO()
        if fmt == "png":
            he_tile(rng).save(buffer, format="PNG")
        else:
            he_tile(rng).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        encoded.append(buffer.getvalue())
    suffix = ".png" if fmt == "png" else ".jpg"
    paths = []
    for i in range(n_tiles):
        slide = i // tiles_per_slide
        folder = ("EGFR_positive", "EGFR_negative")[slide % 2]
        path = root / folder / f"P{slide:04d}" / f"tile_x{(i % tiles_per_slide) * 256}_y0{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encoded[i % len(encoded)])
        paths.append(path)
    for folder in ("EGFR_positive", "EGFR_negative"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    return paths


class ClamDataset(Dataset):
    """CLAM's patch dataset, as in its extract_features_fp.py: PIL -> RGB -> transforms."""

    def __init__(self, paths: list[Path], transform) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(Image.open(self.paths[index]).convert("RGB"))


def peer_rate(
    paths: list[Path], name: str, device: str, batch_size: int, num_workers: int, threads: int
) -> float:
    backbone = load_backbone(name, "random")  # a fresh copy: NCHW weights, as CLAM has them
    spec = backbone.spec
    transform = transforms.Compose(
        [
            transforms.Resize(max(spec.resize_size, spec.input_size)),
            transforms.CenterCrop(spec.input_size),
            transforms.ToTensor(),
            transforms.Normalize(spec.mean, spec.std),
        ]
    )
    loader = DataLoader(
        ClamDataset(paths, transform),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.startswith("cuda"),
    )
    model = backbone.module.to(device).eval()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        started = time.perf_counter()
        with torch.inference_mode():
            for batch in loader:
                model(batch.to(device)).cpu().numpy()
        _sync(device)
        return len(paths) / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(previous)


def limit_rate(backbone, plan, features_dir: Path, n_tiles: int) -> float:
    runner = build_runner(backbone, plan, features_dir)
    size = backbone.spec.input_size
    batch = torch.randint(0, 256, (plan.batch_size, size, size, 3), dtype=torch.uint8)
    if plan.device.startswith("cuda"):
        batch = batch.pin_memory()
    previous = torch.get_num_threads()
    if plan.device == "cpu" and runner.name == "torch":
        torch.set_num_threads(plan.compute_threads)
    try:
        runner.start(batch)()  # warm-up (cudnn autotuning, ORT allocations)
        started, done, pending = time.perf_counter(), 0, None
        while done < n_tiles:  # one batch computing while the last is collected, as embed does
            result = runner.start(batch)
            if pending is not None:
                pending()
            pending, done = result, done + plan.batch_size
        pending()
        return done / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(previous)
        runner.close()


def gflop_per_tile(name: str) -> float:
    """GFLOP of one tile through the backbone, counted by torch's FlopCounterMode on the meta device
    (multiply-adds count 2; no weights are needed, nothing is computed)."""
    from torch.utils.flop_counter import FlopCounterMode

    spec = BACKBONES[name]
    with torch.device("meta"):
        model = spec.builder().eval().requires_grad_(False)
        tile = torch.zeros(1, 3, spec.input_size, spec.input_size)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(tile)
    return counter.get_total_flops() / 1e9


def decode_ms(paths: list[Path], input_size: int) -> float:
    """Milliseconds per tile of what a decode worker does (decode, RGB, resize), on one thread."""
    from feature_extraction.sources import TileTransform, decode_rgb

    transform = TileTransform(input_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    sample = paths[: min(len(paths), 200)]
    started = time.perf_counter()
    for path in sample:
        transform(decode_rgb(path))
    return (time.perf_counter() - started) / len(sample) * 1000.0


class DecodeDataset(Dataset):
    """What an embed worker does to a tile: ``decode_rgb`` then ``TileTransform``, to uint8 HWC."""

    def __init__(self, paths: list[Path], input_size: int) -> None:
        from feature_extraction.sources import TileTransform

        self.paths = paths
        self.transform = TileTransform(input_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        from feature_extraction.sources import decode_rgb

        return torch.from_numpy(self.transform(decode_rgb(self.paths[index])).copy())  # a writable copy


def decode_rate(paths: list[Path], input_size: int, device: str, batch_size: int, num_workers: int) -> float:
    """Tiles/s of the decode workers alone: a DataLoader as embed's (workers, batch size, pinned
    memory on a GPU) that decodes and resizes, with no model behind it."""
    loader = DataLoader(
        DecodeDataset(paths, input_size),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.startswith("cuda"),
    )
    started = time.perf_counter()
    for batch in loader:
        batch.sum()  # touch the pixels, as the copy to the device would
    return len(paths) / (time.perf_counter() - started)


def cohort_paths(train: Path, n_tiles: int) -> list[Path]:
    """The first ``n_tiles`` tiles (sorted) of an existing cohort in the spec's layout (``--cohort``)."""
    from feature_extraction.sources import is_tile_image

    paths = sorted(p for p in train.rglob("*") if p.is_file() and is_tile_image(p.name))
    if not paths:
        raise SystemExit(f"--cohort {train}: no tile images under it; pass a folder with EGFR_positive/ ...")
    return paths[:n_tiles]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def versions() -> str:
    parts = [f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    try:
        import onnxruntime

        parts.append(f"onnxruntime {onnxruntime.__version__}")
    except ImportError:
        pass
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--n_tiles", type=int, default=None, help="tiles (default: 400 on a CPU, 8192 on a GPU)"
    )
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default=DEFAULT_BACKBONE)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--runtime", default="auto")
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument(
        "--num_workers",
        type=int,
        default=None,
        help="decode workers (default: 4 on a CPU, which embed caps; cores - 1 on a GPU)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds of the three measurements; medians are reported"
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where to write the tiles (default: a temp dir)"
    )
    parser.add_argument("--format", choices=("png", "jpeg"), default="png", help="tile format (png)")
    parser.add_argument(
        "--cohort",
        type=Path,
        default=None,
        help="an existing train folder of tiles (the spec's layout) to measure instead of building one",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    parser.add_argument(
        "--write", action="store_true", help="replace the section in --out (default: print only)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    # Printing only is the default now; --no_write stays accepted for old command lines.
    parser.add_argument("--no_write", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    n_tiles = args.n_tiles or (8192 if cuda else 400)
    num_workers = (
        args.num_workers if args.num_workers is not None else (max(1, available_cores() - 1) if cuda else 4)
    )
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_embed_"))
    try:
        train = args.cohort or workdir / "train"
        paths = cohort_paths(train, n_tiles) if args.cohort else build_cohort(train, n_tiles, fmt=args.format)
        n_tiles = len(paths)
        features_dir = workdir / "features"
        backbone = load_backbone(args.backbone, "random")  # speed does not depend on the weight values
        plan = plan_compute(
            args.device,
            args.precision,
            args.runtime,
            args.batch_size,
            num_workers,
            cpu_onnx=backbone.spec.cpu_onnx,
        )
        # --batch_size auto on CUDA: the batch embed itself would fit to the device's free memory
        if plan.batch_auto:
            plan = settle_batch_size(build_runner(backbone, plan, features_dir), plan)
        common = EmbedConfig(
            backbone=args.backbone,
            weights="random",
            max_tiles=0,
            batch_size=plan.batch_size,
            num_workers=num_workers,
            device=args.device,
            precision=args.precision,
            runtime=args.runtime,
            progress=False,
        )
        # Warm-up on a copy of one slide: exports the ONNX graph, fills the page cache.
        warm = workdir / "warm"
        shutil.copytree(paths[0].parent, warm / "EGFR_positive" / "W0")
        (warm / "EGFR_negative").mkdir(parents=True)
        embed_cohort(common, warm, features_dir=features_dir)

        decode = decode_ms(paths, backbone.spec.input_size)
        rates: dict[str, list[float]] = {"end_to_end": [], "limit": [], "decode": [], "peer": []}
        for _ in range(args.repeats):  # interleaved, so a burst of load hits all three alike
            report = embed_cohort(replace(common, overwrite=True), train, features_dir=features_dir)
            rates["end_to_end"].append(report.tiles_per_second)
            rates["limit"].append(limit_rate(backbone, plan, features_dir, n_tiles))
            rates["decode"].append(
                decode_rate(paths, backbone.spec.input_size, plan.device, plan.batch_size, num_workers)
            )
            rates["peer"].append(
                peer_rate(
                    paths, args.backbone, plan.device, plan.batch_size, plan.num_workers, plan.compute_threads
                )
            )
        end_to_end, limit, decode_limit, peer = (
            float(np.median(rates[k])) for k in ("end_to_end", "limit", "decode", "peer")
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    command = "python benchmarks/bench_embed.py" + (
        " " + shlex.join(argv if argv is not None else sys.argv[1:])
        if (argv if argv is not None else sys.argv[1:])
        else ""
    )
    load = load_average()
    spec = backbone.spec
    kind = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG"}.get(paths[0].suffix.lower().lstrip("."), "image")
    tiles = f"H&E-like 256 px {kind}" if args.cohort is None else f"{kind} (from {args.cohort})"
    text = "\n".join(
        [
            SECTION,
            "",
            f"`{command}` on {machine()} ({versions()}; load average {load:.2f} when it finished).",
            "",
            f"Median of {args.repeats} interleaved rounds; {n_tiles} {tiles} tiles, {args.backbone} ({spec.feature_dim}-d) at {spec.input_size} px, "
            f"{gflop_per_tile(args.backbone):.1f} GFLOP per tile, "
            f"{report.runtime} on {report.plan.describe() if report.plan else plan.describe()}.",
            "",
            "| measurement | tiles/s | ratio |",
            "|---|---|---|",
            f"| end to end: `embed_cohort` (decode, resize, backbone, HDF5) | {end_to_end:.1f} | |",
            f"| limit: same runner on tiles in memory | {limit:.1f} | end to end / limit = {end_to_end / limit:.2f} |",
            f"| decode limit: {num_workers} workers decoding and resizing, no model | {decode_limit:.1f} | "
            f"end to end / decode limit = {end_to_end / decode_limit:.2f} |",
            f"| peer: CLAM's recipe (PIL, DataLoader, eager fp32 NCHW) | {peer:.1f} | end to end / peer = {end_to_end / peer:.2f} |",
            "",
            "Every round, tiles/s: "
            + "; ".join(
                f"{k.replace('_', ' ')} {', '.join(f'{v:.1f}' for v in rates[k])}"
                for k in ("end_to_end", "limit", "decode", "peer")
            )
            + ".",
            "",
            f"A decode worker spends {decode:.2f} ms of one core per tile (decode, RGB, resize); at the limit the "
            f"backbone spends {1000.0 / limit * plan.compute_threads:.1f} ms of core time per tile "
            f"({plan.compute_threads} threads x {1000.0 / limit:.1f} ms), so decoding on the same cores costs "
            f"at least {decode / (decode + 1000.0 / limit * plan.compute_threads):.0%} of the limit on this machine."
            if plan.device == "cpu"
            else f"A decode worker spends {decode:.2f} ms of one core per tile (decode, RGB, resize).",
            "",
            "Targets: end to end at least 0.9 x the limit and at least 1.5 x the peer on a 2-core CPU; "
            "at least 3,000 tiles/s end to end for resnet50_trunc on an NVIDIA H200.",
            "",
        ]
    )
    publish(text, SECTION, args.out, args.write)
    if args.json:
        figures = {
            "end_to_end": end_to_end,
            "limit": limit,
            "decode_limit": decode_limit,
            "peer": peer,
            "rounds": rates,
            "decode_ms": decode,
            "n_tiles": n_tiles,
            "format": args.format if args.cohort is None else paths[0].suffix.lstrip("."),
            "backbone": args.backbone,
            "plan": report.plan.describe() if report.plan else plan.describe(),
            "runtime": report.runtime,
            "machine": machine(),
        }
        args.json.write_text(json.dumps(figures, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
