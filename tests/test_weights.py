"""The sparse-weight objects (padst_ext.formats.SparseWeight): one interface for every structure, the DST update at
the structure's unit with no dense round trip, and checkpoints written before the objects existed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import padst_ext
from padst_ext import SparseLinear, reference
from padst_ext import formats as F
from padst_ext.structures import STRUCTURES, make_structure

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from dst_overhead import LiveBytes  # noqa: E402  what an update allocates, as the benchmark measures it
# every structure with a weight object, as (name, make_structure options)
KINDS = [("block", dict(block_size=8)), ("nm", dict(n=2, m=8)), ("diagonal", {}), ("unstructured", {}),
         ("2:4", {})]


def _weight(kind, kw, R=32, C=64, seed=0, dtype=torch.float64):
    st = make_structure(kind, R, C, 0.75, **kw)
    g = torch.Generator().manual_seed(seed)
    return st, st.pack(torch.randn(R, C, generator=g, dtype=dtype), st.random_mask(g))


def _perms(w, R, C, seed=1):
    g = torch.Generator().manual_seed(seed)
    ip = torch.randperm(C, generator=g)
    op = torch.randperm(R, generator=g) if w.supports_output_perm else None
    return ip, op


@pytest.mark.parametrize("kind,kw", KINDS, ids=[k for k, _ in KINDS])
@pytest.mark.parametrize("permuted", [False, True])
def test_products_match_the_reference(kind, kw, permuted):
    """mm, mm_t and sddmm of every object against plain PyTorch on its dense matrix and permutations."""
    R, C = 32, 64
    _, w = _weight(kind, kw, R, C)
    S = w.to_dense()  # logical S: the object's permutations are applied around it
    ip, op = _perms(w, R, C) if permuted else (None, None)
    pw = w.with_perm(ip, op)
    x, dy, b = torch.randn(5, C, dtype=torch.float64), torch.randn(5, R, dtype=torch.float64), torch.randn(R).double()
    torch.testing.assert_close(pw.mm(x, b), reference.linear(x, S, b, ip, op))
    torch.testing.assert_close(pw.mm_t(dy), reference.linear_t(dy, S, ip, op))
    G = reference.dense_grad(dy, x, ip, op)
    torch.testing.assert_close(w.to_dense(pw.sddmm(dy, x)), G * w.mask())
    # the op namespace is a parameter: the plain reference through the same object gives the same answers
    if pw.op_names:
        torch.testing.assert_close(pw.mm(x, b, impl=reference), pw.mm(x, b))
    # autograd through the object, values as a fresh leaf
    v = w.values.clone().requires_grad_()
    gv, = torch.autograd.grad(pw.mm(x, values=v), v, dy)
    torch.testing.assert_close(w.to_dense(gv), G * w.mask())


@pytest.mark.parametrize("kind,kw", KINDS, ids=[k for k, _ in KINDS])
def test_remap_moves_values_and_builds_a_valid_pattern(kind, kw):
    st, w = _weight(kind, kw)
    units = st.update(w, torch.rand(32, 64, generator=torch.Generator().manual_seed(3)), 0.5)
    new, slot = w.remap(units)
    new.validate()
    old_mask, new_mask = w.mask(), new.mask()
    assert int(new_mask.sum()) == int(old_mask.sum()) and (new_mask & ~old_mask).any()
    S_old, S_new = w.to_dense(), new.to_dense()
    assert torch.equal(S_new[old_mask & new_mask], S_old[old_mask & new_mask])  # kept units keep their values
    assert (S_new[new_mask & ~old_mask] == 0).all()  # grown units start at zero
    moment = torch.randn_like(w.values)
    moved = w.move(moment, slot)
    assert torch.equal(new.to_dense(moved)[old_mask & new_mask], w.to_dense(moment)[old_mask & new_mask])
    assert (new.to_dense(moved)[new_mask & ~old_mask] == 0).all()
    if isinstance(new, F.BlockSparse):  # the transpose metadata was built for the new pattern
        assert torch.equal(F.block_from_dense(S_new, new.units(), new.block_size).col_ptr, new.col_ptr)


# -- the unit-space DST rule equals the dense formulation it replaced ----------------------------------------------
def _dense_rule(st, mask, w_abs, g, frac):
    """The update as it was computed on dense [R, C] tensors (padst_ext 4c10f4d), the reference of Structure.update."""
    from padst_ext.structures import drop_grow, row_counts

    R, C = mask.shape
    if st.name == "block":
        unit = lambda t: t.reshape(st.nbr, st.br, st.nbc, st.bc).sum((1, 3))  # noqa: E731
        active = unit(mask.float()) > 0
        new = drop_grow(active, unit(w_abs.float()), unit(g.float()), row_counts(active.sum(1), frac))
        return F.block_mask_to_dense(new, (st.br, st.bc))
    if st.name == "diagonal":
        offs = torch.arange(max(R, C))
        rows, cols = F.diag_coords(offs, (R, C))
        active = mask[rows, cols].all(1)[None]
        new = drop_grow(active, w_abs[rows, cols].sum(1)[None], g[rows, cols].sum(1)[None],
                        row_counts(active.sum(1), frac))
        return F.diag_mask(offs[new[0]], (R, C))
    if st.name == "unstructured":
        active = mask.reshape(1, -1)
        return drop_grow(active, w_abs.reshape(1, -1), g.reshape(1, -1), row_counts(active.sum(1), frac)).reshape(R, C)
    G, m, big = C // st.m, st.m, torch.finfo(torch.float32).max
    k = row_counts(mask.sum(1), frac)
    wd = torch.where(mask, w_abs.float(), torch.full_like(w_abs, big))
    drop = mask & (torch.argsort(torch.argsort(wd, dim=1, stable=True), dim=1, stable=True) < k[:, None])
    kept = (mask & ~drop).reshape(R, G, m)
    lost = drop.reshape(R, G, m).sum(-1)
    score = torch.where(mask.reshape(R, G, m), torch.full((R, G, m), -big), g.float().reshape(R, G, m))
    score = torch.where(drop.reshape(R, G, m), torch.full((R, G, m), -big / 2), score)
    score = torch.where(kept, torch.full((R, G, m), float("-inf")), score)
    rank = torch.argsort(torch.argsort(-score, dim=-1, stable=True), dim=-1, stable=True)
    return (kept | ((rank < lost[..., None]) & ~kept)).reshape(R, C)


@pytest.mark.parametrize("kind,kw", KINDS + [("nm", dict(n=3, m=4))], ids=[k for k, _ in KINDS] + ["nm3:4"])
@pytest.mark.parametrize("shape", [(32, 64), (64, 32)])
def test_unit_update_equals_the_dense_rule(kind, kw, shape):
    """Same patterns as the dense formulation, ties included (integer-valued weights and scores)."""
    R, C = shape
    st = make_structure(kind, R, C, 0.75, **kw)
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        mask = st.random_mask(g)
        w_abs = torch.randint(0, 4, (R, C), generator=g).float() * mask
        score = torch.randint(0, 3, (R, C), generator=g).float()
        for frac in (0.1, 0.3, 0.5):
            assert torch.equal(st.update_mask(mask, w_abs, score, frac), _dense_rule(st, mask, w_abs, score, frac))


@pytest.mark.parametrize("kind,kw", [("block", dict(block_size=16)), ("nm", dict(n=1, m=8)), ("diagonal", {}),
                                     ("2:4", {})], ids=["block", "nm", "diagonal", "2:4"])
def test_update_never_forms_a_dense_matrix(kind, kw):
    """Pattern, values and two Adam moments moved at 90 % (N:M 1:8): the update allocates less than one dense R x C
    float32 in all (the grow score, made before, is the only dense matrix). At 2:4's 50 % the stored weight itself
    (values and int64 indices) is 1.5 dense matrices. For all, what it allocates scales with the stored weight (the
new values, one moved moment at a time, the new index and the work): at most 4 times its bytes."""
    R, C = 256, 512
    layer = SparseLinear(C, R, structure=kind, sparsity=0.9, permute=False, seed=0, **kw)
    opt = torch.optim.Adam(layer.parameters())
    layer(torch.randn(4, C)).sum().backward()
    opt.step()
    g = torch.rand(R, C)
    dst = padst_ext.DST(torch.nn.Sequential(layer), opt, algorithm="set", dense_first_last=False, update_interval=1,
                        total_steps=10)
    with LiveBytes() as lb:
        dst._update(0, [g])
    assert dst.history[-1]["layers"]["0"]["grown"] > 0
    stored = sum(t.numel() * t.element_size() for t in (layer.values, *layer.sparse.index().values()))
    print(f"{kind}: the update allocated at most {lb.peak / (4 * R * C):.2f} x one dense R x C float32, "
          f"{lb.peak / stored:.2f} x the stored weight")
    assert lb.peak <= 4 * stored, f"{lb.peak} bytes > 4 x the stored weight ({stored})"
    if layer.density <= 0.125:
        assert lb.peak < 4 * R * C, f"{lb.peak} bytes >= one dense {R}x{C} float32 ({4 * R * C})"
    control = LiveBytes()  # the measure sees a dense matrix when one is made
    with control:
        layer.sparse_weight()
    assert control.peak >= 4 * R * C


def test_structures_declare_their_weight_objects():
    """Every structure's policy packs into its weight object, and the layer holds it: adding a structure is one
    object and one policy."""
    for name, cls in STRUCTURES.items():
        assert issubclass(cls.weight_cls, F.SparseWeight) and cls.weight_cls is not F.SparseWeight, name
    layer = SparseLinear(64, 32, structure="2:4", seed=0)
    assert isinstance(layer.sparse, F.Semi24Sparse) and layer.sparse.n == 2 and layer.sparse.m == 4
    assert layer.perm_side == "input"


def test_semi24_layer_trains_with_dst_and_round_trips():
    """structure="2:4": cuSPARSELt where it serves, the N:M kernels here (CPU); DST keeps every group 2:4."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), SparseLinear(64, 64, structure="2:4", seed=1,
                                                                       perm_warmup=1), torch.nn.Linear(64, 4))
    opt = torch.optim.Adam(padst_ext.param_groups(model, lr=1e-2), lr=1e-2)
    dst = padst_ext.DST(model, opt, algorithm="rigl", update_interval=2, total_steps=12, harden_at=0.5)
    for _ in range(12):
        opt.zero_grad()
        model(torch.randn(8, 16)).pow(2).mean().backward()
        opt.step()
    layer = model[1]
    assert layer.phase == "hard" and len(dst.history) > 0
    F.check_nm_mask(layer.pattern_mask(), 2, 4)
    x = torch.randn(3, 64)
    want = x @ layer.dense_weight().T + layer.bias
    torch.testing.assert_close(layer(x), want)
    copy = SparseLinear(64, 64, structure="2:4", seed=5)
    copy.load_state_dict(layer.state_dict())
    torch.testing.assert_close(copy(x), want)


