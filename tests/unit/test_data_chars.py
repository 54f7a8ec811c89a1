"""Character data: the corpora, the contiguous split, the vocabulary and the stream layout."""

from __future__ import annotations

import os
import re
import sysconfig
from itertools import pairwise
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision.datasets.utils

from karpathy_runner.config.data import CharDataConfig
from karpathy_runner.data import Batches, build_data
from karpathy_runner.data.chars import (
    SHAKESPEARE_MD5,
    SHAKESPEARE_URL,
    UNKNOWN,
    CharStreams,
    stdlib_files,
)
from karpathy_runner.errors import KdlError

HEADER = re.compile(r"^# ---- (.+) ----\n", re.MULTILINE)
SKIPPED = {"site-packages", "dist-packages"}


def text_config(path: Path, **overrides) -> CharDataConfig:
    settings = {"seq_len": 5, "batch_size": 2, "eval_batch_size": 2, "val_fraction": 0.25}
    return CharDataConfig(name="char_text", path=str(path), **{**settings, **overrides})


def decode(ids: torch.Tensor, vocabulary: list[str]) -> str:
    return "".join(vocabulary[i] for i in ids.tolist())


def whole_text(bundle) -> str:
    """The corpus back from train + val ids (exact when every character is in the vocabulary)."""
    return decode(torch.cat([bundle.train.ids, bundle.val.ids]), bundle.info.vocabulary)


def build_error(cfg: CharDataConfig) -> str:
    with pytest.raises(KdlError) as caught:
        build_data(cfg)
    assert caught.value.exit_code == 2
    return str(caught.value)


# ----------------------------------------------------------------------------- python_stdlib


def test_python_stdlib_is_the_sorted_py_files_capped_and_the_same_every_build():
    cfg = CharDataConfig(name="python_stdlib", max_chars=150_000, seq_len=20, batch_size=4,
                         eval_batch_size=4)
    first, again = build_data(cfg), build_data(cfg)

    assert torch.equal(first.train.ids, again.train.ids) and torch.equal(first.val.ids, again.val.ids)
    assert first.info.vocabulary == again.info.vocabulary
    assert len(first.train.ids) + len(first.val.ids) == 150_000
    # val may hold characters train lacks (they decode as UNKNOWN): read the train part only
    root = Path(sysconfig.get_paths()["stdlib"])
    train_text = decode(first.train.ids, first.info.vocabulary)
    names = HEADER.findall(train_text)
    assert train_text.startswith(f"# ---- {names[0]} ----\n")
    expected = sorted(
        path.relative_to(root).as_posix()
        for top in root.iterdir() if top.name not in SKIPPED
        for path in (top.rglob("*.py") if top.is_dir() else [top] if top.suffix == ".py" else [])
    )
    assert len(names) > 3 and names == expected[: len(names)]
    bodies = HEADER.split(train_text)[2::2]  # the text after each header
    for name, body in list(zip(names, bodies, strict=True))[:-1]:  # the last one may be cut
        assert body == (root / name).read_bytes().decode("utf-8", errors="replace")
    assert not [name for name in stdlib_files(root) if SKIPPED & set(name.split("/"))]


