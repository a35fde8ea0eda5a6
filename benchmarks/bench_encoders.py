"""Speed of several encoders in one run: the ``## Encoders`` section of docs/benchmarks.md.

    python benchmarks/bench_encoders.py --write      # the four default encoders; writes the page
    python benchmarks/bench_encoders.py              # the same, printed only
    python benchmarks/bench_encoders.py --backbones ctranspath:16,gigapath:4   # NAME[:TILES], printed only

The section is printed to stdout; only ``--write`` replaces it in docs/benchmarks.md (or ``--out``).

For each encoder of ``--backbones`` (``NAME:TILES``, tiles per encoder, so a ViT-g stays within a
few minutes on a CPU), with random weights (speed does not depend on their values) and the runtime
``--runtime`` picks for it, this measures what ``benchmarks/bench_embed.py`` measures, with its
functions, minus CLAM's recipe:

- end to end: ``embed_cohort`` on H&E-like 256 px PNG tiles, timed over its embedding pass;
- limit: the same runner, batch size and threads on uint8 tiles already in memory;
- GFLOP per tile, counted on the meta device;
- seconds: the wall time of the encoder's whole row (building the tiles, loading the model twice,
  the warm-up, every round and the count).
"""

from __future__ import annotations

import argparse
import gc
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_embed import build_cohort, gflop_per_tile, limit_rate, versions  # noqa: E402
from report import load_average, machine, publish  # noqa: E402

from feature_extraction.backbones import BACKBONES, load_backbone  # noqa: E402
from feature_extraction.embed import EmbedConfig, embed_cohort  # noqa: E402
from feature_extraction.runtime import plan_compute  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Encoders"
DEFAULT_BACKBONES = "resnet50_trunc:64,ctranspath:64,uni_v1:16,h_optimus_0:8"


@dataclass(frozen=True)
class Row:
    name: str
    tiles: int
    feature_dim: int
    input_size: int
    gflop: float
    runtime: str
    batch_size: int
    plan: str  # device, precision, batch, workers, threads
    end_to_end: list[float]
    limit: list[float]
    seconds: float

    def median(self, kind: str) -> float:
        return float(np.median(getattr(self, kind)))


def parse_backbones(text: str) -> list[tuple[str, int]]:
    """``"a:64,b:8,c"`` -> [("a", 64), ("b", 8), ("c", 16)]; an unknown name or a bad count is an error."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, count = item.partition(":")
        if name not in BACKBONES:
            raise argparse.ArgumentTypeError(
                f"unknown backbone {name!r}; use one of {', '.join(sorted(BACKBONES))}"
            )
        if count and (not count.isdigit() or int(count) < 1):
            raise argparse.ArgumentTypeError(f"{item!r}: the tile count must be a positive integer")
        pairs.append((name, int(count) if count else 16))
    if not pairs:
        raise argparse.ArgumentTypeError("name at least one backbone")
    return pairs


def measure(name: str, n_tiles: int, args: argparse.Namespace, workdir: Path) -> Row:
    """One encoder's row: ``args.repeats`` interleaved rounds of end to end and limit."""
    started = time.perf_counter()
    paths = build_cohort(workdir / "train", n_tiles)
    features_dir = workdir / "features"
    backbone = load_backbone(name, "random")
    plan = plan_compute(
        args.device,
        args.precision,
        args.runtime,
        args.batch_size,
        args.num_workers,
        cpu_onnx=backbone.spec.cpu_onnx,
    )
    config = EmbedConfig(
        backbone=name,
        weights="random",
        max_tiles=0,
        batch_size=plan.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        precision=args.precision,
        runtime=args.runtime,
        progress=False,
    )
    # Warm-up on a copy of one batch of tiles: exports the ONNX graph, fills the page cache.
    warm = workdir / "warm" / "EGFR_positive" / "W0"
    warm.mkdir(parents=True)
    for path in paths[: plan.batch_size]:
        shutil.copy(path, warm / path.name)
    (workdir / "warm" / "EGFR_negative").mkdir()
    embed_cohort(config, workdir / "warm", features_dir=features_dir)

    end_to_end, limit, runtime, described = [], [], plan.runtime, plan.describe()
    for _ in range(args.repeats):  # interleaved, so a burst of load hits both alike
        report = embed_cohort(replace(config, overwrite=True), workdir / "train", features_dir=features_dir)
        end_to_end.append(report.tiles_per_second)
        runtime = report.runtime
        described = report.plan.describe() if report.plan else described
        limit.append(limit_rate(backbone, plan, features_dir, n_tiles))
    spec = backbone.spec
    del backbone
    gc.collect()  # the next encoder may need the memory (a ViT-g is 4.5 GB in fp32)
    gflop = gflop_per_tile(name)
    return Row(
        name=name,
        tiles=n_tiles,
        feature_dim=spec.feature_dim,
        input_size=spec.input_size,
        gflop=gflop,
        runtime=runtime,
        batch_size=plan.batch_size,
        plan=described,
        end_to_end=end_to_end,
        limit=limit,
        seconds=time.perf_counter() - started,
    )


