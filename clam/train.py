"""``python -m clam.train``: train CLAM on the cached feature bags (the user's specification).

    python -m clam.train                                    # <project root>/train, defaults
    python -m clam.train --data_dir /path/to/data --split test
    python -m clam.train --features_dir DIR --labels_csv labels.csv   # any folder of HDF5 bags
    python -m clam.train --resume clam/checkpoints/run_.../checkpoint_epoch_3.pt

``train(config)`` is the library entry point; ``load_checkpoint`` is re-exported from
``clam.checkpoints`` as the specification shows it (``from clam.train import load_checkpoint``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from feature_extraction.atomic import atomic_write_json, remove_stale_temps
from feature_extraction.errors import Interrupted, PipelineError, cli_main, write_failure
from feature_extraction.layout import SPLITS, default_data_dir, default_features_dir, project_root

from clam import __version__
from clam.checkpoints import (
    BEST_NAME,
    CONFIG_NAME,
    checkpoint_name,
    load_checkpoint,
    make_run_dir,
    model_from_checkpoint,
    read_checkpoint,
    resolve_device,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from clam.baselines import comparison, describe as describe_baseline, fit_baseline, pool_bags
from clam.data import (
    BagChanged,
    BagDataset,
    BagSet,
    LoaderPlan,
    class_counts,
    collate_bags,
    epoch_order,
    feature_statistics,
    inverse_frequency_weights,
    is_cache_dir,
    limit_tiles,
    plan_loading,
    read_cache_config,
    records_from_cache,
    records_from_labels_csv,
    resolve_cache,
    validate_records,
)
from clam.metrics import epoch_metrics, roc_auc
from clam.model import (
    FEATURE_NORMS,
    INSTANCE_LOSSES,
    MODEL_SIZES,
    MODEL_TYPES,
    ModelConfig,
    clam_loss,
    model_from_config,
)
from clam.splits import SPLIT_FILE, TrainValSplit, read_split, train_val_split, write_split

__all__ = ["TrainConfig", "train", "main", "load_checkpoint", "model_from_checkpoint"]

BALANCE_CHOICES = ("loss", "sampler", "none")
VAL_BATCH_SIZE = 16
# On --resume these may be given anew, when typed (``explicit``); everything else continues as it was.
RESUME_OVERRIDES = frozenset({"num_epochs", "patience", "device", "num_workers", "in_memory", "progress", "resume"})


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
    inst_loss: str = "ce"
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

    def model_config(self, in_dim: int) -> ModelConfig:
        return ModelConfig(self.model_type, in_dim, self.n_classes, self.model_size, self.dropout,
                           self.k_sample, self.inst_loss, self.subtyping, self.feature_norm)


def train(config: TrainConfig, explicit: frozenset[str] = frozenset(), log: Callable[[str], None] = print,
          split: TrainValSplit | None = None, run_dir: Path | None = None) -> Path:
    """Train as ``config`` says (or continue ``config.resume``); returns the run folder.

    ``split`` and ``run_dir`` (both or neither) replace the seeded split and the new run folder:
    clam.crossval trains each fold this way."""
    resumed = read_checkpoint(config.resume, "cpu") if config.resume else None
    if resumed is not None:
        config = _config_for_resume(config, resumed, explicit)
    _check_config(config)
    if resumed is not None:
        reason = _nothing_to_resume(config, RunState.from_checkpoint(resumed))
        if reason:
            log(reason)
            return Path(config.resume).parent
    device = resolve_device(config.device)
    # A checkpoint from before --sample_tiles drew max_tiles instances per epoch from whole bags.
    legacy_draw = resumed is not None and "sample_tiles" not in resumed["args"]
    bags = load_bags(config, log, limit=not legacy_draw)
    if resumed is not None:
        run_dir = Path(config.resume).parent
        remove_stale_temps(run_dir)  # a killed run's half-written checkpoint
        split = read_split(run_dir / SPLIT_FILE, bags.records)
    else:
        split = split or make_split(bags, config)
        run_dir = _start_run_folder(run_dir, config, split)
    plan = plan_loading(bags.total_bytes, config.in_memory, config.num_workers, device)
    torch.set_num_threads(plan.torch_threads)
    train_set = BagDataset(split.train, config.sample_tiles, config.seed, True, plan.in_memory, config.progress)
    val_set = BagDataset(split.val, config.sample_tiles, config.seed, False, plan.in_memory, config.progress)

    torch.manual_seed(config.seed)
    model = model_from_config(config.model_config(bags.feature_dim))
    if resumed is None:
        feature_norm = standardise_features(model, train_set, config, log)
        baseline = fit_run_baseline(train_set, val_set, config)
    else:  # both were computed when the run started: the statistics come with the model's weights
        feature_norm = resumed.get("feature_norm") or {"method": config.feature_norm}
        baseline = resumed.get("baseline") or fit_run_baseline(train_set, val_set, config)
    model = model.to(device)
    optimizer = make_optimizer(model, config, device)
    counts = class_counts(split.train, config.n_classes)
    class_weights = inverse_frequency_weights(counts) if config.balance == "loss" else None
    state = RunState()
    if resumed is not None:
        load_checkpoint(config.resume, model, optimizer, device)
        for group in optimizer.param_groups:  # the saved groups carry the saving torch's kernel choice
            group["fused"], group["foreach"] = optimizer.defaults.get("fused"), optimizer.defaults.get("foreach")
        set_rng_state(resumed["rng_state"])
        state = RunState.from_checkpoint(resumed)
        log(f"resuming {run_dir} after epoch {state.epoch}")
    run_info = _run_info(config, bags, split, plan, model, counts, class_weights, run_dir)
    run_info["feature_norm"] = feature_norm
    run_info["optimizer"] = {"name": "Adam", "fused": _is_fused(optimizer)}
    run_info["baseline"] = {k: v for k, v in baseline.items() if k != "params"}
    log(f"run folder: {run_dir}\n{_describe_run(run_info)}")

    weights_tensor = torch.tensor(class_weights, device=device) if class_weights else None
    state.stopped_early = config.patience is not None and state.epochs_since_best >= config.patience
    last_saved = Path(config.resume) if resumed is not None else None  # the newest complete checkpoint
    warned: set[str] = set()
    for epoch in range(state.epoch + 1, config.num_epochs + 1):
        if state.stopped_early:
            log(f"early stopping: the {'validation' if len(val_set) else 'training'} loss has not improved for "
                f"{state.epochs_since_best} epochs (best epoch {state.best_epoch}, loss {state.best_loss:.4f})")
            break
        started = time.perf_counter()
        try:
            train_loader = make_loader(train_set, config, plan, device, epoch, train=True)
            train_metrics = train_one_epoch(model, optimizer, train_loader, config, device, weights_tensor,
                                            f"epoch {epoch}")
            val_metrics = None
            if len(val_set):
                val_loader = make_loader(val_set, config, plan, device, epoch, train=False)
                val_metrics = evaluate(model, val_loader, config, device, f"epoch {epoch} val")
        except BagChanged as error:
            raise _bag_changed(train_set, val_set, last_saved) or error
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted during epoch {epoch}; {_way_on(last_saved)}") from None
        if plan.in_memory:
            _warn_changed_in_memory(train_set, val_set, warned, log)
        state.record(epoch, train_metrics, val_metrics, time.perf_counter() - started, config.patience)
        if epoch == config.num_epochs or state.stopped_early:  # the last epoch's config.json says how the run ended
            state.status = "stopped early" if epoch < config.num_epochs else "finished"
            run_info["baseline"].update(compare_with_baseline(state, run_info["baseline"], len(val_set)))
        last_saved = save_epoch(run_dir, model, optimizer, config, state, run_info, baseline, last_saved)
        log(state.summary_line(config.num_epochs))
    verdict = run_info["baseline"]
    log(f"done: best epoch {state.best_epoch} (loss {state.best_loss:.4f}) -> {run_dir / BEST_NAME}\n"
        f"{verdict['line']}")
    if verdict["warning"]:
        log(f"warning: {verdict['warning']}")
    return run_dir


# ---------------------------------------------------------------- set-up


def default_output_dir() -> Path:
    return project_root() / "clam" / "checkpoints"


def _start_run_folder(run_dir: Path | None, config: TrainConfig, split: TrainValSplit) -> Path:
    """Create the run folder (a new one unless ``run_dir`` is given) and write split.csv in it.
    A folder that cannot be created or written raises WriteError, naming it and what to do."""
    output_dir = Path(config.output_dir) if config.output_dir else default_output_dir()
    try:
        run_dir = make_run_dir(output_dir) if run_dir is None else run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise write_failure(output_dir, error, "No run was started: pass a writable --output_dir, or run the "
                                               "command again once that is fixed.",
                            what="cannot create a run folder in") from error
    try:
        write_split(run_dir / SPLIT_FILE, split)
    except OSError as error:
        with contextlib.suppress(OSError):
            run_dir.rmdir()  # nothing else is in it yet
        raise write_failure(run_dir / SPLIT_FILE, error, "Nothing was trained: run the command again once that is "
                                                         "fixed, or pass another --output_dir.") from error
    return run_dir


def _way_on(last_saved: Path | None) -> str:
    """What to run after a stop, given the newest complete checkpoint (None: none yet)."""
    if last_saved is None:
        return "no epoch was saved yet: run the command again"
    return f"continue with: python -m clam.train --resume {last_saved}"


def _bag_changed(train_set: BagDataset, val_set: BagDataset, last_saved: Path | None) -> BagChanged | None:
    """The error for a bag replaced under the running training (found again here, in the main
    process, when a loader worker raised it), with how to go on; None if none changed."""
    changed = train_set.changed() + val_set.changed()
    if not changed:
        return None
    then = f"once embedding has finished, {_way_on(last_saved)}"
    others = f" ({len(changed) - 1} other bags changed too.)" if len(changed) > 1 else ""
    return BagChanged(f"{BagChanged.of(changed[0], then)}{others}")


def _warn_changed_in_memory(train_set: BagDataset, val_set: BagDataset, warned: set[str],
                            log: Callable[[str], None]) -> None:
    """In memory every bag was read once, before the first epoch: a bag replaced afterwards does
    not reach this run. Say so, once per bag: a --resume or a new run reads the new file."""
    for record in train_set.changed() + val_set.changed():
        if record.slide_id not in warned:
            warned.add(record.slide_id)
            log(f"warning: bag {record.path} changed on disk after this run read it into memory; this run goes on "
                "with the features it read, but a --resume or a new run will read the new bag.")


def load_bags(config: TrainConfig, log: Callable[[str], None] = print, limit: bool = True) -> BagSet:
    """The validated bags to train on: from a labels CSV and a folder of bags, or from the
    feature cache of ``data_dir`` (embedding missing slides first). With ``limit``, a bag holding
    more than ``--max_tiles`` tiles is cut to its ``--max_tiles`` subset (``clam.data.limit_tiles``)."""
    bags = _validated_bags(config, log)
    if not limit:
        return bags
    bags, cut = limit_tiles(bags, config.max_tiles, config.seed)
    if cut:
        log(f"--max_tiles {config.max_tiles}: {cut} of {len(bags.records)} bags hold more tiles (their cache was "
            f"embedded with more); each is cut to its seeded {config.max_tiles}-tile subset, the one stage 1 embeds "
            f"with --max_tiles {config.max_tiles}. --max_tiles 0 uses every tile.")
    return bags


def _validated_bags(config: TrainConfig, log: Callable[[str], None]) -> BagSet:
    if config.labels_csv:
        if not config.features_dir:
            raise PipelineError("--labels_csv needs --features_dir: the folder holding <slide_id>.h5 bags.")
        bags_dir = Path(config.features_dir)
        records = records_from_labels_csv(Path(config.labels_csv), bags_dir)
        cache_config = read_cache_config(bags_dir) if is_cache_dir(bags_dir) else {}
        return validate_records(records, bags_dir, config.n_classes, cache_config, config.progress)
    features_dir = Path(config.features_dir) if config.features_dir else default_features_dir()
    data_dir = Path(config.data_dir) if config.data_dir else default_data_dir(config.split)
    if config.data_dir is None and is_cache_dir(features_dir):
        data_dir = None  # one cache folder and no --data_dir: every bag of the split in its manifest
    cache_dir, slide_ids = resolve_cache(
        features_dir, data_dir, config.split, backbone=config.backbone, weights=config.weights,
        max_tiles=config.max_tiles, seed=config.seed, device=config.device, num_workers=config.num_workers, log=log,
    )
    records = records_from_cache(cache_dir, slide_ids, config.split, log)
    return validate_records(records, cache_dir, config.n_classes, read_cache_config(cache_dir), config.progress)


def standardise_features(model, train_set: BagDataset, config: TrainConfig,
                         log: Callable[[str], None] = print) -> dict[str, Any]:
    """With ``--feature_norm standard``, set the model's FeatureNorm to the per-dimension mean and
    std of every instance of the training bags (never validation or test bags); returns what
    config.json records (and checkpoints, so --resume reuses it with the statistics in the weights)."""
    if config.feature_norm != "standard":
        return {"method": "none", "description": "raw features, as CLAM"}
    stats = feature_statistics(train_set.all_instances())
    model.feature_norm.set_statistics(stats.mean, stats.std)
    log(f"feature standardisation: mean and std per dimension from {stats.describe()}")
    return {"method": "standard", "description": "(x - mean) / std per dimension, training instances' statistics "
                                                 "(stored in the model as feature_norm.mean / feature_norm.std)",
            **stats.to_dict()}


def fit_run_baseline(train_set: BagDataset, val_set: BagDataset, config: TrainConfig, pool: str = "mean") -> dict[str, Any]:
    """The pooled logistic-regression baseline on the same bags (the validation draw of each bag):
    fitted on the training bags, scored on the validation bags. ``params`` goes into checkpoints."""
    def pooled(dataset: BagDataset):
        return pool_bags(dataset.instances(i, None) for i in range(len(dataset)))

    started = time.perf_counter()
    train_labels = [r.label for r in train_set.records]
    train_pooled = pooled(train_set)
    fitted = fit_baseline(train_pooled, train_labels, config.n_classes, pool, config.seed)
    result: dict[str, Any] = {"method": describe_baseline(pool), "train_auc": None, "val_auc": None,
                              "n_val_bags": len(val_set)}
    if fitted is None:
        return {**result, "note": "the training bags hold one class only: no baseline"}
    result["train_auc"] = roc_auc(train_labels, fitted.probs(train_pooled), config.n_classes)[0]
    if len(val_set):
        val_labels = [r.label for r in val_set.records]
        result["val_auc"] = roc_auc(val_labels, fitted.probs(pooled(val_set)), config.n_classes)[0]
    result["seconds"] = round(time.perf_counter() - started, 3)
    return {**result, "params": fitted.to_dict()}


def compare_with_baseline(state: "RunState", baseline: dict[str, Any], n_val: int) -> dict[str, Any]:
    """CLAM's validation AUC at its best epoch beside the baseline's, and a warning when CLAM is clearly worse."""
    best = next((row for row in state.history if row["epoch"] == state.best_epoch), {})
    clam_auc, base_auc = best.get("val_auc"), baseline.get("val_auc")
    if not n_val:
        line = "no validation set: CLAM and the baseline are not compared"
    else:
        line = (f"validation AUC: CLAM {_fmt(clam_auc)} (best epoch {state.best_epoch}) | "
                f"baseline {_fmt(base_auc)} ({baseline['method']})")
    return {"clam_val_auc": clam_auc, "line": line, "warning": comparison(clam_auc, base_auc, n_val)}


FUSED_CPU_TORCH = (2, 4)  # fused Adam on a CPU needs torch 2.4 or later


def make_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """CLAM's optimiser (Adam with L2 weight decay). The fused kernel updates all parameters in one
    call (same arithmetic, far less per-step overhead at --batch_size 1) where this torch has it
    for ``device``; otherwise, or when torch refuses it, the default Adam."""
    params = list(model.parameters())  # twice, when the fused attempt is refused
    kwargs = {"lr": config.learning_rate, "weight_decay": config.weight_decay}
    if _fused_possible(device):
        try:
            return torch.optim.Adam(params, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):  # an older torch, or no fused kernel for this device
            pass
    return torch.optim.Adam(params, **kwargs)


def _fused_possible(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return device.type == "cpu" and _torch_version() >= FUSED_CPU_TORCH


def _torch_version() -> tuple[int, int]:
    try:
        major, minor = str(torch.__version__).split("+")[0].split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return (0, 0)


def _is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return bool(optimizer.defaults.get("fused"))


def _check_config(config: TrainConfig) -> None:
    checks = [
        (config.split in SPLITS, f"--split {config.split}: use one of {SPLITS}"),
        (config.model_type in MODEL_TYPES, f"--model_type {config.model_type}: use one of {MODEL_TYPES}"),
        (config.model_size in MODEL_SIZES, f"--model_size {config.model_size}: use one of {tuple(MODEL_SIZES)}"),
        (config.inst_loss in INSTANCE_LOSSES, f"--inst_loss {config.inst_loss}: use one of {INSTANCE_LOSSES}"),
        (config.balance in BALANCE_CHOICES, f"--balance {config.balance}: use one of {BALANCE_CHOICES}"),
        (config.in_memory in ("auto", "yes", "no"), f"--in_memory {config.in_memory}: use auto, yes or no"),
        (config.feature_norm in FEATURE_NORMS, f"--feature_norm {config.feature_norm}: use one of {FEATURE_NORMS}"),
        (config.n_classes >= 2, "--n_classes must be at least 2"),
        (config.num_epochs >= 1 and config.batch_size >= 1, "--num_epochs and --batch_size must be at least 1"),
        (config.k_sample >= 1, "--k_sample must be at least 1"),
        (0.0 <= config.dropout < 1.0, "--dropout must be in [0, 1)"),
        (0.0 <= config.bag_weight <= 1.0, "--bag_weight must be in [0, 1]"),
        (config.learning_rate > 0 and config.weight_decay >= 0, "--learning_rate must be > 0, --weight_decay >= 0"),
        (config.patience is None or config.patience >= 1, "--patience must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise PipelineError(message)


def _config_for_resume(config: TrainConfig, checkpoint: dict, explicit: frozenset[str]) -> TrainConfig:
    """The checkpoint's arguments; of ``config``, only the RESUME_OVERRIDES the caller typed
    (``explicit``) replace them, and ``resume`` itself. An argument in ``explicit`` that would
    change the run is refused: it would be another run.

    From the command line ``explicit`` is what the user typed (``parse_args``). A library caller
    of ``train(config, explicit)`` names the fields of ``config`` that should override the
    checkpoint the same way: with the default ``explicit=frozenset()`` the run continues exactly
    as it was started (its own ``num_epochs``, ``patience``, device, ...), whatever else
    ``config`` holds."""
    saved = checkpoint.get("args")
    if not isinstance(saved, dict):
        raise PipelineError(f"checkpoint {config.resume} has no training arguments; it cannot be resumed.")
    known = {f.name for f in fields(TrainConfig)}
    merged = {k: v for k, v in saved.items() if k in known}
    # A run from before --feature_norm existed trained on raw features.
    merged.setdefault("feature_norm", (checkpoint.get("model_config") or {}).get("feature_norm", "none"))
    # A run from before --sample_tiles drew --max_tiles instances of each bag every epoch.
    merged.setdefault("sample_tiles", merged.get("max_tiles", 0))
    conflicts = [f"--{name} (run: {saved.get(name)!r}, given: {getattr(config, name)!r})"
                 for name in sorted(explicit - RESUME_OVERRIDES) if name in merged and merged[name] != getattr(config, name)]
    if conflicts:
        raise PipelineError(f"--resume continues a run as it was started; these arguments differ: {', '.join(conflicts)}. "
                            "Start a new run to change them.")
    merged.update({name: getattr(config, name) for name in RESUME_OVERRIDES & explicit})
    merged["resume"] = config.resume
    return TrainConfig(**merged)


def _nothing_to_resume(config: TrainConfig, state: "RunState") -> str | None:
    """Why resuming ``config.resume`` would train no epoch (None: it trains). Such a resume writes nothing."""
    if state.epoch >= config.num_epochs:
        more = "" if state.epoch > config.num_epochs else " already"
        return (f"nothing to train: {Path(config.resume).name} is at epoch {state.epoch} and the run{more} ends at "
                f"--num_epochs {config.num_epochs}. Pass --num_epochs larger than {state.epoch} to train more epochs; "
                "the run folder is left as it is.")
    if config.patience is not None and state.epochs_since_best >= config.patience:
        return (f"nothing to train: the run stopped early at epoch {state.epoch} (no lower loss for "
                f"{state.epochs_since_best} epochs, --patience {config.patience}). Pass a larger --patience to train "
                "more epochs; the run folder is left as it is.")
    return None


def make_split(bags: BagSet, config: TrainConfig) -> TrainValSplit:
    split = train_val_split(bags.records, config.val_fraction, config.seed)
    if not split.train:
        raise PipelineError(f"no bags left for training in {bags.cache_dir}; lower --val_fraction.")
    return split


# ---------------------------------------------------------------- one epoch


def make_loader(dataset: BagDataset, config: TrainConfig, plan: LoaderPlan, device: torch.device,
                epoch: int, train: bool) -> DataLoader:
    """Training: the bags of ``epoch`` in their seeded order; validation: in a fixed order."""
    dataset.set_epoch(epoch)
    order = (epoch_order(dataset.records, config.n_classes, config.seed, epoch, config.balance == "sampler")
             if train else None)
    # Validation runs forward only, so it batches bags (padded, same results) whatever --batch_size
    # is, unless bags are unbounded (--max_tiles 0 without --sample_tiles) and a padded batch could be huge.
    bounded = config.max_tiles > 0 or config.sample_tiles > 0
    batch_size = config.batch_size if train or not bounded else max(config.batch_size, VAL_BATCH_SIZE)
    return DataLoader(dataset, batch_size=batch_size, sampler=order, collate_fn=collate_bags,
                      num_workers=plan.num_workers, pin_memory=device.type == "cuda",
                      generator=torch.Generator().manual_seed(config.seed))  # seeds worker processes only


def train_one_epoch(model, optimizer, loader: DataLoader, config: TrainConfig, device: torch.device,
                    class_weights: torch.Tensor | None, desc: str = "train") -> dict[str, Any]:
    """One pass over ``loader``; mean losses per bag and the classification metrics."""
    model.train()
    losses: dict[str, list[torch.Tensor]] = {"loss": [], "bag_loss": [], "instance_loss": []}
    sizes, probs, labels = [], [], []
    hits = torch.zeros(2, device=device)
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not config.progress):
        batch = batch.to(device)
        output = model(batch.features, batch.mask, batch.labels)
        total, bag_loss = clam_loss(output, batch.labels, config.bag_weight, class_weights)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        # Kept on the device and averaged once per epoch: no host synchronisation per step
        # (CLAM calls .item() on each bag's losses).
        for name, value in zip(losses, (total, bag_loss, output.instance_loss)):
            losses[name].append(value.detach())
        hits += output.instance_hits
        sizes.append(len(batch.labels))
        probs.append(output.probs.detach())
        labels.append(batch.labels)
    weights = torch.tensor(sizes, device=device, dtype=torch.float32) / sum(sizes)
    means = {name: float((torch.stack(values) * weights).sum()) for name, values in losses.items()}
    return {**means, "inst_acc": _accuracy(hits), **_classification(labels, probs, config)}


@torch.inference_mode()
def evaluate(model, loader: DataLoader, config: TrainConfig, device: torch.device, desc: str = "val") -> dict[str, Any]:
    """Validation metrics. ``loss`` (the monitored one) is the unweighted bag cross-entropy, as in
    CLAM's validation; as there, the instance loss and the instance classifiers' accuracy on the
    top and bottom ``k_sample`` instances (``inst_acc``) are computed in eval mode with the labels."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    instance_sum = torch.zeros((), device=device)
    hits = torch.zeros(2, device=device)
    probs, labels = [], []
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not config.progress):
        batch = batch.to(device)
        output = model(batch.features, batch.mask, batch.labels, instance_eval=True)
        loss_sum += torch.nn.functional.cross_entropy(output.logits, batch.labels, reduction="sum")
        instance_sum += output.instance_loss * len(batch.labels)
        hits += output.instance_hits
        probs.append(output.probs)
        labels.append(batch.labels)
    n = len(loader.dataset)
    return {"loss": float(loss_sum) / n, "instance_loss": float(instance_sum) / n, "inst_acc": _accuracy(hits),
            **_classification(labels, probs, config)}


