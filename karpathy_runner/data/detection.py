"""Object detection data: images with boxes and their classes, read from COCO instances JSON or
Pascal VOC XML.

Every image is decoded once, resized to one square size (its boxes scaled with it) and held in
memory as uint8, so that batches are cut and augmented on the training device. Images hold
different numbers of boxes; a split keeps them padded to the most any image holds, as boxes
(N, M, 4) (x0, y0, x1, y1 in pixels of the resized image, pixel i spanning i to i + 1, as
COCO's) and labels (N, M), label 0 marking a padding slot (0 is the background, never an
object), so that a batch stays a tuple of tensors. An image without boxes is background.

Labels are 1..K in the order of the classes: COCO's categories sorted by id, VOC's 20 names.
A box that is empty or reaches outside its image, a COCO category id the file does not declare
and a VOC class name outside the classes are errors naming the file, found while reading.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config.data import DetectionDataConfig, SegmentationData
from ..errors import KdlError
from ..rng import mixed_seed
from .base import BatchDataset, DataBundle, DataInfo, Preprocessing
from .image_sets import channel_stats, open_image
from .images import ImageInputs
from .segmentation import VOC_CLASSES, TensorMasks


@dataclass
class Annotated:
    """One image and its boxes (x0, y0, x1, y1 in the image's own pixels) with labels 1..K."""

    image: Path
    boxes: list[tuple[float, float, float, float]]
    labels: list[int]


class TensorBoxes(BatchDataset):
    """Images uint8 (N, 3, S, S), boxes float32 (N, M, 4), labels int64 (N, M) (0: no box)."""

    def __init__(self, images: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor):
        assert images.dtype == torch.uint8 and len(images) == len(boxes) == len(labels)
        self.images, self.boxes, self.labels = images, boxes, labels

    def __len__(self) -> int:
        return len(self.images)

    @property
    def nbytes(self) -> int:
        return self.images.nbytes + self.boxes.nbytes + self.labels.nbytes

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device) -> TensorBoxes:
        return TensorBoxes(self.images.to(device), self.boxes.to(device), self.labels.to(device))

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        indices = indices.to(self.images.device)
        return (self.images.index_select(0, indices), self.boxes.index_select(0, indices),
                self.labels.index_select(0, indices))


# ----------------------------------------------------------------------------- reading


def check_box(box: tuple[float, float, float, float], width: int, height: int, where: str) -> None:
    """An empty box, or one outside its width x height image, is an error naming `where`."""
    x0, y0, x1, y1 = box
    if not (x1 > x0 and y1 > y0):
        raise KdlError(f"{where}: the box {[round(v, 2) for v in box]} (x0, y0, x1, y1) is empty; every "
                       "box needs a width and a height. Fix or remove the annotation")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise KdlError(f"{where}: the box {[round(v, 2) for v in box]} (x0, y0, x1, y1) reaches outside "
                       f"its {width}x{height} image. Fix or remove the annotation")


