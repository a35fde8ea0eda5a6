"""Foundation-model encoders: each registry entry's architecture (on the meta device), real H&E tiles
embedded end to end on both runtimes, weight files that round-trip or are refused with the keys named,
the hub cache, the weights map, --list_backbones, and caches of different encoders never mixing."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from random_data import cohort_slides, write_cohort_folders, write_random_cache

from clam.eval_config import EvaluateConfig
from clam.evaluation import evaluate
from clam.train import parse_args
from feature_extraction import backbones
from feature_extraction.backbones import BACKBONES, backbone_table, load_backbone, resolve_weights
from feature_extraction.bags import read_bag
from feature_extraction.embed import EmbedConfig, embed_cohort
from feature_extraction.embed import main as embed_main
from feature_extraction.encoders import ENCODERS, _vit
from feature_extraction.errors import PipelineError
from feature_extraction.runtime import onnxruntime_available
from feature_extraction.sources import TileTransform

pytest.importorskip("timm", reason="the encoders extra (timm) is not installed")

# A ViT of the published families at test size: Virchow2's block and pooling (SwiGLU, registers,
# class token + patch mean), 2 blocks of width 96. The real sizes are only built on the meta device.
TINY_VIT = dataclasses.replace(
    BACKBONES["virchow2"],
    name="tiny_vit",
    feature_dim=192,
    builder=_vit(
        "vit_huge_patch14_224",
        class_and_mean=True,
        img_size=224,
        init_values=1e-5,
        mlp_ratio=5.3375,
        reg_tokens=4,
        swiglu=True,
        embed_dim=96,
        depth=2,
        num_heads=2,
    ),
)


@pytest.fixture
def tiny_vit(monkeypatch):
    monkeypatch.setitem(BACKBONES, "tiny_vit", TINY_VIT)
    return "tiny_vit"


# Published parameter counts and half a unit of their last digit, where a figure is published
# (model card, paper or TRIDENT's table; see feature_extraction/encoders.py).
PUBLISHED = {
    "ctranspath": (27.5e6, 0.05e6),
    "virchow2": (632e6, 0.5e6),
    "h_optimus_0": (1.1e9, 0.05e9),
    "gigapath": (1.13e9, 0.005e9),
    "phikon_v2": (303e6, 0.5e6),
    "uni_v1": (303e6, 0.5e6),
}


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_each_encoder_has_its_published_size_and_output_dimension(name):
    spec = BACKBONES[name]
    if spec.card.library == "transformers":
        pytest.importorskip("transformers")
    with torch.device("meta"):
        model = spec.builder().eval()
        out = model(torch.zeros(2, 3, spec.input_size, spec.input_size))
    params = sum(p.numel() for p in model.parameters())
    assert abs(params - spec.card.params) <= 0.01 * spec.card.params, (params, spec.card.params)
    if name in PUBLISHED:
        figure, precision = PUBLISHED[name]
        assert abs(params - figure) <= max(precision, 0.01 * figure), (params, figure)
    assert out.shape == (2, spec.feature_dim)
    assert spec.card.hub_repo and spec.card.weight_files and spec.card.licence
    assert spec.default_weights == "hub"


def he_tile(size: int = 256) -> Image.Image:
    """A real H&E tile (tiatoolbox's sample image) when installed, else an H&E-coloured noise tile."""
    found = importlib.util.find_spec("tiatoolbox")
    png = Path(list(found.submodule_search_locations)[0]) / "data" / "target_image.png" if found else None
    if png is not None and png.is_file():
        with Image.open(png) as image:
            return image.convert("RGB").crop((300, 300, 300 + size, 300 + size))
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 90, (size, size, 3)) + np.array([150, 80, 150])
    return Image.fromarray(pixels.astype(np.uint8))


def he_cohort(root: Path) -> Path:
    """Two slides of real H&E tiles (crops of one image) in the spec's layout."""
    tile = he_tile(384)
    for folder, patient, offset in (("EGFR_positive", "P1", 0), ("EGFR_negative", "P2", 64)):
        for i in range(2):
            box = (offset + 32 * i, offset, offset + 32 * i + 256, offset + 256)
            path = root / folder / patient / f"tile_x{256 * i}_y0.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            tile.crop(box).save(path)
    return root


