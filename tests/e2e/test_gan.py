"""DCGAN in the one loop: network shapes for every supported image size, both networks trained,
the moving average, sample grids, exact resume of both optimizers and the average, and sample
quality (Frechet distance, classifier score, class coverage) in a classifier's feature space."""

from __future__ import annotations

import json
import types

import pytest
import torch
from datafiles import write_folder
from kdl import CONFIGS, kdl
from PIL import Image
from stopping import assert_same_training, final_state, one_thread, read_json, sets, stopped_and_resumed

from karpathy_runner.build import Experiment, build_experiment, build_trainer, eval_batches
from karpathy_runner.config.loading import load_config
from karpathy_runner.config.models import GANModelConfig
from karpathy_runner.evaluate import InceptionFeatures, RunFeatures, image_quality, load_run
from karpathy_runner.models import build_model
from karpathy_runner.models.gan import start_size
from karpathy_runner.runfolder.writer import RunWriter
from karpathy_runner.tasks.gan import GAN
from karpathy_runner.ui.progress import Reporter

GAN_YAML = """# kdl train gan.yaml
name: tiny_gan
data: {name: digits, batch_size: 64}
model: {name: gan, latent_size: 16, width: 16}
optimizer: {name: adam, lr: 0.0002, betas: [0.5, 0.999]}
train: {epochs: 2, device: cpu, log_every_steps: 3, deterministic: true}
"""


pytestmark = pytest.mark.usefixtures("single_thread")  # as the kdl processes run


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    """A digits classifier good enough to judge digits (configs/digits_cnn.yaml, 4 epochs)."""
    runs = tmp_path_factory.mktemp("runs")
    with one_thread():
        result = kdl("train", CONFIGS / "digits_cnn.yaml", "--set", "train.epochs=4", "--set",
                     "train.device=cpu", "--runs-dir", runs, "--quiet")
    assert result.exit_code == 0, result.stderr
    return runs / result.last_line


@pytest.fixture
def gan_yaml(tmp_path):
    path = tmp_path / "gan.yaml"
    path.write_text(GAN_YAML)
    return path


def train(runs, config, *overrides):
    return kdl("train", config, *sets(overrides), "--runs-dir", runs, "--quiet")


@pytest.mark.parametrize("side", [8, 12, 28, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_generator_and_discriminator_fit_every_supported_size(side, channels):
    info = types.SimpleNamespace(in_channels=channels, image_size=(side, side))
    gan = build_model(GANModelConfig(latent_size=10, width=8), info)
    images = gan.generator(torch.randn(3, 10))
    assert images.shape == (3, channels, side, side)
    assert images.min() >= -1 and images.max() <= 1  # tanh: the range real images are scaled to
    assert gan.discriminator(images).shape == (3,)
    spectral = build_model(GANModelConfig(width=8, spectral_norm=True), info)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in spectral.discriminator.modules())
    assert spectral.discriminator(images).shape == (3,)


def test_sizes_dcgan_cannot_build():
    assert [start_size(s) for s in (8, 28, 32, 64)] == [(4, 1), (7, 2), (4, 3), (4, 4)]
    for side in (4, 6, 30, 36 * 2 + 2):
        with pytest.raises(ValueError):
            start_size(side)


def experiment(tmp_path, gan_yaml, *overrides) -> tuple[Experiment, RunWriter]:
    cfg = load_config(gan_yaml, list(overrides))
    return build_experiment(cfg), RunWriter.create(tmp_path / "runs", cfg.name, cfg.to_yaml())


@pytest.mark.parametrize("loss", ["bce", "hinge"])
def test_a_few_steps_change_both_networks_and_the_average_lags(tmp_path, gan_yaml, loss):
    exp, writer = experiment(tmp_path, gan_yaml, "train.max_steps=3", f"task.loss={loss}")
    before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in exp.task.models.items()}
    trainer = build_trainer(exp, writer, Reporter(quiet=True))
    trainer.fit()
    writer.close()
    after = {name: m.state_dict() for name, m in exp.task.models.items()}
    for name in ("generator", "discriminator", "generator_ema"):
        changed = [k for k in before[name] if not torch.equal(before[name][k], after[name][k])]
        assert changed, name
    raw, ema = after["generator"], after["generator_ema"]
    weights = [k for k in raw if k.endswith("weight")]
    assert all(not torch.equal(raw[k], ema[k]) for k in weights)  # the average trails the weights
    # ema moved 1 - 0.999 of the way per step: far closer to the start than the raw weights are
    first = weights[0]
    start = before["generator"][first]
    assert (ema[first] - start).norm() < 0.1 * (raw[first] - start).norm()


