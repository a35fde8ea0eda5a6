"""CLAM-SB and CLAM-MB (Lu et al. 2021, Nat. Biomed. Eng.), batched over padded bags.

    x = (x - mean) / std                                  per-dimension standardisation (feature_norm "standard";
                                                          the training instances' statistics, stored as buffers)
    h = dropout(relu(W1 x))                              instance embeddings, (B, N, 512)
    a = attention_c(tanh(Wa h) * sigmoid(Wb h))          gated attention, one branch (SB) or one per class (MB)
    A = softmax over the bag's valid instances            (B, branches, N), 0 at padding
    M = A h                                               bag representation per branch
    logits = classifier(M)                                SB: one linear layer; MB: one per class on its branch

Instance-level clustering: for the bag's class c, instance classifier c learns that the
``k_sample`` highest-attention instances are "class c" and the ``k_sample`` lowest are not;
with ``subtyping`` the other classes' classifiers also learn that their own top instances
are "not class c'". ``k_sample`` is clamped to half the bag so the two sets never overlap
(CLAM crashes on a bag smaller than ``k_sample``); a bag of one instance has no instance loss.

Dropout (``dropout``) follows the fc layer and both attention gates (CLAM fixes the gates' rate
at 0.25 whenever dropout is on). Module names follow mahmoodlab/CLAM's ``models/model_clam.py``,
so its state-dict keys load here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

MODEL_TYPES = ("clam_sb", "clam_mb")
FEATURE_NORMS = ("standard", "none")
MODEL_SIZES = {"small": (512, 256), "big": (512, 384)}  # (embedding width, attention hidden width)
INSTANCE_LOSSES = ("ce", "svm")
PACK_BELOW = 0.9  # run the instance layers on real instances only when padding exceeds 10%


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; stored in every checkpoint."""

    model_type: str = "clam_sb"
    in_dim: int = 1024
    n_classes: int = 2
    model_size: str = "small"
    dropout: float = 0.25
    k_sample: int = 8
    instance_loss: str = "ce"
    subtyping: bool = False
    # "standard": features are standardised per dimension inside the model (FeatureNorm), with the
    # training instances' mean and std stored as buffers. "none": raw features, as CLAM. The default
    # here is "none" so a configuration (or checkpoint) from before this field rebuilds unchanged.
    feature_norm: str = "none"

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r}: use one of {MODEL_TYPES}")
        if self.model_size not in MODEL_SIZES:
            raise ValueError(f"model_size {self.model_size!r}: use one of {tuple(MODEL_SIZES)}")
        if self.instance_loss not in INSTANCE_LOSSES:
            raise ValueError(f"instance_loss {self.instance_loss!r}: use one of {INSTANCE_LOSSES}")
        if self.feature_norm not in FEATURE_NORMS:
            raise ValueError(f"feature_norm {self.feature_norm!r}: use one of {FEATURE_NORMS}")
        if self.n_classes < 2 or self.in_dim < 1 or self.k_sample < 1 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"invalid model configuration {self}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ClamOutput:
    """What a forward pass returns. B bags, N instances (padded), C classes, K attention branches."""

    logits: torch.Tensor  # (B, C)
    probs: torch.Tensor  # (B, C), softmax of logits
    attention: torch.Tensor  # (B, K, N), softmax over each bag's valid instances, 0 at padding
    attention_raw: torch.Tensor  # (B, K, N), before the softmax, 0 at padding
    # Scalar mean over bags; None without labels, or in eval mode unless forward's instance_eval=True.
    instance_loss: torch.Tensor | None
    # (2,): correct and all predictions of the instance classifiers on the top and bottom k_sample
    # instances (CLAM's clustering accuracy); computed with instance_loss, else None.
    instance_hits: torch.Tensor | None = None


