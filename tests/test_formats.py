"""Conversions dense + mask <-> each storage format round-trip exactly."""

from __future__ import annotations

import pytest
import torch

from padst_ext import formats as F

from cases import balanced_block_mask, random_nm_mask, random_offsets


@pytest.mark.parametrize("R,C,block", [(64, 32, (16, 16)), (32, 96, (32, 32)), (48, 80, (12, 20))])
def test_block_round_trip(R, C, block):
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(R, C, generator=g)
    bmask = balanced_block_mask(R // block[0], C // block[1], 0.3, g)
    w = F.block_from_dense(dense, bmask, block)
    emask = F.block_mask_to_dense(bmask, block)
    assert torch.equal(w.mask(), emask)
    assert torch.equal(w.to_dense(), dense * emask)
    assert w.values.shape[0] == int(bmask.sum())
    # CSR: sorted columns; CSC: consistent with CSR
    for i in range(R // block[0]):
        cols = w.col_idx[w.row_ptr[i]:w.row_ptr[i + 1]]
        assert torch.all(cols[1:] > cols[:-1])
    rows = torch.repeat_interleave(torch.arange(R // block[0]), w.row_ptr.diff())
    for j in range(C // block[1]):
        blocks = w.blk_t[w.col_ptr[j]:w.col_ptr[j + 1]]
        assert torch.all(w.col_idx[blocks] == j)
        assert torch.equal(rows[blocks], w.row_idx_t[w.col_ptr[j]:w.col_ptr[j + 1]])
    assert w.density == int(emask.sum()) / (R * C)


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (1, 10), (3, 8)])
@pytest.mark.parametrize("permute", [False, True])
def test_nm_round_trip(n, m, permute):
    g = torch.Generator().manual_seed(1)
    R, C = 12, 40 if m in (4, 10) else 48
    dense = torch.randn(R, C, generator=g)
    mask = random_nm_mask(R, C, n, m, g)
    perm = torch.randperm(C, generator=g) if permute else None
    w = F.nm_from_dense(dense, mask, n, m, perm=perm)
    assert w.values.shape == (R, C // m * n)
    if perm is None:
        assert torch.equal(w.to_dense(), dense * mask)
        assert torch.equal(w.mask(), mask)
    else:
        # effective weight W_eff[:, perm] = S, i.e. x @ W_eff.T == x[:, perm] @ S.T
        assert torch.equal(w.to_dense()[:, perm], dense * mask)
        assert torch.equal(w.mask()[:, perm], mask)
    assert w.density == n / m


def test_nm_int32_indices():
    g = torch.Generator().manual_seed(2)
    mask = random_nm_mask(4, 8, 2, 4, g)
    w = F.nm_from_dense(torch.randn(4, 8), mask, 2, 4, index_dtype=torch.int32)
    assert w.col_idx.dtype == torch.int32


@pytest.mark.parametrize("R,C", [(64, 32), (32, 64), (40, 40), (7, 5)])
def test_diag_round_trip(R, C):
    g = torch.Generator().manual_seed(3)
    dense = torch.randn(R, C, generator=g)
    offsets = random_offsets(R, C, 0.8, g)
    w = F.diag_from_dense(dense, offsets)
    mask = F.diag_mask(offsets, (R, C))
    assert torch.equal(w.mask(), mask)
    assert torch.equal(w.to_dense(), dense * mask)
    # distinct diagonals never overlap: exactly K * L non-zeros
    assert int(mask.sum()) == offsets.numel() * min(R, C)
