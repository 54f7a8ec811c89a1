"""Text data: IMDB's aclImdb folder and a user's CSV, TSV and JSONL files, each written by the test
in the real format; the vocabulary, the batches and the errors a user sees on bad files."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision.datasets.utils
from datafiles import write_csv
from kdl import kdl

from karpathy_runner.config.data import TextDataConfig
from karpathy_runner.config.loading import resolve
from karpathy_runner.data import Batches, build_data
from karpathy_runner.errors import KdlError


def text_config(**data) -> TextDataConfig:
    """The `data` branch as `kdl train --set data.KEY=VALUE ...` would resolve it."""
    return resolve({"data": {"name": "text_files", **data}, "model": {"name": "lstm"}}).data


def decode(dataset, vocabulary: list[str], i: int) -> list[str]:
    tokens, lengths, _ = dataset.get_batch(torch.tensor([i]))
    return [vocabulary[t] for t in tokens[0, : lengths[0]].tolist()]


def write_jsonl(path: Path, objects: list[dict]) -> Path:
    path.write_text("".join(json.dumps(obj) + "\n" for obj in objects), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- IMDB

IMDB_TEST = {"neg": ["Boring boring movie.", "The END<br />boring"],
             "pos": ["Great movie!", "Great great plot"]}


def write_imdb(root: Path, per_class: int = 5) -> None:
    """aclImdb as the archive unpacks: <id>_<stars>.txt per review, plus files and the unlabelled
    train/unsup reviews that classification ignores. Train review i of a class holds the word
    review<class><i>, so a test can tell which review landed where."""
    folder = root / "aclImdb"
    for split in ("train", "test"):
        for name in ("neg", "pos", "unsup"):
            (folder / split / name).mkdir(parents=True)
    (folder / "imdb.vocab").write_text("the\nand\n")
    (folder / "train" / "labeledBow.feat").write_text("9 0:9 1:1\n")
    (folder / "train" / "urls_pos.txt").write_text("http://www.imdb.com/title/tt0453418/usercomments\n")
    for name, stars in (("neg", 2), ("pos", 9)):
        for i in range(per_class):
            mood = "Boring" if name == "neg" else "Great"
            text = f"{mood} movie review{name}{i}!<br /><br />The END."
            (folder / "train" / name / f"{i}_{stars}.txt").write_text(text, encoding="utf-8")
        for i, text in enumerate(IMDB_TEST[name]):
            (folder / "test" / name / f"{i}_{stars}.txt").write_text(text, encoding="utf-8")
    for i in range(3):
        (folder / "train" / "unsup" / f"{i}_0.txt").write_text("unlabelled unsupword<br />")


def imdb_config(root: Path, **overrides) -> TextDataConfig:
    return resolve({"data": {"name": "imdb", "root": str(root), "download": False, **overrides},
                    "model": {"name": "lstm"}}).data


def test_imdb_reads_train_and_test_folders(tmp_path):
    write_imdb(tmp_path)
    bundle = build_data(imdb_config(tmp_path, val_fraction=0.0))
    vocabulary = bundle.info.vocabulary

    assert bundle.info.kind == "text" and bundle.info.class_names == ["neg", "pos"]
    assert bundle.info.num_classes == 2
    assert bundle.val is None and len(bundle.train) == 10 and len(bundle.test) == 4
    # neg then pos, each class's files in sorted order; unsup is not read
    assert bundle.train.labels.tolist() == [0] * 5 + [1] * 5
    assert decode(bundle.train, vocabulary, 0) == ["boring", "movie", "reviewneg0", "!", "the", "end", "."]
    assert decode(bundle.train, vocabulary, 7) == ["great", "movie", "reviewpos2", "!", "the", "end", "."]
    assert "br" not in vocabulary and "unsupword" not in vocabulary and "<" not in vocabulary
    # the test split is test/, read with the training vocabulary
    assert bundle.test.labels.tolist() == [0, 0, 1, 1]
    assert decode(bundle.test, vocabulary, 0) == ["boring", "boring", "movie", "."]
    assert decode(bundle.test, vocabulary, 1) == ["the", "end", "boring"]
    assert decode(bundle.test, vocabulary, 3) == ["great", "great", "<unk>"]


def test_imdb_val_split_is_deterministic_by_split_seed(tmp_path):
    write_imdb(tmp_path)

    def split(seed: int) -> tuple[set[str], list[list[str]]]:
        bundle = build_data(imdb_config(tmp_path, val_fraction=0.2, split_seed=seed))
        assert len(bundle.train) == 8 and len(bundle.val) == 2 and len(bundle.test) == 4
        vocabulary = bundle.info.vocabulary
        train_reviews = {word for word in vocabulary if word.startswith("review")}
        return train_reviews, [decode(bundle.val, vocabulary, i) for i in range(2)]

    first, again, other = split(0), split(0), split(1)
    assert len(first[0]) == 8
    assert first == again and first[0] != other[0]
    # the val reviews' own words were never in the training split, so they are unknown
    assert all(tokens[2] == "<unk>" for tokens in first[1])


def test_imdb_missing_folder_names_it_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    with pytest.raises(KdlError) as caught:
        build_data(imdb_config("data"))

    message = str(caught.value)
    assert str(tmp_path / "data" / "aclImdb") in message
    assert "data.download: true" in message and "aclImdb folder under" in message


def test_imdb_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    calls = []

    def no_network(url, *args, **kwargs):
        calls.append((url, kwargs.get("md5")))
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", no_network)

    with pytest.raises(KdlError) as caught:
        build_data(imdb_config(tmp_path, download=True))

    message = str(caught.value)
    assert calls == [("https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz",
                      "7c2ac02c03563afcf9b574c7e56c153a")]
    assert "could not download" in message and "aclImdb_v1.tar.gz" in message
    assert "name resolution" in message and "data.download: false" in message


# ----------------------------------------------------------------------------- user files


def test_csv_with_custom_columns(tmp_path):
    train = write_csv(tmp_path / "reviews.csv", ["id", "review", "sentiment"], [
        [1, 'Loved it, "truly".', "pos"],
        [2, "Hated it.\nTwo lines, even.", "neg"],
        [3, "Loved the cast", "pos"],
    ])
    bundle = build_data(text_config(train_file=str(train), text_field="review",
                                    label_field="sentiment", val_fraction=0.0))
    vocabulary = bundle.info.vocabulary

    assert bundle.info.class_names == ["neg", "pos"] and bundle.train.labels.tolist() == [1, 0, 1]
    assert bundle.val is None and bundle.test is None
    # quoted commas, quotes and line breaks stay inside the text
    assert decode(bundle.train, vocabulary, 0) == ["loved", "it", ",", '"', "truly", '"', "."]
    assert decode(bundle.train, vocabulary, 1) == ["hated", "it", ".", "two", "lines", ",", "even", "."]


def test_tsv_with_numeric_labels_and_its_own_val_and_test_files(tmp_path):
    header = ["label_id", "body"]
    train = write_csv(tmp_path / "train.tsv", header, [[2, "b, c"], [0, "a"], [1, "b"], [10, "c"]], "\t")
    val = write_csv(tmp_path / "val.tsv", header, [[10, "a b"]], "\t")
    test = write_csv(tmp_path / "test.tsv", header, [[0, "c"], [2, "a"]], "\t")
    bundle = build_data(text_config(train_file=str(train), val_file=str(val), test_file=str(test),
                                    text_field="body", label_field="label_id"))

    # labels are text: sorted as text, and the val file's 10 is the training 10
    assert bundle.info.class_names == ["0", "1", "10", "2"]
    assert bundle.train.labels.tolist() == [3, 0, 1, 2]
    assert len(bundle.train) == 4  # a val file takes the place of val_fraction
    assert bundle.val.labels.tolist() == [2] and bundle.test.labels.tolist() == [0, 3]
    assert decode(bundle.train, bundle.info.vocabulary, 0) == ["b", ",", "c"]
    assert decode(bundle.val, bundle.info.vocabulary, 0) == ["a", "b"]


def test_jsonl_labels_as_numbers_and_strings_are_one_class(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text(
        '{"content": "Très bien!", "y": 1}\n'
        "\n"
        '{"content": "Nope", "y": "0", "extra": [1, 2]}\n'
        '{"content": "Good", "y": "1"}\n'
        "   \n"
        '{"content": "Bad", "y": 0}\n',
        encoding="utf-8",
    )
    test = write_jsonl(tmp_path / "test.json-lines", [{"content": "good", "y": 1}])
    bundle = build_data(text_config(train_file=str(train), test_file=str(test), text_field="content",
                                    label_field="y", val_fraction=0.0))

    assert bundle.info.class_names == ["0", "1"]
    assert len(bundle.train) == 4 and bundle.train.labels.tolist() == [1, 0, 1, 0]
    assert decode(bundle.train, bundle.info.vocabulary, 0) == ["très", "bien", "!"]
    assert bundle.test.labels.tolist() == [1]


def test_format_setting_overrides_the_extension(tmp_path):
    train = write_jsonl(tmp_path / "train.txt", [{"text": "hello there", "label": "a"},
                                                 {"text": "bye", "label": "b"}])  # two labels
    bundle = build_data(text_config(train_file=str(train), format="jsonl", val_fraction=0.0))
    assert decode(bundle.train, bundle.info.vocabulary, 0) == ["hello", "there"]


# ----------------------------------------------------------------------------- vocabulary


def test_vocabulary_comes_from_the_training_split_only(tmp_path):
    train = write_csv(tmp_path / "train.csv", ["text", "label"], [["good film", "pos"], ["bad film", "neg"]])
    val = write_csv(tmp_path / "val.csv", ["text", "label"], [["zebra film", "pos"]])
    bundle = build_data(text_config(train_file=str(train), val_file=str(val)))

    assert bundle.info.vocabulary == ["<pad>", "<unk>", "film", "bad", "good"]
    assert decode(bundle.val, bundle.info.vocabulary, 0) == ["<unk>", "film"]


def test_vocabulary_leaves_out_the_held_out_val_reviews(tmp_path):
    rows = [[f"common word{i}", "a" if i % 2 else "b"] for i in range(10)]
    train = write_csv(tmp_path / "train.csv", ["text", "label"], rows)
    bundle = build_data(text_config(train_file=str(train), val_fraction=0.3))

    vocabulary = bundle.info.vocabulary
    assert len(bundle.train) == 7 and len(bundle.val) == 3
    assert vocabulary[2] == "common" and len(vocabulary) == 2 + 1 + 7
    assert [decode(bundle.val, vocabulary, i) for i in range(3)] == [["common", "<unk>"]] * 3


def test_vocabulary_order_min_freq_and_max_vocab(tmp_path):
    # counts: b 3, a 2, c 2, d 1
    train = write_csv(tmp_path / "train.csv", ["text", "label"], [["b a c b", "x"], ["d c a b", "y"]])

    by_count = build_data(text_config(train_file=str(train), val_fraction=0.0))
    assert by_count.info.vocabulary == ["<pad>", "<unk>", "b", "a", "c", "d"]  # ties alphabetical

    frequent = build_data(text_config(train_file=str(train), val_fraction=0.0, min_freq=2))
    assert frequent.info.vocabulary == ["<pad>", "<unk>", "b", "a", "c"]
    tokens, _, _ = frequent.train.get_batch(torch.tensor([1]))
    assert tokens.tolist() == [[1, 4, 3, 2]]  # d is rare: <unk>

    capped = build_data(text_config(train_file=str(train), val_fraction=0.0, max_vocab=4))
    assert capped.info.vocabulary == ["<pad>", "<unk>", "b", "a"]


def test_max_length_keeps_the_first_tokens_and_lowercase_can_be_off(tmp_path):
    train = write_csv(tmp_path / "train.csv", ["text", "label"], [["One Two, three four", "x"],
                                                                  ["five", "y"]])
    bundle = build_data(text_config(train_file=str(train), val_fraction=0.0, max_length=3,
                                    lowercase=False))

    assert decode(bundle.train, bundle.info.vocabulary, 0) == ["One", "Two", ","]
    assert "three" not in bundle.info.vocabulary


def test_a_saved_vocabulary_is_used_exactly(tmp_path):
    train = write_csv(tmp_path / "train.csv", ["text", "label"], [["good film", "pos"], ["zebra", "neg"]])
    saved = ["<pad>", "<unk>", "zebra", "unused", "film"]
    bundle = build_data(text_config(train_file=str(train), val_fraction=0.0), vocabulary=saved)

    assert bundle.info.vocabulary == saved
    tokens, _, _ = bundle.train.get_batch(torch.tensor([0, 1]))
    assert tokens.tolist() == [[1, 4], [2, 0]]

    with pytest.raises(KdlError, match="vocab.json"):
        build_data(text_config(train_file=str(train), val_fraction=0.0), vocabulary=["film", "<unk>"])


# ----------------------------------------------------------------------------- batches


def test_batches_are_padded_with_zeros_and_an_empty_text_has_length_one(tmp_path):
    train = write_csv(tmp_path / "train.csv", ["text", "label"],
                      [["a b c", "x"], ["a", "y"], ["", "x"], ["  ", "y"], ["c b a b c", "x"]])
    bundle = build_data(text_config(train_file=str(train), val_fraction=0.0))
    index = {word: i for i, word in enumerate(bundle.info.vocabulary)}
    a, b, c = index["a"], index["b"], index["c"]

    tokens, lengths, labels = bundle.train.get_batch(torch.tensor([0, 1, 2, 3]))
    assert tokens.dtype == lengths.dtype == labels.dtype == torch.int64
    assert tokens.tolist() == [[a, b, c], [a, 0, 0], [1, 0, 0], [1, 0, 0]]
    assert lengths.tolist() == [3, 1, 1, 1] and labels.tolist() == [0, 1, 0, 1]

    tokens, lengths, _ = bundle.train.get_batch(torch.tensor([4, 1]))
    assert tokens.tolist() == [[c, b, a, b, c], [a, 0, 0, 0, 0]] and lengths.tolist() == [5, 1]

    prepared = bundle.prepare.to(torch.device("cpu"))(bundle.train.get_batch(torch.tensor([1, 0])), 3)
    assert [t.tolist() for t in prepared] == [[[a, 0, 0], [a, b, c]], [1, 3], [1, 0]]
    assert prepared[1].device.type == "cpu"


def test_dataloader_workers_give_the_same_batches(tmp_path):
    rows = [[" ".join(["w"] * (i % 5) + [f"x{i}"]), str(i % 3)] for i in range(18)]
    train = write_csv(tmp_path / "train.csv", ["text", "label"], rows)
    dataset = build_data(text_config(train_file=str(train), val_fraction=0.0)).train

    copy = pickle.loads(pickle.dumps(dataset))  # workers started by spawn receive it pickled
    everything = torch.arange(18)
    assert all(torch.equal(x, y) for x, y in zip(copy.get_batch(everything), dataset.get_batch(everything),
                                                   strict=True))
    alone = list(Batches(dataset, 4, seed=3, shuffle=True, num_workers=0).epoch(1))
    workers = list(Batches(dataset, 4, seed=3, shuffle=True, num_workers=2).epoch(1))
    assert len(alone) == len(workers) == 5
    for one, other in zip(alone, workers, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(one, other, strict=True))


# ----------------------------------------------------------------------------- bad files


def message_of(**data) -> str:
    with pytest.raises(KdlError) as caught:
        build_data(text_config(**data))
    assert caught.value.exit_code == 2
    return str(caught.value)


def test_missing_label_column_lists_the_columns_and_suggests_the_closest(tmp_path):
    train = write_csv(tmp_path / "train.csv", ["text", "labels"], [["fine", "a"]])
    message = message_of(train_file=str(train))

    assert str(train) in message and "'label'" in message and "data.label_field" in message
    assert "text, labels" in message and "Did you mean 'labels'?" in message
    assert "--set data.label_field=labels" in message


def test_missing_text_key_in_jsonl_names_the_line(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 1}, {"txt": "b", "label": 0}])
    message = message_of(train_file=str(train))

    assert str(train) in message and "line 2" in message and "data.text_field" in message
    assert "Did you mean 'txt'?" in message


def test_missing_file_names_the_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = message_of(train_file="nowhere/train.csv")

    assert str(tmp_path / "nowhere" / "train.csv") in message
    assert "data.train_file" in message and "does not exist" in message


@pytest.mark.parametrize("name, content", [
    ("empty.csv", ""),
    ("header_only.csv", "text,label\n"),
    ("blank.jsonl", "\n  \n"),
])
def test_file_without_rows(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    message = message_of(train_file=str(tmp_path / name))

    assert str(tmp_path / name) in message and "has no rows" in message and "data.train_file" in message


def test_test_label_never_seen_in_training(tmp_path):
    train = write_csv(tmp_path / "train.csv", ["text", "label"], [["good", "pos"], ["bad", "neg"]])
    test = write_csv(tmp_path / "test.csv", ["text", "label"], [["meh", "neutral"], ["good", "pos"]])
    message = message_of(train_file=str(train), test_file=str(test))

    assert "'neutral'" in message and str(test) in message and "data.test_file" in message
    assert str(train) in message and "Training labels: 'neg', 'pos'" in message


def test_malformed_jsonl_line(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "a", "label": 1}\n\n{"text": "b", "label": }\n')
    message = message_of(train_file=str(train))

    assert str(train) in message and "line 3 is not valid JSON" in message


def test_a_jsonl_line_nested_200000_deep_is_named_not_a_recursion_error(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "a", "label": 1}\n{"text": ' + "[" * 200_000 + "]" * 200_000
                     + ', "label": 2}\n')
    message = message_of(train_file=str(train))

    assert str(train) in message and "line 2 is nested too deeply to read" in message


@pytest.mark.parametrize("name, content, fragment", [
    ("short.csv", "text,label\nfine,a\nno label here\n", "line 3 has fewer values than the header"),
    ("blank_label.csv", "text,label\nfine,a\nokay,\n", "line 3 has no usable label"),
    ("null_label.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": null}\n', "line 2 has no usable"),
    ("list.jsonl", '{"text": "a", "label": 1}\n["b", 0]\n', "line 2 holds a JSON list"),
    ("number_text.jsonl", '{"text": 5, "label": 1}\n', "line 1: 'text' (data.text_field) is 5"),
])
def test_bad_row_names_the_line(tmp_path, name, content, fragment):
    (tmp_path / name).write_text(content)
    message = message_of(train_file=str(tmp_path / name))

    assert str(tmp_path / name) in message and fragment in message and "Fix" in message


def test_unknown_extension(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("text,label\nfine,a\n")
    message = message_of(train_file=str(train))

    assert str(train) in message and "'.txt'" in message and "data.format" in message


def test_bad_file_through_the_cli_exits_2_with_the_fix(tmp_path):
    train = write_csv(tmp_path / "train.csv", ["Text", "label"], [["fine", "a"], ["bad", "b"]])
    config = tmp_path / "text.yaml"
    config.write_text(f"name: text\ndata:\n  name: text_files\n  train_file: {train}\n"
                      "model:\n  name: lstm\ntrain:\n  epochs: 1\n  device: cpu\n")
    runs = tmp_path / "runs"

    result = kdl("train", config, "--runs-dir", runs, "--quiet")

    assert result.exit_code == 2
    assert str(train) in result.stderr and "'text'" in result.stderr
    assert "Did you mean 'Text'?" in result.stderr and "Traceback" not in result.stderr
    assert not runs.exists() or not any(runs.iterdir())  # no run folder for a run that never started
