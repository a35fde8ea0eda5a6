"""Steps 2-7 of the prepared device check (``benchmarks/gpu_check.sh`` runs step 1, then this).

    python benchmarks/gpu_check.py --device cuda                  # 8192 PNG + 8192 JPEG tiles
    python benchmarks/gpu_check.py --device cpu --quick --backbone resnet18   # CI: a few hundred

2. builds a cohort of PNG tiles and one of JPEG tiles (``bench_embed.build_cohort``);
3. runs ``bench_embed.py`` on the device for each precision and format: end to end, the forward
   limit, the decode limit and CLAM's recipe, in tiles/s;
4. embeds 64 tiles on the device (fp16 on CUDA) and on the CPU in fp32 (eager torch), and checks
   that every tile's features agree (cosine similarity >= 0.999), naming the worst tile;
5. writes the example cohort, embeds it, trains CLAM for 3 epochs on the device, and checks that
   ``load_checkpoint(..., device=DEVICE)`` puts the model there and that it runs;
6. embeds the example cohort again under ``torchrun --nproc_per_node 1`` and checks that its bags
   equal the plain run's of step 5;
7. prints one compact report, writes it to ``--report`` (and the figures to the same name with
   .json), and exits 1 when any step failed.

Every step runs on a CPU-only machine with ``--device cpu`` (tests/test_gpu_check.py does, in CI);
only the CUDA calls themselves need a GPU. The weights are random (the machine may be offline):
speed and agreement do not depend on the weight values.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

COSINE_MIN = 0.999  # step 4: device features vs CPU fp32 features, every tile
AGREEMENT_TILES = 64


@dataclass
class Step:
    number: int
    name: str
    ok: bool = False
    seconds: float = 0.0
    lines: list[str] = field(default_factory=list)
    figures: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Check:
    device: str
    precisions: tuple[str, ...]
    backbone: str
    runtime: str
    n_tiles: int  # per format, step 2
    bench_tiles: int  # per bench_embed run, step 3
    agreement_tiles: int
    patients: int  # example cohort, train split
    tiles_per_slide: int
    epochs: int
    workdir: Path


def run(command: list[str], what: str, timeout: float = 600) -> str:
    """Run a command of the project (the same interpreter); its output, or RuntimeError naming it."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr).strip().splitlines()[-15:]
        raise RuntimeError(f"{what} exited {result.returncode}:\n    " + "\n    ".join(tail))
    return result.stdout


def step_cohorts(check: Check, step: Step) -> None:
    from bench_embed import build_cohort

    for fmt in ("png", "jpeg"):
        train = check.workdir / f"cohort_{fmt}" / "train"
        paths = build_cohort(train, check.n_tiles, tiles_per_slide=check.tiles_per_slide, fmt=fmt)
        size = sum(p.stat().st_size for p in paths[: min(len(paths), 256)]) / min(len(paths), 256) / 1024
        step.lines.append(f"{len(paths)} {fmt.upper()} tiles, 256 px, {size:.0f} KB each")
    step.ok = True


def step_bench(check: Check, step: Step) -> None:
    step.lines.append(
        "tiles/s | end to end | forward limit | decode limit | CLAM recipe (fp32) | e2e / min(limits)"
    )
    for precision in check.precisions:
        for fmt in ("png", "jpeg"):
            out = check.workdir / f"bench_{precision}_{fmt}.json"
            command = [sys.executable, str(HERE / "bench_embed.py"), "--device", check.device]
            command += ["--precision", precision, "--runtime", check.runtime, "--backbone", check.backbone]
            command += ["--cohort", str(check.workdir / f"cohort_{fmt}" / "train"), "--repeats", "1"]
            command += ["--n_tiles", str(check.bench_tiles), "--json", str(out)]
            command += ["--workdir", str(check.workdir / f"bench_{precision}_{fmt}")]
            run(command, f"bench_embed.py ({precision}, {fmt})")
            figures = json.loads(out.read_text(encoding="utf-8"))
            bound = min(figures["limit"], figures["decode_limit"])
            step.figures[f"{precision}_{fmt}"] = figures
            step.lines.append(
                f"{precision} {fmt.upper():4s} | {figures['end_to_end']:.0f} | {figures['limit']:.0f} | "
                f"{figures['decode_limit']:.0f} | {figures['peer']:.0f} | {figures['end_to_end'] / bound:.2f}"
            )
    step.lines.append(f"plan: {figures['plan']}; {figures['runtime']}")
    step.ok = True


