"""The backbone as one graph: ``NormalizedBackbone`` (uint8 NHWC tiles in, features out, the
normalisation inside), and its ONNX export for ONNX Runtime.

The export is made once per ``onnx_key`` (the weights' digest, the input and its normalisation,
the opset, and the exporter's and runtime's versions) into the per-user cache
(``feature_extraction.user_cache``), shared by every --features_dir, and checked against eager
PyTorch before first use.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from feature_extraction.atomic import atomic_output
from feature_extraction.backbones import LoadedBackbone
from feature_extraction.user_cache import (
    build_lock,
    key_digest,
    record,
    user_cache_dir,
    verified,
    writable_dir,
)

ONNX_OPSET = 18
EXPORT_TOLERANCE = 1e-4  # relative to the largest feature: float32 rounding, not a different model
log = logging.getLogger(__name__)


class NormalizedBackbone(nn.Module):
    """(N, H, W, 3) uint8 tiles -> (N, D) features: NCHW view, /255, mean/std, backbone."""

    def __init__(self, backbone: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.backbone = backbone
        # (x / 255 - mean) / std folded into one multiply-add on the 0..255 values.
        self.register_buffer("offset", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("scale", 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0))

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        x = tiles.permute(0, 3, 1, 2).float()  # channels_last in memory, NCHW to the convolutions
        return self.backbone((x - self.offset) * self.scale)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def onnx_key(backbone: LoadedBackbone) -> dict[str, object]:
    """Everything the exported graph depends on: the weights (their digest), the input and its
    normalisation, the opset, and the versions of the exporter and of the runtime that reads it."""
    spec = backbone.spec
    return {
        "format": "NormalizedBackbone nhwc uint8 -> features, v1",
        "backbone": spec.name,
        "weights_digest": backbone.weights_digest,
        "input_size": spec.input_size,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "opset": ONNX_OPSET,
        "torch": torch.__version__,
        **{package: _version(package) for package in ("onnx", "onnxscript", "onnxruntime")},
    }


def onnx_path(backbone: LoadedBackbone, features_dir: Path) -> Path:
    """Where the backbone's export lives: the per-user cache (``user_cache.user_cache_dir()/onnx``), or
    ``<features_dir>/.onnx`` when that cache cannot be written. The name holds the backbone, the short
    weights digest, the input size and a digest of ``onnx_key``."""
    spec = backbone.spec
    name = f"{spec.name}-{backbone.weights_digest[:12]}-{spec.input_size}px-{key_digest(onnx_key(backbone))[:16]}.onnx"
    folder = user_cache_dir() / "onnx"
    return (folder if writable_dir(folder) else Path(features_dir) / ".onnx") / name


def export_onnx(backbone: LoadedBackbone, features_dir: Path) -> Path:
    """Export the backbone (with normalisation) to ONNX once per ``onnx_key``; return the file.

    The export is shared by every --features_dir (``onnx_path``) and reused while its sidecar
    record matches (``user_cache.verified``: same key, size and sha256; a partial or corrupt
    file is exported again). One process exports at a time; a new export is compared with eager
    PyTorch on random tiles and rejected (RuntimeError) if they differ by more than float32
    rounding."""
    path, key = onnx_path(backbone, features_dir), onnx_key(backbone)
    if verified(path, key):
        return path
    with build_lock(path):
        if verified(path, key):  # another process exported it while we waited
            return path
        again = " (the file there is incomplete or does not match its record)" if path.exists() else ""
        log.info(f"exporting {backbone.spec.name} to ONNX, once for these weights: {path}{again}")
        _export(backbone, path)
        record(path, key)
    return path


def _export(backbone: LoadedBackbone, path: Path) -> None:
    spec = backbone.spec
    model = NormalizedBackbone(backbone.module, spec.mean, spec.std).eval()
    generator = torch.Generator().manual_seed(0)
    example = torch.randint(
        0, 256, (2, spec.input_size, spec.input_size, 3), dtype=torch.uint8, generator=generator
    )
    with atomic_output(path) as tmp, warnings.catch_warnings(), open(os.devnull, "w") as devnull:
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(devnull):  # the exporter narrates its steps
            try:  # torch.export-based exporter (the default since torch 2.9; needs onnxscript)
                torch.onnx.export(
                    model,
                    (example,),
                    str(tmp),
                    input_names=["tiles"],
                    output_names=["features"],
                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                    opset_version=ONNX_OPSET,
                    dynamo=True,
                    external_data=False,
                )
            except Exception:  # older torch, or a model torch.export cannot trace: the TorchScript exporter
                torch.onnx.export(
                    model,
                    (example,),
                    str(tmp),
                    input_names=["tiles"],
                    output_names=["features"],
                    dynamic_axes={"tiles": {0: "batch"}, "features": {0: "batch"}},
                    opset_version=17,
                    dynamo=False,
                )
        _check_export(Path(tmp), model, example)


def _check_export(path: Path, model: nn.Module, example: torch.Tensor) -> None:
    import onnxruntime  # optional: imported only when the ONNX runner is used

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: example[:1].numpy()})[0]
    with torch.inference_mode():
        expected = model(example[:1]).numpy()
    error = float(np.abs(got - expected).max() / max(float(np.abs(expected).max()), 1e-12))
    if got.shape != expected.shape or not error <= EXPORT_TOLERANCE:
        raise RuntimeError(
            f"ONNX export differs from PyTorch (relative error {error:.2e}, shapes "
            f"{got.shape} vs {expected.shape})"
        )
