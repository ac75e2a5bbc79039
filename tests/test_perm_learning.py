"""How permutations are learned: the gradient start, the penalty ramp, the weight-keeping rounding, the hardening
rule, the optimizer groups, the record of each layer, and recovery of a planted permutation per structure."""

from __future__ import annotations

import copy
import io
import itertools
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from padst_ext import DST, SparseLinear, param_groups, permutation_parameters, permutation_report, sparsify
from padst_ext import permutation as P

ROOT = Path(__file__).resolve().parents[1]


def _perm_matrix(perm):
    d = perm.numel()
    return torch.zeros(d, d, dtype=torch.float64).scatter_(1, perm[:, None], 1.0)


@pytest.mark.parametrize("side", ["input", "output"])
def test_weight_preserving_rounding_keeps_the_most_of_w(side):
    """Brute force over every permutation of 6: the rounding keeps the most energy of W under the mask, and the
    re-fitted S is W's entries placed by that permutation, zero off the mask."""
    g = torch.Generator().manual_seed(0)
    d = 6
    W = torch.randn(d, d, generator=g, dtype=torch.float64)
    mask = torch.rand(d, d, generator=g) < 0.4
    perm, S = P.weight_preserving_rounding(W, mask, side)

    def kept(p):
        Wp = W[:, p] if side == "input" else W[torch.argsort(p)]
        return float((Wp * mask).square().sum())

    best = max(kept(torch.tensor(p)) for p in itertools.permutations(range(d)))
    assert kept(perm) == pytest.approx(best)
    assert (S[~mask] == 0).all()
    x = torch.randn(4, d, generator=g, dtype=torch.float64)
    if side == "input":  # the hard layer computes x[:, perm] @ S.T: W's kept entries, moved with their inputs
        torch.testing.assert_close(x[:, perm] @ S.T, x @ (W * mask.double()[:, torch.argsort(perm)]).T)
    else:
        torch.testing.assert_close((x @ S.T)[:, perm], x @ (W * mask.double()[perm]).T)


@pytest.mark.parametrize("structure,side", [("block", "input"), ("block", "output"), ("nm", "input"),
                                            ("diagonal", "output")])
