"""CPU op timings against dense PyTorch and torch's own sparse kernels, measured in the same run.

For each ViT-B MLP shape (x 1024x768 -> 3072 and 1024x3072 -> 768), each structure and sparsity it times
  dense      F.linear (forward) and F.linear forward+backward (dx and dW)
  torch BSR  W.to_sparse_bsr(block) @ x.T (block structure only), torch CSR W.to_sparse_csr() @ x.T
  padst      forward and forward+backward (dx + dW on the pattern), permuted and identity permutation, and the
             unfused alternative: materialise x[:, perm] then call the unpermuted kernel
The permutation sits where SparseLinear puts it by default (perm_side="auto": the smaller side, so the input at
fc1 and the output at fc2; N:M always folds an input permutation into its indices); the permuted / identity ratio
of the other side is reported too. Then two more tables:
  batch 1    N:M forward on one token (online inference, memory-bound), 1:12 and 2:24 (the 1:10 / 2:20 of the
             issue cannot divide 768), identity and permuted (a permuted pattern reads x in a random order), every
             call from cold caches (a 64 MB buffer read before each, as the rest of a model would)
  exported   an exported SparseLinear (hard random permutation, bias) against nn.Linear, inference_mode
Every padst forward and forward+backward with the default permutation is timed twice in the same round robin: with
the variant the per-machine tuner chose (padst_ext.tuning; it measures on the first call of each shape class) and
with tuning off (the fixed default variant); `tuned x` is their ratio, and the tuner's choices are listed.
Ratios are dense time / time, so > 1 is faster than dense. Writes JSON to benchmarks/results/.

    python benchmarks/cpu_ops.py [--threads 2] [--batch 1024] [--reps 9] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as Fn

from padst_ext import formats as F
from padst_ext import ops, reference, tuning

HERE = Path(__file__).resolve().parent


def untuned(fn):
    """fn run with tuning off: the fixed default variant of every kernel."""
    def run():
        with tuning.disabled():
            return fn()
    return run


def bench(fn, reps: int, warmup: int = 2) -> float:
    """Median wall time in milliseconds."""
    return bench_group({"t": fn}, reps, warmup)["t"]


def bench_group(fns: dict, reps: int, warmup: int = 2) -> dict:
    """Median wall time (ms) of each callable, measured round-robin so that drift (clock, cache, other load)
    hits all of them alike; the ratios between them are what the table reports. The order is shuffled every round
    (seeded): in a fixed order, a kernel that follows another on the same weights finds them in L2 and looks
    faster than it is (measured: 10-30% for the tuned / untuned pair)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(0)
    for _ in range(reps):
        rng.shuffle(order)
        for k in order:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def _block_weight(structure, dense, sparsity, gen):
    R, C = dense.shape
    bs = int(structure[5:])
    nbr, nbc = R // bs, C // bs
    k = max(1, round((1 - sparsity) * nbc))
    idx = torch.rand(nbr, nbc, generator=gen).topk(k, dim=1).indices
    mask = torch.zeros(nbr, nbc, dtype=torch.bool).scatter_(1, idx, True)
    return F.block_from_dense(dense, mask, (bs, bs))


