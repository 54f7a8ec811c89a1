"""`shapes`: offline data for segmentation (and, from the same files, detection), drawn from a
seed and written once to disk in the real formats, then read through the same reader as Pascal
VOC, so that what trains on it trains on real data too.

Each image is a noisy grey background with one to `max_shapes` rectangles, ellipses and
triangles of several colours and sizes, never overlapping (each object's box is then exactly the
extent of its pixels). The folder holds Pascal VOC's layout and COCO's annotations:

    JPEGImages/<name>.jpg                  the images
    SegmentationClass/<name>.png           class masks: palette PNGs with VOC's colours
    SegmentationObject/<name>.png          instance masks (1, 2, ... per object)
    Annotations/<name>.xml                 VOC boxes (1-based, inclusive pixel corners)
    ImageSets/Segmentation/<split>.txt     the names of each split (and ImageSets/Main/)
    annotations/instances_<split>.json     COCO instances: boxes [x, y, w, h], areas, polygons
    kdl-shapes.json                        the manifest: what was drawn, from which seed

Image i of a split is a function of (data_seed, split, i) alone. The folder is written into a
temporary folder beside it, then renamed into place: a reader never sees half of it, and two
processes that draw it at once keep one copy. A folder with the manifest of the same settings
is read, not drawn again; kdl replaces a folder only when its manifest says kdl drew it (with
other settings), and never writes into or over anything else.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from ..config.data import ShapesDataConfig
from ..errors import KdlError
from ..runfolder.layout import host_name, process_running
from .base import DataBundle, Preprocessing
from .image_sets import channel_stats
from .segmentation import bundle, read_pairs, voc_pairs, voc_palette

CLASSES = ["background", "rectangle", "ellipse", "triangle"]
COLOURS = [(220, 40, 40), (40, 180, 60), (50, 80, 230), (235, 215, 40), (40, 210, 220), (210, 60, 200)]
MANIFEST = "kdl-shapes.json"
FORMAT = 1  # bump when what is drawn for the same settings changes
SETTINGS = ("data_seed", "train_images", "val_images", "test_images", "image_size", "max_shapes")
SPLITS = ("train", "val", "test")


def build(cfg: ShapesDataConfig, seed: int, vocabulary: list[str] | None,
          preprocessing: Preprocessing | None) -> DataBundle:
    folder = ensure(cfg)
    if cfg.annotations == "boxes":  # the detect task: the boxes of the VOC XML files
        from .detection import voc_bundle

        return voc_bundle(folder, CLASSES, cfg, seed, tuple(split if _count(cfg, split) else None
                                                            for split in SPLITS))
    fix = f"{folder} is damaged: remove it, and kdl draws it again"
    splits = {split: read_pairs(voc_pairs(folder, split), cfg.image_size, len(CLASSES), fix)[0]
              for split in SPLITS if _count(cfg, split)}
    train = splits["train"]
    return bundle(train, splits["val"], splits.get("test"), CLASSES, channel_stats(train), cfg, seed,
                  preprocessing)


def _count(cfg: ShapesDataConfig, split: str) -> int:
    return getattr(cfg, f"{split}_images")


def manifest_of(cfg: ShapesDataConfig) -> dict[str, Any]:
    return {"kdl": "shapes", "format": FORMAT, **{key: getattr(cfg, key) for key in SETTINGS},
            "classes": CLASSES}


# ----------------------------------------------------------------------------- the folder


def ensure(cfg: ShapesDataConfig) -> Path:
    """data.root holding these shapes: as it is when its manifest matches, else drawn now."""
    root = Path(cfg.root).expanduser().absolute()
    wanted = manifest_of(cfg)
    found = _manifest(root)
    if found == wanted:
        return root
    _check_ours(root, found)
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KdlError(f"data.root: cannot make the folder {root.parent} for the shapes "
                       f"({exc.strerror}); set data.root to a folder you can write") from None
    _remove_stale(root)
    if found is not None:
        print(f"shapes: {root} holds shapes of other settings ({_differences(found, wanted)}); drawing "
              "it again", file=sys.stderr, flush=True)
    else:
        print(f"shapes: drawing {cfg.train_images + cfg.val_images + cfg.test_images} images into {root}",
              file=sys.stderr, flush=True)
    temp = root.with_name(f".{root.name}.tmp-{host_name()}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        _draw_folder(temp, cfg)
        _move_into_place(temp, root, wanted)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return root


def _manifest(root: Path) -> dict[str, Any] | None:
    """The manifest of a folder kdl drew, or None."""
    try:
        found = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and found.get("kdl") == "shapes" else None


def _check_ours(root: Path, found: dict[str, Any] | None) -> None:
    """Refuse to write over anything at root that kdl did not draw: a folder without the
    manifest (but an empty one), a file, a link."""
    if root.is_symlink() or (root.exists() and not root.is_dir()):
        what = "a symbolic link" if root.is_symlink() else "not a folder"
        raise KdlError(f"data.root: {root} is {what}; kdl writes the shapes only into a new folder or "
                       "one it drew before. Set data.root to another path.")
    if found is None and root.is_dir() and any(root.iterdir()):
        raise KdlError(f"data.root: {root} is a folder kdl did not draw (it has no {MANIFEST}); kdl "
                       "never writes over it. Set data.root to a new folder (kdl makes it), e.g. "
                       "data/shapes.")


def _differences(found: dict[str, Any], wanted: dict[str, Any]) -> str:
    return ", ".join(f"{key} {found.get(key)} -> {wanted[key]}" for key in wanted
                     if found.get(key) != wanted[key])


def _remove_stale(root: Path) -> None:
    """Temporary folders beside root left by this machine's processes that died while drawing.
    Another machine's (the ranks of a run over several, on a shared file system) are left alone:
    its process ids mean nothing here, and it may be drawing now."""
    for temp in root.parent.glob(f".{root.name}.tmp-*"):
        with contextlib.suppress(ValueError):
            # HOST-PID-HEX (HOST may hold dashes; an older kdl's PID-HEX is this machine's)
            *host, pid, _ = temp.name.rsplit(".tmp-", 1)[1].rsplit("-", 2)
            mine = not host or host[0] == host_name()
            if mine and int(pid) != os.getpid() and not process_running(int(pid)):
                shutil.rmtree(temp, ignore_errors=True)


def _move_into_place(temp: Path, root: Path, wanted: dict[str, Any]) -> None:
    """Rename the drawn folder to root: over nothing or an empty folder directly; over kdl's own
    folder of other settings by moving that aside first. When another process got there first
    with the same settings (before, or between our two renames), its folder stays and ours goes."""
    try:
        os.rename(temp, root)
        return
    except OSError:
        if _manifest(root) == wanted:
            return
    old = root.with_name(f".{root.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.rename(root, old)
        os.rename(temp, root)
    except OSError as exc:
        if _manifest(root) != wanted:
            raise KdlError(f"data.root: could not put the new shapes in place of {root} "
                           f"({exc.strerror}); is another kdl drawing other settings there? Give "
                           "each its own data.root") from None
    shutil.rmtree(old, ignore_errors=True)  # (the other's folder in place: ours goes with the temp)


# ----------------------------------------------------------------------------- drawing


def _draw_folder(folder: Path, cfg: ShapesDataConfig) -> None:
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationObject", "Annotations",
                "ImageSets/Segmentation", "ImageSets/Main", "annotations"):
        (folder / sub).mkdir(parents=True)
    for number, split in enumerate(SPLITS):
        names = [f"{split}_{index:06d}" for index in range(_count(cfg, split))]
        if not names:
            continue
        coco: dict[str, Any] = {
            "info": {"description": f"kdl shapes, data_seed {cfg.data_seed}, split {split}",
                     "version": str(FORMAT)},
            "licenses": [],
            "images": [], "annotations": [],
            "categories": [{"id": index, "name": name, "supercategory": "shape"}
                           for index, name in enumerate(CLASSES) if index],
        }
        for index, name in enumerate(names):
            rng = np.random.default_rng([cfg.data_seed % 2**64, number, index])
            objects = _draw_image(folder, name, rng, cfg.image_size, cfg.max_shapes)
            _write_voc_xml(folder / "Annotations" / f"{name}.xml", name, cfg.image_size, objects)
            coco["images"].append({"id": index + 1, "file_name": f"{name}.jpg",
                                   "width": cfg.image_size, "height": cfg.image_size})
            for obj in objects:
                x0, y0, x1, y1 = obj["box"]
                coco["annotations"].append({
                    "id": len(coco["annotations"]) + 1, "image_id": index + 1,
                    "category_id": obj["class"], "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1],
                    "area": obj["area"], "iscrowd": 0, "segmentation": [obj["polygon"]],
                })
        listing = "".join(f"{name}\n" for name in names)
        for sub in ("Segmentation", "Main"):
            (folder / "ImageSets" / sub / f"{split}.txt").write_text(listing, encoding="utf-8")
        (folder / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco), encoding="utf-8")
    # the manifest last: a folder with it is complete
    (folder / MANIFEST).write_text(json.dumps(manifest_of(cfg), indent=2) + "\n", encoding="utf-8")


def _draw_image(folder: Path, name: str, rng: np.random.Generator, size: int, max_shapes: int
                ) -> list[dict[str, Any]]:
    """One image, its class and instance masks; returns its objects (class, box, area, polygon)."""
    from PIL import Image, ImageDraw

    grey = int(rng.integers(60, 196))
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    classes, instances = Image.new("P", (size, size), 0), Image.new("P", (size, size), 0)
    draws = [ImageDraw.Draw(picture) for picture in (image, classes, instances)]
    shapes: list[tuple[int, tuple[int, int, int, int], list[tuple[float, float]]]] = []
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        box = _free_box(rng, size, [placed for _, placed, _ in shapes])
        if box is None:
            break
        kind = int(rng.integers(1, len(CLASSES)))
        colour = COLOURS[int(rng.integers(len(COLOURS)))]
        outline = _outline(kind, box, rng)
        for draw, fill in zip(draws, (colour, kind, len(shapes) + 1), strict=True):
            if kind == 1:
                draw.rectangle(box, fill=fill)
            elif kind == 2:
                draw.ellipse(box, fill=fill)
            else:
                draw.polygon([(round(x - 0.5), round(y - 0.5)) for x, y in outline], fill=fill)
        shapes.append((kind, box, outline))
    noise = rng.normal(0.0, 8.0, (size, size, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(folder / "JPEGImages" / f"{name}.jpg", quality=90)
    for picture, sub in ((classes, "SegmentationClass"), (instances, "SegmentationObject")):
        picture.putpalette(voc_palette())
        picture.save(folder / sub / f"{name}.png")
    labels, objects = np.asarray(instances), []
    for number, (kind, _, outline) in enumerate(shapes, start=1):
        rows, cols = np.nonzero(labels == number)  # the box: exactly the object's pixels
        objects.append({"class": kind, "box": [int(cols.min()), int(rows.min()), int(cols.max()),
                                               int(rows.max())],
                        "area": len(rows), "polygon": [round(v, 2) for point in outline for v in point]})
    return objects


def _outline(kind: int, box: tuple[int, int, int, int], rng: np.random.Generator
             ) -> list[tuple[float, float]]:
    """The shape's outline in COCO's coordinates (pixel i spans i to i + 1): a rectangle's
    edges, 24 points of an ellipse, a triangle's corners at pixel centres (its apex on the top
    or bottom edge of the box, its base the opposite edge)."""
    x0, y0, x1, y1 = box
    if kind == 1:
        return [(x0, y0), (x1 + 1, y0), (x1 + 1, y1 + 1), (x0, y1 + 1)]
    if kind == 2:
        cx, cy, rx, ry = (x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2, (x1 - x0 + 1) / 2, (y1 - y0 + 1) / 2
        angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        return [(cx + rx * float(np.cos(a)), cy + ry * float(np.sin(a))) for a in angles]
    apex_x = x0 + 0.5 + float(rng.uniform(0, x1 - x0))
    top, bottom = (y0 + 0.5, y1 + 0.5) if rng.random() < 0.5 else (y1 + 0.5, y0 + 0.5)
    return [(apex_x, top), (x1 + 0.5, bottom), (x0 + 0.5, bottom)]


def _write_voc_xml(path: Path, name: str, size: int, objects: list[dict[str, Any]]) -> None:
    """VOC's annotation: the image's size and each object's class and box (1-based pixel
    indices, both corners inclusive, as VOC's own files)."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "shapes"
    ET.SubElement(root, "filename").text = f"{name}.jpg"
    ET.SubElement(ET.SubElement(root, "source"), "database").text = "kdl shapes"
    dims = ET.SubElement(root, "size")
    for key, value in (("width", size), ("height", size), ("depth", 3)):
        ET.SubElement(dims, key).text = str(value)
    ET.SubElement(root, "segmented").text = "1"
    for obj in objects:
        node = ET.SubElement(root, "object")
        for key, value in (("name", CLASSES[obj["class"]]), ("pose", "Unspecified"), ("truncated", "0"),
                           ("difficult", "0")):
            ET.SubElement(node, key).text = value
        box = ET.SubElement(node, "bndbox")
        for key, value in zip(("xmin", "ymin", "xmax", "ymax"), obj["box"], strict=True):
            ET.SubElement(box, key).text = str(value + 1)
    ET.indent(root)
    path.write_bytes(ET.tostring(root, encoding="utf-8", xml_declaration=False) + b"\n")


def _free_box(rng: np.random.Generator, size: int, placed: list[tuple[int, int, int, int]]
              ) -> tuple[int, int, int, int] | None:
    """A box (x0, y0, x1, y1; inclusive) of a side from 15 % to 40 % of the image, apart from
    the boxes placed (a pixel between); None when 30 draws found no room."""
    low, high = max(6, round(0.15 * size)), max(7, round(0.4 * size))
    for _ in range(30):
        width, height = (int(v) for v in rng.integers(low, high + 1, 2))
        x0, y0 = int(rng.integers(0, size - width + 1)), int(rng.integers(0, size - height + 1))
        box = (x0, y0, x0 + width - 1, y0 + height - 1)
        if all(box[0] > b[2] + 1 or box[2] < b[0] - 1 or box[1] > b[3] + 1 or box[3] < b[1] - 1
               for b in placed):
            return box
    return None