def coco_records(annotations: Path, images: Path, categories: list[int] | None, limit: int | None
                 ) -> tuple[list[Annotated], list[int], list[str]]:
    """The images of a COCO instances file with their boxes (crowd regions left out), and its
    category ids (sorted) and names; `categories`: the training file's ids, which the val file's
    annotations must use."""
    try:
        data = json.loads(annotations.read_text(encoding="utf-8"))
        declared = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        entries = data["images"][:limit] if limit else data["images"]
        notes = data["annotations"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        what = exc.strerror if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
        raise KdlError(f"{annotations}: not a COCO instances file kdl can read ({what}); it holds "
                       "images, annotations and categories") from None
    ids = categories if categories is not None else sorted(declared)
    label_of = {category: label for label, category in enumerate(ids, start=1)}
    try:
        records = {int(e["id"]): (Annotated(images / e["file_name"], [], []), int(e["width"]),
                                  int(e["height"])) for e in entries}
    except (KeyError, TypeError, ValueError) as exc:
        raise KdlError(f"{annotations}: an image entry lacks a usable {exc}; each has an id, a file_name, "
                       "a width and a height") from None
    for index, note in enumerate(notes):
        try:
            _coco_note(note, records, label_of, ids, categories, annotations)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            name = note.get("id") if isinstance(note, dict) else f"number {index + 1}"
            raise KdlError(f"{annotations}: annotation {name} lacks a usable {exc}; each has an "
                           "image_id, a category_id and a bbox [x, y, width, height]") from None
    return [record for record, _, _ in records.values()], ids, [declared.get(i, str(i)) for i in ids]


def _coco_note(note: dict[str, Any], records: dict[int, tuple[Annotated, int, int]],
               label_of: dict[int, int], ids: list[int], categories: list[int] | None,
               annotations: Path) -> None:
    """One COCO annotation added to its image's record (crowd regions and images left out by
    max_images skipped); an unknown category or a bad box is an error naming the file."""
    category = int(note["category_id"])
    if category not in label_of:
        raise KdlError(f"{annotations}: annotation {note.get('id')} has category_id {category}, which "
                       f"is not among the categories {ids[:10]}{'...' if len(ids) > 10 else ''}"
                       + (" of the training file" if categories is not None else " it declares")
                       + ". Fix the id or declare the category")
    found = records.get(int(note["image_id"]))
    if found is None or note.get("iscrowd", 0):
        return  # an image left out by max_images; a crowd region is no object to find
    record, width, height = found
    x, y, w, h = (float(v) for v in note["bbox"])
    box = (x, y, x + w, y + h)
    check_box(box, width, height, f"{annotations} (annotation {note.get('id')}, {record.image.name})")
    record.boxes.append(box)
    record.labels.append(label_of[category])


def voc_records(folder: Path, split: str, classes: list[str], limit: int | None) -> list[Annotated]:
    """The images that ImageSets/Main/<split>.txt lists, with the boxes of Annotations/<name>.xml
    (1-based inclusive corners, as VOC's; objects marked difficult left out, as VOC's own
    evaluation leaves them out). `classes`: background first."""
    listing = folder / "ImageSets" / "Main" / f"{split}.txt"
    try:
        names = listing.read_text(encoding="utf-8").split()[:limit]
    except (OSError, UnicodeDecodeError) as exc:
        raise KdlError(f"{listing}: cannot read the {split} list of the VOC folder {folder} "
                       f"({exc.strerror if isinstance(exc, OSError) else exc}); it lists one image name "
                       "per line") from None
    label_of = {name: label for label, name in enumerate(classes) if label}
    return [_voc_record(folder, name, label_of) for name in names]


def _voc_record(folder: Path, name: str, label_of: dict[str, int]) -> Annotated:
    path = folder / "Annotations" / f"{name}.xml"
    try:
        root = ET.parse(path).getroot()
        width, height = int(root.findtext("size/width", "")), int(root.findtext("size/height", ""))
    except (OSError, ET.ParseError, ValueError) as exc:
        raise KdlError(f"{path}: not a VOC annotation kdl can read ({exc}); it holds the image's size "
                       "and each object's name and bndbox") from None
    record = Annotated(folder / "JPEGImages" / f"{name}.jpg", [], [])
    for obj in root.iter("object"):
        label = obj.findtext("name", "").strip()
        if label not in label_of:
            raise KdlError(f"{path}: the object {label!r} is none of the classes "
                           f"({', '.join(label_of)})")
        if obj.findtext("difficult", "0").strip() == "1":
            continue
        try:
            corners = [float(obj.findtext(f"bndbox/{key}", "")) for key in ("xmin", "ymin", "xmax", "ymax")]
        except ValueError:
            raise KdlError(f"{path}: an object {label!r} without a bndbox of numbers") from None
        box = (corners[0] - 1, corners[1] - 1, corners[2], corners[3])  # to COCO's continuous pixels
        check_box(box, width, height, str(path))
        record.boxes.append(box)
        record.labels.append(label_of[label])
    return record


def read_records(records: Sequence[Annotated], size: int) -> TensorBoxes:
    """The images decoded (threads: PIL decodes without the GIL) and resized to (size, size),
    their boxes scaled with them and padded to the most any image holds."""
    if not records:
        raise KdlError("a detection split needs at least one image")
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        decoded = list(pool.map(lambda record: _read_image(record.image, size), records))
    slots = max(1, max(len(record.boxes) for record in records))
    boxes = torch.zeros(len(records), slots, 4)
    labels = torch.zeros(len(records), slots, dtype=torch.int64)
    for index, (record, (_, width, height)) in enumerate(zip(records, decoded, strict=True)):
        if record.boxes:
            scale = torch.tensor([size / width, size / height] * 2)
            boxes[index, :len(record.boxes)] = torch.tensor(record.boxes) * scale
            labels[index, :len(record.labels)] = torch.tensor(record.labels)
    images = torch.from_numpy(np.stack([image for image, _, _ in decoded])).permute(0, 3, 1, 2)
    return TensorBoxes(images.contiguous(), boxes, labels)


def _read_image(path: Path, size: int) -> tuple[np.ndarray, int, int]:
    """(image (S, S, 3), its own width, height)."""
    from PIL import Image

    try:
        with open_image(str(path)) as opened:
            picture = opened.convert("RGB")
    except (OSError, ValueError) as exc:
        raise KdlError(f"{path}: not an image PIL can read ({exc}); replace or remove it") from None
    resized = picture.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized).copy(), picture.width, picture.height