def _nm_weight(structure, dense, sparsity, gen):
    R, C = dense.shape
    # N:M with M dividing both 768 and 3072: 6:32 (81.3%), 3:32 (90.6%) and 3:64 (95.3%)
    n, m = (6, 32) if sparsity < 0.85 else (3, 32) if sparsity < 0.93 else (3, 64)
    idx = torch.rand(R, C // m, m, generator=gen).topk(n, dim=-1).indices
    mask = torch.zeros(R, C // m, m, dtype=torch.bool).scatter_(-1, idx, True).reshape(R, C)
    return F.nm_from_dense(dense, mask, n, m)


def _diag_weight(structure, dense, sparsity, gen):
    R, C = dense.shape
    K = math.ceil((1 - sparsity) * R * C / min(R, C))
    offsets = torch.randperm(max(R, C), generator=gen)[:K].sort().values
    return F.diag_from_dense(dense, offsets)


WEIGHTS = {"block": _block_weight, "nm": _nm_weight, "diag": _diag_weight}


def make_weight(structure, R, C, sparsity, gen):
    """The unpermuted (logical) weight object of a case."""
    dense = torch.randn(R, C, generator=gen) / math.sqrt(C)
    return WEIGHTS[structure.rstrip("0123456789")](structure, dense, sparsity, gen)


def default_side(w, C, R):
    """SparseLinear's perm_side="auto": the smaller side; N:M (no output permutation) always the input."""
    return "input" if not w.supports_output_perm or C <= R else "output"


def measure_bandwidth(reps: int = 5) -> float:
    """Memory bandwidth (GB/s) of a 256 MB copy (read + write), the same threads as the kernels."""
    a = torch.ones(64 << 20)
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a), reps, warmup=1)
    return 2 * a.numel() * 4 / (t * 1e-3) / 1e9


def floor_ms(row, bw_gbs):
    """The kernel's floor: max(its FLOPs at the rate dense F.linear reached on this row, the bytes it must move at
    the measured bandwidth). FLOPs 2*B*nnz; bytes: x, y and the compressed weights once (4 bytes per value, plus 2 per
    N:M column index), in float32."""
    B, C, R, nnz = row["B"], row["C"], row["R"], row["nnz"]
    flops = 2 * B * nnz
    dense_rate = 2 * B * C * R / row["dense_fwd_ms"]  # FLOPs per ms
    nbytes = 4 * (B * C + B * R + nnz) + row["index_bytes"]
    return max(flops / dense_rate, nbytes / (bw_gbs * 1e6)), flops, nbytes


def run_case(structure, B, C, R, sparsity, reps):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, generator=gen)
    Wd = torch.randn(R, C, generator=gen)
    in_perm = torch.randperm(C, generator=gen)
    out_perm = torch.randperm(R, generator=gen)
    w_id = make_weight(structure, R, C, sparsity, gen)
    density = w_id.values.numel() / (R * C)
    side = default_side(w_id, C, R)
    # (in_perm, out_perm) of the default side and of the other one (N:M has no other side)
    perms = {"input": (in_perm, None), "output": (None, out_perm)}
    w_perm = w_id.with_perm(*perms[side])  # N:M folds the permutation into its indices
    row = dict(structure=structure, B=B, C=C, R=R, sparsity=sparsity, density=round(density, 4), perm_side=side,
               nnz=w_perm.values.numel(),
               # the compressed weight's index bytes the kernel reads: 16-bit N:M columns, block/diagonal metadata
               index_bytes=2 * w_perm.values.numel() if isinstance(w_perm, F.NMSparse) else 0)

    W = w_perm.to_dense()
    csr = W.to_sparse_csr()
    fwd = {"dense_fwd_ms": lambda: Fn.linear(x, Wd),
           "padst_fwd_perm_ms": lambda: w_perm.mm(x),
           "padst_fwd_perm_untuned_ms": untuned(lambda: w_perm.mm(x)),
           "padst_fwd_ident_ms": lambda: w_id.mm(x),
           "torch_csr_fwd_ms": lambda: (csr @ x.T).T}
    if w_id.supports_output_perm:
        w_other = w_id.with_perm(*perms["output" if side == "input" else "input"])
        fwd["padst_fwd_perm_other_side_ms"] = lambda: w_other.mm(x)
        if side == "input":
            fwd["padst_fwd_gather_then_ident_ms"] = lambda: w_id.mm(x[:, in_perm])
        else:
            fwd["padst_fwd_gather_then_ident_ms"] = lambda: w_id.mm(x)[:, out_perm]
    if isinstance(w_id, F.BlockSparse):
        bsr = W.to_sparse_bsr(w_id.block_size)
        fwd["torch_bsr_fwd_ms"] = lambda: (bsr @ x.T).T
    row.update(bench_group(fwd, reps))

    xr = x.clone().requires_grad_()
    vr = w_perm.values.clone().requires_grad_()
    Wr = Wd.clone().requires_grad_()
    dy = torch.randn(B, R, generator=gen)
    row.update(bench_group({
        "dense_fwdbwd_ms": lambda: torch.autograd.grad(Fn.linear(xr, Wr), (xr, Wr), dy),
        "padst_fwdbwd_perm_ms": lambda: torch.autograd.grad(w_perm.mm(xr, values=vr), (xr, vr), dy),
        "padst_fwdbwd_perm_untuned_ms": untuned(lambda: torch.autograd.grad(w_perm.mm(xr, values=vr), (xr, vr), dy)),
    }, reps))

    # correctness guard for the figures: the timed kernel computes the right thing (against the plain reference)
    row["max_abs_err"] = float((w_perm.mm(x) - w_perm.mm(x, impl=reference)).abs().max())
    return row


