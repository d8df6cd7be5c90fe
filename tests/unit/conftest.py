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


def _train_on_budget_loss(router, steps: int) -> None:
    """Train ``router`` with its budget loss alone (model frozen), every budget each step."""
    from megatron_elastic.router import build_router_optimizer

    optimizer, scheduler = build_router_optimizer(router, router.config)
    for step in range(steps):
        loss = sum(
            router.budget_loss(router.decide(name, step, router.config.generator(step, i)))
            for i, name in enumerate(router.encoding.names)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


@pytest.fixture(scope="session")
def train_on_budget_loss():
    return _train_on_budget_loss


@pytest.fixture(scope="session")
def tiny_elastic_checkpoint(tmp_path_factory, pgs):
    """An elastic checkpoint of the tiny recipe (random weights) whose router was trained on the
    budget loss until each budget has its own architecture: (path, model, router)."""
    import torch

    from megatron_elastic.checkpoint import save_checkpoint
    from megatron_elastic.elastic import build_elastic_model, load_elastic_recipe
    from megatron_elastic.router import ElasticRouter, RouterConfig, router_state

    model_cfg, elastic = load_elastic_recipe(ROOT / "examples" / "tiny" / "elastic.yaml")
    router = ElasticRouter(model_cfg, elastic, RouterConfig(anneal_steps=150, lr=1e-3))
    _train_on_budget_loss(router, 150)
    torch.manual_seed(2)
    model = build_elastic_model(model_cfg, elastic, pgs)
    path = tmp_path_factory.mktemp("elastic_ckpt") / "elastic"
    save_checkpoint(path, model, model_cfg, kind="elastic", extra=router_state(router))
    return path, model, router
