"""Training on a cache larger than memory: the ``## Training at scale`` section of docs/benchmarks.md.

    python benchmarks/bench_train_scale.py --write   # 2,000 bags x 4,000 x 1024 float32 (33 GB) in /tmp/train-scale
    python benchmarks/bench_train_scale.py --quick   # a tiny cache in a temporary folder, printed only (CI)

The section is printed to stdout; only ``--write`` replaces it in docs/benchmarks.md (or ``--out``)
and saves the curve beside it (``img/scale_train.png``).

The synthetic cache is written once, in the real bag format (``feature_extraction.bags.write_bag``),
and reused while its cache.json says it is complete: one random block of instances, rolled and
scaled per bag, a weak signal in a third of a positive bag's instances. Smaller caches (the curve,
the float32 side of the float16 comparison) are hard links to its first bags; the float16 cache
holds the same features as those bags. Measured, each in its own child process:

- raw read: every bag file read sequentially with plain ``readinto``, after dropping its pages from
  the page cache (``posix_fadvise(DONTNEED)`` on these files only): the disk's cold rate;
- loader pass: one pass of the training DataLoader over every bag (streamed, its workers), cold;
- training: ``clam.train.train`` with ``--max_tiles 0`` (every instance), the bags' pages dropped
  before each epoch when streaming; peak resident set of the training process and of its largest
  loader worker (``getrusage``); epoch = a training and a validation pass, as in config.json;
- floor: the forward and backward FLOPs of the epoch at the measured fp32 matrix-multiply rate.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import load_average, machine, publish  # noqa: E402

SECTION = "## Training at scale"
IMAGE = Path("img") / "scale_train.png"
GIB = 2**30
FULL = {"n_bags": 2000, "n_instances": 4000, "feature_dim": 1024, "half_bags": 300, "curve": "60,125,250,500"}
QUICK = {"n_bags": 8, "n_instances": 64, "feature_dim": 32, "half_bags": 4, "curve": "2,4"}


# ---------------------------------------------------------------- the caches


def bag_features(base: np.ndarray, index: int, label: int) -> np.ndarray:
    """Bag ``index``'s instances: the shared block rolled and scaled per bag (cheap, reproducible)."""
    rng = np.random.default_rng(index)
    features = np.roll(base, int(rng.integers(len(base))), axis=0)
    features *= rng.uniform(0.9, 1.1, size=base.shape[1]).astype(np.float32)
    if label:
        features[: len(base) // 3, : max(1, base.shape[1] // 16)] += 0.5
    return features


def cache_json(n_bags: int, n_instances: int, feature_dim: int, dtype: str) -> dict:
    key = f"bench-scale-{n_instances}x{feature_dim}-{dtype}"
    return {
        "cache_key": key,
        "backbone": "benchmark",
        "weights": "random",
        "feature_dim": feature_dim,
        "feature_dtype": dtype,
        "max_tiles": 0,
        "seed": 0,
        "bench": {"n_bags": n_bags, "n_instances": n_instances},
    }


def finish_cache(cache_dir: Path, config: dict) -> Path:
    from feature_extraction.cache import CACHE_JSON, collect_manifest
    from feature_extraction.manifest import write_manifest

    os.sync()  # dirty pages cannot be dropped: the cold reads below need them on disk
    (cache_dir / CACHE_JSON).write_text(json.dumps({**config, "bench": "incomplete"}))
    write_manifest(cache_dir, collect_manifest(cache_dir))
    (cache_dir / CACHE_JSON).write_text(json.dumps(config))  # last: marks the cache complete
    return cache_dir


def is_complete(cache_dir: Path, config: dict) -> bool:
    path = cache_dir / "cache.json"
    return path.is_file() and json.loads(path.read_text()) == config


def make_cache(
    cache_dir: Path, n_bags: int, n_instances: int, feature_dim: int, dtype: str = "float32"
) -> Path:
    """The synthetic cache (reused when complete): ``n_bags`` bags of ``n_instances`` x ``feature_dim``."""
    from feature_extraction.bags import bag_path, write_bag

    config = cache_json(n_bags, n_instances, feature_dim, dtype)
    if is_complete(cache_dir, config):
        return cache_dir
    need = n_bags * n_instances * feature_dim * np.dtype(dtype).itemsize
    cache_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache_dir).free
    if need > free - 2 * GIB:
        sys.exit(f"{cache_dir}: the cache needs {need / GIB:.1f} GiB, {free / GIB:.1f} GiB free")
    base = np.abs(np.random.default_rng(0).normal(0.5, 0.5, (n_instances, feature_dim))).astype(np.float32)
    coords, names = np.zeros((n_instances, 2), np.int64), [str(j) for j in range(n_instances)]
    for i in range(n_bags):
        label = i % 2
        slide_id = f"{'EGFR_positive' if label else 'EGFR_negative'}__S{i:05d}"
        attrs = {"slide_id": slide_id, "patient_id": f"S{i:05d}", "class_folder": slide_id.split("__")[0]}
        attrs.update(label=label, split="train", cache_key=config["cache_key"])
        write_bag(bag_path(cache_dir, slide_id), bag_features(base, i, label), coords, names, attrs, dtype)
    return finish_cache(cache_dir, config)


