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
        batch_auto=False,
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
    monkeypatch.setattr(bench, "decode_rate", lambda *a, **k: 410.0)
    monkeypatch.setattr(bench, "peer_rate", lambda *a, **k: 19.9)
    return ["--n_tiles", "4", "--repeats", "1", "--device", "cpu"]


def fake_decode(bench, monkeypatch, tmp_path: Path) -> list[str]:
    def measure(fmt, size, n_tiles, rounds, workdir):
        scale = (1.0 if fmt == "jpeg" else 4.0) * (size / 256) ** 2
        ms = {"pillow": 0.5 * scale, "torchvision": 0.3 * scale, "imagecodecs": 0.25 * scale}
        ms["decode_rgb"] = 0.25 * scale
        if fmt == "jpeg":
            ms["simplejpeg"] = 0.24 * scale
        same = {name: name != "torchvision" for name in ms}
        return {"kb": 23.0 * scale, "ms": ms, "same": same, "resize_ms": 0.45 * size / 256}

    monkeypatch.setattr(bench, "measure", measure)
    monkeypatch.setattr(bench, "machine", lambda: "a test machine")
    return ["--quick"]


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


def fake_report(bench, monkeypatch, tmp_path: Path) -> list[str]:
    def render(folder):
        page = folder / "report.html"
        page.write_text('<img loading="lazy">', encoding="utf-8")
        return page, 0.4

    timings = {
        "seconds": 0.6,
        "dcl": 420.0,
        "load": 590.0,
        "fetched": 4,
        "images": 1002,
        "errors": 0,
        "kib": 900,
    }
    monkeypatch.setattr(bench, "find_chromium", lambda: "/usr/bin/chromium")
    monkeypatch.setattr(bench, "build_folder", lambda workdir, n, seed=0: workdir)
    monkeypatch.setattr(bench, "render", render)
    monkeypatch.setattr(bench, "measure_page", lambda page, repeats: dict(timings))
    monkeypatch.setattr(bench, "machine", lambda: "a test machine")
    return ["--n_slides", "500", "--repeats", "1"]


def fake_wsi(bench, monkeypatch, tmp_path: Path) -> list[str]:
    """bench_wsi with its slides, tile folder and measurements canned; the section and the plot are real."""

    def slide_for(recipe, slide_dir, sources=None):
        return Path(slide_dir) / recipe.file_name, 0.0

    rounds = {"wsi": [50.1], "folder": [52.0], "limit": [56.3], "wsi_listing": [1.1], "folder_listing": [0.1]}
    rates = {"rounds": rounds, "median": {k: v[0] for k, v in rounds.items()}, "tiles": 24}
    rates.update(plan="cpu, fp32, batch 16, 1 decode worker, 2 compute threads", runtime="onnxruntime")

    def planning(slide, workdir, repeats=3):
        tiles = 38 if "6000x4500" in slide.name else int(slide.name.split("x")[0].split("_")[-1]) // 50
        return {"tiles": tiles, "dimensions": (6000, 4500), "mask": (140, 187), "plan_s": 0.05,
                "first_tile_s": 0.06, "cached_s": 0.0004, "cache_kib": 1.0}  # fmt: skip

    def rss(slides, workdir, args):
        return [
            {"slide": s.name, "tiles": 40 * (i + 1), "peak_mib": 1350.0 + i, "main_mib": 900.0, "seconds": 30.0,
             "rate": 3.0}
            for i, s in enumerate(slides)
        ]  # fmt: skip

    monkeypatch.setattr(bench, "texture_note", lambda: ([], "a test texture"))
    monkeypatch.setattr(bench, "slide_for", slide_for)
    monkeypatch.setattr(bench, "tile_folder_of", lambda cohort, out_dir, max_tiles: out_dir)
    monkeypatch.setattr(bench, "measure_rates", lambda *a, **k: rates)
    monkeypatch.setattr(bench, "measure_planning", planning)
    monkeypatch.setattr(bench, "measure_rss", rss)
    slide = {"width": 6000, "height": 4500, "mpp": 0.25, "levels": 4, "mib": 3.0, "vendor": "generic-tiff",
             "mpp_read": "0.25", "read_level": 1, "build": "3 s"}  # fmt: skip
    monkeypatch.setattr(bench, "describe_slide", lambda *a: slide)
    monkeypatch.setattr(bench, "machine", lambda: "a test machine")
    monkeypatch.setattr(bench, "versions", lambda: "test versions")
    return ["--quick", "--slide_dir", str(tmp_path / "slides"), "--workdir", str(tmp_path / "work")]


