"""Write examples/: the README's sample images and a tiny dataset in the FSC-147 layout.

Everything comes from the synthetic generator with params.yaml's settings, so the files can
be made again exactly (``.venv/bin/python scripts/make_examples.py``):

- ``scene.png``: the first scene of the demo's test split (held out from training), and
  ``scene.points.json``: its true points (pixels, the canonical order);
- ``scene_grey.png``: the same scene in greyscale (the demo model was never shown grey);
- ``fsc147/``: six other scenes as JPEG files with an annotation file, a split file and a
  class list, in FSC-147's layout, for `seqops prepare --set prepare.source=fsc147`.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from seqops.config import load_params  # noqa: E402
from seqops.data.ordering import order_points  # noqa: E402
from seqops.data.synthetic import generate_scenes  # noqa: E402
from seqops.io import atomic_write_bytes, atomic_write_json  # noqa: E402

OUT = ROOT / "examples"
FSC_SPLITS = {"train": 4, "val": 1, "test": 1}  # scenes of the demo's *train* split


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def write_scene(cfg) -> None:
    scene = next(generate_scenes(cfg, "test", 1))
    points = order_points(scene.points, cfg.order, cfg.row_height)
    atomic_write_bytes(OUT / "scene.png", png(scene.pixels))
    grey = np.asarray(Image.fromarray(scene.pixels).convert("L").convert("RGB"))
    atomic_write_bytes(OUT / "scene_grey.png", png(grey))
    truth = {"image": "scene.png", "count": len(points), "points": np.round(points, 2).tolist()}
    atomic_write_json(OUT / "scene.points.json", truth)


def write_fsc147(cfg) -> None:
    root = OUT / "fsc147"
    annotations, splits, classes = {}, {}, []
    scenes = generate_scenes(cfg, "train", sum(FSC_SPLITS.values()))
    for split, count in FSC_SPLITS.items():
        splits[split] = []
        for _ in range(count):
            scene = next(scenes)
            name = f"{len(annotations) + 1}.jpg"
            atomic_write_bytes(root / "images_384_VarV2" / name, jpeg(scene.pixels))
            x1, y1, x2, y2 = np.round(scene.exemplars, 1).T
            corners = np.stack([x1, y1, x1, y2, x2, y2, x2, y1], 1).reshape(-1, 4, 2)
            annotations[name] = {
                "points": np.round(scene.points, 2).tolist(),
                "box_examples_coordinates": corners.tolist(),
            }
            splits[split].append(name)
            classes.append(f"{name}\tshapes")
    atomic_write_json(root / "annotation_FSC147_384.json", annotations)
    atomic_write_json(root / "Train_Test_Val_FSC_147.json", splits)
    (root / "ImageClasses_FSC147.txt").write_text("\n".join(classes) + "\n")


def main() -> int:
    cfg = load_params(ROOT / "params.yaml").prepare
    write_scene(cfg)
    write_fsc147(cfg)
    for path in sorted(OUT.rglob("*")):
        if path.is_file():
            print(f"{path.relative_to(ROOT)}  {path.stat().st_size // 1024} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