def test_weights_rounding_of_a_converged_layer_keeps_its_function(structure, side):
    """When M is a permutation matrix, hardening with harden_mode="weights" changes nothing the layer computes."""
    layer = SparseLinear(32, 48, structure=structure, sparsity=0.75, block_size=8, perm_side=side, seed=3,
                         perm_init="uniform").double()
    perm = torch.randperm(layer.perm_dim, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        layer.soft.logits.copy_(60 * _perm_matrix(perm))  # M == P to double precision
    x = torch.randn(5, 32, dtype=torch.float64)
    with torch.no_grad():
        before = layer(x)
        layer.harden()
        torch.testing.assert_close(layer(x), before)
    assert layer.perm_log["reason"] == "manual"


def test_lambda_ramp():
    assert P.lambda_ramp(0.1, 0, 100) == pytest.approx(1e-4)
    assert P.lambda_ramp(0.1, 50, 100) == pytest.approx(0.1 * 10 ** -1.5)
    assert P.lambda_ramp(0.1, 100, 100) == P.lambda_ramp(0.1, 5000, 100) == 0.1
    assert P.lambda_ramp(0.1, 0, 0) == 0.1


def test_assignment_logits_follow_the_score_and_break_ties():
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(12, generator=g)
    score = 5 * _perm_matrix(perm) + torch.rand(12, 12, generator=g, dtype=torch.float64)
    logits = P.assignment_logits(score, 2.0, generator=g)
    assert torch.equal(P.harden(P.sinkhorn(logits)), perm)
    # two identical rows (the positions of one block column) end up on different columns
    tied = score.clone()
    tied[1] = tied[0]
    M = P.sinkhorn(P.assignment_logits(tied, 2.0, generator=g))
    assert not torch.equal(M[0], M[1])
    with pytest.raises(ValueError, match="scale must be positive"):
        P.assignment_logits(score, 0.0)


@pytest.mark.parametrize("side", ["input", "output"])
def test_gradient_start(side):
    """The default start: the layer runs unpermuted for perm_warmup training steps (counted by the clock,
    maybe_harden) while summing dz.T @ x, then the soft matrix starts from the assignment score of that sum."""
    torch.manual_seed(0)
    layer = SparseLinear(32, 64, structure="block", sparsity=0.75, block_size=8, perm_side=side, seed=5,
                         perm_warmup=3)
    assert layer.phase == "soft" and layer.in_warmup and not layer.soft_active
    assert "gradient warm-up, 0/3 steps" in repr(layer)
    G = torch.zeros(64, 32)
    for step in range(3):
        x = torch.randn(7, 32)
        y = layer(x)
        torch.testing.assert_close(y, x @ layer.sparse_weight().T + layer.bias)  # unpermuted
        torch.testing.assert_close(layer.dense_weight(), layer.sparse_weight())
        dy = torch.randn_like(y)
        y.backward(dy)
        G += dy.T @ x
        assert layer.soft.logits.grad is None  # not used yet: an optimizer leaves it alone
        assert layer.permutation_penalty().item() == 0
        with torch.no_grad():
            layer.eval()(torch.randn(2, 32))  # evaluation neither adds to the sum nor ends the warm-up
        layer.train()
        torch.testing.assert_close(layer.perm_grad, G)
        layer(torch.randn(2, 32))  # a forward alone does not end it either: the clock does
        assert layer.in_warmup
        assert not layer.maybe_harden(step)
        assert layer.in_warmup == (step < 2)
    assert layer.soft_active and layer.perm_grad is None
    score = P.assignment_scores(G, layer.pattern_mask(), side)
    assert score.shape == (layer.perm_dim, layer.perm_dim)
    expect = P.assignment_logits(score, 2.0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(layer.soft.logits.detach(), expect)


def test_warmup_counts_only_finite_gradients():
    layer = SparseLinear(16, 16, structure="diagonal", sparsity=0.5, seed=0, perm_warmup=2)
    y = layer(torch.randn(3, 16))
    y.backward(torch.full_like(y, float("inf")))  # a step GradScaler would skip
    layer.maybe_harden(0)
    assert layer._warmup_seen == 0 and layer.perm_grad.abs().sum() == 0
    layer.maybe_harden(1)  # a tick without any backward pass does not count either
    assert layer._warmup_seen == 0 and layer.in_warmup


def test_warmup_sums_every_backward_of_a_step():
    """Gradient accumulation (two micro-batches per step) and a layer used twice in one forward: one step each,
    and the sum is the step's whole gradient."""
    torch.manual_seed(0)
    layer = SparseLinear(16, 16, structure="diagonal", sparsity=0.5, seed=0, perm_warmup=2, bias=False)
    G = torch.zeros(16, 16)
    for _ in range(2):  # step 0: two micro-batches
        x, dy = torch.randn(4, 16), torch.randn(4, 16)
        layer(x).backward(dy)
        G += dy.T @ x
    assert layer.in_warmup
    layer.maybe_harden(0)
    assert layer.in_warmup and layer._warmup_seen == 1
    x = torch.randn(4, 16)
    h = layer(x)
    out = layer(h)  # step 1: the layer applied twice
    dout = torch.randn_like(out)
    out.backward(dout)
    dh = dout @ layer.sparse_weight()
    G += dout.T @ h.detach() + dh.T @ x
    torch.testing.assert_close(layer.perm_grad, G)
    layer.maybe_harden(1)
    assert layer.soft_active


def test_warmup_under_activation_checkpointing():
    """The recomputation of a checkpointed forward sees the same (unpermuted) layer as the forward did."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    layer = SparseLinear(16, 16, structure="nm", n=1, m=4, seed=0, perm_warmup=2)
    ref = copy.deepcopy(layer)
    for step in range(3):
        x = torch.randn(5, 16)
        checkpoint(layer, x, use_reentrant=False).sum().backward()
        ref(x).sum().backward()
        if layer.perm_grad is not None:
            torch.testing.assert_close(layer.perm_grad, ref.perm_grad)
        layer.maybe_harden(step)
        ref.maybe_harden(step)
    assert layer.soft_active
    torch.testing.assert_close(layer.soft.logits, ref.soft.logits)


def test_warmup_sum_is_not_a_buffer_and_a_missing_clock_warns():
    """The running sum stays out of the buffers (DistributedDataParallel broadcasts rank 0's buffers before every
    forward, which would overwrite each rank's sum); a warm-up whose clock is never called says so."""
    layer = SparseLinear(16, 16, structure="diagonal", sparsity=0.5, seed=0, perm_warmup=2)
    layer(torch.randn(3, 16)).sum().backward()
    assert layer.perm_grad is not None
    assert "perm_grad" not in dict(layer.named_buffers()) and not any("perm_grad" in k for k in layer.state_dict())
    layer.WARMUP_CLOCK_WARN = 3
    with pytest.warns(UserWarning, match="harden_all"):
        for _ in range(3):
            layer(torch.randn(3, 16)).sum().backward()
    assert layer.in_warmup


def test_warmup_checkpoint_round_trip_and_hardening_in_warmup():
    src = SparseLinear(32, 32, structure="nm", n=1, m=4, seed=1, perm_warmup=4)
    for step in range(2):
        src(torch.randn(5, 32)).sum().backward()
        src.maybe_harden(step)
    src(torch.randn(5, 32)).sum().backward()  # a third step's gradient, before its clock tick
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst = SparseLinear(32, 32, structure="nm", n=1, m=4, seed=9, perm_init="random")
    dst.load_state_dict(torch.load(buf, weights_only=True))  # plain types and tensors: weights_only loads it
    assert dst.in_warmup and dst._warmup_seen == 2 and torch.equal(dst.perm_grad, src.perm_grad)
    assert dst._grad_since_tick
    # a checkpoint of a warm-up without its sum is refused
    bad = src.state_dict()
    bad["_extra_state"] = copy.deepcopy(bad["_extra_state"])
    del bad["_extra_state"]["perm"]["perm_grad"]
    with pytest.raises(ValueError, match="perm_grad"):
        SparseLinear(32, 32, structure="nm", n=1, m=4, seed=9).load_state_dict(bad)
    # a layer still in its warm-up runs unpermuted, so it hardens to the identity
    x = torch.randn(3, 32)
    with torch.no_grad():
        before = dst(x)
    dst.harden("forced")
    assert torch.equal(dst.perm, torch.arange(32)) and dst.perm_log["reason"] == "forced"
    with torch.no_grad():
        torch.testing.assert_close(dst(x), before)


def test_param_groups_and_permutation_parameters():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 4))
    sparsify(model, "diagonal", 0.75, seed=0)
    logits = permutation_parameters(model)
    assert len(logits) == 2
    groups = param_groups(model, lr=1e-3, weight_decay=0.05, soft_steps=100)
    assert len(groups) == 2 and groups[1]["name"] == "permutations"
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in logits}
    assert groups[1]["weight_decay"] == 0 and groups[1]["lr"] == pytest.approx(0.08)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert param_groups(model, lr=1e-3)[1]["lr"] == 1e-2
    assert param_groups(model, lr=1e-3, soft_steps=1)[1]["lr"] == 0.5  # clamped
    # same-shape layers get their own seed: their gradient starts' tie-breaking differs
    a, b = (model[i].soft for i in (2, 4))
    g = torch.eye(32, dtype=torch.float64)
    a.assign(g, 2.0, torch.Generator().manual_seed(model[2]._seed))
    b.assign(g, 2.0, torch.Generator().manual_seed(model[4]._seed))
    assert model[2]._seed != model[4]._seed and not torch.equal(a.logits, b.logits)
    plain = nn.Sequential(nn.Linear(4, 4))
    assert len(param_groups(plain, lr=1e-3)) == 1