# ----------------------------------------------------------------------------- the bundle


def build(cfg: DetectionDataConfig, seed: int, vocabulary: list[str] | None,
          preprocessing: Preprocessing | None) -> DataBundle:
    root = Path(cfg.root).expanduser().resolve()
    if cfg.name == "voc_detection":
        folder = root / "VOCdevkit" / f"VOC{cfg.year}"
        folder = folder if folder.is_dir() else root
        return voc_bundle(folder, ["background", *VOC_CLASSES[1:]], cfg, seed, ("train", "val", None),
                          cfg.max_images)
    train_records, ids, names = coco_records(root / cfg.train_annotations, root / cfg.train_images, None,
                                             cfg.max_images)
    train, val = read_records(train_records, cfg.image_size), None
    if cfg.val_annotations:
        val_records, _, _ = coco_records(root / cfg.val_annotations, root / cfg.val_images, ids,
                                         cfg.max_images)
        val = read_records(val_records, cfg.image_size)
    return bundle(train, val, None, ["background", *names], cfg, seed)


def voc_bundle(folder: Path, classes: list[str], cfg: SegmentationData, seed: int,
               splits: tuple[str | None, ...], limit: int | None = None) -> DataBundle:
    """The (train, val, test) splits named (None: none) of a VOC folder's boxes."""
    read = [None if split is None
            else read_records(voc_records(folder, split, classes, limit), cfg.image_size)
            for split in splits]
    return bundle(read[0], read[1], read[2], classes, cfg, seed)


def bundle(train: TensorBoxes, val: TensorBoxes | None, test: TensorBoxes | None, names: list[str],
           cfg: SegmentationData, seed: int) -> DataBundle:
    """The splits with their DataInfo (the model normalises by the data's mean and std),
    preparation and `kdl predict`'s inputs."""
    mean, std = channel_stats(TensorMasks(train.images, train.images[:, 0]))  # (the images alone count)
    size = train.images.shape[-1]
    info = DataInfo(kind="detection", num_classes=len(names), class_names=list(names), in_channels=3,
                    image_size=(size, size), mean=tuple(mean), std=tuple(std))
    prepare = DetectionPrep(tuple(cfg.augment), cfg.crop_padding, seed)
    return DataBundle(train=train, val=val, test=test, info=info, prepare=prepare, inputs=BoxInputs(size))


