"""Share of training time spent in DST updates and in the soft-permutation phase, ViT-tiny sized, on the CPU.

Model: timm VisionTransformer with ViT-tiny widths (embed 192, depth 12, 3 heads, MLP 768) on 28x28 one-channel
images with 4x4 patches (50 tokens), every block's qkv/proj/fc1/fc2 sparsified (block 32x32, 90%; the first and
last layers dense). Step = forward + backward + Adam step on a batch. Measured (median of repetitions):
  * a plain step in the hard-permutation phase (DST attached, no update due),
  * an update step (RigL: dense-gradient capture, dz.T @ x_p per layer, drop/grow, optimizer-state move),
  * a step in the soft-permutation phase, and a dense model's step.
The share of DST at update interval ΔT is (update step - plain step) / (ΔT * plain step).
The update itself (DST._update: new patterns, values and Adam moments moved) is also timed alone, and its memory is
measured as the peak of the bytes held by tensors it allocates (a dispatch mode follows every op's new storage until
it is freed), against one dense R x C float32 matrix of the largest layer: the grow score, made before the update,
is the only dense matrix an update needs.

    python benchmarks/dst_overhead.py [--batch 32] [--reps 5] [--threads 2] [--interval 100]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import weakref
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from padst_ext import DST, harden_all, sparsify

HERE = Path(__file__).resolve().parent


def vit_tiny(depth: int = 12):
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=192, depth=depth,
                             num_heads=3, mlp_ratio=4.0)


def timed_steps(model, opt, batch, n, gen):
    times = []
    for _ in range(n):
        x = torch.randn(batch, 1, 28, 28, generator=gen)
        y = torch.randint(0, 10, (batch,), generator=gen)
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages that ops allocate while the mode is on, each counted until it is freed."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = set()

    def _free(self, key, n):
        self._seen.discard(key)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if key in before or key in self._seen or st.nbytes() == 0:
                continue
            self._seen.add(key)
            self.live += st.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(st, self._free, key, st.nbytes())
        return out


def time_updates(dst, model, opt, batch, reps, gen):
    """(median ms of DST._update alone over reps update steps, peak bytes an update allocates)."""
    inner, ms, peak = dst._update, [], []

    def timed(step, scores):
        t0 = time.perf_counter()
        inner(step, scores)
        ms.append(1e3 * (time.perf_counter() - t0))

    def measured(step, scores):
        with LiveBytes() as lb:
            inner(step, scores)
        peak.append(lb.peak)

    dst._update = timed
    timed_steps(model, opt, batch, reps, gen)
    dst._update = measured
    timed_steps(model, opt, batch, 1, gen)
    dst._update = inner
    return statistics.median(ms), max(peak)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--interval", type=int, default=100)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--structure", default="block")
    p.add_argument("--out", type=Path, default=HERE / "results" / "dst_overhead.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    kw = dict(block_size=32)  # block structures only; the others take no such option

    torch.manual_seed(0)
    dense = vit_tiny(args.depth)
    opt = torch.optim.Adam(dense.parameters(), lr=1e-4)
    timed_steps(dense, opt, args.batch, 1, gen)
    t_dense = statistics.median(timed_steps(dense, opt, args.batch, args.reps, gen))

    # soft phase (DST adds the penalty gradient inside the layers' backward)
    torch.manual_seed(0)
    model = vit_tiny(args.depth)
    # "uniform": the soft matrix acts from the first step (the default gradient start runs unpermuted for its first
    # steps, which would be timed instead); a step costs the same wherever the matrix starts
    report = sparsify(model, args.structure, 0.9, permute=True, perm_init="uniform", **kw)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    dst = DST(model, opt, algorithm="static", total_steps=10**6)
    timed_steps(model, opt, args.batch, 1, gen)
    t_soft = statistics.median(timed_steps(model, opt, args.batch, args.reps, gen))
    dst.remove()

    # hard phase: plain steps, then update steps (update every step)
    harden_all(model, force=True)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    dst = DST(model, opt, algorithm="rigl", update_interval=10**6, end=10**6)
    timed_steps(model, opt, args.batch, 1, gen)
    t_plain = statistics.median(timed_steps(model, opt, args.batch, args.reps, gen))
    dst.remove()
    dst = DST(model, opt, algorithm="rigl", update_interval=1, end=10**6)
    t_update = statistics.median(timed_steps(model, opt, args.batch, args.reps, gen))
    assert len(dst.history) == args.reps
    update_ms, update_peak = time_updates(dst, model, opt, args.batch, args.reps, gen)
    dst.remove()
    sparse = [m for m in model.modules() if hasattr(m, "pattern_mask")]
    dense_rc = max(4 * m.out_features * m.in_features for m in sparse)  # float32 R x C of the largest layer

    share = (t_update - t_plain) / (args.interval * t_plain)
    from cpu_ops import _cpu_name  # the CPU model, as the other CPU benchmarks name it

    res = dict(cpu=_cpu_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M:%S"), threads=args.threads, batch=args.batch, depth=args.depth, structure=args.structure,
               sparse_layers=len(report.replaced), dense_step_ms=1e3 * t_dense, hard_step_ms=1e3 * t_plain,
               update_step_ms=1e3 * t_update, soft_step_ms=1e3 * t_soft, interval=args.interval,
               dst_share=share, soft_over_hard=t_soft / t_plain, update_only_ms=update_ms,
               update_peak_bytes=update_peak, largest_dense_rc_bytes=dense_rc)
    print(f"{res['cpu']}, torch {res['torch']}")
    print(f"ViT-tiny widths, depth {args.depth}, 28x28 patch 4, batch {args.batch}, {args.threads} threads, "
          f"{args.structure} 90% on {len(report.replaced)} layers")
    print(f"  dense step             {res['dense_step_ms']:8.1f} ms")
    print(f"  sparse step (hard)     {res['hard_step_ms']:8.1f} ms   ({t_dense / t_plain:.2f}x dense)")
    print(f"  RigL update step       {res['update_step_ms']:8.1f} ms   -> DST share at interval {args.interval}: "
          f"{100 * share:.2f}%")
    print(f"    of which the update  {update_ms:8.1f} ms   (DST._update alone: patterns, values, Adam moments)")
    print(f"    update memory        {update_peak / 2**20:8.2f} MiB peak allocated = {update_peak / dense_rc:.2f} x one "
          f"dense R x C float32 of the largest layer ({dense_rc / 2**20:.2f} MiB)")
    print(f"  sparse step (soft)     {res['soft_step_ms']:8.1f} ms   ({t_soft / t_plain:.2f}x the hard step)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
