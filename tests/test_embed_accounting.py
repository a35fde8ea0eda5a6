"""Where an embedding run's time goes: a slow decoder makes the run report
decode-bound, a slow model compute-bound; the summary, the progress bar and the run log carry the
figures; --num_workers auto and --batch_size auto resolve as documented (an accelerator is faked
by monkeypatching: no GPU is needed). A tiny backbone keeps each run to a fraction of a second
beyond the sleeps that set its pace."""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from random_data import write_cohort
from torch import nn

from feature_extraction import extractor, runtime, throughput
from feature_extraction.backbones import BACKBONES, BackboneSpec
from feature_extraction.embed import EmbedConfig, build_parser, embed_cohort, format_summary
from feature_extraction.runtime import NormalizedBackbone, TorchRunner, cuda_result, plan_compute
from feature_extraction.sources import TileTransform
from feature_extraction.throughput import (
    RUN_LOG,
    Throughput,
    fit_batch_size,
    linear_memory,
    settle_batch_size,
)

LAYOUT = {"EGFR_positive": {"P1": 4, "P2": 4}, "EGFR_negative": {"P3": 4, "P4": 4}}  # 16 tiles
TINY = BackboneSpec(
    "tiny_cnn",
    32,
    (0.5, 0.5, 0.5),
    (0.25, 0.25, 0.25),
    8,
    lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
)
CONFIG = EmbedConfig(
    backbone="tiny_cnn", weights="random", runtime="torch", num_workers=0, batch_size=2, progress=False
)
GiB, MiB = 2**30, 2**20


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    """The tiny backbone registered, 2 threads (so a CPU run may start 1 decode worker), a cohort."""
    monkeypatch.setitem(BACKBONES, "tiny_cnn", TINY)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    return write_cohort(tmp_path / "train", LAYOUT)


def slow(monkeypatch, cls, name: str, seconds: float) -> None:
    original = getattr(cls, name)

    def slowed(self, *args):
        time.sleep(seconds)
        return original(self, *args)

    monkeypatch.setattr(cls, name, slowed)


def test_a_slow_decoder_makes_the_run_decode_bound(tiny, tmp_path, monkeypatch, capsys):
    slow(monkeypatch, TileTransform, "__call__", 0.05)  # 50 ms per tile, in the main process
    report = embed_cohort(replace(CONFIG, progress=True), tiny, features_dir=tmp_path / "features")

    figures = report.throughput
    assert figures.n_tiles == 16 and figures.n_batches == 8 and figures.n_decoded == 14
    assert figures.verdict == "decode-bound" and figures.waiting > 0.5 and figures.busy < figures.waiting
    assert figures.decode_seconds >= 14 * 0.05 and figures.workers_needed > 1
    assert figures.advice() == "try --num_workers 1"  # the most a 2-thread CPU run starts
    summary = format_summary(report)
    assert f"time: device busy {figures.busy:.0%}, waiting for tiles {figures.waiting:.0%}" in summary
    assert "decode-bound; 2 cores, 0 decode workers; try --num_workers 1" in summary
    assert "decode-bound" in capsys.readouterr().err  # the progress bar's postfix

    (line,) = (report.cache_dir / RUN_LOG).read_text().splitlines()
    record = json.loads(line)
    assert record["verdict"] == "decode-bound" and record["advice"] == "try --num_workers 1"
    assert record["waiting_for_tiles"] == round(figures.waiting, 4) and record["n_tiles"] == 16
    assert record["rank"] == 0 and record["world"] == 1 and record["embed_seconds"] > 0


def test_a_slow_model_makes_the_run_compute_bound(tiny, tmp_path, monkeypatch):
    slow(monkeypatch, NormalizedBackbone, "forward", 0.05)  # 50 ms per batch of 2 tiles
    report = embed_cohort(CONFIG, tiny, features_dir=tmp_path / "features")

    figures = report.throughput
    assert figures.verdict == "compute-bound" and figures.busy > 0.8 and figures.waiting < 0.15
    assert figures.busy_seconds >= 8 * 0.05 and figures.wall_seconds >= figures.busy_seconds * 0.95
    assert "compute-bound; 2 cores, 0 decode workers; the backbone is the limit" in format_summary(report)
    assert json.loads((report.cache_dir / RUN_LOG).read_text())["verdict"] == "compute-bound"

    again = embed_cohort(CONFIG, tiny, features_dir=tmp_path / "features")  # nothing to embed
    assert again.throughput is None and "time:" not in format_summary(again)
    assert len((report.cache_dir / RUN_LOG).read_text().splitlines()) == 1


