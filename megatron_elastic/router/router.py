"""The architecture router: one small MLP per elastic axis, from a budget to a sub-network.

:meth:`ElasticRouter.decide` turns a budget into the :class:`SubnetSpec` to run, the router
weights (:class:`SubnetWeights`) that carry gradients from the task loss back to the router, and
the expected sizes the budget loss is computed from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from megatron_elastic.config import ModelConfig
from megatron_elastic.elastic import axes as registry
from megatron_elastic.elastic.architectures import budget_specs, closest_homogeneous_spec
from megatron_elastic.elastic.budget import (
    expected_active_param_count,
    expected_memory_bytes,
    expected_param_count,
    spec_keep,
    spec_sizes,
)
from megatron_elastic.elastic.config import ElasticConfig
from megatron_elastic.elastic.latency import LatencyTable, expected_latency, load_latency_table
from megatron_elastic.elastic.model import SubnetWeights
from megatron_elastic.elastic.subnet import SubnetSpec
from megatron_elastic.router.calibrate import Indices, meet_target
from megatron_elastic.router.config import RouterConfig
from megatron_elastic.router.decision import RouterDecision, weights_to
from megatron_elastic.router.sampling import (
    BudgetEncoding,
    gumbel_softmax,
    logit_scale,
    prefix_weights,
    straight_through,
    temperature,
)

__all__ = ["ElasticRouter"]

Size = torch.Tensor | int


def _mlp(num_inputs: int, hidden: int, num_outputs: int) -> nn.Sequential:
    # skip_init: no draw from the global RNG (parameters are set from the router's own seed).
    return nn.Sequential(
        skip_init(nn.Linear, num_inputs, hidden),
        nn.LeakyReLU(),
        skip_init(nn.Linear, hidden, num_outputs),
    )


class ElasticRouter(nn.Module):
    """Routers for every elastic axis of ``model`` under ``elastic``'s candidates and budgets.

    Parameters are initialised from ``config.seed`` alone (identical on every rank). The output
    layers start at zero, so every budget starts from uniform choices. With ``config.fixed`` the
    parameters are frozen and every decision is the budget's fixed architecture.
    """

    def __init__(
        self,
        model: ModelConfig,
        elastic: ElasticConfig,
        config: RouterConfig,
        *,
        latency_table: LatencyTable | None = None,
    ) -> None:
        super().__init__()
        elastic.validate_for(model)
        self.model_config, self.elastic_config, self.config = model, elastic, config
        self.encoding = BudgetEncoding.from_budgets(elastic.budgets)
        self.choices = elastic.axis_choices(model)
        kinds = model.layer_kinds()
        self._layers_of = {
            k.name: [j for j, kj in enumerate(kinds) if kj == k.name]
            for k in registry.layer_kinds()
        }
        self._ordinal = [self._layers_of[k].index(j) for j, k in enumerate(kinds)]
        self._kind_of = {a.name: a.kind for a in registry.axes()}
        self.axes = tuple(a.name for a in registry.axes() if self.num_decisions(a.name) > 0)
        self.routers = nn.ModuleDict(
            {
                a: _mlp(len(self.encoding), config.hidden_size, self.num_decisions(a) * len(c))
                for a, c in self.choices.items()
                if a in self.axes
            }
        )
        for axis in self.axes:
            sizes = torch.tensor(self.choices[axis], dtype=torch.float32)
            self.register_buffer(f"sizes_{axis}", sizes, persistent=False)
        ranking = elastic.layer_ranking or tuple(range(model.num_layers))
        self._position = [ranking.index(j) for j in range(model.num_layers)]
        keeps = [[float(d > p) for d in self.choices["depth"]] for p in self._position]
        self.register_buffer("depth_keeps", torch.tensor(keeps), persistent=False)  # (L, K)
        self._init_parameters(config.seed)
        self.latency_table = None
        if config.budget_target == "latency":  # a saved router carries its own copy
            self.latency_table = latency_table or load_latency_table(config.latency_table)
        # C(parent): the parameters or memory bytes every budget fraction is a fraction of.
        self.parent_cost = float(self.spec_cost(SubnetSpec.full(model)))
        self._fixed: dict[str | float, Indices] = {}
        self._parent_indices: Indices | None = None
        if config.full_budget == "parent" and not config.fixed:
            self._parent_indices = self._indices_of(SubnetSpec.full(model))
        if config.fixed:
            self.requires_grad_(False)
            for name, (spec, _) in budget_specs(model, elastic, cost=self.spec_cost).items():
                self._fixed[name] = self._indices_of(spec)

    @property
    def trainable(self) -> bool:
        """Whether the router learns (False for fixed architectures: no optimizer needed)."""
        return not self.config.fixed

    def check_reachable(self) -> None:
        """``ValueError`` unless every trained budget is reachable: at least the cost of the
        smallest sub-network the choices allow (smallest size on every axis, the shallowest
        depth); below it the router can only miss its target. Checked before training (a saved
        router loads whatever it was trained for)."""
        kinds = self.model_config.layer_kinds()
        smallest = float(
            self._cost(
                self.choices["hidden"][0],
                [{a: self.choices[a][0] for a in registry.layer_kind(k).axes} for k in kinds],
                self.depth_keeps[:, 0].tolist(),
            )
        )
        floor = smallest / self.parent_cost
        for name, fraction in self.elastic_config.budgets.items():
            if fraction < floor * (1 - 1e-6):
                raise ValueError(
                    f"budget {name!r} asks for {fraction:g} of the parent's "
                    f"{self.config.budget_target}, but the smallest sub-network the elastic "
                    f"choices allow costs {floor:.3f} of it: raise the budget to >= {floor:.3f} "
                    "or add smaller choices"
                )

    def num_decisions(self, axis: str) -> int:
        """Independent choices of ``axis``: one per layer of its kind when heterogeneous."""
        kind = self._kind_of[axis]
        if kind is None:
            return 1
        layers = len(self._layers_of[kind])
        return layers if self.elastic_config.heterogeneous else min(layers, 1)

    @torch.no_grad()
    def _init_parameters(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for mlp in self.routers.values():
            first, last = mlp[0], mlp[2]
            bound = first.in_features**-0.5
            for p in (first.weight, first.bias):
                p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=gen))
            last.weight.zero_()
            last.bias.zero_()

    def forward(self, code: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per axis, (num_decisions, num_candidates), for one budget encoding."""
        return {
            a: self.routers[a](code).view(self.num_decisions(a), len(self.choices[a]))
            for a in self.axes
        }

    def _cost(self, hidden: Size, sizes, keep) -> Size:
        """Cost of (expected) ``sizes`` per layer (``{axis: size}``) and keep probabilities."""
        model, cfg = self.model_config, self.config
        if cfg.budget_target == "params":
            return expected_param_count(model, hidden, sizes, keep)
        if cfg.budget_target == "active_params":
            return expected_active_param_count(model, hidden, sizes, keep)
        if cfg.budget_target == "latency":
            return expected_latency(
                model, self.latency_table, hidden, sizes, keep, cfg.latency_phase
            ).float()
        return expected_memory_bytes(model, hidden, sizes, keep, seq_length=cfg.memory_seq_length)

    def expected_cost(self, decision: RouterDecision) -> torch.Tensor:
        """C(expected sizes): parameters, active parameters, memory bytes or seconds per token
        (differentiable)."""
        return self._cost(decision.hidden, decision.sizes, decision.keep)

    @torch.no_grad()
    def target_ratio(self, budget: str | float, *, raw_argmax: bool = False) -> float:
        """Cost of the architecture the router runs at inference over the budget's target, in
        the router's own units (``budget_target``): 1.0 is on target. ``raw_argmax``: of the
        plain argmax of the logits, before :attr:`RouterConfig.target_tolerance` applies."""
        if raw_argmax and not self.config.fixed:
            logits = self(self.encoding.encode(budget, device=self.sizes_hidden.device))
            indices = {a: tuple(logits[a].argmax(-1).tolist()) for a in self.axes}
            spec = self._spec(indices)
        else:
            spec = self.decide(budget, 0, None, deterministic=True).spec
        return self.cost_ratio(spec, budget)

    def cost_ratio(self, spec: SubnetSpec, budget: str | float) -> float:
        """Exact cost of ``spec`` over ``budget``'s target (1.0: on target)."""
        return self.spec_cost(spec) / (self.encoding.fraction(budget) * self.parent_cost)

    def budget_loss(self, decision: RouterDecision) -> torch.Tensor:
        """lambda * |C(expected) - C_target| / C_target, with C_target = fraction * C(parent);
        zero for fixed architectures (nothing to learn)."""
        if self.config.fixed:
            return decision.hidden.new_zeros(())
        target = decision.fraction * self.parent_cost
        deviation = (self.expected_cost(decision) - target).abs() / target
        return self.config.budget_loss_weight * deviation

    def decide(
        self,
        budget: str | float,
        step: int,
        generator: torch.Generator | None,
        deterministic: bool = False,
        *,
        device: torch.device | str | None = None,
    ) -> RouterDecision:
        """The sub-network for ``budget`` (a trained name, or a fraction between trained ones).

        ``generator`` (e.g. :meth:`RouterConfig.generator`) is the only source of randomness;
        ``deterministic``: argmax of the logits, no noise (inference; ``generator`` unused), or,
        when that misses the target by more than ``target_tolerance``, the most probable
        architecture within it (``router/calibrate.py``; a few host-side cost evaluations).
        Weights are moved to ``device`` (the model's); the router may stay on the CPU. Costs one
        host sync (the chosen indices), once per decision, never inside the model's forward.
        With ``full_budget: parent`` a training decision at fraction 1 is the parent without
        weights (:meth:`trains_parent`; ``generator`` unused).
        """
        if generator is None and not deterministic:
            raise ValueError("decide() needs a torch.Generator unless deterministic=True")
        logits = self(self.encoding.encode(budget, device=self.sizes_hidden.device))
        if self.config.fixed:
            return self._fixed_decision(budget, logits)
        tau, scale = temperature(self.config, step), logit_scale(self.config, step)
        if not deterministic and self.trains_parent(budget):
            return self._parent_decision(budget, logits, tau, scale)
        hard = deterministic or self.config.sampling == "hard"
        samples, probs, picks = {}, {}, {}
        for axis in self.axes:  # fixed order: the generator's draws are the same on every rank
            z = logits[axis]
            if deterministic:
                y = p = F.one_hot(z.argmax(-1), z.size(-1)).to(z.dtype)
            else:
                p = gumbel_softmax(z, tau=tau, scale=scale, generator=generator, hard=False)
                y = straight_through(p) if hard else p
            samples[axis], probs[axis] = y, p
            picks[axis] = y.argmax(-1) if hard else self._largest_kept(y)
        flat = torch.cat([picks[a] for a in self.axes]).tolist()  # the one host sync
        indices, start = {}, 0
        for axis in self.axes:
            n = self.num_decisions(axis)
            indices[axis], start = tuple(flat[start : start + n]), start + n
        if deterministic and self.config.target_tolerance > 0:
            indices = self._meet_target(logits, indices, self.encoding.fraction(budget))
            for axis in self.axes:
                chosen = torch.tensor(indices[axis], device=logits[axis].device)
                probs[axis] = F.one_hot(chosen, logits[axis].size(-1)).to(logits[axis].dtype)
        spec = self._spec(indices)
        if deterministic:
            weights = None
        elif hard:
            weights = self._hard_weights(spec, samples, picks)
        else:
            weights = self._soft_weights(spec, probs, self._keep(probs))
        if weights is not None and device is not None:
            weights = weights_to(weights, device)
        return self._decision(budget, spec, weights, indices, probs)

    def architecture_name(self, indices: Indices) -> str:
        """A decision's architecture as text, its sizes per axis (one per decision, ``/`` between
        a heterogeneous axis' layers): ``hidden=64 depth=8 attention_heads=4 ...``."""
        return " ".join(
            f"{a}={'/'.join(str(self.choices[a][i]) for i in indices[a])}" for a in self.axes
        )

    def trains_parent(self, budget: str | float) -> bool:
        """Whether a training decision for ``budget`` runs the parent: ``full_budget: parent``
        and a fraction of 1."""
        parent = self.config.full_budget == "parent" and not self.config.fixed
        return parent and self.encoding.fraction(budget) >= 1

    def _parent_decision(self, budget: str | float, logits, tau: float, scale: float):
        """``full_budget: parent``: the parent, no router weights (megatron's own forward), and
        the noiseless probabilities softmax(scale * logits / tau) for the budget loss (no
        generator draw)."""
        indices = self._parent_indices
        probs = {a: torch.softmax(scale * logits[a] / tau, dim=-1) for a in self.axes}
        return self._decision(budget, self._spec(indices), None, indices, probs)

    def _keep(self, probs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(L,) probability that each layer is kept under the depth distribution."""
        return self.depth_keeps @ probs["depth"][0]

    def _decision(self, budget, spec, weights, indices, probs) -> RouterDecision:
        """The decision with the expected sizes of ``probs`` (what the budget loss reads)."""
        expect = {a: probs[a] @ getattr(self, f"sizes_{a}") for a in self.axes}  # (D,) each
        kinds = self.model_config.layer_kinds()
        keep = self._keep(probs)
        return RouterDecision(
            spec=spec,
            weights=weights,
            fraction=self.encoding.fraction(budget),
            hidden=expect["hidden"][0],
            sizes=tuple(
                {a: expect[a][self._decision_of(a, j)] for a in registry.layer_kind(k).axes}
                for j, k in enumerate(kinds)
            ),
            keep=tuple(keep.unbind(0)),
            indices=indices,
            probs=probs,
        )

    def _fixed_decision(self, budget: str | float, logits) -> RouterDecision:
        """``config.fixed``: the budget's fixed architecture (a fraction between trained budgets:
        the closest homogeneous combination), one-hot probabilities, no weights."""
        if budget not in self._fixed:
            fraction = self.encoding.fraction(budget)
            spec = closest_homogeneous_spec(
                self.model_config, self.elastic_config, fraction, cost=self.spec_cost
            )
            self._fixed[budget] = self._indices_of(spec)
        indices = self._fixed[budget]
        probs = {
            a: F.one_hot(torch.tensor(indices[a], device=logits[a].device), logits[a].size(-1)).to(
                logits[a].dtype
            )
            for a in self.axes
        }
        return self._decision(budget, self._spec(indices), None, indices, probs)

    def _meet_target(self, logits, argmax: Indices, fraction: float) -> Indices:
        """The argmax, or if it misses the target by more than ``target_tolerance`` the most
        probable architecture within it that :func:`meet_target` finds. A fraction of 1 (the
        full budget) takes no tolerance: the parent itself, the only architecture on target."""
        log_probs = {a: F.log_softmax(logits[a].float(), -1) for a in self.axes}
        return meet_target(
            log_probs,
            argmax,
            lambda indices: float(self.spec_cost(self._spec(indices))),
            fraction * self.parent_cost,
            0.0 if fraction >= 1 else self.config.target_tolerance,
        )

    def spec_cost(self, spec: SubnetSpec) -> float:
        """Exact cost of ``spec`` in the router's units (parameters, bytes or seconds)."""
        return float(self._cost(spec.hidden, spec_sizes(spec), spec_keep(spec)))

    def _decision_of(self, axis: str, layer: int) -> int:
        """Which of ``axis``'s decisions sizes ``layer``."""
        return self._ordinal[layer] if self.num_decisions(axis) > 1 else 0

    def _largest_kept(self, probs: torch.Tensor) -> torch.Tensor:
        """Soft mode: index of the largest candidate whose extra units weigh >= soft_min_weight
        (units of candidate k weigh the tail sum p_k + ... + p_K)."""
        tails = probs.flip(-1).cumsum(-1).flip(-1)
        return (tails >= self.config.soft_min_weight).sum(-1) - 1

    def _spec(self, indices: dict[str, tuple[int, ...]]) -> SubnetSpec:
        model = self.model_config
        n = model.num_layers
        per_layer = {}
        for axis in registry.axes():
            if not axis.per_layer:
                continue
            values = per_layer[axis.name] = [axis.full(model)] * n
            for j in self._layers_of[axis.kind]:
                values[j] = self.choices[axis.name][
                    indices[axis.name][self._decision_of(axis.name, j)]
                ]
        depth = self.choices["depth"][indices["depth"][0]]
        return SubnetSpec.heterogeneous(
            model,
            hidden=self.choices["hidden"][indices["hidden"][0]],
            active=[p < depth for p in self._position],
            **per_layer,
        )

    def _indices_of(self, spec: SubnetSpec) -> Indices:
        """The candidate indices :meth:`_spec` turns back into ``spec`` (``ValueError`` if there
        are none: a size that is not a candidate, a depth not of the layer ranking's order)."""
        indices: dict[str, tuple[int, ...]] = {}
        for axis in self.axes:
            if axis in ("hidden", "depth"):
                values = [spec.hidden if axis == "hidden" else spec.depth]
            else:
                layers = self._layers_of[self._kind_of[axis]][: self.num_decisions(axis)]
                values = [spec.layers[j].size(axis) for j in layers]
            if any(v not in self.choices[axis] for v in values):
                raise ValueError(f"{axis} sizes {values} are not among {self.choices[axis]}")
            indices[axis] = tuple(self.choices[axis].index(v) for v in values)
        if self._spec(indices) != spec:
            raise ValueError(
                "the spec is not one of the router's architectures (layers differ within a "
                "homogeneous axis, or its active layers do not follow the layer ranking)"
            )
        return indices

    def _hard_weights(self, spec: SubnetSpec, probs, picks) -> SubnetWeights:
        """Straight-through scalars: exactly 1.0, gradient of the chosen candidate's probability."""
        s = {a: probs[a].gather(-1, picks[a][:, None])[:, 0] for a in self.axes}
        layers, gates = [], []
        for j, c in enumerate(spec.layers):
            w = None
            for axis, _ in c.sizes:
                v = s[axis][self._decision_of(axis, j)]
                w = v if w is None else w * v
            layers.append(w if c.active else None)
            gates.append(s["depth"][0] if c.active else None)
        return SubnetWeights(hidden=s["hidden"][0], layers=tuple(layers), gates=tuple(gates))

    def _soft_weights(self, spec: SubnetSpec, probs, keep: torch.Tensor) -> SubnetWeights:
        """Per-unit weights in the model's logical orders: w_i = P(the sampled candidate keeps
        unit i). Heads nest within groups and neurons within blocks, so the per-group (per-block)
        prefix weights repeat group-major (block-major)."""
        model, elastic = self.model_config, self.elastic_config

        def nested(axis: str, j: int, active: int) -> torch.Tensor:
            g = registry.axis(axis).groups(model, elastic)
            sizes = getattr(self, f"sizes_{axis}") / g
            p = probs[axis][self._decision_of(axis, j)]
            return prefix_weights(p, sizes, active // g).repeat(g)

        layers, gates = [], []
        for j, c in enumerate(spec.layers):
            if not c.active:
                layers.append(None)
                gates.append(None)
                continue
            # the kind combines its axes' weights (default: outer product, heads x channels)
            kind = registry.layer_kind(c.kind)
            layers.append(kind.combine_weights([nested(a, j, size) for a, size in c.sizes]))
            gates.append(keep[j])
        hidden = prefix_weights(probs["hidden"][0], self.sizes_hidden, spec.hidden)
        return SubnetWeights(hidden=hidden, layers=tuple(layers), gates=tuple(gates))
