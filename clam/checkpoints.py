"""The training checkpoint: the one place that builds it (``build_checkpoint``) and reads it
(``read_checkpoint``; ``saved_run``, ``saved_progress`` and ``saved_baseline`` are the typed views of
what it says), and loads its weights (``load_checkpoint``, ``model_from_checkpoint``).

A checkpoint holds the specification's ``model_state_dict``, ``optimizer_state_dict``, ``epoch``,
``loss`` and ``args`` (``CHECKPOINT_KEYS``) and, to rebuild the model, evaluate it and resume
bit-exactly (``EXTRA_KEYS``): ``model_config``, ``cache``, ``class_names``, ``metrics`` (the last
epoch's), ``history``, ``run_state`` (best epoch and loss, epochs since the best), ``rng_state``,
``versions`` (of python, torch and the libraries), ``format_version`` (``FORMAT_VERSION``),
``baseline`` (clam.baselines, fitted beside the model), ``feature_norm`` (the summary of the
standardisation statistics, which are buffers in ``model_state_dict``) and ``bag_versions`` (which
version of each training and validation bag the run read, ``clam.data.bag_versions``, so that
--resume refuses a slide re-embedded since). Only tensors and plain
Python values are stored, so ``torch.load(..., weights_only=True)`` reads them without running any
pickled code. Every file is written under a temporary name and renamed into place. A checkpoint
of a newer format version than this code knows is refused; older ones (and those without a
version) are read as they are. The files' names are clam.run_files'.

A bare CLAM state dict, as mahmoodlab/CLAM writes it (``s_0_checkpoint.pt``: ``model.state_dict()``
alone), also loads, with ``weights_only=True`` too: ``load_checkpoint`` puts its weights into the
model it is given (there is no optimizer state, epoch or loss: it returns epoch 0 and loss nan),
and ``model_from_checkpoint`` rebuilds the model from its tensor shapes (``clam_state_dict``).
The layouts of CLAM's history load: ``module.`` prefixes of DataParallel (around the model or
around ``attention_net``), the gated attention at ``attention_net.2`` (older CLAM without dropout)
or ``attention_net.3``, and ``instance_loss_fn`` buffers (dropped, as CLAM's own eval does).
CLAM trained without gated attention (``Attn_Net``) is refused: this model has the gated one only.
"""

from __future__ import annotations

import io
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clam.baselines import PooledBaseline
from clam.metrics import default_class_names
from clam.model import CLAM_SB, MODEL_SIZES, ModelConfig, model_from_config
from feature_extraction.atomic import atomic_output
from feature_extraction.errors import PipelineError
from feature_extraction.runtime import resolve_device

FORMAT_VERSION = 1  # the version build_checkpoint writes; a larger one is refused when read
CHECKPOINT_KEYS = ("model_state_dict", "optimizer_state_dict", "epoch", "loss", "args")  # the specification's
EXTRA_KEYS = (
    "model_config",
    "cache",
    "class_names",
    "metrics",
    "history",
    "run_state",
    "rng_state",
    "versions",
    "format_version",
    "baseline",
    "feature_norm",
    "bag_versions",
)
# ``checkpoint_format`` of the dictionary read_model_file returns for a bare CLAM state dict
# (checkpoints of clam.train have no such key).
CLAM_STATE_DICT = "clam_state_dict"


