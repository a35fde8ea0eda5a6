"""The HDF5 bag format: the only module that opens a bag file.

One ``<slide_id>.h5`` per slide:

    features    (N, D) float32   one instance (tile embedding) per row (float16 in a cache embedded
                                 with --feature_dtype float16; read back as float32)
    coords      (N, 2) int64     tile position (x, y) in pixels; COORD_SENTINEL where unknown
    tile_names  (N,)   utf-8     tile path relative to the slide folder (or "x_y" for WSI tiles)
    attrs                        slide_id, patient_id, class_folder, label, cache_key, backbone,
                                 weights, weights_digest, feature_dim, transform, tile_size,
                                 max_tiles, seed, package_version, skipped_tiles (JSON), ...

CLAM and TRIDENT read ``features`` and ``coords`` as they are; STAMP names the matrix
``feats``, which ``read_bag`` also accepts. Bags are written atomically (temporary name,
then rename) so a file under its final name is always complete. A bag of more than
``IN_MEMORY_BAG_BYTES`` of features (or one whose rows wait in a ``RowFile``, as the embedding
engine keeps a large slide's) is written in place, ``WRITE_CHUNK_BYTES`` at a time, under the
same temporary name: memory stays bounded whatever the slide's size.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Union

import h5py
import numpy as np

from feature_extraction.atomic import atomic_output
from feature_extraction.errors import BagError

FORMAT_VERSION = 1
FEATURES = "features"
FEATURES_ALIASES = ("features", "feats")  # ours/CLAM/TRIDENT, STAMP
COORDS = "coords"
TILE_NAMES = "tile_names"
COORD_SENTINEL = -1  # coords value of a tile whose name carries no position
BAG_SUFFIX = ".h5"
FEATURE_DTYPES = ("float32", "float16")  # how ``features`` may be stored (--feature_dtype)
IN_MEMORY_BAG_BYTES = 32 * 2**20  # bags with up to this much feature data are built in memory, then written
WRITE_CHUNK_BYTES = 8 * 2**20  # larger bags are written in place, this much of their features at a time
FORMAT_KEY = "format_version"  # the attribute that marks a bag written by stage 1, and its version


@dataclass(frozen=True)
class BagAttrs:
    """The attributes of a bag written by stage 1: one field per HDF5 attribute, of the same name.

    Built with every field to write a bag (``write_bag`` takes it); ``read_bag_attrs`` returns it
    for a bag on disk. ``skipped_tiles`` is stored as JSON text. ``extra`` holds the slide
    reader's own attributes (a whole slide's resolution, ``slide_file``, ...) and any attribute
    not named here; when written, the named fields win over it. ``format_version``,
    ``feature_dim`` and ``n_instances`` are written by ``write_bag`` from the matrix itself."""

    slide_id: str
    patient_id: str
    class_folder: str
    label: int
    split: str
    source: str  # the patient folder or whole-slide file the tiles came from
    cache_key: str
    backbone: str
    weights: str  # label: imagenet, random, file-<stem>
    weights_digest: str  # sha256 of the weight values
    weights_random: bool
    weights_source: str  # URL, file path or "random(seed=...)"
    transform: str
    tile_size: int  # pixels fed to the backbone
    max_tiles: int
    seed: int
    subset_rule: str
    tiles_digest: str  # sha256 of the slide's tile listing (names, sizes, modification times)
    n_available: int  # tiles found
    n_selected: int  # tiles chosen (max_tiles subset)
    n_skipped: int  # unreadable tiles among them
    skipped_tiles: tuple[dict[str, str], ...]  # {name, reason} per unreadable tile
    n_ignored_files: int  # non-image files in the slide folder
    package_version: str
    runtime: str
    precision: str
    device: str
    embedded_at: str  # ISO 8601, UTC
    format_version: int = FORMAT_VERSION
    feature_dim: int = 0
    n_instances: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_attrs(self) -> dict[str, Any]:
        """The attribute values to store (without the three ``write_bag`` derives from the matrix)."""
        named = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _DERIVED + ("extra",)}
        named["skipped_tiles"] = json.dumps([dict(t) for t in self.skipped_tiles], default=str)
        return {**self.extra, **named}

    @classmethod
    def from_attrs(cls, raw: Mapping[str, Any], path: str | Path) -> BagAttrs:
        """Parse a bag's stored attributes: an older format is upgraded; a bag of a newer format, one
        missing a required attribute or one holding a value of the wrong type raises BagError."""
        raw = _upgraded(dict(raw), path)
        missing = [key for key in REQUIRED_KEYS if key not in raw]
        if missing:
            raise BagError(
                f"bag {path} (format_version {raw[FORMAT_KEY]}) lacks the attributes {missing}: "
                "it was not written (completely) by `python -m feature_extraction.embed`. Delete it and "
                "re-embed the slide."
            )
        values: dict[str, Any] = {"extra": {k: v for k, v in raw.items() if k not in _KINDS}}
        for key, kind in _KINDS.items():
            value = raw.get(key, _EMPTY[kind])
            try:
                values[key] = _parse_skipped(value) if kind is tuple else kind(value)
            except (TypeError, ValueError) as error:
                raise BagError(
                    f"bag {path}: attribute {key}={value!r} is not a {kind.__name__} ({error}). "
                    "Delete it and re-embed the slide."
                ) from None
        return cls(**values)


_DERIVED = ("format_version", "feature_dim", "n_instances")  # written by write_bag from the matrix
# What every stage-1 bag holds, whatever its version: without them it cannot be placed in a cache.
REQUIRED_KEYS = (*_DERIVED, "slide_id", "label", "cache_key")
_KINDS: dict[str, type] = {
    f.name: {"str": str, "int": int, "bool": bool}.get(str(f.type), tuple)
    for f in fields(BagAttrs)
    if f.name != "extra"
}
_EMPTY: dict[type, Any] = {str: "", int: 0, bool: False, tuple: ()}
# format_version v -> the function turning v's attributes into v + 1's. Every bag written so far is
# version 1; a change of the attributes bumps FORMAT_VERSION and adds its upgrade here, so that old
# caches stay current without re-embedding.
_UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def _upgraded(raw: dict[str, Any], path: str | Path) -> dict[str, Any]:
    if FORMAT_KEY not in raw:
        raise BagError(
            f"bag {path} has no {FORMAT_KEY} attribute: it was not written by "
            "`python -m feature_extraction.embed` (CLAM, TRIDENT or STAMP bags are read through "
            "--labels_csv). Re-embed the slide to use it in a feature cache."
        )
    try:
        version = int(raw[FORMAT_KEY])
    except (TypeError, ValueError):
        raise BagError(
            f"bag {path}: {FORMAT_KEY} {raw[FORMAT_KEY]!r} is not a number. Re-embed the slide."
        ) from None
    if version > FORMAT_VERSION:
        raise BagError(
            f"bag {path} has format_version {version}, newer than this clam-egfr reads "
            f"({FORMAT_VERSION}): update clam-egfr, or re-embed the slide with this version."
        )
    while version < FORMAT_VERSION:
        if version not in _UPGRADES:
            raise BagError(
                f"bag {path} has format_version {version}, which this clam-egfr cannot upgrade. "
                "Delete it and re-embed the slide."
            )
        raw = {**_UPGRADES[version](raw), FORMAT_KEY: version + 1}
        version += 1
    return raw


def _parse_skipped(value: Any) -> tuple[dict[str, str], ...]:
    items = json.loads(value) if isinstance(value, str) else value
    return tuple({"name": str(item["name"]), "reason": str(item["reason"])} for item in (items or ()))


def read_bag_attrs(path: str | Path) -> BagAttrs:
    """The typed attributes of a stage-1 bag, without reading its matrices. Raises BagError for a
    missing, unreadable or malformed bag, and for one not written by stage 1."""
    return BagAttrs.from_attrs(read_attrs(path), path)


@dataclass
class Bag:
    features: np.ndarray  # (N, D) float32 (the stored dtype with ``read_bag(..., dtype=None)``)
    coords: np.ndarray  # (N, 2) int64
    tile_names: list[str]
    attrs: dict[str, Any]  # as stored (``BagAttrs.to_attrs`` plus the derived three)
    path: Path | None = None

    @property
    def slide_id(self) -> str:
        return str(self.attrs.get("slide_id", ""))

    @property
    def typed_attrs(self) -> BagAttrs | None:
        """The attributes as ``BagAttrs``; None for a bag not written by stage 1 (no format_version)."""
        return BagAttrs.from_attrs(self.attrs, self.path or "") if FORMAT_KEY in self.attrs else None


@dataclass(frozen=True)
class RowFile:
    """Feature rows waiting in a raw file: ``n_rows`` x ``dim`` float32, row-major, no header.

    ``write_bag`` takes one in place of the matrix and copies the ``rows`` it names (ascending
    row numbers; None: every row) in chunks, so a slide of any size is written with bounded
    memory. Plain reads, not a memory map: a mapped file's pages count in the process's
    resident memory, and a large slide's would grow it by the bag's size."""

    path: Path
    n_rows: int
    dim: int
    rows: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_rows if self.rows is None else len(self.rows), self.dim)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.dim * 4

    def __len__(self) -> int:
        return self.shape[0]

    def chunks(self, n: int):
        """(start, (k, dim) float32 array) for consecutive blocks of at most ``n`` of the chosen rows."""
        rows = np.arange(self.n_rows) if self.rows is None else np.asarray(self.rows, dtype=np.int64)
        with open(self.path, "rb") as handle:
            for start in range(0, len(rows), n):
                chosen = rows[start : start + n]
                first, last = int(chosen[0]), int(chosen[-1])
                handle.seek(first * self.dim * 4)
                block = np.fromfile(handle, np.float32, (last - first + 1) * self.dim)
                if block.size != (last - first + 1) * self.dim:
                    raise OSError(f"row file {self.path} ends before row {last} of {self.n_rows}")
                yield start, block.reshape(-1, self.dim)[chosen - first]


Features = Union[np.ndarray, RowFile]


def bag_path(cache_dir: str | Path, slide_id: str) -> Path:
    return Path(cache_dir) / f"{slide_id}{BAG_SUFFIX}"


def write_bag(
    path: str | Path,
    features: Features,
    coords: np.ndarray,
    tile_names: Sequence[str],
    attrs: BagAttrs | Mapping[str, Any],
    dtype: str = "float32",
) -> None:
    """Write one bag atomically. Stage 1 passes ``BagAttrs``; a plain mapping (values str, int,
    float, bool or JSON-able) serves tests and tools. ``format_version``, ``feature_dim`` and
    ``n_instances`` are always those of this file. ``features``: the matrix, or a ``RowFile``
    holding it (always written in chunks). ``dtype`` (one of FEATURE_DTYPES) is how the features
    are stored; a finite value that float16 cannot hold (beyond +-65504) raises BagError."""
    if isinstance(attrs, BagAttrs):
        attrs = attrs.to_attrs()
    if dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature dtype {dtype!r}: use one of {FEATURE_DTYPES}")
    if not isinstance(features, RowFile):
        features = _stored_features(features, dtype)
    coords = np.ascontiguousarray(coords, dtype=np.int64).reshape(-1, 2)
    if features.ndim != 2 or len(features) != len(coords) or len(features) != len(tile_names):
        raise ValueError(
            f"features {features.shape}, coords {coords.shape} and {len(tile_names)} tile names disagree"
        )
    with atomic_output(path) as tmp:
        if isinstance(features, np.ndarray) and features.nbytes <= IN_MEMORY_BAG_BYTES:
            # Built in memory, then written with one plain write: a full disk or a failing device
            # raises an ordinary OSError here, instead of an HDF5 flush failing inside close()
            # and again, noisily, each time h5py's objects are collected.
            image = io.BytesIO()
            with h5py.File(image, "w") as h5:
                _fill_bag(h5, features, coords, tile_names, attrs, dtype)
            Path(tmp).write_bytes(image.getbuffer())
        else:  # a bag too large to hold twice in memory is written in place, in chunks
            with h5py.File(tmp, "w") as h5:
                _fill_bag(h5, features, coords, tile_names, attrs, dtype)


def _stored_features(features: np.ndarray, dtype: str) -> np.ndarray:
    with np.errstate(over="ignore"):  # an overflow is reported below, by name
        stored = np.ascontiguousarray(features, dtype=np.dtype(dtype))
    if stored.dtype != np.float32 and np.isinf(stored).any() and not np.isinf(features).any():
        raise BagError(
            f"features reach {float(np.abs(features).max()):.4g}, beyond float16's range (65504): "
            "embed this backbone's features as float32 (--feature_dtype float32)"
        )
    return stored


def _fill_bag(
    h5: h5py.File,
    features: Features,
    coords: np.ndarray,
    tile_names: Sequence[str],
    attrs: Mapping[str, Any],
    dtype: str,
) -> None:
    # Contiguous, uncompressed: features barely compress and chunking slows reads (docs/embedding.md, "Bag format").
    if isinstance(features, np.ndarray) and features.nbytes <= WRITE_CHUNK_BYTES:
        h5.create_dataset(FEATURES, data=features)
    else:
        dataset = h5.create_dataset(FEATURES, shape=features.shape, dtype=np.dtype(dtype))
        rows = max(1, WRITE_CHUNK_BYTES // (4 * max(1, features.shape[1])))
        blocks = (
            features.chunks(rows)
            if isinstance(features, RowFile)
            else ((start, features[start : start + rows]) for start in range(0, len(features), rows))
        )
        for start, block in blocks:
            dataset[start : start + len(block)] = _stored_features(block, dtype)
    h5.create_dataset(COORDS, data=coords)
    h5.create_dataset(TILE_NAMES, data=list(tile_names), dtype=h5py.string_dtype("utf-8"))
    for key, value in attrs.items():
        h5.attrs[key] = _to_attr(value)
    h5.attrs[FORMAT_KEY] = FORMAT_VERSION
    h5.attrs["feature_dim"] = int(features.shape[1])
    h5.attrs["n_instances"] = int(features.shape[0])


def read_attrs(path: str | Path) -> dict[str, Any]:
    """The bag's attributes, without reading its matrices."""
    with _open(path) as h5:
        return _attrs(h5)


