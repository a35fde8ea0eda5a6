"""The registry of backbones: what each one computes, its input, and where its weights come from.

To add a backbone, add a ``BackboneSpec`` to ``BACKBONES``. Everything the cache key needs
(input size, normalisation, output dimension, a digest of the weight values) is derived
from the entry and the loaded weights, never typed by hand.

Weights (``load_backbone(name, weights)``):

- ``"imagenet"``: torchvision's ImageNet weights (IMAGENET1K_V1, the ones CLAM and TRIDENT
  use), from the torch hub cache, downloaded there when missing. Offline with an empty
  cache, a PipelineError says which file to place where.
- ``"random"``: initialised from a fixed seed, BatchNorm statistics calibrated on seeded
  noise (``random_weights``, computed once per user and then read from the per-user cache), so the
  digest and the cache are the same on every run. Only when asked for; never a silent fallback.
- a path: a local state-dict file (``torch.load(weights_only=True)``, or ``.safetensors``) or a
  hub-style folder; a full ResNet's weights also fit the truncated model, and ``module.``-style
  prefixes are stripped.
- ``"hub"`` (the foundation-model encoders of ``feature_extraction.encoders``, their default): the
  authors' file from the Hugging Face hub cache, never downloaded during a run; absent, a
  PipelineError says which repository and file to fetch. Their weights must fit key for key.

The encoders are built on the meta device and their weights assigned, not copied, so a ViT-g
never needs twice its size in memory; ``"random"`` initialises them from the fixed seed.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from feature_extraction.encoders import ENCODERS, IMAGENET_MEAN, IMAGENET_STD, EncoderCard
from feature_extraction.errors import PipelineError
from feature_extraction.random_weights import RANDOM_SEED, calibrate_batchnorm
from feature_extraction.weights import (
    HUB_LABEL,
    fit_problems,
    hub_cached_file,
    missing_hub_weights_message,
    read_state_dict,
)

if TYPE_CHECKING:
    import torchvision

RANDOM_LABEL = "random"
IMAGENET_LABEL = "imagenet"
log = logging.getLogger(__name__)


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
    (N, 3, input_size, input_size) normalised float images to (N, feature_dim) features.

    ``imagenet_weights``: the torchvision weights whose state dict fits ``builder()``'s full net
    (the ResNets). ``card``: a foundation-model encoder's published facts and weight files (its
    weights default to ``"hub"``). ``resize_size``: when larger than ``input_size``, tiles are
    resized to it and centre-cropped to ``input_size``."""

    name: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    feature_dim: int
    builder: Callable[[], nn.Module]
    imagenet_weights: Callable[[], torchvision.models.WeightsEnum] | None = None
    card: EncoderCard | None = None
    resize_size: int = 0
    state_filter: Callable[[dict, nn.Module], dict] | None = field(default=None, compare=False)
    cpu_onnx: bool = True  # --runtime auto on a CPU: ONNX Runtime (faster here), else eager PyTorch
    config_file: str = ""  # a config published next to the weights, which builder(config) takes

    @property
    def default_weights(self) -> str:
        return IMAGENET_LABEL if self.card is None else HUB_LABEL


