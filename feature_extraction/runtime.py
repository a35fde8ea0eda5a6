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

Every runner counts the seconds its device was busy (``busy_seconds``): the forward itself on a
CPU, CUDA events around the copy in, the forward and the copy back on a GPU (read when the batch
is collected, which waits for it anyway). ``feature_extraction.throughput`` turns them into a
verdict. ``plan_compute`` resolves ``--num_workers auto`` and ``--batch_size auto``; on CUDA the
batch size is fitted to the free memory once the model is there (``throughput.settle_batch_size``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from feature_extraction.backbones import LoadedBackbone
from feature_extraction.errors import PipelineError
from feature_extraction.onnx_export import NormalizedBackbone, export_onnx

RUNTIMES = ("auto", "onnxruntime", "torch")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
CPU_CORES_PER_DECODE_WORKER = (
    8  # on a CPU decoding costs 2-10% of the backbone's time (docs/embedding.md, "Threads")
)
AUTO = "auto"  # --num_workers / --batch_size: chosen by plan_compute
CPU_AUTO_WORKERS = 4  # "auto" on a CPU: the plan as it was when 4 was the default (at most ceil(threads / 8))
CPU_AUTO_BATCH = {"onnxruntime": 16, "torch": 8}  # smaller is faster on a CPU
ACCELERATOR_BATCH = 256  # "auto" on MPS, and on CUDA until the model is on the device
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

Result = Callable[[], np.ndarray]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ComputePlan:
    """Where and how the backbone runs; decided once per run by ``plan_compute``."""

    device: str  # "cpu", "cuda:0", "mps"
    runtime: str  # "onnxruntime" or "torch"
    precision: str  # "fp32", "fp16" or "bf16"
    batch_size: int
    num_workers: int  # DataLoader decode workers
    compute_threads: int  # intra-op threads of the backbone (CPU)
    batch_auto: bool = False  # batch size "auto" on CUDA: throughput.settle_batch_size fits it

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


def decode_cores() -> int:
    """Cores of this process on an accelerator node: the usable cores shared by the processes of
    the node (torchrun's LOCAL_WORLD_SIZE; one GPU each)."""
    try:
        local_world = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local_world = 1
    return max(1, available_cores() // local_world)


def max_decode_workers(on_cpu: bool) -> int:
    """The most decode workers worth starting: ceil(threads / 8) on a CPU (they share the cores
    with the backbone), all cores of the process but one on an accelerator (the main process
    feeds the device)."""
    if on_cpu:
        return math.ceil(thread_budget() / CPU_CORES_PER_DECODE_WORKER)
    return max(1, decode_cores() - 1)


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


def auto_or_count(least: int) -> Callable[[str], int | str]:
    """An argparse type for --num_workers / --batch_size: "auto", or a whole number >= ``least``."""

    def parse(text: str) -> int | str:
        if text == AUTO:
            return AUTO
        if not text.strip().isdigit() or int(text) < least:
            raise argparse.ArgumentTypeError(f"expected auto or a whole number >= {least}, got {text!r}")
        return int(text)

    return parse


def plan_compute(
    device: str = "auto",
    precision: str = "auto",
    runtime: str = "auto",
    batch_size: int | str | None = AUTO,
    num_workers: int | str = AUTO,
    cpu_onnx: bool = True,
) -> ComputePlan:
    """Choose device, precision, runtime, batch size, decode workers and compute threads.

    On a CPU the backbone and the decode workers share the cores. Decoding costs 2-10% of
    the backbone's time there (docs/embedding.md, "Threads"), so at most ceil(threads / 8) workers are
    started (one for up to 8 threads, two for 9 to 16, ...; threads: ``thread_budget``), an explicit
    number too, and "auto" asks for 4; the backbone keeps every core: its threads stop spinning
    (ONNX Runtime) when idle, so the worker's short bursts do not stall it. On an accelerator
    decoding is the bottleneck: "auto" starts all cores but one (``max_decode_workers``), an
    explicit number is obeyed. Batch size "auto" (or None): 16 for ONNX Runtime, 8 eager on a CPU,
    256 on an accelerator, refitted on CUDA by ``throughput.settle_batch_size``. ``cpu_onnx=False``: "auto" runs
    eager PyTorch on a CPU too (the backbones ONNX Runtime does not speed up here,
    ``BackboneSpec.cpu_onnx``)."""
    if precision not in PRECISIONS:
        raise PipelineError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if runtime not in RUNTIMES:
        raise PipelineError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    resolved = str(resolve_device(device))  # "cpu", "cuda:0", "mps"
    on_cpu = resolved == "cpu"
    if precision == "auto":
        precision = "fp32" if on_cpu else "fp16"
    _check_runtime(runtime, precision, on_cpu)
    if runtime == "auto":
        onnx = cpu_onnx and on_cpu and precision == "fp32" and onnxruntime_available()
        runtime = "onnxruntime" if onnx else "torch"
    workers_auto, batch_auto = num_workers in (AUTO, None), batch_size in (AUTO, None)
    requested = CPU_AUTO_WORKERS if workers_auto and on_cpu else num_workers
    if on_cpu:
        threads = thread_budget()
        workers = min(max(0, int(requested)), max_decode_workers(on_cpu=True))
        batch = CPU_AUTO_BATCH[runtime] if batch_auto else int(batch_size)
    else:
        threads = 1
        workers = max_decode_workers(on_cpu=False) if workers_auto else max(0, int(requested))
        batch = ACCELERATOR_BATCH if batch_auto else int(batch_size)
    if batch < 1:
        raise PipelineError(f"--batch_size must be at least 1, got {batch}")
    fit = batch_auto and resolved.startswith("cuda")
    return ComputePlan(resolved, runtime, precision, batch, workers, threads, batch_auto=fit)


def _check_runtime(runtime: str, precision: str, on_cpu: bool) -> None:
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


# -------------------------------------------------------------------------------------- runners


class TorchRunner:
    """Eager PyTorch, channels_last; autocast and asynchronous copies on an accelerator."""

    name = "torch"

    def __init__(self, backbone: LoadedBackbone, plan: ComputePlan) -> None:
        self.device = torch.device(plan.device)
        self.input_size = backbone.spec.input_size
        self.model = NormalizedBackbone(backbone.module, backbone.spec.mean, backbone.spec.std)
        self.model = self.model.to(self.device, memory_format=torch.channels_last).eval()
        self.autocast_dtype = _DTYPES.get(plan.precision)
        self.busy_seconds = 0.0  # device busy: see the module docstring
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input size: pick the fastest kernels once

    def start(self, tiles: torch.Tensor) -> Result:
        """Launch the forward pass of (N, H, W, 3) uint8 ``tiles``; call the result for (N, D) float32."""
        if self.device.type == "cuda":
            return self._start_cuda(tiles)
        started = time.perf_counter()
        with torch.inference_mode(), self._autocast():
            features = self.model(tiles.to(self.device)).float()
        if self.device.type == "mps":  # asynchronous too; approximated by launch plus the wait for it

            def collect() -> np.ndarray:
                host = features.cpu().numpy()
                self.busy_seconds += time.perf_counter() - started
                return host

            return collect
        self.busy_seconds += time.perf_counter() - started  # a CPU forward is synchronous
        return features.numpy

    def _start_cuda(self, tiles: torch.Tensor) -> Result:
        # Events on this device's stream (not the current device's: a torchrun rank may run on cuda:1).
        stream = torch.cuda.current_stream(self.device)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record(stream)
        with torch.inference_mode(), self._autocast():
            features = self.model(tiles.to(self.device, non_blocking=True)).float()
        # Copy back asynchronously into pinned memory; waiting on this event (not on the whole
        # stream) lets the next batch's kernels queue up behind it.
        host = torch.empty(features.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(features, non_blocking=True)
        end.record(stream)
        return cuda_result(self, host, begin, end)

    def peak_bytes(self, n_tiles: int) -> float:
        """CUDA memory a batch of ``n_tiles`` adds at its peak (input, activations, output)."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        tiles = torch.zeros((n_tiles, self.input_size, self.input_size, 3), dtype=torch.uint8)
        self.start(tiles.pin_memory())()
        return float(torch.cuda.max_memory_allocated(self.device) - base)

    def close(self) -> None:
        pass

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def cuda_result(runner: TorchRunner, host: torch.Tensor, begin, end) -> Result:
    """Collecting a CUDA batch: wait for its last event (the copy back), then add the device time
    between its two events, which costs no further synchronisation, to ``runner.busy_seconds``."""

    def collect() -> np.ndarray:
        end.synchronize()
        runner.busy_seconds += begin.elapsed_time(end) / 1000.0  # milliseconds
        return host.numpy()

    return collect


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
        self.busy_seconds = 0.0  # time in session.run, on the runner thread

    def start(self, tiles: torch.Tensor) -> Result:
        """Queue the forward pass of (N, H, W, 3) uint8 ``tiles``; call the result for (N, D) float32."""
        future = self._thread.submit(self._run, np.ascontiguousarray(tiles.numpy()))
        return future.result

    def _run(self, tiles: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        features = self.session.run(None, {self.input_name: tiles})[0]
        self.busy_seconds += time.perf_counter() - started  # one runner thread: no race
        return features

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
