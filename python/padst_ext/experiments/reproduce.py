"""``padst-reproduce``: the sweep behind the paper's claim at small scale, one command.

For each task (``vit``: a small ViT on Fashion-MNIST; ``gpt2``: a small GPT-2 on Wikipedia text) it trains

    dense;  unstructured RigL;  unstructured SET;  block, N:M, diagonal (RigL) each without and with a learned
    permutation;  at every sparsity (90 / 95 / 98 %)  x  seeds

with ``padst-train`` (one subprocess per run, ``--jobs`` at a time), then times every configuration's training step
and exported inference against its dense twin (sequentially, all threads), and writes under ``--out``:

    runs/<task>/<run>/      each run's summary.json, metrics.csv, checkpoint.pt, run.log (a finished run whose
                            command has not changed is not run again: an interrupted sweep resumes)
    results.json            every run's summary, the speed measurements and the settings
    table.md                mean +- std over seeds; the gap to unstructured RigL and the share of it closed by the
                            learned permutation; training-step and inference time against dense
    *.png                   metric vs sparsity; one learned permutation; the masks of one layer per structure

    padst-reproduce --quick           # 1 seed, 90 and 98 %, shorter runs: about 7 minutes on 2 cores
    padst-reproduce                   # 3 seeds, 90 / 95 / 98 %: about 1 h 50 min on 2 cores
    padst-reproduce --tasks vit --seeds 5 --out results-vit
    padst-reproduce --tasks vit --train-args "--device cuda" --jobs 16 --no-speed --out gpu   # on a GPU machine
    padst-reproduce --tasks vit --train-args "--device cuda" --out gpu --table-only   # back here: tables, plots

Model sizes and run lengths (``PROFILES``) are set by the compute budget of a 2-core machine; nothing is tuned on
the test split, and every table also gives the validation metric.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .data import write_text_atomic

# Per task: the padst-train arguments every run of the sweep shares, for the full sweep and for --quick.
# Block size 4: a block b x b can only give every output a weight when the density is at least b / in_features.
# The paper's ViT-B pairs 16 x 16 blocks with width 768 (2.1 %); at width 96 (64) the default 16 would leave most
# outputs with no weight already at 90 % (16 / 96 = 17 % > 10 %), which measures dead units, not the structure.
# With 4: every output is reachable at 90 and 95 % (4 / 96 = 4.2 %), not at 98 %.
PROFILES: Dict[str, Dict[str, List[str]]] = {
    "vit": {
        # a 2-block ViT, width 96 (MLP 96 -> 384 -> 96), 20k training images x 2 epochs (1-3 min per run, 1 thread)
        "full": ["--width", "96", "--depth", "2", "--heads", "3", "--epochs", "2", "--train-subset", "20000",
                 "--update-interval", "25", "--block-size", "4"],
        "quick": ["--width", "64", "--depth", "2", "--heads", "2", "--epochs", "1", "--train-subset", "8000",
                  "--update-interval", "20", "--block-size", "4"],
    },
    "gpt2": {
        # a 2-block GPT-2, width 64, context 64, an 8192-way vocabulary (see padst-train gpt2 --vocab), 400 steps
        "full": ["--width", "64", "--depth", "2", "--heads", "2", "--context", "64", "--batch-size", "16",
                 "--steps", "400", "--eval-every", "200", "--eval-windows", "64", "--vocab", "8192",
                 "--update-interval", "25", "--block-size", "4"],
        "quick": ["--width", "64", "--depth", "2", "--heads", "2", "--context", "64", "--batch-size", "8",
                  "--steps", "150", "--eval-every", "150", "--eval-windows", "32", "--vocab", "8192",
                  "--update-interval", "20", "--block-size", "4"],
    },
}
METRIC = {"vit": ("test_acc", "valid_acc", "top-1 accuracy (%)", True),
          "gpt2": ("test_ppl", "valid_ppl", "perplexity", False)}  # key, validation key, label, higher is better
STRUCTURED = ("block", "nm", "diagonal")
CONFIG_KEYS = ("dense", "rigl", "set") + tuple(st + p for st in STRUCTURED for p in ("", "+perm"))


@dataclass(frozen=True)
class Config:
    structure: str
    algorithm: str
    permute: bool
    sparsity: Optional[float]  # None for dense

    @property
    def label(self) -> str:
        if self.structure == "dense":
            return "dense"
        if self.structure == "unstructured":
            return f"unstructured {'RigL' if self.algorithm == 'rigl' else self.algorithm.upper()}"
        return f"{self.structure}{' + perm' if self.permute else ''}"

    @property
    def key(self) -> str:
        """The short name ``--configs`` takes: dense, rigl, set, block, block+perm, nm, ..."""
        if self.structure == "dense":
            return "dense"
        if self.structure == "unstructured":
            return self.algorithm
        return self.structure + ("+perm" if self.permute else "")

    def name(self, task: str, seed: int) -> str:
        sp = "" if self.sparsity is None else f"-{self.sparsity:g}"
        perm = "-perm" if self.permute else ""
        return f"{task}-{self.structure}-{self.algorithm}{perm}{sp}-s{seed}"

    def train_args(self) -> List[str]:
        a = ["--structure", self.structure, "--algorithm", self.algorithm,
             "--permute" if self.permute else "--no-permute"]
        if self.sparsity is not None:
            a += ["--sparsity", f"{self.sparsity:g}"]
        return a


def grid(sparsities: Sequence[float]) -> List[Config]:
    """dense; then per sparsity: unstructured RigL and SET, and block / N:M / diagonal (RigL) without and with a
    learned permutation."""
    configs = [Config("dense", "rigl", False, None)]
    for s in sparsities:
        configs += [Config("unstructured", "rigl", False, s), Config("unstructured", "set", False, s)]
        for st in STRUCTURED:
            configs += [Config(st, "rigl", False, s), Config(st, "rigl", True, s)]
    return configs


# ------------------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------------------

def _without_out(argv: Sequence[str], options: Sequence[str] = ("--out",)) -> List[str]:
    """A run's command less its ``--out FOLDER`` (and any other of ``options`` with its value): the same run whether
    the sweep's folder was given relative or absolute, or was moved since."""
    return [a for i, a in enumerate(argv) if a not in options and not (i and argv[i - 1] in options)]