@pytest.mark.parametrize(
    "runtimes",
    [
        pytest.param(
            ("torch", "onnxruntime"),
            marks=pytest.mark.skipif(not onnxruntime_available(), reason="onnxruntime is not installed"),
        ),
    ],
)
@pytest.mark.parametrize("name", ["ctranspath", "tiny_vit"])
def test_an_encoder_embeds_real_he_tiles_alike_on_both_runtimes(name, runtimes, tiny_vit, tmp_path):
    data = he_cohort(tmp_path / "train")
    config = EmbedConfig(backbone=name, weights="random", num_workers=0, progress=False)
    reports = {
        runtime: embed_cohort(
            dataclasses.replace(config, runtime=runtime), data, features_dir=tmp_path / runtime
        )
        for runtime in runtimes
    }
    assert {r.runtime for r in reports.values()} == set(runtimes)
    torch_report = reports["torch"]
    assert torch_report.cache_dir.name.startswith(f"{name}-random-224px")
    assert reports["onnxruntime"].cache_dir.name == torch_report.cache_dir.name
    spec = BACKBONES[name]
    loaded = load_backbone(name, "random")
    for slide_id in ("EGFR_positive__P1", "EGFR_negative__P2"):
        eager = read_bag(torch_report.cache_dir / f"{slide_id}.h5")
        onnx = read_bag(reports["onnxruntime"].cache_dir / f"{slide_id}.h5").features
        assert eager.features.shape == (2, spec.feature_dim) and np.isfinite(eager.features).all()
        assert np.abs(onnx - eager.features).max() <= 1e-4 * np.abs(eager.features).max()
        assert eager.attrs["weights_digest"] == loaded.weights_digest
    # The features are the model's output on the transformed tile, normalised with the encoder's mean/std.
    transform = TileTransform(spec.input_size, spec.mean, spec.std, spec.resize_size)
    tile = Image.open(data / "EGFR_positive" / "P1" / "tile_x0_y0.png")
    x = torch.from_numpy(transform(tile).copy()).permute(2, 0, 1).float()[None] / 255
    x = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        expected = loaded.module(x).numpy()
    first = read_bag(torch_report.cache_dir / "EGFR_positive__P1.h5").features[0]
    np.testing.assert_allclose(first, expected[0], rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_when_the_onnx_export_fails_the_runtime_falls_back_to_torch(tmp_path, monkeypatch, caplog):
    from feature_extraction import runtime

    def broken_export(*args, **kwargs):
        raise RuntimeError("this model cannot be exported")

    monkeypatch.setattr(runtime, "export_onnx", broken_export)
    monkeypatch.setattr(runtime, "onnxruntime_available", lambda: True)
    caplog.set_level(logging.INFO)
    data = he_cohort(tmp_path / "train")
    config = EmbedConfig(
        backbone="ctranspath", weights="random", runtime="onnxruntime", num_workers=0, progress=False
    )
    report = embed_cohort(dataclasses.replace(config, device="cpu"), data, features_dir=tmp_path / "f")
    assert report.runtime == "torch"
    assert "ONNX Runtime unavailable for ctranspath" in caplog.text and "cannot be exported" in caplog.text


def test_on_a_cpu_auto_runs_the_encoders_eagerly_and_the_resnets_through_onnx_runtime(monkeypatch):
    from feature_extraction import runtime

    monkeypatch.setattr(runtime, "onnxruntime_available", lambda: True)
    assert not BACKBONES["uni_v1"].cpu_onnx and not BACKBONES["ctranspath"].cpu_onnx
    assert BACKBONES["resnet50_trunc"].cpu_onnx
    assert runtime.plan_compute("cpu", cpu_onnx=False).runtime == "torch"
    assert runtime.plan_compute("cpu", cpu_onnx=True).runtime == "onnxruntime"


@pytest.mark.parametrize("suffix", [".pth", ".bin", ".safetensors"])
def test_a_saved_random_encoder_round_trips_with_identical_features_and_digest(suffix, tiny_vit, tmp_path):
    reference = load_backbone("tiny_vit", "random")
    path = tmp_path / f"tiny{suffix}"
    state = reference.module.state_dict()
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    loaded = load_backbone("tiny_vit", path)
    assert loaded.weights == "file-tiny" and not loaded.is_random
    assert loaded.weights_digest == reference.weights_digest
    assert not any(p.is_meta for p in loaded.module.parameters())
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(loaded.module(x), reference.module(x))


def test_loaded_weights_are_assigned_to_the_meta_built_encoder_not_copied(tiny_vit, tmp_path, monkeypatch):
    state = load_backbone("tiny_vit", "random").module.state_dict()
    monkeypatch.setattr(backbones, "read_state_dict", lambda *args, **kwargs: dict(state))
    (tmp_path / "w.bin").write_bytes(b"read by the patched reader")
    loaded = load_backbone("tiny_vit", tmp_path / "w.bin").module.state_dict()
    assert all(loaded[k].data_ptr() == v.data_ptr() for k, v in state.items())  # one copy in memory


def test_a_hub_style_folder_loads_through_its_weight_file(tiny_vit, tmp_path):
    from safetensors.torch import save_file

    reference = load_backbone("tiny_vit", "random")
    folder = tmp_path / "tiny-vit"
    folder.mkdir()
    with pytest.raises(PipelineError, match="holds none of pytorch_model.bin, model.safetensors"):
        load_backbone("tiny_vit", folder)
    (folder / "config.json").write_text("{}")
    save_file(
        {k: v.contiguous() for k, v in reference.module.state_dict().items()},
        str(folder / "model.safetensors"),
    )
    loaded = load_backbone("tiny_vit", folder)
    assert loaded.weights == "file-tiny_vit"
    assert loaded.weights_digest == reference.weights_digest


def test_phikon_v2_is_built_from_the_config_published_with_its_weights(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from safetensors.torch import save_file

    from feature_extraction.backbones import weights_digest

    config = {"model_type": "dinov2", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    config.update(patch_size=16, image_size=224, intermediate_size=64)
    torch.manual_seed(0)
    model = BACKBONES["phikon_v2"].builder(config)
    folder = tmp_path / "phikon-v2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    loaded = load_backbone("phikon_v2", folder)
    assert loaded.weights_digest == weights_digest(model)
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(loaded.module(x), model.eval()(x)) and loaded.module(x).shape == (1, 32)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(PipelineError, match="download owkin/phikon-v2 model.safetensors config.json"):
        load_backbone("phikon_v2", "hub")


def test_a_half_precision_file_loads_as_float32(tiny_vit, tmp_path):
    reference = load_backbone("tiny_vit", "random")
    torch.save({k: v.half() for k, v in reference.module.state_dict().items()}, tmp_path / "half.bin")
    loaded = load_backbone("tiny_vit", tmp_path / "half.bin")
    assert {p.dtype for p in loaded.module.parameters()} == {torch.float32}
    assert loaded.weights_digest != reference.weights_digest  # rounded values: another cache


def test_ctranspath_weights_round_trip_through_a_file(tmp_path):
    reference = load_backbone("ctranspath", "random")
    torch.save({"model": reference.module.state_dict()}, tmp_path / "ctranspath.pth")  # the authors' wrapper
    loaded = load_backbone("ctranspath", tmp_path / "ctranspath.pth")
    assert loaded.weights_digest == reference.weights_digest
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(loaded.module(x), reference.module(x))


def test_ctranspath_weights_in_the_authors_timm_0_5_layout_load(tmp_path):
    """Their file (timm 0.5.4) ends each stage with its downsample and stores the attention index
    buffers; timm's converter moves the one and drops the others, and the digest is the same."""
    import re

    reference = load_backbone("ctranspath", "random")
    state = reference.module.state_dict()
    old = {
        re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", k): v
        for k, v in state.items()
    }
    old["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
    old["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    assert "layers.0.downsample.reduction.weight" in old
    torch.save({"model": old}, tmp_path / "CHIEF_CTransPath.pth")
    assert (
        load_backbone("ctranspath", tmp_path / "CHIEF_CTransPath.pth").weights_digest
        == reference.weights_digest
    )


def test_weights_that_do_not_fit_an_encoder_are_refused_naming_the_keys(tiny_vit, tmp_path):
    state = load_backbone("tiny_vit", "random").module.state_dict()
    missing = {k: v for k, v in state.items() if k != "blocks.1.mlp.fc2.weight"}
    extra = {**state, "head.weight": torch.zeros(2, 192)}
    shape = {**state, "cls_token": torch.zeros(1, 1, 64)}
    for case, expected in (
        (missing, "missing 1: blocks.1.mlp.fc2.weight"),
        (extra, "unexpected 1: head.weight"),
        (shape, "wrong shape: cls_token: file (1, 1, 64) vs model (1, 1, 96)"),
    ):
        torch.save(case, tmp_path / "w.pth")
        with pytest.raises(PipelineError, match="do not fit tiny_vit") as error:
            load_backbone("tiny_vit", tmp_path / "w.pth")
        assert expected in str(error.value)


def _fake_hub_file(cache: Path, repo: str, filename: str, state: dict, repo_type: str = "model") -> Path:
    """``filename`` of ``repo`` in a Hugging Face hub cache laid out as huggingface_hub writes it."""
    folder = cache / f"{repo_type}s--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    path = folder / "snapshots" / commit / filename
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return path


def test_hub_weights_come_from_the_local_cache_or_a_message_naming_repo_and_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PipelineError) as error:
        load_backbone("ctranspath")  # its default: hub
    message = str(error.value)
    assert "MahmoodLab/hest-bench" in message and "fm_v1/ctranspath/CHIEF_CTransPath.pth" in message
    assert "--repo-type dataset" in message and "--weights random" in message
    with pytest.raises(PipelineError, match="gated.*huggingface.co/MahmoodLab/UNI"):
        load_backbone("uni_v1", "hub")
    with pytest.raises(PipelineError, match="no ImageNet weights"):
        load_backbone("uni_v1", "imagenet")

    reference = load_backbone("ctranspath", "random")
    card = ENCODERS["ctranspath"].card
    path = _fake_hub_file(
        tmp_path / "hub",
        card.hub_repo,
        card.weight_files[0],
        {"model": reference.module.state_dict()},
        "dataset",
    )
    loaded = load_backbone("ctranspath", "hub")
    assert loaded.weights == "hub" and loaded.weights_digest == reference.weights_digest
    assert str(path) in loaded.weights_source
    assert "hub cache" in backbone_table().split("ctranspath", 1)[1].splitlines()[0]


def test_weights_map_gives_each_encoder_its_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    reference = load_backbone("ctranspath", "random")
    torch.save(reference.module.state_dict(), tmp_path / "ctp.pth")
    mapping = tmp_path / "weights.json"
    mapping.write_text(json.dumps({"ctranspath": "ctp.pth", "uni_v1": "/nowhere/uni.bin"}))
    from feature_extraction.weights import read_weights_map

    paths = read_weights_map(mapping)
    assert resolve_weights("ctranspath", None, paths) == str(tmp_path / "ctp.pth")
    assert resolve_weights("ctranspath", "random", paths) == "random"  # --weights wins
    assert (
        resolve_weights("gigapath", None, paths) == "hub" and resolve_weights("resnet18", None) == "imagenet"
    )
    assert load_backbone("ctranspath", paths["ctranspath"]).weights_digest == reference.weights_digest
    (tmp_path / "weights.toml").write_text('ctranspath = "ctp.pth"\n')
    assert read_weights_map(tmp_path / "weights.toml") == {"ctranspath": str(tmp_path / "ctp.pth")}

    assert embed_main(["--list_backbones", "--weights_map", str(mapping)]) == 0
    table = capsys.readouterr().out
    rows = {line.split()[0]: line for line in table.splitlines()[1:]}
    assert set(rows) == set(BACKBONES)
    assert (
        "weights map" in rows["ctranspath"]
        and "missing" in rows["uni_v1"]
        and rows["gigapath"].endswith("no")
    )
    for header in ("architecture", "input", "dim", "params", "licence", "weights found"):
        assert header in table.splitlines()[0]
    assert "1536" in rows["gigapath"] and "crop of 256" in rows["gigapath"]


def test_listing_builds_no_model(monkeypatch, capsys):
    for name, spec in list(BACKBONES.items()):
        monkeypatch.setitem(BACKBONES, name, dataclasses.replace(spec, builder=None))
    assert embed_main(["--list_backbones"]) == 0
    assert "virchow2" in capsys.readouterr().out


def test_without_timm_an_encoder_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(PipelineError, match=r"pip install 'clam-egfr\[encoders\]'"):
        load_backbone("uni_v1", "random")
    assert load_backbone("resnet18", "random").spec.name == "resnet18"  # the ResNets need nothing new


def test_gigapath_tiles_are_resized_to_256_then_centre_cropped():
    transform = TileTransform(224, (0.5,) * 3, (0.2,) * 3, resize_size=256)
    image = he_tile(512)
    expected = image.resize((256, 256), Image.BILINEAR).crop((16, 16, 240, 240))
    got = transform(image)
    assert got.shape == (224, 224, 3)
    assert np.abs(got.astype(int) - np.asarray(expected, dtype=int)).mean() < 3  # one resampling, not two
    assert "resize(256,bilinear,antialias,PIL)|center_crop(224)" in transform.describe()
    assert TileTransform(224, (0.5,) * 3, (0.2,) * 3).describe() != transform.describe()


def test_clam_train_takes_the_encoders_and_their_default_weights(tmp_path):
    assert parse_args(["--backbone", "uni_v2"])[0].weights == "hub"
    assert parse_args(["--backbone", "uni_v2", "--weights", "/m/uni2.bin"])[0].weights == "/m/uni2.bin"
    assert parse_args([])[0].weights == "imagenet"
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"uni_v2": str(tmp_path / "uni2.bin")}))
    config, explicit = parse_args(["--backbone", "uni_v2", "--weights_map", str(mapping)])
    assert config.weights == str(tmp_path / "uni2.bin") and "weights" not in explicit


def test_a_checkpoint_of_one_encoder_is_refused_on_another_encoders_cache(tmp_path):
    from test_evaluate import make_checkpoint

    slides = cohort_slides(n_patients=4, split="train", instances=(3, 6), seed=2)
    data_dir = write_cohort_folders(tmp_path / "train", slides)
    # Same feature dimension (1024), different encoders: only the cache key tells them apart.
    uni = write_random_cache(tmp_path / "uni", slides, feature_dim=1024, cache_key="uni", backbone="uni_v1")
    resnet = write_random_cache(tmp_path / "resnet", slides, feature_dim=1024, cache_key="resnet")
    uni_key = json.loads((uni / "cache.json").read_text())["cache_key"]
    checkpoint = make_checkpoint(tmp_path / "run_20260101_000000", uni, in_dim=1024, cache_key=uni_key)
    config = EvaluateConfig(
        checkpoint=checkpoint,
        data_dir=data_dir,
        split="train",
        features_dir=resnet,
        num_workers=0,
        progress=False,
    )
    with pytest.raises(PipelineError, match=uni_key):
        evaluate(config)


def test_conch_v15_position_embeddings_of_the_224_px_trunk_are_resampled_to_448_px():
    with torch.device("meta"):
        model = BACKBONES["conch_v15"].builder()
    cls, grid = torch.randn(1, 1, 8), torch.randn(1, 14 * 14, 8)
    state = {"trunk.pos_embed": torch.cat([cls, grid], dim=1), "ln_contrast.weight": torch.ones(768)}
    resampled = BACKBONES["conch_v15"].state_filter(state, model)
    assert resampled["trunk.pos_embed"].shape == (1, 1 + 28 * 28, 8)
    assert torch.equal(resampled["trunk.pos_embed"][:, :1], cls)  # the class token's embedding is kept
    assert resampled["ln_contrast.weight"] is state["ln_contrast.weight"]
    as_saved = {"trunk.pos_embed": resampled["trunk.pos_embed"]}  # a file saved at 448 px is left alone
    assert (
        BACKBONES["conch_v15"].state_filter(as_saved, model)["trunk.pos_embed"] is as_saved["trunk.pos_embed"]
    )


def test_describe_names_random_encoder_weights(tiny_vit):
    assert "RANDOM" in backbones.describe(load_backbone("tiny_vit", "random"))
