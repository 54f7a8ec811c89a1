"""Recurrent models trained end to end through the CLI: the char language model (loss falls,
bits per char, samples that repeat with a seed, the carried hidden state resumed exactly, the
vocabulary kept in the run folder) and text classification from a user's CSV file."""

from __future__ import annotations

import csv
import json
import math

import pytest
from kdl import kdl
from stopping import assert_same_training, final_state, metrics, read_json, sets, stopped_and_resumed

from karpathy_runner.build import build_experiment, build_trainer
from karpathy_runner.config.loading import load_config
from karpathy_runner.runfolder.writer import RunWriter
from karpathy_runner.tasks.language_model import LanguageModel
from karpathy_runner.ui.progress import Reporter

CORPUS = "".join(f"def add_{i}(a, b):\n    return a + b * {i}\n\n" for i in range(120))  # ~4 KB


pytestmark = pytest.mark.usefixtures("single_thread")  # as the kdl processes run


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.py"
    path.write_text(CORPUS)
    return path


def lm_config(tmp_path, corpus, *extra):
    """A tiny char LSTM config file on `corpus`: 8 streams of 20-character windows."""
    path = tmp_path / "lm.yaml"
    path.write_text(
        "# kdl train lm.yaml\nname: tiny_lm\n"
        f"data: {{name: char_text, path: '{corpus}', seq_len: 20, batch_size: 8, val_fraction: 0.2}}\n"
        "model: {name: lstm, embedding_size: 16, hidden_size: 32, layers: 2, dropout: 0.1}\n"
        "optimizer: {name: adam, lr: 0.01}\n"
        "train: {epochs: 2, device: cpu, log_every_steps: 3, deterministic: true}\n"
        "task: {sample_length: 40}\n")
    return [str(path), *sets(extra)]


def train(runs, *args):
    return kdl("train", *args, "--runs-dir", runs, "--quiet")


def test_a_char_lm_learns_and_reports_bits_per_char(tmp_path, corpus):
    result = train(tmp_path / "runs", *lm_config(tmp_path, corpus, "train.epochs=6"))
    assert result.exit_code == 0, result.stderr
    folder = tmp_path / "runs" / result.last_line
    meta = read_json(folder / "meta.json")
    assert meta["task"] == "language_model"
    assert meta["metric_modes"] == {"loss": "min", "bpc": "min", "perplexity": "min"}
    train_losses = [r["loss"] for r in metrics(folder) if r["split"] == "train"]
    assert train_losses[-1] < 0.6 * train_losses[0]  # falls within a few dozen steps
    val = [r for r in metrics(folder) if r["split"] == "val"][-1]
    assert val["bpc"] == pytest.approx(val["loss"] / math.log(2))
    assert val["perplexity"] == pytest.approx(math.exp(val["loss"]))
    # an epoch-end sample of the configured length, in the corpus's characters
    sample = (folder / "samples" / "epoch-006.txt").read_text()
    assert len(sample) == 40 and set(sample) <= set(CORPUS) | {"\ufffd"}
    # TensorBoard gets the example windows and each epoch's sample as text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    (examples,) = events.Tensors("train/examples/text_summary")
    assert "def add_" in examples.tensor_proto.string_val[0].decode()
    samples = events.Tensors("samples/epoch/text_summary")
    assert len(samples) == 6 and sample in samples[-1].tensor_proto.string_val[0].decode()
    evaluated = json.loads(kdl("eval", result.last_line, "--checkpoint", "last", "--runs-dir",
                               tmp_path / "runs", "--json").stdout)
    assert set(evaluated["metrics"]) == {"loss", "bpc", "perplexity"}
    # each pass over val starts its streams from a zero state: eval repeats training's number
    assert evaluated["metrics"]["loss"] == pytest.approx(val["loss"], rel=1e-6)


