"""padst-reproduce: the sweep driver (a tiny in-process sweep on synthetic data), its statistics and the GPT-2
vocabulary shrinking it uses. The real sweep is a recipe (docs/results.md), not a test."""

from __future__ import annotations

import json
import math
import re
import shutil
import statistics

import pytest
import torch

from padst_ext import SparseLinear
from padst_ext.experiments import data as D
from padst_ext.experiments import recipes as R
from padst_ext.experiments import reproduce as P

from test_recipes import _ByteEncoding, _text_file, fake_fashion

TINY = {
    "vit": ["--width", "32", "--depth", "2", "--heads", "2", "--block-size", "8", "--epochs", "1", "--batch-size",
            "32", "--valid", "16", "--update-interval", "1", "--infer-batch", "8", "--speed-steps", "1"],
    "gpt2": ["--width", "32", "--depth", "1", "--heads", "2", "--block-size", "8", "--context", "16", "--batch-size",
             "4", "--steps", "4", "--eval-every", "2", "--update-interval", "2", "--vocab", "64"],
}


def test_grid_has_every_configuration_once():
    g = P.grid([0.9, 0.98])
    labels = [(c.label, c.sparsity) for c in g]
    assert len(labels) == len(set(labels)) == 1 + 2 * 8
    assert labels[0] == ("dense", None)
    for s in (0.9, 0.98):
        for lab in ("unstructured RigL", "unstructured SET", "block", "block + perm", "nm", "nm + perm", "diagonal",
                    "diagonal + perm"):
            assert (lab, s) in labels
    assert all(c.algorithm == "rigl" for c in g if c.structure in P.STRUCTURED)
    names = [c.name("vit", 0) for c in g]
    assert len(set(names)) == len(names)


def _fake_results(task, table):
    """table: {(label, sparsity): [metric per seed]} -> run summaries as padst-train writes them."""
    key, vkey, _, higher = P.METRIC[task]
    out = []
    for (label, sp), values in table.items():
        structure = {"dense": "dense", "unstructured RigL": "unstructured"}.get(label, label.split()[0])
        for seed, v in enumerate(values):
            out.append({"task": task, "config": label, "seed": seed, "structure": structure,
                        "sparsity": 0.9 if sp is None else sp, key: v / 100 if higher else v,
                        vkey: v / 100 if higher else v, "density": 1 - (sp or 0)})
    return out


def test_gap_and_share_closed_accuracy():
    rigl, block, perm = [80.0, 81.0, 82.0], [70.0, 72.0, 74.0], [77.0, 78.0, 76.0]
    res = _fake_results("vit", {("unstructured RigL", 0.95): rigl, ("block", 0.95): block,
                                ("block + perm", 0.95): perm})
    (row,) = P.gap_rows(P.aggregate(res, "vit"), "vit", [0.95])
    gap, gap_perm = statistics.mean(rigl) - statistics.mean(block), statistics.mean(rigl) - statistics.mean(perm)
    assert row["structure"] == "block" and row["gap"] == pytest.approx(gap)
    assert row["gap_perm"] == pytest.approx(gap_perm)
    assert row["closed"] == pytest.approx((gap - gap_perm) / gap)
    se = lambda v: statistics.stdev(v) / math.sqrt(len(v))  # noqa: E731
    assert row["noise"] == pytest.approx(2 * math.hypot(se(rigl), se(block)))
    assert row["significant"] is True


def test_gap_perplexity_is_relative_and_noise_needs_seeds():
    res = _fake_results("gpt2", {("unstructured RigL", 0.9): [100.0], ("nm", 0.9): [110.0],
                                 ("nm + perm", 0.9): [104.0]})
    (row,) = P.gap_rows(P.aggregate(res, "gpt2"), "gpt2", [0.9])
    assert row["gap"] == pytest.approx(10.0) and row["gap_perm"] == pytest.approx(4.0)
    assert row["closed"] == pytest.approx(0.6)
    assert math.isnan(row["noise"]) and row["significant"] is False  # one seed: no noise estimate, no claim


def test_gap_on_validation_reads_the_validation_metric():
    rigl, block, perm = [80.0, 81.0, 82.0], [70.0, 72.0, 74.0], [77.0, 78.0, 76.0]
    res = _fake_results("vit", {("unstructured RigL", 0.95): rigl, ("block", 0.95): block,
                                ("block + perm", 0.95): perm})
    for r in res:  # validation: 1 point above test for RigL and the unpermuted block, 3 below for the permuted one
        r["valid_acc"] = r["test_acc"] + (0.01 if r["config"] != "block + perm" else -0.03)
    agg = P.aggregate(res, "vit")
    (test,) = P.gap_rows(agg, "vit", [0.95])
    (valid,) = P.gap_rows(agg, "vit", [0.95], "valid")
    assert valid["gap"] == pytest.approx(test["gap"]) and valid["gap_perm"] == pytest.approx(test["gap_perm"] + 4.0)
    assert valid["closed"] == pytest.approx((valid["gap"] - valid["gap_perm"]) / valid["gap"])
    with pytest.raises(ValueError, match="'train'"):
        P.gap_rows(agg, "vit", [0.95], "train")