def section(rows: list[Row], command: str, repeats: int, runtime: str) -> str:
    load = load_average()
    lines = [
        SECTION,
        "",
        f"`{command}` on {machine()} ({versions()}; load average {load:.2f} when it finished).",
        "",
        f"Random weights (speed does not depend on their values), H&E-like 256 px PNG tiles; "
        f"each encoder on the runtime and batch size `--runtime {runtime}` picks for it; "
        + (f"median of {repeats} interleaved rounds" if repeats > 1 else "one round")
        + " per encoder (`--repeats`). End to end: `embed_cohort`, "
        "decode, resize, backbone and HDF5 writes; limit: the same runner on tiles already in memory; "
        "GFLOP/s: GFLOP per tile x the limit; seconds: the row's whole wall time (tiles, loading, "
        "warm-up, rounds). Every row, and so every ratio, comes from this one run on the same machine: "
        "small tile counts, a rough guide, not a ranking to the last digit.",
        "",
        "| `--backbone` | input, dim | GFLOP/tile | tiles | runtime, batch | end to end tiles/s "
        "| limit tiles/s | end to end / limit | GFLOP/s at the limit | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        end_to_end, limit = row.median("end_to_end"), row.median("limit")
        lines.append(
            f"| `{row.name}` | {row.input_size} px, {row.feature_dim}-d | {row.gflop:.1f} | {row.tiles} "
            f"| {row.runtime}, {row.batch_size} | {end_to_end:.2f} | {limit:.2f} | {end_to_end / limit:.2f} "
            f"| {row.gflop * limit:.0f} | {row.seconds:.0f} |"
        )
    lines += ["", "Plans: " + "; ".join(f"`{row.name}` {row.plan}" for row in rows) + "."]
    if len(rows) > 1:
        base = rows[0]
        lines += [
            "",
            f"In this run `{base.name}`'s limit is "
            + ", ".join(
                f"{base.median('limit') / row.median('limit'):.3g} x `{row.name}`'s" for row in rows[1:]
            )
            + ".",
        ]
    lines += [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--backbones",
        type=parse_backbones,
        default=DEFAULT_BACKBONES,
        help=f"NAME[:TILES],... (tiles default to 16; default: {DEFAULT_BACKBONES})",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--runtime", default="auto")
    parser.add_argument(
        "--batch_size", type=int, default=None, help="default: what the runtime picks per encoder"
    )
    parser.add_argument(
        "--num_workers", type=int, default=4, help="decode workers (embed caps them on a CPU)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="rounds per encoder; medians are reported")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where to write the tiles (default: a temp dir)"
    )
    parser.add_argument(
        "--write", action="store_true", help="replace the section in --out (default: print only)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)

    rows = []
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_encoders_"))
    try:
        for index, (name, n_tiles) in enumerate(args.backbones):
            rows.append(measure(name, n_tiles, args, root / f"{index}_{name}"))
            print(
                f"{name}: {rows[-1].median('end_to_end'):.2f} tiles/s end to end", file=sys.stderr, flush=True
            )
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)

    given = argv if argv is not None else sys.argv[1:]
    command = "python benchmarks/bench_encoders.py" + (" " + shlex.join(given) if given else "")
    text = section(rows, command, args.repeats, args.runtime)
    publish(text, SECTION, args.out, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