def test_decode_workers_are_timed_too(tiny, tmp_path, monkeypatch):
    slow(monkeypatch, TileTransform, "__call__", 0.05)  # in the forked worker as well
    report = embed_cohort(replace(CONFIG, num_workers=1), tiny, features_dir=tmp_path / "features")
    figures = report.throughput
    assert figures.num_workers == 1 and figures.decode_seconds >= figures.n_decoded * 0.05
    assert figures.verdict == "decode-bound" and figures.decode_load > 0.5
    assert "a CPU run starts at most 1 decode workers" in figures.advice()


def shares(busy=0.0, wait=0.0, decode=0.0, **plan) -> Throughput:
    """Figures of a 10 s run of 1,000 tiles with these device, tile-wait and decode seconds."""
    fields = dict(device="cuda:0", runtime="torch", batch_size=256, num_workers=4, cores=16, max_workers=15)
    return Throughput(10.0, 1.0, busy, wait, decode, 4, 1000, 900, **{**fields, **plan})


def test_verdicts_and_advice_on_an_accelerator():
    starving = shares(busy=4.1, wait=5.9, decode=36.0)  # 4 workers busy 90%: decode-bound
    assert starving.verdict == "decode-bound" and starving.workers_needed == 12
    assert starving.describe() == (
        "device busy 41%, waiting for tiles 59% (decode workers busy 90%): decode-bound; "
        "16 cores, 4 decode workers; try --num_workers 12"
    )
    assert shares(busy=1.0, wait=9.0, decode=40.0).advice() == "try --num_workers 15"  # capped
    at_most = shares(busy=1.0, wait=9.0, decode=40.0, num_workers=15)
    assert at_most.advice().startswith("decoding needs about 52 workers and this process has 16 cores")
    busy = shares(busy=9.5, wait=0.1, decode=8.0)
    assert busy.verdict == "compute-bound" and busy.advice().endswith("2 decode workers would do")
    assert shares(busy=9.5, wait=0.1, decode=36.0).verdict == "balanced"  # both near their limit
    host = shares(busy=6.0, wait=0.5, decode=8.0)
    assert (
        host.verdict == "host-bound" and "--batch_size" in host.advice() and ", other 35%" in host.describe()
    )
    assert shares().busy == 0.0 and shares().workers_needed == 0


def test_an_asynchronous_device_computes_while_the_loop_waits():
    # ONNX Runtime or CUDA: the loop waited 9 s for the loader, the device computed 6 of them.
    overlapped = shares(busy=6.0, wait=9.0, decode=10.0)
    assert overlapped.waiting == pytest.approx(0.4) and overlapped.other == pytest.approx(0.0)
    assert overlapped.verdict == "decode-bound"