def _run_argv(task: str, cfg: Config, seed: int, common: List[str], threads: int, out: Path) -> List[str]:
    return [task, *common, *cfg.train_args(), "--seed", str(seed), "--threads", str(threads), "--no-speed",
            "--no-progress", "--out", str(out)]


def _finished(out: Path, argv: Sequence[str], options: Sequence[str] = ("--out",)) -> Optional[Dict]:
    """``out``'s summary when the run there finished with ``argv`` (up to ``options``), else None. A permuted run
    without a permutation record was trained before the permutations learned (its defaults are not today's,
    though its command reads the same) and does not count as finished."""
    summary_path, cmd_path = out / "summary.json", out / "command.json"
    if summary_path.is_file() and cmd_path.is_file() and \
            _without_out(json.loads(cmd_path.read_text()), options) == _without_out(argv, options):
        summary = json.loads(summary_path.read_text())
        if summary.get("permute") and summary.get("structure") not in ("dense", "unstructured") \
                and "permutation" not in summary:
            return None
        return summary
    return None


def _run_one(task: str, cfg: Config, seed: int, common: List[str], threads: int, root: Path,
             in_process: bool = False) -> Dict:
    """Trains one configuration in a subprocess, or in this process with ``in_process`` (skipped when it already
    finished with the same command)."""
    out = root / "runs" / task / cfg.name(task, seed)
    argv = _run_argv(task, cfg, seed, common, threads, out)
    summary_path, cmd_path = out / "summary.json", out / "command.json"
    done = _finished(out, argv)
    if done is not None:
        return dict(done, skipped=True)
    out.mkdir(parents=True, exist_ok=True)
    summary_path.unlink(missing_ok=True)
    (out / "checkpoint.pt").unlink(missing_ok=True)  # a changed command starts over
    write_text_atomic(json.dumps(argv), cmd_path)
    t0 = time.perf_counter()
    if in_process:
        from .recipes import main as train_main

        train_main(argv)
        return dict(json.loads(summary_path.read_text()), wall_s=time.perf_counter() - t0)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    with open(out / "run.log", "w") as log:
        rc = subprocess.run([sys.executable, "-m", "padst_ext.experiments.recipes", *argv], stdout=log, stderr=subprocess.STDOUT,
                            env=env).returncode
    if rc != 0 or not summary_path.is_file():
        tail = (out / "run.log").read_text().splitlines()[-15:]
        raise RuntimeError(f"{out.name} failed (exit {rc}); the end of {out / 'run.log'}:\n" + "\n".join(tail))
    return dict(json.loads(summary_path.read_text()), wall_s=time.perf_counter() - t0)