# -- checkpoints of the layers before the objects ----------------------------------------------------------------
def test_checkpoints_from_before_the_weight_objects_load():
    """tests/data/layers_4c10f4d.pt: layers of every structure in every permutation phase, saved by main at 4c10f4d
    with their outputs on a fixed input. They load and compute the same outputs."""
    saved = torch.load(DATA / "layers_4c10f4d.pt", weights_only=True)
    assert len(saved["layers"]) == 16
    for name, rec in saved["layers"].items():
        layer = SparseLinear(16, 32, **rec["ctor"])
        layer.load_state_dict(rec["state"])
        assert layer.phase == rec["phase"], name
        with torch.no_grad():
            torch.testing.assert_close(layer(saved["x"]), rec["y"], msg=name)
        assert set(layer.state_dict()) == set(rec["state"]), name  # and it saves the same keys


@pytest.mark.parametrize("kind,kw", [("block", dict(block_size=8)), ("nm", dict(n=2, m=8)), ("diagonal", {})],
                         ids=["block", "nm", "diagonal"])
def test_layer_compiles_without_graph_breaks(kind, kw):
    """The layer's route and its cached weight objects trace: torch.compile(fullgraph=True) in the hard phase."""
    torch._dynamo.reset()
    layer = SparseLinear(64, 32, structure=kind, sparsity=0.75, seed=0, **kw)
    layer.harden("manual")
    x = torch.randn(4, 64, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    torch.testing.assert_close(y, layer(x))
    gx, = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(gx, torch.autograd.grad(layer(x).sum(), x)[0])