def test_no_gap_means_no_share():
    res = _fake_results("vit", {("unstructured RigL", 0.9): [80.0, 80.2], ("diagonal", 0.9): [80.5, 80.7],
                                ("diagonal + perm", 0.9): [80.1, 80.3]})
    (row,) = P.gap_rows(P.aggregate(res, "vit"), "vit", [0.9])
    assert row["gap"] < 0 and math.isnan(row["closed"]) and not row["significant"]


def test_shrink_vocab_keeps_frequent_ids_and_maps_the_rest():
    train = torch.tensor([5, 5, 5, 9, 9, 7, 1, 1, 1, 1], dtype=torch.int32)
    out, table = R.shrink_vocab({"train": train, "valid": torch.tensor([9, 2, 5], dtype=torch.int32)}, 3)
    # by frequency: 1 (4x) -> 0, 5 (3x) -> 1; everything else -> the shared rare id 2
    assert out["train"].tolist() == [1, 1, 1, 2, 2, 2, 0, 0, 0, 0]
    assert out["valid"].tolist() == [2, 2, 1]
    assert torch.equal(table, R.vocab_table(train, 3))  # the map itself, for the checkpoint
    with pytest.raises(ValueError, match="--vocab must be in"):
        R.shrink_vocab({"train": train}, 1)