def _subset_cohort(source: Path, target: Path, n_tiles: int) -> Path:
    """A cohort of the first ``n_tiles`` tiles of ``source`` (sorted), in the spec's layout."""
    tiles = sorted(p for p in source.rglob("*.png"))[:n_tiles]
    for path in tiles:
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)
    for folder in ("EGFR_positive", "EGFR_negative"):
        (target / folder).mkdir(parents=True, exist_ok=True)
    return target


def _bags(cache_dir: Path) -> dict:
    from feature_extraction.bags import read_bag

    return {path.stem: read_bag(path) for path in sorted(cache_dir.glob("*.h5"))}


def step_agreement(check: Check, step: Step) -> None:
    from feature_extraction.embed import EmbedConfig, embed_cohort

    data = _subset_cohort(
        check.workdir / "cohort_png" / "train", check.workdir / "agree" / "train", check.agreement_tiles
    )
    common = EmbedConfig(
        backbone=check.backbone, weights="random", max_tiles=0, progress=False, num_workers=0
    )
    precision = "fp16" if check.device.startswith("cuda") else "auto"
    runs = {}
    for name, device, prec, runtime in (
        ("device", check.device, precision, check.runtime),
        ("cpu_fp32", "cpu", "fp32", "torch"),
    ):
        config = replace(common, device=device, precision=prec, runtime=runtime)
        report = embed_cohort(config, data, features_dir=check.workdir / "agree" / name)
        runs[name] = (report, _bags(report.cache_dir))
    (device_report, device_bags), (_, cpu_bags) = runs["device"], runs["cpu_fp32"]
    worst, worst_tile, n = 1.0, "", 0
    for slide, bag in cpu_bags.items():
        other = device_bags[slide]
        assert other.tile_names == bag.tile_names, f"{slide}: the two runs embedded different tiles"
        a, b = other.features.astype(np.float64), bag.features.astype(np.float64)
        cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        n += len(cosine)
        if cosine.min() < worst:
            worst, worst_tile = float(cosine.min()), f"{slide}/{bag.tile_names[int(cosine.argmin())]}"
    step.figures = {"tiles": n, "worst_cosine": worst, "worst_tile": worst_tile}
    plan = device_report.plan.describe() if device_report.plan else check.device
    step.lines.append(f"{n} tiles, {plan} ({device_report.runtime}) vs cpu fp32 torch")
    step.lines.append(f"worst cosine {worst:.6f} at {worst_tile} (needs >= {COSINE_MIN})")
    step.ok = n == check.agreement_tiles and worst >= COSINE_MIN


def _embed_command(check: Check, data: Path, features: Path) -> list[str]:
    return [
        "-m", "feature_extraction.embed", "--data_dir", str(data), "--features_dir", str(features),
        "--backbone", check.backbone, "--weights", "random", "--device", check.device,
        "--runtime", check.runtime, "--quiet",
    ]  # fmt: skip


def _cache_dir(features: Path) -> Path:
    found = sorted(path.parent for path in features.glob("*/cache.json"))
    if len(found) != 1:
        raise RuntimeError(f"expected one feature cache under {features}, found {len(found)}")
    return found[0]