@pytest.mark.parametrize("loss, smoothing, d_loss, g_loss", [
    ("bce", 0.0, 0.0, 10.0),  # D sure and right: no D loss; G's samples rejected: loss ~ logit
    ("bce", 0.2, 2.0, 10.0),  # real labelled 0.8: a confident 10 on real costs 0.2 x 10
    ("hinge", 0.0, 0.0, 10.0),  # beyond the margins: no D loss; G's loss is -D(G(z))
])
def test_the_losses(tmp_path, gan_yaml, loss, smoothing, d_loss, g_loss):
    exp, writer = experiment(tmp_path, gan_yaml, f"task.loss={loss}", f"task.label_smoothing={smoothing}")
    writer.close()
    real, fake = torch.full((4,), 10.0), torch.full((4,), -10.0)
    assert exp.task._d_loss(real, fake).item() == pytest.approx(d_loss, abs=1e-3)
    assert exp.task._g_loss(fake).item() == pytest.approx(g_loss, abs=1e-3)


def test_discriminator_steps_per_generator_step(tmp_path, gan_yaml):
    exp, writer = experiment(tmp_path, gan_yaml, "train.max_steps=4", "task.d_steps=2")
    trainer = build_trainer(exp, writer, Reporter(quiet=True))
    trainer.fit()
    writer.close()
    steps = {name: int(next(iter(o.state.values()))["step"]) for name, o in trainer.optimizers.items()}
    assert steps == {"discriminator": 4, "generator": 2}


def test_epoch_grids_samples_and_exact_resume(tmp_path, gan_yaml, monkeypatch):
    straight = train(tmp_path / "straight", gan_yaml)
    assert straight.exit_code == 0, straight.stderr
    baseline = tmp_path / "straight" / straight.last_line
    folder = stopped_and_resumed(monkeypatch, lambda runs: train(runs, gan_yaml), tmp_path / "stopped",
                                 [7, 25], GAN)
    assert_same_training(folder, baseline)  # both optimizers and the moving average included
    state = final_state(folder)
    assert set(state["models"]) == {"generator", "discriminator", "generator_ema"}
    assert set(state["optimizers"]) == {"generator", "discriminator"}
    assert read_json(folder / "meta.json")["metric_modes"]["d_loss"] == "min"
    summary = read_json(folder / "summary.json")
    assert summary["best"]["metric"] is None and summary["best"]["epoch"] == 2  # best.pt = latest
    shown = kdl("show", folder.name, "--runs-dir", tmp_path / "stopped").stdout
    assert "\ntrain.d_loss\n" in shown and "no best metric: best.pt is the latest epoch's (2)" in shown

    # a grid of the fixed noise after each epoch: 64 digits of 8x8 in 8 columns, 2-pixel gaps
    for epoch in (1, 2):
        grid = folder / "samples" / f"epoch-{epoch:03d}.png"
        assert grid.read_bytes() == (baseline / "samples" / grid.name).read_bytes()
        with Image.open(grid) as picture:
            assert picture.size == (8 * 10 + 2, 8 * 10 + 2)
    grids = [(folder / "samples" / f"epoch-00{epoch}.png").read_bytes() for epoch in (1, 2)]
    assert grids[0] != grids[1]

    out = [kdl("sample", folder.name, "-n", "9", "--seed", str(s), "--out", tmp_path / f"{i}.png",
               "--runs-dir", tmp_path / "stopped") for i, s in enumerate((5, 5, 6))]
    assert [r.exit_code for r in out] == [0, 0, 0]
    first, again, other = ((tmp_path / f"{i}.png").read_bytes() for i in range(3))
    assert first == again != other
    # options for text are refused, not ignored
    refused = kdl("sample", folder.name, "--prime", "x", "--temperature", "0.5", "--out",
                  tmp_path / "no.png", "--runs-dir", tmp_path / "stopped")
    assert refused.exit_code == 2 and not (tmp_path / "no.png").exists()
    assert "--temperature and --prime do not apply to a gan run, which draws images; its options " \
           "are -n (and --seed)" in " ".join(refused.stderr.split())


