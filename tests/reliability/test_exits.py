"""A process that holds DataLoader workers still exits."""

from __future__ import annotations

import subprocess
import sys

from kdl import CONFIGS


def test_a_process_holding_streamed_batches_at_exit_still_exits(tmp_path):
    """The workers ignore SIGTERM (a terminal's signal to the process group must not kill them
    mid-step), which multiprocessing's exit handler sends them before waiting for them: kdl
    closes every loader still held first, or the process would wait forever."""
    script = tmp_path / "holds.py"
    script.write_text(
        "from karpathy_runner.config.loading import load_config\n"
        "from karpathy_runner.data import Batches\n"
        "from karpathy_runner.build import streaming, build_experiment\n"
        f"exp = build_experiment(load_config({str(CONFIGS / 'digits_cnn.yaml')!r}, [\n"
        "    'train.device=cpu', 'data.placement=stream', 'data.num_workers=2']))\n"
        "HELD = Batches(exp.data.train, 256, seed=0, shuffle=True, **streaming(exp))\n"
        "print(sum(1 for _ in HELD.epoch(0)), flush=True)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "6", done.stderr