def step_train(check: Check, step: Step) -> None:
    import torch

    from clam.checkpoints import model_from_checkpoint
    from clam.train import load_checkpoint
    from feature_extraction.bags import read_bag

    cohort = check.workdir / "example"
    run(
        [sys.executable, "-m", "feature_extraction.example_cohort", "--out", str(cohort), "--split", "train"]
        + [
            "--train_patients",
            str(check.patients),
            "--tiles_per_slide",
            str(check.tiles_per_slide),
            "--force",
        ],
        "example_cohort",
    )
    run([sys.executable, *_embed_command(check, cohort / "train", check.workdir / "features_plain")], "embed")
    cache = _cache_dir(check.workdir / "features_plain")
    runs = check.workdir / "runs"
    run(
        [
            sys.executable,
            "-m",
            "clam.train",
            "--data_dir",
            str(cohort / "train"),
            "--features_dir",
            str(cache),
        ]
        + ["--backbone", check.backbone, "--weights", "random", "--num_epochs", str(check.epochs)]
        + ["--device", check.device, "--output_dir", str(runs), "--no_progress"],
        "clam.train",
    )
    run_dir = sorted(runs.glob("run_*"))[-1]
    checkpoint = run_dir / "best_model.pt"
    epochs = sorted(run_dir.glob("checkpoint_epoch_*.pt"))
    model, _ = model_from_checkpoint(checkpoint, "cpu")
    optimizer = torch.optim.Adam(model.parameters())
    model, optimizer, epoch, loss = load_checkpoint(checkpoint, model, optimizer, device=check.device)
    where = {p.device.type for p in model.parameters()}
    bag = read_bag(next(iter(sorted(cache.glob("*.h5")))))
    with torch.inference_mode():
        output = model.eval()(torch.from_numpy(bag.features).to(check.device))
    step.lines.append(
        f"{len(list(cache.glob('*.h5')))} bags, {check.epochs} epochs on {check.device} in {run_dir.name}: "
        f"{len(epochs)} epoch checkpoints; best_model.pt epoch {epoch}, loss {loss:.4f}"
    )
    step.lines.append(f"load_checkpoint(..., device={check.device!r}): parameters on {sorted(where)}")
    step.figures = {"run_dir": str(run_dir), "epochs_saved": len(epochs), "epoch": epoch, "loss": loss}
    device_type = torch.device(check.device).type
    step.ok = where == {device_type} and len(epochs) == check.epochs and output is not None


def _torchrun() -> list[str]:
    """torchrun beside this python, else its module (what the torchrun script runs)."""
    beside = Path(sys.executable).with_name("torchrun")
    return [str(beside)] if beside.is_file() else [sys.executable, "-m", "torch.distributed.run"]


def step_torchrun(check: Check, step: Step) -> None:
    data = check.workdir / "example" / "train"
    features = check.workdir / "features_torchrun"
    command = [*_torchrun(), "--standalone", "--nproc_per_node", "1", *_embed_command(check, data, features)]
    run(command, "torchrun embed")
    plain, ranked = _bags(_cache_dir(check.workdir / "features_plain")), _bags(_cache_dir(features))
    # Eager CPU runs repeat to the last bit; a GPU's kernels may not (cuDNN's choice, fp16 sums).
    rtol, atol = (1e-4, 1e-5) if check.device == "cpu" else (1e-3, 1e-3)
    worst = 0.0
    problems = [] if sorted(plain) == sorted(ranked) else [f"bags differ: {sorted(set(plain) ^ set(ranked))}"]
    for slide in sorted(set(plain) & set(ranked)):
        a, b = plain[slide], ranked[slide]
        if a.tile_names != b.tile_names or not np.array_equal(a.coords, b.coords):
            problems.append(f"{slide}: other tiles or coordinates")
        elif not np.allclose(
            b.features, a.features, rtol=rtol, atol=atol * max(1.0, np.abs(a.features).max())
        ):
            problems.append(f"{slide}: features differ")
        if a.features.shape == b.features.shape:
            worst = max(worst, float(np.abs(a.features - b.features).max(initial=0.0)))
    step.lines.append(
        f"{len(ranked)} bags vs {len(plain)} of the plain run; largest feature difference {worst:.2e}"
    )
    step.lines.extend(problems[:5])
    step.figures = {"bags": len(ranked), "max_abs_difference": worst}
    step.ok = not problems and len(plain) > 0


