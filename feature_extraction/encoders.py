"""Pathology foundation-model encoders: their published architectures, inputs and weight files.

Each ``Encoder`` builds its network with ``timm`` (an optional extra:
``pip install 'clam-egfr[encoders]'``) exactly as its authors publish it, so their weight files
load key for key. ``feature_extraction.backbones`` registers them next to the ResNets; weights
come from ``feature_extraction.weights``.

Sources cited below (read for the facts, no code copied):

- [TRIDENT]: mahmoodlab/TRIDENT ``trident/patch_encoder_models/load.py`` and
  ``utils/transform_utils.py`` (commit 0120b8bf), the encoders' loaders and eval transforms.
- [UNI]: mahmoodlab/UNI README and the model cards of MahmoodLab/UNI and MahmoodLab/UNI2-h.
- [Virchow2]: model card of paige-ai/Virchow2. [H-optimus]: model cards of bioptimus/H-optimus-0
  and bioptimus/H-optimus-1. [GigaPath]: model card and config.json of prov-gigapath/prov-gigapath.
- [CTransPath]: Xiyue-Wang/TransPath (``ctran.py``) and [TRIDENT]'s copy of its ConvStem.
- Parameter counts: the published figure (model card or paper), checked against the network
  built here on the meta device (tests/test_encoders.py, within 1%).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from feature_extraction.errors import PipelineError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# [H-optimus] model cards: the normalisation of H-optimus-0 and H-optimus-1.
H_OPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
H_OPTIMUS_STD = (0.211883, 0.230117, 0.177517)
INSTALL_HINT = "pip install 'clam-egfr[encoders]'"


@dataclass(frozen=True)
class EncoderCard:
    """What ``--list_backbones`` shows, and where an encoder's weights come from."""

    architecture: str
    params: int  # the published parameter count
    tokens: str  # which tokens (or pooling) form the embedding
    resize: str  # the published resize / crop rule
    licence: str
    hub_repo: str = ""  # Hugging Face repository of the weights ("" when none)
    weight_files: tuple[str, ...] = ()  # the file names its authors publish, the first is fetched
    gated: bool = False  # the hub repository asks to accept terms before downloading
    library: str = "timm"
    hub_repo_type: str = "model"  # or "dataset"


@dataclass(frozen=True)
class Encoder:
    """A foundation-model encoder: ``builder()`` returns the network with its authors' parameter names,
    mapping (N, 3, input_size, input_size) normalised images to (N, feature_dim) embeddings."""

    name: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    feature_dim: int
    builder: Callable[[], nn.Module]
    card: EncoderCard
    resize_size: int = 0  # > input_size: resize the tile to this, then centre-crop input_size
    # Keys of a published file that the network recomputes and does not store, and renames.
    state_filter: Callable[[dict, nn.Module], dict] | None = field(default=None, compare=False)


def timm_available() -> bool:
    return importlib.util.find_spec("timm") is not None


def _timm():
    """timm, imported when an encoder is built (an optional dependency, kept lazy)."""
    try:
        import timm
    except ImportError as error:
        raise PipelineError(f"the foundation-model encoders need timm: {INSTALL_HINT}") from error
    return timm


class ClassAndMeanTokens(nn.Module):
    """A head without parameters: (N, T, D) tokens -> (N, 2D), the class token then the mean of the
    patch tokens (the register tokens excluded), Virchow2's published embedding [Virchow2]."""

    def __init__(self, num_prefix_tokens: int) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([tokens[:, 0], tokens[:, self.num_prefix_tokens :].mean(dim=1)], dim=-1)


def _vit(arch: str, class_and_mean: bool = False, swiglu: bool = False, **kwargs) -> Callable[[], nn.Module]:
    """A timm ViT without classifier (``swiglu``: SwiGLU MLPs with SiLU); with ``class_and_mean`` its
    head returns the class token and the mean of the patch tokens."""

    def build() -> nn.Module:
        timm = _timm()
        extra = {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": nn.SiLU} if swiglu else {}
        pool = {"global_pool": ""} if class_and_mean else {}
        model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs, **extra, **pool)
        if class_and_mean:
            model.head = ClassAndMeanTokens(model.num_prefix_tokens)
        return model

    return build


