"""`kdl export`: each family `kdl predict` or `kdl sample` serves, written in each format, loaded
back the way a user loads it and run on raw inputs, against the eager model through the run's
own preparation; what it carries (class names, vocabulary, latent size); a file that drifts from
the eager model, a missing checkpoint and a bad --out are refused with exit 2."""

from __future__ import annotations

import json

import onnxruntime
import pytest
import torch
from kdl import CONFIGS, TINY, kdl
from test_own_data import texts

from karpathy_runner import export
from karpathy_runner.evaluate import load_run
from karpathy_runner.tasks import drawing

FORMATS = ("torchscript", "exported-program", "onnx")
# the exporters of torch.export and ONNX take seconds a model: the fast layer traces only
FORMAT_CASES = [pytest.param(fmt, marks=[] if fmt == "torchscript" else [pytest.mark.slow])
                for fmt in FORMATS]
TINY_YAML = """# kdl train {name}.yaml
name: tiny_{name}
data: {{name: digits, batch_size: 64}}
model: {model}
optimizer: {{name: adam, lr: 0.002}}
train: {{epochs: 1, device: cpu, deterministic: true}}
"""
MODELS = {"gan": "{name: gan, latent_size: 16, width: 16}", "vae": "{name: vae, latent_size: 8, width: 16}"}

pytestmark = pytest.mark.usefixtures("single_thread")  # as the kdl processes run


def _trained(runs, config, *overrides):
    sets = [item for s in overrides for item in ("--set", s)]
    result = kdl("train", config, *sets, "--runs-dir", runs, "--quiet")
    assert result.exit_code == 0, result.stderr
    return result.last_line


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A digits CNN, a bidirectional LSTM on texts (mean of its states, as shipped), a GAN, a VAE,
    a U-Net segmenting the shapes."""
    root = tmp_path_factory.mktemp("export")
    runs = root / "runs"
    texts(root / "texts.csv")
    found = {"cnn": _trained(runs, CONFIGS / "digits_cnn.yaml", *TINY, "train.epochs=1"),
             "lstm": _trained(runs, CONFIGS / "my_texts_lstm.yaml", f"data.train_file={root / 'texts.csv'}",
                              "model.embedding_size=16", "model.hidden_size=16", "model.layers=2",
                              "train.epochs=1", "train.device=cpu")}
    for name, model in MODELS.items():
        config = root / f"{name}.yaml"
        config.write_text(TINY_YAML.format(name=name, model=model))
        found[name] = _trained(runs, config)
    found["segment"] = _trained(runs, CONFIGS / "shapes_segment.yaml", f"data.root={root / 'shapes'}",
                                "data.image_size=16", "data.train_images=16", "data.val_images=8",
                                "data.test_images=0", "data.batch_size=8", "model.channels=[4,8]",
                                "train.epochs=1", "train.device=cpu")
    return runs, found


def _eager(runs, run_id):
    """The run's eager outputs on its example inputs, as `kdl export` takes them."""
    exp = load_run(runs, run_id, "best", "cpu").exp
    exp.task.train(False)
    dataset = exp.data.val or exp.data.train
    spec = exp.task.export(dataset.get_batch(torch.arange(min(len(dataset), export.EXAMPLES))),
                           exp.prepare)
    with torch.no_grad():
        return spec.inputs, spec.reference(*spec.inputs)


def _load(path):
    """The file as a user loads it, as a function of tensors."""
    if path.suffix == ".onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [given.name for given in session.get_inputs()]
        return lambda *xs: torch.from_numpy(
            session.run(None, {n: x.numpy() for n, x in zip(names, xs, strict=True)})[0])
    if path.suffix == ".pt2":
        return torch.export.load(path).module()
    return torch.jit.load(str(path))


