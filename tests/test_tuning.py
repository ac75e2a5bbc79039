"""Per-machine tuning of the CPU kernels (csrc/cpu/tune.h, padst_ext.tuning).

Every variant the tuner can choose is run by force and compared with the plain reference and, element for element
(torch.equal), with the default variant (all variants sum in the same order); tuning itself is checked for what it
records, for never changing a result, its switches and its disk cache, and on a synthetic family with a planted
answer and a control (its cost is a benchmark figure).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from cases import assert_close_to_reference, make_case
from padst_ext import ops, reference as ref, tuning

T = torch.ops.padst._cpu_tune
FAMILIES = ("block_mm", "block_mm_t", "nm_mm", "nm_mm_t", "diag_mm")


@pytest.fixture(autouse=True)
def _clean_tuner():
    """Each test starts with no choices, tuning as the environment says and nothing forced; and leaves it so."""
    tuning.clear()
    tuning.set_enabled(None)
    for fam in FAMILIES:
        T("force", f"{fam}=")
    yield
    for fam in FAMILIES:
        T("force", f"{fam}=")
    tuning.set_enabled(None)
    tuning.clear()


def _fwd(case, x, v, b, impl):
    w = case.weight
    return impl.block_mm(x, v, *w.meta(), b, case.in_perm, case.out_perm)


def _dx(case, dy, v, impl):
    w = case.weight
    return impl.block_mm_t(dy, v, *w.meta(), case.in_perm, case.out_perm)


def _f64(t):
    return None if t is None else t.double()


def _space(family, call):
    """A family's variants as the kernel describes them (recorded when a call measures)."""
    tuning.clear()
    call()
    desc = T("space", family)
    assert desc, "a measured call records its family's space"
    dims, default = desc.split(" ")
    names, values = [], []
    for item in dims.split(";"):
        name, vals = item.split("=")
        names.append(name)
        values.append([int(v) for v in vals.split("|")])
    return names, values, default


def _variants(names, values):
    for combo in itertools.product(*values):
        yield ",".join(f"{n}={v}" for n, v in zip(names, combo))


def _check_every_variant(family, call, check_default) -> list:
    """Runs `call` under every variant of `family`: each result equal, element for element, to the default's, which
    is checked against the reference. Returns the variants that ran."""
    names, values, default = _space(family, call)
    ran = []
    try:
        T("force", f"{family}={default}")
        y0 = call()
        check_default(y0)
        for variant in _variants(names, values):
            T("force", f"{family}={variant}")
            try:
                y = call()
            except ValueError as e:  # not a variant of this shape (register budget, vector split, buffer size)
                assert "is not a variant of this call" in str(e)
                continue
            assert torch.equal(y, y0), f"{family}: variant {variant} differs from the default {default}"
            ran.append(variant)
    finally:
        T("force", f"{family}=")
    return ran


# (B, C, R, block, sparsity): whole-vector block outputs (32, 16 wide), batches that are not a multiple of any
# register tile, rows a multiple of 4 KB (packed even when permuted), and a wide input that runs several line chunks.
SHAPES = [
    (70, 128, 96, (32, 32), 0.5),
    (13, 2048, 32, (32, 16), 0.9),
    (37, 64, 256, (16, 16), 0.5),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}->{s[2]}_b{s[3][0]}x{s[3][1]}")