class ConvStem(nn.Module):
    """CTransPath's patch embedding [CTransPath]: two stride-2 3x3 conv-BN-ReLU, then a 1x1 conv to
    ``embed_dim``, in place of Swin's 4x4 patchify; NHWC out, as timm's SwinTransformer expects."""

    def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None, **_):
        super().__init__()
        if patch_size != 4 or embed_dim % 8:
            raise ValueError("ConvStem needs patch_size 4 and embed_dim divisible by 8")
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers: list[nn.Module] = []
        width_in, width_out = in_chans, embed_dim // 8
        for _ in range(2):
            layers += [
                nn.Conv2d(width_in, width_out, kernel_size=3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width_out),
                nn.ReLU(inplace=True),
            ]
            width_in, width_out = width_out, width_out * 2
        layers.append(nn.Conv2d(width_in, embed_dim, kernel_size=1))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


def _ctranspath() -> nn.Module:
    # [CTransPath] ctran.py: swin_tiny_patch4_window7_224(embed_layer=ConvStem), head removed.
    return _timm().create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, embed_layer=ConvStem
    )


def _swin_filter(state: dict, model: nn.Module) -> dict:
    """CTransPath's file predates timm 0.9: timm's own converter moves each stage's downsample to the
    next stage and drops the index buffers that the network recomputes."""
    from timm.models.swin_transformer import checkpoint_filter_fn  # timm is there: the model was built

    return checkpoint_filter_fn(state, model)