STEPS: list[tuple[int, str, Callable[[Check, Step], None]]] = [
    (2, "cohorts", step_cohorts),
    (3, "bench_embed", step_bench),
    (4, "features agree with CPU fp32", step_agreement),
    (5, "CLAM trains on the device, load_checkpoint", step_train),
    (6, "torchrun --nproc_per_node 1", step_torchrun),
]


def report_text(check: Check, steps: list[Step], install: str) -> str:
    import torch
    from report import machine

    lines = [
        f"gpu_check on {machine()}; torch {torch.__version__}, cuda {torch.version.cuda}; "
        f"device {check.device}, backbone {check.backbone}, random weights",
        f"[{'ok' if install else '--'}] 1 install: {install or 'not reported'}",
    ]
    for step in steps:
        lines.append(f"[{'ok' if step.ok else 'FAILED'}] {step.number} {step.name} ({step.seconds:.0f} s)")
        lines.extend(f"      {line}" for line in step.lines)
    failed = [str(step.number) for step in steps if not step.ok]
    lines.append("RESULT: " + ("all steps passed" if not failed else f"FAILED steps {', '.join(failed)}"))
    return "\n".join(lines) + "\n"


def build_check(args: argparse.Namespace) -> Check:
    cuda = args.device.startswith("cuda")
    precisions = (
        tuple(args.precisions.split(",")) if args.precisions else (("fp16", "bf16") if cuda else ("fp32",))
    )
    quick = args.quick
    return Check(
        device=args.device,
        precisions=precisions,
        backbone=args.backbone,
        runtime=args.runtime,
        n_tiles=args.n_tiles or (128 if quick else 8192),
        bench_tiles=args.bench_tiles or (16 if quick else 8192),
        agreement_tiles=16 if quick else AGREEMENT_TILES,
        patients=6 if quick else 36,
        tiles_per_slide=8 if quick else 24,
        epochs=3,
        workdir=args.workdir,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="a few hundred tiles (CI, on a CPU)")
    parser.add_argument("--backbone", default="resnet50_trunc")
    parser.add_argument("--runtime", default="auto", help="embed's --runtime (auto, torch, onnxruntime)")
    parser.add_argument(
        "--precisions", default=None, help="step 3, comma-separated (fp16,bf16 on CUDA; fp32 on a CPU)"
    )
    parser.add_argument("--n_tiles", type=int, default=None, help="tiles per format (8192; --quick 128)")
    parser.add_argument(
        "--bench_tiles", type=int, default=None, help="tiles per bench_embed run (8192; --quick 32)"
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/gpu_check"))
    parser.add_argument(
        "--report", type=Path, default=None, help="report file (WORKDIR/gpu_check_report.txt)"
    )
    parser.add_argument("--install", default="", help="step 1's line of the report (gpu_check.sh passes it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check = build_check(args)
    check.workdir.mkdir(parents=True, exist_ok=True)
    steps = []
    for number, name, function in STEPS:
        step = Step(number, name)
        started = time.perf_counter()
        try:
            function(check, step)
        except Exception as error:  # noqa: BLE001 - a failed step is reported, and the next ones still run
            step.ok = False
            step.lines.append(f"{type(error).__name__}: {error}")
            step.lines.extend(traceback.format_exc().strip().splitlines()[-3:])
        step.seconds = time.perf_counter() - started
        steps.append(step)
        print(f"step {number} {name}: {'ok' if step.ok else 'FAILED'} ({step.seconds:.0f} s)", flush=True)
    text = report_text(check, steps, args.install)
    report = args.report or check.workdir / "gpu_check_report.txt"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text, encoding="utf-8")
    figures = {f"step{s.number}": {"ok": s.ok, "seconds": s.seconds, **s.figures} for s in steps}
    report.with_suffix(".json").write_text(json.dumps(figures, indent=2, default=str), encoding="utf-8")
    print(text + f"report written to {report}")
    return 0 if all(step.ok for step in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