def train_all(tasks: Sequence[str], configs: List[Config], seeds: Sequence[int], common: Dict[str, List[str]],
              jobs: int, threads: int, root: Path, progress: bool = True) -> List[Dict]:
    """Every (task, configuration, seed): ``jobs`` subprocesses at a time, or one after another in this process
    when ``jobs`` is 0."""
    from tqdm import tqdm

    # seed by seed: a sweep stopped early (a time limit) holds whole seeds, every configuration of each
    work = [(t, c, s) for s in seeds for t in tasks for c in configs]
    results, failures = [], []
    with cf.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool, \
            tqdm(total=len(work), desc="padst-reproduce: training", disable=not progress, smoothing=0.1) as bar:
        futs = {pool.submit(_run_one, t, c, s, common[t], threads, root, jobs == 0): (t, c, s)
                for t, c, s in work}
        for fut in cf.as_completed(futs):
            t, c, s = futs[fut]
            try:
                r = fut.result()
                results.append(dict(r, task=t, config=c.label, seed=s))
                key = METRIC[t][0]
                how = "already done" if r.get("skipped") else f"{r.get('wall_s', 0):.0f} s"
                bar.write(f"[padst-reproduce] {c.name(t, s)}: {key} {r[key]:.4f} ({how})")
            except Exception as e:  # noqa: BLE001 - report every failed run at the end
                failures.append(str(e))
                bar.write(f"[padst-reproduce] FAILED {c.name(t, s)}: {str(e).splitlines()[0]}")
            bar.update(1)
    if failures:
        raise SystemExit(f"{len(failures)} of {len(work)} runs failed:\n\n" + "\n\n".join(failures))
    return results


def collect_finished(tasks: Sequence[str], configs: List[Config], seeds: Sequence[int],
                     common: Dict[str, List[str]], root: Path) -> Tuple[List[Dict], List[str]]:
    """The summaries of the runs under ``root`` that finished with this sweep's training arguments (any thread
    count), and the names of those that did not: ``--table-only`` tabulates a sweep trained elsewhere or stopped."""
    results, missing = [], []
    for s in seeds:
        for t in tasks:
            for c in configs:
                out = root / "runs" / t / c.name(t, s)
                done = _finished(out, _run_argv(t, c, s, common[t], 1, out), ("--out", "--threads"))
                if done is None:
                    missing.append(c.name(t, s))
                else:
                    results.append(dict(done, task=t, config=c.label, seed=s, skipped=True))
    return results, missing


def _train_namespace(task: str, common: List[str], cfg: Config, seed: int = 0) -> argparse.Namespace:
    from .recipes import parser

    return parser().parse_args([task, *common, *cfg.train_args(), "--seed", str(seed)])


def time_configs(task: str, configs: List[Config], common: List[str], threads: int, reps: int) -> List[Dict]:
    """Training step and exported inference of each configuration (fresh weights: time does not depend on them)
    against its dense twin, in this process, one after another."""
    import torch.nn.functional as F

    from ..nn import harden_all
    from .recipes import GPT2_VOCAB, build_models, lm_loss, speed

    torch.set_num_threads(threads)
    rows = []
    for cfg in configs:
        args = _train_namespace(task, common, cfg)
        args.speed_steps, args.threads = reps, threads
        model, _, twin = build_models(args)
        harden_all(model, force=True)  # as trained models end (the soft phase, half of training, costs more)
        gen = torch.Generator().manual_seed(0)
        if task == "vit":
            x = torch.randn(args.batch_size, 1, 28, 28, generator=gen)
            y = torch.randint(0, 10, (args.batch_size,), generator=gen)
            loss_fn = lambda m: F.cross_entropy(m(x), y)  # noqa: E731
            x_infer = torch.randn(args.infer_batch, 1, 28, 28, generator=gen)
        else:
            xb = torch.randint(0, args.vocab or GPT2_VOCAB, (args.batch_size, args.context + 1), generator=gen)
            loss_fn = lambda m: lm_loss(m, xb)  # noqa: E731
            x_infer = xb[:, :-1]
        rows.append(dict(task=task, config=cfg.label, sparsity=cfg.sparsity, threads=threads,
                         **speed(model, twin, loss_fn, x_infer, args, torch.device("cpu"))))
    return rows