def _resnet(arch: str, last_layer: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision  # about 1 s to import: only when a ResNet is built (not by clam.train on cached bags)

        return ResNetTrunk(getattr(torchvision.models, arch)(weights=None), last_layer)

    return build


def _torchvision_weights(enum: str) -> Callable[[], torchvision.models.WeightsEnum]:
    def weights() -> torchvision.models.WeightsEnum:
        import torchvision  # lazy, as in _resnet

        return getattr(torchvision.models, enum).IMAGENET1K_V1

    return weights


RESNETS: dict[str, BackboneSpec] = {
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
            _torchvision_weights("ResNet50_Weights"),
        ),
        BackboneSpec(
            "resnet50",
            224,
            IMAGENET_MEAN,
            IMAGENET_STD,
            2048,
            _resnet("resnet50", "layer4"),
            _torchvision_weights("ResNet50_Weights"),
        ),
        BackboneSpec(
            "resnet18",
            224,
            IMAGENET_MEAN,
            IMAGENET_STD,
            512,
            _resnet("resnet18", "layer4"),
            _torchvision_weights("ResNet18_Weights"),
        ),
    )
}
# What --list_backbones says of the ResNets (parameter counts of the networks as built here).
_TORCHVISION_LICENCE = "BSD-3-Clause (torchvision), ImageNet weights"
RESNET_CARDS: dict[str, EncoderCard] = {
    "resnet50_trunc": EncoderCard(
        "ResNet-50 to layer3, average pooled (CLAM)",
        8_543_296,
        "pooled",
        "resize to 224",
        _TORCHVISION_LICENCE,
    ),
    "resnet50": EncoderCard(
        "ResNet-50, average pooled", 23_508_032, "pooled", "resize to 224", _TORCHVISION_LICENCE
    ),
    "resnet18": EncoderCard(
        "ResNet-18, average pooled", 11_176_512, "pooled", "resize to 224", _TORCHVISION_LICENCE
    ),
}
BACKBONES: dict[str, BackboneSpec] = {
    **RESNETS,
    **{
        e.name: BackboneSpec(
            e.name,
            e.input_size,
            e.mean,
            e.std,
            e.feature_dim,
            e.builder,
            card=e.card,
            resize_size=e.resize_size,
            state_filter=e.state_filter,
            cpu_onnx=e.cpu_onnx,
            config_file=e.config_file,
        )
        for e in ENCODERS.values()
    },
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


def load_backbone(name: str = DEFAULT_BACKBONE, weights: str | Path | None = None) -> LoadedBackbone:
    """Build backbone ``name`` with ``weights``: "imagenet" (the ResNets), "hub" (the encoders), "random",
    or a state-dict file or hub-style folder; None: the backbone's default ("imagenet" or "hub").

    Raises PipelineError when the weights cannot be had or do not fit the backbone."""
    spec = get_spec(name)
    weights = spec.default_weights if weights is None else weights
    if str(weights) == RANDOM_LABEL:
        module = _random_module(spec)
        label, source = RANDOM_LABEL, f"random(seed={RANDOM_SEED}, batchnorm calibrated on seeded noise)"
    elif str(weights) == IMAGENET_LABEL and spec.imagenet_weights is not None:
        module = spec.builder()
        state, source = _imagenet_state_dict(spec)
        _load_into(module, state, spec, source)
        label = IMAGENET_LABEL
    elif str(weights) in (IMAGENET_LABEL, HUB_LABEL):
        path = _hub_weights_file(spec, str(weights))
        module = _encoder_with_weights(spec, read_state_dict(path), str(path), _published_config(spec, path))
        label, source = HUB_LABEL, f"hf://{spec.card.hub_repo}/{spec.card.weight_files[0]} ({path})"
    else:
        path = Path(weights).expanduser()
        if not path.exists():
            raise PipelineError(
                f"weights file {path} does not exist. Pass --weights {spec.default_weights}, --weights random, "
                "or the path of a state-dict file (.pth/.bin/.safetensors) or hub-style folder of "
                f"{spec.name}."
            )
        files = spec.card.weight_files if spec.card else ()
        state = read_state_dict(path, [Path(f).name for f in files])
        if spec.card is None:
            module = spec.builder()
            _load_into(module, state, spec, str(path))
        else:
            module = _encoder_with_weights(spec, state, str(path), _published_config(spec, path))
        label, source = f"file-{_safe_label(path.stem)}", str(path.resolve())
    module.eval().requires_grad_(False)
    return LoadedBackbone(spec, module, label, weights_digest(module), source)


def _random_module(spec: BackboneSpec) -> nn.Module:
    """The backbone initialised from the fixed seed, its BatchNorms calibrated on seeded noise."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        module = spec.builder()
    # The ResNets keep the small noise images their digests were first taken with; a Swin needs its size.
    # Only a network with BatchNorms is calibrated (and hashed for the calibration's cache key).
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        sizes = {} if spec.card is None else {"n_images": 4, "size": spec.input_size}
        calibrate_batchnorm(module, spec.name, weights_digest(module), **sizes)
    return module


def _hub_weights_file(spec: BackboneSpec, asked: str) -> Path:
    card = spec.card
    if card is not None and asked == IMAGENET_LABEL:
        raise PipelineError(
            f"{spec.name} has no ImageNet weights: pass --weights hub (its authors' weights, from the Hugging "
            "Face hub cache), --weights PATH (their file) or --weights random"
        )
    if card is None or not card.hub_repo:
        raise PipelineError(
            f"{spec.name} has no {asked} weights: pass --weights PATH (a state-dict file) or --weights random"
        )
    path = hub_cached_file(card.hub_repo, card.weight_files[0], card.hub_repo_type)
    if path is None:
        raise PipelineError(
            missing_hub_weights_message(
                spec.name,
                card.hub_repo,
                card.weight_files[0],
                card.gated,
                card.hub_repo_type,
                [spec.config_file] if spec.config_file else [],
            )
        )
    return path


def _published_config(spec: BackboneSpec, weights_path: Path) -> dict | None:
    """The config the authors publish next to the weights (``spec.config_file`` in the folder, or
    beside the file, or in the same hub snapshot), when the encoder has one and it is there."""
    if not spec.config_file:
        return None
    folder = weights_path if weights_path.is_dir() else weights_path.parent
    path = folder / spec.config_file
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise PipelineError(f"cannot read {path} ({type(error).__name__}: {error})") from error


def _encoder_with_weights(
    spec: BackboneSpec, state: dict[str, torch.Tensor], source: str, config: dict | None = None
) -> nn.Module:
    """The encoder built on the meta device, ``state`` assigned to it (no second copy in memory)
    after a strict check: every key present, none unexpected, every shape right. Half-precision
    files are widened to float32 (the runtimes choose the precision, not the file)."""
    build = spec.builder if config is None else functools.partial(spec.builder, config)
    with torch.device("meta"):
        module = build()
    if spec.state_filter is not None:
        state = spec.state_filter(state, module)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    problems = fit_problems(module.state_dict(), state)
    if problems:
        raise PipelineError(
            f"weights from {source} do not fit {spec.name} ({problems}). Pass the weights its authors publish "
            f"({spec.card.hub_repo} {', '.join(spec.card.weight_files)}), or choose the --backbone these "
            "weights belong to."
        )
    module.load_state_dict(state, strict=False, assign=True)  # strict: checked above, with clearer words
    if any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers())):
        # Buffers the network computes itself (a Swin's attention indices) are not in the file:
        # small networks like these are built for real and the weights copied in.
        module = build()
        module.load_state_dict(state, strict=False)
    return module


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
    return read_state_dict(target), url


def _load_into(module: nn.Module, state: dict[str, torch.Tensor], spec: BackboneSpec, source: str) -> None:
    """Load ``state`` into a ResNet ``module``; keys of layers the module does not have (a full ResNet's
    layer4/fc for a truncated one) are allowed, anything else missing or unexpected is an error."""
    expected = module.state_dict()
    kept_layers = {k.split(".")[0] for k in expected}
    problems = fit_problems(expected, state, ignore_unexpected=lambda k: k.split(".")[0] not in kept_layers)
    if problems:
        raise PipelineError(
            f"weights from {source} do not fit backbone {spec.name} ({problems}). Pass the weights of a "
            f"torchvision {spec.name.split('_')[0]} (a full network's weights also fit {spec.name}), or "
            "choose the --backbone these weights belong to."
        )
    module.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


def _safe_label(text: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "._" else "_" for c in text)
    return cleaned.strip("._")[:40] or "weights"


def resolve_weights(name: str, weights: str | None, weights_map: Mapping[str, str] | None = None) -> str:
    """The weights to load: ``weights`` when given, else ``name``'s entry of ``weights_map``, else its
    default ("imagenet" for the ResNets, "hub" for the foundation-model encoders)."""
    if weights is not None:
        return str(weights)
    if weights_map and name in weights_map:
        return weights_map[name]
    return get_spec(name).default_weights


def weights_found(spec: BackboneSpec, weights_map: Mapping[str, str] | None = None) -> str:
    """Where ``spec``'s default weights are on this machine ("no" when nowhere), without loading them."""
    if weights_map and spec.name in weights_map:
        return "weights map" if Path(weights_map[spec.name]).exists() else "no (weights map path missing)"
    if spec.card is None:
        assert spec.imagenet_weights is not None
        file_name = spec.imagenet_weights().url.rsplit("/", 1)[-1]
        return (
            "torch hub cache" if (Path(torch.hub.get_dir()) / "checkpoints" / file_name).is_file() else "no"
        )
    card = spec.card
    return "hub cache" if hub_cached_file(card.hub_repo, card.weight_files[0], card.hub_repo_type) else "no"


def backbone_table(weights_map: Mapping[str, str] | None = None) -> str:
    """Every registered backbone as a text table (name, architecture, input, dim, params, licence,
    weights found here), from the registry alone: no model is built, no weight is read."""
    header = ("name", "architecture", "input", "dim", "params", "licence", "weights found")
    rows = [header]
    for spec in BACKBONES.values():
        card = spec.card or RESNET_CARDS[spec.name]
        crop = f" (crop of {spec.resize_size})" if spec.resize_size > spec.input_size else ""
        rows.append(
            (
                spec.name,
                card.architecture,
                f"{spec.input_size} px{crop}",
                str(spec.feature_dim),
                f"{card.params / 1e6:,.1f}M",
                card.licence,
                weights_found(spec, weights_map),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def describe(backbone: LoadedBackbone) -> str:
    """One line for logs: name, weights label and the short digest."""
    warning = "  ** RANDOM WEIGHTS: features are meaningless for diagnosis **" if backbone.is_random else ""
    return (
        f"backbone {backbone.spec.name} ({backbone.spec.feature_dim}-d, {backbone.spec.input_size} px), "
        f"weights {backbone.weights} sha256:{backbone.weights_digest[:12]}{warning}"
    )


__all__ = [
    "BACKBONES",
    "RESNETS",
    "RESNET_CARDS",
    "backbone_table",
    "resolve_weights",
    "weights_found",
    "BackboneSpec",
    "DEFAULT_BACKBONE",
    "LoadedBackbone",
    "ResNetTrunk",
    "describe",
    "get_spec",
    "load_backbone",
    "weights_digest",
]
