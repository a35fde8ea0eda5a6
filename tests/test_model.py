"""CLAM-SB / CLAM-MB: CLAM's equations, masked batching, small bags."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clam.model import Dropout, ModelConfig, build_model, clam_loss, smooth_top1_svm

DIM = 16


def padded(bags: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    n_max = max(len(b) for b in bags)
    features = torch.zeros(len(bags), n_max, DIM)
    mask = torch.zeros(len(bags), n_max, dtype=torch.bool)
    for i, bag in enumerate(bags):
        features[i, : len(bag)] = bag
        mask[i, : len(bag)] = True
    return features, mask


@pytest.fixture(params=[(1, 3, 17, 40, 8), (40, 39, 40, 38, 40)], ids=["much padding", "little padding"])
def bags(request) -> list[torch.Tensor]:
    """Much padding runs the instance layers on the real instances only; little, on the padded batch."""
    torch.manual_seed(1)
    return [torch.randn(n, DIM) for n in request.param]


VARIANTS = [
    dict(model_type="clam_sb", instance_loss="ce", subtyping=False),
    dict(model_type="clam_sb", instance_loss="svm", subtyping=True),
    dict(model_type="clam_mb", instance_loss="ce", subtyping=True),
    dict(model_type="clam_mb", instance_loss="svm", subtyping=False),
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_padded_batch_equals_bags_one_at_a_time(bags, variant):
    torch.manual_seed(0)
    model = build_model(in_dim=DIM, n_classes=3, dropout=0.0, k_sample=4, **variant)
    labels = torch.tensor([0, 1, 2, 1, 0])
    features, mask = padded(bags)

    model.eval()
    batch = model(features, mask)
    for i, bag in enumerate(bags):
        single = model(bag[None])
        torch.testing.assert_close(batch.logits[i], single.logits[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            batch.attention[i, :, : len(bag)], single.attention[0], rtol=1e-5, atol=1e-6
        )
        assert torch.all(batch.attention[i, :, len(bag) :] == 0)
        assert torch.all(batch.attention_raw[i, :, len(bag) :] == 0)
    torch.testing.assert_close(batch.attention.sum(-1), torch.ones(len(bags), model.n_branches))

    # Training mode (dropout 0): the batch's loss and gradient are the mean of the bags'.
    model.train()
    model.zero_grad()
    total, _ = clam_loss(model(features, mask, labels), labels)
    total.backward()
    batch_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    singles = [
        clam_loss(model(bag[None], None, labels[i : i + 1]), labels[i : i + 1])[0]
        for i, bag in enumerate(bags)
    ]
    mean = torch.stack(singles).mean()
    mean.backward()
    torch.testing.assert_close(total, mean, rtol=1e-5, atol=1e-6)
    for got, want in zip(batch_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def clam_reference_instance_loss(model, bag: torch.Tensor, label: int) -> torch.Tensor:
    """mahmoodlab/CLAM's CLAM_SB.inst_eval for the bag's class (not subtyping), written out."""
    h = model.attention_net[:3](bag)
    attention = torch.softmax(model.attention_net[3](h)[0].T, dim=1)  # (1, N)
    k = model.config.k_sample
    top = torch.topk(attention, k)[1][-1]
    bottom = torch.topk(-attention, k, dim=1)[1][-1]
    logits = model.instance_classifiers[label](torch.cat([h[top], h[bottom]]))
    targets = torch.cat([torch.ones(k), torch.zeros(k)]).long()
    return F.cross_entropy(logits, targets)


def test_instance_loss_is_clams_on_large_bags():
    torch.manual_seed(0)
    model = build_model("clam_sb", in_dim=DIM, n_classes=2, dropout=0.0, k_sample=5).train()
    bag = torch.randn(30, DIM)
    for label in (0, 1):
        out = model(bag[None], None, torch.tensor([label]))
        torch.testing.assert_close(out.instance_loss, clam_reference_instance_loss(model, bag, label))


@pytest.mark.parametrize("model_type", ["clam_sb", "clam_mb"])
@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_bags_smaller_than_k_sample_never_crash(model_type, n):
    model = build_model(model_type, in_dim=DIM, k_sample=8, subtyping=True).train()
    out = model(torch.randn(1, n, DIM), None, torch.tensor([1]))
    assert torch.isfinite(out.instance_loss)
    if n == 1:  # no disjoint top and bottom sets: no instance loss
        assert out.instance_loss.item() == 0.0
    else:
        assert out.instance_loss.item() > 0.0
    total, _ = clam_loss(out, torch.tensor([1]))
    total.backward()


def test_smooth_top1_svm_matches_its_formula():
    logits = torch.tensor([[2.0, 0.0], [0.5, 0.5]])
    targets = torch.tensor([0, 1])
    expected = [
        math.log(math.exp(2.0) + math.exp(0.0 + 1.0)) - 2.0,
        math.log(math.exp(0.5 + 1.0) + math.exp(0.5)) - 0.5,
    ]
    torch.testing.assert_close(smooth_top1_svm(logits, targets), torch.tensor(expected))


def test_state_dict_keys_follow_clam():
    sb = set(build_model("clam_sb", in_dim=DIM).state_dict())
    assert {
        "attention_net.0.weight",
        "attention_net.3.attention_a.0.weight",
        "attention_net.3.attention_b.0.weight",
        "attention_net.3.attention_c.weight",
        "classifiers.weight",
        "instance_classifiers.1.weight",
    } <= sb
    mb = build_model("clam_mb", in_dim=DIM, n_classes=3, model_size="big")
    assert {"classifiers.0.weight", "classifiers.2.bias"} <= set(mb.state_dict())
    assert mb.attention_net[3].attention_c.weight.shape == (3, 384)
    assert mb.attention_net[0].weight.shape == (512, DIM)


def test_forward_contract_shapes_and_eval_mode():
    model = build_model("clam_mb", in_dim=DIM, n_classes=3)
    features, mask = padded([torch.randn(4, DIM), torch.randn(9, DIM)])
    out = model.eval()(features, mask, torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and out.probs.shape == (2, 3)
    assert out.attention.shape == out.attention_raw.shape == (2, 3, 9)
    assert out.instance_loss is None  # eval mode
    torch.testing.assert_close(out.probs.sum(1), torch.ones(2))
    assert model.train()(features, mask).instance_loss is None  # no labels
    assert model(torch.randn(5, DIM)).logits.shape == (1, 3)  # one bag as (N, D)


def test_invalid_configuration_is_refused():
    with pytest.raises(ValueError):
        build_model("clam_xx")
    with pytest.raises(ValueError):
        ModelConfig(model_size="huge")


def test_class_weights_scale_the_bag_loss():
    model = build_model(in_dim=DIM).eval()
    out = model(torch.randn(2, 5, DIM))
    labels = torch.tensor([0, 1])
    plain, _ = clam_loss(out, labels)
    weighted, _ = clam_loss(out, labels, class_weights=torch.tensor([2.0, 0.0]))
    per_bag = F.cross_entropy(out.logits, labels, reduction="none")
    torch.testing.assert_close(plain, per_bag.mean())
    torch.testing.assert_close(weighted, per_bag[0])  # 2 x bag 0 + 0 x bag 1, over 2 bags


def test_dropout_drops_p_and_keeps_the_mean():
    torch.manual_seed(0)
    layer = Dropout(0.25).train()
    x = torch.ones(400, 500)
    y = layer(x)
    assert abs((y == 0).float().mean().item() - 0.25) < 0.005
    assert abs(y.mean().item() - 1.0) < 0.01
    torch.testing.assert_close(torch.unique(y), torch.tensor([0.0, 1.0 / 0.75]))
    assert torch.equal(layer.eval()(x), x)
    torch.manual_seed(0)
    assert torch.equal(Dropout(0.25).train()(x), y)  # seeded like every torch random draw
