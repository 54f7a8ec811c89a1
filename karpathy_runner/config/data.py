"""The data families' config branches: image classification data, text classification data,
character corpora."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from .families import DataConfig, Seed, register


@register
class ImageDataConfig(DataConfig):
    """Image classification data (torchvision datasets, scikit-learn digits, a user's folder)."""

    BUILD: ClassVar[str] = "karpathy_runner.data.images:build"
    KIND: ClassVar[str] = "image"
    # what to change for models that other kinds of data suit
    KIND_NOTES: ClassVar[dict[str, str]] = {
        "image": "or set data.as_sequence: rows to feed each image row by row to rnn, lstm or gru",
        "image_rows": "or set data.as_sequence: none to train a cnn on whole images",
    }

    name: Literal["digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "image_folder"] = Field(
        "digits",
        description="The dataset: digits (scikit-learn's 8x8 digits, bundled: no download); cifar10, "
        "cifar100, mnist, fashion_mnist (torchvision's, downloaded into root); image_folder (a user's "
        "images in root/train/<class>/, and optionally root/val/<class>/ and root/test/<class>/).",
    )
    root: str = Field("data", description="The folder the dataset is read from and downloaded to; "
                      "image_folder: the folder that holds train/ (and val/, test/).")
    download: bool = Field(True, description="Download a missing torchvision dataset into root; false: "
                           "a missing one is an error that names the files expected.")
    batch_size: int = Field(64, ge=1, description="Training images per batch (per optimizer step).")
    eval_batch_size: int | None = Field(None, ge=1, description="Images per evaluation batch; null: "
                                        "the larger of batch_size and 256 (bigger evaluates faster).")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="The share of the training split held "
                                "out at random for validation; 0: no val split (image_folder: its own "
                                "val/ folder, when there is one, is used instead).")
    split_seed: Seed = Field(0, description="The seed of the random validation split (and of digits' test "
                             "split), apart from the run's seed: every run seed sees the same val set.")
    augment: list[Literal["crop", "flip"]] = Field(
        default_factory=list,
        description="Training augmentations, drawn per image on the whole batch: crop (a random crop of "
        "the image padded with crop_padding zeros on each side), flip (a horizontal flip, half the time).",
    )
    crop_padding: int = Field(4, ge=0, description="crop: zero pixels added on each side before the random "
                              "crop back to the image's size.")
    image_size: int = Field(32, ge=4, description="image_folder: the side every image is resized to "
                            "(square); a pretrained torchvision model's own resize and crop replace it.")
    placement: Literal["auto", "device", "stream"] = Field(
        "auto",
        description="device: the decoded images live on the training device, batches are cut and "
        "augmented there; stream: batches are gathered on the host (by num_workers DataLoader workers) "
        "and copied over; auto: device for datasets held in memory that fit, stream for image_folder.",
    )
    num_workers: int = Field(0, ge=0, description="DataLoader workers of the stream placement.")
    skip_bad_files: bool = Field(False, description="image_folder: leave out (and count) files that do "
                                 "not decode; false: such a file is an error.")
    as_sequence: Literal["none", "rows"] = Field(
        "none",
        description="rows: each image is a sequence of its rows (H steps of C x W values) for recurrent "
        "models, and the data's kind is image_rows instead of image.",
    )

    @classmethod
    def kind_of(cls, values: dict[str, Any]) -> str:
        return "image_rows" if values.get("as_sequence") == "rows" else cls.KIND

    def loader_workers(self) -> int:
        return self.num_workers

    def missing_split(self, split: str) -> str:
        if self.name == "image_folder":
            folder = Path(self.root).expanduser().resolve() / split
            hint = f"there is no {folder} (<class>/<image> inside)"
            return hint + ("; or set data.val_fraction > 0" if split == "val" else "")
        return super().missing_split(split) if split == "val" else (
            f"this dataset has no {split} split in {self.root}")

    def memory_problem(self, info: Any, memory: int) -> str | None:
        """The crop's padded batch, its gather and its copy, in fp32: a padding of 10**5 is a
        config error, not an allocator's traceback."""
        padding = self.crop_padding if "crop" in self.augment else 0
        if not padding:
            return None
        height, width = info.image_size
        padded = self.batch_size * info.in_channels * (height + 2 * padding) * (width + 2 * padding)
        if padded * 4 * 3 <= memory:
            return None
        return (f"data.crop_padding: {padding} pads each batch of {self.batch_size} "
                f"{height}x{width} images to {height + 2 * padding}x{width + 2 * padding}, about "
                f"{padded * 12 / 2**30:,.0f} GiB, more than the {memory / 2**30:,.0f} GiB here; a "
                "padding of a few pixels (4 for 32x32 images) is usual.")