def linked_cache(source: Path, cache_dir: Path, n_bags: int) -> Path:
    """A cache of ``source``'s first ``n_bags`` bags, as hard links (no disk space)."""
    config = json.loads((source / "cache.json").read_text())
    config["bench"] = {**config["bench"], "n_bags": n_bags}
    if is_complete(cache_dir, config):
        return cache_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    for path in bag_files(source)[:n_bags]:
        if not (cache_dir / path.name).exists():
            os.link(path, cache_dir / path.name)
    return finish_cache(cache_dir, config)


def bag_files(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("*.h5"), key=lambda p: p.name.split("__")[-1])


def drop_pages(paths: list[Path]) -> None:
    """Evict these files from the page cache, so that the next read comes from the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---------------------------------------------------------------- measurements


def raw_read(cache_dir: Path) -> dict:
    """Seconds to read every bag file sequentially, cold, with plain reads into one buffer."""
    paths = bag_files(cache_dir)
    drop_pages(paths)
    buffer = bytearray(16 * 2**20)
    total, started = 0, time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while n := handle.readinto(buffer):
                total += n
    return {"seconds": time.perf_counter() - started, "bytes": total}


def run_child(kind: str, cache_dir: Path, workdir: Path, epochs: int = 1, in_memory: str = "no") -> dict:
    """Run ``--child kind`` in a fresh process; its measurements as a dict."""
    out = workdir / f"child-{kind}-{os.getpid()}.json"
    command = [sys.executable, __file__, "--child", kind, "--cache_dir", str(cache_dir)]
    command += ["--workdir", str(workdir), "--epochs", str(epochs), "--in_memory", in_memory]
    subprocess.run(command + ["--result", str(out)], check=True, cwd=ROOT)
    result = json.loads(out.read_text())
    out.unlink()
    return result


def peak_rss() -> dict:
    return {
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def child_loader(args) -> dict:
    """One pass of the training loader (streamed, as training plans it) over every bag, cold."""
    import torch

    from clam.bag_dataset import BagDataset
    from clam.data import records_from_cache
    from clam.epochs import make_loader
    from clam.loading import plan_loading
    from clam.train_config import TrainConfig

    records = records_from_cache(args.cache_dir, None, "train")
    size = sum(p.stat().st_size for p in bag_files(args.cache_dir))
    plan = plan_loading(size, "no", TrainConfig().num_workers, torch.device("cpu"))
    loader = make_loader(
        BagDataset(records, in_memory=False), TrainConfig(max_tiles=0), plan, torch.device("cpu"), 1, True
    )
    drop_pages(bag_files(args.cache_dir))
    started, rows = time.perf_counter(), 0
    for batch in loader:
        rows += batch.features.shape[1]
    return {"seconds": time.perf_counter() - started, "rows": rows, "loader": plan.reason, **peak_rss()}


def child_train(args) -> dict:
    """``clam.train`` on the cache; streamed bags are dropped from the page cache before each epoch."""
    import clam.training as training
    from clam.train import TrainConfig, train

    paths, marks = bag_files(args.cache_dir), {}
    one_epoch = training.train_one_epoch

    def cold_epoch(*a, **k):
        marks.setdefault("first_epoch", time.perf_counter())
        if args.in_memory == "no":
            drop_pages(paths)
        return one_epoch(*a, **k)

    training.train_one_epoch = cold_epoch
    started = time.perf_counter()
    run = train(
        TrainConfig(
            features_dir=str(args.cache_dir),
            max_tiles=0,
            num_epochs=args.epochs,
            in_memory=args.in_memory,
            device="cpu",
            output_dir=str(args.workdir / "runs"),
            progress=False,
        )
    )
    config = json.loads((run / "config.json").read_text())
    shutil.rmtree(run)
    return {
        "epoch_seconds": [row["seconds"] for row in config["metrics"]],
        "setup_seconds": marks["first_epoch"] - started,
        "val_auc": config["metrics"][-1].get("val_auc"),
        "threads": config["loader"]["torch_threads"],
        "workers": config["loader"]["num_workers"],
        "loader": config["loader"]["reason"],
        **peak_rss(),
    }


def epoch_flops(n_train: int, n_val: int, feature_dim: int) -> float:
    """Forward + backward FLOPs of CLAM-SB small over ``n_train`` training and ``n_val`` validation
    instances (matrix multiplies only; the first layer needs no input gradient)."""
    first = 2 * feature_dim * 512
    rest = 2 * (2 * 512 * 256 + 256 + 512 * 4)
    return n_train * (2 * first + 3 * rest) + n_val * (first + rest)


def floor_seconds(cache_dir: Path, n_instances: int, feature_dim: int, threads: int) -> float:
    """The epoch's arithmetic at the matrix-multiply rate measured with the training's threads."""
    import torch
    from bench_train import matmul_rate

    from clam.data import records_from_cache
    from clam.splits import train_val_split
    from clam.train_config import TrainConfig

    defaults = TrainConfig()
    split = train_val_split(
        records_from_cache(cache_dir, None, "train"), defaults.val_fraction, defaults.seed
    )
    torch.set_num_threads(threads)
    flops = epoch_flops(len(split.train) * n_instances, len(split.val) * n_instances, feature_dim)
    return flops / matmul_rate(n_instances, feature_dim, torch.device("cpu"))


# ---------------------------------------------------------------- the run


def measure(args, root: Path) -> dict:
    """Every figure of the section; the caches under ``root`` (kept), runs in ``root/work``."""
    work = root / "work"
    work.mkdir(parents=True, exist_ok=True)
    shape = (args.n_instances, args.feature_dim)
    big = make_cache(root / f"f32-{args.n_bags}", args.n_bags, *shape)
    half = make_cache(root / f"f16-{args.half_bags}", args.half_bags, *shape, dtype="float16")
    same = linked_cache(big, root / f"f32-{args.half_bags}", args.half_bags)
    results: dict = {"bytes": {}, "read": {}, "loader": {}, "train": {}, "curve": []}
    for name, cache in (("big", big), ("f32", same), ("f16", half)):
        print(f"{name}: raw read, loader pass, training ...", flush=True)
        results["read"][name] = raw_read(cache)
        results["bytes"][name] = results["read"][name]["bytes"]
        results["loader"][name] = run_child("loader", cache, work)
        results["train"][name] = run_child("train", cache, work, args.epochs)
    threads = results["train"]["big"]["threads"]
    results["floor"] = {
        name: floor_seconds(cache, *shape, threads) for name, cache in (("big", big), ("f32", same))
    }
    for n_bags in args.curve_bags:
        cache = linked_cache(big, root / f"f32-{n_bags}", n_bags)
        size = sum(p.stat().st_size for p in bag_files(cache))
        modes = ("no", "yes") if size <= args.max_in_memory_gib * GIB else ("no",)
        for mode in modes:
            print(f"curve: {n_bags} bags, in memory {mode} ...", flush=True)
            point = run_child("train", cache, work, args.epochs, mode)
            results["curve"].append({"bags": n_bags, "bytes": size, "in_memory": mode == "yes", **point})
    big_point = {"bags": args.n_bags, "bytes": results["bytes"]["big"], "in_memory": False}
    results["curve"].append({**big_point, **results["train"]["big"]})
    return results


# ---------------------------------------------------------------- report


def epoch(result: dict) -> float:
    return statistics.median(result["epoch_seconds"])


def section(args, r: dict, loads: tuple[float, float]) -> str:
    big, gb = r["bytes"]["big"], lambda b: b / 1e9  # noqa: E731
    read, floor, train = r["read"]["big"]["seconds"], r["floor"]["big"], epoch(r["train"]["big"])
    bound = max(read, floor)
    command = " ".join(["python", "benchmarks/bench_train_scale.py"] + [shlex.quote(a) for a in args.argv])
    lines = [
        SECTION,
        "",
        f"`{command}` on {machine()}, 24 GiB of memory, {time.strftime('%Y-%m-%d')}; load average "
        f"{loads[0]:.2f} before, {loads[1]:.2f} after (other work shared the machine: read the seconds as rough). "
        f"A synthetic cache of {args.n_bags} bags x {args.n_instances} instances x {args.feature_dim} "
        f"float32, {gb(big):.1f} GB on disk (the bag format of `feature_extraction.bags`); "
        f"`clam.train --max_tiles 0` (every instance), CLAM-SB small, otherwise the defaults; "
        f"{args.epochs} epoch(s) per run, an epoch being a training and a validation pass over every bag.",
        "",
        "Cold reads throughout: before each read pass and each streamed epoch the bag files' pages are "
        "dropped from the page cache (`posix_fadvise(DONTNEED)`), so every figure below is in the "
        "regime of a cache larger than memory, float16 included.",
        "",
        f"| {gb(big):.0f} GB cache, streamed | seconds | GB/s | x raw read | x floor | peak RSS (MiB) |",
        "|---|---|---|---|---|---|",
        f"| raw sequential read | {read:.1f} | {gb(big) / read:.2f} | 1.00 | {read / floor:.2f} | |",
        _row(
            "loader pass (DataLoader, workers)",
            r["loader"]["big"]["seconds"],
            big,
            read,
            floor,
            r["loader"]["big"],
        ),
        _row("training epoch", train, big, read, floor, r["train"]["big"]),
        f"| compute floor | {floor:.1f} | | {floor / read:.2f} | 1.00 | |",
        "",
        f"Training epoch / max(raw read, floor) = {train / bound:.2f} (target <= 1.3 when I/O-bound): this "
        f"epoch is {'I/O' if read >= floor else 'compute'}-bound on this machine (raw read {read:.0f} s, "
        f"floor {floor:.0f} s). Setup before the first epoch (validating every bag, the feature statistics, "
        f"the pooled baseline: three streamed passes) took {r['train']['big']['setup_seconds']:.0f} s. "
        f"{r['train']['big']['loader']}.",
        "",
        *half_table(args, r),
        "",
        *curve_table(r),
        "",
        f"![Peak RSS and epoch time against cache size]({IMAGE.as_posix()})",
        "",
        f"The curve: `{command}` (the table above; --write saves the figure).",
    ]
    return "\n".join(lines) + "\n"


def _row(label: str, seconds: float, size: int, read: float, floor: float, result: dict) -> str:
    rss = f"{result['peak_rss_mib']:.0f} (+ worker {result['worker_rss_mib']:.0f})"
    return (
        f"| {label} | {seconds:.1f} | {size / 1e9 / seconds:.2f} | {seconds / read:.2f} | "
        f"{seconds / floor:.2f} | {rss} |"
    )


def half_table(args, r: dict) -> list[str]:
    f32, f16 = r["bytes"]["f32"], r["bytes"]["f16"]
    rows = [
        ("raw sequential read", r["read"]["f32"]["seconds"], r["read"]["f16"]["seconds"]),
        ("loader pass", r["loader"]["f32"]["seconds"], r["loader"]["f16"]["seconds"]),
        ("training epoch", epoch(r["train"]["f32"]), epoch(r["train"]["f16"])),
    ]
    floor = r["floor"]["f32"]
    auc = [r["train"][k]["val_auc"] for k in ("f32", "f16")]
    return [
        f"float16 against float32, the same first {args.half_bags} bags ({f32 / 1e9:.1f} GB and "
        f"{f16 / 1e9:.1f} GB on disk; compute floor {floor:.1f} s per epoch):",
        "",
        "| cold | float32 (s) | float16 (s) | float16 / float32 |",
        "|---|---|---|---|",
        *[f"| {label} | {a:.1f} | {b:.1f} | {b / a:.2f} |" for label, a, b in rows],
        "",
        f"Validation AUC after the epoch: float32 {_auc(auc[0])}, float16 {_auc(auc[1])}. Target: float16 "
        "half the time when I/O-bound (the read and loader rows); a compute-bound epoch keeps its compute.",
    ]


def _auc(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def curve_table(r: dict) -> list[str]:
    lines = [
        "| bags | cache (GB) | bags reach the model | epoch (s) | s per GB | setup (s) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in sorted(r["curve"], key=lambda p: (p["bytes"], p["in_memory"])):
        gb = p["bytes"] / 1e9
        how = "in memory" if p["in_memory"] else f"streamed, {p['workers']} worker(s)"
        lines.append(
            f"| {p['bags']} | {gb:.1f} | {how} | {epoch(p):.1f} | {epoch(p) / gb:.1f} | "
            f"{p['setup_seconds']:.0f} | {p['peak_rss_mib']:.0f} |"
        )
    return lines


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rss, secs) = plt.subplots(1, 2, figsize=(9, 3.4))
    for in_memory, style in ((True, "o-"), (False, "s--")):
        points = sorted((p for p in r["curve"] if p["in_memory"] == in_memory), key=lambda p: p["bytes"])
        label = "in memory" if in_memory else "streamed"
        x = [p["bytes"] / 1e9 for p in points]
        rss.plot(x, [p["peak_rss_mib"] / 1024 for p in points], style, label=label)
        secs.plot(x, [epoch(p) for p in points], style, label=label)
    rss.axhline(4, color="grey", lw=0.8, ls=":", label="4 GiB target")
    for ax, name in ((rss, "peak RSS of training (GiB)"), (secs, "epoch (s)")):
        ax.set_xscale("log")
        ax.set_xlabel("cache size (GB)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    secs.set_yscale("log")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/train-scale"), help="where the caches stay")
    parser.add_argument("--quick", action="store_true", help="a tiny cache in a temporary folder (CI)")
    for name, value in FULL.items():
        parser.add_argument(f"--{name}", type=type(value), default=None, help=f"default {value}")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument(
        "--max_in_memory_gib", type=float, default=4.0, help="largest cache trained in memory"
    )
    parser.add_argument("--write", action="store_true", help="replace the section in --out, save the figure")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--child", choices=("loader", "train"), help=argparse.SUPPRESS)
    parser.add_argument("--cache_dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--in_memory", default="no", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = (child_loader if args.child == "loader" else child_train)(args)
        args.result.write_text(json.dumps(result))
        return 0
    args.argv = list(sys.argv[1:] if argv is None else argv)
    for name, value in (QUICK if args.quick else FULL).items():
        setattr(args, name, value if getattr(args, name) is None else getattr(args, name))
    args.curve_bags = [int(n) for n in str(args.curve).split(",") if n]
    loads = [load_average()]
    if args.quick:
        with tempfile.TemporaryDirectory() as tmp:
            results = measure(args, Path(tmp))
    else:
        results = measure(args, args.root)
    loads.append(load_average())
    publish(section(args, results, tuple(loads)), SECTION, args.out, args.write)
    if args.write:
        plot(results, args.out.parent / IMAGE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
