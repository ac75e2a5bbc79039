"""The core package works without the recipe extras: ``import padst_ext`` and its layers, ``sparsify``, DST and export
import none of timm, transformers, tiktoken, tqdm, matplotlib or mwparserfromhell, nor the experiment harness."""

from __future__ import annotations

import subprocess
import sys
import textwrap

EXTRAS = ("timm", "transformers", "tiktoken", "tqdm", "matplotlib", "mwparserfromhell")

# Every import of an extra raises, as if it were not installed; then the core is used end to end.
SCRIPT = textwrap.dedent(f"""
    import importlib.abc, importlib.machinery, sys

    EXTRAS = {EXTRAS!r}

    class Block(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        # found (torch probes some of these with find_spec), but importing one raises
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in EXTRAS:
                return importlib.machinery.ModuleSpec(name, self)
            return None

        def create_module(self, spec):
            raise ImportError(f"{{spec.name}} is blocked (a recipe extra)")

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Block())
    import torch
    import padst_ext
    from torch import nn

    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    padst_ext.sparsify(model, "block", 0.75, block_size=8, seed=0)
    opt = torch.optim.AdamW(padst_ext.param_groups(model, lr=1e-2), lr=1e-2)
    dst = padst_ext.DST(model, opt, algorithm="rigl", update_interval=2, total_steps=8)
    for _ in range(8):
        opt.zero_grad()
        model(torch.randn(16, 32)).pow(2).mean().backward()
        opt.step()
    padst_ext.export(model)(torch.randn(2, 32))
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in EXTRAS or m.startswith("padst_ext.experiments"))
    print("LOADED", loaded)
    assert not loaded, loaded
    """)


def test_core_needs_no_recipe_extras():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "LOADED []" in r.stdout


def test_blocking_an_extra_is_seen():
    """Control: the blocker works, so the test above would fail if the core imported an extra."""
    script = SCRIPT.replace("import padst_ext\n", "import padst_ext\nimport tqdm\n", 1)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "tqdm is blocked" in r.stderr