def _accuracy(hits: torch.Tensor) -> float | None:
    """correct / all from (correct, all); None when nothing was predicted (every bag of one instance)."""
    correct, total = (float(v) for v in hits)
    return correct / total if total else None


def _classification(labels: list[torch.Tensor], probs: list[torch.Tensor], config: TrainConfig) -> dict[str, Any]:
    return epoch_metrics(torch.cat(labels).cpu().numpy(), torch.cat(probs).float().cpu().numpy(), config.n_classes)


# ---------------------------------------------------------------- run state and saving


@dataclass
class RunState:
    """Where the run stands; saved in every checkpoint so --resume continues exactly."""

    epoch: int = 0
    loss: float = math.nan  # the monitored loss of ``epoch``
    best_epoch: int | None = None
    best_loss: float = math.inf
    epochs_since_best: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # one row of metrics per epoch
    is_best: bool = False
    stopped_early: bool = False
    status: str = "running"

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> "RunState":
        saved = checkpoint.get("run_state", {})
        return cls(epoch=int(checkpoint["epoch"]), loss=float(checkpoint["loss"]),
                   best_epoch=saved.get("best_epoch"), best_loss=float(saved.get("best_loss", math.inf)),
                   epochs_since_best=int(saved.get("epochs_since_best", 0)), history=list(checkpoint.get("history", [])))

    def record(self, epoch: int, train: dict, val: dict | None, seconds: float, patience: int | None) -> None:
        # The monitored loss: validation loss, or the training loss when there is no validation set.
        self.epoch, self.loss = epoch, (val or train)["loss"]
        row = {"epoch": epoch, "seconds": round(seconds, 3)}
        row.update({f"train_{k}": v for k, v in train.items()})
        row.update({f"val_{k}": v for k, v in (val or {}).items()})
        self.is_best = self.loss < self.best_loss
        if self.is_best:
            self.best_epoch, self.best_loss, self.epochs_since_best = epoch, self.loss, 0
        else:
            self.epochs_since_best += 1
        row["best"] = self.is_best
        self.history.append(row)
        self.stopped_early = patience is not None and self.epochs_since_best >= patience

    def to_dict(self) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch, "best_loss": self.best_loss, "epochs_since_best": self.epochs_since_best}

    def summary_line(self, num_epochs: int) -> str:
        row = self.history[-1]
        parts = [f"epoch {row['epoch']}/{num_epochs}"]
        for side in ("train", "val"):
            if f"{side}_loss" in row:
                parts.append(f"{side} loss {row[f'{side}_loss']:.4f} auc {_fmt(row[f'{side}_auc'])} "
                             f"bacc {_fmt(row[f'{side}_balanced_accuracy'])} inst acc {_fmt(row.get(f'{side}_inst_acc'))}")
        parts.append(f"{row['seconds']:.1f} s" + ("  * best" if row["best"] else ""))
        return " | ".join(parts)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def save_epoch(run_dir: Path, model, optimizer, config: TrainConfig, state: RunState, run_info: dict,
               baseline: dict | None = None, last_saved: Path | None = None) -> Path:
    """best_model.pt when this epoch is the best, then config.json, then checkpoint_epoch_N.pt;
    returns the checkpoint's path. The checkpoint goes last: once it exists, everything of epoch N
    is saved (on the last epoch, config.json's final status too); a crash or a full disk before it
    leaves epoch N to be trained again, to the same weights, by --resume from N - 1. A file that
    cannot be written raises WriteError naming it and the checkpoint to resume from
    (``last_saved``: the newest complete one)."""
    checkpoint = {
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "epoch": state.epoch,
        "loss": state.loss,
        "args": asdict(config),
        "model_config": run_info["model"],
        "cache": run_info["cache"],
        "class_names": run_info["data"]["class_names"],
        "metrics": state.history[-1],
        "history": state.history,
        "run_state": state.to_dict(),
        "rng_state": rng_state(),
        "versions": run_info["versions"],
        "format_version": 1,
        "baseline": baseline or {},
        "feature_norm": run_info["feature_norm"],
    }
    path = run_dir / checkpoint_name(state.epoch)
    writes = [(run_dir / BEST_NAME, lambda: save_checkpoint(run_dir / BEST_NAME, checkpoint))] if state.is_best else []
    writes += [(run_dir / CONFIG_NAME, lambda: write_config(run_dir, config, state, run_info)),
               (path, lambda: save_checkpoint(path, checkpoint))]
    for target, write in writes:
        try:
            write()
        except OSError as error:
            kept = [name for name in (checkpoint_name(state.epoch - 1), BEST_NAME) if (run_dir / name).is_file()]
            intact = f"{' and '.join(kept)} {'are' if len(kept) > 1 else 'is'} intact. " if kept else ""
            way_on = _way_on(last_saved)
            raise write_failure(target, error, f"{intact}{way_on[0].upper()}{way_on[1:]}") from error
    return path


