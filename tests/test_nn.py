"""SparseLinear, sparsify, export and checkpoints."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import padst_ext
from padst_ext import SparseLinear, export, harden_all, permutation_penalty, sparsify
from padst_ext import reference as ref

from cases import DEVICES

LAYERS = [("block", "input"), ("block", "output"), ("nm", "input"), ("diagonal", "input"), ("diagonal", "output"),
          ("unstructured", "input")]


def _layer(structure, side, phase="soft", in_f=64, out_f=96, **kw):
    """A layer in ``phase``: "soft" acts with a random soft matrix from the start (perm_init="random"), "warmup" is
    the default gradient start still summing its gradient (unpermuted), "hard" is "soft" hardened."""
    kw.setdefault("block_size", 16)
    kw.setdefault("sparsity", 0.75)
    if phase != "warmup":
        kw.setdefault("perm_init", "random")
    layer = SparseLinear(in_f, out_f, structure=structure, perm_side=side, permute=phase != "none", seed=0, **kw)
    if phase == "hard":
        layer.harden()
    return layer


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("phase", ["none", "warmup", "soft", "hard"])
@pytest.mark.parametrize("structure,side", LAYERS)
def test_layer_matches_reference(structure, side, phase, device):
    layer = _layer(structure, side, phase).double().to(device)
    x = torch.randn(2, 7, 64, dtype=torch.float64).to(device)
    y = layer(x)
    assert y.shape == (2, 7, 96)
    S = layer.sparse_weight().detach()
    x2 = x.reshape(-1, 64)
    if phase in ("none", "warmup"):
        expect = ref.linear(x2, S, layer.bias)
    elif phase == "hard":
        in_perm = layer.perm if side == "input" else None
        out_perm = layer.perm if side == "output" else None
        expect = ref.linear(x2, S, layer.bias, in_perm, out_perm)
    else:
        M = layer.soft.matrix()
        expect = ((x2 @ M.T) @ S.T if side == "input" else (x2 @ S.T) @ M.T) + layer.bias
    torch.testing.assert_close(y.reshape(-1, 96), expect)
    torch.testing.assert_close(y, x @ layer.dense_weight().T + layer.bias)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("structure,side", LAYERS)
def test_layer_gradients_match_dense_reference(structure, side, device):
    layer = _layer(structure, side, "hard").double().to(device)
    x = torch.randn(9, 64, dtype=torch.float64).to(device).requires_grad_()
    y = layer(x)
    dy = torch.randn_like(y)
    gx, gv, gb = torch.autograd.grad(y, (x, layer.values, layer.bias), dy)
    # the same layer as a dense masked product, gradients by autograd through the reference
    v = layer.values.detach().clone().requires_grad_()
    S = layer.sparse.to_dense(v)
    x2 = x.detach().clone().requires_grad_()
    perms = (layer.perm, None) if side == "input" else (None, layer.perm)
    y2 = ref.linear(x2, S, layer.bias, *perms)
    rx, rv = torch.autograd.grad(y2, (x2, v), dy)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gv, rv)
    torch.testing.assert_close(gb, dy.sum(0))


@pytest.mark.parametrize("structure", ["block", "nm", "diagonal"])
def test_bfloat16_layer(structure):
    layer = SparseLinear(64, 96, structure=structure, sparsity=0.75, block_size=16, seed=0, dtype=torch.bfloat16,
                         perm_init="random")
    assert layer.values.dtype == torch.bfloat16 and layer.soft.logits.dtype == torch.float32
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref64 = x.double() @ layer.dense_weight().double().T + layer.bias.double()
    assert (y.double() - ref64).abs().max() < 0.1 * ref64.abs().max()
    y.float().sum().backward()
    assert layer.values.grad.dtype == torch.bfloat16 and layer.soft.logits.grad is not None
    layer.harden()
    torch.testing.assert_close(layer(x).double(), x.double() @ layer.dense_weight().double().T
                               + layer.bias.double(), atol=0.05, rtol=0.02)


def test_soft_phase_trains_the_permutation():
    layer = _layer("block", "input", "soft")
    x = torch.randn(5, 64)
    loss = layer(x).square().sum() + layer.permutation_penalty()
    loss.backward()
    assert layer.soft.logits.grad is not None and layer.soft.logits.grad.abs().sum() > 0


@pytest.mark.parametrize("structure", ["block", "nm", "diagonal", "unstructured"])
def test_realised_density_and_balance(structure):
    layer = SparseLinear(128, 256, structure=structure, sparsity=0.9, block_size=16, seed=1)
    mask = layer.sparse_weight() != 0
    if structure == "block":
        per_row = mask[::16].reshape(16, 8, 16).any(-1).sum(-1)  # blocks per block-row
        # 13 blocks over 16 block-rows: ragged by at most one, and every block is used once
        assert per_row.max() - per_row.min() <= 1 and int(per_row.sum()) == round(0.1 * 16 * 8)
        assert layer.values.shape[0] == round(0.1 * 16 * 8)
        wide = SparseLinear(512, 64, structure="block", sparsity=0.9, block_size=16, seed=1)
        per_row = (wide.sparse_weight() != 0)[::16].reshape(4, 32, 16).any(-1).sum(-1)
        assert sorted(per_row.tolist()) == [3, 3, 3, 4]
    elif structure == "nm":
        n, m = layer.structure.n, layer.structure.m
        assert (mask.reshape(256, 128 // m, m).sum(-1) == n).all()
        assert layer.density == n / m
    elif structure == "diagonal":
        assert layer.values.shape == (layer.structure.K, 128)
        assert layer.structure.K == 26  # ceil(0.1 * 256 * 128 / 128)
    else:
        assert int(layer.mask.sum()) == round(0.1 * 128 * 256)
    assert abs(layer.density - 0.1) < 0.03
    assert f"density={layer.density:.4f}" in repr(layer)


def test_nm_chosen_from_sparsity_and_rejections():
    assert (SparseLinear(80, 8, structure="nm", sparsity=0.9).structure.describe()) == "1:10"
    assert SparseLinear(64, 8, structure="nm", n=2, m=8).density == 0.25
    with pytest.raises(ValueError, match="perm_side='output' is not supported"):
        SparseLinear(64, 8, structure="nm", n=2, m=8, perm_side="output")
    with pytest.raises(ValueError, match="M=3 does not divide in_features 64"):
        SparseLinear(64, 8, structure="nm", n=1, m=3)
    with pytest.raises(ValueError, match=r"block size 32x32 must divide the weight shape 8x64"):
        SparseLinear(64, 8, structure="block")
    with pytest.raises(ValueError, match="structure must be one of"):
        SparseLinear(64, 8, structure="banded")
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        SparseLinear(64, 64, structure="diagonal", sparsity=1.0)
    with pytest.raises(ValueError, match="perm_side must be one of"):
        SparseLinear(64, 64, structure="diagonal", perm_side="left")
    with pytest.raises(ValueError, match="last dimension 64"):
        SparseLinear(64, 64, structure="diagonal")(torch.randn(3, 63))


@pytest.mark.parametrize("structure", ["block", "nm", "diagonal", "unstructured"])
def test_from_dense_keeps_largest_units(structure):
    g = torch.Generator().manual_seed(3)
    W = torch.randn(64, 128, generator=g)
    b = torch.randn(64, generator=g)
    layer = SparseLinear.from_dense(W, b, structure=structure, sparsity=0.75, block_size=16, permute=False)
    S = layer.sparse_weight().detach()
    mask = S != 0
    torch.testing.assert_close(S, W * mask)
    kept = W.abs()[mask].sum()
    # no random pattern of the same structure keeps more magnitude
    for seed in range(5):
        rnd = layer.structure.random_mask(torch.Generator().manual_seed(seed))
        assert W.abs()[rnd].sum() <= kept + 1e-4
    x = torch.randn(4, 128, generator=g)
    torch.testing.assert_close(layer(x), x @ (W * mask).T + b)


def test_maybe_harden_threshold_and_schedule():
    layer = _layer("diagonal", "input", perm_delta=0.0, harden_step=100)
    assert not layer.maybe_harden(step=10)  # penalty > 0 = delta, step before schedule
    assert layer.maybe_harden(step=100) and layer.phase == "hard"
    assert layer.perm_log["reason"] == "deadline" and layer.perm_log["hardened_step"] == 100
    assert "soft" not in dict(layer.named_children())
    assert torch.equal(layer.perm.sort().values, torch.arange(64))
    # any doubly stochastic matrix is under delta = 1, but an unmoved start does not harden: the penalty must
    # also have halved since the soft phase started
    layer2 = _layer("diagonal", "input", perm_delta=1.0)
    for step in range(3):
        assert not layer2.maybe_harden(step) and layer2.phase == "soft"
    start = layer2.perm_log["start_penalty"]
    assert 0.2 < start < 0.6  # the random start: near the paper's delta already
    with torch.no_grad():
        layer2.soft.logits.mul_(4)  # what training under the penalty does: a sharper matrix
    assert layer2.maybe_harden(3) and layer2.phase == "hard"
    log = layer2.perm_log
    assert log["reason"] == "converged" and log["penalty_at_harden"] <= 0.5 * start and log["soft_steps"] == 4
    assert 0 <= log["moved_from_start"] <= 1 and 0 <= log["moved_from_identity"] <= 1
    with pytest.raises(RuntimeError, match="needs the soft phase"):
        layer2.harden()


def _roundtrip(src: nn.Module, dst: nn.Module) -> None:
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst.load_state_dict(torch.load(buf, weights_only=False))


@pytest.mark.parametrize("phase", ["none", "soft", "hard"])
@pytest.mark.parametrize("structure,side", LAYERS)
def test_checkpoint_round_trip_bit_exact(structure, side, phase):
    src = _layer(structure, side, phase)
    with torch.no_grad():  # a trained-looking state: values and soft logits moved
        src.values.add_(0.01)
        if phase == "soft":
            src.soft.logits.mul_(3)
    # destination: different seed (other pattern / permutation) and the other phase where possible
    dst = SparseLinear(64, 96, structure=structure, perm_side=side, block_size=16, sparsity=0.75, seed=7,
                       permute=phase != "none")
    if phase == "soft":
        dst.harden()
        with pytest.warns(UserWarning, match="build the optimizer after loading"):
            _roundtrip(src, dst)
    else:
        _roundtrip(src, dst)
    assert dst.phase == src.phase
    sd_a, sd_b = src.state_dict(), dst.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        if k.endswith("_extra_state"):
            assert sd_a[k] == sd_b[k]
        else:
            assert torch.equal(sd_a[k], sd_b[k]), k
    x = torch.randn(5, 64)
    assert torch.equal(src(x), dst(x))


def test_checkpoint_mismatch_is_a_clear_error():
    src = SparseLinear(64, 96, structure="block", block_size=16, seed=0)
    for other, pattern in [(SparseLinear(64, 96, structure="diagonal", seed=0), "structure"),
                           (SparseLinear(64, 96, structure="block", block_size=32, seed=0), "block_size"),
                           (SparseLinear(64, 96, structure="block", block_size=16, bias=False, seed=0), "has_bias")]:
        with pytest.raises(ValueError, match=f"does not match this layer: .*{pattern}|{pattern}"):
            other.load_state_dict(src.state_dict())


def test_optimizer_keeps_tracking_values_after_load():
    layer = _layer("block", "input", "hard")
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    other = _layer("block", "input", "hard", seed=5) if False else SparseLinear(
        64, 96, structure="block", block_size=16, sparsity=0.75, perm_side="input", seed=5)
    other.harden()
    layer.load_state_dict(other.state_dict())
    before = layer.values.detach().clone()
    layer(torch.randn(3, 64)).sum().backward()
    opt.step()
    assert not torch.equal(before, layer.values.detach())


def _vit():
    timm = pytest.importorskip("timm")
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=10)


def _gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _replace_dense_weights(dense_model, sparse_model, names, conv1d=False):
    """Put each sparse layer's effective weight into the dense twin."""
    with torch.no_grad():
        for name in names:
            layer = sparse_model.get_submodule(name)
            twin = dense_model.get_submodule(name)
            W = layer.dense_weight()
            twin.weight.copy_(W.T if type(twin).__name__ == "Conv1D" else W)


