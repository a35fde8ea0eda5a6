"""Training speed, in one run on the same cached bags: the ``## Training`` section of docs/benchmarks.md.

    python benchmarks/bench_train.py --write                  # 240 bags of 60-100 x 1024, 3 epochs
    python benchmarks/bench_train.py                          # the same, printed only
    python benchmarks/bench_train.py --n_bags 40 --epochs 2   # a quick smoke test, printed only

The section is printed to stdout; only ``--write`` replaces it in docs/benchmarks.md (or ``--out``).

Per epoch (training pass + validation pass, checkpoint writing excluded), median over epochs:

- ours: ``clam.train.train`` at ``--batch_size 1`` and ``16``;
- reference: a loop in the style of CLAM's own trainer (``train_loop_clam`` / ``validate_clam``):
  one bag per step, a DataLoader whose Dataset opens each bag's HDF5 file every epoch (as CLAM's
  ``Generic_MIL_Dataset``, with CLAM's worker setting: none on a CPU, 4 on a GPU), ``.item()``
  on the losses every step, the same model, loss, split and Adam hyper-parameters;
- floor: the floating-point operations of the epoch's forward and backward passes on the real
  (unpadded) instances, divided by the matrix-multiply rate measured here with the same threads.

Each variant runs in its own process, so its peak memory (resident set; on a GPU, allocated
device memory) is its own. Validation AUC is that of the last epoch.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import machine, publish  # noqa: E402

from feature_extraction.bags import FEATURES, bag_path, write_bag  # noqa: E402
from feature_extraction.cache import CACHE_JSON, collect_manifest  # noqa: E402
from feature_extraction.manifest import write_manifest  # noqa: E402

SECTION = "## Training"
CACHE_KEY = "benchmark-random-bags"


# ---------------------------------------------------------------- the shared bags


def make_cache(features_dir: Path, n_bags: int, feature_dim: int, max_instances: int, seed: int = 0) -> Path:
    """``n_bags`` bags of 60-100% of ``max_instances`` instances; a third of a positive bag's
    instances carry a weak signal, so the validation AUC says whether the model learns."""
    rng = np.random.default_rng(seed)
    cache_dir = features_dir / CACHE_KEY
    cache_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n_bags):
        label = i % 2
        n = int(rng.integers(int(0.6 * max_instances), max_instances + 1))
        features = np.abs(rng.normal(0.5, 0.5, size=(n, feature_dim))).astype(np.float32)
        if label:
            features[rng.random(n) < 1 / 3, : feature_dim // 16] += 0.5
        slide_id = f"EGFR_{'positive' if label else 'negative'}__B{i:04d}"
        write_bag(
            bag_path(cache_dir, slide_id),
            features,
            np.zeros((n, 2)),
            [str(j) for j in range(n)],
            {
                "slide_id": slide_id,
                "patient_id": f"B{i:04d}",
                "class_folder": slide_id.split("__")[0],
                "label": label,
                "split": "train",
                "cache_key": CACHE_KEY,
            },
        )
    (cache_dir / CACHE_JSON).write_text(
        json.dumps(
            {
                "cache_key": CACHE_KEY,
                "backbone": "benchmark",
                "weights": "random",
                "feature_dim": feature_dim,
                "max_tiles": max_instances,
                "seed": seed,
            }
        )
    )
    write_manifest(cache_dir, collect_manifest(cache_dir))
    return cache_dir


# ---------------------------------------------------------------- the variants (each in a child process)


def run_ours(cache_dir: Path, batch_size: int, epochs: int, workdir: Path, device: str) -> dict:
    from clam.train import TrainConfig, train

    run = train(
        TrainConfig(
            features_dir=str(cache_dir),
            batch_size=batch_size,
            num_epochs=epochs,
            device=device,
            output_dir=str(workdir / "runs"),
            progress=False,
        )
    )
    config = json.loads((run / "config.json").read_text())
    history = config["metrics"]
    loader = config["loader"]
    return {
        "epoch_seconds": [row["seconds"] for row in history],
        "val_auc": history[-1].get("val_auc"),
        "loader": f"{'in memory' if loader['in_memory'] else 'streamed'}, {loader['num_workers']} workers",
        "threads": loader["torch_threads"],
    }


def run_reference(cache_dir: Path, epochs: int, device_name: str) -> dict:
    """CLAM's train_loop_clam / validate_clam, on our model, split and hyper-parameters."""
    import h5py
    from sklearn.metrics import roc_auc_score
    from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler

    from clam.data import records_from_cache, validate_records
    from clam.model import ModelConfig, model_from_config
    from clam.splits import train_val_split
    from clam.train import TrainConfig
    from feature_extraction.cache import read_cache_config
    from feature_extraction.runtime import resolve_device

    defaults = TrainConfig()
    device = resolve_device(device_name)
    bags = validate_records(
        records_from_cache(cache_dir, None, "train"),
        cache_dir,
        defaults.n_classes,
        read_cache_config(cache_dir),
        progress=False,
    )
    split = train_val_split(bags.records, defaults.val_fraction, defaults.seed)

    class GenericMILDataset(Dataset):  # CLAM's Generic_MIL_Dataset.__getitem__ with use_h5
        def __init__(self, records):
            self.records = records

        def __len__(self):
            return len(self.records)

        def __getitem__(self, index):
            record = self.records[index]
            # The peer's own loader: it opens the file by hand every time (ours goes through bags.py).
            with h5py.File(record.path, "r") as hdf5_file:
                features = torch.from_numpy(hdf5_file[FEATURES][:])
            return features, record.label

    def collate_mil(batch):
        return [torch.cat([item[0] for item in batch], dim=0), torch.LongTensor([item[1] for item in batch])]

    kwargs = {"num_workers": 4} if device.type == "cuda" else {}  # CLAM's get_split_loader
    train_loader = DataLoader(
        GenericMILDataset(split.train),
        batch_size=1,
        sampler=RandomSampler(split.train),
        collate_fn=collate_mil,
        **kwargs,
    )
    val_loader = DataLoader(
        GenericMILDataset(split.val),
        batch_size=1,
        sampler=SequentialSampler(split.val),
        collate_fn=collate_mil,
        **kwargs,
    )
    torch.manual_seed(defaults.seed)
    model = model_from_config(
        ModelConfig(
            defaults.model_type,
            bags.feature_dim,
            defaults.n_classes,
            defaults.model_size,
            defaults.dropout,
            defaults.k_sample,
            defaults.instance_loss,
        )
    ).to(device)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=defaults.learning_rate, weight_decay=defaults.weight_decay
    )
    loss_fn = torch.nn.CrossEntropyLoss()
    seconds, val_auc = [], None
    for _ in range(epochs):
        started = time.perf_counter()
        model.train()
        train_loss = train_inst_loss = train_error = 0.0
        for data, label in train_loader:
            data, label = data.to(device), label.to(device)
            output = model(data[None], None, label)
            loss = loss_fn(output.logits, label)
            loss_value = loss.item()
            instance_loss = output.instance_loss
            train_inst_loss += instance_loss.item()
            total_loss = defaults.bag_weight * loss + (1 - defaults.bag_weight) * instance_loss
            train_loss += loss_value
            train_error += 1.0 - output.logits.argmax(1).eq(label).float().mean().item()
            total_loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
        val_loss, probs, labels = 0.0, [], []
        with torch.no_grad():
            for data, label in val_loader:
                data, label = data.to(device, non_blocking=True), label.to(device, non_blocking=True)
                output = model(data[None])
                val_loss += loss_fn(output.logits, label).item()
                probs.append(output.probs.cpu().numpy()[0, 1])
                labels.append(label.item())
        val_auc = float(roc_auc_score(labels, probs)) if len(set(labels)) == 2 else None
        seconds.append(time.perf_counter() - started)
    return {
        "epoch_seconds": seconds,
        "val_auc": val_auc,
        "loader": f"opens each bag's file, {kwargs.get('num_workers', 0)} workers",
        "threads": torch.get_num_threads(),
    }