def write_config(run_dir: Path, config: TrainConfig, state: RunState, run_info: dict) -> None:
    atomic_write_json(run_dir / CONFIG_NAME, _json_safe({
        "epoch": state.epoch,
        "loss": state.loss,
        "args": asdict(config),
        "best_epoch": state.best_epoch,
        "best_loss": state.best_loss if state.best_epoch is not None else None,
        "status": state.status,
        "metrics": state.history,
        **run_info,
        "updated": datetime.now().isoformat(timespec="seconds"),
    }))


def _json_safe(value: Any) -> Any:
    # Strict JSON has no NaN or Infinity: write null.
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _run_info(config, bags: BagSet, split, plan, model, counts, class_weights, run_dir) -> dict[str, Any]:
    """What the run is, for config.json and the checkpoints (plain values only)."""
    from feature_extraction.layout import CLASS_NAMES

    cache_config = json.loads(json.dumps(bags.cache_config, default=str))
    imbalance = {
        "loss": "bag cross-entropy weighted by n / (classes x n_class) of the training bags",
        "sampler": "bags drawn with replacement, each class equally often (CLAM's --weighted_sample)",
        "none": "no correction",
    }[config.balance]
    return {
        "run_dir": str(run_dir),
        "model": model.config.to_dict(),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "cache": {**cache_config, "cache_dir": str(bags.cache_dir), "cache_key": bags.cache_key,
                  "feature_dim": bags.feature_dim},
        "data": {
            "class_names": list(CLASS_NAMES) if config.n_classes == 2 else [f"class_{c}" for c in range(config.n_classes)],
            "n_train_bags": len(split.train),
            "n_val_bags": len(split.val),
            "n_train_patients": len({r.patient_id for r in split.train}),
            "n_val_patients": len({r.patient_id for r in split.val}),
            "train_class_counts": counts,
            "val_class_counts": class_counts(split.val, config.n_classes),
            "n_test_bags": len(split.test),  # a cross-validation fold's held-out part: never used here
            "n_test_patients": len({r.patient_id for r in split.test}),
            "split_file": SPLIT_FILE,
        },
        "imbalance": {"method": config.balance, "description": imbalance, "class_weights": class_weights},
        "loader": asdict(plan),
        "versions": _versions(),
    }


