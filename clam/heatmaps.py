"""Attention maps: which tiles CLAM looked at, as a table, a montage and a heatmap (a library; the
command is ``python -m clam.attention``).

For each slide, ``attention/`` receives:

    <slide_id>.csv           tile_name, x, y, attention, attention_raw, rank  (one row per tile)
    <slide_id>_topk.png      the top-k and bottom-k tiles with their scores and the slide's prediction
    <slide_id>_heatmap.png   attention over the slide's thumbnail (bags cut from a whole-slide image)
                             or over the slide reassembled from its tiles (when coords are known)
    index.csv                one row per slide: prediction, attention branch, files written

``attention`` is the softmax weight of the tile in the bag representation (it sums to 1 over
the slide); ``attention_raw`` is the score before the softmax. For CLAM-MB the branch of the
predicted class is used. ``x``/``y`` are the tile's position in slide pixels, -1 when unknown.
The files' names and columns are clam.run_files'; the tile images come from clam.tile_images.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from PIL import Image
from scipy.stats import rankdata

from clam.run_files import ATTENTION_COLUMNS, ATTENTION_INDEX, DEFAULT_TOP_K, INDEX_COLUMNS, attention_files
from clam.tile_images import HEATMAP_MAX_PIXELS, is_whole_slide, read_tile_image, slide_thumbnail
from feature_extraction.atomic import atomic_output, atomic_write_text
from feature_extraction.bags import COORD_SENTINEL, BagAttrs

MONTAGE_TILE_PIXELS = 224
HEATMAP_CMAP = "coolwarm"  # blue = low, red = high, as in CLAM's heatmaps
HEATMAP_ALPHA = 0.55  # opacity of the attention colours over the tissue
FIGURE_DPI = 110

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlideAttention:
    """The attention of one slide's tiles (N of them) and the slide's prediction.

    ``attention`` (N,) sums to 1; ``attention_raw`` (N,) is its pre-softmax score; both come
    from ``branch`` (0 for CLAM-SB, the predicted class for CLAM-MB). ``coords`` (N, 2) holds
    pixel positions, COORD_SENTINEL where the tile name carried none."""

    slide_id: str
    patient_id: str
    label: int | None
    probs: np.ndarray  # (C,)
    class_names: tuple[str, ...]
    branch: int
    tile_names: list[str]
    coords: np.ndarray  # (N, 2)
    attention: np.ndarray  # (N,)
    attention_raw: np.ndarray  # (N,)
    n_branches: int = 1
    bag_attrs: BagAttrs | None = None  # the bag's (None: not written by stage 1): where its tile images are

    @property
    def predicted(self) -> int:
        return int(np.argmax(self.probs))

    @property
    def order(self) -> np.ndarray:
        """Tile indices from highest to lowest attention (ties keep tile order)."""
        return np.argsort(-self.attention, kind="stable")

    def title(self) -> str:
        pred = self.class_names[self.predicted]
        text = f"{self.slide_id}: predicted {pred} (p={self.probs[self.predicted]:.2f})"
        if self.label is not None and self.label >= 0:
            text += f", true {self.class_names[self.label]}"
        return text


def slide_attention(
    slide_id: str,
    patient_id: str,
    label: int | None,
    probs: np.ndarray,
    attention: np.ndarray,
    attention_raw: np.ndarray,
    tile_names: Sequence[str],
    coords: np.ndarray,
    class_names: Sequence[str],
    bag_attrs: BagAttrs | None = None,
) -> SlideAttention:
    """Pick the branch to explain from a model's (K, N) attention: the predicted class's for
    CLAM-MB (K = C branches), the only one for CLAM-SB (K = 1)."""
    probs = np.asarray(probs, dtype=np.float64)
    attention = np.asarray(attention, dtype=np.float64).reshape(-1, len(tile_names))
    attention_raw = np.asarray(attention_raw, dtype=np.float64).reshape(-1, len(tile_names))
    branch = int(np.argmax(probs)) if attention.shape[0] > 1 else 0
    return SlideAttention(
        slide_id=slide_id,
        patient_id=patient_id,
        label=label,
        probs=probs,
        class_names=tuple(class_names),
        branch=branch,
        tile_names=list(tile_names),
        coords=np.asarray(coords, dtype=np.int64).reshape(-1, 2),
        attention=attention[branch],
        attention_raw=attention_raw[branch],
        n_branches=int(attention.shape[0]),
        bag_attrs=bag_attrs,
    )


def write_attention_csv(path: str | Path, slide: SlideAttention) -> None:
    """One row per tile in bag order; ``rank`` 1 is the tile with the highest attention."""
    ranks = np.empty(len(slide.attention), dtype=np.int64)
    ranks[slide.order] = np.arange(1, len(slide.attention) + 1)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(ATTENTION_COLUMNS)
    for i, name in enumerate(slide.tile_names):
        writer.writerow(
            [
                name,
                int(slide.coords[i, 0]),
                int(slide.coords[i, 1]),
                f"{slide.attention[i]:.8g}",
                f"{slide.attention_raw[i]:.8g}",
                int(ranks[i]),
            ]
        )
    atomic_write_text(path, buffer.getvalue())


def plot_topk(
    path: str | Path, slide: SlideAttention, data_dir: Path | None, top_k: int = DEFAULT_TOP_K
) -> None:
    """A montage: the ``top_k`` highest-attention tiles above the ``top_k`` lowest.

    ``top_k`` is clamped to half the bag so that no tile appears in both rows (a one-tile bag
    shows one tile). Each tile is labelled with its rank, its attention and how many times the
    uniform weight 1/N that is."""
    n = len(slide.attention)
    k = max(1, min(top_k, n // 2)) if n > 1 else 1
    rows = [("highest attention", slide.order[:k])]
    if n > 1:
        rows.append(("lowest attention", slide.order[::-1][:k][::-1]))
    ranks = np.empty(n, dtype=np.int64)
    ranks[slide.order] = np.arange(1, n + 1)
    size = 1.9
    fig = Figure(figsize=(max(size * k, 6.5), size * 1.28 * len(rows) + 0.9), layout="constrained")
    axes = np.asarray(fig.subplots(len(rows), k, squeeze=False))
    for row, (caption, indices) in enumerate(rows):
        for col in range(k):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(indices):
                ax.set_axis_off()
                continue
            i = int(indices[col])
            image = read_tile_image(data_dir, slide.bag_attrs, slide.tile_names[i], slide.coords[i])
            if image is None:
                ax.set_facecolor("0.85")
                ax.text(
                    0.5, 0.5, "image\nnot found", ha="center", va="center", fontsize=8, transform=ax.transAxes
                )
            else:
                image.thumbnail((MONTAGE_TILE_PIXELS, MONTAGE_TILE_PIXELS))  # about its size in the figure
                ax.imshow(image)
            ax.set_title(
                f"#{ranks[i]}  a={slide.attention[i]:.3g}\n{slide.attention[i] * n:.2f}x uniform", fontsize=8
            )
            ax.set_xlabel(_short(slide.tile_names[i], 24), fontsize=6.5)
            for spine in ax.spines.values():
                spine.set_edgecolor("tab:red" if row == 0 else "tab:blue")
                spine.set_linewidth(2.5)
        axes[row, 0].set_ylabel(caption, fontsize=9)
    fig.suptitle(
        f"{slide.title()}\n{n} tiles{_branch_text(slide)}; a = attention weight (sums to 1 over the slide)",
        fontsize=10,
    )
    _save(fig, path)


@dataclass(frozen=True)
class HeatmapLayout:
    """Where the tiles of a slide land on the heatmap's canvas.

    A tile at ``coords`` covers the ``side`` x ``side`` canvas pixels from ``cell(coords)``
    (left, top); ``scores`` (canvas height, width) holds each covered pixel's attention
    percentile and NaN where no tile lies."""

    tissue: Image.Image  # the slide's thumbnail, or the tiles' images pasted at their cells (white elsewhere)
    scores: np.ndarray
    origin: np.ndarray  # (2,) the coordinates of the canvas's top-left corner
    scale: float  # canvas pixels per unit of ``coords``
    side: int  # a tile's side on the canvas
    known: np.ndarray  # (N,) the tiles that have coordinates
    thumbnail: bool  # the tissue is the whole-slide thumbnail
    have_images: bool  # the tissue shows something (the thumbnail or at least one tile image)

    def cell(self, xy: np.ndarray) -> tuple[int, int]:
        left, top = ((np.asarray(xy) - self.origin) * self.scale).astype(int).tolist()
        return left, top


def heatmap_layout(
    slide: SlideAttention, data_dir: Path | None, notes: list[str] | None = None
) -> HeatmapLayout | str:
    """The canvas of ``plot_heatmap``, or why there is none (no tile carries coordinates).

    A bag cut from a whole-slide image is laid over the slide's thumbnail at its level-0 positions
    (origin (0, 0), the thumbnail's scale); when the slide cannot be found or opened, a warning
    says so (and ``notes`` gets it) and the slide is reassembled from its tiles as for tile
    folders: the tiles' positions from their smallest one, scaled to fit HEATMAP_MAX_PIXELS."""
    known = (slide.coords[:, 0] != COORD_SENTINEL) & (slide.coords[:, 1] != COORD_SENTINEL)
    if not known.any():
        return "tile names carry no coordinates, so the slide cannot be reassembled"
    indices = np.flatnonzero(known)
    found = slide_thumbnail(data_dir, slide.bag_attrs) if is_whole_slide(slide.bag_attrs) else None
    if isinstance(found, str):
        log.warning(
            "heatmap of %s: %s; drawn without the slide thumbnail, as for tile folders.",
            slide.slide_id,
            found,
        )
        if notes is not None:
            notes.append(f"heatmap drawn without the slide thumbnail: {found}")
        found = None
    images: dict[int, Image.Image | None] = {}
    if found is not None:
        tissue, scale = found
        extent = _tile_extent(slide, indices, {})
        origin = np.zeros(2, dtype=np.int64)
    else:
        images = {
            int(i): read_tile_image(data_dir, slide.bag_attrs, slide.tile_names[i], slide.coords[i])
            for i in indices
        }
        extent = _tile_extent(slide, indices, images)
        xy = slide.coords[indices]
        origin = xy.min(axis=0)
        width, height = (xy.max(axis=0) - origin + extent).tolist()
        scale = min(1.0, HEATMAP_MAX_PIXELS / max(width, height))
        canvas = (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale)))
        tissue = Image.new("RGB", canvas, (255, 255, 255))
    layout = HeatmapLayout(
        tissue,
        np.full((tissue.size[1], tissue.size[0]), np.nan),
        origin,
        scale,
        max(1, math.ceil(extent * scale)),
        known,
        found is not None,
        found is not None or any(image is not None for image in images.values()),
    )
    percentile = _percentiles(slide.attention)
    for i in indices:
        left, top = layout.cell(slide.coords[i])
        if images.get(int(i)) is not None:
            image = images[int(i)].resize((layout.side, layout.side), Image.Resampling.BILINEAR)
            tissue.paste(image, (left, top))
        layout.scores[top : top + layout.side, left : left + layout.side] = percentile[i]
    return layout


