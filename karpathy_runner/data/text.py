"""Text classification data: IMDB movie reviews (aclImdb) or a user's CSV, TSV or JSONL files.

imdb reads the aclImdb layout under data.root: aclImdb/{train,test}/{neg,pos}/*.txt, one UTF-8
review per file (train/unsup, the unlabelled reviews, is ignored). Classes are ["neg", "pos"],
the `<br />` line breaks in the reviews become spaces, test/ is the test split and val is
data.val_fraction of train/, chosen by data.split_seed. With data.download: true a missing
aclImdb/ is downloaded (about 80 MB) and extracted into data.root.

text_files reads data.train_file and the optional data.val_file (else data.val_fraction of the
training file) and data.test_file. The format is data.format, or with auto the extension: .csv
and .tsv need a header row and are read by the csv module; .jsonl (or .json-lines) holds one JSON
object per line, blank lines skipped. Each row gives data.text_field and data.label_field. Labels
are compared as text (JSON 1 and "1" are one class); the classes are the training file's labels,
sorted, and a val or test label outside them is an error.

Texts are split into words and punctuation marks (lowercased with data.lowercase) and cut to
their first data.max_length tokens. The vocabulary comes from the training split only (after val
is taken out), so that val and test measure how a model copes with words it never saw: index 0 is
<pad>, 1 is <unk>, then words seen at least data.min_freq times, most frequent first (ties in
alphabetical order), data.max_vocab entries in all. A run's saved vocabulary, when handed in, is
used as it is, so a checkpoint always meets the token ids it was trained on.
"""

from __future__ import annotations

import csv
import difflib
import itertools
import json
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config.data import TextDataConfig
from ..errors import KdlError, quoted, what_is
from .base import BatchDataset, DataBundle, DataInfo, Preprocessing, download, split_off

PAD, UNK = "<pad>", "<unk>"
TOKEN = re.compile(r"\w+|[^\w\s]")
LINE_BREAK = re.compile(r"<br\s*/?>")  # the reviews keep the site's HTML line breaks

IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
IMDB_MD5 = "7c2ac02c03563afcf9b574c7e56c153a"
IMDB_CLASSES = ["neg", "pos"]

EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json-lines": "jsonl"}
DELIMITERS = {"csv": ",", "tsv": "\t"}

Texts = tuple[list[str], list[str]]  # (texts, labels), labels as text
Tokenized = tuple[list[list[str]], list[str]]  # (tokens of each text, labels)
Files = tuple[Texts, Texts | None, Texts | None]  # train, val, test


