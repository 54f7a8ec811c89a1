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

    name: Literal["digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "image_folder"] = (
        "digits"
    )
    root: str = "data"
    download: bool = True
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int | None = Field(None, ge=1)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    split_seed: Seed = 0
    augment: list[Literal["crop", "flip"]] = Field(default_factory=list)
    crop_padding: int = Field(4, ge=0)
    image_size: int = Field(32, ge=4)
    # device: the decoded images live on the training device, batches are cut and augmented
    # there; stream: batches are gathered on the host (by num_workers DataLoader workers) and
    # copied over; auto: device for datasets held in memory that fit, stream for image_folder
    placement: Literal["auto", "device", "stream"] = "auto"
    num_workers: int = Field(0, ge=0)  # DataLoader workers of the stream placement
    skip_bad_files: bool = False  # image_folder: leave out (and count) files that do not decode
    # rows: each image is a sequence of its rows (H steps of C x W values), for recurrent models
    as_sequence: Literal["none", "rows"] = "none"

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

    name: Literal["imdb", "text_files"] = "imdb"
    root: str = "data"  # imdb: where aclImdb/ is (or is downloaded to)
    download: bool = True
    train_file: str | None = None  # text_files: .csv, .tsv or .jsonl
    val_file: str | None = None  # else val_fraction of train_file
    test_file: str | None = None
    format: Literal["auto", "csv", "tsv", "jsonl"] = "auto"  # auto: from the file's extension
    text_field: str = "text"
    label_field: str = "label"
    lowercase: bool = True
    max_vocab: int = Field(20000, ge=3)  # words kept, most frequent first (with <pad>, <unk>)
    min_freq: int = Field(1, ge=1)  # rarer words become <unk>
    max_length: int = Field(400, ge=1)  # words kept from the start of each text
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int | None = Field(None, ge=1)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    split_seed: Seed = 0
    num_workers: int = Field(0, ge=0)

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

    name: Literal["python_stdlib", "char_text", "tiny_shakespeare"] = "python_stdlib"
    root: str = "data"  # tiny_shakespeare: where it is (or is downloaded to)
    download: bool = True
    path: str | None = None  # char_text: the text file (UTF-8)
    max_chars: int | None = Field(2_000_000, ge=2)  # the corpus is cut to its first max_chars
    seq_len: int = Field(100, ge=1)  # characters per window (and per backprop through time)
    batch_size: int = Field(64, ge=1)  # windows per batch: parallel streams through the corpus
    eval_batch_size: int | None = Field(None, ge=1)
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)  # the corpus's last part

    def missing_split(self, split: str) -> str:
        return f"this dataset has no {split} split in {self.root}"

    @model_validator(mode="after")
    def _path(self) -> CharDataConfig:
        if self.name == "char_text" and not self.path:
            raise ValueError(
                "data.path: data.name char_text needs a text file, e.g. --set data.path=book.txt"
            )
        return self
