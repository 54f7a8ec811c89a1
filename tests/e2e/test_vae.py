"""The VAE in the one loop: network shapes for every supported image size, the bound against
torch.distributions, KL warm-up and beta, epoch grids of samples and reconstructions, exact
resume (stopped at steps, and SIGKILLed at a random moment), kdl sample's samples and
interpolations, and kdl eval with and without a classifier's features."""

from __future__ import annotations

import json

import pytest
import torch
from datafiles import write_folder
from kdl import kdl
from PIL import Image
from stopping import (
    assert_resumes_after_random_kill,
    assert_same_training,
    final_state,
    read_json,
    sets,
    stopped_and_resumed,
)
from test_gan import classifier_run  # noqa: F401 (a fixture)
from torch.distributions import Bernoulli, Normal, kl_divergence

from karpathy_runner import evaluate
from karpathy_runner.config.models import VAEModelConfig
from karpathy_runner.config.tasks import VAETaskConfig
from karpathy_runner.data import DataInfo
from karpathy_runner.models import build_model
from karpathy_runner.tasks.vae import VAE, slerp

VAE_YAML = """# kdl train vae.yaml
name: tiny_vae
data: {name: digits, batch_size: 64}
model: {name: vae, latent_size: 8, width: 16}
task: {name: vae, kl_warmup_steps: 10}
optimizer: {name: adam, lr: 0.002}
train: {epochs: 2, device: cpu, log_every_steps: 3, deterministic: true}
"""

pytestmark = pytest.mark.usefixtures("single_thread")  # as the kdl processes run


@pytest.fixture
def vae_yaml(tmp_path):
    path = tmp_path / "vae.yaml"
    path.write_text(VAE_YAML)
    return path


def train(runs, config, *overrides):
    return kdl("train", config, *sets(overrides), "--runs-dir", runs, "--quiet")


def info(side: int, channels: int) -> DataInfo:
    return DataInfo(kind="image", num_classes=10, class_names=[str(i) for i in range(10)],
                    in_channels=channels, image_size=(side, side), mean=(0.5,) * channels,
                    std=(0.25,) * channels)