@register
class TextDataConfig(DataConfig):
    """Text classification: IMDB reviews (aclImdb) or a user's CSV, TSV or JSONL files, split into
    words; the vocabulary comes from the training split only."""

    BUILD: ClassVar[str] = "karpathy_runner.data.text:build"
    KIND: ClassVar[str] = "text"

    name: Literal["imdb", "text_files"] = Field(
        "imdb",
        description="The dataset: imdb (the aclImdb movie reviews, positive or negative, downloaded into "
        "root); text_files (a user's train_file, and optionally val_file and test_file).",
    )
    root: str = Field("data", description="imdb: where aclImdb/ is (or is downloaded to).")
    download: bool = Field(True, description="imdb: download aclImdb into root when it is missing; "
                           "false: a missing one is an error.")
    train_file: str | None = Field(None, description="text_files: the training texts and their labels, "
                                   "a .csv, .tsv or .jsonl file.")
    val_file: str | None = Field(None, description="text_files: the validation texts, in the same format; "
                                 "null: val_fraction of train_file.")
    test_file: str | None = Field(None, description="text_files: the test texts, in the same format; "
                                  "null: no test split.")
    format: Literal["auto", "csv", "tsv", "jsonl"] = Field(
        "auto", description="text_files: the files' format; auto: from each file's extension.")
    text_field: str = Field("text", description="text_files: the column (csv, tsv) or key (jsonl) that "
                            "holds each text.")
    label_field: str = Field("label", description="text_files: the column (csv, tsv) or key (jsonl) that "
                             "holds each label; the classes are the training file's labels.")
    lowercase: bool = Field(True, description="Lowercase the texts before they are split into words.")
    max_vocab: int = Field(20000, ge=3, description="Words kept, most frequent first (with <pad>, <unk>).")
    min_freq: int = Field(1, ge=1, description="Training-split words seen fewer times than this become "
                          "<unk>.")
    max_length: int = Field(400, ge=1, description="Words kept from the start of each text.")
    batch_size: int = Field(64, ge=1, description="Training texts per batch (per optimizer step).")
    eval_batch_size: int | None = Field(None, ge=1, description="Texts per evaluation batch; null: the "
                                        "larger of batch_size and 256.")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="The share of the training texts held "
                                "out at random for validation when there is no val_file; 0: no val split.")
    split_seed: Seed = Field(0, description="The seed of the random validation split, apart from the "
                             "run's seed: every run seed sees the same val set.")
    num_workers: int = Field(0, ge=0, description="DataLoader workers, used when batches stream from the "
                             "host instead of living on the training device.")

    def loader_workers(self) -> int:
        return self.num_workers

    def missing_split(self, split: str) -> str:
        return super().missing_split(split) if split == "val" else (
            f"this dataset has no {split} split in {self.root}")

    @model_validator(mode="after")
    def _files(self) -> TextDataConfig:
        if self.name == "text_files" and not self.train_file:
            raise ValueError(
                "data.train_file: data.name text_files needs the training file, e.g. "
                "--set data.train_file=reviews.csv (CSV, TSV or JSONL)"
            )
        return self


@register
class CharDataConfig(DataConfig):
    """A character corpus for language modelling, split contiguously into train and val and cut
    into windows of seq_len characters."""

    BUILD: ClassVar[str] = "karpathy_runner.data.chars:build"
    KIND: ClassVar[str] = "chars"
    EVAL_BATCH_MIN: ClassVar[int] = 1  # val streams: as many as in training unless set

    name: Literal["python_stdlib", "char_text", "tiny_shakespeare"] = Field(
        "python_stdlib",
        description="The corpus: python_stdlib (the running interpreter's standard library sources: no "
        "download); char_text (a user's UTF-8 text file, path); tiny_shakespeare (downloaded into root).",
    )
    root: str = Field("data", description="tiny_shakespeare: where it is (or is downloaded to).")
    download: bool = Field(True, description="tiny_shakespeare: download it into root when it is missing; "
                           "false: a missing one is an error.")
    path: str | None = Field(None, description="char_text: the text file (UTF-8).")
    max_chars: int | None = Field(2_000_000, ge=2, description="The corpus is cut to its first max_chars "
                                  "characters; null: all of it.")
    seq_len: int = Field(100, ge=1, description="Characters per window (and per backprop through time).")
    batch_size: int = Field(64, ge=1, description="Windows per batch: parallel streams through the corpus.")
    eval_batch_size: int | None = Field(None, ge=1, description="Streams through the val split; null: "
                                        "batch_size.")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="The corpus's last part, held out for "
                                "validation.")

    def missing_split(self, split: str) -> str:
        return f"this dataset has no {split} split in {self.root}"

    @model_validator(mode="after")
    def _path(self) -> CharDataConfig:
        if self.name == "char_text" and not self.path:
            raise ValueError(
                "data.path: data.name char_text needs a text file, e.g. --set data.path=book.txt"
            )
        return self


