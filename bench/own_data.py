"""Real offline data in the formats of the own-data configs, to try them as a user would.

- images: scikit-learn's 1,797 handwritten digits as 8x8 grayscale PNGs in an ImageFolder
  layout, ROOT/train/<digit>/ and ROOT/test/<digit>/ (a fifth of each digit held out, seed 0),
  for configs/my_images_cnn.yaml;
- texts: the docstrings of the running interpreter's standard library, labelled with the
  package they document (asyncio, email, json, multiprocessing, unittest, xml), as train.csv and
  test.csv (a fifth held out), for configs/my_texts_lstm.yaml;
- text: the standard library's .py files of those packages, one UTF-8 file, for
  configs/my_text_char_lstm.yaml.

    python bench/own_data.py OUT
    kdl train configs/my_images_cnn.yaml --set data.root=OUT/images
    kdl train configs/my_texts_lstm.yaml --set data.train_file=OUT/texts/train.csv \
        --set data.test_file=OUT/texts/test.csv
    kdl train configs/my_text_char_lstm.yaml --set data.path=OUT/text.txt
"""

from __future__ import annotations

import argparse
import ast
import csv
import random
import sysconfig
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

PACKAGES = ("asyncio", "email", "json", "multiprocessing", "unittest", "xml")


def write_images(root: Path) -> int:
    digits = load_digits()
    rng = random.Random(0)
    for label in range(10):
        indices = [i for i, y in enumerate(digits.target) if y == label]
        rng.shuffle(indices)
        held = len(indices) // 5
        for n, i in enumerate(indices):
            split = "test" if n < held else "train"
            pixels = (digits.images[i] * 255 / 16).round().astype(np.uint8)
            path = root / split / str(label) / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, mode="L").save(path)
    return len(digits.target)


def sources() -> list[tuple[str, Path]]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    return [(package, path) for package in PACKAGES
            for path in sorted((lib / package).rglob("*.py")) if "test" not in path.parts]


def write_texts(folder: Path) -> int:
    rows = []
    for package, path in sources():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= 5:
                    rows.append([" ".join(doc.split()), package])
    random.Random(0).shuffle(rows)
    held = len(rows) // 5
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("test.csv", rows[:held]), ("train.csv", rows[held:])):
        with (folder / name).open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows(part)
    return len(rows)


def write_text(path: Path) -> int:
    text = "".join(source.read_text(encoding="utf-8") for _, source in sources())
    path.write_text(text, encoding="utf-8")
    return len(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    out = parser.parse_args().out
    print(f"{write_images(out / 'images')} images in {out / 'images'}")
    print(f"{write_texts(out / 'texts')} docstrings in {out / 'texts'}")
    print(f"{write_text(out / 'text.txt'):,} characters in {out / 'text.txt'}")


if __name__ == "__main__":
    main()
