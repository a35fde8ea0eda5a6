"""The training configuration: every argument of ``python -m clam.train``, its checks, and how a
``--resume`` merges it with the arguments a checkpoint was trained with.

The checkpoints and config.json record it as ``args`` (``config_args``) under the command line's
names: the instance loss is the field ``instance_loss`` (as in ``clam.model.ModelConfig``) and the
flag and ``args`` key ``inst_loss`` (CLAM's), so runs of any version resume.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from clam.checkpoints import SavedProgress, saved_run
from clam.model import FEATURE_NORMS, INSTANCE_LOSSES, MODEL_SIZES, MODEL_TYPES, ModelConfig
from clam.training_report import require_tensorboard
from feature_extraction.errors import PipelineError
from feature_extraction.layout import SPLITS

BALANCE_CHOICES = ("loss", "sampler", "none")
# On --resume these may be given anew, when typed (``explicit``); everything else continues as it was.
RESUME_OVERRIDES = frozenset(
    {"num_epochs", "patience", "device", "num_workers", "in_memory", "progress", "resume", "tensorboard"}
)
# Fields whose command-line flag and ``args`` key have another name.
ARG_NAMES = {"instance_loss": "inst_loss"}
FIELD_NAMES = {arg: name for name, arg in ARG_NAMES.items()}


@dataclass(frozen=True)
class TrainConfig:
    """Every training argument; the checkpoint stores it as ``args``. None paths mean the defaults."""

    data_dir: str | None = None
    split: str = "train"
    max_tiles: int = 100
    num_workers: int = 4
    model_size: str = "small"
    dropout: float = 0.25
    k_sample: int = 8
    n_classes: int = 2
    num_epochs: int = 10
    batch_size: int = 1
    learning_rate: float = 1e-4
    features_dir: str | None = None
    backbone: str = "resnet50_trunc"
    weights: str = "imagenet"
    labels_csv: str | None = None
    model_type: str = "clam_sb"
    bag_weight: float = 0.7
    instance_loss: str = "ce"  # --inst_loss
    subtyping: bool = False
    weight_decay: float = 1e-5
    val_fraction: float = 0.2
    balance: str = "loss"
    seed: int = 0
    device: str = "auto"
    patience: int | None = None
    in_memory: str = "auto"
    resume: str | None = None
    output_dir: str | None = None
    progress: bool = True
    folds: int = 0  # K >= 2: patient-level K-fold cross-validation (clam.crossval); 0: one run
    splits: str | None = None  # a cross-validation splits file to reuse (clam.crossval)
    feature_norm: str = "standard"  # per-dimension standardisation with the training instances' statistics
    # Instances drawn from each bag per training epoch (validation: one fixed draw); 0: every instance.
    # ``max_tiles`` is the embedding's subset (which cache, and at most that many tiles per bag).
    sample_tiles: int = 0
    tensorboard: bool = False  # also write each epoch's scalars under run_dir/tensorboard (needs tensorboard)

    def model_config(self, in_dim: int) -> ModelConfig:
        return ModelConfig(
            self.model_type,
            in_dim,
            self.n_classes,
            self.model_size,
            self.dropout,
            self.k_sample,
            self.instance_loss,
            self.subtyping,
            self.feature_norm,
        )


def flag(name: str) -> str:
    """The command-line flag of a TrainConfig field."""
    return f"--{ARG_NAMES.get(name, name)}"


def config_args(config: TrainConfig) -> dict[str, Any]:
    """``args`` as checkpoints and config.json record it: the fields under their command-line names."""
    return {ARG_NAMES.get(name, name): value for name, value in asdict(config).items()}


def fields_of_args(args: dict[str, Any]) -> dict[str, Any]:
    """The TrainConfig fields of a recorded ``args`` (names it does not know are left out)."""
    known = {f.name for f in fields(TrainConfig)}
    renamed = {FIELD_NAMES.get(name, name): value for name, value in args.items()}
    return {name: value for name, value in renamed.items() if name in known}


def check_config(config: TrainConfig) -> None:
    checks = [
        (config.split in SPLITS, f"--split {config.split}: use one of {SPLITS}"),
        (config.model_type in MODEL_TYPES, f"--model_type {config.model_type}: use one of {MODEL_TYPES}"),
        (
            config.model_size in MODEL_SIZES,
            f"--model_size {config.model_size}: use one of {tuple(MODEL_SIZES)}",
        ),
        (
            config.instance_loss in INSTANCE_LOSSES,
            f"--inst_loss {config.instance_loss}: use one of {INSTANCE_LOSSES}",
        ),
        (config.balance in BALANCE_CHOICES, f"--balance {config.balance}: use one of {BALANCE_CHOICES}"),
        (config.in_memory in ("auto", "yes", "no"), f"--in_memory {config.in_memory}: use auto, yes or no"),
        (
            config.feature_norm in FEATURE_NORMS,
            f"--feature_norm {config.feature_norm}: use one of {FEATURE_NORMS}",
        ),
        (config.n_classes >= 2, "--n_classes must be at least 2"),
        (
            config.num_epochs >= 1 and config.batch_size >= 1,
            "--num_epochs and --batch_size must be at least 1",
        ),
        (config.k_sample >= 1, "--k_sample must be at least 1"),
        (0.0 <= config.dropout < 1.0, "--dropout must be in [0, 1)"),
        (0.0 <= config.bag_weight <= 1.0, "--bag_weight must be in [0, 1]"),
        (
            config.learning_rate > 0 and config.weight_decay >= 0,
            "--learning_rate must be > 0, --weight_decay >= 0",
        ),
        (config.patience is None or config.patience >= 1, "--patience must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise PipelineError(message)
    if config.tensorboard:
        require_tensorboard()


def config_for_resume(config: TrainConfig, checkpoint: dict, explicit: frozenset[str]) -> TrainConfig:
    """The checkpoint's arguments; of ``config``, only the RESUME_OVERRIDES the caller typed
    (``explicit``) replace them, and ``resume`` itself. An argument in ``explicit`` that would
    change the run is refused: it would be another run.

    From the command line ``explicit`` is what the user typed (``parse_args``). A library caller
    of ``train(config, explicit)`` names the fields of ``config`` that should override the
    checkpoint the same way: with the default ``explicit=frozenset()`` the run continues exactly
    as it was started (its own ``num_epochs``, ``patience``, device, ...), whatever else
    ``config`` holds."""
    saved = saved_run(checkpoint)
    if not saved.args:
        raise PipelineError(f"checkpoint {config.resume} has no training arguments; it cannot be resumed.")
    merged = fields_of_args(saved.args)
    # A run from before --feature_norm existed trained on raw features.
    merged.setdefault("feature_norm", saved.model_config.get("feature_norm", "none"))
    # A run from before --sample_tiles drew --max_tiles instances of each bag every epoch.
    merged.setdefault("sample_tiles", merged.get("max_tiles", 0))
    conflicts = [
        f"{flag(name)} (run: {merged.get(name)!r}, given: {getattr(config, name)!r})"
        for name in sorted(explicit - RESUME_OVERRIDES)
        if name in merged and merged[name] != getattr(config, name)
    ]
    if conflicts:
        raise PipelineError(
            f"--resume continues a run as it was started; these arguments differ: {', '.join(conflicts)}. "
            "Start a new run to change them."
        )
    merged.update({name: getattr(config, name) for name in RESUME_OVERRIDES & explicit})
    merged["resume"] = config.resume
    return TrainConfig(**merged)


def nothing_to_resume(config: TrainConfig, progress: SavedProgress) -> str | None:
    """Why resuming ``config.resume`` would train no epoch (None: it trains). Such a resume writes nothing."""
    if progress.epoch >= config.num_epochs:
        more = "" if progress.epoch > config.num_epochs else " already"
        return (
            f"nothing to train: {Path(config.resume).name} is at epoch {progress.epoch} and the run{more} "
            f"ends at --num_epochs {config.num_epochs}. Pass --num_epochs larger than {progress.epoch} to train "
            "more epochs; the run folder is left as it is."
        )
    if config.patience is not None and progress.epochs_since_best >= config.patience:
        return (
            f"nothing to train: the run stopped early at epoch {progress.epoch} (no lower loss for "
            f"{progress.epochs_since_best} epochs, --patience {config.patience}). Pass a larger --patience "
            "to train more epochs; the run folder is left as it is."
        )
    return None
