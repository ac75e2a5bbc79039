"""Soft permutations: Sinkhorn, the l1-l2 penalty, Hungarian hardening, and learning a planted permutation."""

from __future__ import annotations

import itertools

import pytest
import torch

from padst_ext.permutation import (INITS, SoftPermutation, expected_random_penalty, harden, l1_l2_penalty,
                                   l1_l2_penalty_grad, sinkhorn, with_penalty_grad)


def perm_matrix(perm: torch.Tensor) -> torch.Tensor:
    d = perm.numel()
    return torch.zeros(d, d).scatter_(1, perm[:, None], 1.0)


@pytest.mark.parametrize("scale", [0.1, 1.0, 5.0])
def test_sinkhorn_is_doubly_stochastic(scale):
    g = torch.Generator().manual_seed(0)
    M = sinkhorn(scale * torch.randn(24, 24, generator=g, dtype=torch.float64), n_iters=200)
    assert (M >= 0).all()
    torch.testing.assert_close(M.sum(0), torch.ones(24, dtype=torch.float64))
    torch.testing.assert_close(M.sum(1), torch.ones(24, dtype=torch.float64), atol=1e-6, rtol=0)


def test_sinkhorn_stable_for_huge_logits():
    g = torch.Generator().manual_seed(8)
    M = sinkhorn(1e4 * torch.randn(16, 16, generator=g))
    assert torch.isfinite(M).all()
    torch.testing.assert_close(M.sum(0), torch.ones(16))


def test_sinkhorn_default_iterations_close_enough():
    """20 iterations from the default (peaked) start: columns exact, rows within a few percent (more
    iterations, the sinkhorn_iters knob, tighten them)."""
    for d in (64, 256):
        sp = SoftPermutation(d, generator=torch.Generator().manual_seed(1))
        M = sp.matrix()
        assert (M.sum(0) - 1).abs().max() < 1e-5
        assert (M.sum(1) - 1).abs().max() < 0.05 and (M.sum(1) - 1).abs().mean() < 5e-3
        M100 = sinkhorn(sp.logits, n_iters=100)
        assert (M100.sum(1) - 1).abs().max() < 5e-3


def test_penalty_zero_exactly_on_permutations():
    g = torch.Generator().manual_seed(2)
    for d in (1, 2, 7, 32):
        P = perm_matrix(torch.randperm(d, generator=g))
        assert l1_l2_penalty(P).item() == 0.0
    for p in itertools.permutations(range(4)):
        assert l1_l2_penalty(perm_matrix(torch.tensor(p))).item() == 0.0


def test_penalty_positive_otherwise_and_maximal_at_uniform():
    g = torch.Generator().manual_seed(3)
    for _ in range(10):
        M = sinkhorn(torch.randn(8, 8, generator=g))
        assert l1_l2_penalty(M).item() > 1e-3
    U = torch.full((9, 9), 1 / 9)
    assert abs(l1_l2_penalty(U, "mean_row").item() - expected_random_penalty(9)) < 1e-6
    # a convex mix of two permutations is penalised
    A, B = perm_matrix(torch.arange(5)), perm_matrix(torch.tensor([1, 0, 2, 3, 4]))
    assert l1_l2_penalty(0.5 * A + 0.5 * B).item() > 0.5


def test_penalty_gradient_finite_at_zero_rows():
    M = torch.zeros(4, 4)
    M[0, 1] = 1.0  # rows 1..3 and columns 0, 2, 3 are all zero
    M.requires_grad_()
    l1_l2_penalty(M).backward()
    assert torch.isfinite(M.grad).all()
    Z = torch.zeros(3, 3, requires_grad=True)
    l1_l2_penalty(Z).backward()
    assert torch.isfinite(Z.grad).all()


def test_closed_form_penalty_gradient():
    g = torch.Generator().manual_seed(9)
    for M in (sinkhorn(torch.randn(12, 12, generator=g, dtype=torch.float64)),
              torch.rand(5, 5, generator=g, dtype=torch.float64) * (torch.arange(5) != 2)[:, None]):
        Mr = M.clone().requires_grad_()
        (auto,) = torch.autograd.grad(l1_l2_penalty(Mr), Mr)
        torch.testing.assert_close(l1_l2_penalty_grad(M), auto)
    # injected into a backward pass: as if lam * P(M) were added to the loss
    logits = torch.randn(6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64)
    (a,) = torch.autograd.grad((x @ with_penalty_grad(sinkhorn(logits), 0.3).T).sum(), logits)
    (b,) = torch.autograd.grad((x @ sinkhorn(logits).T).sum() + 0.3 * l1_l2_penalty(sinkhorn(logits)), logits)
    torch.testing.assert_close(a, b)


