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
