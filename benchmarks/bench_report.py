"""How a report of many slides behaves in a browser: the ``## Report`` section of docs/benchmarks.md.

    python benchmarks/bench_report.py --write     # a synthetic evaluation of 500 slides
    python benchmarks/bench_report.py             # the same, printed only
    python benchmarks/bench_report.py --quick     # 50 slides, one load per variant: a smoke test

The section is printed to stdout; only ``--write`` replaces it in docs/benchmarks.md (or ``--out``).

A synthetic evaluation folder as ``clam.evaluate`` writes it: predictions, metrics.json (with real
bootstrap CIs), the real ROC and confusion figures, and per slide an attention CSV, a montage and
a heatmap (one montage and one heatmap drawn by ``clam.heatmaps``, copied for every slide, so the
files have their real sizes). Then ``report.html`` is written (``clam.eval_report``) and opened in
headless Chromium (``clam.report_browser``), each load in a new tab: the time from navigation to the
load event, the page's own DOMContentLoaded and load timings, and how many images it had loaded by
then. The same page with ``loading="eager"`` images shows what the lazy loading saves.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import load_average, machine, publish  # noqa: E402

from clam import heatmaps  # noqa: E402
from clam.eval_report import write_eval_report  # noqa: E402
from clam.figures import plot_confusion, plot_roc  # noqa: E402
from clam.inference import aggregate_patients, per_level_metrics, write_table  # noqa: E402
from clam.metrics import default_class_names  # noqa: E402
from clam.report_browser import chromium, find_chromium, open_page  # noqa: E402
from clam.run_files import (  # noqa: E402
    ATTENTION_DIR,
    CONFUSION_PNG,
    METRICS_JSON,
    PATIENT_PREDICTIONS,
    PREDICTIONS,
    ROC_PNG,
    attention_files,
    probability_column,
    write_json,
)

SECTION = "## Report"
BUDGET_SECONDS = 3.0  # the target: a report of 500 slides loads in under 3 s
TIMINGS = """(() => { const nav = performance.getEntriesByType("navigation")[0];
  const loaded = Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length;
  return {dcl: nav.domContentLoadedEventEnd, load: nav.loadEventEnd, fetched: loaded,
          images: document.images.length}; })()"""


# ---------------------------------------------------------------- the synthetic evaluation


def build_folder(workdir: Path, n_slides: int, seed: int = 0) -> Path:
    """An evaluation folder of ``n_slides`` slides (two per patient), as clam.evaluate writes it."""
    rng = np.random.default_rng(seed)
    names = default_class_names(2)
    out = workdir / "eval_benchmark"
    (out / ATTENTION_DIR).mkdir(parents=True)
    slides = []
    for i in range(n_slides):
        label = i % 2
        p = float(np.clip(rng.normal(0.35 + 0.3 * label, 0.2), 0.01, 0.99))
        slides.append(
            {
                "slide_id": f"{names[label]}__P{i // 2:04d}_{i % 2}",
                "patient_id": f"P{i // 2:04d}",
                "class_folder": names[label],
                "label": label,
                "label_name": names[label],
                probability_column(names[0]): 1 - p,
                probability_column(names[1]): p,
                "predicted": int(p >= 0.5),
                "predicted_name": names[int(p >= 0.5)],
                "n_tiles": 24,
            }
        )
    patients = aggregate_patients(slides, names)
    write_table(out / PREDICTIONS, slides)
    write_table(out / PATIENT_PREDICTIONS, patients)
    metrics = {
        "checkpoint": str(workdir / "run_benchmark" / "best_model.pt"),
        "cache_key": "benchmark",
        "class_names": names,
        "split": "test",
        **per_level_metrics(slides, patients, names, 200, seed),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json(out / METRICS_JSON, metrics)
    plot_roc(out / ROC_PNG, {"per slide": slides, "per patient": patients}, metrics, 200, seed)
    plot_confusion(out / CONFUSION_PNG, metrics)
    _attention_files(out, slides, names, rng)
    return out


def _attention_files(out: Path, slides: list[dict], names: list[str], rng: np.random.Generator) -> None:
    """One slide's maps drawn for real, their files copied for every slide; index.csv names them."""
    grid = np.array([(x * 256, y * 256) for y in range(4) for x in range(6)])
    weights = rng.random(len(grid))
    drawn = heatmaps.slide_attention(
        "drawn", "P", 1, np.array([0.3, 0.7]), weights / weights.sum(), np.log(weights),
        [f"tile_x{x}_y{y}.png" for x, y in grid], grid, names,
    )  # fmt: skip
    row = heatmaps.explain_slide(out / ATTENTION_DIR, drawn, None, heatmaps.DEFAULT_TOP_K)
    rows = []
    for slide in slides:
        files = attention_files(slide["slide_id"])
        for key in files:
            shutil.copyfile(out / ATTENTION_DIR / row[key], out / ATTENTION_DIR / files[key])
        rows.append({**row, **files, "slide_id": slide["slide_id"], "patient_id": slide["patient_id"]})
    for key in attention_files("drawn").values():
        (out / ATTENTION_DIR / key).unlink()
    heatmaps.write_index(out / ATTENTION_DIR, rows)