ENCODERS: dict[str, Encoder] = {
    encoder.name: encoder
    for encoder in (
        Encoder(
            "ctranspath",
            224,  # [TRIDENT] Resize((224, 224)), ImageNet mean/std
            IMAGENET_MEAN,
            IMAGENET_STD,
            768,  # Swin-T's last stage, average pooled [CTransPath]
            _ctranspath,
            EncoderCard(
                architecture="Swin-T with ConvStem (timm swin_tiny_patch4_window7_224)",
                params=27_520_038,  # [TRIDENT] lists ~27.5M; built here 27,520,038
                tokens="average of the last stage's tokens",
                resize="resize to 224",
                # [CTransPath] GPL-3.0 code, weights for non-commercial academic use
                licence="GPL-3.0 code; weights non-commercial academic",
                # [TRIDENT] fetches CHIEF's CTransPath weights from this dataset repository (under "model")
                hub_repo="MahmoodLab/hest-bench",
                hub_repo_type="dataset",
                weight_files=("fm_v1/ctranspath/CHIEF_CTransPath.pth",),
            ),
            state_filter=_swin_filter,
        ),
        Encoder(
            "uni_v1",
            224,  # [UNI] Resize(224) + CenterCrop(224), ImageNet mean/std
            IMAGENET_MEAN,
            IMAGENET_STD,
            1024,
            _vit("vit_large_patch16_224", img_size=224, patch_size=16, init_values=1e-5),  # [UNI]
            EncoderCard(
                architecture="ViT-L/16 (timm vit_large_patch16_224)",
                params=303_350_784,  # [UNI]: ViT-L, about 303M (counted 303,350,784)
                tokens="class token",
                resize="resize to 224, centre crop 224",
                licence="CC-BY-NC-ND-4.0, gated",
                hub_repo="MahmoodLab/UNI",
                weight_files=("pytorch_model.bin",),
                gated=True,
            ),
        ),
        Encoder(
            "uni_v2",
            224,  # [UNI] UNI2-h card: Resize(224) + CenterCrop(224), ImageNet mean/std
            IMAGENET_MEAN,
            IMAGENET_STD,
            1536,
            _vit(
                "vit_giant_patch14_224",  # [UNI] UNI2-h card's timm_kwargs
                img_size=224,
                patch_size=14,
                depth=24,
                num_heads=24,
                init_values=1e-5,
                embed_dim=1536,
                mlp_ratio=2.66667 * 2,
                no_embed_class=True,
                reg_tokens=8,
                swiglu=True,
            ),
            EncoderCard(
                architecture="ViT-H/14, SwiGLU, 8 registers (timm vit_giant_patch14_224 + UNI2-h kwargs)",
                params=681_394_176,  # [UNI] UNI2-h: 681M
                tokens="class token",
                resize="resize to 224, centre crop 224",
                licence="CC-BY-NC-ND-4.0, gated",
                hub_repo="MahmoodLab/UNI2-h",
                weight_files=("pytorch_model.bin",),
                gated=True,
            ),
        ),
        Encoder(
            "virchow2",
            224,  # [Virchow2] card: Resize(224, bicubic) + CenterCrop(224), ImageNet mean/std
            IMAGENET_MEAN,
            IMAGENET_STD,
            2560,  # [Virchow2] class token (1280) concatenated with the mean of the patch tokens (1280)
            _vit(
                "vit_huge_patch14_224",  # [Virchow2] config.json
                class_and_mean=True,
                img_size=224,
                init_values=1e-5,
                mlp_ratio=5.3375,
                reg_tokens=4,
                swiglu=True,
            ),
            EncoderCard(
                architecture="ViT-H/14, SwiGLU, 4 registers (timm vit_huge_patch14_224)",
                params=631_239_424,  # [Virchow2] 632M (counted 631,239,424)
                tokens="class token + mean of the patch tokens (registers excluded)",
                resize="resize to 224, centre crop 224",
                licence="CC-BY-NC-ND-4.0, gated",
                hub_repo="paige-ai/Virchow2",
                weight_files=("pytorch_model.bin",),
                gated=True,
            ),
        ),
        Encoder(
            "h_optimus_0",
            224,  # [H-optimus] card: 224 px tiles at 0.5 um/px, its own mean/std
            H_OPTIMUS_MEAN,
            H_OPTIMUS_STD,
            1536,
            _vit("vit_giant_patch14_reg4_dinov2", img_size=224, init_values=1e-5),  # [H-optimus] config.json
            EncoderCard(
                architecture="ViT-g/14, 4 registers (timm vit_giant_patch14_reg4_dinov2)",
                params=1_134_774_272,  # [H-optimus] 1.1B (counted 1,134,774,272)
                tokens="class token",
                resize="resize to 224",
                licence="Apache-2.0, gated",
                hub_repo="bioptimus/H-optimus-0",
                weight_files=("pytorch_model.bin",),
                gated=True,
            ),
        ),
        Encoder(
            "h_optimus_1",
            224,  # [H-optimus] H-optimus-1 card: same input and normalisation as H-optimus-0
            H_OPTIMUS_MEAN,
            H_OPTIMUS_STD,
            1536,
            _vit("vit_giant_patch14_reg4_dinov2", img_size=224, init_values=1e-5),  # [H-optimus] config.json
            EncoderCard(
                architecture="ViT-g/14, 4 registers (timm vit_giant_patch14_reg4_dinov2)",
                params=1_134_774_272,  # [H-optimus] 1.1B, the architecture of H-optimus-0
                tokens="class token",
                resize="resize to 224",
                licence="gated; terms on the model card (not verified here)",  # [H-optimus] H-optimus-1 card
                hub_repo="bioptimus/H-optimus-1",
                weight_files=("pytorch_model.bin",),
                gated=True,
            ),
        ),
        Encoder(
            "gigapath",
            224,  # [GigaPath] card: Resize(256, bicubic) + CenterCrop(224), ImageNet mean/std
            IMAGENET_MEAN,
            IMAGENET_STD,
            1536,
            _vit(  # [GigaPath] config.json's model_args (timm keeps the dinov2 SwiGLU MLP)
                "vit_giant_patch14_dinov2",
                img_size=224,
                patch_size=16,
                embed_dim=1536,
                depth=40,
                num_heads=24,
                init_values=1e-5,
                mlp_ratio=5.33334,
            ),
            EncoderCard(
                architecture="ViT-g/16 (timm vit_giant_patch14_dinov2, patch 16)",
                params=1_134_953_984,  # [GigaPath] tile encoder 1.13B (counted 1,134,953,984)
                tokens="class token",
                resize="resize to 256, centre crop 224",
                # [GigaPath] card header "prov-gigapath-license"; later family table: Apache-2.0; research only
                licence="Prov-GigaPath licence, research only, gated",
                hub_repo="prov-gigapath/prov-gigapath",
                weight_files=("pytorch_model.bin",),
                gated=True,
            ),
            resize_size=256,
        ),
    )
}

__all__ = ["ENCODERS", "ClassAndMeanTokens", "ConvStem", "Encoder", "EncoderCard", "timm_available"]
