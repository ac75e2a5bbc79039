"""Small calls of every v2 kernel (block: x-stationary, row-complete, grouped dW; the row kernel: N:M forward, diagonal
forward, dx and dW, N:M dx and dW; the cuSPARSELt path's column permutation is covered by the CUDA tests), for
compute-sanitizer on a GPU.

The host emulation checks these kernels' indices, fragments and addresses, but not memory ordering: a missing
cp.async wait or barrier, or a shared-memory race, only shows on a GPU, and often not as a wrong result. Run under
compute-sanitizer's racecheck / synccheck / memcheck (benchmarks/gpu_suite.sh does when the tool is there):

    compute-sanitizer --tool racecheck --error-exitcode 3 python benchmarks/v2_sanitize.py
    python benchmarks/v2_sanitize.py --cpu      # the same calls through the emulation (padst_emu), no GPU

Each call is also compared with the float64 reference (bf16 tolerance), so the script fails on a wrong result too.
Exit status: 0 when every call matched, 1 otherwise (compute-sanitizer's own exit code when it finds an error).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import padst_ext  # noqa: F401  (registers the ops)
from padst_ext import _extension
from padst_ext import formats as F
from padst_ext import reference as ref


def _layer(C, R, kb, density, device, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(R // kb, C // kb, generator=gen) < density
    mask[0, 0] = True
    w = F.block_from_dense(torch.randn(R, C, generator=gen, dtype=torch.float64), mask, (kb, kb))
    in_perm, out_perm = torch.randperm(C, generator=gen), torch.randperm(R, generator=gen)
    return w, in_perm, out_perm


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run through the emulation (padst_emu) instead of a GPU")
    args = ap.parse_args(argv)
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device (use --cpu for the emulation)", file=sys.stderr)
        return 1
    if args.cpu:
        _extension.load_emulation()  # registers torch.ops.padst_emu (not loaded by `import padst_ext`)
    ops = torch.ops.padst_emu if args.cpu else torch.ops.padst
    os.environ["PADST_BLOCK_V2"] = "1"
    os.environ["PADST_ROWS_V2"] = "1"
    dtype = torch.bfloat16
    # (name, C, R, block side, density, B): the x-stationary kernel serves both passes of the first three, the row-
    # complete one the forward of "rc fwd" and dx of "rc dx", the grouped dW every 16/32 case.
    cases = [("xs 16", 64, 48, 16, 0.5, 70), ("xs 32", 128, 96, 32, 0.5, 70), ("xs 64", 256, 128, 64, 0.5, 40),
             ("rc fwd 16", 1536, 160, 16, 0.15, 45), ("rc dx 32", 320, 1536, 32, 0.15, 45),
             ("dW groups 32", 1280, 96, 32, 0.9, 300)]
    bad = 0
    for name, C, R, kb, density, B in cases:
        for permuted in (False, True):
            w, ip, op = _layer(C, R, kb, density, device, dtype, seed=C + R + kb)
            meta = [t.to(device) for t in w.meta()]
            v = w.values.to(device, dtype)
            ipd, opd = (ip.to(device), op.to(device)) if permuted else (None, None)
            gen = torch.Generator().manual_seed(B)
            x = torch.randn(B, C, generator=gen).to(device, dtype)
            dy = torch.randn(B, R, generator=gen).to(device, dtype)
            bias = torch.randn(R, generator=gen).to(device, dtype)
            got = {"fwd": ops.block_mm(x, v, *meta, bias, ipd, opd),
                   "dx": ops.block_mm_t(dy, v, *meta, ipd, opd),
                   "dW": ops.block_sddmm(dy, x, meta[0], meta[1], kb, kb, ipd, opd)}
            if device == "cuda":
                torch.cuda.synchronize()
            m64 = [t.cpu() for t in w.meta()]
            x64, dy64, v64, b64 = x.double().cpu(), dy.double().cpu(), v.double().cpu(), bias.double().cpu()
            ip64, op64 = (ip, op) if permuted else (None, None)
            want = {"fwd": ref.block_mm(x64, v64, *m64, b64, ip64, op64),
                    "dx": ref.block_mm_t(dy64, v64, *m64, ip64, op64),
                    "dW": ref.block_sddmm(dy64, x64, m64[0], m64[1], kb, kb, ip64, op64)}
            for k in got:
                err = (got[k].double().cpu() - want[k]).abs().max().item() if want[k].numel() else 0.0
                scale = max(1.0, want[k].abs().max().item() if want[k].numel() else 0.0)
                ok = err <= 2e-2 * scale
                bad += not ok
                print(f"{name:14s} {'perm' if permuted else 'id  '} {k:4s} max err {err:.3e} (scale {scale:.1f}) "
                      f"{'ok' if ok else 'WRONG'}")
    for C, R, n, m, B, dt in ((768, 96, 1, 12, 70, torch.bfloat16), (3072, 64, 1, 24, 20, torch.float32)):
        gen = torch.Generator().manual_seed(C)
        perm = torch.randperm(C, generator=gen)
        mask = torch.zeros(R, C // m, m, dtype=torch.bool).scatter_(
            -1, torch.rand(R, C // m, m, generator=gen).topk(n, dim=-1).indices, True).reshape(R, C)
        w = F.nm_from_dense(torch.randn(R, C, generator=gen, dtype=torch.float64), mask, n, m, perm=perm)
        x = torch.randn(B, C, generator=gen).to(device, dt)
        bias = torch.randn(R, generator=gen).to(device, dt)
        dy = torch.randn(B, R, generator=gen).to(device, dt)
        vd, cid = w.values.to(device, dt), w.col_idx.to(device)
        got = {"fwd": ops.nm_mm(x, vd, cid, n, m, bias), "dx": ops.nm_mm_t(dy, vd, cid, n, m),
               "dW": ops.nm_sddmm(dy, x, cid, n, m)}
        if device == "cuda":
            torch.cuda.synchronize()
        v64 = w.values.to(dt).double()
        want = {"fwd": ref.nm_mm(x.double().cpu(), v64, w.col_idx, n, m, bias.double().cpu()),
                "dx": ref.nm_mm_t(dy.double().cpu(), v64, w.col_idx, n, m),
                "dW": ref.nm_sddmm(dy.double().cpu(), x.double().cpu(), w.col_idx, n, m)}
        for k in got:
            err = (got[k].double().cpu() - want[k]).abs().max().item()
            scale = max(1.0, want[k].abs().max().item())
            ok = err <= 2e-2 * scale
            bad += not ok
            print(f"nm {n}:{m} {str(dt):14s} {k:4s} max err {err:.3e} (scale {scale:.1f}) {'ok' if ok else 'WRONG'}")
    for C, R in ((768, 256), (256, 768)):  # a wide and a tall diagonal layer, permuted: forward and dx
        gen = torch.Generator().manual_seed(R)
        offsets = torch.randperm(max(R, C), generator=gen)[:24].sort().values
        w = F.diag_from_dense(torch.randn(R, C, generator=gen, dtype=torch.float64), offsets)
        ip, op = torch.randperm(C, generator=gen), torch.randperm(R, generator=gen)
        x = torch.randn(33, C, generator=gen).to(device, torch.bfloat16)
        dy = torch.randn(33, R, generator=gen).to(device, torch.bfloat16)
        v = w.values.to(device, torch.bfloat16)
        off = w.offsets.to(device)
        got = {"fwd": ops.diag_mm(x, v, off, R, None, ip.to(device), op.to(device)),
               "dx": ops.diag_mm_t(dy, v, off, C, ip.to(device), op.to(device)),
               "dW": ops.diag_sddmm(dy, x, off, ip.to(device), op.to(device))}
        if device == "cuda":
            torch.cuda.synchronize()
        v64 = v.double().cpu()
        want = {"fwd": ref.diag_mm(x.double().cpu(), v64, w.offsets, R, None, ip, op),
                "dx": ref.diag_mm_t(dy.double().cpu(), v64, w.offsets, C, ip, op),
                "dW": ref.diag_sddmm(dy.double().cpu(), x.double().cpu(), w.offsets, ip, op)}
        for k in got:
            err = (got[k].double().cpu() - want[k]).abs().max().item()
            scale = max(1.0, want[k].abs().max().item())
            ok = err <= 2e-2 * scale
            bad += not ok
            print(f"diag {C}->{R} perm {k:4s} max err {err:.3e} (scale {scale:.1f}) {'ok' if ok else 'WRONG'}")
    if args.cpu:  # which emulated kernels served (every v2 kernel should have)
        e = torch.ops.padst_emu
        print(f"emulated v2 calls: x-stationary {e.block_xs_calls()}, row-complete {e.block_rc_calls()}, "
              f"dW {e.block_gw_calls()}, rows {e.rows_v2_calls()}")
    print("v2_sanitize:", "all calls matched" if bad == 0 else f"{bad} calls WRONG")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
