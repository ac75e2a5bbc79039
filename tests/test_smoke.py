"""Smoke tests of the demo and the benchmark script (their full runs are not part of the suite)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("structure", ["block", "nm", "diag"])
def test_demo_learns(structure):
    pytest.importorskip("sklearn")
    from padst_ext.experiments import demo

    acc_sparse, acc_dense = demo.main(["--structure", structure, "--epochs", "3", "--hidden", "128"])
    assert acc_sparse > 0.8 and acc_dense > 0.8  # 10 classes: chance is 0.1


def test_cpu_benchmark_quick(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import cpu_ops

    out = tmp_path / "cpu_ops.json"
    cpu_ops.main(["--quick", "--threads", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert {r["structure"] for r in data["rows"]} == {"block32", "block16", "nm", "diag"}
    for r in data["rows"]:
        assert r["max_abs_err"] < 1e-3, r
        assert r["padst_fwd_perm_ms"] > 0 and r["dense_fwd_ms"] > 0


def test_perm_planted_quick(tmp_path, monkeypatch):
    """The benchmark's command line end to end (recovery itself is asserted in test_perm_learning.py)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import perm_planted

    out = tmp_path / "p.json"
    runs = perm_planted.main(["--structures", "nm", "--dims", "16", "--seeds", "1", "--steps", "120", "--methods",
                              "none", "paper", "default", "--masks", "fixed", "dst", "--jobs", "1", "--out", str(out)])
    # fixed masks: 3 methods + the identity control of each; DST masks: the same 3
    assert len(runs) == 9 and len(json.loads(out.read_text())["runs"]) == 9
    md = out.with_suffix(".md").read_text()
    assert "identity teacher (control)" in md and "learns its pattern by RigL" in md and "How the permutation" in md
    assert all(0 <= r["recall"] <= 1 for r in runs)


def test_layer_cost_quick(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import layer_cost

    rows = layer_cost.main(["--quick", "--threads", "1", "--out", str(tmp_path / "l.json")])
    assert {r["layer"] for r in rows} >= {"block soft", "block hard", "nm hard", "diagonal none"}


def test_dst_digits_quick(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import dst_digits

    rows = dst_digits.main(["--epochs", "3", "--seeds", "1", "--threads", "1", "--configs", "1", "4",
                            "--out", str(tmp_path / "d.json")])
    assert [r["name"] for r in rows] == ["unstructured rigl", "block rigl +perm"]
    assert all(r["updates"] > 0 for r in rows)
    assert rows[0]["acc_mean"] > 0.6 and rows[1]["acc_mean"] > 0.25  # 10 classes: chance is 0.1; 3 epochs only


def test_dst_overhead_quick(tmp_path, monkeypatch):
    pytest.importorskip("timm")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import dst_overhead

    res = dst_overhead.main(["--depth", "1", "--batch", "4", "--reps", "2", "--threads", "1",
                             "--out", str(tmp_path / "o.json")])
    assert res["sparse_layers"] >= 2 and res["update_step_ms"] > 0 and res["soft_step_ms"] > 0
    assert 0 < res["update_only_ms"] and 0 < res["update_peak_bytes"] < res["largest_dense_rc_bytes"]


def test_gpu_ops_dry_run(tmp_path):
    """The CUDA benchmark's cases, inputs, checks and tables, exercised on the CPU (a subprocess: the script sets
    torch's thread count and a SIGTERM handler)."""
    import subprocess
    import sys

    out = tmp_path / "gpu_ops.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_ops.py"), "--dry-run", "--out", str(out)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-3000:]
    for structure in ("block32", "block16", "nm1:12", "nm2:24", "diag", "2:4"):
        assert structure in text, f"{structure} missing from the dry run's case list"
    assert "0 MISMATCH or error" in res.stdout, text[-3000:]
    assert res.stdout.rstrip().splitlines()[-1].startswith("|")  # the table is printed last
    data = json.loads(out.read_text())
    assert {r["structure"] for r in data["rows"]} == {"block32", "block16", "nm", "diag", "2:4"}
    assert all(r["variants"]["padst_perm"]["check"]["fwd"]["ok"] for r in data["rows"])
    assert out.with_suffix(".md").exists()


def test_gpu_suite_script_is_valid_bash():
    import shutil
    import subprocess

    if shutil.which("bash") is None:
        pytest.skip("no bash")
    res = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_suite.sh")], capture_output=True, text=True,
                         check=False)
    assert res.returncode == 0, res.stderr


def test_v2_sanitize_script_on_the_emulation():
    """benchmarks/v2_sanitize.py (what gpu_suite.sh runs under compute-sanitizer) through the emulation: every v2
    kernel serves at least once and every call matches the reference."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "v2_sanitize.py"), "--cpu"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT, check=False)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "all calls matched" in res.stdout
    counts = res.stdout.split("emulated v2 calls:")[1].splitlines()[0]
    assert all(int(n) > 0 for n in counts.replace(",", " ").split() if n.isdigit()), counts