def read_bag(path: str | Path, rows: np.ndarray | None = None, dtype: Any = np.float32) -> Bag:
    """Read a bag (or only ``rows`` of it, sorted indices). Accepts ``features`` or ``feats``.
    The features come as ``dtype`` (float32, whatever is stored), or as stored with ``dtype=None``."""
    with _open(path) as h5:
        name = _features_name(h5, path)
        dataset = h5[name]
        n = dataset.shape[0]
        if rows is None:
            features = dataset[()]
            coords = h5[COORDS][()] if COORDS in h5 else np.full((n, 2), COORD_SENTINEL, np.int64)
            names = _decode(h5[TILE_NAMES][()]) if TILE_NAMES in h5 else [str(i) for i in range(n)]
        else:
            rows = np.asarray(rows, dtype=np.int64)
            features = dataset[rows] if len(rows) else np.zeros((0, dataset.shape[1]), dataset.dtype)
            coords = h5[COORDS][rows] if COORDS in h5 else np.full((len(rows), 2), COORD_SENTINEL, np.int64)
            names = _decode(h5[TILE_NAMES][rows]) if TILE_NAMES in h5 else [str(i) for i in rows]
        return Bag(
            features=features if dtype is None else np.asarray(features, dtype=dtype),
            coords=np.asarray(coords, dtype=np.int64).reshape(-1, 2),
            tile_names=names,
            attrs=_attrs(h5),
            path=Path(path),
        )


