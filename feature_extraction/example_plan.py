"""What the example cohort holds, before any pixel: its settings, its slides and their labels.

    DIFFICULTIES / Difficulty   the presets of the knobs that make the cohort harder
    CohortConfig                size and look of the cohort; ``preset_config`` fills it from a preset
    plan_slides(config, split)  the slides of a split (SlidePlan: patient, true label, flipped)
    witness_tile_range(config)  how many witness tiles a positive slide has

See ``example_cohort`` for what the knobs mean and for the files written.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace

import numpy as np

from feature_extraction.errors import PipelineError
from feature_extraction.layout import SPLIT_FOLDERS, slide_id_for


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
            raise PipelineError(
                "tiles_per_slide must be at least 4: a positive slide needs one "
                "signal tile and at most a quarter of its tiles may carry it"
            )
        if not 0 < self.signal_fraction[0] <= self.signal_fraction[1] <= 0.25:
            raise PipelineError(
                f"signal_fraction (witness fraction) {tuple(self.signal_fraction)} must satisfy "
                "0 < low <= high <= 0.25: the witness tiles are a minority, at most a quarter, of a slide's tiles"
            )
        if not 0 < self.signal_strength <= 1:
            raise PipelineError(
                f"signal_strength {self.signal_strength} must be in (0, 1]: 1 is the full-strength "
                "planted signal of the easy preset, smaller values make it subtler"
            )
        if not 0 <= self.label_noise < 0.5:
            raise PipelineError(
                f"label_noise {self.label_noise} must be in [0, 0.5): it is the fraction of patients "
                "recorded under the wrong label, and at 0.5 or more the labels say nothing"
            )
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
        if not 1 <= self.shared_cnn_patients <= self.cnn_slides_per_class or plain < max(
            1, self.shared_cnn_patients
        ):
            raise PipelineError(
                f"n_train_patients={self.n_train_patients} is too few for cnn_slides_per_class="
                f"{self.cnn_slides_per_class} with shared_cnn_patients={self.shared_cnn_patients}: "
                "each label needs at least as many plain patients as shared _cnn patients"
            )


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
        return next(
            folder
            for folder, (label, _) in SPLIT_FOLDERS[self.split].items()
            if label != self.label and folder.endswith("_cnn") == cnn
        )

    @property
    def slide_id(self) -> str:
        return slide_id_for(self.recorded_folder, self.patient_id)


def preset_config(
    difficulty: str = "easy",
    *,
    seed: int = 0,
    n_train_patients: int = 36,
    n_test_patients: int = 20,
    tiles_per_slide: int | None = None,
    tile_size: int = 256,
    cnn_slides_per_class: int | None = None,
    shared_cnn_patients: int | None = None,
    signal_fraction: tuple[float, float] | float | None = None,
    signal_strength: float | None = None,
    label_noise: float | None = None,
    label_noise_splits: tuple[str, ...] = ("train",),
    image_format: str = "png",
) -> CohortConfig:
    """A validated CohortConfig: ``difficulty`` names a preset of DIFFICULTIES; the knobs left at
    None take the preset's value (``signal_fraction`` may be one number or a (low, high) range).
    By default each label has ``min(4, n_train_patients // 4)`` (at least 1) ``_cnn`` slides,
    half of them (at least 1) from patients who also have a plain folder. PipelineError names a
    setting out of range."""
    if difficulty not in DIFFICULTIES:
        raise PipelineError(f"difficulty {difficulty!r}: use one of {', '.join(DIFFICULTIES)}")
    preset = DIFFICULTIES[difficulty]
    if signal_fraction is None:
        signal_fraction = preset.signal_fraction
    elif isinstance(signal_fraction, (int, float)):
        signal_fraction = (signal_fraction, signal_fraction)
    if cnn_slides_per_class is None:
        cnn_slides_per_class = max(1, min(4, n_train_patients // 2 // 2))
    if shared_cnn_patients is None:
        shared_cnn_patients = max(1, cnn_slides_per_class // 2)
    config = CohortConfig(
        seed=seed,
        n_train_patients=n_train_patients,
        n_test_patients=n_test_patients,
        cnn_slides_per_class=cnn_slides_per_class,
        shared_cnn_patients=shared_cnn_patients,
        tiles_per_slide=preset.tiles_per_slide if tiles_per_slide is None else tiles_per_slide,
        tile_size=tile_size,
        signal_fraction=tuple(signal_fraction),
        image_format=image_format,
        difficulty=difficulty,
        signal_strength=preset.signal_strength if signal_strength is None else signal_strength,
        label_noise=preset.label_noise if label_noise is None else label_noise,
        label_noise_splits=tuple(label_noise_splits),
    )
    config.validate()
    return config


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
    for label_name, n_patients in (
        ("EGFR_positive", n_pos),
        ("EGFR_negative", config.n_train_patients - n_pos),
    ):
        label = SPLIT_FOLDERS["train"][label_name][0]
        cnn_only = config.cnn_slides_per_class - config.shared_cnn_patients
        names = [f"P{number + i + 1:04d}" for i in range(n_patients)]
        number += n_patients
        plain, extra = names[: n_patients - cnn_only], names[n_patients - cnn_only :]
        plans += [SlidePlan("train", label_name, name, label) for name in plain]
        # Spread the shared patients over the plain list so they are not all the first ones.
        shared = plain[:: max(1, len(plain) // config.shared_cnn_patients)][: config.shared_cnn_patients]
        plans += [SlidePlan("train", f"{label_name}_cnn", name, label) for name in shared + extra]
    return plans


def witness_tile_range(config: CohortConfig) -> tuple[int, int]:
    """Fewest and most witness tiles of a positive slide: the witness fraction of its tiles,
    rounded inwards to whole tiles (the low end rounded up where the range holds no whole
    number), and never fewer than one."""
    # round(): 0.07 x 100 is 7.000000000000001 in floating point, and must stay 7 tiles.
    low = max(1, math.ceil(round(config.signal_fraction[0] * config.tiles_per_slide, 6)))
    high = max(low, math.floor(round(config.signal_fraction[1] * config.tiles_per_slide, 6)))
    return low, high
