"""Character corpora for language modelling, served as windows of parallel streams.

Corpora (each one Python str, cut to its first `data.max_chars` characters):
- `python_stdlib`: the running interpreter's own standard library `.py` files (no site-packages
  or dist-packages), in sorted order of their path, each after a `# ---- <path> ----` line. It
  needs no download and is the same on every run of the same Python.
- `char_text`: a UTF-8 text file of the user's (`data.path`).
- `tiny_shakespeare`: karpathy/char-rnn's tinyshakespeare `input.txt` under `data.root`,
  downloaded (md5 checked) when `data.download` is true.

The corpus is split contiguously: its last `val_fraction` is val, so val is text the model never
saw, not windows interleaved with training ones; there is no test split. The vocabulary is the
training text's distinct characters, sorted by code point, after index 0, which stands for any
character the training text lacks; a run's saved vocabulary is used instead when given.

Stream layout: a split's ids (length N) are cut into B contiguous streams of L = N // B
characters (B is the batch size), and each stream into W = (L - 1) // seq_len windows of seq_len
inputs plus the next-character targets. Item i is window i // B of stream i % B. Read in order,
in chunks of B, batch j is window j of every stream, so row s of batch j + 1 continues row s of
batch j and an RNN can carry its hidden state across batches (truncated backprop through time);
read shuffled, the same items are random windows. The ids stay one int64 tensor, on the training
device after `to(device)`, and a batch is cut from it by index arithmetic.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import numpy as np
import torch

from ..config.data import CharDataConfig
from ..errors import KdlError, what_is
from .base import BatchDataset, DataBundle, DataInfo, Preprocessing, download, eval_batch_size

UNKNOWN = "\ufffd"  # vocabulary[0]: any character the training text lacks
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_MD5 = "6fb458f1232090904fb40fe944165e91"
SHAKESPEARE_FOLDER = "tiny_shakespeare"
SHAKESPEARE_FILE = "input.txt"
_SKIPPED_FOLDERS = {"site-packages", "dist-packages"}


class CharStreams(BatchDataset):
    """A split's character ids as B parallel streams of seq_len windows (see the module doc)."""

    def __init__(self, ids: torch.Tensor, streams: int, seq_len: int):
        assert ids.dtype == torch.int64 and ids.ndim == 1, (ids.dtype, ids.shape)
        self.ids = ids
        self.streams = streams
        self.seq_len = seq_len
        self.stream_len = len(ids) // streams
        self.windows = (self.stream_len - 1) // seq_len

    def __len__(self) -> int:
        return self.windows * self.streams

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), both int64 (b, seq_len) on the ids' device; targets are the
        inputs shifted by one character."""
        indices = indices.to(self.ids.device)
        stream, window = indices % self.streams, indices // self.streams
        starts = stream * self.stream_len + window * self.seq_len
        offsets = torch.arange(self.seq_len + 1, device=self.ids.device)
        chunk = self.ids[starts.unsqueeze(1) + offsets]  # (b, seq_len + 1)
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()

    def to(self, device: torch.device) -> CharStreams:
        self.ids = self.ids.to(device)
        return self


class CharPrep:
    """Moves (inputs, targets) to the device; characters need no scaling or augmentation."""

    def __init__(self, device: torch.device | None = None):
        self.device = torch.device("cpu") if device is None else device

    def to(self, device: torch.device) -> CharPrep:
        return CharPrep(device)

    def __call__(self, batch: tuple[torch.Tensor, ...], step: int | None) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(self.device, non_blocking=True) for t in batch)


def build(cfg: CharDataConfig, seed: int, vocabulary: list[str] | None,
          preprocessing: Preprocessing | None) -> DataBundle:
    """Train and val streams of the corpus named by `cfg.name`; `vocabulary` (a run's saved
    one) replaces the one built from the training text."""
    text, source = load_corpus(cfg)
    if not text:
        raise KdlError(
            f"the character corpus from {source} is empty. Fix: use a file with text in it "
            f"(data.path), or another data.name"
        )
    num_val = round(len(text) * cfg.val_fraction)
    train_text, val_text = text[: len(text) - num_val], text[len(text) - num_val :]
    if vocabulary is None:
        vocabulary = build_vocabulary(train_text)
    splits = []
    for split, part, streams, key in [
        ("train", train_text, cfg.batch_size, "data.batch_size"),
        ("val", val_text, eval_batch_size(cfg), "data.eval_batch_size"),
    ]:
        _check_fits(cfg, source, split, len(part), streams, key)
        splits.append(CharStreams(encode(part, vocabulary), streams, cfg.seq_len))
    info = DataInfo(
        kind=CharDataConfig.KIND,
        num_classes=len(vocabulary),
        class_names=vocabulary,
        vocabulary=vocabulary,
    )
    # a corpus of a few million characters always fits: its windows are cut on the device
    return DataBundle(train=splits[0], val=splits[1], test=None, info=info, prepare=CharPrep(),
                      placement="device")


def build_vocabulary(train_text: str) -> list[str]:
    """UNKNOWN, then the training text's distinct characters by code point (UNKNOWN once, even
    when the text holds it, e.g. from undecodable bytes)."""
    return [UNKNOWN] + sorted(set(train_text) - {UNKNOWN})


def encode(text: str, vocabulary: list[str]) -> torch.Tensor:
    """Each character's vocabulary index, 0 for characters not in it; int64 (len(text),).

    Vectorised (a sorted search over code points): 0.07 s for 2 million characters, where a
    Python loop over them takes 0.5 s, paid by every command that loads the run's data."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    first_index: dict[int, int] = {}  # a repeated entry keeps its first index
    for index, ch in enumerate(vocabulary):
        if len(ch) == 1:
            first_index.setdefault(ord(ch), index)
    if not first_index:
        return torch.zeros(len(codes), dtype=torch.int64)
    keys = np.array(sorted(first_index), dtype=np.int64)
    values = np.array([first_index[key] for key in keys.tolist()], dtype=np.int64)
    position = np.minimum(np.searchsorted(keys, codes), len(keys) - 1)
    return torch.from_numpy(np.where(keys[position] == codes, values[position], 0))