@pytest.mark.parametrize("permute", [False, True])
def test_sparsify_timm_vit(permute):
    torch.manual_seed(0)
    model = _vit().eval()
    dense = copy.deepcopy(model)
    report = sparsify(model, structure="block", sparsity=0.9, block_size=32, permute=permute)
    names = [n for n, _ in report.replaced]
    assert len(names) == 4 * 12 - 1  # qkv, proj, fc1, fc2 per block; the first (qkv of block 0) stays dense
    assert ("head", "first/last layer kept dense") in report.skipped
    assert all(isinstance(model.get_submodule(n), SparseLinear) for n in names)
    _replace_dense_weights(dense, model, names)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x), rtol=1e-4, atol=1e-4)
    assert "replaced 47 layers" in str(report)


@pytest.mark.parametrize("structure", ["block", "nm", "diagonal"])
def test_sparsify_gpt2(structure):
    torch.manual_seed(0)
    model = _gpt2().eval()
    dense = copy.deepcopy(model)
    report = sparsify(model, structure=structure, sparsity=0.75, block_size=16, permute=structure != "block",
                      dense_first_last=False)
    names = [n for n, _ in report.replaced]
    assert len(names) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block (Conv1D, transposed weight)
    assert ("lm_head", "weight tied to another module") in report.skipped
    _replace_dense_weights(dense, model, names)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
    # training step works end to end with the permutation penalty
    model.train()
    out = model(ids, labels=ids)
    (out.loss + permutation_penalty(model)).backward()
    assert all(model.get_submodule(n).values.grad is not None for n in names)