def test_the_streams_start_from_a_zero_state_each_epoch(tmp_path, corpus, monkeypatch):
    fresh = []
    original = LanguageModel.train_step

    def watched(self, batch, step, updater):
        fresh.append(self.hidden is None)
        return original(self, batch, step, updater)

    monkeypatch.setattr(LanguageModel, "train_step", watched)
    result = train(tmp_path / "runs", *lm_config(tmp_path, corpus))
    assert result.exit_code == 0, result.stderr
    steps_per_epoch = len(fresh) // 2
    assert [i for i, zero in enumerate(fresh) if zero] == [0, steps_per_epoch]


def test_samples_repeat_with_a_seed_and_follow_the_options(tmp_path, corpus):
    result = train(tmp_path / "runs", *lm_config(tmp_path, corpus, "train.epochs=1"))
    assert result.exit_code == 0, result.stderr

    def sample(*options):
        out = kdl("sample", result.last_line, "--runs-dir", tmp_path / "runs", *options)
        assert out.exit_code == 0, out.stderr
        return out.stdout[:-1]  # print's newline

    first = sample("--seed", "3", "--length", "60")
    assert first == sample("--seed", "3", "--length", "60") and len(first) == 60
    assert first != sample("--seed", "4", "--length", "60")
    primed = sample("--prime", "def ", "--length", "30", "--temperature", "0.5")
    assert primed.startswith("def ") and len(primed) == 34
    # top-k 1 always takes the likeliest character: the seed no longer matters
    assert sample("--top-k", "1", "--seed", "1", "--length", "30") == sample(
        "--top-k", "1", "--seed", "2", "--length", "30")
    out = tmp_path / "sample.txt"
    assert sample("--seed", "3", "--length", "60", "--out", str(out)) == first == out.read_text()
    # an option for images is refused, not ignored
    refused = kdl("sample", result.last_line, "--runs-dir", tmp_path / "runs", "-n", "4", "--length", "9")
    assert refused.exit_code == 2 and "Traceback" not in refused.stderr
    assert "-n does not apply to a language_model run, which draws text; its options are --length, " \
           "--temperature, --top-k, --prime" in " ".join(refused.stderr.split())


def test_the_vocabulary_travels_with_the_run(tmp_path, corpus):
    """Eval and sample use the run's vocab.json, not one rebuilt from a corpus that changed."""
    result = train(tmp_path / "runs", *lm_config(tmp_path, corpus, "train.epochs=1"))
    assert result.exit_code == 0, result.stderr
    folder = tmp_path / "runs" / result.last_line
    vocabulary = json.loads((folder / "vocab.json").read_text())
    assert vocabulary[0] == "\ufffd" and vocabulary[1:] == sorted(set(CORPUS[:int(len(CORPUS) * 0.8)]))
    corpus.write_text(CORPUS.replace("a", "\u00e4").upper())  # other characters entirely
    evaluated = kdl("eval", result.last_line, "--runs-dir", tmp_path / "runs", "--json")
    assert evaluated.exit_code == 0, evaluated.stderr
    sampled = kdl("sample", result.last_line, "--runs-dir", tmp_path / "runs", "--length", "50")
    assert sampled.exit_code == 0 and set(sampled.stdout.strip()) <= set(vocabulary)


def test_carried_hidden_state_resumes_exactly_mid_epoch(tmp_path, corpus, monkeypatch):
    args = lm_config(tmp_path, corpus, "train.checkpoint_every_steps=4")
    straight = train(tmp_path / "straight", *args)
    assert straight.exit_code == 0, straight.stderr

    def mid_epoch_with_its_hidden_state(folder, stop):
        state = final_state(folder)
        assert state["loop"]["batch"] > 0
        hidden = state["task"]["hidden"]  # the LSTM's (h, c), one row per stream
        assert [tuple(h.shape) for h in hidden] == [(2, 8, 32), (2, 8, 32)]

    folder = stopped_and_resumed(monkeypatch, lambda runs: train(runs, *args), tmp_path / "stopped",
                                 [5, 17], LanguageModel, each=mid_epoch_with_its_hidden_state)
    assert_same_training(folder, tmp_path / "straight" / straight.last_line)