def plot_heatmap(
    path: str | Path,
    slide: SlideAttention,
    data_dir: Path | None,
    top_k: int = DEFAULT_TOP_K,
    notes: list[str] | None = None,
) -> str | None:
    """The slide (left) and the attention laid over it (right), on the canvas of ``heatmap_layout``.

    Colour is the tile's attention percentile within the slide (1 = highest), as CLAM draws it;
    the ``top_k`` highest and lowest tiles are outlined. Without any tile image (nor thumbnail)
    only the attention panel is drawn. Returns None when written, else the reason it was not (no
    tile carries coordinates); a fallback is also appended to ``notes``."""
    layout = heatmap_layout(slide, data_dir, notes)
    if isinstance(layout, str):
        return layout
    canvas_w, canvas_h = layout.tissue.size
    # Each panel keeps the slide's aspect ratio within a page-sized box.
    aspect = canvas_w / canvas_h
    panel_w, panel_h = (
        (6.0, float(np.clip(6.0 / aspect, 1.6, 6.0)))
        if aspect >= 1
        else (float(np.clip(6.0 * aspect, 2.4, 6.0)), 6.0)
    )
    n_panels = 2 if layout.have_images else 1
    fig = Figure(figsize=(n_panels * panel_w + 1.6, panel_h + 1.7), dpi=FIGURE_DPI, layout="constrained")
    axes = list(np.atleast_1d(fig.subplots(1, n_panels)))
    ax_map = axes[-1]
    if layout.have_images:
        axes[0].imshow(layout.tissue)
        axes[0].set_title("slide (thumbnail)" if layout.thumbnail else "tiles", fontsize=10)
    ax_map.imshow(layout.tissue)
    mapped = ax_map.imshow(
        layout.scores,
        cmap=HEATMAP_CMAP,
        vmin=0.0,
        vmax=1.0,
        alpha=HEATMAP_ALPHA if layout.have_images else 1.0,
        interpolation="nearest",
    )
    ax_map.set_title("attention" if layout.have_images else "attention (tile images not found)", fontsize=10)
    k = _outline_extremes(ax_map, slide, layout, top_k)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    # The bar shows the colours at full strength; on the map they are blended with the tissue.
    colorbar = fig.colorbar(ScalarMappable(norm=mapped.norm, cmap=mapped.cmap), ax=ax_map, shrink=0.85)
    colorbar.set_label("attention percentile within the slide", fontsize=9)
    colorbar.set_ticks([0, 0.25, 0.5, 0.75, 1.0], labels=["0 (lowest)", "0.25", "0.5", "0.75", "1 (highest)"])
    handles = [
        Patch(facecolor="none", edgecolor="black", linestyle="-", label=f"top {k} tiles"),
        Patch(facecolor="none", edgecolor="black", linestyle=":", label=f"bottom {k} tiles"),
    ]
    if (~layout.known).any():
        handles.append(
            Patch(
                facecolor="white",
                edgecolor="0.5",
                label=f"{int((~layout.known).sum())} tiles without coordinates (not shown)",
            )
        )
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=9, frameon=False)
    fig.suptitle(
        f"{slide.title()}\n{int(layout.known.sum())} of {len(slide.attention)} tiles placed"
        f"{_branch_text(slide)}",
        fontsize=10,
    )
    _save(fig, path)
    return None


