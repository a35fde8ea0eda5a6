"""Backbones: the registry's dimensions, weights from a file / the hub cache / a fixed seed, the digest."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision

from feature_extraction import backbones
from feature_extraction.backbones import RESNETS, load_backbone, weights_digest
from feature_extraction.errors import PipelineError


@pytest.mark.parametrize("name", sorted(RESNETS))
def test_each_resnet_outputs_its_declared_feature_dim(name):  # the encoders: tests/test_encoders.py
    spec = RESNETS[name]
    model = spec.builder().eval()
    with torch.inference_mode():
        out = model(torch.zeros(2, 3, 64, 64))  # any size: global average pooling
    assert out.shape == (2, spec.feature_dim)
    assert spec.input_size == 224 and len(spec.mean) == len(spec.std) == 3


def test_resnet50_trunc_is_resnet50_through_layer3():
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50().eval()
    trunk = backbones.ResNetTrunk(resnet, "layer3").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        r = resnet
        expected = r.layer3(r.layer2(r.layer1(r.maxpool(r.relu(r.bn1(r.conv1(x))))))).mean(dim=(2, 3))
        assert torch.allclose(trunk(x), expected, atol=1e-5)
    assert not hasattr(trunk, "layer4") and not hasattr(trunk, "fc")


def test_random_weights_are_the_same_on_every_load_and_say_so():
    first = load_backbone("resnet18", "random")
    second = load_backbone("resnet18", "random")
    assert first.weights == "random" and first.is_random
    assert first.weights_digest == second.weights_digest
    assert not any(p.requires_grad for p in first.module.parameters())
    assert not first.module.training
    assert "RANDOM" in backbones.describe(first)


def test_a_state_dict_file_loads_with_wrappers_and_prefixes_stripped(tmp_path):
    reference = load_backbone("resnet18", "random")
    state = {f"module.{k}": v for k, v in reference.module.state_dict().items()}
    path = tmp_path / "my resnet18.pth"
    torch.save({"epoch": 3, "state_dict": state}, path)
    loaded = load_backbone("resnet18", path)
    assert loaded.weights == "file-my_resnet18"
    assert loaded.weights_digest == reference.weights_digest
    assert not loaded.is_random


def test_full_resnet50_weights_fit_the_truncated_backbone_with_the_same_digest(tmp_path):
    torch.manual_seed(1)
    full = torchvision.models.resnet50()
    torch.save(full.state_dict(), tmp_path / "full.pth")
    trunc = load_backbone("resnet50_trunc", tmp_path / "full.pth")
    torch.save(trunc.module.state_dict(), tmp_path / "trunc.pth")
    again = load_backbone("resnet50_trunc", tmp_path / "trunc.pth")
    assert trunc.weights_digest == again.weights_digest  # only the weights used are digested
    assert torch.equal(
        trunc.module.state_dict()["layer3.5.conv3.weight"], full.state_dict()["layer3.5.conv3.weight"]
    )


def test_weights_that_do_not_fit_are_refused_clearly(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(PipelineError, match="do not fit backbone resnet50"):
        load_backbone("resnet50", tmp_path / "r18.pth")
    torch.save({"head.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(PipelineError, match="no parameter name in common"):
        load_backbone("resnet18", tmp_path / "other.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineError, match="cannot read weights file"):
        load_backbone("resnet18", tmp_path / "garbage.pth")
    with pytest.raises(PipelineError, match="does not exist"):
        load_backbone("resnet18", tmp_path / "missing.pth")
    with pytest.raises(PipelineError, match="unknown backbone"):
        load_backbone("vit_giant", "random")


def test_imagenet_weights_come_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    target = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    target.parent.mkdir(parents=True)
    reference = load_backbone("resnet18", "random")
    torch.save(reference.module.state_dict(), target)

    def no_download(*args, **kwargs):
        raise AssertionError("the cached file must be used")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    loaded = load_backbone("resnet18", "imagenet")
    assert loaded.weights == "imagenet" and loaded.weights_source == url
    assert loaded.weights_digest == reference.weights_digest


def test_offline_without_imagenet_weights_says_what_to_do_and_never_falls_back(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(PipelineError) as raised:
        load_backbone("resnet50_trunc", "imagenet")
    message = str(raised.value)
    assert "resnet50-0676ba61.pth" in message
    assert "https://download.pytorch.org/models/resnet50-0676ba61.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "--weights PATH" in message and "--weights random" in message


def test_digest_follows_the_values_and_ignores_the_batch_counter():
    model = load_backbone("resnet18", "random").module
    digest = weights_digest(model)
    model.bn1.num_batches_tracked += 5
    assert weights_digest(model) == digest
    with torch.no_grad():
        model.bn1.running_mean[0] += 1e-3
    assert weights_digest(model) != digest