class TextDataset(BatchDataset):
    """Token ids of all texts end to end, int64 (total,), text i at offsets[i]:offsets[i + 1],
    and int64 labels (N,). Plain tensors, so DataLoader workers can receive it pickled."""

    def __init__(self, tokens: torch.Tensor, offsets: torch.Tensor, labels: torch.Tensor):
        assert len(offsets) == len(labels) + 1, (offsets.shape, labels.shape)
        self.tokens = tokens
        self.offsets = offsets
        self.labels = labels

    @classmethod
    def from_ids(cls, sequences: list[list[int]], labels: list[int]) -> TextDataset:
        lengths = torch.tensor([0] + [len(ids) for ids in sequences], dtype=torch.int64)
        # numpy reads an iterator of millions of ints several times faster than torch.tensor
        flat = np.fromiter(itertools.chain.from_iterable(sequences), dtype=np.int64, count=int(lengths.sum()))
        return cls(torch.from_numpy(flat), lengths.cumsum(0), torch.tensor(labels, dtype=torch.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens (B, T) padded with <pad> to the longest text in the batch, lengths (B,),
        labels (B,)), all int64."""
        starts = self.offsets[indices]
        lengths = self.offsets[indices + 1] - starts
        steps = torch.arange(int(lengths.max()))  # (T,)
        inside = steps[None, :] < lengths[:, None]  # (B, T)
        positions = torch.where(inside, starts[:, None] + steps[None, :], 0)
        tokens = self.tokens[positions].masked_fill_(~inside, 0)
        return tokens, lengths, self.labels[indices]


class TextPrep:
    """Tokens and labels to the device; lengths stay on the CPU, where pack_padded_sequence
    wants them. Text has no augmentation, so the step is unused."""

    def __init__(self, device: torch.device | None = None):
        self.device = torch.device("cpu") if device is None else device

    def to(self, device: torch.device) -> TextPrep:
        return TextPrep(device)

    def __call__(self, batch: tuple[torch.Tensor, ...], step: int | None) -> tuple[torch.Tensor, ...]:
        tokens, lengths, labels = batch
        return (tokens.to(self.device, non_blocking=True), lengths,
                labels.to(self.device, non_blocking=True))


def build(cfg: TextDataConfig, seed: int, vocabulary: list[str] | None,
          preprocessing: Preprocessing | None) -> DataBundle:
    """Build train/val/test for `cfg.name`; `vocabulary` (a run's saved one) replaces the one
    built from the training split."""
    if cfg.name == "imdb":
        files, classes = _read_imdb(cfg), IMDB_CLASSES
    else:
        files, classes = _read_text_files(cfg)
    train, val, test = (_tokenized(split, cfg) for split in files)
    if val is None and cfg.val_fraction > 0:
        train, val = _split_val(train, cfg)
    if vocabulary is None:
        vocabulary = build_vocabulary(train[0], cfg.min_freq, cfg.max_vocab)
    else:
        vocabulary = _checked(vocabulary)
    index = {word: i for i, word in enumerate(vocabulary)}
    class_index = {name: i for i, name in enumerate(classes)}
    train, val, test = (_encode(split, index, class_index) for split in (train, val, test))
    info = DataInfo(kind=TextDataConfig.KIND, num_classes=len(classes), class_names=list(classes),
                    vocabulary=list(vocabulary))
    return DataBundle(train=train, val=val, test=test, info=info, prepare=TextPrep(),
                      inputs=TextInputs(cfg, info.vocabulary))


class TextInputs:
    """`kdl predict`'s texts: each argument, or for an argument naming a file, each non-empty
    line of it, and for one naming a folder, each of its .txt files whole (one text per file, as
    aclImdb keeps its reviews, shown by its path); encoded with the run's vocabulary, as its
    training texts were."""

    def __init__(self, cfg: TextDataConfig, vocabulary: list[str]):
        self.cfg, self.vocabulary = cfg, vocabulary

    def items(self, given: list[str]) -> Sequence[str | Path]:
        texts: list[str | Path] = []
        for item in given:
            path = Path(item).expanduser()
            if path.is_file():
                texts += [line.strip() for line in _read_utf8(path, item).splitlines() if line.strip()]
            elif path.is_dir():
                files = sorted(p for p in path.iterdir() if p.suffix == ".txt" and p.is_file())
                if not files:
                    raise KdlError(f"{item}: the folder holds no .txt files; kdl predict reads each "
                                   "of a folder's .txt files as one text")
                texts += files  # read in batch(); shown by their paths
            elif path.exists():
                raise KdlError(f"{item} is {what_is(path)}: give texts, text files or folders of them")
            else:
                texts.append(item)
        if not texts:
            raise KdlError("no text to classify: the files given are empty")
        return texts

    def batch(self, items: Sequence[str | Path]) -> tuple[torch.Tensor, ...]:
        texts = [_read_utf8(item, str(item)) if isinstance(item, Path) else item for item in items]
        return encode_texts(texts, self.cfg, self.vocabulary).get_batch(torch.arange(len(texts)))


def _read_utf8(path: Path, item: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KdlError(f"{item}: cannot read it as UTF-8 text ({exc})") from None


def tokenize(text: str, cfg: TextDataConfig) -> list[str]:
    """Words and single punctuation marks, the first cfg.max_length of them."""
    return TOKEN.findall(text.lower() if cfg.lowercase else text)[: cfg.max_length]


def _tokenized(split: Texts | None, cfg: TextDataConfig) -> Tokenized | None:
    return None if split is None else ([tokenize(text, cfg) for text in split[0]], split[1])


def build_vocabulary(texts: list[list[str]], min_freq: int, max_vocab: int) -> list[str]:
    """<pad>, <unk>, then words seen at least min_freq times, most frequent first, ties
    alphabetical (so the same texts always give the same ids), max_vocab entries in all."""
    counts: Counter[str] = Counter()
    for tokens in texts:
        counts.update(tokens)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    words = [word for word, count in ranked if count >= min_freq]
    return [PAD, UNK] + words[: max_vocab - 2]


def _split_val(train: Tokenized, cfg: TextDataConfig) -> tuple[Tokenized, Tokenized]:
    kept, held = split_off(len(train[1]), cfg.val_fraction, cfg.split_seed)

    def pick(indices: torch.Tensor) -> Tokenized:
        return [train[0][i] for i in indices.tolist()], [train[1][i] for i in indices.tolist()]

    return pick(kept), pick(held)


def _checked(vocabulary: list[str]) -> list[str]:
    if list(vocabulary[:2]) != [PAD, UNK]:
        raise KdlError(
            f"the run's saved vocabulary (vocab.json) must start with {PAD!r}, {UNK!r}, but starts "
            f"with {list(vocabulary[:2])}; it is damaged or was written by something else. Fix: "
            "restore vocab.json from the run, or train again to make a new one."
        )
    return list(vocabulary)


def encode_texts(texts: list[str], cfg: TextDataConfig, vocabulary: list[str]) -> TextDataset:
    """New texts as a run's data encoded its training texts (`kdl predict`); labels are 0."""
    index = {word: i for i, word in enumerate(vocabulary)}
    return _encode(([tokenize(text, cfg) for text in texts], ["0"] * len(texts)), index, {"0": 0})


def _encode(split: Tokenized | None, index: dict[str, int],
            class_index: dict[str, int]) -> TextDataset | None:
    if split is None:
        return None
    texts, labels = split
    # an empty text becomes one <unk>: packed sequences need at least one step
    ids = [[index.get(word, 1) for word in tokens] or [1] for tokens in texts]
    return TextDataset.from_ids(ids, [class_index[label] for label in labels])


# ----------------------------------------------------------------------------- imdb


def _read_imdb(cfg: TextDataConfig) -> Files:
    root = Path(cfg.root).expanduser().resolve()
    folder = root / "aclImdb"
    if not folder.is_dir():
        if not cfg.download:
            raise KdlError(
                f"dataset 'imdb' not found: {folder} does not exist (expected aclImdb/train/pos, "
                f"train/neg, test/pos, test/neg with one .txt review each). Fix: set data.download: "
                f"true (needs network), or put the aclImdb folder under {root} (data.root)."
            )
        _download_imdb(root)
    return _read_imdb_split(folder / "train"), None, _read_imdb_split(folder / "test")


def _download_imdb(root: Path) -> None:
    from torchvision.datasets import utils  # only here: importing torchvision costs seconds

    download("imdb", IMDB_URL, root, f"{root / 'aclImdb'} holds train/ and test/ (the archive, extracted)",
             lambda: utils.download_and_extract_archive(IMDB_URL, download_root=str(root), md5=IMDB_MD5))


def _read_imdb_split(folder: Path) -> Texts:
    texts, labels = [], []
    for name in IMDB_CLASSES:
        files = sorted((folder / name).glob("*.txt"))
        if not files:
            raise KdlError(
                f"dataset 'imdb': no reviews in {folder / name} (expected one .txt file per review). "
                f"Fix: restore the complete aclImdb folder, or delete it and set data.download: true."
            )
        texts += [LINE_BREAK.sub(" ", path.read_text(encoding="utf-8")) for path in files]
        labels += [name] * len(files)
    return texts, labels


# ----------------------------------------------------------------------------- text files


def _read_text_files(cfg: TextDataConfig) -> tuple[Files, list[str]]:
    train_path = _path(cfg.train_file)
    train = _read_table(train_path, "data.train_file", cfg)
    classes = sorted(set(train[1]))
    if len(classes) < 2:
        raise KdlError(
            f"data.train_file: every text in {train_path} has the label {quoted(classes[0])} (column "
            f"{cfg.label_field!r}): a classifier needs two or more labels. Fix: the right file, or "
            f"data.label_field naming the column of the labels."
        )
    val = _read_held(cfg.val_file, "data.val_file", cfg, classes, train_path)
    test = _read_held(cfg.test_file, "data.test_file", cfg, classes, train_path)
    return (train, val, test), classes


def _read_held(file: str | None, key: str, cfg: TextDataConfig, classes: list[str],
               train_path: Path) -> Texts | None:
    """A val or test file, whose labels must all be training labels: a model can never predict
    a class it was not trained on, so such a label is a mistake in the files."""
    if file is None:
        return None
    path = _path(file)
    held = _read_table(path, key, cfg)
    unseen = sorted(set(held[1]) - set(classes))
    if unseen:
        raise KdlError(
            f"{key}: {path} has labels that never appear in the training file {train_path} "
            f"(data.train_file): {', '.join(map(repr, unseen))}. Training labels: "
            f"{', '.join(map(repr, classes))}. Fix the labels, or add training examples of them."
        )
    return held


def _path(file: str) -> Path:
    return Path(file).expanduser().resolve()


def _read_table(path: Path, key: str, cfg: TextDataConfig) -> Texts:
    if not path.is_file():
        raise KdlError(
            f"{key}: {path} does not exist. Fix: correct the path (relative paths start from the "
            f"folder kdl runs in, {Path.cwd()})."
        )
    file_format = _format(path, key, cfg.format)
    try:
        # utf-8-sig: spreadsheet programs often start CSV files with a byte-order mark
        with path.open(encoding="utf-8-sig", newline="") as handle:
            if file_format == "jsonl":
                texts = _read_jsonl(handle, path, key, cfg)
            else:
                texts = _read_csv(handle, path, key, file_format, cfg)
    except UnicodeDecodeError as exc:
        raise KdlError(f"{key}: {path} is not UTF-8 text ({exc.reason} at byte {exc.start}). "
                       "Fix: save it as UTF-8.") from exc
    if not texts[0]:
        raise KdlError(f"{key}: {path} has no rows. Fix: point {key} at a file with one text and "
                       f"label per row ({_format_note(file_format)}).")
    return texts


def _format(path: Path, key: str, configured: str) -> str:
    if configured != "auto":
        return configured
    suffix = path.suffix.lower()
    if suffix not in EXTENSIONS:
        raise KdlError(
            f"{key}: cannot tell the format of {path} from its extension {suffix or '(none)'!r}. "
            f"Fix: rename it to .csv, .tsv or .jsonl, or set data.format: csv, tsv or jsonl."
        )
    return EXTENSIONS[suffix]


def _format_note(file_format: str) -> str:
    if file_format == "jsonl":
        return "JSONL: one JSON object per line"
    return f"{file_format.upper()}: a header row naming the columns, then one row per text"


def _read_csv(handle: Any, path: Path, key: str, file_format: str, cfg: TextDataConfig) -> Texts:
    reader = csv.DictReader(handle, delimiter=DELIMITERS[file_format])
    texts, labels = [], []
    try:
        columns = reader.fieldnames or []
        for field, setting in ((cfg.text_field, "data.text_field"), (cfg.label_field, "data.label_field")):
            if columns and field not in columns:
                raise _missing_field(path, key, field, setting, columns, "column")
        for row in reader:
            text, label = row[cfg.text_field], row[cfg.label_field]
            if text is None or label is None:
                raise KdlError(f"{key}: {path} line {reader.line_num} has fewer values than the header "
                               "row. Fix that line (quote values that contain the delimiter).")
            texts.append(text)
            labels.append(_label(label, path, key, reader.line_num, cfg))
    except csv.Error as exc:
        raise KdlError(f"{key}: {path} line {reader.line_num} is not valid "
                       f"{file_format.upper()}: {exc}. Fix that line.") from exc
    return texts, labels


def _read_jsonl(handle: Any, path: Path, key: str, cfg: TextDataConfig) -> Texts:
    texts, labels = [], []
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise KdlError(f"{key}: {path} line {number} is not valid JSON ({exc.msg}, column "
                           f"{exc.colno}). Fix that line: JSONL holds one JSON object per line.") from exc
        except RecursionError:
            raise KdlError(f"{key}: {path} line {number} is nested too deeply to read. Fix that "
                           "line: JSONL holds one JSON object per line, a text and a label.") from None
        text, label = _jsonl_row(row, path, key, number, cfg)
        texts.append(text)
        labels.append(label)
    return texts, labels


def _jsonl_row(row: Any, path: Path, key: str, number: int, cfg: TextDataConfig) -> tuple[str, str]:
    if not isinstance(row, dict):
        raise KdlError(f"{key}: {path} line {number} holds a JSON {type(row).__name__}, not an "
                       f"object. Fix that line: each line is an object such as "
                       f'{{"{cfg.text_field}": "...", "{cfg.label_field}": "..."}}.')
    for field, setting in ((cfg.text_field, "data.text_field"), (cfg.label_field, "data.label_field")):
        if field not in row:
            raise _missing_field(path, f"{key} line {number}", field, setting, list(row), "key")
    text = row[cfg.text_field]
    if not isinstance(text, str):
        raise KdlError(f"{key}: {path} line {number}: {cfg.text_field!r} (data.text_field) is "
                       f"{json.dumps(text)}, not a string. Fix that line.")
    return text, _label(row[cfg.label_field], path, key, number, cfg)


def _label(value: Any, path: Path, key: str, line: int, cfg: TextDataConfig) -> str:
    """Labels as text, so that a JSON 1, a JSON "1" and a CSV 1 are one class."""
    if value is None or value == "" or isinstance(value, (list, dict)):
        raise KdlError(f"{key}: {path} line {line} has no usable label ({cfg.label_field!r}, "
                       f"data.label_field, is {json.dumps(value)}). Fix that line or remove it.")
    return value if isinstance(value, str) else json.dumps(value)


def _missing_field(path: Path, where: str, field: str, setting: str, columns: list[str],
                   noun: str) -> KdlError:
    close = difflib.get_close_matches(field, columns, n=1)
    fix = (f"Did you mean {close[0]!r}? Fix: --set {setting}={close[0]}" if close
           else f"Fix: set {setting} to one of them")
    return KdlError(
        f"{where}: {path} has no {noun} {field!r} ({setting}); its {noun}s are: "
        f"{', '.join(columns) or '(none)'}. {fix}, or rename the {noun} in the file."
    )
