"""Architecture routers (Nemotron Elastic): from a budget to the nested sub-network to train,
with a differentiable budget loss and straight-through (hard) or mixed (soft) weights."""

from megatron_elastic.router.config import RouterConfig
from megatron_elastic.router.decision import RouterDecision
from megatron_elastic.router.optim import (
    build_router_optimizer,
    finalize_router_grads,
    fit_to_budgets,
    reduce_router_grads,
)
from megatron_elastic.router.persist import router_from_state, router_state
from megatron_elastic.router.router import ElasticRouter
from megatron_elastic.router.sampling import (
    BudgetEncoding,
    gumbel_softmax,
    logit_scale,
    prefix_weights,
    temperature,
)

__all__ = [
    "BudgetEncoding",
    "ElasticRouter",
    "RouterConfig",
    "RouterDecision",
    "build_router_optimizer",
    "finalize_router_grads",
    "fit_to_budgets",
    "gumbel_softmax",
    "logit_scale",
    "prefix_weights",
    "reduce_router_grads",
    "router_from_state",
    "router_state",
    "temperature",
]