def test_sparsify_include_exclude():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10))
    rep = sparsify(model, "diagonal", 0.5, exclude=["3"])
    assert [n for n, _ in rep.replaced] == ["2"]
    rep = sparsify(model, "diagonal", 0.5, include=["3", "0"], dense_first_last=False)
    assert [n for n, _ in rep.replaced] == ["0", "3"]


def test_diagonal_checkpoint_of_another_density():
    src = SparseLinear(64, 96, structure="diagonal", sparsity=0.95, seed=0)
    dst = SparseLinear(64, 96, structure="diagonal", sparsity=0.5, seed=1)
    dst.load_state_dict(src.state_dict())
    assert dst.structure.K == src.structure.K == src.values.shape[0]
    assert f"K={src.structure.K}" in repr(dst)
    x = torch.randn(3, 64)
    assert torch.equal(dst(x), src(x))


def test_export_matches_training_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64),
                          nn.ReLU(), nn.Linear(64, 10))
    sparsify(model, "block", 0.75, block_size=16, perm_side="input")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(8):  # 5 steps of gradient warm-up, then the soft matrices act
        x = torch.randn(16, 32)
        loss = model(x).square().mean() + permutation_penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        harden_all(model, step)  # the clock (DST calls it); no deadline set, and 3 soft steps do not converge
    assert all(m.soft_active for m in model.modules() if isinstance(m, SparseLinear))
    exported = export(model)
    layers = [m for m in exported.modules() if isinstance(m, SparseLinear)]
    assert layers and all(m.phase == "hard" for m in layers)
    assert not any(p.requires_grad for p in exported.parameters()) and not exported.training
    assert all(m.phase == "soft" for m in model.modules() if isinstance(m, SparseLinear))  # a copy
    harden_all(model, force=True)  # the training model with the same rounding
    x = torch.randn(8, 32)
    with torch.no_grad():
        assert torch.equal(exported(x), model.eval()(x))
    # the exported model round-trips through a checkpoint into a freshly built, still-soft model
    fresh = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64),
                          nn.ReLU(), nn.Linear(64, 10))
    sparsify(fresh, "block", 0.75, block_size=16, perm_side="input")
    _roundtrip(exported, fresh)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), exported(x))


def test_package_exports():
    assert padst_ext.SparseLinear is SparseLinear and padst_ext.nn.sparsify is sparsify
