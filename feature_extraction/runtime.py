"""How a batch of tiles becomes features: device, precision, threads, and the runner.

Runners take a batch of uint8 tiles shaped (N, H, W, 3) (as decoded, never normalised on
the host) and return float32 features (N, D). Normalisation and the NHWC -> NCHW view are
inside the model (``NormalizedBackbone``), so the same graph serves every runtime.

- CPU: ONNX Runtime when it is installed (about 2x eager PyTorch on a 2-core Zen 3 for the
  ResNets, see docs/benchmarks.md); the foundation-model encoders run eager PyTorch unless asked,
  which was faster for them here (``BackboneSpec.cpu_onnx``). The backbone is exported once per weights digest,
  input size, opset and library versions into the per-user cache (``feature_extraction.user_cache``,
  shared by every --features_dir) and checked against eager PyTorch before first use.
- CPU without ONNX Runtime, or ``runtime="torch"``: eager PyTorch, channels_last.
- CUDA / MPS: eager PyTorch, channels_last, autocast (fp16 by default, bf16 on request),
  non-blocking copies from pinned memory, the copy back overlapped with the next batch.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import logging
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from feature_extraction.atomic import atomic_output
from feature_extraction.backbones import LoadedBackbone
from feature_extraction.errors import PipelineError
from feature_extraction.user_cache import (
    build_lock,
    key_digest,
    record,
    user_cache_dir,
    verified,
    writable_dir,
)

RUNTIMES = ("auto", "onnxruntime", "torch")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
CPU_CORES_PER_DECODE_WORKER = (
    8  # on a CPU decoding costs 2-10% of the backbone's time (docs/embedding.md, "Threads")
)
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
ONNX_OPSET = 18
EXPORT_TOLERANCE = 1e-4  # relative to the largest feature: float32 rounding, not a different model

Result = Callable[[], np.ndarray]
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


@dataclass(frozen=True)
class ComputePlan:
    """Where and how the backbone runs; decided once per run by ``plan_compute``."""

    device: str  # "cpu", "cuda:0", "mps"
    runtime: str  # "onnxruntime" or "torch"
    precision: str  # "fp32", "fp16" or "bf16"
    batch_size: int
    num_workers: int  # DataLoader decode workers
    compute_threads: int  # intra-op threads of the backbone (CPU)

    def describe(self) -> str:
        threads = f", {_count(self.compute_threads, 'compute thread')}" if self.device == "cpu" else ""
        return (
            f"{self.device}, {self.precision}, batch {self.batch_size}, "
            f"{_count(self.num_workers, 'decode worker')}{threads}"
        )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask), else the machine's count."""
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (torchrun's RANK / WORLD_SIZE; 0, 1 alone)."""
    try:
        return int(os.environ.get("RANK", "0")), max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 0, 1


def thread_budget() -> int:
    """Cores this process may use: OMP_NUM_THREADS when set (torchrun sets 1 per process), else all."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, int(value)) if value.isdigit() else available_cores()


def onnxruntime_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx", "onnxscript"))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device of a name: auto, cpu, cuda, cuda:N or mps (any letter case), or a torch.device
    (returned as is). "auto" is cuda:<LOCAL_RANK> when CUDA is usable (one GPU per torchrun process),
    else mps, else cpu; "cuda" is cuda:<LOCAL_RANK>. Raises PipelineError for an unknown name or a
    device that is not there."""
    if isinstance(device, torch.device):
        return device
    name = str(device).strip().lower()
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except (RuntimeError, ValueError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda", "mps"):
        raise PipelineError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise PipelineError(
                f"device {device!r} asked for, but this PyTorch sees no CUDA GPU. Use --device auto or cpu."
            )
        index = local_rank % torch.cuda.device_count() if resolved.index is None else resolved.index
        if index >= torch.cuda.device_count():
            raise PipelineError(
                f"device {device!r} asked for, but PyTorch sees {torch.cuda.device_count()} "
                "CUDA GPUs (cuda:0 is the first)."
            )
        return torch.device("cuda", index)
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise PipelineError(f"device {device!r} asked for, but MPS is not available here. Use --device cpu.")
    return resolved


def plan_compute(
    device: str = "auto",
    precision: str = "auto",
    runtime: str = "auto",
    batch_size: int | None = None,
    num_workers: int = 4,
    cpu_onnx: bool = True,
) -> ComputePlan:
    """Choose device, precision, runtime, batch size, decode workers and compute threads.

    On a CPU the backbone and the decode workers share the cores. Decoding costs 2-10% of
    the backbone's time there (docs/embedding.md, "Threads"), so at most ceil(threads / 8) workers are
    started (one for up to 8 threads, two for 9 to 16, ...; threads: ``thread_budget``) and the
    backbone keeps every core: its threads stop spinning (ONNX Runtime) when idle, so the
    worker's short bursts do not stall it. On an accelerator decoding is the bottleneck:
    every requested worker is used. ``cpu_onnx=False``: "auto" runs eager PyTorch on a CPU too
    (the backbones ONNX Runtime does not speed up here, ``BackboneSpec.cpu_onnx``)."""
    if precision not in PRECISIONS:
        raise PipelineError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if runtime not in RUNTIMES:
        raise PipelineError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    resolved = str(resolve_device(device))  # "cpu", "cuda:0", "mps"
    on_cpu = resolved == "cpu"
    if precision == "auto":
        precision = "fp32" if on_cpu else "fp16"
    if on_cpu and precision == "fp16":
        raise PipelineError(
            "--precision fp16 needs a GPU; on a CPU use fp32 (bf16 runs, slowly, only on "
            "processors with native bf16)"
        )
    if runtime == "onnxruntime":
        if not on_cpu:
            raise PipelineError("--runtime onnxruntime runs on the CPU here; use --runtime torch on a GPU")
        if precision != "fp32":
            raise PipelineError("--runtime onnxruntime runs fp32 only; use --precision fp32")
        if not onnxruntime_available():
            raise PipelineError(
                "--runtime onnxruntime needs onnxruntime, onnx and onnxscript: pip install 'clam-egfr[cpu]'"
            )
    if runtime == "auto":
        onnx = cpu_onnx and on_cpu and precision == "fp32" and onnxruntime_available()
        runtime = "onnxruntime" if onnx else "torch"
    if on_cpu:
        threads = thread_budget()
        workers = min(max(0, num_workers), math.ceil(threads / CPU_CORES_PER_DECODE_WORKER))
        batch = batch_size or (16 if runtime == "onnxruntime" else 8)  # smaller is faster on a CPU
    else:
        threads = 1
        workers = max(0, num_workers)
        batch = batch_size or 256
    if batch < 1:
        raise PipelineError(f"--batch_size must be at least 1, got {batch}")
    return ComputePlan(resolved, runtime, precision, batch, workers, threads)


# -------------------------------------------------------------------------------------- runners


class TorchRunner:
    """Eager PyTorch, channels_last; autocast and asynchronous copies on an accelerator."""

    name = "torch"

    def __init__(self, backbone: LoadedBackbone, plan: ComputePlan) -> None:
        self.device = torch.device(plan.device)
        self.model = NormalizedBackbone(backbone.module, backbone.spec.mean, backbone.spec.std)
        self.model = self.model.to(self.device, memory_format=torch.channels_last).eval()
        self.autocast_dtype = _DTYPES.get(plan.precision)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input size: pick the fastest kernels once

    def start(self, tiles: torch.Tensor) -> Result:
        """Launch the forward pass of (N, H, W, 3) uint8 ``tiles``; call the result for (N, D) float32."""
        with torch.inference_mode(), self._autocast():
            x = tiles.to(self.device, non_blocking=True)
            features = self.model(x).float()
        if self.device.type == "cuda":
            # Copy back asynchronously into pinned memory; waiting on this event (not on the
            # whole stream) lets the next batch's kernels queue up behind it.
            host = torch.empty(features.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(features, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            return lambda: (event.synchronize(), host.numpy())[1]
        if self.device.type == "mps":
            return lambda: features.cpu().numpy()
        return lambda: features.numpy()

    def close(self) -> None:
        pass

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


class OnnxRunner:
    """ONNX Runtime on the CPU, fp32, the exported ``NormalizedBackbone`` graph.

    ``start`` hands the batch to one runner thread and returns at once (ONNX Runtime releases
    the GIL), so the caller's bookkeeping for the previous batch (gathering rows, queueing bag
    writes, the progress bar) overlaps the forward pass instead of adding to it."""

    name = "onnxruntime"

    def __init__(self, model_path: Path, threads: int, spinning: bool = False) -> None:
        import onnxruntime  # optional: imported only when this runner is built

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle threads sleep instead of spin-waiting: a spinning pool steals the cores that decode
        # workers (or another process) need, and on a shared machine that costs far more than the
        # microseconds of wake-up per operator (ResNet operators take milliseconds each).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self.session = onnxruntime.InferenceSession(
            str(model_path), options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxruntime")

    def start(self, tiles: torch.Tensor) -> Result:
        """Queue the forward pass of (N, H, W, 3) uint8 ``tiles``; call the result for (N, D) float32."""
        future = self._thread.submit(self._run, np.ascontiguousarray(tiles.numpy()))
        return future.result

    def _run(self, tiles: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: tiles})[0]

    def close(self) -> None:
        self._thread.shutdown(wait=True)


def build_runner(backbone: LoadedBackbone, plan: ComputePlan, features_dir: Path) -> TorchRunner | OnnxRunner:
    """The runner of ``plan``. If the ONNX export fails or disagrees with PyTorch, say so and
    run eager PyTorch instead (the features are the same either way)."""
    if plan.runtime == "onnxruntime":
        try:
            return OnnxRunner(export_onnx(backbone, features_dir), plan.compute_threads)
        except Exception as error:  # any exporter/runtime failure: PyTorch computes the same features
            log.warning(
                f"ONNX Runtime unavailable for {backbone.spec.name} ({type(error).__name__}: "
                f"{str(error)[:300]}); running eager PyTorch instead (same features, about half "
                "the speed)"
            )
    return TorchRunner(backbone, plan)


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