class SegmentationData(DataConfig):
    """What the segmentation data families share: images and their masks of class indices,
    resized to one square size and held in memory, batches augmented on the device."""

    KIND: ClassVar[str] = "segmentation"
    EVAL_BATCH_MIN: ClassVar[int] = 1  # a batch of masks' logits is large: as in training unless set

    batch_size: int = Field(16, ge=1, description="Training images per batch (per optimizer step).")
    eval_batch_size: int | None = Field(None, ge=1, description="Images per evaluation batch; null: "
                                        "batch_size.")
    augment: list[Literal["crop", "flip"]] = Field(
        default_factory=list,
        description="Training augmentations, the same for an image and its mask: crop (a random crop "
        "of the image padded with crop_padding pixels on each side: black in the image, the ignore "
        "index 255 in the mask), flip (a horizontal flip, half the time).",
    )
    crop_padding: int = Field(8, ge=0, description="crop: pixels added on each side before the random "
                              "crop back to the image's size.")

    def memory_problem(self, info: Any, memory: int) -> str | None:
        """The crop's padded batch in fp32, as for image classification: a huge padding is a
        config error, not an allocator's traceback."""
        padding = self.crop_padding if "crop" in self.augment else 0
        side = info.image_size[0] + 2 * padding
        padded = self.batch_size * 4 * side * side  # 3 colour planes and the mask
        if not padding or padded * 4 * 3 <= memory:
            return None
        return (f"data.crop_padding: {padding} pads each batch of {self.batch_size} images to "
                f"{side}x{side}, about {padded * 12 / 2**30:,.0f} GiB, more than the "
                f"{memory / 2**30:,.0f} GiB here; a padding of an eighth of the image is usual.")


@register
class SegmentationDataConfig(SegmentationData):
    """Semantic segmentation data: Pascal VOC (torchvision downloads it) or a user's folder of
    images/ and masks/. A mask is a PNG of class indices, 255 where no class counts."""

    BUILD: ClassVar[str] = "karpathy_runner.data.segmentation:build"

    name: Literal["voc", "segmentation_folder"] = Field(
        "voc",
        description="The dataset: voc (Pascal VOC's segmentation split: 21 classes, background "
        "included; root/VOCdevkit/VOC<year>, downloaded by torchvision); segmentation_folder (a user's "
        "root/images/<name>.jpg|png with root/masks/<name>.png).",
    )
    root: str = Field("data", description="voc: the folder that holds VOCdevkit/ (or gets it); "
                      "segmentation_folder: the folder that holds images/ and masks/.")
    year: Literal["2007", "2008", "2009", "2010", "2011", "2012"] = Field(
        "2012", description="voc: which year's release.")
    download: bool = Field(True, description="voc: download the release into root when it is missing "
                           "(2 GB for 2012); false: a missing one is an error naming what is expected.")
    image_size: int = Field(256, ge=16, le=4096, description="The side every image and mask is resized "
                            "to (square; masks by nearest neighbour) and the metrics are measured at.")
    class_names: list[str] | None = Field(
        None, description="segmentation_folder: the names of classes 0, 1, ...; null: the class "
        "indices. voc: its own 21 names.")
    num_classes: int | None = Field(
        None, ge=2, le=255, description="segmentation_folder: how many classes the masks hold (indices "
        "0 .. num_classes-1; 255 is ignored); null: len(class_names), else the largest index in the "
        "masks plus one.")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="segmentation_folder: the share of "
                                "the pairs held out at random for validation (voc has its own val list); "
                                "0: no val split.")
    split_seed: Seed = Field(0, description="The seed of the random validation split, apart from the "
                             "run's seed: every run seed sees the same val set.")

    def missing_split(self, split: str) -> str:
        if split == "val" and self.name == "segmentation_folder":
            return super().missing_split(split)
        return (f"this dataset has no {split} split"
                + ("; Pascal VOC's test masks are not published: use val" if self.name == "voc" else ""))

    @model_validator(mode="after")
    def _classes(self) -> SegmentationDataConfig:
        names, count = self.class_names, self.num_classes
        if names is not None and count is not None and len(names) != count:
            raise ValueError(f"data.class_names has {len(names)} names but data.num_classes is {count}; "
                             "give one name per class, or leave one of them out")
        if names is not None and len(names) < 2:
            raise ValueError("data.class_names: a segmentation needs two or more classes (the "
                             "background is one)")
        return self