def test_dst_sets_the_schedule_and_the_report_records_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    sparsify(model, "block", 0.75, block_size=8, from_weights=False, seed=0, perm_warmup=2)
    layer = model[2]
    opt = torch.optim.Adam(param_groups(model, lr=1e-2, soft_steps=38), lr=1e-2)
    dst = DST(model, opt, algorithm="rigl", update_interval=10, total_steps=80)
    assert layer.perm_lambda_ramp == 20 and layer.harden_step == 40
    explicit = SparseLinear(64, 64, structure="block", block_size=8, perm_lambda_ramp=7, harden_step=9)
    DST(nn.Sequential(nn.Linear(4, 64), explicit, nn.Linear(64, 4)), torch.optim.SGD(explicit.parameters(), 0.1),
        total_steps=80).remove()
    assert explicit.perm_lambda_ramp == 7 and explicit.harden_step == 9  # set by the user: kept
    g = torch.Generator().manual_seed(1)
    for _ in range(80):
        x = torch.randn(32, 16, generator=g)
        loss = nn.functional.cross_entropy(model(x), torch.randint(0, 4, (32,), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    dst.remove()
    rep = permutation_report(model)
    s, rec = rep["summary"], rep["layers"]["2"]
    assert s["layers"] == s["hardened"] == 1 and s["converged"] + s["deadline"] == 1
    assert rec["reason"] in ("converged", "deadline") and 2 < rec["hardened_step"] <= 40
    assert rec["start_penalty"] > rec["penalty_at_harden"] and rec["trace"] and rec["trace"][0][0] > 2
    for key in ("moved_from_start", "moved_support_from_start", "moved_from_identity", "moved_support_from_identity"):
        assert 0 <= rec[key] <= 1
    assert rec["moved_support_from_start"] <= rec["moved_from_start"]  # moves inside a block column are free


@pytest.mark.parametrize("structure", ["block4", "block8", "nm", "diagonal"])
def test_planted_permutation_is_recovered(structure, monkeypatch):
    """The fast version of benchmarks/perm_planted.py: d = 32, 600 steps, the student holding the teacher's
    pattern. The default method finds the planted permutation (chance: 1/8 to 1/32) and, against an identity
    teacher, does as well as no permutation."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from perm_planted import planted_run

    r = planted_run(structure, 32, 0, "default", steps=600)
    assert r["match"] >= 0.9 and r["mse"] < 0.1 and r["reason"] == "converged", r
    ident = planted_run(structure, 32, 0, "default", identity=True, steps=600)
    none = planted_run(structure, 32, 0, "none", identity=True, steps=600)
    assert ident["mse"] <= none["mse"] + 0.02, (ident, none)


@pytest.mark.parametrize("kw,pattern", [
    (dict(perm_init="argmax"), "perm_init must be one of"),
    (dict(harden_mode="round"), "harden_mode must be one of"),
    (dict(perm_warmup=0), "perm_warmup must be an integer >= 1.*got 0"),
    (dict(perm_warmup=2.5), "perm_warmup must be an integer >= 1.*got 2.5"),
    (dict(perm_delta=-0.1), r"perm_delta must be in \[0, 1\].*got -0.1"),
    (dict(perm_delta=1.5), r"perm_delta must be in \[0, 1\].*got 1.5"),
    (dict(harden_step=-1), "harden_step must be None or an integer step >= 0, got -1"),
    (dict(perm_init_scale=-1.0), "perm_init_scale must be positive, got -1.0"),
    (dict(perm_lambda=-0.1), "perm_lambda must be >= 0, got -0.1"),
    (dict(perm_lambda_ramp=-5), "perm_lambda_ramp must be >= 0"),
])
def test_rejects_bad_permutation_settings(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        SparseLinear(16, 16, structure="diagonal", **kw)


def test_param_groups_rejects_a_bad_perm_lr():
    model = nn.Sequential(SparseLinear(16, 16, structure="diagonal", sparsity=0.5, seed=0))
    with pytest.raises(ValueError, match="perm_lr must be positive, got -1"):
        param_groups(model, lr=1e-3, perm_lr=-1)


def test_dst_rejects_bad_permutation_schedule():
    model = nn.Sequential(nn.Linear(4, 16), SparseLinear(16, 16, structure="diagonal"), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="perm_ramp must be a fraction of training in \\[0, 1\\], got 2"):
        DST(model, opt, total_steps=10, perm_ramp=2)
    with pytest.raises(ValueError, match="harden_at must be a fraction"):
        DST(model, opt, total_steps=10, harden_at=-0.5)
