"""Weight files, offline first: read a state dict, check it fits, find it in the hub cache or a map.

- ``read_state_dict(path)``: a ``.safetensors`` file (safetensors), any other file through
  ``torch.load(weights_only=True)`` (no code runs), or a hub-style folder (its ``model.safetensors``
  or ``pytorch_model.bin``); checkpoint wrappers (``state_dict``, ``model``...) and whole-model
  prefixes (``module.``...) are removed.
- ``check_fit(expected, state, ...)``: strict matching. Any missing or unexpected key, or a wrong
  shape, is a PipelineError that names them: never a silently half-random model.
- ``hub_cached_file(repo, file)``: the file in the Hugging Face hub cache (``HF_HOME``,
  ``HF_HUB_CACHE``), never downloaded during a run; when it is absent (or gated),
  ``missing_hub_weights_message`` says which repository and file to fetch and where to put them.
- ``read_weights_map(path)``: a JSON or TOML file mapping encoder names to weight paths (like
  TRIDENT's ``local_ckpts.json``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from feature_extraction.errors import PipelineError

log = logging.getLogger(__name__)

_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "trunk.", "resnet.", "net.")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")
FOLDER_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # in a hub-style folder, in this order
HUB_LABEL = "hub"


def read_state_dict(path: Path, preferred_files: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """The tensors of weights file (or hub-style folder) ``path``, unwrapped and unprefixed."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = _file_in_folder(path, preferred_files)
    if path.suffix == ".safetensors":
        loaded = _read_safetensors(path)
    else:
        try:
            loaded = _torch_load(path)
        except Exception as error:
            raise PipelineError(
                f"cannot read weights file {path} ({type(error).__name__}: {error}). It must be a PyTorch "
                "state dict saved with torch.save(model.state_dict(), path), or a .safetensors file; a "
                "truncated download must be downloaded again."
            ) from error
    for key in _WRAPPER_KEYS:  # checkpoints often wrap the state dict
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
            break
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise PipelineError(f"weights file {path} does not hold a state dict (a mapping of names to tensors)")
    return strip_prefixes(dict(loaded))


def _torch_load(path: Path) -> object:
    """torch.load without running code; memory-mapped when the file allows it (a ViT-g is 4.5 GB)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (pre-zip) format cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file  # optional: the encoders extra installs it
    except ImportError as error:
        raise PipelineError(
            f"{path} is a .safetensors file: pip install 'clam-egfr[encoders]' (or safetensors)"
        ) from error
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:
        raise PipelineError(f"cannot read weights file {path} ({type(error).__name__}: {error})") from error


def _file_in_folder(folder: Path, preferred_files: Sequence[str]) -> Path:
    names = [*preferred_files, *FOLDER_WEIGHT_FILES]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise PipelineError(f"weights folder {folder} holds none of {', '.join(dict.fromkeys(names))}")


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove prefixes shared by every key (``module.`` of DataParallel, ``model.``...)."""
    changed = True
    while changed and state:
        changed = False
        for prefix in _PREFIXES:
            if all(key.startswith(prefix) for key in state):
                state = {key[len(prefix) :]: value for key, value in state.items()}
                changed = True
    return state


def fit_problems(
    expected: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    ignore_unexpected=lambda key: False,
) -> str:
    """ "" when ``state`` fits ``expected`` key for key and shape for shape; else what does not fit,
    naming the keys (missing, unexpected, wrong shape). ``ignore_unexpected(key)`` may allow extra keys."""
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected and not ignore_unexpected(k)]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    parts = (
        f"missing {len(missing)}: {_some(missing)}" if missing else "",
        f"unexpected {len(unexpected)}: {_some(unexpected)}" if unexpected else "",
        f"wrong shape: {_some(mismatched)}" if mismatched else "",
        "no parameter name in common" if not (set(state) & set(expected)) else "",
    )
    return "; ".join(part for part in parts if part)


def _some(items: list[str], shown: int = 5) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps its cache: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def hub_cached_file(repo: str, filename: str, repo_type: str = "model") -> Path | None:
    """The path of ``filename`` of hub repository ``repo`` in the local hub cache, or None.

    Never downloads: a run reads weights that are already here (``missing_hub_weights_message``
    says how to fetch them)."""
    try:
        import huggingface_hub  # optional: the encoders extra installs it (kept lazy)
    except ImportError:
        return _scan_hub_cache(repo, filename, repo_type)
    cached = huggingface_hub.try_to_load_from_cache(
        repo, filename, cache_dir=str(hub_cache_dir()), repo_type=repo_type
    )
    return Path(cached) if isinstance(cached, str) else None


def _scan_hub_cache(repo: str, filename: str, repo_type: str) -> Path | None:
    """The hub cache's layout read without huggingface_hub: models--<org>--<name>/snapshots/*/<file>."""
    folder = hub_cache_dir() / f"{repo_type}s--{repo.replace('/', '--')}" / "snapshots"
    found = sorted(folder.glob(f"*/{filename}"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    return found[-1] if found else None


def missing_hub_weights_message(
    name: str,
    repo: str,
    filename: str,
    gated: bool,
    repo_type: str = "model",
    extra_files: Sequence[str] = (),
) -> str:
    """What to do when ``filename`` of ``repo`` is not in the hub cache (``extra_files``: fetch them too)."""
    page = f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo}"
    option = " --repo-type dataset" if repo_type == "dataset" else ""
    access = f"  The repository is gated: accept its terms on {page} while logged in, then\n" if gated else ""
    return (
        f"the weights of {name} are not in the Hugging Face hub cache ({hub_cache_dir()}), and this "
        "run does not download them.\n"
        f"{access}"
        f"  fetch them:  huggingface-cli download{option} {repo} {' '.join([filename, *extra_files])}\n"
        f"  (into the hub cache; HF_HOME or HF_HUB_CACHE move it), or download {page}/resolve/main/{filename}\n"
        f"  anywhere and pass --weights /path/to/{Path(filename).name} (or list it in a --weights_map file).\n"
        "  --weights random tests the pipeline with randomly initialised weights (meaningless features)."
    )


def read_weights_map(path: Path) -> dict[str, str]:
    """Encoder name -> weights path, from a JSON or TOML file; relative paths are relative to the file."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            try:
                import tomllib  # Python 3.11+
            except ImportError:  # pragma: no cover - older Python
                import tomli as tomllib
            values = tomllib.loads(text)
        else:
            values = json.loads(text)
    except (OSError, ValueError, ImportError) as error:
        raise PipelineError(f"cannot read weights map {path} ({type(error).__name__}: {error})") from error
    if not isinstance(values, Mapping) or not all(isinstance(v, str) for v in values.values()):
        raise PipelineError(
            f'weights map {path} must map encoder names to paths, like {{"uni_v1": "/m/uni.bin"}}'
        )
    return {str(k): str((path.parent / Path(v).expanduser()).resolve()) for k, v in values.items()}


__all__ = [
    "HUB_LABEL",
    "fit_problems",
    "hub_cache_dir",
    "hub_cached_file",
    "missing_hub_weights_message",
    "read_state_dict",
    "read_weights_map",
    "strip_prefixes",
]