def test_python_stdlib_skips_installed_packages_and_stops_reading_at_the_cap(tmp_path, monkeypatch):
    files = {
        "b_d.py": "bd\n",
        "a.py": "alpha\n",
        "b/c.py": "c\u00e9\n",
        "b.py": "bee\n",
        "a/notes.txt": "not python\n",
        "a/site-packages/pkg.py": "installed\n",
        "b/dist-packages/deb.py": "debian\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "z.py").symlink_to(tmp_path / "gone.py")  # unreadable: fails if it is read
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    order = ["a.py", "b.py", "b/c.py", "b_d.py"]  # POSIX path string order
    full = "".join(f"# ---- {name} ----\n{files[name]}" for name in order)
    cap = len(full) - 2

    bundle = build_data(CharDataConfig(name="python_stdlib", max_chars=cap, seq_len=2,
                                       batch_size=1, eval_batch_size=1, val_fraction=0.1))

    assert whole_text(bundle) == full[:cap]


# ----------------------------------------------------------------------------- char_text


def test_char_text_splits_contiguously_with_a_train_only_vocabulary(tmp_path):
    train_part = "the quick brown fox jumps over the lazy dog. " * 2  # 90 characters
    val_part = "a QUIET ZEBRA!" + " the end" * 2  # 30: capitals and ! only here
    path = tmp_path / "book.txt"
    path.write_text(train_part + val_part, encoding="utf-8")

    bundle = build_data(text_config(path, val_fraction=0.25))

    vocabulary = bundle.info.vocabulary
    assert (len(bundle.train.ids), len(bundle.val.ids)) == (90, 30) and bundle.test is None
    assert vocabulary == [UNKNOWN] + sorted(set(train_part))
    assert bundle.train.ids.dtype == torch.int64
    assert decode(bundle.train.ids, vocabulary) == train_part
    unknown = set("QUIETZBRA!")
    assert decode(bundle.val.ids, vocabulary) == "".join(UNKNOWN if c in unknown else c for c in val_part)
    info = bundle.info
    assert info.kind == "chars" and info.num_classes == len(vocabulary)
    assert info.class_names == vocabulary


def test_max_chars_keeps_the_first_characters_of_a_text_file(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(100))
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8")

    bundle = build_data(text_config(path, max_chars=60, val_fraction=0.5))

    assert whole_text(bundle) == text[:60]


def test_replacement_character_in_the_text_is_index_0_only(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(f"ab{UNKNOWN}c" * 10, encoding="utf-8")

    bundle = build_data(text_config(path, val_fraction=0.5))

    assert bundle.info.vocabulary == [UNKNOWN, "a", "b", "c"]
    assert bundle.train.ids[:8].tolist() == [1, 2, 0, 3] * 2


def test_char_text_uses_a_passed_vocabulary_exactly(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("abcabcabcabcabcabcabcabcabcabcabcabcabcabcxyz", encoding="utf-8")
    saved = [UNKNOWN, "z", "c", "b", "q"]

    bundle = build_data(text_config(path, val_fraction=0.2, seq_len=3, batch_size=1,
                                    eval_batch_size=1), vocabulary=saved)

    assert bundle.info.vocabulary == saved and bundle.info.num_classes == 5
    assert bundle.train.ids[:6].tolist() == [0, 3, 2, 0, 3, 2]  # "a" is not in it
    assert bundle.val.ids[-3:].tolist() == [0, 0, 1]  # x, y unknown; z is 1


def test_char_text_windows_are_corpus_slices_with_targets_shifted_by_one(tmp_path):
    text = "".join(chr(ord("a") + (i * 7) % 26) for i in range(120))
    path = tmp_path / "letters.txt"
    path.write_text(text, encoding="utf-8")

    bundle = build_data(text_config(path, val_fraction=0.25, seq_len=6, batch_size=3))

    train, vocabulary = bundle.train, bundle.info.vocabulary
    assert train.streams == 3 and bundle.val.streams == 2
    assert len(train) == ((90 // 3 - 1) // 6) * 3  # W windows per stream, times B
    inputs, targets = train.get_batch(torch.arange(len(train)))
    assert inputs.shape == targets.shape == (len(train), 6) and targets.dtype == torch.int64
    for item in range(len(train)):
        start = (item % 3) * 30 + (item // 3) * 6
        assert decode(inputs[item], vocabulary) == text[start : start + 6]
        assert decode(targets[item], vocabulary) == text[start + 1 : start + 7]


# ----------------------------------------------------------------------------- stream layout


def test_batches_in_order_continue_each_row_of_the_previous_batch():
    streams, seq_len = 4, 5
    dataset = CharStreams(torch.arange(103), streams, seq_len)  # an id is its position
    stream_len = 103 // streams

    batches = list(Batches(dataset, streams, shuffle=False).epoch(0))

    assert len(dataset) == ((stream_len - 1) // seq_len) * streams == 16 and len(batches) == 4
    for inputs, targets in batches:
        assert torch.equal(targets, inputs + 1)  # positions: next character
        assert torch.equal(inputs - inputs[:, :1], torch.arange(seq_len).expand(streams, -1))
        assert (targets // stream_len).eq(torch.arange(streams).unsqueeze(1)).all()  # row s: stream s
    for (_, targets), (inputs, _) in pairwise(batches):
        assert torch.equal(inputs[:, 0], targets[:, -1])  # row s picks up where it stopped


def test_shuffled_batches_cover_every_window_once_per_epoch():
    dataset = CharStreams(torch.arange(103), 4, 5)
    in_order = {tuple(row) for inputs, _ in Batches(dataset, 4).epoch(0) for row in inputs.tolist()}

    for epoch in (0, 1):
        rows = [tuple(row) for inputs, _ in Batches(dataset, 4, seed=0, shuffle=True).epoch(epoch)
                for row in inputs.tolist()]
        assert len(rows) == len(dataset) == len(in_order) and set(rows) == in_order
    shuffled_first = next(Batches(dataset, 4, seed=0, shuffle=True).epoch(0))[0]
    assert not torch.equal(shuffled_first, next(Batches(dataset, 4).epoch(0))[0])


def test_to_device_moves_the_ids_and_batches_follow_them(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("to be or not to be, that is the question. " * 4, encoding="utf-8")
    bundle = build_data(text_config(path))

    assert bundle.to(torch.device("cpu")) is bundle
    batch = bundle.train.get_batch(torch.tensor([0, 3]))
    assert all(t.device == bundle.train.ids.device == torch.device("cpu") for t in batch)
    inputs, targets = bundle.prepare.to(torch.device("cpu"))(batch, 0)
    assert torch.equal(inputs, batch[0]) and torch.equal(targets, batch[1])
    # a device other than the indices' one: the batch is cut where the ids are
    bundle.val.to(torch.device("meta"))
    inputs, targets = bundle.val.get_batch(torch.tensor([1, 0]))
    assert inputs.device.type == targets.device.type == "meta" and inputs.shape == (2, 5)


# ----------------------------------------------------------------------------- errors


def test_empty_corpus_names_the_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")

    message = build_error(text_config(path))

    assert str(path) in message and "empty" in message and "data.path" in message


@pytest.mark.parametrize("what", ["missing", "folder", "not utf-8"])
def test_unreadable_char_text_names_the_file_and_the_fix(tmp_path, what):
    path = tmp_path / "book.txt"
    if what == "folder":
        path.mkdir()
    elif what == "not utf-8":
        path.write_bytes("caf\u00e9 latin-1 text ".encode("latin-1") * 10)

    message = build_error(text_config(path))

    assert str(path) in message and "data.path" in message
    assert {"missing": "does not exist", "folder": "is a folder", "not utf-8": "not UTF-8"}[what] in message


@pytest.mark.parametrize(
    "overrides, split, key",
    [
        ({"seq_len": 100}, "train", "data.batch_size=2"),
        ({"eval_batch_size": 16}, "val", "data.eval_batch_size=16"),
    ],
)
def test_split_too_short_for_a_window_names_the_sizes_and_the_fixes(tmp_path, overrides, split, key):
    path = tmp_path / "short.txt"
    path.write_text("x" * 80, encoding="utf-8")  # train 60, val 20 characters

    message = build_error(text_config(path, **overrides))

    length = {"train": 60, "val": 20}[split]
    assert f"the {split} split of {path} has {length} characters" in message
    assert "data.seq_len=" in message and key in message
    assert "lower data.seq_len" in message and "larger data.val_fraction" in message


def test_tiny_shakespeare_missing_without_download_names_the_file_and_the_fix(tmp_path):
    message = build_error(CharDataConfig(name="tiny_shakespeare", root=str(tmp_path), download=False))

    assert str(tmp_path / "tiny_shakespeare" / "input.txt") in message
    assert "data.download: true" in message and SHAKESPEARE_URL in message


def test_tiny_shakespeare_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    def no_network(url, *args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", no_network)

    message = build_error(CharDataConfig(name="tiny_shakespeare", root=str(tmp_path), download=True))

    assert "could not download" in message and SHAKESPEARE_URL in message
    assert "name resolution" in message and "data.download: false" in message
    assert str(tmp_path / "tiny_shakespeare" / "input.txt") in message


# ----------------------------------------------------------------------------- tiny_shakespeare


@pytest.mark.parametrize("download", [False, True])
def test_tiny_shakespeare_reads_input_txt_under_root(tmp_path, monkeypatch, download):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 3
    path = tmp_path / "tiny_shakespeare" / "input.txt"
    path.parent.mkdir()
    path.write_text(text, encoding="utf-8")
    checked = []

    def present(fpath, md5=None):  # our file is not the published one: keep the file check only
        checked.append(md5)
        return os.path.isfile(fpath)

    def no_network(*args, **kwargs):
        raise AssertionError("the file is there: nothing may be downloaded")

    monkeypatch.setattr(torchvision.datasets.utils, "check_integrity", present)
    monkeypatch.setattr(torchvision.datasets.utils, "_get_redirect_url", no_network)
    monkeypatch.setattr(torchvision.datasets.utils, "_urlretrieve", no_network)

    bundle = build_data(CharDataConfig(name="tiny_shakespeare", root=str(tmp_path), download=download,
                                       seq_len=8, batch_size=2, eval_batch_size=2))

    assert whole_text(bundle) == text
    assert checked == ([SHAKESPEARE_MD5] if download else [])