@pytest.mark.parametrize("fmt", FORMAT_CASES)
@pytest.mark.parametrize("family", ["cnn", "lstm", "gan", "vae", "segment"])
def test_each_family_exports_in_each_format_and_matches_the_eager_model(runs, family, fmt):
    root, found = runs
    result = kdl("export", found[family], "--format", fmt, "--runs-dir", root)
    assert result.exit_code == 0, result.stderr
    path = root / found[family] / "export" / f"model-best{export.SUFFIXES[fmt]}"
    assert result.last_line == str(path)
    assert "against the eager model on" in result.stderr

    inputs, eager = _eager(root, found[family])
    model = _load(path)
    with torch.no_grad():
        for count in (len(inputs[0]), 2):  # another batch size than the example's
            got = model(*(x[:count] for x in inputs))
            assert (got - eager[:count]).abs().max() <= 1e-4 * max(1.0, float(eager.abs().max()))

    metadata = export.read_metadata(path)
    assert metadata["run"] == found[family] and metadata["format"] == fmt
    if family == "segment":
        assert metadata["class_names"] == ["background", "rectangle", "ellipse", "triangle"]
        assert metadata["image_size"] == [16, 16] and eager.shape[1:] == (4, 16, 16)
    if family in ("cnn", "lstm"):
        assert metadata["class_names"] == (["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
                                           if family == "cnn" else ["bad", "good"])
        assert set(metadata["inputs"]) == ({"images"} if family == "cnn" else {"tokens", "lengths"})
    if family == "lstm":
        assert metadata["vocabulary"] == json.loads((root / found[family] / "vocab.json").read_text())
    if family == "cnn":
        assert metadata["image_size"] == [8, 8] and metadata["channels"] == 1
    if family in ("gan", "vae"):
        assert metadata["latent_size"] == inputs[0].shape[1]


def test_the_images_the_file_takes_are_raw_bytes_scaled_inside(runs, tmp_path):
    """uint8 pixels in, the run's logits out: the normalisation travels with the model."""
    root, found = runs
    out = tmp_path / "cnn.pt"
    assert kdl("export", found["cnn"], "--format", "torchscript", "--out", out,
               "--runs-dir", root).exit_code == 0
    inputs, eager = _eager(root, found["cnn"])
    assert inputs[0].dtype == torch.uint8
    assert torch.equal(torch.jit.load(str(out))(inputs[0]), eager)


@pytest.mark.parametrize("fmt", FORMAT_CASES)
def test_an_export_that_drifts_from_the_eager_model_is_an_error(runs, fmt, monkeypatch, tmp_path):
    """A file whose outputs are off by 1e-2 (added to the exported generator only) fails the
    check: exit 2, the difference said, nothing written."""
    root, found = runs
    forward = drawing.InUnitRange.forward
    writer = export.WRITERS[fmt]

    def drifting(spec, path, metadata):
        monkeypatch.setattr(drawing.InUnitRange, "forward", lambda self, z: forward(self, z) + 1e-2)
        try:
            writer(spec, path, metadata)
        finally:
            monkeypatch.setattr(drawing.InUnitRange, "forward", forward)

    monkeypatch.setitem(export.WRITERS, fmt, drifting)
    out = tmp_path / "gan.model"
    result = kdl("export", found["gan"], "--format", fmt, "--out", out, "--runs-dir", root)
    assert result.exit_code == 2
    assert "drifts from the eager model" in result.stderr and "0.01" in result.stderr
    assert not out.exists()


def test_a_missing_checkpoint_is_named(runs, tmp_path):
    root, found = runs
    (root / found["cnn"] / "checkpoints" / "last.pt").rename(tmp_path / "kept.pt")
    try:
        result = kdl("export", found["cnn"], "--checkpoint", "last", "--format", "onnx",
                     "--runs-dir", root)
    finally:
        (tmp_path / "kept.pt").rename(root / found["cnn"] / "checkpoints" / "last.pt")
    assert result.exit_code == 2
    assert "checkpoints/last.pt" in result.stderr and "Traceback" not in result.stderr


def test_out_onto_a_folder_is_refused_before_any_work(runs, tmp_path, monkeypatch):
    root, found = runs
    monkeypatch.setattr(export, "load_run", lambda *args: pytest.fail("loaded the run"))
    result = kdl("export", found["cnn"], "--format", "torchscript", "--out", tmp_path, "--runs-dir", root)
    assert result.exit_code == 2 and str(tmp_path) in result.stderr and "not a file" in result.stderr


def test_a_bad_format_and_a_missing_onnx_package_are_named(runs, monkeypatch):
    root, found = runs
    result = kdl("export", found["cnn"], "--format", "tflite", "--runs-dir", root)
    assert result.exit_code == 2 and "torchscript, exported-program, onnx" in result.stderr
    find_spec = export.importlib.util.find_spec
    monkeypatch.setattr(export.importlib.util, "find_spec",
                        lambda name: None if name == "onnxscript" else find_spec(name))
    result = kdl("export", found["cnn"], "--format", "onnx", "--runs-dir", root)
    assert result.exit_code == 2 and "pip install 'karpathy-runner[export]'" in result.stderr


def test_a_run_with_nothing_to_export_says_so(tmp_path):
    """A language model has no classifier or generator of images: exit 2, saying what exports."""
    runs = tmp_path / "runs"
    run_id = _trained(runs, CONFIGS / "stdlib_char_lstm.yaml", "train.max_steps=2", "train.device=cpu",
                      "model.hidden_size=16", "model.embedding_size=16")
    result = kdl("export", run_id, "--format", "torchscript", "--runs-dir", runs)
    assert result.exit_code == 2
    assert "language_model run, which has no model to export" in result.stderr
    assert not (runs / run_id / "export").exists()


def test_an_export_folder_that_is_a_link_is_refused(runs, tmp_path):
    """export/ is the run's own: a symlink there is refused, nothing written through it."""
    root, found = runs
    folder = root / found["cnn"] / "export"
    kept = tmp_path / "kept"
    if folder.exists():
        folder.rename(kept)
    folder.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    try:
        result = kdl("export", found["cnn"], "--format", "torchscript", "--runs-dir", root)
    finally:
        folder.unlink()
        if kept.exists():
            kept.rename(folder)
    assert result.exit_code == 2 and "export" in result.stderr and "symbolic link" in result.stderr
    assert not any((tmp_path / "elsewhere").iterdir())