@pytest.mark.parametrize("side", [8, 12, 28, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_encoder_and_decoder_fit_every_supported_size(side, channels):
    model = build_model(VAEModelConfig(latent_size=5, width=4), info(side, channels))
    mu, logvar = model.encode(torch.rand(2, channels, side, side))
    assert mu.shape == logvar.shape == (2, 5)
    assert model.decode(mu).shape == (2, channels, side, side)


@pytest.mark.parametrize("decoder", ["bernoulli", "gaussian"])
def test_the_bound_is_the_negative_elbo_of_torch_distributions(decoder):
    torch.manual_seed(0)
    model_cfg = VAEModelConfig(latent_size=3, width=4, batch_norm=False, decoder=decoder)
    task = VAE(VAETaskConfig(beta=4.0, kl_warmup_steps=10), model_cfg, info(8, 1), torch.device("cpu"))
    model = task.model
    if decoder == "gaussian":
        model.log_scale.data.fill_(-1.3)
    x, noise = torch.rand(5, 1, 8, 8), torch.randn(5, 3)
    recon, kl = task._terms(x, noise)
    mu, logvar = model.encode(x)
    sigma = torch.exp(0.5 * logvar)
    output = model.decode(mu + sigma * noise)
    likelihood = (Bernoulli(logits=output, validate_args=False) if decoder == "bernoulli"
                  else Normal(output, torch.exp(model.log_scale.view(1, -1, 1, 1))))
    torch.testing.assert_close(recon, -likelihood.log_prob(x).flatten(1).sum(1))
    torch.testing.assert_close(kl, kl_divergence(Normal(mu, sigma), Normal(0.0, 1.0)).sum(1))
    # the KL weight rises from beta/10 to beta over the 10 warm-up steps, then stays
    assert [task._beta(step) for step in (0, 4, 9, 10, 500)] == pytest.approx([0.4, 2.0, 4.0, 4.0, 4.0])


def test_slerp_walks_the_great_circle_from_start_to_end():
    start, end = torch.tensor([[1.0, 0.0], [2.0, 0.0]]), torch.tensor([[0.0, 1.0], [4.0, 0.0]])
    path = slerp(start, end, torch.linspace(0, 1, 3))  # (2, 3, 2)
    torch.testing.assert_close(path[:, 0], start)
    torch.testing.assert_close(path[:, -1], end)
    torch.testing.assert_close(path[0, 1], torch.tensor([0.5**0.5, 0.5**0.5]))
    torch.testing.assert_close(path[1, 1], torch.tensor([3.0, 0.0]))  # parallel: linear


def test_epoch_grids_samples_and_exact_resume(tmp_path, vae_yaml, monkeypatch):
    straight = train(tmp_path / "straight", vae_yaml)
    assert straight.exit_code == 0, straight.stderr
    baseline = tmp_path / "straight" / straight.last_line
    folder = stopped_and_resumed(monkeypatch, lambda runs: train(runs, vae_yaml), tmp_path / "stopped",
                                 [7, 25], VAE)
    assert_same_training(folder, baseline)
    state = final_state(folder)
    assert state["task"]["shown"].shape == (32, 1, 8, 8)  # the first batch's images, kept
    meta = read_json(folder / "meta.json")
    assert meta["metric_modes"] == {"loss": "min", "nelbo": "min", "recon": "min", "kl": "min"}
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    val = [row for row in rows if row["split"] == "val"]
    assert all(row["nelbo"] == pytest.approx(row["recon"] + row["kl"]) for row in val)
    assert all(row["loss"] == pytest.approx(row["nelbo"]) for row in val)  # beta 1
    # a warm-up of 10 steps: the first window's loss weighs the KL less than its nelbo does
    first = next(row for row in rows if row["split"] == "train")
    assert first["loss"] < first["nelbo"]
    assert read_json(folder / "summary.json")["best"]["metric"] == "val.nelbo"

    # after each epoch: 64 samples of fixed noise, and 32 images each beside its reconstruction
    for epoch in (1, 2):
        for name in (f"epoch-{epoch:03d}.png", f"epoch-{epoch:03d}-reconstructions.png"):
            grid = folder / "samples" / name
            assert grid.read_bytes() == (baseline / "samples" / name).read_bytes()
            with Image.open(grid) as picture:
                assert picture.size == (8 * 10 + 2, 8 * 10 + 2)
    with Image.open(folder / "samples" / "epoch-002-reconstructions.png") as picture:
        pixels = torch.tensor(list(picture.convert("L").getdata())).view(82, 82)
    inputs = state["task"]["shown"][:4, 0].float()  # the first row: 4 (input, reconstruction) pairs
    tiles = [pixels[2:10, 2 + 10 * i:10 + 10 * i].float() for i in range(8)]
    own = other = 0.0
    for i in range(4):
        assert torch.equal(tiles[2 * i], inputs[i])
        assert not torch.equal(tiles[2 * i + 1], inputs[i])
        own += float((tiles[2 * i + 1] - inputs[i]).abs().mean())
        other += sum(float((tiles[2 * i + 1] - inputs[j]).abs().mean()) for j in range(4) if j != i) / 3
    assert own < other  # each reconstruction is nearer its own input than the others

    # kdl sample: n samples, and 9 interpolations of 9 steps beside them
    out = [kdl("sample", folder.name, "-n", "9", "--seed", str(s), "--out", tmp_path / f"{i}.png",
               "--runs-dir", tmp_path / "stopped") for i, s in enumerate((5, 5, 6))]
    assert [r.exit_code for r in out] == [0, 0, 0]
    assert out[0].stdout.split() == [str(tmp_path / "0.png"), str(tmp_path / "0-interpolations.png")]
    first, again, other = ((tmp_path / f"{i}.png").read_bytes() for i in range(3))
    assert first == again != other
    paths = (tmp_path / "0-interpolations.png", tmp_path / "1-interpolations.png")
    assert paths[0].read_bytes() == paths[1].read_bytes()
    with Image.open(tmp_path / "0-interpolations.png") as picture:
        assert picture.size == (9 * 10 + 2, 9 * 10 + 2)
    written = kdl("sample", folder.name, "--runs-dir", tmp_path / "stopped")
    assert written.exit_code == 0, written.stderr
    assert [p.split("/")[-1] for p in written.stdout.split()] == [
        "sample-best-seed0-n64.png", "sample-best-seed0-n64-interpolations.png"]
    # a path beside --out that is not a regular file: refused before anything is written
    (tmp_path / "x-interpolations.png").mkdir()
    refused = kdl("sample", folder.name, "--out", tmp_path / "x.png", "--runs-dir", tmp_path / "stopped")
    assert refused.exit_code == 2 and "x-interpolations.png" in refused.stderr
    assert not (tmp_path / "x.png").exists()
    refused = kdl("sample", folder.name, "--length", "5", "--runs-dir", tmp_path / "stopped")
    assert refused.exit_code == 2
    assert "--length does not apply to a vae run" in " ".join(refused.stderr.split())


def test_eval_reports_the_bound_alone_or_with_sample_scores(tmp_path, vae_yaml, classifier_run,  # noqa: F811
                                                            monkeypatch):
    monkeypatch.setattr(evaluate, "inception_weights", lambda: tmp_path / "no-inception.pth")
    result = train(tmp_path / "runs", vae_yaml)
    assert result.exit_code == 0, result.stderr
    plain = kdl("eval", result.last_line, "--split", "test", "--runs-dir", tmp_path / "runs", "--json")
    assert plain.exit_code == 0, plain.stderr
    metrics = json.loads(plain.stdout)["metrics"]
    assert set(metrics) == {"loss", "nelbo", "recon", "kl"}
    again = kdl("eval", result.last_line, "--split", "test", "--runs-dir", tmp_path / "runs", "--json")
    assert json.loads(again.stdout)["metrics"] == metrics
    # its own seeded noise, whatever the training's random streams: the last epoch's val numbers
    val = kdl("eval", result.last_line, "--checkpoint", "last", "--runs-dir", tmp_path / "runs", "--json")
    rows = (tmp_path / "runs" / result.last_line / "metrics.jsonl").read_text().splitlines()
    last_val = [json.loads(row) for row in rows if json.loads(row)["split"] == "val"][-1]
    assert json.loads(val.stdout)["metrics"]["nelbo"] == pytest.approx(last_val["nelbo"], rel=1e-6)
    scored = kdl("eval", result.last_line, "--features", classifier_run, "--runs-dir", tmp_path / "runs",
                 "--json")
    assert scored.exit_code == 0, scored.stderr
    metrics = json.loads(scored.stdout)["metrics"]
    name = classifier_run.name
    assert {"nelbo", f"fd@{name}", f"classifier_score@{name}", f"class_coverage@{name}"} <= set(metrics)


@pytest.mark.parametrize("sets_, fragments", [
    (["model.width=0"], ["model.width"]),
    (["data.name=imdb"], ["no task trains model.name 'vae' on data.name 'imdb'"]),
    (["data.name=image_folder", "data.image_size=30", "data.batch_size=2"],
     ["model.name: vae (sized as DCGAN) cannot build 30x30 images", "data.image_size"]),
])
def test_a_vae_that_cannot_be_built_exits_2(tmp_path, vae_yaml, sets_, fragments):
    write_folder(tmp_path / "photos", "train", per_class=3)
    root = [f"data.root={tmp_path / 'photos'}"] if "data.name=image_folder" in sets_ else []
    result = train(tmp_path / "runs", vae_yaml, *sets_, *root)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in " ".join(result.stderr.split())
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume_ends_like_an_uninterrupted_run(tmp_path, vae_yaml):
    assert_resumes_after_random_kill(tmp_path, vae_yaml, ["train.epochs=4", "train.checkpoint_every_steps=4"],
                                     seed=20261204, steps=4 * 21)
