"""Does the learned permutation find a planted one? The mechanism benchmark for PA-DST's permutations.

Teacher: ``y = S_true x[:, pi_true] + noise`` (1 % of the target's standard deviation), ``S_true`` a structured
weight (block 4x4 at 90 %, block 8x8 at 87.5 %, N:M 1:8, 7 wrap-around diagonals per 64 inputs) with N(0, 1 / fan-in)
values, ``x ~ N(0, I)``. Student: a :class:`padst_ext.SparseLinear` of the same structure, trained with Adam
(lr 1e-2, batch 128) through :class:`padst_ext.DST` (``static`` when it holds the teacher's pattern, ``rigl`` from a
random pattern of the same structure), and every permutation method below; permutations harden at 75 % of
training at the latest.

Reported per cell (mean over seeds): the held-out MSE of the hardened student divided by the target's variance,
and **match**: the fraction of inputs that the student's hard permutation sends to a position read by exactly
the same outputs as where the teacher's sends them (for blocks: the right block column, up to block columns read
by the same block rows; for N:M and diagonals: the exact position up to identical columns). Chance is about
1 / (number of distinct columns): ~0.08 for block 4x4 at d = 64, 0.02 for N:M and diagonals. For a student that
learns its own pattern (``--masks dst``) ``recall`` is the share of the teacher's effective non-zeros
``S_true P_true`` that the student's ``S P`` also holds. The control: an identity teacher (``pi_true = id``), where
a permuted student must do as well as the unpermuted one.

Methods:
    none      no permutation (the baseline, and the identity-teacher reference)
    paper     the paper's mode and this library's former defaults: random start (logits ~ N(0, 5^2)),
              lambda = 1e-3 constant, Hungarian rounding of M at delta = 0.22
    uniform   a near-uniform start, lambda ramped (1e-4 -> 0.1 over 1000 steps), rounding that keeps the most of
              S M (``harden_mode="weights"``), hardening once converged: every default except the start
    default   the defaults (``perm_init="gradient"``: unpermuted for 5 steps while the gradient is summed, then M
              starts from the assignment the pattern keeps most of it under; the ramp; the weight-keeping rounding)
    matrix    the defaults with the paper's rounding of M alone (``harden_mode="matrix"``)

    python benchmarks/perm_planted.py                     # d = 64 and 256, 3 seeds, fixed and DST masks (~1 h on 2 cores)
    python benchmarks/perm_planted.py --dims 64 --seeds 1 --masks fixed   # a few minutes
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import platform
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

HERE = Path(__file__).resolve().parent

STRUCTURES = {  # name -> SparseLinear keywords; the density is kept when d changes
    "block4": dict(structure="block", block_size=4, sparsity=0.9),
    "block8": dict(structure="block", block_size=8, sparsity=0.875),
    "nm": dict(structure="nm", n=1, m=8),
    "diagonal": dict(structure="diagonal", sparsity=1 - 7 / 64),
}
METHODS = {
    "none": dict(permute=False),
    "paper": dict(perm_init="random", perm_lambda=1e-3, perm_lambda_ramp=0, harden_mode="matrix"),
    "uniform": dict(perm_init="uniform"),
    "default": dict(),
    "matrix": dict(harden_mode="matrix"),
}


def planted_run(structure: str, d: int, seed: int, method: str, identity: bool = False, masks: str = "fixed",
                steps: int = 2000, batch: int = 128, lr: float = 1e-2, noise: float = 0.01,
                threads: int = 1, **layer_kw) -> Dict:
    """One student against one planted teacher; returns its MSE, match / recall and how its permutation hardened."""
    from padst_ext import DST, SparseLinear, param_groups

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(seed)
    kw = STRUCTURES[structure]
    teacher = SparseLinear(d, d, bias=False, permute=False, seed=seed, **kw)
    t_mask = teacher.pattern_mask()
    with torch.no_grad():
        fan_in = t_mask.sum(1, keepdim=True).clamp(min=1).float()
        S_true = torch.randn(d, d, generator=gen) * t_mask / fan_in.sqrt()
    pi = torch.arange(d) if identity else torch.randperm(d, generator=gen)
    W_true = S_true[:, torch.argsort(pi)]  # x[:, pi] @ S_true.T == x @ W_true.T
    data = torch.Generator().manual_seed(seed + 10_000)
    x_test = torch.randn(4096, d, generator=data)
    y_test = x_test @ W_true.T
    var = float(y_test.var())
    sigma = noise * math.sqrt(var)

    student_mask = t_mask if masks == "fixed" else None  # dst: a random pattern of the structure, learned by RigL
    student = SparseLinear(d, d, bias=False, perm_side="input", mask=student_mask, seed=seed + 1,
                           harden_step=int(0.75 * steps), **kw, **dict(METHODS[method], **layer_kw))
    opt = torch.optim.Adam(param_groups(student, lr=lr), lr=lr)
    dst = DST(student, opt, algorithm="static" if masks == "fixed" else "rigl", update_interval=100,
              drop_fraction=0.3, total_steps=steps, dense_first_last=False, seed=seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        x = torch.randn(batch, d, generator=data)
        y = x @ W_true.T + sigma * torch.randn(batch, d, generator=data)
        loss = (student(x) - y).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    dst.remove()
    student.eval()
    with torch.no_grad():
        mse = float((student(x_test) - y_test).square().mean()) / var
    perm = student.perm if student.phase == "hard" else torch.arange(d)
    s_mask = student.pattern_mask()
    inv_s, inv_t = torch.argsort(perm), torch.argsort(pi)
    out = dict(structure=structure, d=d, seed=seed, method=method, identity=identity, masks=masks, mse=mse,
               seconds=time.perf_counter() - t0)
    # effective patterns (which outputs read input c): student s_mask[:, inv_s[c]], teacher t_mask[:, inv_t[c]]
    eff_s, eff_t = s_mask[:, inv_s], t_mask[:, inv_t]
    out["recall"] = float((eff_s & eff_t).sum() / eff_t.sum())
    if masks == "fixed":
        out["match"] = float((eff_s == eff_t).all(0).float().mean())
    if student.phase == "hard":
        log = student.perm_log
        out.update(reason=log["reason"], hardened_step=log["hardened_step"], start_penalty=log["start_penalty"],
                   penalty_at_harden=log["penalty_at_harden"], moved_from_start=log["moved_from_start"],
                   moved_support_from_start=log["moved_support_from_start"])
        if masks == "fixed" and log["start_perm"] is not None:  # how good the soft phase's start already was
            inv0 = torch.argsort(torch.tensor(log["start_perm"]))
            out["start_match"] = float((s_mask[:, inv0] == eff_t).all(0).float().mean())
    return out


def _job(kw):
    return planted_run(**kw)


def _mean(rows: List[Dict], key: str) -> Optional[float]:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(vals) if vals else None


def _cell(rows: List[Dict], masks: str) -> str:
    if not rows:
        return "-"
    mse = _mean(rows, "mse")
    second = ("match", _mean(rows, "match")) if masks == "fixed" else ("recall", _mean(rows, "recall"))
    text = f"{mse:.3f}"
    if rows[0]["method"] != "none" or masks != "fixed":
        text += f", {second[0]} {second[1]:.2f}"
    conv = [r for r in rows if r.get("reason")]
    if conv and any(r["reason"] != "converged" for r in conv):
        text += f" ({sum(r['reason'] == 'converged' for r in conv)}/{len(conv)} converged)"
    return text


def tables(results: List[Dict], methods: List[str], structures: List[str], dims: List[int], masks: List[str]) -> str:
    lines = []
    for mk in masks:
        for identity in (False, True):
            rows_t = [r for r in results if r["masks"] == mk and r["identity"] == identity]
            if not rows_t:
                continue
            what = "identity teacher (control)" if identity else "random planted permutation"
            pattern = "the student holds the teacher's pattern" if mk == "fixed" else \
                "the student learns its pattern by RigL from a random one"
            lines += [f"### {what}; {pattern}", "",
                      "held-out MSE / target variance" + (", match" if mk == "fixed" else ", recall") +
                      " (mean over seeds)", "",
                      "| structure | d | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
            for d in dims:
                for st in structures:
                    cells = [_cell([r for r in rows_t if r["structure"] == st and r["d"] == d and r["method"] == m],
                                   mk) for m in methods]
                    if all(c == "-" for c in cells):
                        continue
                    lines.append(f"| {st} | {d} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def mechanism_table(results: List[Dict], methods: List[str], structures: List[str], dims: List[int]) -> str:
    """Per permuting method (random teacher, teacher's pattern): how its permutation was learned: the penalty where
    the soft phase started, the match of the start's rounding, the share of indices the soft phase moved and of
    inputs it sent to a position read by other outputs (moves inside a block column are free), when it hardened
    and why."""
    lines = ["### How the permutation was learned (random teacher, the teacher's pattern; mean over seeds)", "",
             "| method | structure | d | start penalty | start match | final match | indices moved from start | "
             "inputs re-placed | hardened at step | converged |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        if m == "none":
            continue
        for d in dims:
            for st in structures:
                rows = [r for r in results if r["masks"] == "fixed" and not r["identity"] and r["method"] == m
                        and r["structure"] == st and r["d"] == d and r.get("reason")]
                if not rows:
                    continue
                f = lambda k, fmt: "-" if _mean(rows, k) is None else format(_mean(rows, k), fmt)  # noqa: E731
                lines.append(f"| {m} | {st} | {d} | {f('start_penalty', '.2f')} | {f('start_match', '.2f')} | "
                             f"{f('match', '.2f')} | {f('moved_from_start', '.2f')} | "
                             f"{f('moved_support_from_start', '.2f')} | {f('hardened_step', '.0f')} | "
                             f"{sum(r['reason'] == 'converged' for r in rows)}/{len(rows)} |")
    return "\n".join(lines + [""])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--structures", nargs="+", choices=list(STRUCTURES), default=list(STRUCTURES))
    p.add_argument("--dims", nargs="+", type=int, default=[64, 256])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--masks", nargs="+", choices=["fixed", "dst"], default=["fixed", "dst"])
    p.add_argument("--control-methods", nargs="+", choices=list(METHODS), default=["none", "paper", "default"],
                   help="methods also run against an identity teacher (fixed masks)")
    p.add_argument("--dst-methods", nargs="+", choices=list(METHODS), default=["none", "paper", "default"],
                   help="methods run with DST masks")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "perm_planted.json")
    args = p.parse_args(argv)

    work = []
    for seed in range(args.seeds):
        for d in args.dims:
            for st in args.structures:
                for mk in args.masks:
                    methods = args.methods if mk == "fixed" else [m for m in args.methods if m in args.dst_methods]
                    for m in methods:
                        work.append(dict(structure=st, d=d, seed=seed, method=m, masks=mk, steps=args.steps))
                        if mk == "fixed" and m in args.control_methods:
                            work.append(dict(structure=st, d=d, seed=seed, method=m, masks=mk, steps=args.steps,
                                             identity=True))
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")  # a fresh interpreter per worker: one OpenMP pool of one thread each
    results = []
    with ctx.Pool(args.jobs) as pool:
        for i, r in enumerate(pool.imap_unordered(_job, work), 1):
            results.append(r)
            print(f"[{i}/{len(work)}] {r['structure']} d={r['d']} {r['method']} {r['masks']}"
                  f"{' identity' if r['identity'] else ''} s{r['seed']}: mse {r['mse']:.3f}"
                  + (f" match {r['match']:.2f}" if "match" in r else f" recall {r['recall']:.2f}")
                  + (f" ({r['reason']} at {r['hardened_step']})" if r.get("reason") else ""), flush=True)
    wall = time.perf_counter() - t0
    header = (f"Planted permutation, {args.steps} steps, Adam lr 1e-2, batch 128, {args.seeds} seeds; "
              f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {wall / 60:.1f} min")
    md = "\n".join([header, "", tables(results, args.methods, args.structures, args.dims, args.masks),
                    mechanism_table(results, args.methods, args.structures, args.dims)])
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, wall_s=wall,
                                        runs=results), indent=1))
    args.out.with_suffix(".md").write_text(md + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return results


if __name__ == "__main__":
    main()