# ------------------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------------------

def _stats(values: List[float]) -> Dict:
    n = len(values)
    mean = statistics.fmean(values) if values else float("nan")
    std = statistics.stdev(values) if n > 1 else float("nan")
    return dict(n=n, mean=mean, std=std, se=std / math.sqrt(n) if n > 1 else float("nan"))


def aggregate(results: List[Dict], task: str) -> Dict:
    """{(config label, sparsity): stats of the test metric (in % for accuracy), of the validation metric}."""
    key, vkey, _, higher = METRIC[task]
    scale = 100.0 if higher else 1.0
    cells: Dict = {}
    for r in results:
        if r["task"] != task:
            continue
        sp = None if r["structure"] == "dense" else r["sparsity"]
        cells.setdefault((r["config"], sp), dict(test=[], valid=[], density=[]))
        cells[(r["config"], sp)]["test"].append(r[key] * scale)
        cells[(r["config"], sp)]["valid"].append(r[vkey] * scale)
        cells[(r["config"], sp)]["density"].append(r.get("density", 1.0))
    return {k: dict(test=_stats(v["test"]), valid=_stats(v["valid"]), density=statistics.fmean(v["density"]))
            for k, v in cells.items()}


def _fmt(s: Dict, digits: int) -> str:
    if s["n"] == 0 or math.isnan(s["mean"]):
        return "-"
    return f"{s['mean']:.{digits}f}" + ("" if math.isnan(s["std"]) else f" ± {s['std']:.{digits}f}")


def gap_rows(agg: Dict, task: str, sparsities: Sequence[float], split: str = "test") -> List[Dict]:
    """Per structured family and sparsity: the gap of the unpermuted structure to unstructured RigL, the gap with the
    permutation, the share of the first closed by the permutation, and whether the gap exceeds seed noise
    (2 standard errors of the difference, when there are >= 2 seeds); on the ``split`` ("test" or "valid")."""
    if split not in ("test", "valid"):
        raise ValueError(f"split must be 'test' or 'valid', got {split!r}")
    higher = METRIC[task][3]
    rows = []
    for s in sparsities:
        ref = agg.get(("unstructured RigL", s))
        for st in STRUCTURED:
            a, b = agg.get((st, s)), agg.get((f"{st} + perm", s))
            if not (ref and a and b):
                continue
            r, x, p = ref[split]["mean"], a[split]["mean"], b[split]["mean"]
            if higher:  # accuracy points
                gap, gap_perm = r - x, r - p
            else:  # perplexity, % above RigL's
                gap, gap_perm = 100 * (x / r - 1), 100 * (p / r - 1)
            ses = [ref[split]["se"], a[split]["se"]]
            noise = 2 * math.sqrt(sum(e * e for e in ses)) if not any(math.isnan(e) for e in ses) else float("nan")
            noise_units = noise if higher else 100 * noise / r  # NaN stays NaN
            closed = (gap - gap_perm) / gap if gap > 0 else float("nan")
            rows.append(dict(structure=st, sparsity=s, gap=gap, gap_perm=gap_perm, closed=closed, noise=noise_units,
                             significant=(not math.isnan(noise_units)) and gap > noise_units))
    return rows


