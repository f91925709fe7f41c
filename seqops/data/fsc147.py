"""Import FSC-147 (Ranjan et al., "Learning To Count Everything", CVPR 2021).

The layout under ``prepare.fsc147.root``, exactly as distributed::

    images_384_VarV2/<name>        the images (384 px high, any width); <name> is "2.jpg"
    annotation_FSC147_384.json     {<name>: {"points": [[x, y], ...],
                                             "box_examples_coordinates": [corners, ...],
                                             "H": ..., "W": ..., "ratio_h": ..., ...}}
                                   corners = [[x1, y1], [x1, y2], [x2, y2], [x2, y1]]
    Train_Test_Val_FSC_147.json    {"train": [<name>, ...], "val": [...], "test": [...]}
    ImageClasses_FSC147.txt        <name><TAB><class> per line

Points and boxes are in the pixels of the image file. Images are stretched to the
square model input (:func:`seqops.imaging.resize_for_model`); each record keeps
the file's size (``orig_size``) and the factors (``scale``) with
``model_px = file_px * scale``, and the class in ``extra["class"]``. ``H``/``W``
and the ratios are not needed: the decoded file gives the size.

Filters: ``min_objects``/``max_objects`` (5 and 50 in the research code) and
``fsc147.classes`` (empty: every class). Bad items are reported to the
:class:`~seqops.data.sources.IssueLog`: an image missing, corrupt, listed in two
splits or twice in one, without annotation, without points, with a point outside
the image or the same point twice.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from seqops.config import PrepareConfig
from seqops.data.manifest import SPLITS, Record
from seqops.data.sources import (
    IssueLog,
    PrepareError,
    Sample,
    encode_png,
    find_point_problem,
    load_for_model,
    passes_count_filter,
    read_json_file,
    to_model_boxes,
)

log = logging.getLogger(__name__)

IMAGES_DIR = "images_384_VarV2"
ANNOTATION_FILE = "annotation_FSC147_384.json"
SPLIT_FILE = "Train_Test_Val_FSC_147.json"
CLASSES_FILE = "ImageClasses_FSC147.txt"


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _as_points(value: object, path: Path, where: str) -> np.ndarray:
    """``[[x, y], ...]`` -> float ``[N, 2]``; anything else is a malformed file."""
    if not isinstance(value, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(_is_number(v) for v in p) for p in value
    ):
        raise PrepareError(f"{path}: {where}: expected a list of [x, y] number pairs")
    return np.asarray(value, np.float64).reshape(-1, 2)


def read_annotations(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read ``annotation_FSC147_384.json`` into ``{name: (points [N, 2], boxes [E, 4])}``.

    Every entry is validated up front: a missing or mistyped ``points`` or
    ``box_examples_coordinates`` is a :class:`PrepareError` naming the file and field.
    """
    raw = read_json_file(path, "FSC-147 annotation file")
    if not isinstance(raw, dict):
        raise PrepareError(f"{path}: expected an object of image names, got {type(raw).__name__}")
    annotations = {}
    for name, entry in raw.items():
        if not isinstance(entry, dict):
            raise PrepareError(f"{path}: {name!r}: expected an object")
        for key in ("points", "box_examples_coordinates"):
            if key not in entry:
                raise PrepareError(f"{path}: {name!r}: missing required field {key!r}")
        points = _as_points(entry["points"], path, f"{name!r}.points")
        corners = entry["box_examples_coordinates"]
        if not isinstance(corners, list):
            raise PrepareError(f"{path}: {name!r}.box_examples_coordinates: expected a list")
        boxes = []
        for i, box in enumerate(corners):
            c = _as_points(box, path, f"{name!r}.box_examples_coordinates[{i}]")
            if len(c) != 4:
                raise PrepareError(
                    f"{path}: {name!r}.box_examples_coordinates[{i}]: expected 4 corner points"
                )
            # Corners are [[x1, y1], [x1, y2], [x2, y2], [x2, y1]]; min/max tolerates any order.
            boxes.append([*c.min(0), *c.max(0)])
        annotations[name] = (points, np.asarray(boxes, np.float64).reshape(-1, 4))
    return annotations


def read_splits(path: Path) -> dict[str, list[str]]:
    """Read ``Train_Test_Val_FSC_147.json``: the ``train``/``val``/``test`` name lists."""
    raw = read_json_file(path, "FSC-147 split file")
    if not isinstance(raw, dict):
        raise PrepareError(f"{path}: expected an object with {', '.join(SPLITS)}")
    splits = {}
    for split in SPLITS:
        names = raw.get(split)
        if names is None:
            raise PrepareError(f"{path}: missing required field {split!r}")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise PrepareError(f"{path}: {split!r}: expected a list of image names")
        splits[split] = names
    return splits