@pytest.mark.parametrize("carry, ordered", [(True, True), (False, False)])
def test_carrying_the_state_reads_batches_in_corpus_order(tmp_path, corpus, carry, ordered):
    cfg = load_config(lm_config(tmp_path, corpus)[0], [f"task.carry_hidden={str(carry).lower()}"])
    writer = RunWriter.create(tmp_path, cfg.name, cfg.to_yaml())
    trainer = build_trainer(build_experiment(cfg), writer, Reporter(quiet=True))
    assert trainer.feed.train.shuffle is not ordered
    assert trainer.feed.val.batch_size == cfg.data.batch_size  # val streams as in training
    writer.close()


# ----------------------------------------------------------------------------- text classification


def write_reviews(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "sentiment"])
        writer.writerows(rows)


def text_config(tmp_path, train_file, *extra):
    path = tmp_path / "text.yaml"
    path.write_text(
        "# kdl train text.yaml\nname: reviews\n"
        f"data: {{name: text_files, train_file: '{train_file}', text_field: review, "
        "label_field: sentiment, batch_size: 8, val_fraction: 0.25}\n"
        "model: {name: gru, embedding_size: 16, hidden_size: 16, layers: 1, pooling: mean}\n"
        "optimizer: {name: adam, lr: 0.02}\ntrain: {epochs: 4, device: cpu}\n")
    return [str(path), *sets(extra)]


GOOD = ["a great film", "wonderful acting, great story", "i loved it", "great fun, loved it"]
BAD = ["a terrible film", "awful acting, boring story", "i hated it", "boring and awful"]


def test_text_classification_from_a_csv_file(tmp_path):
    rows = [(text, "pos") for text in GOOD * 6] + [(text, "neg") for text in BAD * 6]
    write_reviews(tmp_path / "reviews.csv", rows)
    result = train(tmp_path / "runs", *text_config(tmp_path, tmp_path / "reviews.csv"))
    assert result.exit_code == 0, result.stderr
    folder = tmp_path / "runs" / result.last_line
    assert read_json(folder / "meta.json")["task"] == "classify"
    assert json.loads((folder / "vocab.json").read_text())[:2] == ["<pad>", "<unk>"]
    evaluated = json.loads(kdl("eval", result.last_line, "--runs-dir", tmp_path / "runs",
                               "--json").stdout)
    assert evaluated["metrics"]["class_names"] == ["neg", "pos"]
    assert evaluated["metrics"]["accuracy"] == 1.0  # the words give it away
    # the file changes (new words, so a rebuilt vocabulary would not fit the checkpoint):
    # eval reads the run's vocab.json and still runs, new words as <unk>
    write_reviews(tmp_path / "reviews.csv", [(f"{text} extraordinary {i}", label)
                                             for i, (text, label) in enumerate(rows)])
    again = kdl("eval", result.last_line, "--runs-dir", tmp_path / "runs", "--json")
    assert again.exit_code == 0, again.stderr


@pytest.mark.parametrize("case, fragments", [
    ("missing label column", ["sentiment", "review", "data.label_field"]),
    ("empty corpus", ["empty.py", "empty"]),
    ("seq_len longer than the corpus", ["data.seq_len", "characters"]),
    ("label never seen in training", ["'meh'", "test.csv", "pos"]),
])
def test_bad_text_inputs_exit_2_naming_the_file_and_the_fix(tmp_path, case, fragments):
    if case == "missing label column":
        (tmp_path / "reviews.csv").write_text("review,score\ngood,1\n")
        args = text_config(tmp_path, tmp_path / "reviews.csv")
    elif case == "label never seen in training":
        write_reviews(tmp_path / "reviews.csv", [("good", "pos"), ("bad", "neg")] * 4)
        write_reviews(tmp_path / "test.csv", [("fine", "meh")])
        args = text_config(tmp_path, tmp_path / "reviews.csv", f"data.test_file={tmp_path / 'test.csv'}")
    else:
        corpus = tmp_path / "empty.py"
        corpus.write_text("" if case == "empty corpus" else "x = 1\n" * 5)
        args = lm_config(tmp_path, corpus)
    result = train(tmp_path / "runs", *args)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)
    assert not (tmp_path / "runs").exists()  # nothing written