def run_batch1(n, m, C, R, reps):
    """N:M forward on one token, identity and permuted pattern, against F.linear on the same token."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, C, generator=gen)
    Wd = torch.randn(R, C, generator=gen)
    idx = torch.rand(R, C // m, m, generator=gen).topk(n, dim=-1).indices
    mask = torch.zeros(R, C // m, m, dtype=torch.bool).scatter_(-1, idx, True).reshape(R, C)
    perm = torch.randperm(C, generator=gen)
    w_id = F.nm_from_dense(Wd, mask, n, m)
    w_perm = F.nm_from_dense(Wd, mask, n, m, perm=perm)
    row = dict(structure=f"nm{n}:{m}", B=1, C=C, R=R, sparsity=round(1 - n / m, 4))
    # Online inference runs a layer after the rest of the model has been through the caches (ViT-B's weights are ten
    # times this machine's L3), so every call here starts cold: a 64 MB buffer is read before each one, untimed.
    # Back to back, the figures depend on which kernel ran last (whose data is still in L2 / L3).
    fns = {"dense_fwd_ms": lambda: Fn.linear(x, Wd),
           "padst_fwd_ident_ms": lambda: ops.nm_mm(x, w_id.values, w_id.col_idx, n, m),
           "padst_fwd_perm_ms": lambda: ops.nm_mm(x, w_perm.values, w_perm.col_idx, n, m)}
    flush = torch.ones(16 << 20)
    times = {k: [] for k in fns}
    for _ in range(1 + reps):
        for k, fn in fns.items():  # three calls of one kernel in a row, the first not kept: each kept call finds the
            for j in range(3):     # thread pool as its own previous call left it, whichever kernel ran before
                flush.sum()  # read, so the lines it leaves are clean (no write-backs inside the timed call)
                t0 = time.perf_counter()
                fn()
                if j:
                    times[k].append(time.perf_counter() - t0)
    row.update({k: 1e3 * statistics.median(v) for k, v in times.items()})
    got = ops.nm_mm(x, w_perm.values, w_perm.col_idx, n, m)
    row["max_abs_err"] = float((got - x @ w_perm.to_dense().T).abs().max())
    return row


def run_exported(structure, B, C, R, sparsity, reps):
    """export(nn.Sequential(SparseLinear)) with a hard random permutation and bias against nn.Linear."""
    from padst_ext.nn import SparseLinear, export

    torch.manual_seed(2)
    x = torch.randn(B, C)
    lin = torch.nn.Linear(C, R)
    # a random soft start rounded alone: a hard random permutation (the default gradient start exports the identity
    # before it has trained)
    layer = SparseLinear(C, R, structure=structure, sparsity=sparsity, seed=3, perm_init="random", harden_mode="matrix")
    model = export(torch.nn.Sequential(layer))
    with torch.inference_mode():
        row = dict(structure=structure, B=B, C=C, R=R, sparsity=sparsity, density=round(model[0].density, 4),
                   perm_side=model[0].perm_side)
        row.update(bench_group({"dense_fwd_ms": lambda: lin(x), "exported_fwd_ms": lambda: model(x),
                                "exported_fwd_untuned_ms": untuned(lambda: model(x))}, reps))
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--quick", action="store_true", help="one shape, one sparsity, few reps (smoke test)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "cpu_ops.json")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="Sparse (CSR|BSR) tensor support is in beta")
    torch.set_num_threads(args.threads)
    shapes = [(768, 3072), (3072, 768)]  # (C, R): fc1, fc2 of ViT-B
    sparsities = [0.9, 0.95, 0.8]  # 80% only for the "faster than torch BSR at >= 80%" check
    structures = ["block32", "block16", "nm", "diag"]
    B, reps = args.batch, args.reps
    if args.quick:
        shapes, sparsities, B, reps = [(256, 512)], [0.9], min(B, 64), 2

    bw = measure_bandwidth()
    rows = []
    for C, R in shapes:
        for s in sparsities:
            for st in structures:
                rows.append(run_case(st, B, C, R, s, reps))
                print(".", end="", flush=True, file=sys.stderr)
    batch1 = []
    for C, R in shapes:
        for n, m in ([(2, 8)] if args.quick else [(1, 12), (2, 24)]):
            batch1.append(run_batch1(n, m, C, R, reps))
            print(".", end="", flush=True, file=sys.stderr)
    exported = []
    for C, R in shapes:
        for st in ["block", "nm", "diagonal"]:
            exported.append(run_exported(st, B, C, R, sparsities[0], reps))
            print(".", end="", flush=True, file=sys.stderr)
    print(file=sys.stderr)

    hdr = (f"{'structure':<8} {'shape (BxC->R)':<17} {'dens':>6} {'side':>6} {'dense ms':>9} {'fwd ms':>8} "
           f"{'fwd x':>6} {'ident x':>7} {'perm/id':>7} {'other/id':>8} {'unfused/fused':>13} {'f+b x':>6} "
           f"{'BSR x':>6} {'CSR x':>6} {'tuned x':>7} {'f+b tuned x':>11}")
    print(f"padst_ext CPU ops, {args.threads} threads, torch {torch.__version__}, {_cpu_name()}, "
          f"kernels: {torch.ops.padst._cpu_isa()}")
    print("ratios are dense time / time (> 1 = faster than dense F.linear); perm/id = permuted / identity time with "
          "the permutation on SparseLinear's default side (other/id: on the other side); unfused/fused = "
          "materialising the permutation + identity kernel / fused kernel; tuned x = time with tuning off / on (fwd, "
          "fwd+bwd)")
    print(hdr)
    print("-" * len(hdr))
    nan = float("nan")
    for r in rows:
        d = r["dense_fwd_ms"]  # measured round-robin with this row's kernels
        g = r.get("padst_fwd_gather_then_ident_ms")
        o = r.get("padst_fwd_perm_other_side_ms")
        bsr = r.get("torch_bsr_fwd_ms")
        print(f"{r['structure']:<8} {r['B']}x{r['C']}->{r['R']:<8} {r['density']:>6.3f} {r['perm_side'][:3]:>6} "
              f"{d:>9.2f} {r['padst_fwd_perm_ms']:>8.2f} {d / r['padst_fwd_perm_ms']:>6.2f} "
              f"{d / r['padst_fwd_ident_ms']:>7.2f} {r['padst_fwd_perm_ms'] / r['padst_fwd_ident_ms']:>7.2f} "
              f"{(o / r['padst_fwd_ident_ms']) if o else nan:>8.2f} "
              f"{(g / r['padst_fwd_perm_ms']) if g else nan:>13.2f} "
              f"{r['dense_fwdbwd_ms'] / r['padst_fwdbwd_perm_ms']:>6.2f} "
              f"{(d / bsr) if bsr else nan:>6.2f} {d / r['torch_csr_fwd_ms']:>6.2f} "
              f"{r['padst_fwd_perm_untuned_ms'] / r['padst_fwd_perm_ms']:>7.2f} "
              f"{r['padst_fwdbwd_perm_untuned_ms'] / r['padst_fwdbwd_perm_ms']:>11.2f}")

    print("\nN:M forward, batch 1 (one token): dense F.linear / padst")
    print(f"{'pattern':<8} {'C->R':<10} {'dense us':>9} {'ident us':>9} {'ident x':>8} {'perm us':>8} {'perm x':>7}")
    for r in batch1:
        d = r["dense_fwd_ms"]
        print(f"{r['structure']:<8} {str(r['C']) + '->' + str(r['R']):<10} {1e3 * d:>9.1f} "
              f"{1e3 * r['padst_fwd_ident_ms']:>9.1f} {d / r['padst_fwd_ident_ms']:>8.2f} "
              f"{1e3 * r['padst_fwd_perm_ms']:>8.1f} {d / r['padst_fwd_perm_ms']:>7.2f}")

    print(f"\nexported SparseLinear (hard random permutation, bias), batch {B}, inference_mode: nn.Linear / exported")
    print(f"{'structure':<9} {'C->R':<10} {'dens':>6} {'side':>6} {'dense ms':>9} {'export ms':>9} {'x':>6} "
          f"{'tuned x':>7}")
    for r in exported:
        d = r["dense_fwd_ms"]
        print(f"{r['structure']:<9} {str(r['C']) + '->' + str(r['R']):<10} {r['density']:>6.3f} "
              f"{r['perm_side'][:3]:>6} {d:>9.2f} {r['exported_fwd_ms']:>9.2f} {d / r['exported_fwd_ms']:>6.2f} "
              f"{r['exported_fwd_untuned_ms'] / r['exported_fwd_ms']:>7.2f}")
    print(f"\nhow far from the floor (forward with the default permutation): floor = max(FLOPs at dense F.linear's rate "
          f"on the row, bytes at {bw:.1f} GB/s, a 256 MB copy measured in this run)")
    print(f"{'structure':<8} {'shape (BxC->R)':<17} {'dens':>6} {'MFLOP':>7} {'MB':>6} {'GFLOP/s':>8} {'floor ms':>8} "
          f"{'fwd ms':>7} {'x floor':>7}")
    for r in rows:
        f_ms, flops, nbytes = floor_ms(r, bw)
        r.update(floor_ms=f_ms, flops=flops, bytes=nbytes)
        t = r["padst_fwd_perm_ms"]
        print(f"{r['structure']:<8} {r['B']}x{r['C']}->{r['R']:<8} {r['density']:>6.3f} {flops / 1e6:>7.0f} "
              f"{nbytes / 1e6:>6.1f} {flops / t / 1e6:>8.1f} {f_ms:>8.2f} {t:>7.2f} {t / f_ms:>7.2f}")

    choices = tuning.choices()
    print(f"\nper-machine tuning ({tuning.machine_id()}): the variant chosen per shape class, its kernel time and the "
          "default's on the first call's data, and the time spent choosing")
    print(f"{'default ms':>10} {'tuned ms':>8} {'margin':>6} {'tune ms':>7} {'tried':>5}  shape class -> variant")
    for c in choices:
        if c["tune_ms"] is None:
            print(f"{'-':>10} {'-':>8} {'-':>6} {'-':>7} {'-':>5}  {c['key']} -> {c['variant']} (from a cache)")
            continue
        print(f"{c['default_ms']:>10.3f} {c['best_ms']:>8.3f} {c['default_ms'] / c['best_ms']:>6.2f} "
              f"{c['tune_ms']:>7.0f} {c['tried']:>5}  {c['key']} -> {c['variant']}")

    meta = dict(threads=args.threads, bandwidth_gbs=round(bw, 2), torch=torch.__version__, python=platform.python_version(),
                machine=platform.machine(), cpu=_cpu_name(), isa=torch.ops.padst._cpu_isa(), batch=B, reps=reps, quick=args.quick,
                date=time.strftime("%Y-%m-%d %H:%M:%S"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows, batch1=batch1, exported=exported, tuning=choices),
                                   indent=1))
    print(f"wrote {args.out}")


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