def read_features(path: str | Path, rows: np.ndarray | None = None, dtype: Any = np.float32) -> np.ndarray:
    """Only the features of a bag (or ``rows`` of them, sorted indices), as ``dtype`` (None: as
    stored): what training streams, without the coordinates, tile names and attributes."""
    with _open(path) as h5:
        dataset = h5[_features_name(h5, path)]
        if rows is None:
            features = dataset[()]
        else:
            rows = np.asarray(rows, dtype=np.int64)
            features = dataset[rows] if len(rows) else np.zeros((0, dataset.shape[1]), dataset.dtype)
        return features if dtype is None else np.asarray(features, dtype=dtype)


def read_tile_names(path: str | Path) -> list[str]:
    """The bag's tile names (``str(row)`` for a bag without them), without reading its features."""
    with _open(path) as h5:
        if TILE_NAMES in h5:
            return _decode(h5[TILE_NAMES][()])
        return [str(i) for i in range(h5[_features_name(h5, path)].shape[0])]


@dataclass(frozen=True)
class BagSummary:
    path: Path
    n_instances: int
    feature_dim: int
    attrs: dict[str, Any]  # as stored
    bag_attrs: BagAttrs | None = None  # typed; None for a bag not written by stage 1 (CLAM, TRIDENT, STAMP)
    feature_dtype: str = "float32"  # how the features are stored (float16, float32, float64)


