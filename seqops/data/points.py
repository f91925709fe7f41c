"""Import a folder of images with dot annotations: CSV files and LabelMe point files.

``prepare.points.root`` holds the images and their annotations, of either kind or both
(docs/points-format.md is the page for people):

- CSV: every ``*.csv`` directly in the root, with the columns ``image,x,y`` and optionally
  ``split``. One row per object; the rows of an image are its points; a row with empty
  ``x`` and ``y`` is an image with no objects. ``image`` is a path relative to the root.
- LabelMe: every ``*.json`` under the root (hidden files and folders aside) with ``shapes``,
  ``imagePath`` (relative to the JSON file's folder), ``imageHeight`` and ``imageWidth``. A
  ``point`` shape is one object; other shapes, and points whose label is not in
  ``prepare.points.labels``, are ignored and counted. An optional top-level ``split``.
  The folder ``seqops serve --collect`` writes (``<id>.png`` beside ``<id>.json``) is one.

Coordinates are original pixels of the image as a viewer shows it (EXIF orientation applied,
as :func:`seqops.imaging.load_image` decodes it), x right, y down. An image without a split
of its own goes by a stable hash of ``(prepare.seed, its path)``
(:func:`seqops.data.coco.split_of`), so adding images never moves the others.

Every image is an item: a bad one is reported with the annotation file and the reason, and
skipped or fatal as ``prepare.on_error`` says. A LabelMe file describes one image, so a
broken one (invalid JSON, not LabelMe, a missing field) is such an item too; a CSV without
its columns is a malformed annotation file and always an error.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import posixpath
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from seqops.config import PrepareConfig
from seqops.data.coco import split_of
from seqops.data.manifest import SPLITS, Record
from seqops.data.sources import (
    IssueLog,
    PrepareError,
    Sample,
    encode_png,
    find_point_problem,
    load_for_model,
    passes_count_filter,
)

log = logging.getLogger(__name__)

CSV_COLUMNS = ("image", "x", "y")
CSV_OPTIONAL = ("split",)
LABELME_FIELDS = (("imagePath", str, "a path"), ("imageHeight", int, "an integer"),
                  ("imageWidth", int, "an integer"))  # fmt: skip
# LabelMe writes shapes without shape_type in its oldest files; it reads them as polygons.
LABELME_DEFAULT_SHAPE = "polygon"
_DRIVE = re.compile(r"^[A-Za-z]:")  # "C:/..." is absolute on Windows, where files come from


@dataclass
class Entry:
    """One image's annotation as read, before the image is opened."""

    image: str  # path relative to the root, normalised, forward slashes
    annotation: Path  # the file that names the image
    points: list[tuple[float, float]] = field(default_factory=list)  # original px
    split: str | None = None  # the annotation's own split, if it gives one
    size: tuple[int, int] | None = None  # (width, height) the annotation declares


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def relative_image_path(name: str, folder: str = "") -> tuple[str, str]:
    """``name``, relative to ``folder`` (itself relative to the root), as a path relative to
    the root; or ``("", why)`` when it is empty, absolute or leaves the root.

    The check is on the names alone, not on resolved links: a DVC checkout may link its
    files into the cache, outside the root.
    """
    name = name.replace("\\", "/")  # LabelMe on Windows writes backslashes
    if not name.strip():
        return "", "the image path is empty"
    if name.startswith("/") or _DRIVE.match(name):
        return "", f"image path {name!r} is absolute (give it relative to the annotation)"
    path = posixpath.normpath(posixpath.join(folder, name))
    if path == ".." or path.startswith("../"):
        return "", f"image path {name!r} leaves prepare.points.root"
    if path == ".":
        return "", f"image path {name!r} names the folder, not an image"
    return path, ""


def _parse_split(value: object) -> tuple[str | None, str]:
    """A split value -> ``(split or None, problem)``; empty or absent means none."""
    if value is None or value == "":
        return None, ""
    if value in SPLITS:
        return str(value), ""
    return None, f"split {value!r} is not one of {', '.join(SPLITS)}"


def _parse_xy(x: str, y: str) -> tuple[float, float] | None:
    """Two CSV cells -> a finite point, or None when they are not a pair of finite numbers."""
    try:
        point = float(x), float(y)
    except ValueError:
        return None
    return point if all(math.isfinite(v) for v in point) else None


