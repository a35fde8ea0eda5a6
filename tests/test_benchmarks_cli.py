"""Every benchmarks/bench_*.py prints its section and leaves docs/benchmarks.md alone unless given --write.

Each script's main() runs on canned measurements (its measuring functions are replaced, so this takes
seconds) against a copy of the page passed with --out: unchanged without --write, its own section
replaced with it, the other sections kept.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
PAGE = BENCHMARKS.parent / "docs" / "benchmarks.md"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def canned_embedding(bench, monkeypatch, tmp_path: Path) -> None:
    """The names bench_embed and bench_encoders share: tiles, backbone, plan, embed_cohort, limit."""

    def build_cohort(root, n_tiles, *args, **kwargs):
        tile = root / "EGFR_positive" / "P0000" / "tile_x0_y0.png"
        tile.parent.mkdir(parents=True)
        tile.write_bytes(b"")
        return [tile] * n_tiles

    spec = SimpleNamespace(feature_dim=1024, input_size=224, cpu_onnx=True)
    plan = SimpleNamespace(
        device="cpu",
        runtime="onnxruntime",
        batch_size=16,
        num_workers=1,
        compute_threads=2,
        describe=lambda: "cpu, fp32, batch 16, 1 decode worker, 2 compute threads",
    )
    report = SimpleNamespace(tiles_per_second=56.5, runtime="onnxruntime", plan=plan)
    monkeypatch.setattr(bench, "build_cohort", build_cohort)
    monkeypatch.setattr(bench, "load_backbone", lambda *a, **k: SimpleNamespace(spec=spec))
    monkeypatch.setattr(bench, "plan_compute", lambda *a, **k: plan)
    monkeypatch.setattr(bench, "embed_cohort", lambda *a, **k: report)
    monkeypatch.setattr(bench, "limit_rate", lambda *a, **k: 62.6)
    monkeypatch.setattr(bench, "machine", lambda: "a test machine")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # each run's own work folder, removed after it


def fake_embed(bench, monkeypatch, tmp_path: Path) -> list[str]:
    canned_embedding(bench, monkeypatch, tmp_path)
    monkeypatch.setattr(bench, "decode_ms", lambda *a, **k: 1.8)
    monkeypatch.setattr(bench, "peer_rate", lambda *a, **k: 19.9)
    return ["--n_tiles", "4", "--repeats", "1", "--device", "cpu"]


def fake_train(bench, monkeypatch, tmp_path: Path) -> list[str]:
    def run_child(kind, cache_dir, workdir, epochs, device, batch_size=1):
        return {
            "epoch_seconds": [1.0] * epochs,
            "val_auc": 1.0,
            "loader": "in memory, 0 workers",
            "threads": torch.get_num_threads(),
            "wall_seconds": 1.0,
            "peak_rss_mib": 800.0,
            "baseline_rss_mib": 500.0,
        }

    monkeypatch.setattr(bench, "make_cache", lambda features_dir, *a, **k: features_dir)
    monkeypatch.setattr(bench, "run_child", run_child)
    monkeypatch.setattr(bench, "epoch_flops", lambda *a, **k: 6.3e10)
    monkeypatch.setattr(bench, "matmul_rate", lambda *a, **k: 2.3e11)
    monkeypatch.setattr(bench, "machine", lambda: "a test machine")
    return ["--n_bags", "4", "--epochs", "2", "--device", "cpu", "--workdir", str(tmp_path)]


def fake_learning(bench, monkeypatch, tmp_path: Path) -> list[str]:
    monkeypatch.setattr(bench, "pick_weights", lambda backbone: ("random", "a test"))

    def prepare(workdir, *args, **kwargs):
        workdir.mkdir(parents=True, exist_ok=True)
        return {"cache_dir": workdir, "truth": {}}

    monkeypatch.setattr(bench, "prepare", prepare)
    monkeypatch.setattr(bench, "witness_description", lambda truth: (0.05, "5.0% (2 of 40 tiles)"))
    monkeypatch.setattr(bench, "run_variant", lambda *a, **k: [])
    monkeypatch.setattr(bench, "feature_checks", lambda *a, **k: {})
    monkeypatch.setattr(bench, "run_budget_diagnostics", lambda *a, **k: [])
    monkeypatch.setattr(bench, "section", lambda *a, **k: f"{bench.SECTION}\n\nmeasured by a test\n")
    return ["--variants", bench.VARIANTS[0].name, "--device", "cpu", "--workdir", str(tmp_path / "work")]


def fake_encoders(bench, monkeypatch, tmp_path: Path) -> list[str]:
    canned_embedding(bench, monkeypatch, tmp_path)  # the names it shares with bench_embed
    monkeypatch.setattr(bench, "gflop_per_tile", lambda name: 9.0)
    monkeypatch.setattr(bench, "versions", lambda: "test versions")
    return ["--backbones", "resnet50_trunc:4,ctranspath:2", "--device", "cpu"]


def canned_train_scale() -> dict:
    """What bench_train_scale.measure returns, for a 33 GB cache, its float16 comparison and a curve."""

    def run(epoch: float, rss: float, in_memory: bool = False, bags: int = 2000) -> dict:
        return {
            "epoch_seconds": [epoch],
            "setup_seconds": 3 * epoch,
            "val_auc": 0.9,
            "threads": 2,
            "workers": 0 if in_memory else 1,
            "loader": "33 GB streamed by 1 loader worker",
            "peak_rss_mib": rss,
            "worker_rss_mib": 700.0,
            "bags": bags,
            "bytes": bags * 16_400_000,
            "in_memory": in_memory,
        }

    reader = {
        "seconds": 1.0,
        "rows": 4000,
        "loader": "streamed",
        "peak_rss_mib": 900.0,
        "worker_rss_mib": 700.0,
    }
    return {
        "bytes": {"big": 32.8e9, "f32": 4.9e9, "f16": 2.5e9},
        "read": {"big": {"seconds": 51.0}, "f32": {"seconds": 7.6}, "f16": {"seconds": 3.9}},
        "loader": {"big": {**reader, "seconds": 55.0}, "f32": {**reader, "seconds": 8.0}, "f16": reader},
        "train": {"big": run(90.0, 1100.0), "f32": run(14.0, 1000.0), "f16": run(13.5, 1000.0)},
        "floor": {"big": 70.0, "f32": 10.5},
        "curve": [run(4.0, 1900.0, True, 60), run(4.5, 1000.0, False, 60), run(90.0, 1100.0)],
    }


def fake_train_scale(bench, monkeypatch, tmp_path: Path) -> list[str]:
    monkeypatch.setattr(bench, "measure", lambda *a, **k: canned_train_scale())
    monkeypatch.setattr(bench, "machine", lambda: "a test machine")
    return ["--root", str(tmp_path / "caches")]


FAKES = {
    "bench_embed": fake_embed,
    "bench_encoders": fake_encoders,
    "bench_train": fake_train,
    "bench_learning": fake_learning,
    "bench_train_scale": fake_train_scale,
}


def test_every_benchmark_script_is_covered():
    assert {p.stem for p in BENCHMARKS.glob("bench_*.py")} == set(FAKES)


@pytest.mark.parametrize("name", sorted(FAKES))
def test_the_page_is_written_only_with_write(name, monkeypatch, tmp_path, capsys):
    bench = load_script(name)
    argv = FAKES[name](bench, monkeypatch, tmp_path)
    page = tmp_path / "benchmarks.md"
    original = PAGE.read_text(encoding="utf-8")
    assert f"\n{bench.SECTION}\n" in original
    page.write_text(original, encoding="utf-8")
    real_page = PAGE.stat().st_mtime_ns

    assert bench.main(argv + ["--out", str(page)]) == 0
    printed = capsys.readouterr().out
    assert f"{bench.SECTION}\n" in printed  # the section goes to stdout
    assert page.read_text(encoding="utf-8") == original
    if name in ("bench_embed", "bench_train"):  # the scripts that once wrote by default
        assert bench.main(argv + ["--out", str(page), "--no_write"]) == 0  # old command lines still run
        assert page.read_text(encoding="utf-8") == original

    assert bench.main(argv + ["--out", str(page), "--write"]) == 0
    written = page.read_text(encoding="utf-8")
    assert written != original
    own = written.split(f"{bench.SECTION}\n", 1)[1].split("\n## ", 1)[0]
    assert "test" in own  # the canned figures are in the script's own section
    for other in {"## Embedding", "## Encoders", "## Training", "## Learning"} - {bench.SECTION}:
        assert original.split(f"{other}\n", 1)[1].split("\n## ", 1)[0] in written  # other sections kept
    assert PAGE.stat().st_mtime_ns == real_page  # the real page was never touched
