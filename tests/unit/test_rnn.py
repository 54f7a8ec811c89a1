"""Recurrent models (rnn, lstm, gru) through one code path: shapes, packed sequences that padding
never changes, image rows, weight tying; and their configs."""

from __future__ import annotations

import types

import pytest
import torch
from kdl import CONFIGS, kdl
from stopping import metrics

from karpathy_runner.config.families import MODELS
from karpathy_runner.config.models import RNNConfig
from karpathy_runner.config.root import Config  # noqa: F401  (every family registered, plugins too)
from karpathy_runner.models import build_model
from karpathy_runner.models.rnn import RNNClassifier, RNNLanguageModel

TEXT = types.SimpleNamespace(kind="text", vocabulary=["<pad>", "<unk>", *"abcdefgh"], num_classes=3)
CHARS = types.SimpleNamespace(kind="chars", vocabulary=list("\ufffdabcdef"), num_classes=7)
ROWS = types.SimpleNamespace(kind="image_rows", in_channels=3, image_size=(6, 5), num_classes=4)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_each_cell_through_one_code_path(cell):
    torch.manual_seed(0)
    cfg = RNNConfig(name=cell, embedding_size=8, hidden_size=12, layers=2, bidirectional=True)
    classifier = build_model(cfg, TEXT)
    expected = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell]
    assert type(classifier.rnn) is expected and classifier.rnn.bidirectional
    tokens = torch.randint(1, 10, (4, 7))
    assert classifier(tokens, torch.tensor([7, 3, 5, 1])).shape == (4, 3)
    lm = build_model(RNNConfig(name=cell, embedding_size=8, hidden_size=12), CHARS)
    logits, hidden = lm(torch.randint(0, 7, (2, 5)))
    assert logits.shape == (2, 5, 7)
    again, _ = lm(torch.randint(0, 7, (2, 5)), hidden)  # a carried state is taken as given
    assert again.shape == (2, 5, 7)


@pytest.mark.parametrize("pooling", ["last", "mean"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_padding_never_changes_a_result(pooling, bidirectional):
    """Each row of a padded, packed batch gives what the row gives alone, unpadded."""
    torch.manual_seed(0)
    model = RNNClassifier("lstm", num_classes=3, hidden_size=10, layers=2, bidirectional=bidirectional,
                          pooling=pooling, vocab_size=20, embedding_size=6).eval()
    lengths = torch.tensor([5, 2, 7])
    tokens = torch.zeros(3, 7, dtype=torch.int64)
    for row, length in enumerate(lengths.tolist()):
        tokens[row, :length] = torch.randint(1, 20, (length,))
    batched = model(tokens, lengths)
    for row, length in enumerate(lengths.tolist()):
        alone = model(tokens[row:row + 1, :length])  # no padding, no packing
        torch.testing.assert_close(batched[row:row + 1], alone, rtol=1e-5, atol=1e-6)
    unpacked = model(tokens)  # the padding read as tokens: a different answer for the short rows
    assert not torch.allclose(unpacked[1], batched[1])


def test_images_are_read_row_by_row():
    model = build_model(RNNConfig(name="gru", hidden_size=9, layers=1), ROWS)
    assert model.embedding is None and model.rnn.input_size == 3 * 5  # C x W values per row
    assert model(torch.randn(2, 3, 6, 5)).shape == (2, 4)


def test_weight_tying_shares_one_matrix():
    lm = build_model(RNNConfig(embedding_size=16, hidden_size=16, tie_weights=True), CHARS)
    assert lm.decoder.weight is lm.embedding.weight
    untied = build_model(RNNConfig(embedding_size=16, hidden_size=16), CHARS)
    assert isinstance(untied, RNNLanguageModel) and untied.decoder.weight is not untied.embedding.weight
    count = sum(p.numel() for p in lm.parameters())
    assert count == sum(p.numel() for p in untied.parameters()) - 7 * 16


@pytest.mark.parametrize("override, fragments", [
    ("model={name: lstm}", ["model.name: no task trains model.name 'lstm' on data.name 'digits'",
                         "data.as_sequence: rows"]),
    ("data.as_sequence=rows", ["no task trains model.name 'cnn'", "(image rows data)",
                               "model.name: lstm or gru or rnn"]),
    ("model={name: lstm, tie_weights: true}", ["model.tie_weights", "embedding_size == model.hidden_size"]),
    ("model={name: lstm, embedding_size: 8, hidden_size: 8, tie_weights: true}",
     ["model.tie_weights: only a language model"]),
    ("model={name: transformer}", ["unknown model 'transformer'",
                                   f"Valid names: {', '.join(MODELS.names())}"]),
    ("model.bidirectional=true", ["model.bidirectional: a language model predicts each next character "
                                  "from the ones before it only"]),
])
def test_recurrent_config_mistakes(override, fragments):
    sets = ["--set", "data.as_sequence=rows"] if "tie_weights" in override else []
    config = "stdlib_char_lstm.yaml" if "bidirectional" in override else "digits_cnn.yaml"
    result = kdl("validate", CONFIGS / config, *sets, "--set", override)
    assert result.exit_code == 2, result.stdout
    for fragment in fragments:
        assert fragment in result.stderr


def test_an_lstm_learns_digits_row_by_row(tmp_path):
    result = kdl("train", CONFIGS / "digits_rows_lstm.yaml", "--set", "train.epochs=3",
                 "--set", "train.device=cpu", "--runs-dir", tmp_path, "--quiet")
    assert result.exit_code == 0, result.stderr
    val = [r for r in metrics(tmp_path / result.last_line) if r["split"] == "val"]
    assert val[-1]["accuracy"] > 0.8  # 8 steps of 8 pixels; chance is 0.1


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_the_exportable_classifier_gives_what_packing_gives(cell, bidirectional, pooling):
    """kdl export's form of a token classifier (no packed sequences: each layer and direction
    over the padded batch, the backward one over each text reversed within its length) equals
    the packed forward, texts of every length in one batch."""
    torch.manual_seed(0)
    model = RNNClassifier(cell, 3, 8, layers=2, bidirectional=bidirectional, pooling=pooling,
                          vocab_size=20, embedding_size=5).eval()
    lengths = torch.tensor([9, 3, 5, 1, 9, 7])
    tokens = torch.randint(2, 20, (6, 9)) * (torch.arange(9) < lengths.unsqueeze(1))  # 0 after the end
    with torch.no_grad():
        assert torch.allclose(model.exportable()(tokens, lengths), model(tokens, lengths), atol=1e-6)
