"""DST: RigL / SET updates per structure, exact sparsity, optimizer-state handling, schedules, resume, ERK."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import padst_ext
from padst_ext import DST, SparseLinear, sparsify
from padst_ext import ops
from padst_ext.dst import erk_densities
from padst_ext.structures import make_structure

from cases import DEVICES

STRUCTS = [("block", dict(block_size=8)), ("nm", dict(n=2, m=8)), ("diagonal", {}), ("unstructured", {})]


def _model(structure, kw, permute=True, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32),
                          nn.ReLU(), nn.Linear(32, 4))
    sparsify(model, structure, sparsity=0.75, permute=permute, from_weights=False, **kw)
    return model


def _train(model, opt, steps, seed=1, start=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    for s in range(start + steps):
        x = torch.randn(32, 16, generator=g).to(device)
        y = torch.randint(0, 4, (32,), generator=g).to(device)
        if s < start:
            continue
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _layers(model):
    return [m for m in model.modules() if isinstance(m, SparseLinear)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("structure,kw", STRUCTS, ids=[s for s, _ in STRUCTS])
@pytest.mark.parametrize("algorithm", ["rigl", "set"])
def test_updates_keep_structure_and_exact_density(structure, kw, algorithm, device):
    model = _model(structure, kw).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    layers = _layers(model)
    before = [(m.pattern_mask().clone(), m.density) for m in layers]
    dst = DST(model, opt, algorithm=algorithm, update_interval=5, drop_fraction=0.3, total_steps=40)
    _train(model, opt, 20, device=device)
    assert len(dst.history) == 4
    moved = 0
    for m, (mask0, dens0) in zip(layers, before):
        mask = m.pattern_mask()
        assert m.density == dens0  # exact, after every update
        assert int(mask.sum()) == int(mask0.sum())
        moved += int((mask & ~mask0).sum())
        if structure == "nm":
            assert (mask.reshape(mask.shape[0], -1, 8).sum(-1) == 2).all()  # every group keeps exactly N
        if structure == "block":
            per_row = mask[::8].reshape(-1, mask.shape[1] // 8, 8).any(-1).sum(-1)
            assert per_row.max() - per_row.min() <= 1
        if structure == "diagonal":
            assert m.values.shape[0] == m.structure.K
    assert moved > 0, "no unit was ever regrown"


@pytest.mark.parametrize("structure,kw", STRUCTS, ids=[s for s, _ in STRUCTS])
def test_update_rule_drops_smallest_grows_largest(structure, kw):
    R, C = 32, 64
    st = make_structure(structure, R, C, 0.75, **kw) if structure != "nm" else make_structure("nm", R, C, None, **kw)
    g = torch.Generator().manual_seed(0)
    mask = st.random_mask(g)
    w = torch.rand(R, C, generator=g) * mask
    grad = torch.rand(R, C, generator=g)
    new = st.update_mask(mask, w, grad, 0.25)
    assert int(new.sum()) == int(mask.sum())
    dropped, grown = mask & ~new, new & ~mask
    assert dropped.any() and int(dropped.sum()) == int(grown.sum())
    # at the structure's unit: the smallest active units went, the best inactive ones came in
    if structure == "unstructured":
        assert w[dropped].max() <= w[mask & new].min()
        assert grad[grown].min() >= grad[~mask & ~new].max()
    elif structure == "block":
        unit = lambda t: t.reshape(4, 8, 8, 8).sum((1, 3))  # noqa: E731  [block-row, block-col]
        a0, a1 = unit(mask.float()) > 0, unit(new.float()) > 0
        wu, gu = unit(w), unit(grad)
        for i in range(4):
            d, k, gr, rest = a0[i] & ~a1[i], a0[i] & a1[i], a1[i] & ~a0[i], ~a0[i] & ~a1[i]
            assert int(d.sum()) == int(gr.sum())  # every block-row keeps its count
            if d.any():
                assert wu[i][d].max() <= wu[i][k].min() and gu[i][gr].min() >= gu[i][rest].max()
    elif structure == "diagonal":
        offs = torch.arange(64)
        rows, cols = padst_ext.formats.diag_coords(offs, (R, C))
        a0, a1 = mask[rows, cols].all(1), new[rows, cols].all(1)
        wu, gu = w[rows, cols].sum(1), grad[rows, cols].sum(1)
        assert wu[a0 & ~a1].max() <= wu[a0 & a1].min() and gu[a1 & ~a0].min() >= gu[~a0 & ~a1].max()
    else:
        assert (new.reshape(R, -1, 8).sum(-1) == 2).all()  # every group keeps exactly N
        for r in range(R):
            if dropped[r].any():
                assert w[r][dropped[r]].max() <= w[r][mask[r] & new[r]].min()
        grp = lambda t: t.reshape(R, -1, 8)  # noqa: E731
        g3, gr3, rest3 = grp(grad), grp(grown), grp(~mask & ~new)
        for r, q in torch.nonzero(gr3.any(-1)).tolist():
            if rest3[r, q].any():
                assert g3[r, q][gr3[r, q]].min() >= g3[r, q][rest3[r, q]].max()


@pytest.mark.parametrize("structure,kw", STRUCTS, ids=[s for s, _ in STRUCTS])
def test_transport_moves_state_with_units(structure, kw):
    """remap + move: a tensor laid out like the values (an optimizer moment) follows its units to the new pattern."""
    layer = SparseLinear(64, 32, structure=structure, sparsity=0.75, permute=False, seed=0, **kw)
    state = torch.randn_like(layer.values)
    w = layer.sparse
    dense_state = w.to_dense(state)
    old = layer.pattern_mask()
    new_w, slot = w.remap(layer.structure.update(w, torch.rand(32, 64), 0.5))
    moved = w.move(state, slot)
    layer.set_sparse(new_w)
    new = layer.pattern_mask()
    dense_moved = layer.sparse.to_dense(moved)
    assert torch.equal(dense_moved[old & new], dense_state[old & new])  # kept units carry their state
    assert (dense_moved[new & ~old] == 0).all() and (dense_moved[~new] == 0).all()
    assert (new & ~old).any()
    assert new_w.nnz - int((slot >= 0).sum()) * new_w.unit_numel == int((new & ~old).sum())


def test_grown_weights_zero_and_optimizer_state_moved():
    model = _model("block", dict(block_size=8), permute=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    dst = DST(model, opt, algorithm="rigl", update_interval=3, drop_fraction=0.5, total_steps=30)
    layer = _layers(model)[0]
    _train(model, opt, 2)
    mask0 = layer.pattern_mask()
    w_before = layer.sparse_weight().detach().clone()
    _train(model, opt, 1, start=2)  # step 3: Adam step, then the update
    mask1 = layer.pattern_mask()
    grown, kept = mask1 & ~mask0, mask1 & mask0
    assert grown.any()
    S = layer.sparse_weight().detach()
    assert (S[grown] == 0).all()  # grown weights start at zero
    avg = layer.sparse.to_dense(opt.state[layer.values]["exp_avg"])
    assert (avg[grown] == 0).all() and (avg[~mask1] == 0).all()
    assert (avg[kept] != 0).any()  # kept units keep their moments (moved with them: test_transport_...)
    assert len(dst.history) == 1
    assert (S[kept] != w_before[kept]).any()  # kept weights still trained by that step


def test_dense_gradient_only_on_update_steps(monkeypatch):
    model = _model("diagonal", {}, permute=False)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    calls = []
    real = ops.dense_grad
    monkeypatch.setattr(ops, "dense_grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    DST(model, opt, algorithm="rigl", update_interval=4, total_steps=100)
    _train(model, opt, 3)
    assert calls == [] and all(len(m._product_hooks) == 1 for m in _layers(model))  # armed for step 4
    _train(model, opt, 1, start=3)
    assert len(calls) == len(_layers(model))
    assert all(len(m._product_hooks) == 0 for m in _layers(model))


def test_skipped_step_with_inf_gradients_does_not_poison_rigl():
    """GradScaler skips optimizer.step on inf/NaN gradients, so DST's hooks do not run and that step's records
    stay; they must not reach the grow scores."""
    model = _model("block", dict(block_size=8), permute=False)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    dst = DST(model, opt, algorithm="rigl", update_interval=2, total_steps=20)
    _train(model, opt, 1)
    x = torch.randn(8, 16)
    (model(x).sum() * float("inf")).backward()  # a step GradScaler would skip: no optimizer.step()
    opt.zero_grad()
    _train(model, opt, 1, start=1)  # the update step
    assert len(dst.history) == 1
    for m in _layers(model):
        assert torch.isfinite(m.values).all()
        assert m.density == pytest.approx(0.25, abs=0.01)


def test_hooks_not_monkeypatching_step():
    model = _model("nm", dict(n=2, m=8))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    dst = DST(model, opt, total_steps=10)
    assert "step" not in vars(opt)  # optimizer.step is never reassigned on the instance
    assert len(opt._optimizer_step_pre_hooks) == 1 and len(opt._optimizer_step_post_hooks) == 1
    dst.remove()
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


@pytest.mark.parametrize("device", DEVICES)
def test_soft_permutations_get_penalty_and_harden_on_schedule(device):
    # a soft matrix acting from the first step (the default gradient start runs unpermuted for its warm-up)
    model = _model("block", dict(block_size=8, perm_init="random"), permute=True).to(device)
    for m in _layers(model):
        m.harden_step = 6
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    layer = _layers(model)[0]
    x = torch.randn(8, 16).to(device)
    model(x).sum().backward()
    g_loss = layer.soft.logits.grad.clone()
    (g_pen,) = torch.autograd.grad(layer.permutation_penalty(), layer.soft.logits)
    opt.zero_grad()
    dst = DST(model, opt, algorithm="set", update_interval=3, total_steps=12)
    assert dst.regularization().item() > 0
    # the penalty's gradient now comes with the layer's own backward: no change to the user's loss
    model(x).sum().backward()
    torch.testing.assert_close(layer.soft.logits.grad, g_loss + g_pen)
    opt.zero_grad()
    _train(model, opt, 6, device=device)
    assert all(m.phase == "hard" for m in _layers(model))
    assert all(m.perm.device.type == torch.device(device).type for m in _layers(model))  # hardened in place
    assert dst.regularization().item() == 0
    dst.remove()
    assert not any(m.penalty_in_backward for m in _layers(model))


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("k", [3, 6, 9], ids=["in_gradient_warmup", "before_harden", "after_harden"])
@pytest.mark.parametrize("structure,kw", STRUCTS[:3], ids=[s for s, _ in STRUCTS[:3]])
def test_resume_is_bit_exact(structure, kw, k):
    n = 14

    def fresh():
        model = _model(structure, kw, permute=True)
        for m in _layers(model):
            m.harden_step = 8
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        dst = DST(model, opt, algorithm="set" if structure == "diagonal" else "rigl", update_interval=3,
                  total_steps=n, seed=3)
        return model, opt, dst

    model, opt, dst = fresh()
    _train(model, opt, n)
    straight = _snapshot(model)

    model, opt, dst = fresh()
    _train(model, opt, k)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "dst": dst.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model, opt, dst = fresh()
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    dst.load_state_dict(ckpt["dst"])
    _train(model, opt, n - k, start=k)
    resumed = _snapshot(model)
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_erk_allocation_sums_to_global_density():
    shapes = [(64, 16), (64, 64), (256, 64), (32, 256)]
    d = erk_densities(shapes, 0.2)
    total = sum(o * i for o, i in shapes)
    assert abs(sum(di * o * i for di, (o, i) in zip(d, shapes)) - 0.2 * total) < 1e-6
    assert d[0] > d[2]  # small layers denser
    assert all(0 < x <= 1 for x in erk_densities([(4, 4), (1024, 1024)], 0.5))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 256), nn.Linear(256, 32),
                          nn.Linear(32, 4))
    sparsify(model, "unstructured", 0.8, permute=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sizes = {n: m.in_features * m.out_features for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    DST(model, opt, distribution="erk", total_steps=10, update_interval=2)
    dens = {n: m.density for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    realised = sum(dens[n] * sizes[n] for n in sizes) / sum(sizes.values())
    assert abs(realised - 0.2) < 1e-3 and len(set(round(v, 3) for v in dens.values())) > 1
    for _ in range(4):  # and it trains, with updates, at the new sizes
        loss = model(torch.randn(8, 16)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert {n: m.density for n, m in model.named_modules() if isinstance(m, SparseLinear)} == dens
    # a checkpoint of the ERK model loads into a uniformly built one: the counts follow the checkpoint
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 256), nn.Linear(256, 32),
                          nn.Linear(32, 4))
    sparsify(other, "unstructured", 0.8, permute=False)
    other.load_state_dict(model.state_dict())
    for (n, a), (_, b) in zip(model.named_modules(), other.named_modules()):
        if isinstance(a, SparseLinear):
            assert b.density == a.density and b.structure.nnz == a.structure.nnz
            assert int(b.structure.make_mask(torch.rand(b.out_features, b.in_features)).sum()) == b.structure.nnz


def test_bad_arguments():
    model = _model("block", dict(block_size=8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        DST(model, opt, algorithm="rig", total_steps=10)
    with pytest.raises(ValueError, match="pass total_steps"):
        DST(model, opt)
    with pytest.raises(ValueError, match="no SparseLinear layers"):
        DST(nn.Linear(3, 3), opt, total_steps=10)
    all_sparse = nn.Sequential(SparseLinear(16, 32, structure="diagonal"), SparseLinear(32, 8, structure="diagonal"))
    with pytest.raises(ValueError, match="first or last linear layer and is sparse"):
        DST(all_sparse, torch.optim.SGD(all_sparse.parameters(), lr=0.1), total_steps=10)
    DST(all_sparse, torch.optim.SGD(all_sparse.parameters(), lr=0.1), total_steps=10, dense_first_last=False)
    dst = DST(model, opt, total_steps=10)
    with pytest.raises(ValueError, match="DST state was saved with config"):
        DST(model, opt, total_steps=10, update_interval=7).load_state_dict(dst.state_dict())


def test_package_exports():
    assert padst_ext.DST is DST


def test_suspended_dst_does_not_count_optimizer_steps():
    """Steps taken inside ``dst.suspended()`` (DCP's state-dict helpers step a fresh optimizer once) neither update
    the pattern nor advance DST's step; afterwards DST counts again."""
    from torch import nn as tnn

    from padst_ext import DST, sparsify

    torch.manual_seed(0)
    model = tnn.Sequential(tnn.Linear(16, 32), tnn.ReLU(), tnn.Linear(32, 32), tnn.ReLU(), tnn.Linear(32, 8))
    sparsify(model, "block", 0.5, block_size=8, permute=False, from_weights=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = DST(model, opt, algorithm="set", update_interval=1, drop_fraction=0.5, total_steps=10, seed=0)
    with dst.suspended():
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    assert dst.step == 0 and dst.history == []
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    assert dst.step == 1 and len(dst.history) == 1