@pytest.fixture
def tiny_data(tmp_path, monkeypatch):
    monkeypatch.setenv("PADST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(D, "gpt2_encoding", lambda: _ByteEncoding())
    (tmp_path / "fm").mkdir()
    fake_fashion(tmp_path / "fm")
    text = _text_file(tmp_path)
    monkeypatch.setitem(P.PROFILES, "vit", {"quick": TINY["vit"] + ["--data-dir", str(tmp_path / "fm")]})
    monkeypatch.setitem(P.PROFILES, "gpt2", {"quick": TINY["gpt2"] + ["--text", str(text)]})
    return tmp_path


def test_reproduce_tiny_sweep_writes_table_plots_and_resumes(tiny_data):
    out = tiny_data / "results"
    argv = ["--quick", "--tasks", "vit", "gpt2", "--sparsities", "0.75", "--seeds", "2", "--jobs", "0", "--out",
            str(out), "--speed-reps", "1", "--no-progress"]
    r = P.main(argv)
    assert len(r["runs"]) == 2 * 9 * 2 and not any(x.get("skipped") for x in r["runs"])
    assert [x["seed"] for x in r["runs"]] == [0] * 18 + [1] * 18  # seed by seed: a stopped sweep holds whole seeds
    assert {x["config"] for x in r["runs"]} == {"dense", "unstructured RigL", "unstructured SET", "block",
                                                 "block + perm", "nm", "nm + perm", "diagonal", "diagonal + perm"}
    assert len(r["speed"]) == 2 * 9 and all(s["train_speedup"] > 0 and s["infer_speedup"] > 0 for s in r["speed"])
    table = (out / "table.md").read_text()
    assert "## vit" in table and "## gpt2" in table and "share closed" in table
    for lab in ("unstructured RigL", "block + perm", "diagonal"):
        assert f"| {lab} |" in table
    assert len(re.findall(r"\| block \| 75% \| [+-]", table)) == 2  # one gap row per task (gaps are signed)
    # how the permutations were learned: every permuted layer of both seeds, hardened and counted
    assert table.count("How the permutations were learned") == 2
    for task in ("vit", "gpt2"):
        prow = P.perm_rows(r["runs"], task, [0.75])
        assert [x["structure"] for x in prow] == ["block", "nm", "diagonal"]
        for x in prow:
            assert x["runs"] == 2 and x["hardened"] == x["layers"] > 0
            assert x["converged"] + x["deadline"] == x["hardened"] and 0 < x["hardened_at"] <= 0.5
            assert f"| {x['structure']} | 75% | {x['layers']} | {x['converged']} |" in table
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["runs"]) == 36 and saved["settings"]["jobs"] == 0
    for name in ("vit_metric_vs_sparsity.png", "vit_permutation.png", "vit_masks.png", "gpt2_masks.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    # a second call finds every run finished with the same command and only rebuilds the tables
    again = P.main(argv[:-3] + ["--no-speed", "--no-plots", "--no-progress"])
    assert all(x.get("skipped") for x in again["runs"])
    metric = lambda runs: {(x["task"], x["config"], x["seed"]): x.get("test_acc", x.get("test_ppl"))  # noqa: E731
                           for x in runs}
    assert metric(again["runs"]) == metric(r["runs"])


def test_reproduce_resumes_whatever_the_spelling_of_out(tiny_data, monkeypatch):
    """A finished run is found again through a relative --out, or after the results folder moved: only the training
    arguments decide whether it runs again."""
    out = tiny_data / "results"
    base = ["--quick", "--tasks", "vit", "--sparsities", "0.75", "--seeds", "1", "--jobs", "0", "--no-speed",
            "--no-plots", "--no-progress"]
    first = P.main(base + ["--out", str(out)])
    monkeypatch.chdir(tiny_data)
    assert all(x.get("skipped") for x in P.main(base + ["--out", "results"])["runs"])
    out.rename(tiny_data / "moved")
    again = P.main(base + ["--out", "moved"])
    assert all(x.get("skipped") for x in again["runs"])
    assert [x["test_acc"] for x in again["runs"]] == [x["test_acc"] for x in first["runs"]]


def test_reproduce_table_only_tabulates_finished_runs_without_training(tiny_data, monkeypatch):
    """--table-only: a sweep trained elsewhere (another thread count) or stopped early becomes a table; runs that are
    missing or were trained with other arguments are named and left out; nothing is trained."""
    out = tiny_data / "results"
    base = ["--quick", "--tasks", "vit", "--sparsities", "0.75", "--seeds", "2", "--jobs", "0", "--no-speed",
            "--no-progress", "--out", str(out)]
    full = P.main(base + ["--no-plots"])
    runs = out / "runs" / "vit"
    shutil.rmtree(runs / P.Config("nm", "rigl", True, 0.75).name("vit", 1))  # stopped before this run finished
    cmd = runs / P.Config("dense", "rigl", False, None).name("vit", 1) / "command.json"
    argv = json.loads(cmd.read_text())
    argv[argv.index("--threads") + 1] = "7"  # trained on a machine with more cores: still the same run
    cmd.write_text(json.dumps(argv))
    (out / "table.md").unlink()
    monkeypatch.setattr(P, "train_all", lambda *a, **k: pytest.fail("--table-only trained"))
    r = P.main(base + ["--table-only"])
    assert len(r["runs"]) == 17 and r["settings"]["missing"] == ["vit-nm-rigl-perm-0.75-s1"]
    metric = {(x["config"], x["seed"]): x["test_acc"] for x in full["runs"]}
    assert {(x["config"], x["seed"]): x["test_acc"] for x in r["runs"]} == \
        {k: v for k, v in metric.items() if k != ("nm + perm", 1)}
    table = (out / "table.md").read_text()
    assert "1 runs missing, left out: vit-nm-rigl-perm-0.75-s1" in table and "| nm + perm |" in table
    assert re.search(r"trained on cpu with \d+ thread\(s\) per run", table)
    assert (out / "vit_masks.png").is_file() and (out / "vit_permutation.png").is_file()
    with pytest.raises(SystemExit, match="no run under .* finished with these arguments"):
        P.main(base + ["--table-only", "--train-args", "--lr 0.001"])
    # a run written before padst-train had a flag (no value for it in its checkpoint's arguments) still loads
    run = runs / P.Config("block", "rigl", True, 0.75).name("vit", 0)
    ck = torch.load(run / "checkpoint.pt", weights_only=False)
    del ck["args"]["perm_init_scale"]
    torch.save(ck, run / "checkpoint.pt")
    model = P._load_run(run)
    assert sum(isinstance(m, SparseLinear) for m in model.modules()) > 0


def test_reproduce_reruns_a_run_whose_command_changed(tiny_data):
    out = tiny_data / "results"
    base = ["--quick", "--tasks", "vit", "--sparsities", "0.75", "--seeds", "1", "--jobs", "0", "--out", str(out),
            "--no-speed", "--no-plots", "--no-progress"]
    P.main(base)
    r = P.main(base + ["--train-args", "--lr 0.001"])
    assert not any(x.get("skipped") for x in r["runs"])
    # a permuted run from before the permutations learned (no permutation record): trained again, alone
    run = out / "runs" / "vit" / P.Config("block", "rigl", True, 0.75).name("vit", 0)
    summary = json.loads((run / "summary.json").read_text())
    del summary["permutation"]
    (run / "summary.json").write_text(json.dumps(summary))
    again = P.main(base + ["--train-args", "--lr 0.001"])
    assert [x["config"] for x in again["runs"] if not x.get("skipped")] == ["block + perm"]
    with pytest.raises(SystemExit, match="not valid for padst-train vit"):
        P.main(base + ["--train-args", "--no-such-option 1"])


def test_reproduce_configs_trains_only_those(tiny_data):
    out = tiny_data / "results"
    r = P.main(["--quick", "--tasks", "vit", "--sparsities", "0.75", "--seeds", "1", "--jobs", "0", "--out", str(out),
                "--no-speed", "--no-plots", "--no-progress", "--configs", "rigl", "nm+perm"])
    assert sorted(x["config"] for x in r["runs"]) == ["nm + perm", "unstructured RigL"]
    assert sorted(p.name for p in (out / "runs" / "vit").iterdir()) == ["vit-nm-rigl-perm-0.75-s0",
                                                                       "vit-unstructured-rigl-0.75-s0"]
    with pytest.raises(SystemExit):
        P.main(["--configs", "block+nm"])


def test_reproduce_rejects_bad_arguments():
    with pytest.raises(SystemExit, match="--sparsities must lie in"):
        P.main(["--sparsities", "1.5"])
    with pytest.raises(SystemExit, match="--seeds must be >= 1"):
        P.main(["--seeds", "0"])
    with pytest.raises(SystemExit, match="--jobs must be >= 0"):
        P.main(["--jobs", "-1"])