def table_md(results: List[Dict], speeds: List[Dict], tasks: Sequence[str], configs: List[Config],
             sparsities: Sequence[float], seeds: Sequence[int], command: str, settings: Dict) -> str:
    if settings.get("table_only"):  # the runs were trained earlier or elsewhere: say where, from their summaries
        where = ", ".join(sorted({f"{r.get('device', '?')} with {r.get('threads', '?')} thread(s) per run"
                                  for r in results}))
        how = (f"tabulated with --table-only from finished runs trained on {where} (each run's command is in "
               f"runs/<task>/<run>/command.json); {settings['date']}.")
        if settings.get("missing"):
            how += f" {len(settings['missing'])} runs missing, left out: {', '.join(settings['missing'])}."
    else:
        how = (f"threads per run: {settings['threads']} ({settings['jobs']} runs at a time); "
               f"torch {torch.__version__}; {settings['date']}.")
    lines = ["# padst-reproduce results", "", f"Command: `{command}`", "",
             f"Seeds: {list(seeds)}; sparsities: {', '.join(f'{s:.0%}' for s in sparsities)}; {how}", ""]
    labels = list(dict.fromkeys(c.label for c in configs))
    for task in tasks:
        key, _, label, higher = METRIC[task]
        digits = 2
        agg = aggregate(results, task)
        lines += [f"## {task}: {PROFILE_TEXT[task]}", "",
                  f"Test {label}, mean ± std over seeds (validation in brackets). Density is of the sparse layers.",
                  "", "| configuration | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |",
                  "|---|" + "---|" * len(sparsities)]
        dense = agg.get(("dense", None))
        if dense:
            lines.append(f"| dense | {_fmt(dense['test'], digits)} ({_fmt(dense['valid'], digits)}) |"
                         + " |" * (len(sparsities) - 1))
        for lab in labels:
            if lab == "dense":
                continue
            cells = []
            for s in sparsities:
                c = agg.get((lab, s))
                cells.append("-" if c is None else
                             f"{_fmt(c['test'], digits)} ({_fmt(c['valid'], digits)}; d={c['density']:.3f})")
            lines.append(f"| {lab} | " + " | ".join(cells) + " |")
        unit = "points" if higher else "% perplexity"
        lines += ["", f"Gap to unstructured RigL ({unit}; > 0: worse than RigL) without and with the learned "
                  "permutation, and the share of the gap the permutation closes, on test and (last three columns) "
                  "on validation. 'noise' is two standard errors of the difference between the two means.", "",
                  "| structure | sparsity | gap, no perm | gap, perm | share closed | noise | gap > noise | "
                  "valid: gap, no perm | valid: gap, perm | valid: share closed |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for g, v in zip(gap_rows(agg, task, sparsities), gap_rows(agg, task, sparsities, "valid")):
            closed = "-" if math.isnan(g["closed"]) else f"{g['closed']:.0%}"
            vclosed = "-" if math.isnan(v["closed"]) else f"{v['closed']:.0%}"
            noise = "-" if math.isnan(g["noise"]) else f"{g['noise']:.2f}"
            lines.append(f"| {g['structure']} | {g['sparsity']:.0%} | {g['gap']:+.2f} | {g['gap_perm']:+.2f} | "
                         f"{closed} | {noise} | {'yes' if g['significant'] else 'no'} | {v['gap']:+.2f} | "
                         f"{v['gap_perm']:+.2f} | {vclosed} |")
        prow = perm_rows(results, task, sparsities)
        if prow:
            lines += ["", "How the permutations were learned (every permuted layer of every seed): hardened because its "
                      "soft matrix converged (mean per-row penalty under 0.22 and under half its start) or at the "
                      "deadline; when, as a share of training; the share of indices that differ from the rounding of "
                      "the soft phase's start (and of units the pattern treats differently, which leaves out moves "
                      "inside a block) and from the identity.", "",
                      "| structure | sparsity | layers | converged | at deadline | hardened at | start penalty | "
                      "indices moved from start | units re-placed | layers moved >= half | moved from identity |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in prow:
                lines.append(f"| {r['structure']} | {r['sparsity']:.0%} | {r['layers']} | {r['converged']} | "
                             f"{r['deadline']} | {_pct(r['hardened_at'])} | {r['start_penalty']:.2f} | "
                             f"{_pct(r['moved_from_start'])} | {_pct(r['moved_support_from_start'])} | "
                             f"{r['half_moved']} of {r['hardened']} | {_pct(r['moved_from_identity'])} |")
        sp_rows = [r for r in speeds if r["task"] == task]
        if sp_rows:
            lines += ["", f"Speed against the dense twin ({sp_rows[0]['threads']} threads, median of "
                      f"{settings['speed_reps']} calls; > 1: faster than dense): training step (forward, backward, "
                      "AdamW) and exported inference.", "",
                      "| configuration | sparsity | train step ms | x dense | inference ms | x dense |",
                      "|---|---|---|---|---|---|"]
            for r in sp_rows:
                sp = "-" if r["sparsity"] is None else f"{r['sparsity']:.0%}"
                lines.append(f"| {r['config']} | {sp} | {1e3 * r['train_step_s']:.2f} | {r['train_speedup']:.2f} | "
                             f"{1e3 * r['infer_s']:.2f} | {r['infer_speedup']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def perm_rows(results: List[Dict], task: str, sparsities: Sequence[float]) -> List[Dict]:
    """Per permuted configuration and sparsity, over seeds and layers: how the permutations were learned (from each
    run's ``summary["permutation"]``, :func:`padst_ext.permutation_report`)."""
    rows = []
    for s in sparsities:
        for st in STRUCTURED:
            runs = [r for r in results if r["task"] == task and r["config"] == f"{st} + perm"
                    and r.get("sparsity") == s and r.get("permutation")]
            if not runs:
                continue
            layers = [v for r in runs for v in r["permutation"]["layers"].values()]
            hard = [v for v in layers if v["phase"] == "hard"]

            def mean(vals):
                vals = [v for v in vals if v is not None]
                return statistics.fmean(vals) if vals else float("nan")

            when = [v["hardened_step"] / r["permutation"]["summary"]["total_steps"] for r in runs
                    for v in r["permutation"]["layers"].values()
                    if v.get("hardened_step") is not None and r["permutation"]["summary"].get("total_steps")]
            rows.append(dict(structure=st, sparsity=s, runs=len(runs), layers=len(layers), hardened=len(hard),
                             converged=sum(v["reason"] == "converged" for v in hard),
                             deadline=sum(v["reason"] == "deadline" for v in hard),
                             hardened_at=mean(when), start_penalty=mean(v.get("start_penalty") for v in hard),
                             moved_from_start=mean(v.get("moved_from_start") for v in hard),
                             moved_support_from_start=mean(v.get("moved_support_from_start") for v in hard),
                             moved_from_identity=mean(v.get("moved_from_identity") for v in hard),
                             half_moved=sum((v.get("moved_from_start") or 0) >= 0.5 for v in hard)))
    return rows


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.0%}"


PROFILE_TEXT = {
    "vit": "ViT on Fashion-MNIST (timm VisionTransformer, 28x28, patch 4)",
    "gpt2": "GPT-2 on Wikipedia text (Hugging Face GPT2LMHeadModel, GPT-2 BPE)",
}


# ------------------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_metric(results: List[Dict], task: str, configs: List[Config], sparsities: Sequence[float], path: Path) -> None:
    plt = _pyplot()
    key, _, label, _ = METRIC[task]
    agg = aggregate(results, task)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = {"unstructured": "k", "block": "tab:blue", "nm": "tab:orange", "diagonal": "tab:green"}
    for lab in dict.fromkeys(c.label for c in configs if c.structure != "dense"):
        xs = [s for s in sparsities if (lab, s) in agg]
        if not xs:
            continue
        ys = [agg[(lab, s)]["test"]["mean"] for s in xs]
        es = [0 if math.isnan(agg[(lab, s)]["test"]["std"]) else agg[(lab, s)]["test"]["std"] for s in xs]
        fam = lab.split()[0]
        ls = "-" if ("perm" in lab or lab == "unstructured RigL") else "--"
        ax.errorbar([100 * s for s in xs], ys, yerr=es, label=lab, color=colors.get(fam, "gray"), linestyle=ls,
                    marker="o" if "perm" in lab else "s", capsize=3, markersize=4)
    if ("dense", None) in agg:
        ax.axhline(agg[("dense", None)]["test"]["mean"], color="gray", linestyle=":", label="dense")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel(f"test {label}")
    if key == "test_ppl":
        ax.set_yscale("log")
    ax.set_title(PROFILE_TEXT[task], fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _load_run(run_dir: Path):
    from .data import load_checkpoint
    from .recipes import build_models
    from .recipes import parser as train_parser

    ck = load_checkpoint(run_dir / "checkpoint.pt", required=("model", "args"))  # onto the CPU: the speed phase
    # padst-train's defaults under the run's own arguments: a run written before a flag existed has no value for it
    args = vars(train_parser().parse_args([ck["args"]["task"]]))
    args.update(ck["args"])
    model = build_models(argparse.Namespace(**args))[0]
    model.load_state_dict(ck["model"])
    return model


def _first_sparse(model):
    from ..nn import SparseLinear

    return next((n, m) for n, m in model.named_modules() if isinstance(m, SparseLinear))


def plot_permutation(run_dir: Path, path: Path) -> Optional[str]:
    """The learned (hardened) permutation of the first sparse layer of one run, as a permutation matrix."""
    plt = _pyplot()
    model = _load_run(run_dir)
    name, layer = _first_sparse(model)
    if getattr(layer, "phase", "none") != "hard":
        return None
    perm = layer.perm.cpu()
    P = torch.zeros(perm.numel(), perm.numel())
    P[torch.arange(perm.numel()), perm] = 1
    moved = int((perm != torch.arange(perm.numel())).sum())
    fig, ax = plt.subplots(figsize=(4.4, 4.4))
    ax.imshow(P.numpy(), cmap="Greys", interpolation="nearest")
    ax.set_title(f"{run_dir.name}\n{name}: {moved} of {perm.numel()} indices moved ({layer.perm_side} side)",
                 fontsize=7)
    ax.set_xlabel("source index")
    ax.set_ylabel("position")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return name


def plot_masks(runs: List[Path], path: Path) -> None:
    """For each run: the structured pattern S of its first sparse layer and, for permuted runs, the effective
    weight's pattern S Π (what the structure looks like to the input after the learned permutation)."""
    plt = _pyplot()
    panels = []
    for rd in runs:
        model = _load_run(rd)
        name, layer = _first_sparse(model)
        with torch.no_grad():
            panels.append((f"{rd.name}\nS", layer.pattern_mask().float()))
            if getattr(layer, "phase", "none") == "hard":
                panels.append((f"{rd.name}\nS Π", (layer.dense_weight() != 0).float()))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.0), squeeze=False)
    for ax, (title, m) in zip(axes[0], panels):
        ax.imshow(m.numpy(), cmap="Greys", interpolation="nearest", aspect="auto")
        ax.set_title(title, fontsize=6)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="padst-reproduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", choices=sorted(PROFILES), default=["vit", "gpt2"])
    p.add_argument("--quick", action="store_true",
                   help="1 seed, 90 and 98 %%, shorter runs (about 7 minutes on 2 cores)")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3, 1 with --quick)")
    p.add_argument("--sparsities", type=float, nargs="+", default=None,
                   help="default 0.9 0.95 0.98 (0.9 0.98 with --quick)")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs at a time, each a subprocess (default: 2 when there are >= 2 cores); 0: one after "
                        "another in this process")
    p.add_argument("--train-args", default="",
                   help="more padst-train arguments for every run, appended to the profile's, e.g. "
                        "\"--data-dir DIR\" or \"--epochs 5\" (one string; the last of a repeated option wins)")
    p.add_argument("--configs", nargs="+", choices=CONFIG_KEYS, default=None, metavar="CONFIG",
                   help="train and tabulate only these configurations of the grid (default: all): "
                        + ", ".join(CONFIG_KEYS))
    p.add_argument("--out", default="results", help="output folder (default ./results)")
    p.add_argument("--no-speed", action="store_true", help="skip the speed measurements")
    p.add_argument("--speed-reps", type=int, default=10)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--table-only", action="store_true",
                   help="train nothing: tabulate and plot the runs under --out that finished with these arguments "
                        "(a sweep trained on another machine, or stopped early); the missing ones are named")
    return p