@register
class ShapesDataConfig(SegmentationData):
    """Offline segmentation data: images of rectangles, ellipses and triangles of several colours
    and sizes, drawn from data_seed and written once into root in Pascal VOC's layout (JPEG images,
    palette PNG masks, ImageSets lists, box annotations as VOC XML and COCO JSON), then read back
    as any VOC folder is. Classes: background, rectangle, ellipse, triangle."""

    BUILD: ClassVar[str] = "karpathy_runner.data.shapes:build"

    name: Literal["shapes"] = Field("shapes", description="The generated shapes dataset.")
    root: str = Field("data/shapes", description="The folder the images are written to once and read "
                      "from after; kdl never writes over a folder it did not make (kdl-shapes.json "
                      "marks its own).")
    data_seed: Seed = Field(0, description="The seed the images are drawn from, apart from the run's "
                            "seed: every run seed sees the same images.")
    train_images: int = Field(2000, ge=1, le=1_000_000, description="Images in the train split.")
    val_images: int = Field(200, ge=1, le=1_000_000, description="Images in the val split.")
    test_images: int = Field(200, ge=0, le=1_000_000, description="Images in the test split (0: none).")
    image_size: int = Field(64, ge=16, le=1024, description="The images' side in pixels (square).")
    max_shapes: int = Field(4, ge=1, le=8, description="At most this many shapes per image (at least "
                            "one), none overlapping.")

    def missing_split(self, split: str) -> str:
        return "data.test_images is 0; set data.test_images > 0 to have one"

    annotations: Literal["masks", "boxes"] = Field(
        "masks", description="What the images are labelled with: masks (a class for every pixel, for "
        "the segment task) or boxes (each shape's box and class from the VOC XML files, for the detect "
        "task).")

    @classmethod
    def kind_of(cls, values: dict[str, Any]) -> str:
        return "detection" if values.get("annotations") == "boxes" else cls.KIND


@register
class DetectionDataConfig(SegmentationData):
    """Object detection data: images with boxes and their classes, as COCO instances JSON or
    Pascal VOC XML. Images are resized to one square size (the boxes with them) and held in
    memory; an image without boxes is trained on as background."""

    KIND: ClassVar[str] = "detection"
    BUILD: ClassVar[str] = "karpathy_runner.data.detection:build"

    name: Literal["coco", "voc_detection"] = Field(
        "coco",
        description="The dataset: coco (COCO instances JSON files: train_annotations with the images in "
        "train_images, and the same for val); voc_detection (a Pascal VOC folder, root/VOCdevkit/VOC<year> "
        "or root itself: JPEGImages/, Annotations/<name>.xml, ImageSets/Main/{train,val}.txt).",
    )
    root: str = Field("data", description="voc_detection: the folder that holds VOCdevkit/VOC<year>/ "
                      "(or JPEGImages/ and Annotations/ itself); coco: the folder the relative paths "
                      "below are read from.")
    year: Literal["2007", "2008", "2009", "2010", "2011", "2012"] = Field(
        "2012", description="voc_detection: which year's release under root/VOCdevkit.")
    train_annotations: str = Field("annotations/instances_train2017.json", description="coco: the "
                                   "training split's instances JSON.")
    train_images: str = Field("train2017", description="coco: the folder of the training images.")
    val_annotations: str | None = Field("annotations/instances_val2017.json", description="coco: the "
                                        "validation split's instances JSON; null: no val split.")
    val_images: str = Field("val2017", description="coco: the folder of the validation images.")
    image_size: int = Field(320, ge=16, le=4096, description="The side every image is resized to "
                            "(square; its boxes scaled with it).")
    max_images: int | None = Field(None, ge=1, description="Read at most this many images of each "
                                   "split (the first, in the file's order); null: all.")
    batch_size: int = Field(8, ge=1, description="Training images per batch (per optimizer step).")

    def missing_split(self, split: str) -> str:
        if split == "val" and self.name == "coco":
            return "data.val_annotations is null; set it to a COCO instances JSON to have one"
        return f"this dataset has no {split} split"