def read_classes(path: Path) -> dict[str, str]:
    """Read ``ImageClasses_FSC147.txt`` (``name<TAB>class`` per line)."""
    classes = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        name, sep, cls = line.partition("\t")
        if not sep or not name.strip() or not cls.strip():
            raise PrepareError(f"{path}:{lineno}: expected '<name><TAB><class>', got {line!r}")
        classes[name.strip()] = cls.strip()
    return classes


def _read_class_filter(root: Path, wanted: tuple[str, ...]) -> tuple[dict[str, str], set[str]]:
    """The class of every image (if the file exists) and the wanted classes, checked."""
    path = root / CLASSES_FILE
    if not path.is_file():
        if wanted:
            raise PrepareError(f"{path}: not found, and prepare.fsc147.classes needs it")
        log.warning("%s: not found; records carry no class", path)
        return {}, set()
    classes = read_classes(path)
    known = set(classes.values())
    unknown = sorted(set(wanted) - known)
    if unknown:
        raise PrepareError(
            f"prepare.fsc147.classes: unknown {unknown} (classes in {path}: "
            f"{', '.join(sorted(known)[:20])}{', ...' if len(known) > 20 else ''})"
        )
    return classes, set(wanted)


def iter_fsc147(cfg: PrepareConfig, issues: IssueLog) -> Iterator[Sample]:
    """Yield the samples of an FSC-147 tree, split by split in the split file's order."""
    root = Path(cfg.fsc147.root)
    if not root.is_dir():
        raise PrepareError(
            f"{root}: FSC-147 root not found (set prepare.fsc147.root; it holds {IMAGES_DIR}/, "
            f"{ANNOTATION_FILE}, {SPLIT_FILE}, {CLASSES_FILE})"
        )
    annotation_path, split_path = root / ANNOTATION_FILE, root / SPLIT_FILE
    annotations = read_annotations(annotation_path)
    splits = read_splits(split_path)
    classes, wanted = _read_class_filter(root, cfg.fsc147.classes)

    # An image in two splits would leak between training and evaluation: drop it from all.
    split_of: dict[str, set[str]] = {}
    for split, names in splits.items():
        for name in names:
            split_of.setdefault(name, set()).add(split)
    leaked = {name for name, where in split_of.items() if len(where) > 1}
    for name in sorted(leaked):
        issues.report(split_path, "image_in_two_splits", f"{name} in {sorted(split_of[name])}")

    total = sum(len(names) for names in splits.values())
    log.info("fsc147: %d images listed in %s", total, split_path)
    for split in SPLITS:
        repeats = Counter()
        for name in splits[split]:
            if name in leaked:
                continue
            repeats[name] += 1
            if repeats[name] == 2:
                issues.report(split_path, "duplicate_entry", f"{name} listed twice in {split!r}")
            if repeats[name] > 1:
                continue
            sample = _import_one(cfg, root, name, split, annotations, classes, wanted, issues)
            if sample is not None:
                yield sample


def _import_one(
    cfg: PrepareConfig,
    root: Path,
    name: str,
    split: str,
    annotations: dict,
    classes: dict[str, str],
    wanted: set[str],
    issues: IssueLog,
) -> Sample | None:
    """Check, load and map one image; None when it is filtered or reported."""
    annotation_path = root / ANNOTATION_FILE
    image_path = root / IMAGES_DIR / name
    if name not in annotations:
        issues.report(annotation_path, "missing_annotation", f"no entry for {name!r}")
        return None
    points, boxes = annotations[name]
    if wanted and classes.get(name) not in wanted:
        issues.filter("class")
        return None
    if len(points) == 0:
        issues.report(annotation_path, "no_points", f"{name!r}.points is empty")
        return None
    if not passes_count_filter(len(points), cfg, issues):
        return None
    loaded = load_for_model(image_path, cfg.image_size, issues)
    if loaded is None:
        return None
    pixels, (width, height), scale = loaded
    problem = find_point_problem(points, width, height)
    if problem is not None:
        reason, detail = problem
        issues.report(image_path, reason, f"{ANNOTATION_FILE}, {name!r}: {detail}")
        return None
    image_id = Path(name).stem
    record = Record(
        id=image_id,
        image="",
        points=tuple((float(x) * scale[0], float(y) * scale[1]) for x, y in points),
        exemplars=to_model_boxes(boxes, scale, cfg.image_size),
        orig_size=(width, height),
        scale=scale,
        source=name,
        extra={"class": classes[name]} if name in classes else {},
    )
    return Sample(split, image_id, encode_png(pixels), record)