class Dropout(nn.Dropout):
    """``nn.Dropout`` that draws its CPU masks from 16 random bits per element.

    On a CPU, ``bernoulli_`` draws one 32-bit number per element and costs more than CLAM's
    matrix multiplies; one 64-bit draw per four elements halves a training step's time at
    ``--batch_size 16``. The keep probability is exact to 1/65536. Other devices use ``F.dropout``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return F.dropout(x, self.p, self.training)
        n = x.numel()
        words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
        keep = words.view(torch.int16)[:n].view(x.shape) >= -32768 + round(self.p * 65536)
        return x * keep.to(x.dtype).mul_(1.0 / (1.0 - self.p))


class FeatureNorm(nn.Module):
    """Per-dimension standardisation, ``(x - mean) / std``, with the training instances' statistics
    as buffers: they travel in ``model_state_dict``, so every use of the model (training,
    evaluation, attention maps, each cross-validation fold) applies the same transform.

    Until ``set_statistics`` is called it is the identity (mean 0, std 1)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def set_statistics(self, mean, std) -> None:
        mean = torch.as_tensor(mean, dtype=self.mean.dtype).reshape(self.mean.shape)
        std = torch.as_tensor(std, dtype=self.std.dtype).reshape(self.std.shape)
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError("feature statistics must be finite, with every std > 0")
        self.mean.copy_(mean)
        self.std.copy_(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class GatedAttention(nn.Module):
    """Gated attention (Ilse et al. 2018): scores (..., N, K) for K branches; returns (scores, h) like CLAM."""

    def __init__(self, in_dim: int, hidden: int, dropout: float, n_branches: int) -> None:
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), Dropout(dropout))
        self.attention_b = nn.Sequential(nn.Linear(in_dim, hidden), nn.Sigmoid(), Dropout(dropout))
        self.attention_c = nn.Linear(hidden, n_branches)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attention_c(self.attention_a(h) * self.attention_b(h)), h


