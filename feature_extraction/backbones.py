"""The registry of backbones: what each one computes, its input, and where its weights come from.

To add a backbone, add a ``BackboneSpec`` to ``BACKBONES``. Everything the cache key needs
(input size, normalisation, output dimension, a digest of the weight values) is derived
from the entry and the loaded weights, never typed by hand.

Weights (``load_backbone(name, weights)``):

- ``"imagenet"``: torchvision's ImageNet weights (IMAGENET1K_V1, the ones CLAM and TRIDENT
  use), from the torch hub cache, downloaded there when missing. Offline with an empty
  cache, a PipelineError says which file to place where.
- ``"random"``: initialised from a fixed seed, BatchNorm statistics calibrated on seeded
  noise (see ``_calibrate_batchnorm_on_noise``), so the digest and the cache are the same on
  every run. Only when asked for; never a silent fallback.
- a path: a local state-dict file (``torch.load(weights_only=True)``); a full ResNet's
  weights also fit the truncated model, and ``module.``-style prefixes are stripped.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn

from feature_extraction.errors import PipelineError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_SEED = 20210301  # fixed: "random" weights must be the same tensors on every run
RANDOM_LABEL = "random"
IMAGENET_LABEL = "imagenet"
_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "trunk.", "resnet.", "net.")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")


class ResNetTrunk(nn.Module):
    """A torchvision ResNet up to ``last_layer``, then global average pooling: (N, 3, H, W) -> (N, D).

    Keeps torchvision's parameter names, so a full ResNet state dict loads into it."""

    def __init__(self, resnet: torchvision.models.ResNet, last_layer: str = "layer4") -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        all_layers = ["layer1", "layer2", "layer3", "layer4"]
        self.layer_names = all_layers[: all_layers.index(last_layer) + 1]
        for name in self.layer_names:
            setattr(self, name, getattr(resnet, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.layer_names:
            x = getattr(self, name)(x)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


@dataclass(frozen=True)
class BackboneSpec:
    """A named backbone: ``builder()`` returns the untrained module mapping
    (N, 3, input_size, input_size) normalised float images to (N, feature_dim) features."""

    name: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    feature_dim: int
    builder: Callable[[], nn.Module]
    imagenet_weights: Callable[
        [], torchvision.models.WeightsEnum
    ]  # whose state dict fits builder()'s full net


def _resnet(arch: str, last_layer: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        return ResNetTrunk(getattr(torchvision.models, arch)(weights=None), last_layer)

    return build


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        # CLAM's standard: ResNet-50 through layer3 (conv4_x), average pooled, 1024 features.
        BackboneSpec(
            "resnet50_trunc",
            224,
            IMAGENET_MEAN,
            IMAGENET_STD,
            1024,
            _resnet("resnet50", "layer3"),
            lambda: torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
        ),
        BackboneSpec(
            "resnet50",
            224,
            IMAGENET_MEAN,
            IMAGENET_STD,
            2048,
            _resnet("resnet50", "layer4"),
            lambda: torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
        ),
        BackboneSpec(
            "resnet18",
            224,
            IMAGENET_MEAN,
            IMAGENET_STD,
            512,
            _resnet("resnet18", "layer4"),
            lambda: torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
        ),
    )
}
DEFAULT_BACKBONE = "resnet50_trunc"


@dataclass(frozen=True)
class LoadedBackbone:
    """A backbone with its weights, in eval mode on the CPU, gradients off.

    ``weights`` is the label used in cache folder names (``imagenet``, ``random`` or
    ``file-<stem>``); ``weights_digest`` is the sha256 of the weight values actually used."""

    spec: BackboneSpec
    module: nn.Module
    weights: str
    weights_digest: str
    weights_source: str  # URL, file path or "random(seed=...)"

    @property
    def is_random(self) -> bool:
        return self.weights == RANDOM_LABEL


def get_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise PipelineError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def load_backbone(name: str = DEFAULT_BACKBONE, weights: str | Path = IMAGENET_LABEL) -> LoadedBackbone:
    """Build backbone ``name`` with ``weights`` ("imagenet", "random" or a state-dict path).

    Raises PipelineError when the weights cannot be had or do not fit the backbone."""
    spec = get_spec(name)
    if str(weights) == RANDOM_LABEL:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            module = spec.builder()
        _calibrate_batchnorm_on_noise(module)
        label, source = RANDOM_LABEL, f"random(seed={RANDOM_SEED}, batchnorm calibrated on seeded noise)"
    elif str(weights) == IMAGENET_LABEL:
        module = spec.builder()
        state, source = _imagenet_state_dict(spec)
        _load_into(module, state, spec, source)
        label = IMAGENET_LABEL
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise PipelineError(
                f"weights file {path} does not exist. Pass --weights imagenet, --weights random, "
                "or the path of a state-dict file (.pth/.pt) of a torchvision-style ResNet."
            )
        module = spec.builder()
        _load_into(module, _read_state_dict(path), spec, str(path))
        label, source = f"file-{_safe_label(path.stem)}", str(path.resolve())
    module.eval().requires_grad_(False)
    return LoadedBackbone(spec, module, label, weights_digest(module), source)


def _calibrate_batchnorm_on_noise(module: nn.Module, n_images: int = 16, size: int = 128) -> None:
    """Set every BatchNorm's running mean and variance to the statistics of seeded Gaussian
    noise images passed through the freshly initialised network.

    Why: with their default statistics (mean 0, variance 1) the BatchNorms of a random ResNet
    do not normalise, activations grow block after block, and the pooled features are a large
    common offset (mean about 11, 6 x their spread across tiles) on which CLAM's attention
    saturates and does not learn. Calibrated, the same random network gives features a model
    can learn from. Data-free and seeded, so the weights (and their digest) are the same on
    every run; computed in float64 and rounded to float32 so that CPUs that sum in a
    different order still agree to the bit."""
    batchnorms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not batchnorms:
        return
    generator = torch.Generator().manual_seed(RANDOM_SEED)
    noise = torch.randn(n_images, 3, size, size, generator=generator, dtype=torch.float64)
    for bn in batchnorms:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average: the statistics of exactly this batch
    module.double().train()
    with torch.no_grad():
        module(noise)
    for bn in batchnorms:
        bn.momentum = 0.1
    module.float().eval()


def weights_digest(module: nn.Module) -> str:
    """sha256 of every parameter and buffer that affects the output (names, dtypes, shapes, values)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        if key.endswith("num_batches_tracked"):  # a training counter: no effect in eval mode
            continue
        value = tensor.detach().to("cpu").contiguous()
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}\n".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def _imagenet_state_dict(spec: BackboneSpec) -> tuple[dict[str, torch.Tensor], str]:
    url = spec.imagenet_weights().url
    file_name = url.rsplit("/", 1)[-1]
    target = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    if not target.is_file():
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(30)  # an air-gapped server should fail fast, not hang
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(target), hash_prefix=None, progress=False)
        except Exception as error:
            raise PipelineError(
                f"the ImageNet weights of {spec.name} are not in the torch hub cache and could not be "
                f"downloaded ({type(error).__name__}: {error}).\n"
                f"  Download {url}\n  and place it as {target}\n"
                f"  (that is, {file_name} in {target.parent}; TORCH_HOME moves this folder),\n"
                "  or pass --weights PATH with a local state-dict file, or --weights random to test "
                "the pipeline with randomly initialised weights (their features are meaningless)."
            ) from error
        finally:
            socket.setdefaulttimeout(previous)
    return _read_state_dict(target), url


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise PipelineError(
            f"cannot read weights file {path} ({type(error).__name__}: {error}). It must be a PyTorch "
            "state dict saved with torch.save(model.state_dict(), path); a truncated download must be "
            "downloaded again."
        ) from error
    for key in _WRAPPER_KEYS:  # checkpoints often wrap the state dict
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
            break
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise PipelineError(f"weights file {path} does not hold a state dict (a mapping of names to tensors)")
    return _strip_prefixes(dict(loaded))


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while changed and state:
        changed = False
        for prefix in _PREFIXES:
            if all(key.startswith(prefix) for key in state):
                state = {key[len(prefix) :]: value for key, value in state.items()}
                changed = True
    return state


def _load_into(module: nn.Module, state: dict[str, torch.Tensor], spec: BackboneSpec, source: str) -> None:
    """Load ``state`` into ``module``; keys of layers the module does not have (a full ResNet's
    layer4/fc for a truncated one) are allowed, anything else missing or unexpected is an error."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    kept_layers = {k.split(".")[0] for k in expected}
    unexpected = [k for k in state if k not in expected and k.split(".")[0] in kept_layers]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if not (set(state) & set(expected)) or missing or unexpected or mismatched:
        details = "; ".join(
            part
            for part in (
                f"missing {len(missing)} (e.g. {', '.join(missing[:3])})" if missing else "",
                f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})" if unexpected else "",
                f"wrong shape: {', '.join(mismatched[:3])}" if mismatched else "",
                "no parameter name in common" if not (set(state) & set(expected)) else "",
            )
            if part
        )
        raise PipelineError(
            f"weights from {source} do not fit backbone {spec.name} ({details}). Pass the weights of a "
            f"torchvision {spec.name.split('_')[0]} (a full network's weights also fit {spec.name}), or "
            "choose the --backbone these weights belong to."
        )
    module.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


def _safe_label(text: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "._" else "_" for c in text)
    return cleaned.strip("._")[:40] or "weights"


def describe(backbone: LoadedBackbone) -> str:
    """One line for logs: name, weights label and the short digest."""
    warning = "  ** RANDOM WEIGHTS: features are meaningless for diagnosis **" if backbone.is_random else ""
    return (
        f"backbone {backbone.spec.name} ({backbone.spec.feature_dim}-d, {backbone.spec.input_size} px), "
        f"weights {backbone.weights} sha256:{backbone.weights_digest[:12]}{warning}"
    )


__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "DEFAULT_BACKBONE",
    "LoadedBackbone",
    "ResNetTrunk",
    "describe",
    "get_spec",
    "load_backbone",
    "weights_digest",
]