# ---------------------------------------------------------------- measuring


def render(folder: Path) -> tuple[Path, float]:
    """report.html of ``folder`` and the seconds it took to write."""
    started = time.perf_counter()
    page = write_eval_report(folder)
    return page, time.perf_counter() - started


def eager_copy(page: Path) -> Path:
    """The same page with every image loaded at once (``loading="eager"``)."""
    eager = page.with_name("report_eager.html")
    eager.write_text(
        page.read_text(encoding="utf-8").replace('loading="lazy"', 'loading="eager"'), encoding="utf-8"
    )
    return eager


def measure_page(page: Path, repeats: int) -> dict[str, float]:
    """Medians over ``repeats`` loads, each in a new tab: seconds to the load event (as seen from
    outside), the page's DOMContentLoaded and load (ms), images loaded by then; console errors."""
    runs, errors = [], []
    with chromium() as browser:
        for _ in range(repeats):
            opened = open_page(browser, page)
            runs.append({"seconds": opened.load_seconds, **opened.evaluate(TIMINGS)})
            errors += opened.errors
    return {
        **{key: statistics.median(run[key] for run in runs) for key in runs[0]},
        "errors": len(errors),
        "kib": page.stat().st_size / 1024,
    }


# ---------------------------------------------------------------- the section


def section(
    n_slides: int, repeats: int, render_seconds: float, results: dict[str, dict], browser: str, command: str
) -> str:
    lazy = results["lazy"]
    verdict = "within" if lazy["seconds"] < BUDGET_SECONDS else "OVER"
    lines = [
        SECTION,
        "",
        f"`{command}` on {machine()}, {browser} (load average {load_average():.2f} when it finished).",
        "",
        f"A synthetic evaluation folder of {n_slides} slides ({n_slides // 2} patients; per slide a montage "
        "and a heatmap at their real sizes); `report.html` written by `clam.eval_report` in "
        f"{render_seconds:.2f} s, then opened in headless Chromium (a 1280 x 900 window), median of "
        f"{repeats} load{'s' if repeats > 1 else ''}, each in a new tab.",
        "",
        "| images | page size | to the load event (s) | DOMContentLoaded (ms) | load (ms) | images loaded by then | console errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for variant, title in (("lazy", "lazy (as written)"), ("eager", 'all eager (`loading="eager"`)')):
        r = results[variant]
        lines.append(
            f"| {title} | {r['kib']:.0f} KiB | {r['seconds']:.2f} | {r['dcl']:.0f} | {r['load']:.0f} | "
            f"{r['fetched']:.0f} of {r['images']:.0f} | {r['errors']} |"
        )
    ratio = results["eager"]["seconds"] / max(lazy["seconds"], 1e-9)
    lines += [
        "",
        f"The page as written loads {verdict} the {BUDGET_SECONDS:.0f} s target for 500 slides; loading every image "
        f"at once takes {ratio:.1f}x as long (same run).",
    ]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n_slides", type=int, default=500, help="slides in the evaluation (default: 500)")
    parser.add_argument("--repeats", type=int, default=5, help="loads per variant (default: 5)")
    parser.add_argument("--quick", action="store_true", help="50 slides, one load per variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", action="store_true", help="replace the section in --out")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    n_slides, repeats = (50, 1) if args.quick else (args.n_slides, args.repeats)
    browser = find_chromium()
    if browser is None:
        print("error: no Chromium found (Debian: apt-get install chromium; or set CHROMIUM)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench_report_") as work:
        folder = build_folder(Path(work), n_slides, args.seed)
        page, render_seconds = render(folder)
        results = {"lazy": measure_page(page, repeats), "eager": measure_page(eager_copy(page), repeats)}
    command = "python benchmarks/bench_report.py" + (" --quick" if args.quick else "")
    if not args.quick and (args.n_slides, args.repeats) != (500, 5):
        command += f" --n_slides {args.n_slides} --repeats {args.repeats}"
    text = section(n_slides, repeats, render_seconds, results, Path(browser).name, command)
    publish(text, SECTION, args.out, args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
