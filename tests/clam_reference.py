"""A hand-built mirror of mahmoodlab/CLAM's ``models/model_clam.py`` module tree, to write state
dicts in CLAM's own key layout (what CLAM saves as ``s_<fold>_checkpoint.pt``) and to compute
CLAM's forward pass on them, independently of ``clam.model``.

CLAM_SB: ``attention_net = Sequential(Linear(L, 512), ReLU, [Dropout], Attn_Net_Gated)``,
``classifiers = Linear(512, C)``, ``instance_classifiers = ModuleList(Linear(512, 2) x C)``.
CLAM_MB: the gated attention has C branches and ``classifiers = ModuleList(Linear(512, 1) x C)``.
Current CLAM always puts a Dropout (of rate ``dropout``) after the ReLU, so the attention sits
at ``attention_net.3``; older CLAM appended the Dropout only with ``--drop_out``, leaving the
attention at ``attention_net.2`` without it. ``Attn_Net`` (no gate) keeps its layers in a
Sequential named ``module``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AttnNetGated(nn.Module):  # CLAM's Attn_Net_Gated
    def __init__(self, L: int, D: int, dropout: bool, n_classes: int) -> None:
        super().__init__()
        a, b = [nn.Linear(L, D), nn.Tanh()], [nn.Linear(L, D), nn.Sigmoid()]
        if dropout:
            a.append(nn.Dropout(0.25))
            b.append(nn.Dropout(0.25))
        self.attention_a = nn.Sequential(*a)
        self.attention_b = nn.Sequential(*b)
        self.attention_c = nn.Linear(D, n_classes)

    def forward(self, x):
        return self.attention_c(self.attention_a(x).mul(self.attention_b(x))), x


class AttnNet(nn.Module):  # CLAM's Attn_Net (gate=False)
    def __init__(self, L: int, D: int, dropout: bool, n_classes: int) -> None:
        super().__init__()
        layers = (
            [nn.Linear(L, D), nn.Tanh()] + ([nn.Dropout(0.25)] if dropout else []) + [nn.Linear(D, n_classes)]
        )
        self.module = nn.Sequential(*layers)

    def forward(self, x):
        return self.module(x), x


class InstanceLoss(nn.Module):
    """Stands for a stateful ``instance_loss_fn`` (CLAM stores it as a submodule; its eval drops its keys)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("labels", torch.arange(2))


class ReferenceCLAM(nn.Module):
    """CLAM_SB (``multi_branch=False``) or CLAM_MB with CLAM's module names and forward pass."""

    def __init__(
        self,
        embed_dim: int = 32,
        size: str = "small",
        n_classes: int = 2,
        multi_branch: bool = False,
        dropout: bool = True,
        old_layout: bool = False,
        gate: bool = True,
        with_loss_buffers: bool = False,
    ) -> None:
        super().__init__()
        L, D = {"small": (512, 256), "big": (512, 384)}[size]
        fc: list[nn.Module] = [nn.Linear(embed_dim, L), nn.ReLU()]
        if dropout or not old_layout:
            fc.append(nn.Dropout(0.25 if dropout else 0.0))
        branches = n_classes if multi_branch else 1
        fc.append((AttnNetGated if gate else AttnNet)(L, D, dropout, branches))
        self.attention_net = nn.Sequential(*fc)
        self.multi_branch = multi_branch
        self.n_classes = n_classes
        if multi_branch:
            self.classifiers = nn.ModuleList(nn.Linear(L, 1) for _ in range(n_classes))
        else:
            self.classifiers = nn.Linear(L, n_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(L, 2) for _ in range(n_classes))
        if with_loss_buffers:
            self.instance_loss_fn = InstanceLoss()
        with torch.no_grad():  # CLAM's default init gives near-uniform outputs; spread them
            for p in self.parameters():
                p.normal_(0, 0.2)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(N, L) features of one bag -> (C,) class probabilities, as CLAM computes them."""
        A, h = self.attention_net(h)
        A = F.softmax(torch.transpose(A, 1, 0), dim=1)
        M = torch.mm(A, h)
        if self.multi_branch:
            logits = torch.stack([self.classifiers[c](M[c])[0] for c in range(self.n_classes)])[None]
        else:
            logits = self.classifiers(M)
        return F.softmax(logits, dim=1)[0]


def clam_state_dict(seed: int = 0, **kwargs) -> tuple[ReferenceCLAM, dict[str, torch.Tensor]]:
    """A seeded reference CLAM in eval mode and its ``state_dict()`` (what CLAM's training saves)."""
    torch.manual_seed(seed)
    model = ReferenceCLAM(**kwargs).eval()
    return model, model.state_dict()
