"""report.html of an evaluation, read as HTML: what it holds, that every link names a file of the folder,
that hostile slide names stay text, and that ``python -m clam.report`` writes it again from the files
alone. The page in a real browser: tests/test_report_browser.py."""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
from random_data import RandomSlide, cohort_slides, write_cohort_folders, write_random_cache
from test_evaluate import N_BOOTSTRAP, make_checkpoint, write_split_csv

from clam import report as report_cli
from clam.eval_config import EvaluateConfig
from clam.eval_report import REPORT_HTML, write_eval_report
from clam.evaluation import evaluate
from clam.report_html import anchor

HOSTILE_PATIENT = "<img src=x onerror=alert(1)> \"q\" 'a' #1 %20?&amp;"
SCRIPT_ID = "<script>alert(1)</script>"


class Page(HTMLParser):
    """Every tag with its attributes, every id, and the text of each <script>."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.scripts: list[str] = []
        self._in_script = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {k: v or "" for k, v in attrs}))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts.append(data)

    def all(self, tag: str) -> list[dict[str, str]]:
        return [attrs for name, attrs in self.tags if name == tag]


def hostile_slides() -> list[RandomSlide]:
    slides = cohort_slides(n_patients=4, split="train", with_cnn=False, instances=(6, 12), seed=2)
    odd = slides[0]
    slides[0] = RandomSlide(
        f"{odd.class_folder}__{HOSTILE_PATIENT}", HOSTILE_PATIENT, odd.class_folder, odd.label, odd.split, 8
    )
    return slides


def evaluate_cohort(root: Path, slides, **checkpoint) -> Path:
    cache_dir = write_random_cache(root / "features", slides, feature_dim=32)
    data_dir = write_cohort_folders(root / "train", slides)
    path = make_checkpoint(root / "runs" / "run_20260101_000000", cache_dir, signal_weight=2.0, **checkpoint)
    config = EvaluateConfig(
        checkpoint=path,
        data_dir=data_dir,
        split="train",
        num_workers=0,
        n_bootstrap=N_BOOTSTRAP,
        top_k=2,
        progress=False,
    )
    return evaluate(config).output_dir


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    slides = hostile_slides()
    return evaluate_cohort(root, slides), slides


def local_links(page: Page) -> list[str]:
    links = [a["src"] for a in page.all("img")] + [a["href"] for a in page.all("a")]
    return [unquote(link.split("#")[0]) for link in links if link and not link.startswith("#")]


def test_the_evaluation_writes_a_page_with_every_slide_and_every_file_linked(hostile):
    out, slides = hostile
    text = (out / REPORT_HTML).read_text(encoding="utf-8")
    page = Page(text)
    rows = [a for name, a in page.tags if name == "tr" and "data-slide" in a]
    assert sorted(r["data-slide"] for r in rows) == sorted(s.slide_id for s in slides)
    ids = [a["id"] for _, a in page.tags if "id" in a]
    assert len(ids) == len(set(ids))
    for slide in slides:  # each row links to its slide's section
        assert anchor(slide.slide_id) in ids
        assert f'href="#{anchor(slide.slide_id)}"' in text
    for link in local_links(page):
        assert (out / link).is_file(), link
    images = page.all("img")
    assert len(images) == 2 + 2 * len(slides)  # ROC, confusion; a montage and a heatmap per slide
    assert all(i["loading"] == "lazy" and int(i["width"]) > 0 and int(i["height"]) > 0 for i in images)
    csvs = {link for link in local_links(page) if link.endswith(".csv")}
    assert csvs == {f"attention/{s.slide_id}.csv" for s in slides}
    assert not re.search(r"(src|href)=\"(https?:)?//", text)  # nothing from the network


def test_the_header_names_checkpoint_cohort_cache_and_encoder(hostile):
    out, _ = hostile
    text = (out / REPORT_HTML).read_text(encoding="utf-8")
    metrics = json.loads((out / "metrics.json").read_text())
    for expected in (metrics["checkpoint"], metrics["cache_key"], metrics["data_dir"], metrics["created"]):
        assert expected in text
    assert "resnet50_trunc, weights <strong>imagenet</strong>" in text
    assert "clam-egfr 0.1.0" in text
    assert "RANDOM WEIGHTS" not in text
    auc = metrics["per_patient"]["auc"]
    assert f"{auc['auc']:.3f} [{auc['ci_low']:.3f}, {auc['ci_high']:.3f}]" in text
    assert "not checked for leakage" in text  # no split.csv beside the checkpoint


def test_hostile_slide_names_render_as_text_in_text_links_and_ids(hostile):
    out, _ = hostile
    text = (out / REPORT_HTML).read_text(encoding="utf-8")
    page = Page(text)
    assert "<img src=x" not in text
    assert "&lt;img src=x onerror=alert(1)&gt;" in text  # as text
    assert not [name for _, attrs in page.tags for name in attrs if name.startswith("on")]  # no handler
    assert [a for a in page.all("img") if a.get("src") == "x"] == []
    assert len(page.scripts) == 1 and "alert" not in page.scripts[0]  # only the page's own script
    assert "&lt;img src=x onerror=alert(1)&gt; &#34;q&#34; &#39;a&#39; #1 %20?&amp;amp;" in text
    for _, attrs in page.tags:
        if "id" in attrs:
            assert re.fullmatch(r"[A-Za-z0-9_-]+", attrs["id"]), attrs["id"]
    montages = [unquote(a["src"]) for a in page.all("img") if "topk" in a["src"]]
    assert f"attention/EGFR_negative__{HOSTILE_PATIENT}_topk.png" in montages


def test_a_script_tag_as_slide_id_is_text(hostile, tmp_path):
    """A slide id that no folder can carry (it has a slash): written into predictions.csv by hand."""
    out, _ = hostile
    copy = tmp_path / "eval"
    shutil.copytree(out, copy)
    predictions = (copy / "predictions.csv").read_text(encoding="utf-8").splitlines()
    first = predictions[1].split(",")
    first[0] = SCRIPT_ID
    (copy / "predictions.csv").write_text(
        "\n".join([predictions[0], ",".join(first), *predictions[2:]]) + "\n"
    )
    text = write_eval_report(copy).read_text(encoding="utf-8")
    assert SCRIPT_ID not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    page = Page(text)
    assert len(page.all("script")) == 1
    assert f'id="{anchor(SCRIPT_ID)}"' in text and "no montage (attention maps were not drawn" in text


def test_random_weights_get_a_banner(tmp_path):
    slides = cohort_slides(n_patients=4, split="train", with_cnn=False, instances=(6, 12), seed=3)
    out = evaluate_cohort(tmp_path, slides)
    run_dir = out.parent
    cache = json.loads(
        (Path(json.loads((out / "metrics.json").read_text())["cache_dir"]) / "cache.json").read_text()
    )
    (run_dir / "config.json").write_text(json.dumps({"cache": {**cache, "weights": "random"}}))
    text = write_eval_report(out).read_text(encoding="utf-8")
    assert 'id="random-weights"' in text and "RANDOM WEIGHTS" in text
    assert "weights <strong>random</strong>" in text


def test_leakage_and_the_baseline_are_shown(hostile, tmp_path):
    slides = cohort_slides(n_patients=4, split="train", with_cnn=False, instances=(6, 12), seed=4)
    out = evaluate_cohort(tmp_path, slides)
    write_split_csv(out.parent, [(s.slide_id, s.patient_id, s.label, "train") for s in slides[:2]])
    again = evaluate(
        EvaluateConfig(
            checkpoint=out.parent / "best_model.pt",
            data_dir=tmp_path / "train",
            split="train",
            num_workers=0,
            n_bootstrap=N_BOOTSTRAP,
            attention="none",
            progress=False,
        )
    )
    text = (again.output_dir / REPORT_HTML).read_text(encoding="utf-8")
    assert 'class="banner leak"' in text and "LEAKAGE: leakage: 2 of the 4 evaluated slides" in text
    assert text.count("attention maps were not drawn for this slide") == 4
    # the baseline beside CLAM: a metrics.json with one (the report reads only the files)
    metrics = json.loads((again.output_dir / "metrics.json").read_text())
    metrics["baseline"] = {
        "method": "mean-pool logistic regression",
        "fitted_on": "the run's training bags",
        "per_slide": {**metrics["per_slide"], "accuracy": 0.123},
        "per_patient": metrics["per_patient"],
    }
    (again.output_dir / "metrics.json").write_text(json.dumps(metrics))
    table = Page(write_eval_report(again.output_dir).read_text(encoding="utf-8"))
    headers = [a for name, a in table.tags if name == "th"]
    assert len(headers) > 5
    text = (again.output_dir / REPORT_HTML).read_text(encoding="utf-8")
    assert "slide: CLAM</th><th>slide: baseline</th><th>patient: CLAM</th><th>patient: baseline" in text
    assert "0.123" in text and "mean-pool logistic regression" in text


def test_the_command_writes_the_same_page_again_without_model_or_features(hostile, tmp_path, capsys):
    out, _ = hostile
    copy = tmp_path / "run" / "eval"
    shutil.copytree(out, copy)  # no checkpoint, no cache, no tiles beside it
    expected = (out / REPORT_HTML).read_text(encoding="utf-8")
    (copy / REPORT_HTML).unlink()
    assert report_cli.main([str(copy)]) == 0
    assert capsys.readouterr().out.strip() == str(copy / REPORT_HTML)
    assert (copy / REPORT_HTML).read_text(encoding="utf-8") == expected


def test_the_command_explains_what_it_cannot_render(tmp_path, capsys):
    assert report_cli.main([str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    run = tmp_path / "run_20260101_000000"
    (run / "eval_20260101_000001").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "eval_20260101_000001" / "metrics.json").write_text("{}")
    assert report_cli.main([str(run)]) == 0  # a run folder goes to clam.training_report
    assert capsys.readouterr().out.strip() == str(run / "training.html")
    assert report_cli.main([str(run / "eval_20260101_000001")]) == 2
    assert "holds neither an evaluation (metrics.json and predictions.csv) nor" in capsys.readouterr().err
    assert report_cli.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "python -m clam.evaluate or python -m clam.train" in err
    (run / "eval_20260101_000001" / "predictions.csv").write_text("slide_id\n")
    (run / "eval_20260101_000001" / "metrics.json").write_text("{not json")
    assert report_cli.main([str(run / "eval_20260101_000001")]) == 2
    assert "metrics.json cannot be read" in capsys.readouterr().err


def test_a_cross_validation_evaluation_links_its_folds(tmp_path):
    from test_evaluate import write_crossval_run

    from clam.crossval import evaluate_folds

    slides = cohort_slides(n_patients=4, split="train", with_cnn=False, instances=(6, 12), seed=5)
    cache_dir = write_random_cache(tmp_path / "features", slides, feature_dim=32)
    data_dir = write_cohort_folders(tmp_path / "train", slides)
    write_crossval_run(tmp_path / "runs" / "run_20260102_000000", cache_dir)
    out = tmp_path / "eval"
    evaluate_folds(
        EvaluateConfig(
            checkpoint=tmp_path / "runs" / "run_20260102_000000",
            data_dir=data_dir,
            split="train",
            output_dir=out,
            num_workers=0,
            n_bootstrap=N_BOOTSTRAP,
            top_k=2,
            progress=False,
        )
    )
    text = (out / REPORT_HTML).read_text(encoding="utf-8")
    page = Page(text)
    assert 'href="fold_1/report.html"' in text and 'href="fold_2/report.html"' in text
    rows = [a for name, a in page.tags if name == "tr" and "data-slide" in a]
    assert sorted(r["data-slide"] for r in rows) == sorted(s.slide_id for s in slides)
    for slide in slides:  # each slide links to its section in each fold's page
        for fold in ("fold_1", "fold_2"):
            assert f'href="{fold}/report.html#{anchor(slide.slide_id)}"' in text
            assert f'id="{anchor(slide.slide_id)}"' in (out / fold / REPORT_HTML).read_text()
    for link in local_links(page):
        assert (out / link).is_file(), link
    assert {"roc.png", "confusion_matrix.png"} <= {unquote(a["src"]) for a in page.all("img")}
    assert "resnet50_trunc" in text and "Ensemble of the fold models" in text
    (out / "fold_1" / REPORT_HTML).unlink()
    assert report_cli.main([str(out)]) == 0  # the folds' pages are written again too
    assert (out / "fold_1" / REPORT_HTML).is_file()
