"""The checkpoint system of the specification: run folders, checkpoint files, loading.

    <output_dir>/run_YYYYMMDD_HHMMSS/      one folder per run (``_2``, ``_3`` when started the same second)
        config.json                        training arguments, current and best epoch/loss, metrics
        split.csv                          which bags were used for training and for validation
        checkpoint_epoch_N.pt              after every epoch N = 1, 2, ...
        best_model.pt                      the epoch with the lowest validation loss

A checkpoint holds ``model_state_dict``, ``optimizer_state_dict``, ``epoch``, ``loss``, ``args``
and, to rebuild the model and resume, ``model_config``, ``cache``, ``rng_state``, ``metrics``,
``history``, ``best`` and ``format_version``. Only tensors and plain Python values are stored,
so ``torch.load(..., weights_only=True)`` reads them without running any pickled code. Every
file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import pickle
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from feature_extraction.atomic import atomic_output
from feature_extraction.errors import PipelineError

from clam.model import CLAM_SB, ModelConfig, model_from_config

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
BEST_NAME = "best_model.pt"
RUN_PREFIX = "run_"
CHECKPOINT_KEYS = ("model_state_dict", "optimizer_state_dict", "epoch", "loss", "args")


def checkpoint_name(epoch: int) -> str:
    return f"checkpoint_epoch_{epoch}.pt"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" picks cuda, then mps, then cpu; an unavailable device is a PipelineError."""
    if isinstance(device, torch.device):
        return device
    name = str(device).lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError as error:
        raise PipelineError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"device {device!r} asked for, but this PyTorch sees no CUDA GPU. Use --device cpu.")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise PipelineError(f"device {device!r} asked for, but MPS is not available here. Use --device cpu.")
    return resolved


def make_run_dir(output_dir: str | Path, now: datetime | None = None) -> Path:
    """Create and return ``output_dir/run_YYYYMMDD_HHMMSS``; a run started in the same second
    gets ``..._2``, ``..._3``. Creation is atomic (mkdir), so two processes never share a folder."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stamp = f"{RUN_PREFIX}{(now or datetime.now()):%Y%m%d_%H%M%S}"
    for attempt in range(1, 10_000):
        run_dir = output_dir / (stamp if attempt == 1 else f"{stamp}_{attempt}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise PipelineError(f"cannot create a run folder in {output_dir}: too many runs named {stamp}")


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> None:
    """Write ``checkpoint`` atomically. Raises TypeError if it holds anything but tensors and plain values."""
    _check_plain(checkpoint, "checkpoint")
    with atomic_output(path) as tmp:
        torch.save(checkpoint, tmp)


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


def read_checkpoint(checkpoint_path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint's dictionary, tensors on ``device``. Never unpickles code (weights_only=True);
    a file that would need it, a missing file or a corrupt one raise PipelineError."""
    path = Path(checkpoint_path)
    if not path.is_file():
        raise PipelineError(f"checkpoint {path} does not exist.")
    try:
        checkpoint = torch.load(path, map_location=resolve_device(device), weights_only=True)
    except pickle.UnpicklingError as error:
        raise PipelineError(
            f"checkpoint {path} holds Python objects that would run code when loaded; it is refused "
            f"(loading uses weights_only=True). Only load checkpoints you trust, re-saved with tensors "
            f"and plain values only. Detail: {str(error).splitlines()[0]}"
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise PipelineError(f"checkpoint {path} cannot be read ({error}); it is truncated or not a "
                            "PyTorch checkpoint.") from error
    if not isinstance(checkpoint, dict) or "model_state_dict" not in checkpoint:
        raise PipelineError(f"checkpoint {path} is not a training checkpoint: it has no 'model_state_dict'.")
    return checkpoint


def load_checkpoint(
    checkpoint_path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, torch.optim.Optimizer | None, int, float]:
    """Load a checkpoint into ``model`` (moved to ``device``) and, if given, ``optimizer``.

    Returns (model, optimizer, epoch, loss). ``device``: "cpu", "cuda", "mps", "auto" or a
    torch.device. Raises PipelineError when the file is unsafe, unreadable, or does not fit the model."""
    device = resolve_device(device)
    checkpoint = read_checkpoint(checkpoint_path, device)
    try:
        model.load_state_dict(checkpoint["model_state_dict"])
    except RuntimeError as error:
        raise PipelineError(
            f"checkpoint {checkpoint_path} does not fit this model: it was saved from "
            f"{_describe(checkpoint.get('model_config'))}, the model is {_describe(getattr(model, 'config', None))}. "
            f"Build the model with clam.checkpoints.model_from_checkpoint(). Detail: {_first_lines(error)}"
        ) from error
    model.to(device)
    if optimizer is not None:
        if "optimizer_state_dict" not in checkpoint:
            raise PipelineError(f"checkpoint {checkpoint_path} holds no optimizer state; pass optimizer=None.")
        try:
            optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
        except (ValueError, KeyError) as error:
            raise PipelineError(f"checkpoint {checkpoint_path}: the optimizer state does not fit this "
                                f"optimizer ({error}).") from error
    return model, optimizer, int(checkpoint.get("epoch", 0)), float(checkpoint.get("loss", float("nan")))


def model_from_checkpoint(checkpoint_path: str | Path, device: str | torch.device = "cpu") -> tuple[CLAM_SB, dict[str, Any]]:
    """Rebuild the model a checkpoint was saved from, load its weights, put it in eval mode on
    ``device``. Returns (model, checkpoint dictionary)."""
    checkpoint = read_checkpoint(checkpoint_path, device)
    if "model_config" not in checkpoint:
        raise PipelineError(f"checkpoint {checkpoint_path} has no 'model_config': it was not written by "
                            "clam.train. Build the model yourself and use load_checkpoint().")
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
