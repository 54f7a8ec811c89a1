"""train.compile: models compiled in place, the compile timed apart, and a compiled bf16 graph
with finite gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from kdl import train_tiny
from stopping import final_state, read_json

from karpathy_runner.models.speedrun import SpeedrunNet


def test_compile_flag_trains_in_place_and_times_the_compile_apart(tmp_path):
    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not available on this platform")
    from torch._dynamo.utils import counters

    # one conv stage without batch norm or dropout: a small graph, compiled in less time
    small = ["--set", "train.max_steps=4", "--set", "model.channels=[4]", "--set",
             "model.batch_norm=false", "--set", "model.dropout=0"]
    plain = train_tiny(tmp_path / "plain", *small)
    counters.clear()
    compiled = train_tiny(tmp_path / "compiled", *small, "--set", "train.compile=true")
    assert compiled.exit_code == 0, compiled.stderr
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo captured the model's graph
    folder = tmp_path / "compiled" / compiled.last_line
    state = final_state(folder)["models"]["model"]
    # in place: the same keys as an uncompiled run, no _orig_mod. prefix
    assert list(state) == list(final_state(tmp_path / "plain" / plain.last_line)["models"]["model"])
    assert read_json(folder / "meta.json")["compile_s"] > 0
    assert "torch.compile: the first step (compiling) took" in (folder / "train.log").read_text()
    assert read_json(folder / "summary.json")["steps"] == 4


def test_the_speedrun_net_compiled_in_bf16_on_the_cpu_has_finite_gradients():
    """Its global max pool once was `amax`, whose compiled bf16 backward on the CPU (torch 2.14)
    found no element equal to the max and divided by that count of 0: NaN gradients."""
    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not available on this platform")
    torch.manual_seed(0)
    # one conv group on 8x8 images: a small graph to compile, with the pooling that failed
    model = SpeedrunNet(3, 10, stem_width=8, widths=[16], bn_momentum=0.6, logit_scale=1 / 9,
                        bias_lr_scale=64.0)
    x, y = torch.randn(64, 3, 8, 8), torch.randint(0, 10, (64,))
    grads = []
    for compiled in (False, True):
        net = copy.deepcopy(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy((torch.compile(net) if compiled else net)(x), y)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.requires_grad]))
    eager, compiled = grads
    assert torch.isfinite(compiled).all()
    # bf16 kernels round differently, so the gradients only point the same way
    assert F.cosine_similarity(compiled, eager, dim=0) > 0.95