class BoxInputs:
    """`kdl predict`'s images as a batch: (images (B, 3, S, S) resized as in training, no boxes,
    no labels, each image's original (height, width))."""

    def __init__(self, size: int):
        self.size = size

    def items(self, given: list[str]) -> list[str]:
        return ImageInputs(3, self.size, None).items(given)

    def batch(self, items: Sequence[str | Path]) -> tuple[torch.Tensor, ...]:
        decoded = [_read_image(Path(item), self.size) for item in items]
        images = torch.from_numpy(np.stack([image for image, _, _ in decoded])).permute(0, 3, 1, 2)
        sizes = torch.tensor([[height, width] for _, width, height in decoded])
        no_labels = torch.zeros(len(items), 1, dtype=torch.int64)
        return images.contiguous(), torch.zeros(len(items), 1, 4), no_labels, sizes


# ----------------------------------------------------------------------------- on the device


class DetectionPrep:
    """(uint8 images (B, 3, S, S), boxes (B, M, 4), labels (B, M), ...) -> (float images in [0, 1]
    (the model normalises), boxes, labels, ...) on the device; with a training step, the same
    random crop and flip for an image and its boxes."""

    def __init__(self, augment: tuple[str, ...], padding: int, seed: int, device: torch.device | None = None):
        self.augment, self.padding, self.seed = augment, padding, seed
        self.device = torch.device("cpu") if device is None else device

    def to(self, device: torch.device) -> DetectionPrep:
        return DetectionPrep(self.augment, self.padding, self.seed, device)

    def __call__(self, batch: tuple[torch.Tensor, ...], step: int | None) -> tuple[torch.Tensor, ...]:
        images, boxes, labels, *rest = (t.to(self.device, non_blocking=True) for t in batch)
        if step is not None and self.augment:
            generator = torch.Generator(device=self.device).manual_seed(mixed_seed(self.seed, step + 1))
            images, boxes, labels = augment_boxes(images, boxes, labels, self.augment, self.padding,
                                                  generator)
        return (images.float() / 255, boxes, labels, *rest)


def augment_boxes(images: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, augment: tuple[str, ...],
                  padding: int, generator: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random crop of each image padded with black (its boxes shifted, cut at the edges, and
    dropped, label 0, when less than a pixel of them is left) and a horizontal flip half the
    time (x -> S - x)."""
    batch, _, height, width = images.shape
    if "crop" in augment and padding > 0:
        padded = torch.nn.functional.pad(images, (padding,) * 4)
        shift = torch.randint(0, 2 * padding + 1, (2, batch), device=images.device, generator=generator)
        rows = (torch.arange(height, device=images.device) + shift[0, :, None])[:, :, None]  # (B, H, 1)
        cols = (torch.arange(width, device=images.device) + shift[1, :, None])[:, None, :]  # (B, 1, W)
        index = torch.arange(batch, device=images.device)[:, None, None]
        images = padded.permute(0, 2, 3, 1)[index, rows, cols].permute(0, 3, 1, 2).contiguous()
        offset = (padding - shift).float()  # (2, B): rows, columns moved
        moved = boxes + torch.stack([offset[1], offset[0]] * 2, dim=1)[:, None, :]
        limit = torch.tensor([width, height] * 2, dtype=boxes.dtype, device=boxes.device)
        moved = torch.minimum(moved.clamp_min(0), limit)
        kept = (labels > 0) & (moved[..., 2] - moved[..., 0] >= 1) & (moved[..., 3] - moved[..., 1] >= 1)
        boxes, labels = torch.where(kept[..., None], moved, 0.0), torch.where(kept, labels, 0)
    if "flip" in augment:
        flip = torch.rand(batch, device=images.device, generator=generator) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(3), images)
        x0, y0, x1, y1 = boxes.unbind(-1)
        mirrored = torch.stack([width - x1, y0, width - x0, y1], dim=-1)
        boxes = torch.where(flip[:, None, None] & (labels > 0)[..., None], mirrored, boxes)
    return images, boxes, labels