def test_num_workers_auto_and_explicit(monkeypatch):
    monkeypatch.setattr(runtime, "available_cores", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert plan_compute("cpu").num_workers == 1  # the CPU plan: at most ceil(threads / 8)
    assert plan_compute("cpu", num_workers=0).num_workers == 0
    monkeypatch.setenv("OMP_NUM_THREADS", "64")
    assert plan_compute("cpu").num_workers == 4 and plan_compute("cpu", num_workers=6).num_workers == 6
    assert plan_compute("cpu", num_workers=20).num_workers == 8

    monkeypatch.setattr(runtime, "resolve_device", lambda device: torch.device("cuda", 0))  # a GPU
    assert plan_compute("cuda").num_workers == 15  # all cores but one
    assert plan_compute("cuda", num_workers=4).num_workers == 4  # obeyed
    assert plan_compute("cuda", num_workers=40).num_workers == 40
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun, 4 GPUs on this node: 4 cores each
    assert plan_compute("cuda").num_workers == 3


def test_batch_size_auto_and_explicit(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert plan_compute("cpu", runtime="torch").batch_size == 8
    assert plan_compute("cpu", runtime="torch", batch_size=None).batch_size == 8  # None: auto, as before
    if runtime.onnxruntime_available():
        assert plan_compute("cpu", runtime="onnxruntime").batch_size == 16
    assert not plan_compute("cpu").batch_auto
    monkeypatch.setattr(runtime, "resolve_device", lambda device: torch.device("cuda", 0))
    auto = plan_compute("cuda")
    assert auto.batch_auto and auto.batch_size == 256 and auto.precision == "fp16"
    fixed = plan_compute("cuda", batch_size=128)
    assert fixed.batch_size == 128 and not fixed.batch_auto
    monkeypatch.setattr(runtime, "resolve_device", lambda device: torch.device("mps"))
    assert plan_compute("mps").batch_size == 256 and not plan_compute("mps").batch_auto


def test_fit_batch_size_takes_the_largest_power_of_two_that_fits():
    # 8 GiB free, 25% kept: 6 GiB for 1 GiB fixed + b x 100 MiB -> b <= 51.2 -> 32
    assert fit_batch_size(8 * GiB, 1 * GiB, 100 * MiB) == 32
    assert fit_batch_size(80 * GiB, 1 * GiB, 100 * MiB) == 512  # the cap
    assert fit_batch_size(80 * GiB, 1 * GiB, 100 * MiB, cap=1024) == 512  # 604 tiles fit, not 1024
    assert fit_batch_size(1 * GiB, 1 * GiB, 100 * MiB) == 1  # nothing fits: 1, and CUDA will say why
    assert fit_batch_size(8 * GiB, 0, 6 * GiB / 64) == 64  # exactly at the budget


def test_linear_memory_separates_the_fixed_part_from_the_per_tile_part():
    fixed, per_tile = linear_memory(lambda n: 300 * MiB + n * 20 * MiB)
    assert per_tile == pytest.approx(20 * MiB) and fixed == pytest.approx(300 * MiB)
    # No growth measured (allocator rounding): all of the larger batch's peak counts per tile.
    fixed, per_tile = linear_memory(lambda n: 512 * MiB)
    assert per_tile == pytest.approx(32 * MiB) and fixed == 0.0


def fake_cuda_runner() -> TorchRunner:
    runner = TorchRunner.__new__(TorchRunner)  # no model: only the fields settle_batch_size reads
    runner.device, runner.busy_seconds = torch.device("cuda", 0), 3.0
    return runner


def test_settle_batch_size_fits_a_cuda_plan_to_the_free_memory(monkeypatch):
    monkeypatch.setattr(runtime, "resolve_device", lambda device: torch.device("cuda", 0))
    plan = plan_compute("cuda")
    runner = fake_cuda_runner()
    runner.peak_bytes = lambda n: 2 * GiB + n * 160 * MiB  # a probe: the model's peak at n tiles
    monkeypatch.setattr(throughput, "device_free_bytes", lambda device: 40 * GiB)
    settled = settle_batch_size(runner, plan)
    # 30 GiB kept for use - 2 GiB fixed = 28 GiB; 28 GiB / 160 MiB = 179.2 -> 128
    assert settled.batch_size == 128 and not settled.batch_auto and runner.busy_seconds == 0.0
    assert settle_batch_size(runner, settled) is settled  # explicit or settled: left alone
    assert settle_batch_size(SimpleNamespace(), plan) is plan  # an ONNX runner: left alone


def test_device_free_bytes_counts_the_allocator_cache_as_free(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: calls.append(device) or (5 * GiB, 8 * GiB))
    assert throughput.device_free_bytes(torch.device("cuda", 1)) == 5 * GiB
    assert calls == ["empty_cache", torch.device("cuda", 1)]


def test_a_cuda_batch_adds_its_event_time_when_collected():
    order = []

    class Event:
        def synchronize(self):
            order.append("synchronize")

        def elapsed_time(self, end):
            order.append("elapsed_time")
            return 250.0  # milliseconds

    runner = fake_cuda_runner()
    collect = cuda_result(runner, torch.ones(2, 3), Event(), Event())
    assert runner.busy_seconds == 3.0  # nothing waited for, nothing counted, until collected
    assert collect().tolist() == [[1.0] * 3] * 2
    assert order == ["synchronize", "elapsed_time"] and runner.busy_seconds == pytest.approx(3.25)


def test_the_run_uses_the_settled_batch_size(tiny, tmp_path, monkeypatch):
    settled = []

    def settle(runner, plan):
        settled.append(plan.batch_size)
        return replace(plan, batch_size=3)

    monkeypatch.setattr(extractor, "settle_batch_size", settle)
    report = embed_cohort(CONFIG, tiny, features_dir=tmp_path / "features")
    assert settled == [2] and report.plan.batch_size == 3
    assert report.throughput.batch_size == 3 and report.throughput.n_batches == math.ceil(16 / 3)


def test_the_command_takes_auto_or_a_number():
    args = build_parser().parse_args([])
    assert args.num_workers == "auto" and args.batch_size == "auto"
    args = build_parser().parse_args(["--num_workers", "0", "--batch_size", "64"])
    assert args.num_workers == 0 and args.batch_size == 64
    for bad in (["--num_workers", "-1"], ["--batch_size", "0"], ["--batch_size", "big"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(bad)
    assert EmbedConfig().num_workers == "auto" and EmbedConfig().batch_size == "auto"
    replay = EmbedConfig.from_dict({"num_workers": "auto", "batch_size": "32"})
    assert replay.num_workers == "auto" and replay.batch_size == 32
    assert EmbedConfig.from_dict({"num_workers": "3", "batch_size": None}).num_workers == 3