def child(args: argparse.Namespace) -> None:
    baseline = _peak_rss()
    started = time.perf_counter()
    if args.child == "reference":
        result = run_reference(args.cache_dir, args.epochs, args.device)
    else:
        result = run_ours(args.cache_dir, args.batch_size, args.epochs, args.workdir, args.device)
    result["wall_seconds"] = time.perf_counter() - started
    result["peak_rss_mib"] = _peak_rss()
    result["baseline_rss_mib"] = baseline
    if torch.cuda.is_available() and args.device != "cpu":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result))


def _peak_rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_child(
    kind: str, cache_dir: Path, workdir: Path, epochs: int, device: str, batch_size: int = 1
) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--cache_dir",
        str(cache_dir),
        "--workdir",
        str(workdir),
        "--epochs",
        str(epochs),
        "--device",
        device,
        "--batch_size",
        str(batch_size),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"{kind} failed:\n{result.stdout}\n{result.stderr}")
    return json.loads(lines[-1][len("RESULT ") :])


# ---------------------------------------------------------------- the arithmetic floor


def epoch_flops(cache_dir: Path, feature_dim: int) -> float:
    """Forward + backward FLOPs of one training pass and one validation pass of CLAM-SB small
    over the real instances (matrix multiplies only; the rest is under 1%)."""
    from clam.data import records_from_cache, validate_records
    from clam.splits import train_val_split
    from clam.train import TrainConfig
    from feature_extraction.cache import read_cache_config

    defaults = TrainConfig()
    bags = validate_records(
        records_from_cache(cache_dir, None, "train"),
        cache_dir,
        2,
        read_cache_config(cache_dir),
        progress=False,
    )
    split = train_val_split(bags.records, defaults.val_fraction, defaults.seed)
    width, hidden = 512, 256
    per_instance_first = 2 * feature_dim * width  # fc: forward; backward needs only the weight gradient
    per_instance_rest = 2 * (2 * width * hidden + hidden + width * 2 * defaults.n_classes)
    train_instances = sum(min(r.n_instances, defaults.max_tiles) for r in split.train)
    val_instances = sum(min(r.n_instances, defaults.max_tiles) for r in split.val)
    return train_instances * (2 * per_instance_first + 3 * per_instance_rest) + val_instances * (
        per_instance_first + per_instance_rest
    )


