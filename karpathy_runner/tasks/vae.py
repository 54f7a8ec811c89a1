"""Variational autoencoding in the one loop: each step encodes a batch into q(z | x) = N(mu,
sigma^2), draws z by the reparameterisation trick, decodes it, and minimises the negative
evidence lower bound (ELBO) of each image in nats:

    recon = -log p(x | z)        (Bernoulli: binary cross-entropy with the decoder's logits;
                                  Gaussian: the normal negative log-density, its own scale)
    kl    = KL(q(z | x) || N(0, I)) = 0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2)
    loss  = recon + beta_t * kl,   nelbo = recon + kl

summed over the pixels and the latent, averaged over the images. beta_t rises linearly from 0 to
`beta` over `kl_warmup_steps`. The pixels are the data's images scaled back to [0, 1] (before
the data's normalisation); a Gaussian decoder's nats are a density's, so they compare only
between runs on the same data.

Eval draws z from its own seeded noise, so `kdl eval` gives the same numbers each time. After each
epoch: a grid of samples from fixed prior noise, and a grid of 32 fixed training images, each
beside its reconstruction. `kdl sample`: n samples from the prior and, beside them, 9
interpolations of 9 steps between pairs of prior draws (along the great circle, which keeps
them at a typical distance from the origin). `kdl eval --features RUN` scores samples as a GAN's.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..config.models import VAEModelConfig
from ..config.tasks import VAETaskConfig
from ..data import DataInfo, Prepare
from ..models import build_model
from . import drawing
from .base import Export, Sample, SampleRequest, Task, Updater
from .steps import StepResult

GRID_SEED = 0  # the fixed noise of the epoch grids
SHOWN = 32  # training images whose reconstructions each epoch shows
STEPS = 9  # images per interpolation, and interpolations per `kdl sample`
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class VAE(Task):
    draws_images = True
    can_sample = True
    scores_optional = True
    sample_options = ("n",)

    def __init__(self, cfg: VAETaskConfig, model_cfg: VAEModelConfig, info: DataInfo,
                 device: torch.device):
        super().__init__(cfg, model_cfg, info, device)
        self.models = {"model": build_model(model_cfg, info)}
        self.latent_size = model_cfg.latent_size
        self.image_size = info.image_size
        shape = (1, len(info.mean), 1, 1)
        self.mean = torch.tensor(info.mean, dtype=torch.float32).view(shape)
        self.std = torch.tensor(info.std, dtype=torch.float32).view(shape)
        self.grid_noise = torch.randn(cfg.grid_size, self.latent_size,
                                      generator=torch.Generator().manual_seed(GRID_SEED))
        self.shown: torch.Tensor | None = None  # uint8: the first training images, kept
        self.eval_generator: torch.Generator | None = None

    @property
    def model(self) -> torch.nn.Module:
        return self.models["model"]

    def to(self, device: torch.device) -> None:
        super().to(device)
        self.mean, self.std, self.grid_noise = (t.to(device) for t in (self.mean, self.std, self.grid_noise))

    def _pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (the data's mean and std) -> [0, 1]."""
        return (x * self.std + self.mean).clamp(0, 1)

    # ------------------------------------------------------------------ the bound

    def _terms(self, x: torch.Tensor, noise: torch.Tensor, network: torch.nn.Module | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(recon, kl) per image (B,) of images x in [0, 1], with z = mu + sigma * noise; the pass
        through the model, or `network` (a training step's: its wrapper)."""
        model = self.model
        mu, logvar, output = (model if network is None else network)(x, noise)
        if model.likelihood == "bernoulli":
            recon = F.binary_cross_entropy_with_logits(output.float(), x, reduction="none")
        else:
            log_scale = model.log_scale.view(1, -1, 1, 1)
            recon = 0.5 * ((x - output.float()) * torch.exp(-log_scale)) ** 2 + log_scale + HALF_LOG_2PI
        kl = 0.5 * (mu.float() ** 2 + logvar.float().exp() - 1 - logvar.float())
        return recon.flatten(1).sum(1), kl.sum(1)

    def _beta(self, step: int) -> float:
        warmup = self.cfg.kl_warmup_steps
        return self.cfg.beta * (min(1.0, (step + 1) / warmup) if warmup else 1.0)

    @staticmethod
    def _result(count: int, recon: torch.Tensor, kl: torch.Tensor, loss: torch.Tensor) -> StepResult:
        return StepResult(count=count, losses={"loss": loss.detach(), "nelbo": (recon + kl).mean().detach(),
                                               "recon": recon.mean().detach(), "kl": kl.mean().detach()})

    # ------------------------------------------------------------------ steps

    def train_step(self, batch: tuple[torch.Tensor, ...], step: int, updater: Updater) -> StepResult:
        x = self._pixels(batch[0])  # (B, C, H, W) in [0, 1]
        if self.shown is None:  # the run's first training images: every epoch's reconstructions
            self.shown = drawing.to_bytes(x[:SHOWN]).cpu()
        with updater.autocast():
            mu_shape = (x.shape[0], self.latent_size)
            recon, kl = self._terms(x, torch.randn(mu_shape, device=x.device), self.wrapped("model"))
            loss = (recon + self._beta(step) * kl).mean()
        updater.step("model", loss)
        return self._result(x.shape[0], recon, kl, loss)

    def on_eval_start(self) -> None:
        # its own seeded noise: eval gives the same numbers each time and leaves the training's
        # random streams as they were
        self.eval_generator = torch.Generator(device=self.device).manual_seed(GRID_SEED + 1)

    @torch.no_grad()
    def eval_step(self, batch: tuple[torch.Tensor, ...], detailed: bool = False) -> StepResult:
        x = self._pixels(batch[0])
        noise = torch.randn(x.shape[0], self.latent_size, generator=self.eval_generator, device=x.device)
        recon, kl = self._terms(x, noise)
        return self._result(x.shape[0], recon, kl, (recon + self.cfg.beta * kl).mean())

    def state_dict(self) -> dict[str, Any]:
        return {"shown": self.shown}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shown = state.get("shown")

    # ------------------------------------------------------------------ samples

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """uint8 (n, C, H, W) expected images of latents z (n, nz), in eval mode."""
        model, training = self.model, self.model.training
        model.train(False)
        images = model.mean_image(model.decode(z).float())
        model.train(training)
        return drawing.to_bytes(images)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> uint8 reconstructions through the posterior means, in eval mode."""
        model, training = self.model, self.model.training
        model.train(False)
        mu, _ = model.encode(images.to(self.device).float() / 255)
        model.train(training)
        return self.decode(mu)

    def example_inputs(self, batch: tuple[torch.Tensor, ...]) -> Sample:
        return Sample(images=batch[0][:32])

    def on_epoch_end(self, epoch: int) -> Sample:
        samples = Sample(images=self.decode(self.grid_noise))
        if self.shown is not None:  # each image beside its reconstruction
            pairs = torch.stack([self.shown, self.reconstruct(self.shown).cpu()], dim=1)
            samples.more["reconstructions"] = Sample(images=pairs.flatten(0, 1))
        return samples

    def sample(self, request: SampleRequest) -> Sample:
        """n images from the prior (a batch at a time), and 9 interpolations (rows of the grid)."""
        generator = torch.Generator(device=self.device).manual_seed(request.seed)
        noise = torch.randn(request.n, self.latent_size, generator=generator, device=self.device)
        samples = Sample(images=drawing.in_batches(noise, self.decode))
        if request.more:
            ends = torch.randn(2, STEPS, self.latent_size, generator=generator, device=self.device)
            path = slerp(ends[0], ends[1], torch.linspace(0, 1, STEPS, device=self.device))
            samples.more["interpolations"] = Sample(images=self.decode(path.flatten(0, 1)))
        return samples

    def check_sample(self, request: SampleRequest) -> None:
        super().check_sample(request)
        drawing.check_grid(request.n, self.image_size)

    def export(self, batch: tuple[torch.Tensor, ...], prepare: Prepare) -> Export:
        """The decoder: latents -> expected images in [0, 1] (the prior's draws: samples)."""
        noise = torch.randn(len(batch[0]), self.latent_size, generator=torch.Generator().manual_seed(0))
        model = self.model
        module = drawing.InUnitRange(model.decoder, model.mean_image).eval()
        metadata = {"task": self.name, "latent_size": self.latent_size, "likelihood": model.likelihood,
                    "image_size": list(self.image_size), "channels": len(self.mean),
                    "inputs": {"latents": f"float32 (N, {self.latent_size}): z; standard normal "
                                          "draws give samples"},
                    "outputs": {"images": "float32 (N, C, H, W) in [0, 1], the expected image: "
                                          "x 255, rounded, for bytes"}}
        return Export(module, (noise,), ("latents",), ("images",), module, metadata, "latent draws")


def slerp(start: torch.Tensor, end: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of each row of start (n, d) to the row of end, at each t (k,):
    (n, k, d); linear where the two are (nearly) parallel."""
    unit = F.normalize(start, dim=1), F.normalize(end, dim=1)
    omega = torch.acos((unit[0] * unit[1]).sum(1).clamp(-1, 1)).view(-1, 1, 1)  # (n, 1, 1)
    t = t.view(1, -1, 1)
    sin = torch.sin(omega)
    linear = sin.abs() < 1e-6
    a = torch.where(linear, 1 - t, torch.sin((1 - t) * omega) / torch.where(linear, 1, sin))
    b = torch.where(linear, t, torch.sin(t * omega) / torch.where(linear, 1, sin))
    return a * start.unsqueeze(1) + b * end.unsqueeze(1)