@dataclass(frozen=True)
class SavedProgress:
    """Where the run of a checkpoint stood: what --resume continues from."""

    epoch: int
    loss: float
    best_epoch: int | None = None
    best_loss: float = math.inf
    epochs_since_best: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def build_checkpoint(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: SavedProgress,
    *,
    args: dict[str, Any],
    model_config: dict[str, Any],
    cache: dict[str, Any],
    class_names: list[str],
    versions: dict[str, str],
    baseline: dict[str, Any],
    feature_norm: dict[str, Any],
    bag_versions: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The checkpoint of one epoch: exactly ``CHECKPOINT_KEYS + EXTRA_KEYS`` (module docstring),
    with the current random state and ``FORMAT_VERSION``."""
    return {
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "epoch": progress.epoch,
        "loss": progress.loss,
        "args": args,
        "model_config": model_config,
        "cache": cache,
        "class_names": class_names,
        "metrics": progress.history[-1] if progress.history else {},
        "history": progress.history,
        "run_state": {
            "best_epoch": progress.best_epoch,
            "best_loss": progress.best_loss,
            "epochs_since_best": progress.epochs_since_best,
        },
        "rng_state": rng_state(),
        "versions": versions,
        "format_version": FORMAT_VERSION,
        "baseline": baseline,
        "feature_norm": feature_norm,
        "bag_versions": bag_versions or {},
    }


def saved_progress(checkpoint: dict[str, Any]) -> SavedProgress:
    """The run state a checkpoint (``read_checkpoint``'s) was saved in."""
    saved = checkpoint.get("run_state", {})
    return SavedProgress(
        epoch=int(checkpoint["epoch"]),
        loss=float(checkpoint["loss"]),
        best_epoch=saved.get("best_epoch"),
        best_loss=float(saved.get("best_loss", math.inf)),
        epochs_since_best=int(saved.get("epochs_since_best", 0)),
        history=list(checkpoint.get("history", [])),
    )


@dataclass(frozen=True)
class SavedRun:
    """What a checkpoint (``read_checkpoint``'s or ``model_from_checkpoint``'s) says about the run
    that wrote it: read here, so that no other module picks keys out of the dict.

    ``checkpoint_format`` is "clam.train" for our checkpoints and ``CLAM_STATE_DICT`` for a bare
    CLAM state dict (which has no arguments, cache, class names or epoch: those are empty)."""

    checkpoint_format: str
    epoch: int | None
    args: dict[str, Any]
    model_config: dict[str, Any]
    cache: dict[str, Any]  # the feature cache's configuration (cache.json) and folder
    class_names: tuple[str, ...]
    baseline: dict[str, Any]  # clam.baselines' record: method, params, validation metrics

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def feature_dim(self) -> int:
        return int(self.model_config.get("in_dim") or 0)

    @property
    def cache_key(self) -> str | None:
        return self.cache.get("cache_key") or None

    @property
    def is_clam_state_dict(self) -> bool:
        return self.checkpoint_format == CLAM_STATE_DICT


def saved_run(checkpoint: dict[str, Any]) -> SavedRun:
    """The typed view of a checkpoint's description of its run (``SavedRun``)."""
    args = dict(checkpoint.get("args") or {})
    model_config = dict(checkpoint.get("model_config") or {})
    n_classes = int(model_config.get("n_classes") or args.get("n_classes") or 2)
    names = checkpoint.get("class_names") or default_class_names(n_classes)
    epoch = checkpoint.get("epoch")
    return SavedRun(
        checkpoint_format=str(checkpoint.get("checkpoint_format") or "clam.train"),
        epoch=None if epoch is None else int(epoch),
        args=args,
        model_config=model_config,
        cache=dict(checkpoint.get("cache") or {}),
        class_names=tuple(str(name) for name in names),
        baseline=dict(checkpoint.get("baseline") or {}),
    )


def saved_baseline(checkpoint: dict[str, Any]) -> PooledBaseline | None:
    """The pooled logistic-regression baseline fitted beside the model (clam.baselines), if the
    checkpoint holds one (checkpoints from before it, bare CLAM state dicts and one-class training
    sets have none)."""
    params = (checkpoint.get("baseline") or {}).get("params")
    return PooledBaseline.from_dict(params) if params else None


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> None:
    """Write ``checkpoint`` atomically. Raises TypeError if it holds anything but tensors and plain
    values, and OSError naming ``path`` when it cannot be written (full disk, read-only folder)."""
    _check_plain(checkpoint, "checkpoint")
    # Serialised in memory, then written with one plain write: a full disk then raises an OSError
    # with its errno, where torch.save to a file raises a RuntimeError from its C++ writer.
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    with atomic_output(path) as tmp:
        Path(tmp).write_bytes(buffer.getbuffer())


def _check_plain(value: Any, where: str) -> None:
    # Anything else would make weights_only=True loading fail later, far from the cause.
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} is not a str or int")
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    # Exact types: subclasses (numpy.float64, torch's TorchVersion str) pickle as their class.
    elif not (value is None or type(value) in (str, int, float, bool) or isinstance(value, torch.Tensor)):
        raise TypeError(f"{where} is a {type(value).__name__}; store only tensors and plain values")


def _load_file(path: Path, device: str | torch.device) -> Any:
    if not path.is_file():
        raise PipelineError(f"checkpoint {path} does not exist.")
    try:
        return torch.load(path, map_location=resolve_device(device), weights_only=True)
    except pickle.UnpicklingError as error:
        raise PipelineError(
            f"checkpoint {path} holds Python objects that would run code when loaded; it is refused "
            f"(loading uses weights_only=True). Only load checkpoints you trust, re-saved with tensors "
            f"and plain values only. Detail: {str(error).splitlines()[0]}"
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise PipelineError(
            f"checkpoint {path} cannot be read ({error}); it is truncated or not a PyTorch checkpoint."
        ) from error


def read_checkpoint(checkpoint_path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """The training checkpoint's dictionary, tensors on ``device``. Never unpickles code
    (weights_only=True); a file that would need it, a missing file, a corrupt one or one that is
    not a training checkpoint (a bare state dict: see ``read_model_file``) raise PipelineError."""
    path = Path(checkpoint_path)
    checkpoint = _load_file(path, device)
    if not isinstance(checkpoint, dict) or "model_state_dict" not in checkpoint:
        hint = (
            " It is a bare state dict (e.g. CLAM's s_0_checkpoint.pt): it can be evaluated "
            "(python -m clam.evaluate --checkpoint) or loaded with load_checkpoint(), not resumed."
            if is_state_dict(checkpoint)
            else ""
        )
        raise PipelineError(
            f"checkpoint {path} is not a training checkpoint: it has no 'model_state_dict'.{hint}"
        )
    _check_version(checkpoint, path)
    return checkpoint


def _check_version(checkpoint: dict[str, Any], path: Path) -> None:
    """A newer format than this code knows is refused; an older or unversioned one reads as it is."""
    version = checkpoint.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise PipelineError(
            f"checkpoint {path} has format version {version}, newer than this code "
            f"reads (up to {FORMAT_VERSION}): it was written by a newer clam. Update this "
            "project's code to read it."
        )


def read_model_file(checkpoint_path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """A training checkpoint's dictionary (``read_checkpoint``), or, for a bare CLAM state dict,
    ``{"model_state_dict": <its weights under this model's names>, "model_config": <inferred from
    the tensor shapes>, "checkpoint_format": "clam_state_dict"}`` (no epoch, loss, cache or class names)."""
    path = Path(checkpoint_path)
    loaded = _load_file(path, device)
    if isinstance(loaded, dict) and "model_state_dict" in loaded:
        _check_version(loaded, path)
        return loaded
    if not is_state_dict(loaded):
        raise PipelineError(
            f"checkpoint {path} is neither a training checkpoint (no 'model_state_dict') nor "
            "a bare state dict of tensors."
        )
    state_dict, config = clam_state_dict(loaded, path)
    return {
        "model_state_dict": state_dict,
        "model_config": config.to_dict(),
        "checkpoint_format": CLAM_STATE_DICT,
    }


def is_state_dict(value: Any) -> bool:
    """A non-empty dict of tensors under string keys (what ``torch.save(model.state_dict())`` writes)."""
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


_ATTENTION = re.compile(r"^attention_net\.(\d+)\.attention_[abc]\.")
_UNGATED = re.compile(r"^attention_net\.\d+\.module\.")


def clam_state_dict(
    state_dict: dict[str, torch.Tensor], source: str | Path = "the state dict"
) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """A mahmoodlab/CLAM ``CLAM_SB``/``CLAM_MB`` state dict under this model's names, and the model
    configuration its tensor shapes give.

    in_dim: the first Linear's input width; model_size: the attention hidden width (256 small,
    384 big); model_type: ``classifiers.weight`` (SB) or ``classifiers.<c>.weight`` (MB);
    n_classes: the number of instance classifiers (else of bag classifiers). Dropout, k_sample,
    the instance loss and subtyping are not in the weights and play no part at inference: they
    get the defaults (dropout 0). Raises PipelineError, naming the keys, when it is not such a
    state dict (another architecture, CLAM without gated attention, another size)."""
    keys = _unwrapped_keys(state_dict)
    if any(_UNGATED.match(k) for k in keys):
        raise PipelineError(
            f"{source} is a CLAM model without gated attention (Attn_Net: keys "
            f"'attention_net.N.module.*'); this project's CLAM has gated attention only."
        )
    indices = {int(m.group(1)) for k in keys if (m := _ATTENTION.match(k))}
    fc = keys.get("attention_net.0.weight")
    hidden = next(
        (t for k, t in keys.items() if re.match(r"^attention_net\.\d+\.attention_a\.0\.weight$", k)), None
    )
    if len(indices) != 1 or not indices <= {2, 3} or fc is None or hidden is None or fc.dim() != 2:
        sample = ", ".join(sorted(keys)[:6])
        raise PipelineError(
            f"{source} is not a CLAM_SB/CLAM_MB state dict: it needs 'attention_net.0.weight' and the gated "
            f"attention at 'attention_net.2' or '.3' ('attention_a.0', 'attention_b.0', 'attention_c'); found "
            f"{len(keys)} keys: {sample}{', ...' if len(keys) > 6 else ''}"
        )
    index = indices.pop()
    if index == 2:  # older CLAM without dropout: Linear, ReLU, attention; here a Dropout always sits at 2
        keys = {re.sub(r"^attention_net\.2\.", "attention_net.3.", k): t for k, t in keys.items()}
    width, in_dim = fc.shape
    sizes = {shape: name for name, shape in MODEL_SIZES.items()}
    model_size = sizes.get((int(width), int(hidden.shape[0])))
    if model_size is None:
        raise PipelineError(
            f"{source}: CLAM of widths {int(in_dim)} -> {int(width)} -> attention {int(hidden.shape[0])} is not one of "
            f"CLAM's sizes ({', '.join(f'{n}: {w} -> {h}' for n, (w, h) in MODEL_SIZES.items())})."
        )
    model_type, n_classes = _classifier_heads(keys)
    settings: dict[str, Any] = {
        "model_type": model_type,
        "in_dim": int(in_dim),
        "n_classes": n_classes,
        "model_size": model_size,
        "dropout": 0.0,
        # CLAM feeds raw features; this project's own weights saved bare carry
        # the standardisation buffers.
        "feature_norm": "standard" if "feature_norm.mean" in keys else "none",
    }
    try:
        config = ModelConfig(**settings)
    except ValueError as error:
        raise PipelineError(f"{source}: the weights give no valid CLAM configuration ({error}).") from error
    expected = model_from_config(config).state_dict()
    missing, unexpected = sorted(set(expected) - set(keys)), sorted(set(keys) - set(expected))
    wrong = sorted(k for k in set(expected) & set(keys) if expected[k].shape != keys[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{what}: {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}"
            for what, names in (("missing", missing), ("unexpected", unexpected), ("other shape", wrong))
            if names
        )
        raise PipelineError(
            f"{source} looks like CLAM ({_describe(config)}) but its keys do not fit that model: {detail}."
        )
    return {k: keys[k] for k in expected}, config


def _unwrapped_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a CLAM state dict under their names without DataParallel's ``module.``
    prefixes, less the instance loss's own buffers."""
    keys: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        # The instance loss's own buffers (SmoothTop1SVM); CLAM's eval drops them.
        if "instance_loss_fn" in key:
            continue
        while key.startswith("module."):  # DataParallel around the whole model
            key = key[len("module.") :]
        if key.startswith("attention_net.module."):  # CLAM's relocate(): DataParallel around attention_net
            key = "attention_net." + key[len("attention_net.module.") :]
        keys[key] = tensor
    return keys


def _classifier_heads(keys: dict[str, torch.Tensor]) -> tuple[str, int]:
    """(model_type, n_classes) of CLAM weights: ``classifiers.<c>.weight`` is CLAM-MB, else
    CLAM-SB; the number of instance classifiers, else of bag classifiers."""
    instance = {int(m.group(1)) for k in keys if (m := re.match(r"^instance_classifiers\.(\d+)\.weight$", k))}
    multi = {int(m.group(1)) for k in keys if (m := re.match(r"^classifiers\.(\d+)\.weight$", k))}
    model_type = "clam_mb" if multi else "clam_sb"
    if instance:
        n_classes = len(instance)
    elif multi:
        n_classes = len(multi)
    else:
        n_classes = int(keys["classifiers.weight"].shape[0]) if "classifiers.weight" in keys else 0
    return model_type, n_classes


def load_checkpoint(
    checkpoint_path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, torch.optim.Optimizer | None, int, float]:
    """Load a checkpoint into ``model`` (moved to ``device``) and, if given, ``optimizer``.

    Returns (model, optimizer, epoch, loss). ``device``: "cpu", "cuda", "mps", "auto" or a
    torch.device. A bare CLAM state dict (``s_0_checkpoint.pt``) loads its weights into ``model``
    and leaves ``optimizer`` untouched (it holds no optimizer state); the epoch is then 0 and the
    loss nan. Raises PipelineError when the file is unsafe, unreadable, or does not fit the model."""
    device = resolve_device(device)
    checkpoint = read_model_file(checkpoint_path, device)
    try:
        model.load_state_dict(checkpoint["model_state_dict"])
    except RuntimeError as error:
        raise PipelineError(
            f"checkpoint {checkpoint_path} does not fit this model: it was saved from "
            f"{_describe(checkpoint.get('model_config'))}, the model is {_describe(getattr(model, 'config', None))}. "
            f"Build the model with clam.checkpoints.model_from_checkpoint(). Detail: {_first_lines(error)}"
        ) from error
    model.to(device)
    if optimizer is not None and checkpoint.get("checkpoint_format") != CLAM_STATE_DICT:
        if "optimizer_state_dict" not in checkpoint:
            raise PipelineError(
                f"checkpoint {checkpoint_path} holds no optimizer state; pass optimizer=None."
            )
        try:
            optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
        except (ValueError, KeyError) as error:
            raise PipelineError(
                f"checkpoint {checkpoint_path}: the optimizer state does not fit this optimizer ({error})."
            ) from error
    return model, optimizer, int(checkpoint.get("epoch", 0)), float(checkpoint.get("loss", math.nan))


def model_from_checkpoint(
    checkpoint_path: str | Path, device: str | torch.device = "cpu"
) -> tuple[CLAM_SB, dict[str, Any]]:
    """Rebuild the model a checkpoint was saved from, load its weights, put it in eval mode on
    ``device``. Returns (model, checkpoint dictionary); for a bare CLAM state dict the model's
    configuration comes from the tensor shapes and the dictionary is ``read_model_file``'s."""
    checkpoint = read_model_file(checkpoint_path, device)
    if "model_config" not in checkpoint:
        raise PipelineError(
            f"checkpoint {checkpoint_path} has no 'model_config': it was not written by "
            "clam.train. Build the model yourself and use load_checkpoint()."
        )
    try:
        model = model_from_config(ModelConfig(**checkpoint["model_config"]))
    except (TypeError, ValueError) as error:
        raise PipelineError(f"checkpoint {checkpoint_path}: invalid model_config ({error}).") from error
    model.load_state_dict(checkpoint["model_state_dict"])
    return model.to(resolve_device(device)).eval(), checkpoint


def _describe(config: Any) -> str:
    if isinstance(config, ModelConfig):
        config = config.to_dict()
    if not isinstance(config, dict):
        return "an unknown configuration"
    keys = ("model_type", "model_size", "in_dim", "n_classes")
    return ", ".join(f"{k}={config.get(k)}" for k in keys)


def _first_lines(error: Exception, n: int = 3) -> str:
    return " ".join(str(error).splitlines()[:n])


def rng_state() -> dict[str, Any]:
    """The torch random state (CPU and every CUDA device) as tensors, for bit-exact resume."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