def main(argv=None) -> Dict:
    args = parser().parse_args(argv)
    profile = "quick" if args.quick else "full"
    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.quick else 3)))
    sparsities = args.sparsities or ([0.9, 0.98] if args.quick else [0.9, 0.95, 0.98])
    for s in sparsities:
        if not 0 < s < 1:
            raise SystemExit(f"--sparsities must lie in (0, 1), got {s}")
    if not seeds:
        raise SystemExit("--seeds must be >= 1")
    cores = os.cpu_count() or 1
    jobs = args.jobs if args.jobs is not None else (2 if cores >= 2 else 1)
    if jobs < 0:
        raise SystemExit(f"--jobs must be >= 0, got {jobs}")
    threads = max(1, cores // max(1, jobs))
    common = {t: PROFILES[t][profile] + shlex.split(args.train_args) for t in args.tasks}
    from .recipes import parser as train_parser

    for t in args.tasks:  # a bad --train-args fails here, not in every run
        try:
            train_parser().parse_args([t, *common[t]])
        except SystemExit:
            raise SystemExit(f"--train-args {args.train_args!r} is not valid for padst-train {t}") from None
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    configs = [c for c in grid(sparsities) if args.configs is None or c.key in args.configs]
    command = "padst-reproduce " + shlex.join(argv if argv is not None else sys.argv[1:])  # copy-pasteable
    settings = dict(profile=profile, train_args=common, jobs=jobs,
                    threads=threads, speed_reps=args.speed_reps, date=time.strftime("%Y-%m-%d %H:%M"),
                    cores=cores)
    t0 = time.perf_counter()
    if args.table_only:
        results, missing = collect_finished(args.tasks, configs, seeds, common, root)
        if not results:
            raise SystemExit(f"--table-only: no run under {root / 'runs'} finished with these arguments")
        if missing:
            print(f"[padst-reproduce] --table-only: {len(missing)} of {len(missing) + len(results)} runs are missing "
                  f"or were trained with other arguments, left out: {', '.join(missing)}")
        settings.update(table_only=True, missing=missing)
    else:
        results = train_all(args.tasks, configs, seeds, common, jobs, threads, root, not args.no_progress)
    train_s = time.perf_counter() - t0
    speeds: List[Dict] = []
    if not args.no_speed and not args.table_only:
        for task in args.tasks:
            print(f"[padst-reproduce] timing {task} against dense ({cores} threads)")
            speeds += time_configs(task, configs, common[task], cores, args.speed_reps)
    settings["train_s"], settings["total_s"] = train_s, time.perf_counter() - t0
    write_text_atomic(json.dumps(dict(settings=settings, command=command, runs=results, speed=speeds), indent=1,
                                 default=str), root / "results.json")
    md = table_md(results, speeds, args.tasks, configs, sparsities, seeds, command, settings)
    write_text_atomic(md, root / "table.md")
    if not args.no_plots:
        mid = sorted(sparsities)[len(sparsities) // 2]
        for task in args.tasks:
            plot_metric(results, task, configs, sparsities, root / f"{task}_metric_vs_sparsity.png")
            runs = root / "runs" / task
            perm_run = runs / Config("block", "rigl", True, mid).name(task, seeds[0])
            if (perm_run / "checkpoint.pt").is_file():  # absent only with --table-only
                plot_permutation(perm_run, root / f"{task}_permutation.png")
            shown = [Config("unstructured", "rigl", False, mid)] + \
                [Config(st, "rigl", p, mid) for st in STRUCTURED for p in (False, True)]
            plot_masks([r for r in (runs / c.name(task, seeds[0]) for c in shown) if (r / "checkpoint.pt").is_file()],
                       root / f"{task}_masks.png")
    print(md)
    print(f"[padst-reproduce] wrote {root}/table.md, results.json and the plots in {settings['total_s'] / 60:.1f} min")
    return dict(settings=settings, runs=results, speed=speeds, table=md)


def cli() -> int:
    """Console entry point (``padst-reproduce``): a checkpoint that cannot be trusted or read is one line and exit 2."""
    from .data import CheckpointError

    try:
        main()
    except CheckpointError as e:
        print(f"padst-reproduce: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