def _describe_run(info: dict) -> str:
    data, cache = info["data"], info["cache"]
    return (f"bags: {data['n_train_bags']} train ({data['n_train_patients']} patients, classes {data['train_class_counts']}), "
            f"{data['n_val_bags']} validation ({data['n_val_patients']} patients); {cache['feature_dim']}-d features "
            f"from {cache['cache_dir']}\nimbalance: {info['imbalance']['description']}\nloading: {info['loader']['reason']}")


def _versions() -> dict[str, str]:
    import h5py
    import numpy
    import sklearn

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
                "scikit-learn": sklearn.__version__, "h5py": h5py.__version__, "clam": __version__}
    return {name: str(version) for name, version in versions.items()}  # torch's is a str subclass


# ---------------------------------------------------------------- command line


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):
        # "(default: None)" says nothing; those arguments name their default in the help text.
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def build_parser(defaults: bool = True) -> argparse.ArgumentParser:
    """The spec's arguments (first group) and the extras. ``defaults=False`` leaves unset
    arguments out of the namespace, to tell which ones the user typed."""
    parser = argparse.ArgumentParser(prog="python -m clam.train", formatter_class=_HelpFormatter,
                                     description="Train CLAM on the cached feature bags of a cohort.")
    base = TrainConfig()

    def add(group, name: str, **kwargs) -> None:
        dest = kwargs.get("dest", name.lstrip("-"))
        kwargs["default"] = getattr(base, dest) if defaults else argparse.SUPPRESS
        group.add_argument(name, **kwargs)

    spec = parser.add_argument_group("data, model and training (the specification)")
    add(spec, "--data_dir", help="cohort folder with EGFR_positive/, EGFR_negative/ (and optional _cnn folders); "
                                 "for --split test, C-S-EGFR_positive/ and C-S-EGFR_negative/ "
                                 "(default: <project root>/train, or <project root>/test with --split test)")
    add(spec, "--split", choices=SPLITS, help="which class folders to read")
    add(spec, "--max_tiles", type=int,
        help="maximum number of tiles per bag: the seeded subset stage 1 embeds, which picks the feature cache; "
             "bags of a cache embedded with more are cut to that same subset; 0 = all tiles")
    add(spec, "--num_workers", type=int, help="data-loading worker processes (used when bags stream from disk)")
    add(spec, "--model_size", choices=tuple(MODEL_SIZES), help="small: attention hidden width 256; big: 384")
    add(spec, "--dropout", type=float, help="dropout rate")
    add(spec, "--k_sample", type=int,
        help="CLAM's k_sample (the spec calls it 'number of attention heads', which it is not): how many "
             "highest- and how many lowest-attention instances of each bag train the instance-level "
             "classifiers. CLAM-SB has one attention branch, CLAM-MB one per class. Clamped to half the bag")
    add(spec, "--n_classes", type=int, help="number of classes")
    add(spec, "--num_epochs", type=int, help="number of training epochs")
    add(spec, "--batch_size", type=int, help="bags per optimiser step (padded and masked in one forward pass)")
    add(spec, "--learning_rate", type=float, help="Adam learning rate")

    extra = parser.add_argument_group("features, model variant, run control")
    add(extra, "--features_dir", help="feature cache root (default: <project root>/features), one cache folder "
                                      "(holding cache.json), or with --labels_csv any folder of <slide_id>.h5 bags")
    add(extra, "--backbone", help="backbone of the features; slides missing from the cache are embedded first")
    add(extra, "--weights", help="backbone weights: imagenet, random or a weights file")
    add(extra, "--labels_csv", help="CSV of slide_id,label[,patient_id] for the bags in --features_dir")
    add(extra, "--model_type", choices=MODEL_TYPES, help="CLAM single-branch or multi-branch")
    add(extra, "--bag_weight", type=float, help="loss = bag_weight x bag loss + (1 - bag_weight) x instance loss")
    add(extra, "--inst_loss", choices=INSTANCE_LOSSES, help="instance loss: cross-entropy or smooth top-1 SVM (CLAM's svm)")
    add(extra, "--subtyping", action="store_true",
        help="also train the other classes' instance classifiers to reject their top instances (CLAM's --subtyping)")
    add(extra, "--weight_decay", type=float, help="Adam weight decay")
    add(extra, "--val_fraction", type=float, help="fraction of each class's patients held out for validation (0: none)")
    add(extra, "--feature_norm", choices=FEATURE_NORMS,
        help="standard: standardise each feature dimension with the training instances' mean and std (stored "
             "in the model, applied wherever it is used); none: raw features, as CLAM")
    add(extra, "--sample_tiles", type=int,
        help="instances drawn afresh from each bag every training epoch (validation: one fixed draw); "
             "0 = off: every instance of the bag, in training and validation")
    add(extra, "--balance", choices=BALANCE_CHOICES, help="class imbalance: weighted loss, balanced sampling, or none")
    add(extra, "--seed", type=int, help="seed of the split, the model initialisation and the tile draws")
    add(extra, "--device", help="auto, cpu, cuda, cuda:N or mps")
    add(extra, "--patience", type=int, help="stop after this many epochs without a lower validation loss (default: off)")
    add(extra, "--in_memory", choices=("auto", "yes", "no"), help="read the whole cache into memory once (auto: when it fits easily)")
    add(extra, "--resume", help="checkpoint_epoch_N.pt to continue from, in its own run folder")
    add(extra, "--output_dir", help="where run folders are created (default: <project root>/clam/checkpoints)")
    add(extra, "--no_progress", dest="progress", action="store_false", help="no progress bars")
    add(extra, "--folds", type=int, help="K >= 2: patient-level, label-stratified K-fold cross-validation, one "
                                         "run per fold in one parent run folder (0: a single run)")
    add(extra, "--splits", help="cross-validation splits file (splits.csv of an earlier --folds run) to reuse")
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, frozenset[str]]:
    """(configuration, names of the arguments given on the command line)."""
    namespace = build_parser().parse_args(argv)
    explicit = frozenset(vars(build_parser(defaults=False).parse_args(argv)))
    return TrainConfig(**vars(namespace)), explicit


@cli_main
def main(argv: list[str] | None = None) -> int:
    config, explicit = parse_args(argv)
    if config.folds or config.splits:
        from clam.crossval import cross_validate  # imported here: crossval imports this module

        cross_validate(config)
    else:
        train(config, explicit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