def validate_bag(
    path: str | Path,
    feature_dim: int | None = None,
    cache_key: str | None = None,
    check_values: bool = True,
) -> BagSummary:
    """Check that a bag can be trained on; raise BagError naming the file and the reason.

    Checks: opens as HDF5; has a 2-D float ``features`` (or ``feats``) with at least one row;
    ``coords`` (if present) is (N, 2) of the same N; no NaN or Inf; a stage-1 bag's attributes
    parse as ``BagAttrs``; ``feature_dim`` and ``cache_key`` match when given."""
    path = Path(path)
    with _open(path) as h5:
        name = _features_name(h5, path)
        dataset = h5[name]
        if dataset.ndim != 2:
            raise BagError(
                f"bag {path}: '{name}' has shape {dataset.shape}, expected (N, D). Re-embed this slide."
            )
        if not np.issubdtype(dataset.dtype, np.floating):
            raise BagError(
                f"bag {path}: '{name}' has dtype {dataset.dtype}, expected float. Re-embed this slide."
            )
        n, dim = dataset.shape
        if n == 0:
            raise BagError(f"bag {path}: holds no instances. Delete it and re-embed the slide.")
        if COORDS in h5 and tuple(h5[COORDS].shape) != (n, 2):
            raise BagError(
                f"bag {path}: 'coords' has shape {h5[COORDS].shape} but '{name}' has {n} rows. Re-embed this slide."
            )
        if feature_dim is not None and dim != feature_dim:
            raise BagError(
                f"bag {path}: feature dimension {dim}, expected {feature_dim} like the other bags. "
                "It comes from another backbone: keep each backbone's bags in their own cache folder."
            )
        if check_values:
            for start in range(0, n, 4096):  # bounded memory for very large bags
                block = dataset[start : start + 4096]
                if not np.isfinite(block).all():
                    raise BagError(
                        f"bag {path}: features contain NaN or Inf. Delete it and re-embed the slide."
                    )
        attrs = _attrs(h5)
        typed = BagAttrs.from_attrs(attrs, path) if FORMAT_KEY in attrs else None
        found_key = typed.cache_key if typed is not None else attrs.get("cache_key")
        if cache_key is not None and found_key != cache_key:
            raise BagError(
                f"bag {path}: cache key {found_key!r}, expected {cache_key!r}. It was embedded "
                "with another backbone, weights, transform or tile subset; bags of different caches are never mixed."
            )
        dtype = str(dataset.dtype)
    return BagSummary(
        path=path, n_instances=int(n), feature_dim=int(dim), attrs=attrs, bag_attrs=typed, feature_dtype=dtype
    )


def _open(path: str | Path) -> h5py.File:
    path = Path(path)
    if not path.is_file():
        raise BagError(f"bag {path} does not exist. Run `python -m feature_extraction.embed` first.")
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise BagError(
            f"bag {path} cannot be opened as HDF5 ({error}); it is truncated or corrupt. "
            "Delete it and re-embed the slide."
        ) from error


def _features_name(h5: h5py.File, path) -> str:
    for name in FEATURES_ALIASES:
        if name in h5 and isinstance(h5[name], h5py.Dataset):
            return name
    raise BagError(
        f"bag {path} has no 'features' (or 'feats') dataset; found {sorted(h5.keys())}. Re-embed this slide."
    )


def _to_attr(value: Any):
    if isinstance(value, (str, bool, int, float, np.integer, np.floating)):
        return value
    if value is None:
        return ""
    return json.dumps(value, default=str)


def _attrs(h5: h5py.File) -> dict[str, Any]:
    out = {}
    for key, value in h5.attrs.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def _decode(values) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]