def _check_fits(
    cfg: CharDataConfig, source: str, split: str, length: int, streams: int, key: str
) -> None:
    """Each of the split's streams must hold one window plus its last target."""
    if length // streams >= cfg.seq_len + 1:
        return
    needed = streams * (cfg.seq_len + 1)
    raise KdlError(
        f"the {split} split of {source} has {length} characters, too few for one window of "
        f"data.seq_len={cfg.seq_len} in each of {streams} streams ({key}={streams}), which "
        f"needs {needed}. Fix: lower data.seq_len or {key}, or use a longer corpus "
        f"(data.max_chars, another file) or a larger data.val_fraction."
    )


# ----------------------------------------------------------------------------- corpora


def load_corpus(cfg: CharDataConfig) -> tuple[str, str]:
    """(text cut to max_chars, where it came from, for messages)."""
    if cfg.name == "python_stdlib":
        folder = Path(sysconfig.get_paths()["stdlib"])
        return python_stdlib_text(folder, cfg.max_chars), f"the Python standard library at {folder}"
    if cfg.name == "char_text":
        path = Path(cfg.path).expanduser().resolve()
        fix = "point data.path at a UTF-8 text file"
        return read_text(path, cfg.max_chars, fix), str(path)
    path = _tiny_shakespeare_file(cfg)
    fix = f"delete it and set data.download: true, or put the published {SHAKESPEARE_FILE} there"
    return read_text(path, cfg.max_chars, fix), str(path)


def python_stdlib_text(folder: Path, max_chars: int | None) -> str:
    """The stdlib's .py files under `folder`, each after a line naming it, cut at max_chars.
    Files past the cap are never read."""
    parts: list[str] = []
    total = 0
    for relative in stdlib_files(folder):
        if max_chars is not None and total >= max_chars:
            break
        header = f"# ---- {relative} ----\n"
        body = (folder / relative).read_bytes().decode("utf-8", errors="replace")
        parts += [header, body]
        total += len(header) + len(body)
    text = "".join(parts)
    return text if max_chars is None else text[:max_chars]


def stdlib_files(folder: Path) -> list[str]:
    """POSIX paths, relative to `folder`, of its .py files outside site-/dist-packages, sorted."""
    found = []
    for directory, subfolders, files in os.walk(folder):
        # pruned in place, so os.walk never enters installed packages
        subfolders[:] = [name for name in subfolders if name not in _SKIPPED_FOLDERS]
        relative = Path(directory).relative_to(folder)
        found += [(relative / name).as_posix() for name in files if name.endswith(".py")]
    return sorted(found)


def read_text(path: Path, max_chars: int | None, fix: str) -> str:
    """A UTF-8 file's first max_chars characters, line endings kept as they are."""
    if not path.exists():
        raise KdlError(f"text file {path} does not exist. Fix: {fix}.")
    if not path.is_file():
        raise KdlError(f"{path} is {what_is(path)}, not a text file. Fix: {fix}.")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read(-1 if max_chars is None else max_chars)
    except UnicodeDecodeError as exc:
        raise KdlError(
            f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}). Fix: save it as UTF-8 "
            f"(e.g. iconv -f latin1 -t utf-8), or {fix}."
        ) from exc


def _tiny_shakespeare_file(cfg: CharDataConfig) -> Path:
    """The input.txt under data.root, downloaded first when data.download is true."""
    root = Path(cfg.root).expanduser().resolve()
    folder = root / SHAKESPEARE_FOLDER
    path = folder / SHAKESPEARE_FILE
    if not cfg.download:
        if not path.is_file():
            raise KdlError(
                f"dataset 'tiny_shakespeare' not found: {path} is missing. Fix: set "
                f"data.download: true (needs network), or put {SHAKESPEARE_FILE} from "
                f"{SHAKESPEARE_URL} at {path} (data.root: {root})."
            )
        return path
    from torchvision.datasets import utils  # only here: importing torchvision costs seconds

    download("tiny_shakespeare", SHAKESPEARE_URL, folder, f"{path} holds it",
             lambda: utils.download_url(SHAKESPEARE_URL, str(folder), filename=SHAKESPEARE_FILE,
                                        md5=SHAKESPEARE_MD5))
    return path
