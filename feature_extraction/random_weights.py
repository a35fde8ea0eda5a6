"""The BatchNorm calibration of the seeded ``--weights random`` backbones, computed once per user.

``calibrate_batchnorm`` sets every BatchNorm's running statistics to those of seeded noise
(``calibrate_on_noise``). That forward pass in float64 is most of the time it takes to load a
random ResNet-50 (about 0.6 s of 0.8 s on 2 cores), and its result depends only on the initial
weights, the seed, the noise size and the torch version: so it is kept in the per-user cache
(``user_cache``, ``calibration/``), keyed by exactly those, and later runs load the statistics
instead of computing them. The weights, and so their digest and the feature cache, are the same
bit for bit either way (tests/test_backbones.py).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from torch import nn

from feature_extraction.atomic import atomic_output
from feature_extraction.user_cache import key_digest, record, user_cache_dir, verified, writable_dir

RANDOM_SEED = 20210301  # fixed: "random" weights must be the same tensors on every run
_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
log = logging.getLogger(__name__)


def _batchnorms(module: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def calibration_key(name: str, initial_digest: str, n_images: int, size: int) -> dict[str, object]:
    return {
        "what": "BatchNorm running statistics on seeded noise, v1",
        "backbone": name,
        "initial_weights_digest": initial_digest,
        "seed": RANDOM_SEED,
        "n_images": n_images,
        "size": size,
        "torch": torch.__version__,
    }


def calibration_path(key: dict[str, object]) -> Path:
    return user_cache_dir() / "calibration" / f"{key['backbone']}-{key_digest(key)[:16]}.pt"


def calibrate_batchnorm(
    module: nn.Module, name: str, initial_digest: str, n_images: int = 16, size: int = 128
) -> None:
    """``calibrate_on_noise(module, n_images, size)``, or its result from the per-user cache when
    it is there for these initial weights (``initial_digest``: ``weights_digest`` of the module as
    built from the seed); a new result is stored there. No BatchNorm: nothing to do."""
    if not _batchnorms(module):
        return
    key = calibration_key(name, initial_digest, n_images, size)
    path = calibration_path(key)
    if verified(path, key) and _load_statistics(module, path):
        return
    calibrate_on_noise(module, n_images, size)
    if not writable_dir(path.parent):
        return
    statistics = {
        f"{prefix}.{stat}": getattr(bn, stat).detach().clone()
        for prefix, bn in _batchnorms(module).items()
        for stat in _STATISTICS
    }
    try:
        with atomic_output(path) as tmp:
            torch.save(statistics, tmp)
        record(path, key)
    except OSError as error:  # a full or read-only cache: the next run calibrates again
        log.debug(f"could not keep the BatchNorm calibration in {path}: {error}")


def _load_statistics(module: nn.Module, path: Path) -> bool:
    """Put the cached statistics into ``module``'s BatchNorms; False (module untouched) if they do
    not fit it name for name and shape for shape."""
    with contextlib.suppress(Exception):  # unreadable: calibrate instead
        state = torch.load(path, map_location="cpu", weights_only=True)
        batchnorms = _batchnorms(module)
        expected = {
            f"{prefix}.{stat}": getattr(bn, stat) for prefix, bn in batchnorms.items() for stat in _STATISTICS
        }
        if set(state) != set(expected) or any(state[k].shape != v.shape for k, v in expected.items()):
            return False
        with torch.no_grad():
            for key, value in state.items():
                expected[key].copy_(value)
        return True
    return False


def calibrate_on_noise(module: nn.Module, n_images: int = 16, size: int = 128) -> None:
    """Set every BatchNorm's running mean and variance to the statistics of seeded Gaussian
    noise images passed through the freshly initialised network.

    Why: with their default statistics (mean 0, variance 1) the BatchNorms of a random ResNet
    do not normalise, activations grow block after block, and the pooled features are a large
    common offset (mean about 11, 6 x their spread across tiles) on which CLAM's attention
    saturates and does not learn. Calibrated, the same random network gives features a model
    can learn from. Data-free and seeded, so the weights (and their digest) are the same on
    every run; computed in float64 and rounded to float32 so that CPUs that sum in a
    different order still agree to the bit."""
    batchnorms = list(_batchnorms(module).values())
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
