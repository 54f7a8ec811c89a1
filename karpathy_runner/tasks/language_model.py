"""Character-level language modelling (char-rnn): predict each next character.

Metrics: loss in nats per character, bits per character (loss / ln 2) and perplexity (e^loss).
With `carry_hidden` the batches come in corpus order, each row a stream through the corpus, and
the hidden state carries from one batch to the next, detached: truncated backprop through time
over seq_len characters, while the state sees the whole stream. The carried state is part of
every checkpoint, so a run resumed mid-epoch continues exactly. Validation carries its own state
through the val streams the same way. Samples are drawn one character at a time with their own
seeded generator, so drawing them never moves the training's random streams.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..config.families import ModelConfig
from ..config.tasks import LanguageModelConfig
from ..data import DataInfo
from ..errors import KdlError
from ..models import build_model
from .base import Sample, SampleRequest, Task, Updater
from .steps import StepResult, Totals


def _detached(hidden: Any) -> Any:
    if hidden is None:
        return None
    return tuple(h.detach() for h in hidden) if isinstance(hidden, tuple) else hidden.detach()


MAX_SAMPLE_LENGTH = 10_000_000  # characters one `kdl sample` draws (their ids held: 80 MB)
STREAM_EVERY = 256  # characters drawn between two pieces handed to a request's stream


class LanguageModel(Task):
    can_sample = True
    sample_options = ("length", "temperature", "top_k", "prime")

    def __init__(self, cfg: LanguageModelConfig, model_cfg: ModelConfig, info: DataInfo,
                 device: torch.device):
        super().__init__(cfg, model_cfg, info, device)
        self.models = {"model": build_model(model_cfg, info)}
        self.vocabulary = list(info.vocabulary)
        self.index = {char: i for i, char in enumerate(self.vocabulary)}
        self.ordered_batches = cfg.carry_hidden
        self.hidden: Any = None  # carried through the training streams
        self.eval_hidden: Any = None  # carried through the val streams

    @property
    def model(self) -> torch.nn.Module:
        return self.models["model"]

    def on_epoch_start(self, epoch: int) -> None:
        self.hidden = None  # the streams start again from the corpus's beginning

    def on_eval_start(self) -> None:
        self.eval_hidden = None

    def train_step(self, batch: tuple[torch.Tensor, ...], step: int, updater: Updater) -> StepResult:
        x, y = batch  # (B, T) inputs and next-character targets
        # forward, from the state the previous batch left (or zeros)
        with updater.autocast():
            logits, hidden = self.wrapped("model")(x, self._start(self.hidden, x))  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        # backward and update
        updater.step("model", loss)
        # a skipped step's state may hold NaN: start the streams afresh instead
        self.hidden = _detached(hidden) if self.cfg.carry_hidden and not updater.skipped else None
        return StepResult(count=y.numel(), losses={"loss": loss.detach()})

    @torch.no_grad()
    def eval_step(self, batch: tuple[torch.Tensor, ...], detailed: bool = False) -> StepResult:
        x, y = batch
        logits, hidden = self.model(x, self._start(self.eval_hidden, x))
        self.eval_hidden = hidden if self.cfg.carry_hidden else None
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        return StepResult(count=y.numel(), losses={"loss": loss})

    @staticmethod
    def _start(hidden: Any, x: torch.Tensor) -> Any:
        """The carried state, if it fits this batch (a last, shorter batch starts from zeros)."""
        first = hidden[0] if isinstance(hidden, tuple) else hidden
        return hidden if first is not None and first.shape[1] == x.shape[0] else None

    def summarize(self, totals: Totals, detailed: bool = False) -> dict[str, Any]:
        loss = super().summarize(totals)["loss"]
        return {"loss": loss, "bpc": loss / math.log(2),
                "perplexity": math.exp(loss) if loss < 700 else math.inf}

    def state_dict(self) -> dict[str, Any]:
        hidden = self.hidden
        return {"hidden": list(hidden) if isinstance(hidden, tuple) else hidden}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        hidden = state.get("hidden")
        if isinstance(hidden, list):
            hidden = tuple(h.to(self.device) for h in hidden)
        self.hidden = hidden.to(self.device) if isinstance(hidden, torch.Tensor) else hidden

    # ------------------------------------------------------------------ samples

    def example_inputs(self, batch: tuple[torch.Tensor, ...]) -> Sample:
        return Sample(text="\n----\n".join(self.decode(row) for row in batch[0][:4]))

    def on_epoch_end(self, epoch: int) -> Sample | None:
        if self.cfg.sample_length == 0:
            return None
        request = SampleRequest(seed=epoch, length=self.cfg.sample_length)
        return self.sample(request)

    @torch.no_grad()
    def sample(self, request: SampleRequest) -> Sample:
        """`length` characters after `prime`, one at a time: logits / temperature, the top k
        kept, then a draw from a generator seeded with `seed`."""
        temperature = request.temperature or self.cfg.sample_temperature
        training = self.model.training
        self.model.train(False)
        generator = torch.Generator(device=self.device).manual_seed(request.seed)
        prime = request.prime or "\n"
        ids = torch.tensor([[self.index.get(char, 0) for char in prime]], device=self.device)
        logits, hidden = self.model(ids)  # (1, len(prime), V)
        drawn = torch.empty(request.length, dtype=torch.long, device=self.device)
        stream, shown = request.stream, 0  # (pieces decoded every STREAM_EVERY: one sync each)
        if stream is not None and request.prime:
            stream(request.prime)
        for i in range(request.length):
            scores = logits[0, -1].float() / temperature  # (V,)
            if request.top_k:
                kth = torch.topk(scores, min(request.top_k, scores.numel())).values[-1]
                scores = scores.masked_fill(scores < kth, -math.inf)
            char = torch.multinomial(F.softmax(scores, dim=0), 1, generator=generator)  # (1,)
            drawn[i] = char[0]
            logits, hidden = self.model(char.view(1, 1), hidden)
            if stream is not None and (i + 1 - shown == STREAM_EVERY or i + 1 == request.length):
                stream(self.decode(drawn[shown:i + 1]))
                shown = i + 1
        self.model.train(training)
        return Sample(text=(request.prime or "") + self.decode(drawn))

    def check_sample(self, request: SampleRequest) -> None:
        super().check_sample(request)
        if request.length > MAX_SAMPLE_LENGTH:
            raise KdlError(f"--length {request.length}: a sample is at most {MAX_SAMPLE_LENGTH:,} "
                           "characters (drawn one at a time, that alone takes hours). Draw less, "
                           "or several samples with other --seed values.")

    def decode(self, ids: torch.Tensor) -> str:
        return "".join(self.vocabulary[i] for i in ids.tolist())

