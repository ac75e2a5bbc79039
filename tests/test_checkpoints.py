"""Checkpoints are untrusted input: padst_ext.experiments.data.load_checkpoint, which padst-train
--resume and padst-reproduce use, loads with weights_only=True after checking every member's CRC-32, and turns every
bad file into one CheckpointError (a ValueError) naming the file and what is wrong. A crafted pickle is refused
without running its code."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
import torch

from padst_ext.experiments import data as D
from padst_ext.experiments import reproduce


class _RunsCode:
    """Unpickling this calls os.system: what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _good(path: Path) -> Path:
    D.save_atomic({"model": {"w": torch.arange(1000.0)}, "args": {"task": "vit"}, "done": 1}, path)
    return path


def test_a_good_checkpoint_loads():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        ck = D.load_checkpoint(_good(Path(d) / "checkpoint.pt"), required=("model", "args"))
        assert torch.equal(ck["model"]["w"], torch.arange(1000.0)) and ck["done"] == 1


def test_a_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {}, "args": {"task": "vit"}, "payload": _RunsCode(marker)}, path)
    with pytest.raises(D.CheckpointError, match=r"checkpoint .*checkpoint\.pt was refused"):
        D.load_checkpoint(path)
    assert not marker.exists()


def test_padst_reproduce_refuses_a_malicious_run_folder(tmp_path):
    """padst-reproduce's plots load run folders copied from elsewhere (_load_run): the crafted file is refused."""
    marker = tmp_path / "pwned"
    run = tmp_path / "runs" / "vit" / "vit-block-rigl-perm-0.9-s0"
    run.mkdir(parents=True)
    torch.save({"model": {}, "args": {"task": "vit"}, "x": _RunsCode(marker)}, run / "checkpoint.pt")
    with pytest.raises(D.CheckpointError, match="refused"):
        reproduce._load_run(run)
    assert not marker.exists()


def _flip_member_byte(path: Path) -> None:
    """Flips bytes inside the largest stored member (the tensor data), leaving the archive's directory intact."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for i in range(64):
        raw[start + 100 + i] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["missing", "empty", "garbage", "truncated", "flipped bytes", "not a dict",
                                    "missing key"])
def test_every_bad_checkpoint_is_one_clear_error(tmp_path, damage):
    path = tmp_path / "checkpoint.pt"
    expect = {"missing": "does not exist", "empty": "is empty", "garbage": "not a torch.save archive",
              "truncated": "not a torch.save archive|truncated|cannot", "flipped bytes": "is corrupt: the CRC",
              "not a dict": "holds a list", "missing key": "lacks 'optimizer'"}[damage]
    if damage != "missing":
        _good(path)
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "garbage":
        path.write_bytes(os.urandom(4096))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "flipped bytes":
        _flip_member_byte(path)
    elif damage == "not a dict":
        torch.save([1, 2], path)
    with pytest.raises(D.CheckpointError, match=expect) as e:
        D.load_checkpoint(path, required=("model", "optimizer") if damage == "missing key" else ("model",))
    assert str(path) in str(e.value)
    assert isinstance(e.value, ValueError)
