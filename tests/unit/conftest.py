"""Single-process megatron setup shared by the unit tests (gloo, TP=1, PP=1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_elastic.config import ParallelConfig, load_model_config
from megatron_elastic.parallel import init_process_groups

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="session")
def pgs():
    return init_process_groups(ParallelConfig(), seed=1234)


@pytest.fixture(scope="session")
def tiny_config():
    return load_model_config(ROOT / "examples" / "tiny" / "model.yaml")


@pytest.fixture(scope="session")
def small_config():
    return load_model_config(ROOT / "tests" / "fixtures" / "hybrid_small.yaml")


@pytest.fixture(scope="session")
def train_on_budget_loss():
    """Train a router on its budget loss alone (model frozen), every budget each step."""
    from megatron_elastic.router import fit_to_budgets

    return fit_to_budgets


@pytest.fixture(scope="session")
def tiny_elastic_checkpoint(tmp_path_factory, pgs):
    """An elastic checkpoint of the tiny recipe (random weights) whose router was trained on the
    budget loss until each budget has its own architecture: (path, model, router)."""
    import torch

    from megatron_elastic.checkpoint import save_checkpoint
    from megatron_elastic.elastic import build_elastic_model, load_elastic_recipe
    from megatron_elastic.router import ElasticRouter, RouterConfig, fit_to_budgets, router_state

    model_cfg, elastic = load_elastic_recipe(ROOT / "examples" / "tiny" / "elastic.yaml")
    router = ElasticRouter(model_cfg, elastic, RouterConfig(anneal_steps=150, lr=1e-3))
    fit_to_budgets(router, 150)
    torch.manual_seed(2)
    model = build_elastic_model(model_cfg, elastic, pgs)
    path = tmp_path_factory.mktemp("elastic_ckpt") / "elastic"
    save_checkpoint(path, model, model_cfg, kind="elastic", extra=router_state(router))
    return path, model, router


def _run_cli(workdir: Path, cases: list[tuple[str, list[str]]]) -> list[dict]:
    """Run CLI invocations ``(tool, argv)`` (``tools/x.py`` or a module with ``main``) one
    after the other in one fresh process (megatron-core imported once, not per invocation):
    per invocation ``{"rc", "stdout", "stderr", "traceback"}`` (``traceback``: what escaped
    ``main``, None if nothing did)."""
    import json
    import subprocess
    import sys

    spec, out = workdir / "cases.json", workdir / "results.json"
    spec.write_text(json.dumps([{"tool": t, "argv": a} for t, a in cases]))
    battery = ROOT / "tests" / "unit" / "cli_battery.py"
    done = subprocess.run(
        [sys.executable, str(battery), str(spec), str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="session")
def run_cli(tmp_path_factory):
    return lambda cases: _run_cli(tmp_path_factory.mktemp("cli"), cases)


def _check_exported_budgets(out_dir, budgets, model, router, pgs) -> dict:
    """Every budget exported by ``tools/export_budget.py --all --format megatron`` under
    ``out_dir/<budget>`` loads into a plain ``HybridModel`` with the manifest's parameter count
    and computes what the elastic ``model`` computes at the router's choice (<= 3e-6 logits:
    measured worst 6.6e-7 for these budgets and 1.07e-6 for test_export_heterogeneous.py's
    heterogeneous tiny budget, fp32 CPU, logit scale ~1.5; DESIGN allows 1e-4).
    Returns ``{budget: (model config, manifest)}`` for further checks."""
    import torch

    from megatron_elastic.checkpoint import load_checkpoint
    from megatron_elastic.config import load_model_config
    from megatron_elastic.model import build_hybrid_model
    from megatron_elastic.training.lm_step import position_ids_like

    tokens = torch.randint(0, model.model_config.vocab_size, (2, 40))
    positions = position_ids_like(tokens)
    found = {}
    for budget in budgets:
        target = Path(out_dir) / budget
        cfg = load_model_config(target / "model.yaml")
        plain = build_hybrid_model(cfg, pgs)
        manifest = load_checkpoint(target, plain, cfg, kinds=("exported",))
        assert sum(p.numel() for p in plain.parameters()) == manifest["metadata"]["params"]
        spec = router.decide(budget, 0, None, deterministic=True).spec
        with torch.no_grad():
            model.set_subnet(spec, mode="slice")
            ref = model(tokens, positions, None)
            model.set_subnet(None)
            out = plain(tokens, positions, None)
        assert (ref - out).abs().max().item() <= 3e-6, budget
        found[budget] = (cfg, manifest)
    return found


@pytest.fixture(scope="session")
def check_exported_budgets():
    return _check_exported_budgets


@pytest.fixture(scope="session")
def perturbed_tiny_model(pgs):
    """A tiny elastic model whose norms, D, dt_bias and conv biases are not their init values,
    so a mis-mapped tensor shows in an export's logits."""
    import torch

    from megatron_elastic.elastic import build_elastic_model, load_elastic_recipe

    model_cfg, elastic = load_elastic_recipe(ROOT / "examples" / "tiny" / "elastic.yaml")
    torch.manual_seed(5)
    model = build_elastic_model(model_cfg, elastic, pgs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", ".D")):
                p.uniform_(0.5, 1.5)
            elif name.endswith(("dt_bias", "conv1d_bias")):
                p.add_(torch.randn_like(p) * 0.5)
    return model


@pytest.fixture(scope="session")
def perturbed_checkpoint(tmp_path_factory, tiny_elastic_checkpoint, perturbed_tiny_model):
    """``tiny_elastic_checkpoint``'s trained router saved with ``perturbed_tiny_model``'s weights:
    (path, model, router). For the tests that compare an export or the serving path with the
    elastic model: at their init values (norms and D all 1.0) a norm or D that an exporter
    left out, rounded or put in another layer computes the same function, and such a test
    would pass by construction."""
    from megatron_elastic.checkpoint import save_checkpoint
    from megatron_elastic.router import router_state

    _, _, router = tiny_elastic_checkpoint
    model = perturbed_tiny_model
    path = tmp_path_factory.mktemp("perturbed_elastic_ckpt") / "elastic"
    save_checkpoint(path, model, model.model_config, kind="elastic", extra=router_state(router))
    return path, model, router


@pytest.fixture(scope="session")
def tiny_heterogeneous_spec():
    """A per-layer sub-network of the tiny recipe within its elastic choices (pattern
    ``M-M*-M-M*-``): every axis differs between layers of its kind, MLP layer 6 is skipped."""
    from megatron_elastic.elastic import SubnetSpec

    def build(cfg):
        return SubnetSpec.heterogeneous(
            cfg,
            hidden=224,
            attention_heads=[0, 0, 0, 6, 0, 0, 0, 0, 4, 0],
            mamba_heads=[8, 0, 4, 0, 0, 6, 0, 4, 0, 0],
            mamba_head_dim=[32, 0, 16, 0, 0, 24, 0, 32, 0, 0],
            ffn=[0, 768, 0, 0, 384, 0, 512, 0, 0, 640],
            active=[i != 6 for i in range(cfg.num_layers)],
        )

    return build