def _outline_extremes(ax, slide: SlideAttention, layout: HeatmapLayout, top_k: int) -> int:
    """Outline the k highest (solid) and k lowest (dotted) tiles that have a position; returns k."""
    n = len(slide.attention)
    k = max(1, min(top_k, n // 2)) if n > 1 else 1
    outlines = [(slide.order[:k], "-"), (slide.order[::-1][:k], ":")]
    for chosen, style in outlines if n > 1 else outlines[:1]:
        for i in chosen:
            if layout.known[i]:
                left, top = ((slide.coords[i] - layout.origin) * layout.scale).tolist()
                ax.add_patch(
                    Rectangle(
                        (left, top),
                        layout.side,
                        layout.side,
                        fill=False,
                        edgecolor="black",
                        linestyle=style,
                        linewidth=1.6,
                    )
                )
    return k


def explain_slide(
    out_dir: str | Path, slide: SlideAttention, data_dir: Path | None, top_k: int = DEFAULT_TOP_K
) -> dict[str, Any]:
    """Write the CSV, montage and (when coordinates exist) heatmap of one slide; return its index row."""
    out_dir = Path(out_dir)
    files = attention_files(slide.slide_id)
    write_attention_csv(out_dir / files["scores_csv"], slide)
    plot_topk(out_dir / files["topk_png"], slide, data_dir, top_k)
    notes: list[str] = []
    reason = plot_heatmap(out_dir / files["heatmap_png"], slide, data_dir, top_k, notes)
    return {
        "slide_id": slide.slide_id,
        "patient_id": slide.patient_id,
        "label": "" if slide.label is None else slide.label,
        "predicted": slide.predicted,
        "probability": f"{slide.probs[slide.predicted]:.6f}",
        "branch": slide.branch,
        "n_tiles": len(slide.tile_names),
        **files,
        "heatmap_png": "" if reason else files["heatmap_png"],
        "note": "; ".join([reason] if reason else notes),
    }


def write_index(out_dir: str | Path, rows: list[dict[str, Any]]) -> Path:
    path = Path(out_dir) / ATTENTION_INDEX
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=INDEX_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())
    return path


def _branch_text(slide: SlideAttention) -> str:
    return f", attention branch of {slide.class_names[slide.branch]}" if slide.n_branches > 1 else ""


def _percentiles(values: np.ndarray) -> np.ndarray:
    """Rank of each value scaled to [0, 1] (ties share their mean rank); 1 for a single value."""
    if len(values) == 1:
        return np.ones(1)
    return (rankdata(values, method="average") - 1.0) / (len(values) - 1.0)


def _tile_extent(slide: SlideAttention, indices: np.ndarray, images: dict[int, Image.Image | None]) -> int:
    """Side of one tile in the units of ``coords``: a whole slide's level-0 patch size, else the
    smallest step between tile positions (tiles on a grid), else a tile image's width."""
    level0_side = slide.bag_attrs.extra.get("patch_size_level0") if slide.bag_attrs is not None else None
    if level0_side:
        return max(1, int(round(float(level0_side))))
    width = next((image.width for image in images.values() if image is not None), None)
    steps = [np.diff(np.unique(slide.coords[indices, axis])) for axis in (0, 1)]
    steps = np.concatenate([s[s > 0] for s in steps])
    # A step far below the tile's width means positions that are not on a grid: trust the image.
    if len(steps) and (width is None or steps.min() >= width / 4):
        return int(steps.min())
    return int(width or 256)


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3) :]


def _save(fig: Figure, path: str | Path) -> None:
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=FIGURE_DPI)