def test_quality_of_real_images_and_of_noise(classifier_run):
    """In a digits classifier's feature space: real images against themselves are at distance
    zero, cover all ten classes and score high; other real images are near, uniform noise far."""
    trained = classifier_run
    classifier = load_run(trained.parent, trained.name, "best", "cpu")
    features = RunFeatures(trained.name, classifier.exp.task.model, classifier.exp.prepare, 10)
    batches = eval_batches(classifier.exp, classifier.exp.data.val)
    real = [batch[0] for batch in batches.epoch()]
    queue = list(real)
    same = image_quality(real, lambda n: queue.pop(0), features, per_class=True)
    noise = image_quality(real, lambda n: torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8),
                          features, per_class=True)
    test = [batch[0] for batch in eval_batches(classifier.exp, classifier.exp.data.test).epoch()]
    others = torch.cat(test)[:sum(map(len, real))].split([len(b) for b in real])
    queue = list(others)
    other = image_quality(real, lambda n: queue.pop(0), features, per_class=True)
    fd = f"fd@{trained.name}"
    assert abs(same[fd]) < 1e-6 * noise[fd]  # zero up to the eigenvalues' rounding
    assert 0 < other[fd] < 0.5 * noise[fd]
    assert same[f"class_coverage@{trained.name}"] == 1.0
    assert same[f"classifier_score@{trained.name}"] > 3 > noise[f"classifier_score@{trained.name}"]


def test_eval_of_a_gan_run_scores_its_samples(tmp_path, gan_yaml, classifier_run):
    trained = classifier_run
    result = train(tmp_path / "runs", gan_yaml, "train.epochs=1")
    assert result.exit_code == 0, result.stderr
    out = kdl("eval", result.last_line, "--features", str(trained), "--runs-dir", tmp_path / "runs",
              "--json")
    assert out.exit_code == 0, out.stderr
    metrics = json.loads(out.stdout)["metrics"]
    assert {f"fd@{trained.name}", f"classifier_score@{trained.name}",
            f"class_coverage@{trained.name}", "d_loss", "g_loss"} <= metrics.keys()
    assert metrics["features"].startswith("the penultimate layer (")
    again = kdl("eval", result.last_line, "--features", str(trained), "--runs-dir", tmp_path / "runs",
                "--json")
    assert json.loads(again.stdout)["metrics"] == metrics  # seeded samples: the same numbers
    # no classifier given and no Inception weights in the cache: a clear error
    missing = kdl("eval", result.last_line, "--runs-dir", tmp_path / "runs")
    assert missing.exit_code == 2 and "--features RUN" in missing.stderr
    # features from a run of other data are refused
    other = train(tmp_path / "runs", gan_yaml, "train.epochs=1")
    refused = kdl("eval", result.last_line, "--features", other.last_line, "--runs-dir", tmp_path / "runs")
    assert refused.exit_code == 2 and "classification run" in refused.stderr


def test_inception_features_plumbing():
    """Inception-v3 as the extractor (untrained here: no weights can be downloaded in tests)."""
    features = InceptionFeatures(torch.device("cpu"), weights=None)
    pooled, probabilities = features(torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8))
    assert pooled.shape == (2, 2048) and probabilities.shape == (2, 1000)
    assert torch.allclose(probabilities.sum(1), torch.ones(2))


@pytest.mark.parametrize("sets, fragments", [
    (["data.name=imdb"], ["no task trains model.name 'gan' on data.name 'imdb'"]),
    (["data.name=image_folder", "data.image_size=30", "data.batch_size=2"],
     ["cannot build 30x30 images", "data.image_size"]),
])
def test_a_gan_that_cannot_be_built_exits_2(tmp_path, gan_yaml, sets, fragments):
    write_folder(tmp_path / "photos", "train", per_class=3)
    root = [f"data.root={tmp_path / 'photos'}"] if "data.name=image_folder" in sets else []
    result = train(tmp_path / "runs", gan_yaml, *sets, *root)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr
    assert not (tmp_path / "runs").exists()
