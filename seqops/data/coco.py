"""Import a COCO instances file and its image folder.

``prepare.coco.annotations`` is a COCO ``instances_*.json`` (``images``:
``id``, ``file_name``; ``annotations``: ``image_id``, ``category_id``, ``bbox`` =
``[x, y, w, h]``, ``iscrowd``; ``categories``: ``id``, ``name``), and
``prepare.coco.images_dir`` holds the files named by ``file_name``.

What a record is: one per (image, selected category) with at least one object,
so an image with cats and dogs gives a cat record and a dog record; both share the
image file and always land in the same split. Points are box centres; exemplars
are the three largest boxes of the counted category (ties: the first in the file),
a deterministic choice that gives the most visible examples.

- Categories: ``prepare.coco.categories`` by name (empty: every category).
- Split: by image id, deterministically: a hash of ``(prepare.seed, image id)``
  puts ``test_share`` of the images in test, ``val_share`` in val, the rest in
  train. Adding images never moves the others.
- Filters: ``min_objects``/``max_objects`` per record; a record whose category
  has a crowd annotation (``iscrowd = 1``: one box around many objects, so the
  count is unknown) is filtered as ``crowd``.
- Bad input, reported: a missing or corrupt image, a centre outside the image,
  two identical centres, a file listed under two image ids.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from seqops.config import PrepareConfig
from seqops.contract import MAX_EXEMPLARS
from seqops.data.manifest import Record
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


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _require(item: object, key: str, kind: type | tuple, path: Path, where: str) -> object:
    """``item[key]``, checked; a missing or mistyped field is a malformed file."""
    if not isinstance(item, dict):
        raise PrepareError(f"{path}: {where}: expected an object")
    if key not in item:
        raise PrepareError(f"{path}: {where}: missing required field {key!r}")
    value = item[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise PrepareError(f"{path}: {where}.{key}: unexpected value {value!r}")
    return value


def split_of(image_id: int | str, seed: int, val_share: float, test_share: float) -> str:
    """The split of an image: a stable hash of ``(seed, image_id)`` mapped to ``[0, 1)``."""
    digest = hashlib.sha256(f"{seed}/{image_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_share:
        return "test"
    if u < test_share + val_share:
        return "val"
    return "train"


def read_coco(path: Path) -> tuple[list[dict], dict[int, str], dict]:
    """Read and validate an instances file.

    Returns:
        ``(images, categories, by_image)``: the image entries, ``{category id: name}``,
        and ``{image id: {category id: [(bbox, iscrowd), ...]}}``, in file order.
    """
    raw = read_json_file(path, "COCO annotation file")
    for key in ("images", "annotations", "categories"):
        _require(raw, key, list, path, "top level")
    categories = {}
    for i, cat in enumerate(raw["categories"]):
        cat_id = _require(cat, "id", int, path, f"categories[{i}]")
        categories[cat_id] = _require(cat, "name", str, path, f"categories[{i}]")
    images, image_ids = [], set()
    for i, image in enumerate(raw["images"]):
        image_id = _require(image, "id", (int, str), path, f"images[{i}]")
        _require(image, "file_name", str, path, f"images[{i}]")
        if image_id in image_ids:
            raise PrepareError(f"{path}: images[{i}].id: duplicate image id {image_id!r}")
        image_ids.add(image_id)
        images.append(image)
    by_image: dict = defaultdict(lambda: defaultdict(list))
    for i, ann in enumerate(raw["annotations"]):
        where = f"annotations[{i}]"
        image_id = _require(ann, "image_id", (int, str), path, where)
        cat_id = _require(ann, "category_id", int, path, where)
        bbox = _require(ann, "bbox", list, path, where)
        if len(bbox) != 4 or not all(_is_number(v) for v in bbox) or min(bbox[2:]) < 0:
            raise PrepareError(f"{path}: {where}.bbox: expected [x, y, w >= 0, h >= 0]")
        if image_id not in image_ids:
            raise PrepareError(f"{path}: {where}.image_id: no image with id {image_id!r}")
        if cat_id not in categories:
            raise PrepareError(f"{path}: {where}.category_id: no category with id {cat_id}")
        crowd = bool(ann.get("iscrowd", 0))
        by_image[image_id][cat_id].append(([float(v) for v in bbox], crowd))
    return images, categories, by_image


def _selected_categories(names: tuple[str, ...], categories: dict[int, str], path: Path) -> set:
    if not names:
        return set(categories)
    ids = {cid for cid, name in categories.items() if name in names}
    unknown = sorted(set(names) - set(categories.values()))
    if unknown:
        known = ", ".join(sorted(categories.values()))
        raise PrepareError(f"prepare.coco.categories: unknown {unknown} (in {path}: {known})")
    return ids


def iter_coco(cfg: PrepareConfig, issues: IssueLog) -> Iterator[Sample]:
    """Yield one sample per (image, selected category), images in id order."""
    path, images_dir = Path(cfg.coco.annotations), Path(cfg.coco.images_dir)
    if cfg.coco.val_share + cfg.coco.test_share >= 1:
        raise PrepareError("prepare.coco: val_share + test_share must be < 1 (train gets the rest)")
    images, categories, by_image = read_coco(path)
    selected = _selected_categories(cfg.coco.categories, categories, path)
    if not images_dir.is_dir():
        raise PrepareError(f"{images_dir}: COCO image folder not found (prepare.coco.images_dir)")

    ids_of_file = defaultdict(list)
    for image in images:
        ids_of_file[image["file_name"]].append(image["id"])
    log.info("coco: %d images, %d categories selected, from %s", len(images), len(selected), path)
    for image in sorted(images, key=lambda im: (isinstance(im["id"], str), im["id"])):
        image_id, file_name = image["id"], image["file_name"]
        if len(ids_of_file[file_name]) > 1:
            # The same file under two ids may land in two splits: a leak, so skip every copy.
            issues.report(
                path,
                "image_in_two_splits",
                f"{file_name} is listed as ids {ids_of_file[file_name]}",
            )
            continue
        groups = _groups_of(by_image.get(image_id, {}), selected, cfg, issues)
        if not groups:
            continue
        loaded = load_for_model(images_dir / file_name, cfg.image_size, issues)
        if loaded is None:
            continue
        pixels, (width, height), scale = loaded
        split = split_of(image_id, cfg.seed, cfg.coco.val_share, cfg.coco.test_share)
        png = encode_png(pixels)
        image_name = str(image_id).replace("/", "_")
        for cat_id, anns in groups:
            boxes = np.asarray([bbox for bbox, _ in anns], np.float64).reshape(-1, 4)
            centres = boxes[:, :2] + boxes[:, 2:] / 2
            problem = find_point_problem(centres, width, height)
            if problem is not None:
                issues.report(
                    images_dir / file_name, problem[0], f"{categories[cat_id]}: {problem[1]}"
                )
                continue
            # The largest boxes make the clearest exemplars; ties go to the first in the file.
            largest = sorted(range(len(anns)), key=lambda k: (-boxes[k, 2] * boxes[k, 3], k))
            chosen = boxes[largest[:MAX_EXEMPLARS]]
            xyxy = np.concatenate([chosen[:, :2], chosen[:, :2] + chosen[:, 2:]], 1)
            record = Record(
                id=f"{image_name}-c{cat_id}",
                image="",
                points=tuple((float(x) * scale[0], float(y) * scale[1]) for x, y in centres),
                exemplars=to_model_boxes(xyxy, scale, cfg.image_size),
                orig_size=(width, height),
                scale=scale,
                source=file_name,
                extra={"image_id": image_id, "category_id": cat_id, "category": categories[cat_id]},
            )
            yield Sample(split, image_name, png, record)


def _groups_of(
    anns_by_cat: dict, selected: set, cfg: PrepareConfig, issues: IssueLog
) -> list[tuple[int, list]]:
    """The (category id, annotations) pairs of one image that pass the filters."""
    if not any(cat_id in selected for cat_id in anns_by_cat):
        issues.filter("no_objects")  # COCO has images without (selected) objects: not an error
        return []
    groups = []
    for cat_id in sorted(anns_by_cat):
        if cat_id not in selected:
            continue
        anns = anns_by_cat[cat_id]
        if any(crowd for _, crowd in anns):
            issues.filter("crowd")
            continue
        if passes_count_filter(len(anns), cfg, issues):
            groups.append((cat_id, anns))
    return groups
