"""Pathology foundation-model encoders: their published architectures, inputs and weight files.

Each ``Encoder`` builds its network with ``timm`` (``transformers`` for Phikon-v2; both an optional
extra: ``pip install 'clam-egfr[encoders]'``) exactly as its authors publish it, so their weight
files load key for key. ``feature_extraction.backbones`` registers them next to the ResNets; weights
come from ``feature_extraction.weights``.

Sources cited below (read for the facts, no code copied):

- [TRIDENT]: mahmoodlab/TRIDENT ``trident/patch_encoder_models/load.py`` and
  ``utils/transform_utils.py`` (commit 0120b8bf), the encoders' loaders and eval transforms.
- [UNI]: mahmoodlab/UNI README and the model cards of MahmoodLab/UNI and MahmoodLab/UNI2-h.
- [Virchow2]: model card of paige-ai/Virchow2. [H-optimus]: model cards of bioptimus/H-optimus-0
  and bioptimus/H-optimus-1. [GigaPath]: model card and config.json of prov-gigapath/prov-gigapath.
- [Phikon-v2]: model card and file list of owkin/phikon-v2 ("ViT-L/16 via DINOv2", Owkin
  non-commercial licence, model.safetensors); [CONCH]: mahmoodlab/CONCH's AttentionalPooler, and
  [TRIDENT conchv1_5]: TRIDENT's CONCH v1.5 vision tower (trunk, attn_pool_contrast, ln_contrast).
- [CTransPath]: Xiyue-Wang/TransPath (``ctran.py``) and [TRIDENT]'s copy of its ConvStem.
- Parameter counts: ``EncoderCard.params`` is the count of the network as its authors' code builds
  it (the same count was taken independently with timm 1.0.31); the comment beside it gives the
  published figure, which tests/test_encoders.py checks at the precision it is published with.
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
    params: int  # the parameter count of the published architecture
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
    # On a CPU, ONNX Runtime ran CTransPath (Swin) 3x and UNI (ViT-L) 1.3x slower than eager PyTorch
    # (benchmarks/bench_embed.py, 2-core Xeon): --runtime auto runs them eagerly.
    cpu_onnx: bool = False
    # A config file published next to the weights (hub-style folder, hub snapshot) that ``builder``
    # takes as a dict; "" when the architecture is fixed in code.
    config_file: str = ""


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


def _phikon_v2(config: dict | None = None) -> nn.Module:
    """Phikon-v2 [Phikon-v2]: a transformers Dinov2Model, ViT-L/16 at 224 px, whose embedding is the
    class token after the final LayerNorm (``last_hidden_state[:, 0]``, its ``pooler_output``).
    ``config``: the values of the config.json published with the weights, when at hand."""
    try:
        import transformers  # optional: only this encoder needs it (kept lazy)
    except ImportError as error:
        raise PipelineError(f"phikon_v2 needs transformers: {INSTALL_HINT}") from error

    class Dinov2ClassToken(transformers.Dinov2Model):
        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return super().forward(pixel_values=pixel_values).pooler_output

    # Without its config.json: the card's "ViT-L/16 via DINOv2" (the other values are not verified
    # here; weights of another shape are refused with the keys named, never loaded partly).
    if config is not None:
        return Dinov2ClassToken(transformers.Dinov2Config.from_dict(config))
    default = transformers.Dinov2Config(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=16, image_size=224
    )
    return Dinov2ClassToken(default)


class AttentionalPooler(nn.Module):
    """CoCa's attentional pooler as CONCH uses it [CONCH]: learned queries attend (multi-head, scaled
    dot product, no residual, no MLP) over the layer-normalised tokens of the trunk."""

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.heads = n_head
        self.scale = (d_model // n_head) ** -0.5
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, d_model * 2, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch = tokens.shape[0]
        context = self.ln_k(tokens)
        q = self.to_q(self.ln_q(self.query)).expand(batch, -1, -1)
        k, v = self.to_kv(context).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, H, N, d)
        attention = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.to_out((attention @ v).transpose(1, 2).flatten(2))


class ConchVisionTower(nn.Module):
    """CONCH v1.5's image encoder [TRIDENT conchv1_5]: a ViT-L/16 trunk (LayerScale 1.0) at 448 px, its
    tokens pooled by one attentional query, then a LayerNorm: (N, 3, 448, 448) -> (N, 768)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = _timm().create_model(
            "vit_large_patch16_224", pretrained=False, num_classes=0, img_size=448, init_values=1.0
        )
        self.attn_pool_contrast = AttentionalPooler(d_model=768, context_dim=1024, n_head=8, n_queries=1)
        self.ln_contrast = nn.LayerNorm(768)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.trunk.forward_features(x))[:, 0])


def _conch_filter(state: dict, model: nn.Module) -> dict:
    """The published trunk is built for 224 px (a 14 x 14 grid of position embeddings) and run at
    448 px: its position embeddings are resampled once to 28 x 28 here, as the authors' forward
    does on every call (DINO's bicubic resampling with a scale factor of (28 + 0.1) / 14)."""
    key = "trunk.pos_embed"
    grid = model.trunk.patch_embed.grid_size[0]
    if key in state and state[key].shape[1] == 1 + 14 * 14 and grid != 14:
        cls, patches = state[key][:, :1], state[key][:, 1:]
        patches = patches.float().reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
        scale = (grid + 0.1) / 14
        patches = nn.functional.interpolate(
            patches, scale_factor=(scale, scale), mode="bicubic", align_corners=False
        )
        patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(cls.dtype)
        state = {**state, key: torch.cat([cls, patches], dim=1)}
    return state


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
        Encoder(
            "conch_v15",
            448,  # [TRIDENT] Resize(448) + CenterCrop(448), ImageNet mean/std
            IMAGENET_MEAN,
            IMAGENET_STD,
            768,  # the attentional pooler's one query, after ln_contrast [TRIDENT conchv1_5]
            ConchVisionTower,
            EncoderCard(
                architecture="ViT-L/16 at 448 px + attentional pooler (CONCH v1.5 vision tower)",
                params=306_711_296,  # no published figure found; built here (trunk with a 28 x 28 grid)
                tokens="attentional pooling of all tokens (one query)",
                resize="resize to 448, centre crop 448",
                licence="CC-BY-NC-ND-4.0, gated",  # MahmoodLab's terms for its models [UNI]
                hub_repo="MahmoodLab/conchv1_5",
                weight_files=("pytorch_model_vision.bin",),
                gated=True,
            ),
            state_filter=_conch_filter,
        ),
        Encoder(
            "phikon_v2",
            224,  # [Phikon-v2] via [TRIDENT]: Resize(224) + CenterCrop(224), ImageNet mean/std
            IMAGENET_MEAN,
            IMAGENET_STD,
            1024,
            _phikon_v2,
            EncoderCard(
                architecture="ViT-L/16, DINOv2 (transformers Dinov2Model)",
                params=303_351_808,  # [Phikon-v2] ViT-L, about 303M (built here 303,351,808)
                tokens="class token",
                resize="resize to 224, centre crop 224",
                licence="Owkin non-commercial licence",
                hub_repo="owkin/phikon-v2",
                weight_files=("model.safetensors",),
                library="transformers",
            ),
            config_file="config.json",
        ),
    )
}

__all__ = [
    "ENCODERS",
    "AttentionalPooler",
    "ClassAndMeanTokens",
    "ConchVisionTower",
    "ConvStem",
    "Encoder",
    "EncoderCard",
    "timm_available",
]