def fake_fixed_costs(bench, monkeypatch, tmp_path: Path) -> list[str]:
    """Canned timings: the five commands, the start-up breakdown, embed on cohorts of 1 and 2 slides."""

    def phases(start, work, end):
        return {"start": start, "work": work, "end": end, "total": start + work + end, "rc": 0, "first_n": 4}

    runs = {
        "embed, empty per-user cache": phases(9.4, 20.4, 1.1),
        "embed, warm per-user cache, new --features_dir": phases(3.4, 20.0, 1.0),
        "embed, every bag already embedded": {"total": 3.2, "first": None, "last": None, "rc": 0},
        "train on cached bags": phases(2.1, 1.3, 0.7),
        "evaluate (attention maps of every slide)": phases(2.9, 30.0, 5.1),
    }
    rows = [
        {**phases(3.0, 0.5, 1.0), "slides": 1, "tiles": 24, "cache": "warm"},
        {**phases(9.0, 0.5, 1.0), "slides": 1, "tiles": 24, "cache": "empty"},
        {**phases(3.0, 1.0, 1.0), "slides": 2, "tiles": 48, "cache": "warm"},
        {**phases(9.0, 1.0, 1.0), "slides": 2, "tiles": 48, "cache": "empty"},
    ]
    monkeypatch.setattr(bench, "build_example", lambda workdir, quick: workdir)
    monkeypatch.setattr(bench, "measure_commands", lambda *a, **k: runs)
    monkeypatch.setattr(
        bench, "measure_breakdown", lambda: {"import torch": 0.9, "ONNX export (and its check)": 4.8}
    )
    monkeypatch.setattr(bench, "measure_slides", lambda *a, **k: rows)
    monkeypatch.setattr(bench, "machine", lambda: "a test machine")
    return ["--quick", "--workdir", str(tmp_path / "work")]


def test_fixed_costs_draws_its_figures_next_to_the_page_and_lists_the_scale_curves(
    monkeypatch, tmp_path, capsys
):
    bench = load_script("bench_fixed_costs")
    argv = fake_fixed_costs(bench, monkeypatch, tmp_path)
    page = tmp_path / "docs" / "benchmarks.md"
    page.parent.mkdir()
    page.write_text(PAGE.read_text(encoding="utf-8"), encoding="utf-8")
    assert bench.main(argv + ["--out", str(page)]) == 0
    assert not (tmp_path / "docs" / "img").exists()  # printed only: no figures either
    assert bench.main(argv + ["--out", str(page), "--write"]) == 0
    for image in (bench.FIXED_PNG, bench.SLIDES_PNG):
        assert (tmp_path / "docs" / "img" / image).stat().st_size > 1000
    written = page.read_text(encoding="utf-8")
    scale = written.split(f"{bench.SCALE_SECTION}\n", 1)[1].split("\n## ", 1)[0]
    assert scale.count("](#fixed-costs)") == 2  # its own two curves, linked
    assert "not measured on this page yet (`benchmarks/bench_wsi.py --write`" in scale
    fixed = written.split(f"{bench.SECTION}\n", 1)[1].split("\n## ", 1)[0]
    assert "| train on cached bags | 2.1 | 1.3 | 0.7 | 4.1 |" in fixed
    assert "3.4 s to the first tile, target under 4 s: met" in fixed
    assert "| 2 | 48 | warm | 5.0 | 3.0 | 9.6 | 44.0 |" in fixed  # (48 - 4 tiles of the first batch) / 1 s
    # --scale_only measures nothing and rewrites only the Scale section
    monkeypatch.setattr(bench, "measure_commands", None)
    assert bench.main(["--scale_only", "--write", "--out", str(page)]) == 0
    assert page.read_text(encoding="utf-8") == written


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
    "bench_decode": fake_decode,
    "bench_embed": fake_embed,
    "bench_encoders": fake_encoders,
    "bench_train": fake_train,
    "bench_learning": fake_learning,
    "bench_report": fake_report,
    "bench_wsi": fake_wsi,
    "bench_fixed_costs": fake_fixed_costs,
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
    for other in {"## Decoding", "## Embedding", "## Encoders", "## Training", "## Learning", "## Report"} - {
        bench.SECTION
    }:
        assert original.split(f"{other}\n", 1)[1].split("\n## ", 1)[0] in written  # other sections kept
    assert PAGE.stat().st_mtime_ns == real_page  # the real page was never touched
    if name == "bench_wsi":  # the plot goes next to the page it is written into, never into docs/img
        assert (tmp_path / "img" / "scale_wsi_rss.png").stat().st_size > 1000
        assert "](img/scale_wsi_rss.png)" in own


def test_decoding_section_shows_each_decoder_the_ceilings_and_other_pixels(monkeypatch, tmp_path, capsys):
    bench = load_script("bench_decode")
    argv = fake_decode(bench, monkeypatch, tmp_path)
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    png256 = next(line for line in printed.splitlines() if line.startswith("| PNG 256 px | 92 |"))
    assert "| 2.00 | 1.20 (other pixels) | n/a | 1.00 | 1.00 | 0.45 |" in png256
    # 16 cores x 1000 / (1.00 + 0.45) ms = 11,034 tiles/s now; 16 x 1000 / 2.45 before; 16,000 decode only
    assert "| PNG 256 px | 2.45 | 1.45 | 816 / 1,379 | 6,531 / 11,034 | 16,000 |" in printed


def test_embedding_json_has_every_figure(monkeypatch, tmp_path):
    bench = load_script("bench_embed")
    argv = fake_embed(bench, monkeypatch, tmp_path)
    out = tmp_path / "figures.json"
    assert (
        bench.main(argv + ["--format", "jpeg", "--json", str(out), "--out", str(tmp_path / "page.md")]) == 0
    )
    import json

    figures = json.loads(out.read_text(encoding="utf-8"))
    assert (figures["end_to_end"], figures["limit"], figures["decode_limit"], figures["peer"]) == (
        56.5,
        62.6,
        410.0,
        19.9,
    )
    assert figures["format"] == "jpeg" and figures["n_tiles"] == 4 and figures["rounds"]["decode"] == [410.0]
