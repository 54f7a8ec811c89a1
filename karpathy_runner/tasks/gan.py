"""GAN training (DCGAN) in the one loop: each step updates the discriminator, then (every
`d_steps` steps) the generator, through the updater like any task, so checkpoints, exact
resume, signals, precision and the non-finite policy (a NaN in either loss skips the whole
step) hold as they do for a classifier.

Losses: `bce`, the non-saturating loss of the DCGAN paper (D: real -> 1 - label_smoothing, fake
-> 0; G: fake -> 1), or `hinge` (D: relu(1 - D(x)) + relu(1 + D(G(z))); G: -D(G(z))). An
exponential moving average of the generator's weights (`ema_decay`) draws the samples: the grid
after each epoch (the same noise every epoch, so the grids show progress), `kdl sample`, and the
images `kdl eval` scores. Images reach the networks scaled to [-1, 1].
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

from ..config.models import GANModelConfig
from ..config.tasks import GANTaskConfig
from ..data import DataInfo, Prepare
from ..models import build_model
from . import drawing
from .base import Export, Sample, SampleRequest, Task, Updater
from .steps import StepResult, Totals

GRID_SEED = 0  # the fixed noise of the epoch grids


class GAN(Task):
    draws_images = True
    can_sample = True
    sample_options = ("n",)

    def __init__(self, cfg: GANTaskConfig, model_cfg: GANModelConfig, info: DataInfo,
                 device: torch.device):
        super().__init__(cfg, model_cfg, info, device)
        networks = build_model(model_cfg, info)
        self.models = {"generator": networks.generator, "discriminator": networks.discriminator}
        if cfg.ema_decay is not None:
            self.models["generator_ema"] = copy.deepcopy(networks.generator).requires_grad_(False)
        self.latent_size = model_cfg.latent_size
        self.image_size = info.image_size
        shape = (1, len(info.mean), 1, 1)
        self.mean = torch.tensor(info.mean, dtype=torch.float32).view(shape)
        self.std = torch.tensor(info.std, dtype=torch.float32).view(shape)
        self.grid_noise = self._noise(cfg.grid_size, torch.Generator().manual_seed(GRID_SEED))
        self.eval_generator: torch.Generator | None = None

    def to(self, device: torch.device) -> None:
        super().to(device)
        self.mean, self.std, self.grid_noise = (t.to(device) for t in (self.mean, self.std, self.grid_noise))

    @property
    def sampler(self) -> torch.nn.Module:
        """The generator that draws samples: the moving average, when there is one."""
        return self.models.get("generator_ema", self.models["generator"])

    def _noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = generator.device if generator is not None else self.device
        return torch.randn(n, self.latent_size, generator=generator, device=device)  # (n, nz)

    def _symmetric(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (the data's mean and std) -> [-1, 1], the generator's range."""
        return (x * self.std + self.mean) * 2 - 1

    # ------------------------------------------------------------------ losses

    def _d_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        if self.cfg.loss == "hinge":
            return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
        target = torch.full_like(real, 1.0 - self.cfg.label_smoothing)
        return (F.binary_cross_entropy_with_logits(real, target)
                + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))

    def _g_loss(self, fake: torch.Tensor) -> torch.Tensor:
        if self.cfg.loss == "hinge":
            return -fake.mean()
        return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))

    @staticmethod
    def _beliefs(real: torch.Tensor, fake: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sums of the discriminator's belief that each image is real."""
        return {"d_real": torch.sigmoid(real.detach().float()).sum(),
                "d_fake": torch.sigmoid(fake.detach().float()).sum()}

    # ------------------------------------------------------------------ steps

    def train_step(self, batch: tuple[torch.Tensor, ...], step: int, updater: Updater) -> StepResult:
        # G and D through their wrappers (`wrapped`: with several processes, DDP averages a
        # model's gradients in a backward after such a forward). G's forward is in phase 1, but
        # its gradients come in phase 2's backward (phase 1's stops at fake.detach()), or not at
        # all between G's updates (d_steps > 1), which DDP allows
        generator, discriminator = self.wrapped("generator"), self.wrapped("discriminator")
        real = self._symmetric(batch[0])  # (B, C, H, W)
        # phase 1: update D on real images and on the generator's, held fixed
        with updater.autocast():
            fake = generator(self._noise(real.shape[0]))
            real_logits = discriminator(real)  # (B,)
            fake_logits = discriminator(fake.detach())
            d_loss = self._d_loss(real_logits, fake_logits)
        updater.step("discriminator", d_loss)
        # phase 2: every d_steps steps, update G through the updated D, held fixed: D called
        # directly, so none of its gradients (unused: its optimizer has stepped) are averaged
        if step % self.cfg.d_steps == 0:
            with updater.autocast():
                g_loss = self._g_loss(self.models["discriminator"](fake))
            updater.step("generator", g_loss)
            if not updater.skipped:
                self._update_ema()
        else:  # reported, not trained: what G's loss is against D before this step's update
            g_loss = self._g_loss(fake_logits)
        return StepResult(count=real.shape[0],
                          losses={"d_loss": d_loss.detach(), "g_loss": g_loss.detach()},
                          sums=self._beliefs(real_logits, fake_logits))

    @torch.no_grad()
    def _update_ema(self) -> None:
        if "generator_ema" not in self.models:
            return
        decay = self.cfg.ema_decay
        ema, raw = self.models["generator_ema"], self.models["generator"]
        for average, current in zip(ema.parameters(), raw.parameters(), strict=True):
            average.lerp_(current, 1.0 - decay)
        for average, current in zip(ema.buffers(), raw.buffers(), strict=True):
            average.copy_(current)  # batch-norm statistics: the latest

    def on_eval_start(self) -> None:
        # its own seeded noise: eval gives the same number each time and leaves the training's
        # random streams as they were
        self.eval_generator = torch.Generator(device=self.device).manual_seed(GRID_SEED + 1)

    @torch.no_grad()
    def eval_step(self, batch: tuple[torch.Tensor, ...], detailed: bool = False) -> StepResult:
        discriminator = self.models["discriminator"]
        real = self._symmetric(batch[0])
        fake = self.sampler(self._noise(real.shape[0], self.eval_generator))
        real_logits, fake_logits = discriminator(real).float(), discriminator(fake).float()
        return StepResult(count=real.shape[0],
                          losses={"d_loss": self._d_loss(real_logits, fake_logits),
                                  "g_loss": self._g_loss(fake_logits)},
                          sums=self._beliefs(real_logits, fake_logits))

    def summarize(self, totals: Totals, detailed: bool = False) -> dict[str, Any]:
        count = max(totals.count, 1.0)
        return {**super().summarize(totals), **{k: float(v) / count for k, v in totals.sums.items()}}

    # ------------------------------------------------------------------ samples

    @torch.no_grad()
    def generate(self, noise: torch.Tensor) -> torch.Tensor:
        """uint8 (n, C, H, W) images from noise (n, nz), drawn by the sampler in eval mode."""
        sampler = self.sampler
        training = sampler.training
        sampler.train(False)
        images = sampler(noise).float()
        sampler.train(training)
        return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)

    def example_inputs(self, batch: tuple[torch.Tensor, ...]) -> Sample:
        return Sample(images=batch[0][:32])

    def on_epoch_end(self, epoch: int) -> Sample:
        return Sample(images=self.generate(self.grid_noise))

    def sample(self, request: SampleRequest) -> Sample:
        """n images from the seed's noise, drawn a batch at a time."""
        generator = torch.Generator(device=self.device).manual_seed(request.seed)
        return Sample(images=drawing.in_batches(self._noise(request.n, generator), self.generate))

    def check_sample(self, request: SampleRequest) -> None:
        super().check_sample(request)
        drawing.check_grid(request.n, self.image_size)

    def export(self, batch: tuple[torch.Tensor, ...], prepare: Prepare) -> Export:
        """The sampler (the moving average, when there is one): noise -> images in [0, 1]."""
        noise = torch.randn(len(batch[0]), self.latent_size, generator=torch.Generator().manual_seed(0))
        module = drawing.InUnitRange(self.sampler, lambda images: (images + 1) / 2).eval()
        metadata = {"task": self.name, "latent_size": self.latent_size,
                    "image_size": list(self.image_size), "channels": len(self.mean),
                    "inputs": {"noise": f"float32 (N, {self.latent_size}): standard normal draws"},
                    "outputs": {"images": "float32 (N, C, H, W) in [0, 1]: x 255, rounded, for bytes"}}
        return Export(module, (noise,), ("noise",), ("images",), module, metadata, "noise vectors")

