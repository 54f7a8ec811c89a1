"""The configs for a user's own data train as shipped once their one path is set: a folder of
images (configs/my_images_cnn.yaml), a CSV of labelled texts (configs/my_texts_lstm.yaml) and a
text file for char-rnn (configs/my_text_char_lstm.yaml), each given the files its header asks
for, in the real formats, at the config's own path or at another one named with --set."""

from __future__ import annotations

import json
import random

import pytest
import yaml
from datafiles import BLUE, RED, write_csv, write_png
from kdl import CONFIGS, kdl
from test_hints import NEXT_STEP, run_as_printed

pytestmark = pytest.mark.usefixtures("single_thread")  # as the kdl processes run

SHORT = ["--set", "train.epochs=1", "--set", "train.device=cpu"]  # the rest as shipped


def images(root):
    """Two classes of PNGs in train/ and test/, of several sizes: the loader resizes them."""
    for split, count in (("train", 30), ("test", 6)):
        for i in range(count):
            write_png(root / split / "red" / f"{i}.png", RED, size=(40 + i, 30))
            write_png(root / split / "blue" / f"{i}.jpg", BLUE, size=(30, 50 + i))


def texts(path):
    rng = random.Random(0)
    words = {"good": "fine great lovely warm kind", "bad": "awful cold grim dull rude"}
    rows = [[" ".join(rng.choice(words[label].split()) for _ in range(8)), label]
            for label in ("good", "bad") for _ in range(30)]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_csv(path, ["text", "label"], rows)


def text(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"To be, or not to be {i}: that is the question.\n" for i in range(500)),
                    encoding="utf-8")


CASES = {  # config: (the key of its one path, its default path, the writer of such files)
    "my_images_cnn": ("data.root", "data/my_images", images),
    "my_texts_lstm": ("data.train_file", "data/my_texts.csv", texts),
    "my_text_char_lstm": ("data.path", "data/my_text.txt", text),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_own_data_config_needs_only_its_path(name, tmp_path, monkeypatch, runs_dir):
    key, default, write = CASES[name]
    config = CONFIGS / f"{name}.yaml"
    assert yaml.safe_load(config.read_text())["data"][key.split(".")[1]] == default
    assert f"--set {key}=PATH" in config.read_text().splitlines()[0]  # the header's command

    monkeypatch.chdir(tmp_path)  # the default path is relative: from where kdl runs
    missing = kdl("train", config, *SHORT)
    assert missing.exit_code == 2 and default.split("/")[-1] in missing.stderr

    write(tmp_path / default)
    result = kdl("train", config, *SHORT)
    assert result.exit_code == 0, result.stderr
    for step in NEXT_STEP.findall(result.stderr):  # its hints work as printed
        assert run_as_printed(step).exit_code == 0, step

    elsewhere = tmp_path / "elsewhere" / default.split("/")[-1]
    write(elsewhere)
    given = kdl("train", config, *SHORT, "--set", f"{key}={elsewhere}")
    assert given.exit_code == 0, given.stderr
    meta = json.loads((runs_dir / given.last_line / "meta.json").read_text())
    assert meta["status"] == "completed"


def test_the_readme_says_how_to_install_for_a_cpu_and_how_many_threads_to_use():
    """The README's quick start: the CPU build of torch (without it pip brings gigabytes of CUDA
    libraries onto a CPU machine), fewer threads on a busy machine, and the own-data configs."""
    readme = (CONFIGS.parent / "README.md").read_text()
    assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu" in readme
    assert "OMP_NUM_THREADS=1 kdl train" in readme
    for name, (key, _, _) in CASES.items():
        assert f"kdl train configs/{name}.yaml --set {key}=PATH" in readme
