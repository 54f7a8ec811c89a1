"""What a run loads is what it wrote: a byte changed in a checkpoint fails its checksum (each
record's CRC-32 in the checkpoint's zip archive, which torch.load does not check) and is refused
by every command that loads one; a vocab.json changed since training is refused by the digest
the checkpoint keeps."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import pytest
from kdl import kdl
from test_language_model import corpus, lm_config, train  # noqa: F401 (corpus: a fixture)

pytestmark = pytest.mark.usefixtures("single_thread")


def flip_a_weight(checkpoint: Path) -> None:
    """One bit of the largest tensor's bytes flipped, as a failing disk would: the archive still
    opens and torch.load still loads it."""
    with zipfile.ZipFile(checkpoint) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(checkpoint.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[record.header_offset + 26:
                                                          record.header_offset + 30])
    start = record.header_offset + 30 + name_length + extra_length
    data[start + record.file_size // 2] ^= 0x40
    checkpoint.write_bytes(bytes(data))


@pytest.mark.parametrize("command", [
    ["eval", "{id}", "--checkpoint", "last"],
    ["train", "--resume", "{id}"],
    ["sample", "{id}", "--checkpoint", "last"],
    ["predict", "{id}", "{image}", "--checkpoint", "last"],
])
def test_a_changed_byte_in_a_checkpoint_is_refused(run, tmp_path, command):
    import torch

    last = run / "checkpoints" / "last.pt"
    flip_a_weight(last)
    assert torch.load(last, weights_only=True)["loop"]["step"] > 0  # torch alone loads it
    image = tmp_path / "digit.png"
    from PIL import Image

    Image.new("L", (8, 8)).save(image)
    before = (run / "metrics.jsonl").read_bytes()
    result = kdl(*[a.format(id=run.name, image=image) for a in command], "--runs-dir", run.parent)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert str(last) in result.stderr and "CRC-32" in result.stderr
    assert "Traceback" not in result.stderr
    assert json.loads((run / "meta.json").read_text())["status"] == "interrupted"
    assert (run / "metrics.jsonl").read_bytes() == before


def test_a_changed_vocabulary_is_refused(tmp_path, corpus):  # noqa: F811
    result = train(tmp_path / "runs", *lm_config(tmp_path, corpus, "train.epochs=1"))
    assert result.exit_code == 0, result.stderr
    folder = tmp_path / "runs" / result.last_line
    vocab = folder / "vocab.json"
    tokens = json.loads(vocab.read_text())
    assert kdl("eval", folder.name, "--runs-dir", folder.parent).exit_code == 0

    vocab.write_text(json.dumps(tokens[::-1]))  # the same tokens, other ids
    for command in (["eval", folder.name], ["sample", folder.name, "--length", "5"],
                    ["train", "--resume", folder.name, "--set", "train.epochs=2", "--allow-changes"]):
        refused = kdl(*command, "--runs-dir", folder.parent)
        assert refused.exit_code == 2, (command, refused.stdout, refused.stderr)
        assert str(vocab) in refused.stderr and "Traceback" not in refused.stderr

    vocab.unlink()  # as the error says: built again from the training data, as the run first did
    again = kdl("eval", folder.name, "--runs-dir", folder.parent)
    assert again.exit_code == 0, again.stderr
    vocab.mkdir()  # a folder where the file belongs: refused by name, never a traceback
    resumed = kdl("train", "--resume", folder.name, "--set", "train.epochs=2", "--allow-changes",
                  "--runs-dir", folder.parent)
    assert resumed.exit_code == 2 and str(vocab) in resumed.stderr, resumed.stderr
    assert "Traceback" not in resumed.stderr
