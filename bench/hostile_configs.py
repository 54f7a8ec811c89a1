"""How long kdl takes to refuse hostile configs (in-process, the config loader alone).

    python bench/hostile_configs.py [--repeat 5]

Writes each case to a temp file and times `load_config` until it raises a ConfigError: the
307-byte billion-laughs file (9 levels of 9 aliases), the 10-level one, flow nesting 100,000 deep,
block nesting 500 deep, and for scale the real configs/digits_cnn.yaml (accepted). Prints the
median and the worst of `--repeat` tries, and the file sizes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_hostile_configs import block_nesting, laughs  # noqa: E402

from karpathy_runner.config.loading import load_config  # noqa: E402
from karpathy_runner.errors import ConfigError  # noqa: E402

CASES = {
    "billion laughs (9 levels)": laughs(9),
    "laughs, 10 levels": laughs(10),
    "flow nesting 100000 deep": "a: " + "[" * 100_000 + "]" * 100_000,
    "block nesting 500 deep": block_nesting(500),
    "configs/digits_cnn.yaml (accepted)": (REPO / "configs" / "digits_cnn.yaml").read_text(),
}


def seconds(path: Path) -> float:
    started = time.perf_counter()
    try:
        load_config(path)
    except ConfigError:
        pass
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        for name, text in CASES.items():
            path = Path(folder) / "case.yaml"
            path.write_text(text)
            times = [seconds(path) for _ in range(args.repeat)]
            median, worst = statistics.median(times) * 1000, max(times) * 1000
            print(f"{name:38s} {len(text.encode()):>8,d} bytes  median {median:8.1f} ms  "
                  f"worst {worst:8.1f} ms")


if __name__ == "__main__":
    main()
