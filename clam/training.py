"""Training CLAM on the cached feature bags: ``train(config)``, the library behind ``python -m clam.train``.

A run reads and validates its bags (``load_bags``), splits them by patient, standardises the
features with the training instances' statistics, fits the pooled baseline beside the model,
then trains epoch after epoch (clam.epochs), saving each (clam.run_record) and reporting through
this module's logger.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clam.bag_dataset import BagDataset, feature_statistics
from clam.baselines import comparison, fit_baseline, pool_bags
from clam.baselines import describe as describe_baseline
from clam.checkpoints import load_checkpoint, read_checkpoint, saved_progress, set_rng_state
from clam.data import (
    BagChanged,
    BagSet,
    bag_versions,
    changed_since,
    limit_tiles,
    records_from_cache,
    records_from_labels_csv,
    resolve_cache,
    validate_records,
)
from clam.epochs import (
    is_fused,
    make_loader,
    make_optimizer,
    train_one_epoch,
    use_own_kernels,
    validate_epoch,
)
from clam.loading import LoaderPlan, class_counts, inverse_frequency_weights, plan_loading
from clam.metrics import format_number, roc_auc
from clam.model import model_from_config
from clam.run_files import BEST_NAME, SPLIT_FILE, default_runs_dir, make_run_dir
from clam.run_record import RunState, describe_run, run_info, save_epoch, way_on
from clam.splits import TrainValSplit, read_split, train_val_split, write_split
from clam.train_config import TrainConfig, check_config, config_for_resume, nothing_to_resume
from clam.training_report import ScalarLog, render_training_report, scalar_log
from feature_extraction.atomic import remove_stale_temps
from feature_extraction.cache import is_cache_dir, read_cache_config
from feature_extraction.errors import Interrupted, PipelineError, write_error
from feature_extraction.layout import default_data_dir, default_features_dir
from feature_extraction.runtime import resolve_device

log = logging.getLogger(__name__)


@dataclass
class _Run:
    """A run set up to train its next epoch."""

    run_dir: Path
    device: torch.device
    plan: LoaderPlan
    train_set: BagDataset
    val_set: BagDataset
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    class_weights: torch.Tensor | None
    state: RunState
    info: dict[str, Any]
    baseline: dict[str, Any]
    last_saved: Path | None  # the newest complete checkpoint
    bag_versions: dict[str, str]  # of the training and validation bags (clam.data.bag_versions)


def train(
    config: TrainConfig,
    explicit: frozenset[str] = frozenset(),
    split: TrainValSplit | None = None,
    run_dir: Path | None = None,
) -> Path:
    """Train as ``config`` says (or continue ``config.resume``); returns the run folder.

    ``split`` and ``run_dir`` (both or neither) replace the seeded split and the new run folder:
    clam.crossval trains each fold this way."""
    resumed = read_checkpoint(config.resume, "cpu") if config.resume else None
    if resumed is not None:
        config = config_for_resume(config, resumed, explicit)
    check_config(config)
    if resumed is not None:
        reason = nothing_to_resume(config, saved_progress(resumed))
        if reason:
            log.info(reason)
            return Path(config.resume).parent
    run = _set_up(config, resumed, split, run_dir)
    with scalar_log(run.run_dir, config.tensorboard) as scalars:
        _train_epochs(run, config, scalars)
    page = render_training_report(run.run_dir)  # every epoch, a resumed run's earlier ones too
    verdict = run.info["baseline"]
    log.info(
        f"done: best epoch {run.state.best_epoch} (loss {run.state.best_loss:.4f}) -> "
        f"{run.run_dir / BEST_NAME}\n{verdict['line']}" + (f"\ntraining report: {page}" if page else "")
    )
    if verdict["warning"]:
        log.warning(verdict["warning"])
    return run.run_dir


def _set_up(
    config: TrainConfig, resumed: dict | None, split: TrainValSplit | None, run_dir: Path | None
) -> _Run:
    device = resolve_device(config.device)
    # A checkpoint from before --sample_tiles drew max_tiles instances per epoch from whole bags.
    legacy_draw = resumed is not None and "sample_tiles" not in resumed["args"]
    bags = load_bags(config, limit=not legacy_draw)
    if resumed is not None:
        run_dir = Path(config.resume).parent
        remove_stale_temps(run_dir)  # a killed run's half-written checkpoint
        split = read_split(run_dir / SPLIT_FILE, bags.records)
        _refuse_changed_bags(resumed.get("bag_versions") or {}, [*split.train, *split.val], config.resume)
    else:
        split = split or make_split(bags, config)
        run_dir = _start_run_folder(run_dir, config, split)
    plan = plan_loading(bags.total_bytes, config.in_memory, config.num_workers, device)
    torch.set_num_threads(plan.torch_threads)
    train_set = BagDataset(
        split.train, config.sample_tiles, config.seed, True, plan.in_memory, config.progress
    )
    val_set = BagDataset(split.val, config.sample_tiles, config.seed, False, plan.in_memory, config.progress)

    torch.manual_seed(config.seed)
    model = model_from_config(config.model_config(bags.feature_dim))
    if resumed is None:
        feature_norm = standardise_features(model, train_set, config)
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
        use_own_kernels(optimizer)
        set_rng_state(resumed["rng_state"])
        state = RunState.resumed(saved_progress(resumed))
        log.info(f"resuming {run_dir} after epoch {state.epoch}")
    info = run_info(config, bags, split, plan, model, counts, class_weights, run_dir)
    info["feature_norm"] = feature_norm
    info["optimizer"] = {"name": "Adam", "fused": is_fused(optimizer)}
    info["baseline"] = {k: v for k, v in baseline.items() if k != "params"}
    log.info(f"run folder: {run_dir}\n{describe_run(info)}")
    weights = torch.tensor(class_weights, device=device) if class_weights else None
    return _Run(
        run_dir,
        device,
        plan,
        train_set,
        val_set,
        model,
        optimizer,
        weights,
        state,
        info,
        baseline,
        Path(config.resume) if resumed is not None else None,
        bag_versions([*split.train, *split.val]),
    )


def _refuse_changed_bags(saved: dict[str, str], records: list, checkpoint: str | Path) -> None:
    """--resume continues one model on the features it started on: a bag re-embedded since the
    checkpoint (checkpoints from before ``bag_versions`` are not checked) stops the run."""
    changed = changed_since(saved, records)
    if changed:
        examples = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise PipelineError(
            f"{len(changed)} of the bags that {checkpoint} trained or validated on changed since it was "
            f"saved (re-embedded, e.g. by a rerun of `python -m feature_extraction.embed`): {examples}. "
            "Resuming would train one model on two versions of the features. Start a new run on the "
            "current bags (the same command without --resume), or restore the bags the run started on."
        )


def _train_epochs(run: _Run, config: TrainConfig, scalars: ScalarLog) -> None:
    state = run.state
    state.stopped_early = config.patience is not None and state.epochs_since_best >= config.patience
    warned: set[str] = set()
    for epoch in range(state.epoch + 1, config.num_epochs + 1):
        if state.stopped_early:
            monitored = "validation" if len(run.val_set) else "training"
            log.info(
                f"early stopping: the {monitored} loss has not improved for {state.epochs_since_best} "
                f"epochs (best epoch {state.best_epoch}, loss {state.best_loss:.4f})"
            )
            break
        started = time.perf_counter()
        try:
            train_loader = make_loader(run.train_set, config, run.plan, run.device, epoch, train=True)
            train_metrics = train_one_epoch(
                run.model,
                run.optimizer,
                train_loader,
                config,
                run.device,
                run.class_weights,
                f"epoch {epoch}",
            )
            val_metrics = None
            if len(run.val_set):
                val_loader = make_loader(run.val_set, config, run.plan, run.device, epoch, train=False)
                val_metrics = validate_epoch(run.model, val_loader, config, run.device, f"epoch {epoch} val")
        except BagChanged as error:
            raise _bag_changed(run.train_set, run.val_set, run.last_saved) or error from None
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted during epoch {epoch}; {way_on(run.last_saved)}") from None
        if run.plan.in_memory:
            _warn_changed_in_memory(run.train_set, run.val_set, warned)
        state.record(epoch, train_metrics, val_metrics, time.perf_counter() - started, config.patience)
        if (
            epoch == config.num_epochs or state.stopped_early
        ):  # the last epoch's config.json says how the run ended
            state.status = "stopped early" if epoch < config.num_epochs else "finished"
            run.info["baseline"].update(compare_with_baseline(state, run.info["baseline"], len(run.val_set)))
        run.last_saved = save_epoch(
            run.run_dir,
            run.model,
            run.optimizer,
            config,
            state,
            run.info,
            run.baseline,
            run.last_saved,
            run.bag_versions,
        )
        scalars.epoch(state.history[-1], run.optimizer.param_groups[0]["lr"])
        log.info(state.summary_line(config.num_epochs))


# ---------------------------------------------------------------- set-up


def _start_run_folder(run_dir: Path | None, config: TrainConfig, split: TrainValSplit) -> Path:
    """Create the run folder (a new one unless ``run_dir`` is given) and write split.csv in it.
    A folder that cannot be created or written raises WriteError, naming it and what to do."""
    output_dir = Path(config.output_dir) if config.output_dir else default_runs_dir()
    try:
        run_dir = make_run_dir(output_dir) if run_dir is None else run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise write_error(
            output_dir,
            error,
            "No run was started: pass a writable --output_dir, or run the command again once that is fixed.",
            what="cannot create a run folder in",
        ) from error
    try:
        write_split(run_dir / SPLIT_FILE, split)
    except OSError as error:
        with contextlib.suppress(OSError):
            run_dir.rmdir()  # nothing else is in it yet
        raise write_error(
            run_dir / SPLIT_FILE,
            error,
            "Nothing was trained: run the command again once that is fixed, or pass another --output_dir.",
        ) from error
    return run_dir


def _bag_changed(train_set: BagDataset, val_set: BagDataset, last_saved: Path | None) -> BagChanged | None:
    """The error for a bag replaced under the running training (found again here, in the main
    process, when a loader worker raised it), with how to go on; None if none changed."""
    changed = train_set.changed() + val_set.changed()
    if not changed:
        return None
    then = f"once embedding has finished, {way_on(last_saved)}"
    others = f" ({len(changed) - 1} other bags changed too.)" if len(changed) > 1 else ""
    return BagChanged(f"{BagChanged.of(changed[0], then)}{others}")


def _warn_changed_in_memory(train_set: BagDataset, val_set: BagDataset, warned: set[str]) -> None:
    """In memory every bag was read once, before the first epoch: a bag replaced afterwards does
    not reach this run. Say so, once per bag: a --resume or a new run reads the new file."""
    for record in train_set.changed() + val_set.changed():
        if record.slide_id not in warned:
            warned.add(record.slide_id)
            log.warning(
                f"bag {record.path} changed on disk after this run read it into memory; this run goes "
                "on with the features it read, but a --resume or a new run will read the new bag."
            )


def load_bags(config: TrainConfig, limit: bool = True) -> BagSet:
    """The validated bags to train on: from a labels CSV and a folder of bags, or from the
    feature cache of ``data_dir`` (embedding missing slides first). With ``limit``, a bag holding
    more than ``--max_tiles`` tiles is cut to its ``--max_tiles`` subset (``clam.data.limit_tiles``)."""
    bags = _validated_bags(config)
    if not limit:
        return bags
    bags, cut = limit_tiles(bags, config.max_tiles, config.seed)
    if cut:
        log.info(
            f"--max_tiles {config.max_tiles}: {cut} of {len(bags.records)} bags hold more tiles (their "
            f"cache was embedded with more); each is cut to its seeded {config.max_tiles}-tile subset, the one "
            f"stage 1 embeds with --max_tiles {config.max_tiles}. --max_tiles 0 uses every tile."
        )
    return bags


def _validated_bags(config: TrainConfig) -> BagSet:
    if config.labels_csv:
        records = records_from_labels_csv(Path(config.labels_csv), config.features_dir)
        bags_dir = Path(config.features_dir)
        cache_config = read_cache_config(bags_dir) if is_cache_dir(bags_dir) else {}
        return validate_records(records, bags_dir, config.n_classes, cache_config, config.progress)
    features_dir = Path(config.features_dir) if config.features_dir else default_features_dir()
    data_dir = Path(config.data_dir) if config.data_dir else default_data_dir(config.split)
    if config.data_dir is None and is_cache_dir(features_dir):
        data_dir = None  # one cache folder and no --data_dir: every bag of the split in its manifest
    cache_dir, slide_ids = resolve_cache(
        features_dir,
        data_dir,
        config.split,
        backbone=config.backbone,
        weights=config.weights,
        max_tiles=config.max_tiles,
        seed=config.seed,
        device=config.device,
    )
    records = records_from_cache(cache_dir, slide_ids, config.split)
    return validate_records(
        records, cache_dir, config.n_classes, read_cache_config(cache_dir), config.progress
    )


def make_split(bags: BagSet, config: TrainConfig) -> TrainValSplit:
    split = train_val_split(bags.records, config.val_fraction, config.seed)
    if not split.train:
        raise PipelineError(f"no bags left for training in {bags.cache_dir}; lower --val_fraction.")
    return split


def standardise_features(model, train_set: BagDataset, config: TrainConfig) -> dict[str, Any]:
    """With ``--feature_norm standard``, set the model's FeatureNorm to the per-dimension mean and
    std of every instance of the training bags (never validation or test bags); returns what
    config.json records (and checkpoints, so --resume reuses it with the statistics in the weights)."""
    if config.feature_norm != "standard":
        return {"method": "none", "description": "raw features, as CLAM"}
    stats = feature_statistics(train_set.all_instances())
    model.feature_norm.set_statistics(stats.mean, stats.std)
    log.info(f"feature standardisation: mean and std per dimension from {stats.describe()}")
    return {
        "method": "standard",
        "description": "(x - mean) / std per dimension, training instances' statistics "
        "(stored in the model as feature_norm.mean / feature_norm.std)",
        **stats.to_dict(),
    }


def fit_run_baseline(
    train_set: BagDataset, val_set: BagDataset, config: TrainConfig, pool: str = "mean"
) -> dict[str, Any]:
    """The pooled logistic-regression baseline on the same bags (the validation draw of each bag):
    fitted on the training bags, scored on the validation bags. ``params`` goes into checkpoints."""

    def pooled(dataset: BagDataset):
        return pool_bags(dataset.instances(i, None) for i in range(len(dataset)))

    started = time.perf_counter()
    train_labels = [r.label for r in train_set.records]
    train_pooled = pooled(train_set)
    fitted = fit_baseline(train_pooled, train_labels, config.n_classes, pool, config.seed)
    result: dict[str, Any] = {
        "method": describe_baseline(pool),
        "train_auc": None,
        "val_auc": None,
        "n_val_bags": len(val_set),
    }
    if fitted is None:
        return {**result, "note": "the training bags hold one class only: no baseline"}
    result["train_auc"] = roc_auc(train_labels, fitted.probs(train_pooled), config.n_classes)[0]
    if len(val_set):
        val_labels = [r.label for r in val_set.records]
        result["val_auc"] = roc_auc(val_labels, fitted.probs(pooled(val_set)), config.n_classes)[0]
    result["seconds"] = round(time.perf_counter() - started, 3)
    return {**result, "params": fitted.to_dict()}


def compare_with_baseline(state: RunState, baseline: dict[str, Any], n_val: int) -> dict[str, Any]:
    """CLAM's validation AUC at its best epoch beside the baseline's, and a warning when CLAM is clearly worse."""
    best = next((row for row in state.history if row["epoch"] == state.best_epoch), {})
    clam_auc, base_auc = best.get("val_auc"), baseline.get("val_auc")
    if not n_val:
        line = "no validation set: CLAM and the baseline are not compared"
    else:
        line = (
            f"validation AUC: CLAM {format_number(clam_auc, 'n/a')} (best epoch {state.best_epoch}) | "
            f"baseline {format_number(base_auc, 'n/a')} ({baseline['method']})"
        )
    return {"clam_val_auc": clam_auc, "line": line, "warning": comparison(clam_auc, base_auc, n_val)}
