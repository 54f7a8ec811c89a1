"""Random states: seeding a run, and every random state it touches saved and restored for an
exact resume. Seeds of generators derived from the run's seed and a position (an epoch, a step,
a rank) are `mixed_seed`'s."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def mixed_seed(seed: int, value: int) -> int:
    """A generator's seed from the run's seed and an epoch or step, within the 64 bits that
    manual_seed takes, whatever the seed (modulo 2**64 keeps every seed's orders as they were)."""
    return (seed * 1_000_003 + value) % 2**64


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict[str, Any]:
    """Every random state a run touches, as plain values that load with weights_only=True."""
    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state()
    # (np.array of the 625 Python ints: a third of the time torch.tensor takes)
    return {
        "python": [version, torch.from_numpy(np.array(keys, dtype=np.int64)), gauss],
        "numpy": [name, torch.from_numpy(np_keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys.tolist()), gauss))
    name, np_keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np_keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
