"""The HTML pages' common ground: the Jinja2 environment over the templates shipped in
``clam/templates/`` (autoescaped: every path, slide name and number lands in the page as text), the
helpers the templates use (relative links, anchors, image sizes, numbers) and the atomic write.

A page is self-contained: images are linked relatively (so the folder can be zipped or shared as it
is) and carry their width and height, nothing is fetched from the network, and the only script is
the small inline one of the template.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from PIL import Image, UnidentifiedImageError

from clam import __version__
from clam.metrics import format_auc, format_number
from feature_extraction.atomic import atomic_write_text

TOOL = f"clam-egfr {__version__}"


@lru_cache(maxsize=1)
def environment() -> Environment:
    """The templates of ``clam/templates`` (package data), autoescaped, with the page filters."""
    env = Environment(
        loader=PackageLoader("clam", "templates"),
        autoescape=select_autoescape(["html"], default_for_string=True, default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(number=format_number, auc=auc_text, percent=_percent, href=href)
    env.filters.update(num=lambda value: format_number(value, "n/a"), value=shown_value)  # training.html
    return env


def render(template: str, **context: Any) -> str:
    return environment().get_template(template).render(tool=TOOL, **context)


def write_page(path: Path, template: str, **context: Any) -> Path:
    """Render ``template`` and write it to ``path`` atomically (a reader never sees half a page)."""
    atomic_write_text(path, render(template, **context))
    return path


def shown_value(value: Any) -> str:
    """An argument's value as a page shows it: "none", JSON for a list or mapping, else its text."""
    if value is None:
        return "none"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def href(relative: str | Path) -> str:
    """A relative link to a file: each path part percent-encoded, so a name with ``#``, ``?``, ``%``,
    quotes or spaces still names its file (the template's autoescape then quotes the attribute)."""
    return "/".join(quote(part, safe="") for part in Path(relative).as_posix().split("/"))


def anchor(name: str, prefix: str = "slide") -> str:
    """An element id for ``name``: letters, digits, ``-`` and ``_`` kept, anything else replaced, and
    then a short hash of the name appended so that two names never share an id; the same name gives
    the same id on every page (the cross-validation page links into its folds' pages)."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[:60]
    if slug == name:
        return f"{prefix}-{slug}"
    return f"{prefix}-{slug}-{hashlib.sha1(name.encode('utf-8')).hexdigest()[:8]}"


def image(folder: Path, relative: str | Path) -> dict[str, Any] | None:
    """``{"src", "width", "height"}`` of an image inside ``folder`` (the size read from its header),
    or None when it is missing or not an image: a page shows a note instead of a broken image."""
    path = Path(folder) / relative
    try:
        with Image.open(path) as opened:
            width, height = opened.size
    except (OSError, UnidentifiedImageError):
        return None
    return {"src": href(relative), "width": width, "height": height}


def relative_link(target: Path, start: Path) -> str | None:
    """``target`` relative to the folder ``start`` as a link, or None when they share no root."""
    try:
        return href(os.path.relpath(Path(target).resolve(), Path(start).resolve()))
    except ValueError:  # another drive (Windows)
        return None


def auc_text(auc: dict[str, Any] | None) -> str:
    return "-" if not auc else format_auc(auc, brackets=True, undefined="undefined")


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