def _read_csv_rows(path: Path) -> list[tuple[int, dict]]:
    """The ``(line, row)`` pairs of a CSV file, whose header is checked."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: the byte order mark Excel writes
    except UnicodeDecodeError as exc:
        raise PrepareError(f"{path}: not a UTF-8 text file ({exc})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = [c.strip() for c in reader.fieldnames or []]
    reader.fieldnames = columns
    missing = [c for c in CSV_COLUMNS if c not in columns]
    unknown = [c for c in columns if c not in CSV_COLUMNS + CSV_OPTIONAL]
    if missing or unknown or len(set(columns)) != len(columns):
        raise PrepareError(
            f"{path}: expected the columns {','.join(CSV_COLUMNS)} and optionally "
            f"{','.join(CSV_OPTIONAL)}, got {','.join(columns) or 'no header'}"
        )
    return [(reader.line_num, row) for row in reader]


def read_csv(path: Path, issues: IssueLog) -> list[Entry]:
    """The images of one CSV file, each with its points; bad images are reported."""
    rows = _read_csv_rows(path)
    entries: dict[str, Entry] = {}
    splits: dict[str, set] = defaultdict(set)
    problems: dict[str, tuple[str, str]] = {}
    for line, row in rows:
        if None in row or None in row.values():
            issues.report(path, "malformed_row", f"line {line}: not one cell per column")
            continue
        raw = row["image"].strip()
        image, why = relative_image_path(raw)
        key = image or raw
        if key not in entries:
            entries[key] = Entry(image, path)
        if why:
            problems.setdefault(key, ("bad_image_path", f"line {line}: {why}"))
            continue
        split, why = _parse_split(row.get("split", "").strip())
        splits[key].add(split)
        if why:
            problems.setdefault(key, ("bad_split", f"line {line}: {image}: {why}"))
        x, y = row["x"].strip(), row["y"].strip()
        if not x and not y:
            continue  # an image with no objects
        point = _parse_xy(x, y)
        if point is None:
            detail = f"line {line}: {image}: x={x!r}, y={y!r} is not a pair of finite numbers"
            problems.setdefault(key, ("bad_coordinates", detail))
            continue
        entries[key].points.append(point)
    good = []
    for key, entry in entries.items():
        if key in problems:
            issues.report(path, *problems[key])
        elif len(splits[key]) > 1:
            given = ", ".join(sorted(s or "(none)" for s in splits[key]))
            issues.report(path, "split_disagreement", f"{key}: its rows give {given}")
        else:
            entry.split = next(iter(splits[key]))
            good.append(entry)
    return good


def read_labelme(
    path: Path, root: Path, labels: tuple[str, ...], issues: IssueLog, seen_labels: set
) -> Entry | None:
    """The image of one LabelMe file with its ``point`` shapes; None after reporting.

    Adds the labels of its point shapes to ``seen_labels`` (to tell a mistyped label filter).
    """
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        issues.report(path, "not_labelme", f"not valid JSON ({exc})")
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("shapes"), list):
        issues.report(path, "not_labelme", "no 'shapes' list: not a LabelMe file")
        return None
    for key, kind, what in LABELME_FIELDS:
        value = raw.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            issues.report(path, "malformed_labelme", f"{key}: expected {what}, got {value!r}")
            return None
    split, why = _parse_split(raw.get("split"))
    if why:
        issues.report(path, "bad_split", why)
        return None
    folder = path.parent.relative_to(root).as_posix()
    image, why = relative_image_path(raw["imagePath"], "" if folder == "." else folder)
    if why:
        issues.report(path, "bad_image_path", why)
        return None
    entry = Entry(image, path, split=split, size=(raw["imageWidth"], raw["imageHeight"]))
    ignored: Counter = Counter()
    for i, shape in enumerate(raw["shapes"]):
        shape_type = (
            shape.get("shape_type", LABELME_DEFAULT_SHAPE) if isinstance(shape, dict) else None
        )
        if not isinstance(shape_type, str):
            issues.report(path, "malformed_labelme", f"shapes[{i}]: expected a shape object")
            return None
        if shape_type != "point":
            ignored[f"{shape_type}_shape"] += 1
            continue
        seen_labels.add(shape.get("label"))
        if labels and shape.get("label") not in labels:
            ignored["other_label"] += 1
            continue
        xy = shape.get("points")
        if not (isinstance(xy, list) and xy and isinstance(xy[0], list) and len(xy[0]) == 2
                and all(_is_number(v) and math.isfinite(v) for v in xy[0])):  # fmt: skip
            detail = f"shapes[{i}].points: {xy!r} is not [[x, y]] with finite numbers"
            issues.report(path, "bad_coordinates", detail)
            return None
        entry.points.append((float(xy[0][0]), float(xy[0][1])))
    for reason, count in ignored.items():
        issues.ignore(reason, count)
    return entry


def _annotation_files(root: Path) -> tuple[list[Path], list[Path]]:
    """The CSV files directly in ``root`` and the JSON files under it, hidden ones aside."""
    csvs = sorted(p for p in root.glob("*.csv") if p.is_file() and not p.name.startswith("."))
    jsons = sorted(
        p
        for p in root.rglob("*.json")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    return csvs, jsons


def read_entries(root: Path, labels: tuple[str, ...], issues: IssueLog) -> list[Entry]:
    """Every image the annotations under ``root`` name once, in path order.

    An image named by two annotations (two CSV files, a CSV and a LabelMe file, ...) is
    reported and left out: which of them is right is for a person to say.
    """
    csvs, jsons = _annotation_files(root)
    if not csvs and not jsons:
        raise PrepareError(
            f"{root}: no *.csv or LabelMe *.json files (prepare.points.root; the format is in "
            "docs/points-format.md)"
        )
    log.info("points: %d CSV and %d JSON files under %s", len(csvs), len(jsons), root)
    entries = [entry for path in csvs for entry in read_csv(path, issues)]
    seen_labels: set = set()
    for path in jsons:
        entry = read_labelme(path, root, labels, issues, seen_labels)
        if entry is not None:
            entries.append(entry)
    if labels and seen_labels and not set(labels) & seen_labels:
        raise PrepareError(
            f"prepare.points.labels: none of {list(labels)} is a point label under {root} "
            f"(found: {', '.join(sorted(map(str, seen_labels)))})"
        )
    by_image: dict[str, list[Entry]] = defaultdict(list)
    for entry in entries:
        by_image[entry.image].append(entry)
    once = []
    for image in sorted(by_image):
        named = by_image[image]
        if len(named) > 1:
            files = ", ".join(str(e.annotation.relative_to(root)) for e in named)
            issues.report(root / image, "image_named_twice", f"in {files}")
            continue
        once.append(named[0])
    return once


def record_names(images: list[str]) -> dict[str, str]:
    """A file name for each image path: the path without its suffix, ``/`` as ``_``; names
    two paths share (``a/b.png``, ``a_b.jpg``) get a hash of the path, so none collide."""
    plain = {image: posixpath.splitext(image)[0].replace("/", "_") for image in images}
    shared = Counter(plain.values())
    return {
        image: name
        if shared[name] == 1
        else f"{name}-{hashlib.sha256(image.encode()).hexdigest()[:8]}"
        for image, name in plain.items()
    }


def iter_points(cfg: PrepareConfig, issues: IssueLog) -> Iterator[Sample]:
    """Yield one sample per annotated image under ``prepare.points.root``, in path order."""
    points_cfg = cfg.points
    root = Path(points_cfg.root)
    if points_cfg.val_share + points_cfg.test_share >= 1:
        raise PrepareError(
            "prepare.points: val_share + test_share must be < 1 (train gets the rest)"
        )
    if not root.is_dir():
        raise PrepareError(f"{root}: points folder not found (prepare.points.root)")
    entries = read_entries(root, points_cfg.labels, issues)
    names = record_names([entry.image for entry in entries])
    for entry in entries:
        sample = _import_one(cfg, root, entry, names[entry.image], issues)
        if sample is not None:
            yield sample


def _import_one(
    cfg: PrepareConfig, root: Path, entry: Entry, name: str, issues: IssueLog
) -> Sample | None:
    """Check, load and map one image; None when it is filtered or reported."""
    points = np.asarray(entry.points, np.float64).reshape(-1, 2)
    if not passes_count_filter(len(points), cfg, issues):
        return None
    path = root / entry.image
    if not path.is_file():
        issues.report(entry.annotation, "missing_image", f"{entry.image}: file not found")
        return None
    loaded = load_for_model(path, cfg.image_size, issues)
    if loaded is None:
        return None
    pixels, (width, height), scale = loaded
    if entry.size is not None and entry.size != (width, height):
        declared = f"imageWidth x imageHeight is {entry.size[0]}x{entry.size[1]}"
        found = f"{entry.image} is {width}x{height} as shown (EXIF orientation applied)"
        issues.report(entry.annotation, "size_mismatch", f"{declared}, but {found}")
        return None
    problem = find_point_problem(points, width, height) if len(points) else None
    if problem is not None:
        issues.report(entry.annotation, problem[0], f"{entry.image}: {problem[1]}")
        return None
    split = entry.split or split_of(
        entry.image, cfg.seed, cfg.points.val_share, cfg.points.test_share
    )
    record = Record(
        id=name,
        image="",
        points=tuple((float(x) * scale[0], float(y) * scale[1]) for x, y in points),
        orig_size=(width, height),
        scale=scale,
        source=entry.image,
        extra={"annotation": entry.annotation.relative_to(root).as_posix()},
    )
    return Sample(split, name, encode_png(pixels), record)