def test_harden_is_always_a_bijection():
    g = torch.Generator().manual_seed(4)
    cases = [torch.rand(10, 10, generator=g), torch.full((6, 6), 1 / 6), torch.zeros(5, 5),
             torch.eye(7)[torch.randperm(7, generator=g)], -torch.rand(8, 8, generator=g)]
    # row-argmax would map several rows to one column here; the Hungarian algorithm never does
    peaked = torch.full((6, 6), 0.1)
    peaked[:, 2] = 0.5
    cases.append(peaked)
    for M in cases:
        perm = harden(M)
        assert perm.dtype == torch.long and torch.equal(perm.sort().values, torch.arange(M.shape[0]))


def test_harden_recovers_planted_permutation_from_noisy_soft_matrix():
    g = torch.Generator().manual_seed(5)
    for d in (8, 64, 200):
        perm = torch.randperm(d, generator=g)
        noise = sinkhorn(torch.randn(d, d, generator=g))
        M = 0.45 * perm_matrix(perm) + 0.55 * noise  # the planted entry is not always the row maximum
        assert torch.equal(harden(M), perm)


def test_harden_convention_matches_indexing():
    """M ~ P with P[i, perm[i]] = 1 acts as x @ M.T == x[:, perm]."""
    g = torch.Generator().manual_seed(6)
    perm = torch.randperm(9, generator=g)
    x = torch.randn(3, 9, generator=g)
    P = perm_matrix(perm)
    torch.testing.assert_close(x @ P.T, x[:, perm])
    assert torch.equal(harden(P), perm)


@pytest.mark.parametrize("init", ["random", "uniform"])
def test_planted_permutation_learned_by_training(init):
    """The soft matrix itself converges to the planted permutation (penalty near zero), not only after
    rounding: target y = x[:, perm_true], loss = MSE + lam * penalty."""
    torch.manual_seed(0)
    d = 12
    perm_true = torch.randperm(d)
    sp = SoftPermutation(d, init=init, generator=torch.Generator().manual_seed(1))
    start = sp.penalty("mean_row").item()
    opt = torch.optim.Adam(sp.parameters(), lr=0.1)
    for _ in range(200):
        x = torch.randn(64, d)
        loss = (sp(x) - x[:, perm_true]).square().mean() + 1e-3 * sp.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
    M = sp.matrix().detach()
    assert sp.penalty("mean_row").item() < 0.05 < start
    assert (M[torch.arange(d), perm_true] > 0.9).all()
    assert torch.equal(sp.harden(), perm_true)


def test_soft_permutation_rejects_bad_arguments():
    with pytest.raises(ValueError, match="init must be one of"):
        SoftPermutation(4, init="argmax")
    with pytest.raises(ValueError, match="d must be >= 1"):
        SoftPermutation(0)
    with pytest.raises(ValueError, match="expected last dimension 4"):
        SoftPermutation(4)(torch.randn(2, 5))
    with pytest.raises(ValueError, match="square"):
        sinkhorn(torch.randn(3, 4))
    with pytest.raises(ValueError, match="non-finite"):
        harden(torch.full((3, 3), float("nan")))


@pytest.mark.parametrize("init", INITS)
def test_inits(init):
    sp = SoftPermutation(16, init=init, generator=torch.Generator().manual_seed(7))
    M = sp.matrix().detach()
    pen = sp.penalty("mean_row").item()
    if init == "identity":
        assert torch.equal(sp.harden(), torch.arange(16)) and pen < 0.2
    elif init in ("uniform", "gradient"):  # "gradient": uniform until its layer's warm-up assigns it
        assert abs(pen - expected_random_penalty(16)) < 1e-2
    else:
        assert 0.2 < pen < expected_random_penalty(16)
    assert (M.sum(0) - 1).abs().max() < 1e-5