class CLAM_SB(nn.Module):
    """Single-branch CLAM: one attention map shared by all classes."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        width, hidden = MODEL_SIZES[config.model_size]
        self.n_branches = config.n_classes if config.model_type == "clam_mb" else 1
        self.feature_norm = FeatureNorm(config.in_dim) if config.feature_norm == "standard" else None
        self.attention_net = nn.Sequential(
            nn.Linear(config.in_dim, width),
            nn.ReLU(),
            Dropout(config.dropout),
            GatedAttention(width, hidden, config.dropout, self.n_branches),
        )
        self.classifiers = self._bag_classifiers(width, config.n_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(width, 2) for _ in range(config.n_classes))

    @staticmethod
    def _bag_classifiers(width: int, n_classes: int) -> nn.Module:
        return nn.Linear(width, n_classes)

    def _bag_logits(self, bag_repr: torch.Tensor) -> torch.Tensor:
        """(B, K, width) -> (B, C)."""
        return self.classifiers(bag_repr[:, 0])

    def forward(
        self,
        features: torch.Tensor,
        mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        instance_eval: bool | None = None,
    ) -> ClamOutput:
        """features (B, N, D) float; mask (B, N) bool, True for real instances (None: all real);
        labels (B,) long. The instance loss (and accuracy) is computed with labels in training mode,
        or in any mode with ``instance_eval=True`` (CLAM's validation); ``instance_eval=False`` never."""
        if features.dim() == 2:
            features = features.unsqueeze(0)
        if self.feature_norm is not None:
            features = self.feature_norm(features)  # padding rows become finite junk; the mask hides them
        scores, h = self._instance_layers(features, mask)  # (B, N, K), (B, N, width)
        attention_raw = scores.transpose(1, 2)  # (B, K, N)
        if mask is not None:
            padding = ~mask[:, None, :]
            masked_raw = attention_raw.masked_fill(padding, float("-inf"))
            attention = torch.softmax(masked_raw, dim=-1)
            attention_raw = attention_raw.masked_fill(padding, 0.0)
        else:
            masked_raw = attention_raw
            attention = torch.softmax(attention_raw, dim=-1)
        logits = self._bag_logits(torch.bmm(attention, h))
        instance_loss = hits = None
        if labels is not None and (self.training if instance_eval is None else instance_eval):
            instance_loss, hits = self._instance_loss(masked_raw, h, labels, mask)
        return ClamOutput(
            logits, torch.softmax(logits, dim=-1), attention, attention_raw, instance_loss, hits
        )

    def _instance_layers(
        self, features: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-instance layers (fc and attention scores). When much of the batch is padding,
        they run on the real instances only, which are then put back in place."""
        if mask is None or mask.sum() > PACK_BELOW * mask.numel():
            return self.attention_net(features)
        scores, h = self.attention_net(features[mask])  # (T, K), (T, width) for the T real instances
        return _unpack(scores, mask), _unpack(h, mask)

    def _instance_loss(
        self, masked_raw: torch.Tensor, h: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean over bags of CLAM's instance loss; ``masked_raw`` (B, K, N) is -inf at padding.
        Also (correct, all) predictions of the instance classifiers on the instances the loss uses.

        All classes and bags at once: the instance classifiers score every instance in one
        small matmul, and the top and bottom instances of each branch are picked from those
        scores (a bag-at-a-time loop over classes costs more than the arithmetic at batch 1)."""
        batch, _, n = masked_raw.shape
        n_classes, k_sample = self.config.n_classes, self.config.k_sample
        k_max = min(k_sample, n // 2)  # disjoint top and bottom sets
        if k_max == 0:
            return h.new_zeros(()), h.new_zeros(2)
        top = masked_raw.topk(k_max, dim=-1).indices  # (B, K, k)
        low_scores = masked_raw if mask is None else masked_raw.masked_fill(~mask[:, None, :], float("inf"))
        bottom = low_scores.topk(k_max, dim=-1, largest=False).indices
        if self.n_branches == 1:  # CLAM-SB: every class's classifier reads the one attention branch
            top, bottom = top.expand(-1, n_classes, -1), bottom.expand(-1, n_classes, -1)
        weight = torch.cat([c.weight for c in self.instance_classifiers])  # (C * 2, width)
        bias = torch.cat([c.bias for c in self.instance_classifiers])
        logits = (h @ weight.T + bias).view(batch, n, n_classes, 2).transpose(1, 2)  # (B, C, N, 2)
        top_logits = logits.gather(2, top[..., None].expand(-1, -1, -1, 2))  # (B, C, k, 2)
        bottom_logits = logits.gather(2, bottom[..., None].expand(-1, -1, -1, 2))
        if mask is None:
            rank_weight = h.new_full((batch, 1, k_max), 1.0 / k_max)
        else:  # bags with fewer than 2 k instances use their first k_bag ranks only
            k_bag = torch.clamp(mask.sum(dim=1) // 2, max=k_sample)
            in_rank = torch.arange(k_max, device=h.device) < k_bag[:, None]
            rank_weight = (in_rank / k_bag.clamp(min=1)[:, None]).to(h.dtype)[:, None, :]  # (B, 1, k)
        in_class = F.one_hot(labels, n_classes).to(h.dtype)  # (B, C)
        # In the class: its top instances are positive, its bottom instances negative.
        in_loss = (
            (self._per_instance_loss(top_logits, 1) + self._per_instance_loss(bottom_logits, 0)) * rank_weight
        ).sum(dim=-1) / 2
        per_bag = (in_loss * in_class).sum(dim=1)
        if self.config.subtyping:
            # Out of the class: another class's top instances must not look like that class.
            out_loss = (self._per_instance_loss(top_logits, 0) * rank_weight).sum(dim=-1)
            per_bag = (per_bag + (out_loss * (1 - in_class)).sum(dim=1)) / n_classes
        return per_bag.mean(), self._instance_hits(top_logits, bottom_logits, rank_weight, in_class)

    def _instance_hits(
        self,
        top_logits: torch.Tensor,
        bottom_logits: torch.Tensor,
        rank_weight: torch.Tensor,
        in_class: torch.Tensor,
    ) -> torch.Tensor:
        """(correct, all) predictions, as CLAM's inst_eval counts them: the bag's class's classifier
        on its top (target 1) and bottom (target 0) instances; with subtyping also the other
        classes' classifiers on their top instances (target 0)."""
        with torch.no_grad():
            used = rank_weight > 0  # (B, 1, k): the ranks a bag has
            top_one = top_logits[..., 1] > top_logits[..., 0]  # (B, C, k) predicted "in the class"
            bottom_one = bottom_logits[..., 1] > bottom_logits[..., 0]
            n_used = used.sum(dim=-1).to(in_class.dtype)  # (B, 1)
            right = ((top_one & used).sum(dim=-1) + (~bottom_one & used).sum(dim=-1)).to(in_class.dtype)
            hits = torch.stack([(right * in_class).sum(), (2 * n_used * in_class).sum()])
            if self.config.subtyping:
                out = (~top_one & used).sum(dim=-1).to(in_class.dtype)
                hits = hits + torch.stack([(out * (1 - in_class)).sum(), (n_used * (1 - in_class)).sum()])
        return hits

    def _per_instance_loss(self, logits: torch.Tensor, target: int) -> torch.Tensor:
        """(..., 2) logits, one target for all -> (...) losses."""
        if self.config.instance_loss == "svm":
            return smooth_top1_svm(logits, torch.full(logits.shape[:-1], target, device=logits.device))
        return torch.logsumexp(logits, dim=-1) - logits[..., target]  # cross-entropy


class CLAM_MB(CLAM_SB):
    """Multi-branch CLAM: one attention branch and one bag classifier per class."""

    @staticmethod
    def _bag_classifiers(width: int, n_classes: int) -> nn.Module:
        return nn.ModuleList(nn.Linear(width, 1) for _ in range(n_classes))

    def _bag_logits(self, bag_repr: torch.Tensor) -> torch.Tensor:
        weight = torch.cat([c.weight for c in self.classifiers])  # (C, width)
        bias = torch.cat([c.bias for c in self.classifiers])  # (C,)
        return (bag_repr * weight).sum(dim=-1) + bias


def smooth_top1_svm(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 1.0, tau: float = 1.0
) -> torch.Tensor:
    """Smooth top-1 multiclass SVM loss (Berrada et al. 2018), per element, as CLAM's
    ``topk.SmoothTop1SVM(n_classes)``: tau * logsumexp((s + alpha * [j != y]) / tau) - s_y."""
    margin = alpha * (1.0 - F.one_hot(targets, logits.shape[-1]).to(logits.dtype))
    return (
        tau * torch.logsumexp((logits + margin) / tau, dim=-1) - logits.gather(-1, targets[..., None])[..., 0]
    )


def _unpack(packed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(T, W) rows of the real instances -> (B, N, W), zeros at padding."""
    padded = packed.new_zeros(*mask.shape, packed.shape[-1])
    return padded.index_put((mask,), packed)


def build_model(
    model_type: str = "clam_sb",
    in_dim: int = 1024,
    n_classes: int = 2,
    model_size: str = "small",
    dropout: float = 0.25,
    k_sample: int = 8,
    instance_loss: str = "ce",
    subtyping: bool = False,
    feature_norm: str = "none",
) -> CLAM_SB:
    """A CLAM-SB or CLAM-MB model; raises ValueError on an invalid configuration."""
    return model_from_config(
        ModelConfig(
            model_type,
            in_dim,
            n_classes,
            model_size,
            dropout,
            k_sample,
            instance_loss,
            subtyping,
            feature_norm,
        )
    )


def model_from_config(config: ModelConfig) -> CLAM_SB:
    return (CLAM_MB if config.model_type == "clam_mb" else CLAM_SB)(config)


def clam_loss(
    output: ClamOutput,
    labels: torch.Tensor,
    bag_weight: float = 0.7,
    class_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLAM's objective, ``bag_weight * bag_loss + (1 - bag_weight) * instance_loss``.

    Returns (total, bag_loss). Both are means over the bags of the batch, each bag's
    cross-entropy scaled by its class weight (mean 1 over the training set), so a batch
    of B bags gives the same value as the mean of B one-bag batches."""
    bag_losses = F.cross_entropy(output.logits, labels, reduction="none")
    if class_weights is not None:
        bag_losses = bag_losses * class_weights[labels]
    bag_loss = bag_losses.mean()
    if output.instance_loss is None:
        return bag_loss, bag_loss
    return bag_weight * bag_loss + (1.0 - bag_weight) * output.instance_loss, bag_loss
