"""One epoch of training and of validation: the optimiser, the loaders, the passes over the bags."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from clam.bag_dataset import BagDataset, collate_bags
from clam.loading import LoaderPlan, capped_batches, epoch_order
from clam.metrics import epoch_metrics
from clam.model import clam_loss
from clam.train_config import TrainConfig

VAL_BATCH_SIZE = 16
FUSED_CPU_TORCH = (2, 4)  # fused Adam on a CPU needs torch 2.4 or later


def make_optimizer(
    model: torch.nn.Module, config: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    """CLAM's optimiser (Adam with L2 weight decay). The fused kernel updates all parameters in one
    call (same arithmetic, far less per-step overhead at --batch_size 1) where this torch has it
    for ``device``; otherwise, or when torch refuses it, the default Adam."""
    params = list(model.parameters())  # twice, when the fused attempt is refused
    kwargs = {"lr": config.learning_rate, "weight_decay": config.weight_decay}
    if _fused_possible(device):
        try:
            return torch.optim.Adam(params, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):  # an older torch, or no fused kernel for this device
            pass
    return torch.optim.Adam(params, **kwargs)


def _fused_possible(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return device.type == "cpu" and _torch_version() >= FUSED_CPU_TORCH


def _torch_version() -> tuple[int, int]:
    try:
        major, minor = str(torch.__version__).split("+")[0].split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return (0, 0)


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return bool(optimizer.defaults.get("fused"))


def use_own_kernels(optimizer: torch.optim.Optimizer) -> None:
    """After loading a saved optimizer state: its groups carry the saving torch's kernel choice;
    use this optimizer's own (fused or not) instead."""
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = optimizer.defaults.get("fused"), optimizer.defaults.get("foreach")


def make_loader(
    dataset: BagDataset, config: TrainConfig, plan: LoaderPlan, device: torch.device, epoch: int, train: bool
) -> DataLoader:
    """Training: the bags of ``epoch`` in their seeded order; validation: in a fixed order. Batches
    hold at most ``--batch_size`` bags and at most MAX_BATCH_INSTANCES padded instances
    (``loading.capped_batches``). Streamed bags are read by the plan's worker processes, each a
    batch or two ahead of the model, so reading overlaps compute."""
    dataset.set_epoch(epoch)
    order = (
        epoch_order(dataset.records, config.n_classes, config.seed, epoch, config.balance == "sampler")
        if train
        else range(len(dataset))
    )
    # Validation runs forward only, so it batches bags (padded, same results) whatever --batch_size is.
    batch_size = config.batch_size if train else max(config.batch_size, VAL_BATCH_SIZE)
    return DataLoader(
        dataset,
        batch_sampler=capped_batches(order, dataset.lengths(), batch_size),
        collate_fn=collate_bags,
        num_workers=plan.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(config.seed),  # seeds worker processes only
    )


def train_one_epoch(
    model,
    optimizer,
    loader: DataLoader,
    config: TrainConfig,
    device: torch.device,
    class_weights: torch.Tensor | None,
    desc: str = "train",
) -> dict[str, Any]:
    """One pass over ``loader``; mean losses per bag and the classification metrics."""
    model.train()
    losses: dict[str, list[torch.Tensor]] = {"loss": [], "bag_loss": [], "instance_loss": []}
    sizes, probs, labels = [], [], []
    hits = torch.zeros(2, device=device)
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not config.progress):
        batch = batch.to(device)
        output = model(batch.features, batch.mask, batch.labels)
        total, bag_loss = clam_loss(output, batch.labels, config.bag_weight, class_weights)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        # Kept on the device and averaged once per epoch: no host synchronisation per step
        # (CLAM calls .item() on each bag's losses).
        for name, value in zip(losses, (total, bag_loss, output.instance_loss)):
            losses[name].append(value.detach())
        hits += output.instance_hits
        sizes.append(len(batch.labels))
        probs.append(output.probs.detach())
        labels.append(batch.labels)
    weights = torch.tensor(sizes, device=device, dtype=torch.float32) / sum(sizes)
    means = {name: float((torch.stack(values) * weights).sum()) for name, values in losses.items()}
    return {**means, "inst_acc": _accuracy(hits), **_classification(labels, probs, config)}


@torch.inference_mode()
def validate_epoch(
    model, loader: DataLoader, config: TrainConfig, device: torch.device, desc: str = "val"
) -> dict[str, Any]:
    """Validation metrics. ``loss`` (the monitored one) is the unweighted bag cross-entropy, as in
    CLAM's validation; as there, the instance loss and the instance classifiers' accuracy on the
    top and bottom ``k_sample`` instances (``inst_acc``) are computed in eval mode with the labels."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    instance_sum = torch.zeros((), device=device)
    hits = torch.zeros(2, device=device)
    probs, labels = [], []
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not config.progress):
        batch = batch.to(device)
        output = model(batch.features, batch.mask, batch.labels, instance_eval=True)
        loss_sum += torch.nn.functional.cross_entropy(output.logits, batch.labels, reduction="sum")
        instance_sum += output.instance_loss * len(batch.labels)
        hits += output.instance_hits
        probs.append(output.probs)
        labels.append(batch.labels)
    n = len(loader.dataset)
    return {
        "loss": float(loss_sum) / n,
        "instance_loss": float(instance_sum) / n,
        "inst_acc": _accuracy(hits),
        **_classification(labels, probs, config),
    }


def _accuracy(hits: torch.Tensor) -> float | None:
    """correct / all from (correct, all); None when nothing was predicted (every bag of one instance)."""
    correct, total = (float(v) for v in hits)
    return correct / total if total else None


def _classification(
    labels: list[torch.Tensor], probs: list[torch.Tensor], config: TrainConfig
) -> dict[str, Any]:
    return epoch_metrics(
        torch.cat(labels).cpu().numpy(), torch.cat(probs).float().cpu().numpy(), config.n_classes
    )
