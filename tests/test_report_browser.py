"""report.html in headless Chromium, as a person opens it: no console error, no broken image, every
slide in the table, the table sorts and filters, hostile slide names stay text. Driven over the
DevTools protocol (clam.report_browser); skipped where no Chromium is installed."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from test_eval_report import HOSTILE_PATIENT, evaluate_cohort, hostile_slides

from clam.eval_report import REPORT_HTML
from clam.report_browser import chromium, find_chromium, open_page
from clam.report_html import anchor

pytestmark = pytest.mark.skipif(
    find_chromium() is None,
    reason="no Chromium: install Debian's chromium package (.ci/run does where it can) or set CHROMIUM",
)

ROWS = "Array.from(document.querySelectorAll('#slides-table tbody tr'))"
# Every image loaded now (lazy ones too): the src of each that fails, as the browser resolves it.
BROKEN_IMAGES = """Promise.all(Array.from(document.images).map(function (img) {
  img.loading = "eager";
  return img.decode().then(function () { return null; }, function () { return img.getAttribute("src"); });
})).then(function (found) { return found.filter(function (src) { return src !== null; }); })"""


def column(page, name: str) -> list:
    return page.evaluate(f"{ROWS}.filter(r => !r.hidden).map(r => r.getAttribute('data-{name}'))")


def click(page, key: str) -> None:
    page.evaluate(f"document.querySelector(\"th[data-sort='{key}'] button\").click()")


def numbers(values: list[str]) -> list[float]:
    return [float(v) for v in values]


@pytest.fixture(scope="module")
def browser():
    with chromium() as connection:
        yield connection


@pytest.fixture(scope="module")
def example_report(tiny_cohort, trained_on_tiny_cohort, tmp_path_factory) -> Path:
    """clam.evaluate of the shared tiny run (2 epochs, random backbone weights, the example cohort's
    train split) on its test split, into a folder of its own: real tiles in the montages and heatmaps."""
    from clam.eval_config import EvaluateConfig
    from clam.evaluation import evaluate

    _root, run_dir = trained_on_tiny_cohort
    result = evaluate(
        EvaluateConfig(
            checkpoint=run_dir / "best_model.pt",
            data_dir=tiny_cohort.split_dirs["test"],
            num_workers=0,
            n_bootstrap=50,
            device="cpu",
            progress=False,
            output_dir=tmp_path_factory.mktemp("example_report") / "eval",
        )
    )
    return result.output_dir / REPORT_HTML


@pytest.mark.slow
def test_the_example_report_loads_cleanly_and_its_table_sorts(browser, example_report):
    page = open_page(browser, example_report)
    assert page.evaluate(BROKEN_IMAGES) == []
    page.settle()
    assert page.errors == []
    with open(example_report.parent / "predictions.csv", newline="") as handle:
        slides = [row["slide_id"] for row in csv.DictReader(handle)]
    assert sorted(column(page, "slide")) == sorted(slides)
    assert page.evaluate("document.getElementById('random-weights') !== null")  # the example's weights
    assert page.evaluate("document.images.length") == 2 + 2 * len(slides)


def test_sorting_and_filtering(browser, tmp_path):
    slides = hostile_slides()
    report = evaluate_cohort(tmp_path, slides) / REPORT_HTML
    page = open_page(browser, report)
    click(page, "probability")
    assert numbers(column(page, "probability")) == sorted(numbers(column(page, "probability")))
    click(page, "probability")  # again: descending
    values = numbers(column(page, "probability"))
    assert values == sorted(values, reverse=True) and len(values) == len(slides)
    click(page, "error")
    assert numbers(column(page, "error")) == sorted(numbers(column(page, "error")))
    click(page, "label")
    labels = column(page, "label")
    assert labels == sorted(labels) and len(set(labels)) == 2
    assert page.evaluate("document.getElementById('slides-table').getAttribute('data-sorted')") == "label asc"
    page.evaluate(
        "var box = document.getElementById('slide-filter'); box.value = 'P001';"
        "box.dispatchEvent(new Event('input'))"
    )
    assert [s.split("__")[1] for s in column(page, "slide")] == ["P001"]
    assert page.evaluate("document.getElementById('slides-shown').textContent") == (
        f"1 of {len(slides)} slides shown"
    )
    # the same from the address: sorted on load
    query = open_page(browser, report.resolve().as_uri() + "?sort=error&order=desc")
    errors = numbers(column(query, "error"))
    assert errors == sorted(errors, reverse=True)
    page.settle()
    assert page.errors == [] and query.errors == []


def test_hostile_slide_names_stay_text_in_the_browser(browser, tmp_path):
    slides = hostile_slides()
    report = evaluate_cohort(tmp_path, slides) / REPORT_HTML
    page = open_page(browser, report)
    assert page.evaluate(BROKEN_IMAGES) == []  # the montage of the hostile slide too: its src is encoded
    page.settle()
    assert page.errors == []  # no alert() dialog, no script error
    hostile = f"EGFR_negative__{HOSTILE_PATIENT}"
    assert hostile in column(page, "slide")
    assert page.evaluate(f"document.getElementById('{anchor(hostile)}').querySelector('h3').textContent") == (
        hostile
    )
    assert page.evaluate("document.querySelectorAll('script').length") == 1
    page.evaluate(f"document.querySelector('a[href=\"#{anchor(hostile)}\"]').click()")
    assert page.evaluate("location.hash") == f"#{anchor(hostile)}"


def test_a_missing_image_is_caught(browser, tmp_path):
    """The check itself: a montage deleted after the page was written is reported broken."""
    slides = hostile_slides()
    out = evaluate_cohort(tmp_path, slides)
    gone = f"{slides[1].slide_id}_topk.png"
    (out / "attention" / gone).unlink()
    page = open_page(browser, out / REPORT_HTML)
    assert page.evaluate(BROKEN_IMAGES) == [f"attention/{gone}"]
    page.settle()
    assert any(gone in error for error in page.errors)