def test_every_block_variant_matches_reference_and_default(shape, dtype):
    B, C, R, block, sparsity = shape
    for perm in ("none", "both"):
        case = make_case("block", B, C, R, sparsity=sparsity, block=block, perm=perm, dtype=dtype, bias=True)
        v, x, b = case.weight.values, case.x, case.bias
        dy = torch.randn(B, R, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
        ran = _check_every_variant(
            "block_mm", lambda: _fwd(case, x, v, b, ops),
            lambda y: assert_close_to_reference(y, _fwd(case, _f64(x), _f64(v), _f64(b), ref),
                                                _fwd(case, x, v, b, ref), f"{perm} forward"))
        ran_t = _check_every_variant(
            "block_mm_t", lambda: _dx(case, dy, v, ops),
            lambda d: assert_close_to_reference(d, _dx(case, _f64(dy), _f64(v), ref), _dx(case, dy, v, ref),
                                                f"{perm} dx"))
        # every parameter's values are exercised: far more than the handful a broken enumeration would run
        assert len(ran) >= 40 and len(ran_t) >= 40, f"{perm}: only {len(ran)} forward / {len(ran_t)} dx variants ran"
        # each kernel ran: line by line (kern=0), input block by input block (kern=2), the packed one (kern=1)
        for kern in (0, 1, 2):
            assert any(f"kern={kern}" in v for v in ran) and any(f"kern={kern}" in v for v in ran_t), kern


def test_tuning_records_a_choice_and_never_changes_the_result():
    case = make_case("block", 600, 512, 768, sparsity=0.9, block=(32, 32), perm="both", bias=True)
    v, x, b = case.weight.values, case.x, case.bias
    with tuning.disabled():
        y_off = _fwd(case, x, v, b, ops)
    assert tuning.choices() == [], "tuning off measures nothing"
    y_on = _fwd(case, x, v, b, ops)
    (c,) = tuning.choices()
    assert c["key"].startswith("block_mm ") and " gin" in c["key"] and " gout" in c["key"]
    assert c["tried"] >= 1 and c["best_ms"] <= c["default_ms"]
    assert c["tune_ms"] is not None  # its cost is a benchmark figure (cpu_ops.py prints it), never asserted here
    assert torch.equal(y_on, y_off)
    # the next call of the class looks the choice up (no new entry, the same result)
    assert torch.equal(_fwd(case, x, v, b, ops), y_off)
    assert len(tuning.choices()) == 1
    # a batch of another size class is another shape class
    _fwd(case, x[:100], v, b, ops)
    assert len(tuning.choices()) == 2


def test_small_calls_keep_the_default_unmeasured():
    """A shape class whose default runs faster than the threshold (20 us, tune.cpp kMinMs) is not searched: call
    overhead dominates it. Checked without timing anything: the threshold is moved above and below any call."""
    case = make_case("block", 8, 64, 64, sparsity=0.5, block=(32, 32))
    before = T("min_ms")
    try:
        T("min_ms", "1e9")
        _fwd(case, case.x, case.weight.values, None, ops)
        (c,) = tuning.choices()
        assert c["tried"] == 1 and c["variant"] == T("space", "block_mm").split(" ")[1]
        tuning.clear()
        T("min_ms", "0")
        _fwd(case, case.x, case.weight.values, None, ops)
        (c,) = tuning.choices()
        assert c["tried"] > 1
    finally:
        T("min_ms", before)
    with pytest.raises(ValueError, match="a number >= 0"):
        T("min_ms", "-1")


@pytest.mark.parametrize("times,expected", [
    # (a, b) waits times[a][b] us; the default is (0, 0)
    ("6000;6000;2000;6000", "a=2,b=0"),  # one variant three times as fast
    ("9000,5000;5000,1000", "a=1,b=1"),  # reached in two steps, one parameter at a time
    ("3000;3000;3000", "a=0,b=0"),  # control: nothing faster, the default stays
    ("3000;2940", "a=0,b=0"),  # 2% faster: under the runoff's 3% margin, the default stays
], ids=["3x", "two-steps", "control", "2pct"])
def test_tuner_finds_a_planted_answer(times, expected):
    """The search and the runoff on a synthetic family whose variants only wait (tune.cpp, action "planted"): it
    finds a faster variant that exists, and keeps the default when none is faster by the runoff's margin. The waits
    end at a wall-clock deadline, so a run is slower only when the thread is off the CPU at its end: the gains are
    milliseconds, more than a scheduler's time slice (with a compiler or a second test suite on the same 2 cores, 1.5 ms
    against 3 ms lost the runoff in 8 of 20 tunings and 4.8 ms against 6 ms in 2 of 10; nothing else running,
    never)."""
    tuning.set_enabled(True)
    assert T("planted", times) == expected
    (c,) = tuning.choices()
    assert c["key"] == f"planted {times}" and c["variant"] == expected
    assert T("planted", times) == expected, "the next call looks the choice up"
    assert c["tried"] >= 2


def test_planted_rejects_bad_times():
    with pytest.raises(ValueError, match="microseconds"):
        T("planted", "3000;-1")
    with pytest.raises(ValueError, match="rows of equal"):
        T("planted", "3000,1;3000")


def test_forced_variant_that_does_not_fit_is_a_clear_error():
    case = make_case("block", 64, 64, 64, sparsity=0.5, block=(16, 16))
    T("force", "block_mm=mr=14,nrv=4,pack=0,pf=0,panel=1,lt=0,kern=0")
    with pytest.raises(ValueError, match=r"forced variant 'mr=14,nrv=4.*' is not a variant of this call"):
        _fwd(case, case.x, case.weight.values, None, ops)
    T("force", "block_mm=mr=6,nrv=2,bogus=1")
    with pytest.raises(ValueError, match="is not a variant"):
        _fwd(case, case.x, case.weight.values, None, ops)


def test_tune_op_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown action 'bogus'"):
        T("bogus")
    with pytest.raises(ValueError, match="key<TAB>point"):
        T("set", "no tab here")
    with pytest.raises(ValueError, match="family=point"):
        T("force", "no equals sign")


def _run(code: str, env: dict) -> str:
    full = {**os.environ, **env}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


_CALL = """
    import sys, torch, padst_ext
    sys.path.insert(0, {tests!r})
    from cases import make_case
    from padst_ext import ops, tuning
    case = make_case("block", 600, 512, 768, sparsity=0.9, block=(32, 32), perm="in")
    w = case.weight
    ops.block_mm(case.x, w.values, *w.meta(), None, case.in_perm, None)
"""


def test_environment_switch_turns_tuning_off():
    tests = os.path.dirname(__file__)
    out = _run(_CALL.format(tests=tests) + "\n    print(tuning.enabled(), len(tuning.choices()))",
               {"PADST_CPU_TUNE": "0"})
    assert out.split() == ["False", "0"]


def test_disk_cache_round_trip(tmp_path):
    tests = os.path.dirname(__file__)
    cache = tmp_path / "tune.json"
    env = {"PADST_CPU_TUNE_CACHE": str(cache)}
    _run(_CALL.format(tests=tests), env)
    data = json.loads(cache.read_text())
    (machine, entries), = data["machines"].items()
    assert machine == tuning.machine_id() and data["format"] == 1
    (key, variant), = entries.items()
    assert key.startswith("block_mm ")
    # a second process takes the choice from the file and measures nothing
    out = _run(_CALL.format(tests=tests) + "\n    import json; print(json.dumps(tuning.choices()))", env)
    (c,) = json.loads(out.strip().splitlines()[-1])
    assert c["key"] == key and c["variant"] == variant and c["tune_ms"] is None


def test_disk_cache_that_is_not_one_is_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"something": "else"}))
    with pytest.raises(ValueError, match="is not a padst_ext tuning cache"):
        tuning.load(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read the tuning cache"):
        tuning.load(bad)


def test_unreadable_cache_file_warns_at_import_and_is_left_alone(tmp_path):
    bad = tmp_path / "notes.json"
    bad.write_text("{not json")
    code = "import warnings; warnings.simplefilter('always'); import padst_ext; print('imported')"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PADST_CPU_TUNE_CACHE": str(bad)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "imported" in out.stdout, out.stderr
    assert "PADST_CPU_TUNE_CACHE" in out.stderr and "cannot read the tuning cache" in out.stderr
    assert bad.read_text() == "{not json"


def test_stale_cached_choice_is_measured_again():
    """A cache written by another build may name a variant this build does not have: the call measures anew."""
    case = make_case("block", 600, 512, 768, sparsity=0.9, block=(32, 32), perm="none")
    _fwd(case, case.x, case.weight.values, None, ops)
    (c,) = tuning.choices()
    tuning.clear()
    T("set", c["key"] + "\tmr=99,gone=1")
    y = _fwd(case, case.x, case.weight.values, None, ops)
    (c2,) = tuning.choices()
    assert c2["tune_ms"] is not None and c2["variant"] != "mr=99,gone=1"
    with tuning.disabled():
        assert torch.equal(y, _fwd(case, case.x, case.weight.values, None, ops))


# (structure, family of the forward, family of dx, B, C, R, make_case options): the N:M row kernel (batch tile, prefetch
# distance) and the diagonal kernel (rows per step, output tile, rows packed at once), both forms of the diagonal
# (tall and wide), permuted outputs, batches that are not a multiple of any tile.
OTHER = [
    ("nm", "nm_mm", "nm_mm_t", 70, 96, 80, dict(nm=(2, 8))),
    ("nm", "nm_mm", "nm_mm_t", 600, 256, 512, dict(nm=(3, 32))),
    ("diag", "diag_mm", "diag_mm", 70, 40, 96, dict(sparsity=0.75)),
    ("diag", "diag_mm", "diag_mm", 131, 130, 50, dict(sparsity=0.5)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spec", OTHER, ids=lambda s: f"{s[0]}_{s[3]}x{s[4]}->{s[5]}")
def test_every_nm_and_diagonal_variant_matches_reference_and_default(spec, dtype):
    structure, fam, fam_t, B, C, R, opts = spec
    for perm in ("none", "in") if structure == "nm" else ("none", "both"):
        case = make_case(structure, B, C, R, perm=perm, dtype=dtype, bias=True, **opts)
        w, x, b = case.weight, case.x, case.bias
        dy = torch.randn(B, R, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
        w64 = w.to(dtype=torch.float64)
        ran = _check_every_variant(
            fam, lambda: w.mm(x, b),
            lambda y: assert_close_to_reference(y, w64.mm(x.double(), _f64(b), impl=ref), w.mm(x, b, impl=ref),
                                                f"{perm} forward"))
        ran_t = _check_every_variant(
            fam_t, lambda: w.mm_t(dy),
            lambda d: assert_close_to_reference(d, w64.mm_t(dy.double(), impl=ref), w.mm_t(dy, impl=ref),
                                                f"{perm} dx"))
        assert len(ran) >= 6 and len(ran_t) >= 6, f"{perm}: only {len(ran)} forward / {len(ran_t)} dx variants ran"


@pytest.mark.parametrize("isa", ["avx2", "base"])
def test_variants_on_narrower_isas(isa):
    """The register budget differs per ISA (16 vector registers below AVX-512): every variant that fits there runs
    and matches, in each tuned family."""
    order = ["base", "avx2", "avx512"]
    before = torch.ops.padst._cpu_isa()
    if order.index(isa) > order.index(before):
        pytest.skip(f"CPU lacks {isa}")
    torch.ops.padst._cpu_isa(isa)
    try:
        B, C, R, block, sparsity = SHAPES[0]
        specs = [("block", "block_mm", B, C, R, dict(block=block, sparsity=sparsity)),
                 ("nm", "nm_mm", *OTHER[1][3:]), ("diag", "diag_mm", *OTHER[2][3:])]
        for structure, fam, B, C, R, opts in specs:
            case = make_case(structure, B, C, R, perm="in" if structure == "nm" else "both", bias=True, **opts)
            w, x, b = case.weight, case.x, case.bias
            w64 = w.to(dtype=torch.float64)
            ran = _check_every_variant(
                fam, lambda: w.mm(x, b),
                lambda y: assert_close_to_reference(y, w64.mm(x.double(), _f64(b), impl=ref), w.mm(x, b, impl=ref),
                                                    f"{isa} {structure} forward"))
            assert len(ran) >= 4, f"{structure}: only {len(ran)} variants ran"
    finally:
        torch.ops.padst._cpu_isa(before)