def matmul_rate(rows: int, feature_dim: int, device: torch.device, seconds: float = 1.0) -> float:
    """FLOP/s of (rows x D) @ (D x 512) in fp32: the fc layer that dominates CLAM's arithmetic."""
    a = torch.randn(rows, feature_dim, device=device)
    b = torch.randn(feature_dim, 512, device=device)
    for _ in range(3):
        a @ b
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2.0 * rows * feature_dim * 512 * count / (time.perf_counter() - started)


# ---------------------------------------------------------------- report


def section(args, results: dict, floor_seconds: dict, rates: dict) -> str:
    reference = statistics.median(results["reference"]["epoch_seconds"])
    lines = [
        SECTION,
        "",
        f"`{' '.join(['python', 'benchmarks/bench_train.py'] + [shlex.quote(a) for a in args.argv])}`"
        f" on {machine()}, torch {torch.__version__}, {args.device_resolved}, "
        f"{time.strftime('%Y-%m-%d')}. {args.n_bags} bags of {int(0.6 * args.max_instances)}-{args.max_instances} "
        f"instances x {args.feature_dim} features (one cache; 80% train, 20% validation), CLAM-SB small, defaults of "
        f"the specification; median of {args.epochs} epochs, each a training and a validation pass.",
        "",
        "| variant | epoch (s) | x reference | x floor | val AUC | peak memory (MiB) | bags reach the model |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, label in (
        ("reference", "reference loop, CLAM style, batch 1"),
        ("bs1", "`clam.train --batch_size 1`"),
        ("bs16", "`clam.train --batch_size 16`"),
    ):
        r = results[name]
        epoch = statistics.median(r["epoch_seconds"])
        floor = floor_seconds["bs16" if name == "bs16" else "bs1"]
        memory = r.get("peak_gpu_mib", r["peak_rss_mib"])
        auc = "n/a" if r["val_auc"] is None else f"{r['val_auc']:.3f}"
        lines.append(
            f"| {label} | {epoch:.2f} | {epoch / reference:.2f} | {epoch / floor:.1f} | {auc} | "
            f"{memory:.0f} | {r['loader']}, {r['threads']} compute threads |"
        )
    lines += [
        "",
        f"Floor: {floor_seconds['flops'] / 1e9:.2f} GFLOP per epoch (forward and backward over the real instances) "
        f"at the measured fp32 matrix-multiply rate of {rates['bs1'] / 1e9:.0f} GFLOP/s for one bag "
        f"({args.max_instances} x {args.feature_dim} @ {args.feature_dim} x 512) and {rates['bs16'] / 1e9:.0f} GFLOP/s "
        f"for 16 bags: {floor_seconds['bs1']:.3f} s and {floor_seconds['bs16']:.3f} s. "
        f"Peak memory is the process's peak resident set (on a GPU: allocated device memory); "
        f"importing torch alone takes about {results['reference']['baseline_rss_mib']:.0f} MiB. "
        "Targets: batch 1 at most 0.5 x the reference, batch 16 at most 0.3 x, equal or better AUC.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n_bags", type=int, default=240)
    parser.add_argument(
        "--max_instances", type=int, default=100, help="instances of the largest bag (the spec's max_tiles)"
    )
    parser.add_argument("--feature_dim", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where to write the bags (default: a temp dir)"
    )
    parser.add_argument(
        "--write", action="store_true", help="replace the section in --out (default: print only)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    # Printing only is the default now; --no_write stays accepted for old command lines.
    parser.add_argument("--no_write", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=("ours", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--cache_dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--batch_size", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    args.argv = list(sys.argv[1:] if argv is None else argv)

    from feature_extraction.runtime import resolve_device

    device = resolve_device(args.device)
    args.device_resolved = str(device)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp)
        cache_dir = make_cache(workdir / "features", args.n_bags, args.feature_dim, args.max_instances)
        results = {}
        for name, kind, batch_size in (
            ("reference", "reference", 1),
            ("bs1", "ours", 1),
            ("bs16", "ours", 16),
        ):
            print(f"running {name} ...", flush=True)
            results[name] = run_child(kind, cache_dir, workdir, args.epochs, args.device, batch_size)
            print(
                f"  epochs {[f'{s:.2f}' for s in results[name]['epoch_seconds']]} s, val AUC {results[name]['val_auc']}"
            )
        flops = epoch_flops(cache_dir, args.feature_dim)
    torch.set_num_threads(results["bs1"]["threads"])
    rates = {
        "bs1": matmul_rate(args.max_instances, args.feature_dim, device),
        "bs16": matmul_rate(16 * args.max_instances, args.feature_dim, device),
    }
    floor_seconds = {"flops": flops, "bs1": flops / rates["bs1"], "bs16": flops / rates["bs16"]}
    text = section(args, results, floor_seconds, rates)
    publish(text, SECTION, args.out, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
