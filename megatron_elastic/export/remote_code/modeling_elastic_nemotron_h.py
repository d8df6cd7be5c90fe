"""A NemotronH-style hybrid (Mamba-2 + attention + squared-ReLU MLP) whose layers have their own
widths: the model of a heterogeneous budget exported from megatron-elastic.

Self-contained Hugging Face remote code (needs only ``torch`` and ``transformers``). Tensor names
are stock NemotronH's (``backbone.layers.N.mixer...``). The math is the megatron-core parent's:
pre-norm residual blocks, RMSNorm, attention without positional embedding, Mamba-2 with a gated
RMSNorm over ``n_groups`` channel groups and no lower clamp on ``dt``. There is no KV/SSM cache:
each generation step recomputes the whole sequence (``use_cache`` is ignored).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_elastic_nemotron_h import ElasticNemotronHConfig

__all__ = [
    "ElasticNemotronHForCausalLM",
    "ElasticNemotronHModel",
    "ElasticNemotronHPreTrainedModel",
]


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class ElasticNemotronHRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (_rms(x.float(), self.eps) * self.weight.float()).to(x.dtype)


class ElasticNemotronHGatedRMSNorm(nn.Module):
    """``rmsnorm(y * silu(z))`` normalised within each of the channel groups."""

    def __init__(self, size: int, groups: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.groups, self.eps = groups, eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        gated = y.float() * F.silu(z.float())
        *lead, size = gated.shape
        normed = _rms(gated.view(*lead, self.groups, size // self.groups), self.eps)
        return (normed.view(*lead, size) * self.weight.float()).to(y.dtype)


def _segment_sum(a: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T): ``out[i, j] = a[j+1] + ... + a[i]`` for j <= i, -inf above.
    Masked before the cumulative sum so no large partial sums are subtracted."""
    t = a.size(-1)
    grid = a[..., None].expand(*a.shape, t)  # [..., i, j] = a[i]
    grid = grid.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=a.device).tril(-1), 0.0)
    out = grid.cumsum(-2)
    return out.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=a.device).tril(), -torch.inf)


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk: int,
) -> torch.Tensor:
    """Mamba-2 state-space scan, chunked: exact within chunks, a recurrence across them.

    x (b, l, h, p), dt (b, l, h), A (h,), B and C (b, l, g, n) -> y (b, l, h, p) in float32.
    """
    b, length, h, p = x.shape
    B = B.float().repeat_interleave(h // B.size(2), dim=2)  # a group's heads are contiguous
    C = C.float().repeat_interleave(h // C.size(2), dim=2)
    xdt = x.float() * dt[..., None]
    a = dt * A  # (b, l, h), <= 0
    pad = (-length) % chunk  # zero padding at the end never reaches earlier tokens

    def chunks(t: torch.Tensor) -> torch.Tensor:
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(b, -1, chunk, *t.shape[2:])

    xdt, B, C = chunks(xdt), chunks(B), chunks(C)  # (b, c, T, h, .)
    a = chunks(a).permute(0, 3, 1, 2)  # (b, h, c, T)
    a_cum = a.cumsum(-1)
    # Within each chunk: causal "attention" C_i.B_j * decay(j -> i).
    decay = torch.exp(_segment_sum(a))  # (b, h, c, T, T)
    y = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, decay, xdt)
    # State at the end of each chunk, then carried across chunks.
    to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (b, h, c, T)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, to_end, xdt)
    states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)
    across = torch.exp(_segment_sum(F.pad(a_cum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", across, states)[:, :-1]
    # Contribution of the state entering each chunk.
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, torch.exp(a_cum))
    return y.reshape(b, -1, h, p)[:, :length]


class ElasticNemotronHMamba2Mixer(nn.Module):
    def __init__(self, config: ElasticNemotronHConfig, layer_idx: int) -> None:
        super().__init__()
        self.num_heads = config.mamba_num_heads_per_layer[layer_idx]
        self.head_dim = config.mamba_head_dim_per_layer[layer_idx]
        self.n_groups, self.state = config.n_groups, config.ssm_state_size
        self.chunk = config.chunk_size
        self.inner = self.num_heads * self.head_dim
        self.conv_dim = self.inner + 2 * self.n_groups * self.state
        self.in_proj = nn.Linear(
            config.hidden_size, self.inner + self.conv_dim + self.num_heads, bias=False
        )
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            config.conv_kernel,
            groups=self.conv_dim,
            padding=config.conv_kernel - 1,
        )
        self.dt_bias = nn.Parameter(torch.ones(self.num_heads))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.num_heads + 1).float()))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = ElasticNemotronHGatedRMSNorm(
            self.inner, self.n_groups, config.mamba_norm_epsilon
        )
        self.out_proj = nn.Linear(self.inner, config.hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, length, _ = hidden.shape
        if mask is not None:  # padding tokens must not enter the recurrence
            hidden = hidden * mask[..., None].to(hidden.dtype)
        gn = self.n_groups * self.state
        z, xbc, dt = self.in_proj(hidden).split([self.inner, self.conv_dim, self.num_heads], -1)
        xbc = F.silu(self.conv1d(xbc.transpose(1, 2))[..., :length].transpose(1, 2))
        if mask is not None:
            xbc = xbc * mask[..., None].to(xbc.dtype)
        x, B, C = xbc.split([self.inner, gn, gn], -1)
        dt = F.softplus(dt.float() + self.dt_bias.float())  # (b, l, h)
        x = x.reshape(b, length, self.num_heads, self.head_dim)
        y = ssd_scan(
            x,
            dt,
            -torch.exp(self.A_log.float()),
            B.reshape(b, length, self.n_groups, self.state),
            C.reshape(b, length, self.n_groups, self.state),
            self.chunk,
        )
        y = y + x.float() * self.D.float()[:, None]  # skip connection
        y = self.norm(y.reshape(b, length, self.inner).to(hidden.dtype), z)
        return self.out_proj(y)


class ElasticNemotronHAttention(nn.Module):
    """Causal grouped-query attention without positional embedding."""

    def __init__(self, config: ElasticNemotronHConfig, layer_idx: int) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads_per_layer[layer_idx]
        self.kv_heads, self.head_dim = config.num_key_value_heads, config.head_dim
        hidden, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(hidden, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(hidden, self.kv_heads * d, bias=False)
        self.v_proj = nn.Linear(hidden, self.kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, hidden, bias=False)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, length, _ = hidden.shape
        q = self.q_proj(hidden).view(b, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden).view(b, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden).view(b, length, self.kv_heads, self.head_dim).transpose(1, 2)
        rep = self.num_heads // self.kv_heads  # query head g*rep+r reads key/value head g
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask is None:
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
        else:  # causal and not a padding key; the diagonal stays so no row is empty
            allowed = torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril()
            keys = mask[:, None, None, :].bool() | torch.eye(
                length, dtype=torch.bool, device=hidden.device
            )
            out = F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=allowed & keys
            )
        out = out.to(hidden.dtype).transpose(1, 2).reshape(b, length, -1)
        return self.o_proj(out)


class ElasticNemotronHMLP(nn.Module):
    def __init__(self, config: ElasticNemotronHConfig, layer_idx: int) -> None:
        super().__init__()
        size = config.intermediate_size_per_layer[layer_idx]
        if config.mlp_hidden_act != "relu2":
            raise ValueError(f"mlp_hidden_act={config.mlp_hidden_act!r}: only 'relu2' is supported")
        self.up_proj = nn.Linear(config.hidden_size, size, bias=False)
        self.down_proj = nn.Linear(size, config.hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.down_proj(F.relu(self.up_proj(hidden)).square())


_MIXERS = {
    "M": ElasticNemotronHMamba2Mixer,
    "*": ElasticNemotronHAttention,
    "-": ElasticNemotronHMLP,
}


class ElasticNemotronHBlock(nn.Module):
    """``x + mixer(norm(x))``."""

    def __init__(self, config: ElasticNemotronHConfig, layer_idx: int) -> None:
        super().__init__()
        self.norm = ElasticNemotronHRMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mixer = _MIXERS[config.hybrid_override_pattern[layer_idx]](config, layer_idx)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return hidden + self.mixer(self.norm(hidden), mask)


class ElasticNemotronHPreTrainedModel(PreTrainedModel):
    config_class = ElasticNemotronHConfig
    base_model_prefix = "backbone"
    _no_split_modules: ClassVar[list[str]] = ["ElasticNemotronHBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Only for a fresh model; never overwrite tensors loaded from a checkpoint.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            if not getattr(module.weight, "_is_hf_initialized", False):
                module.weight.normal_(0.0, self.config.initializer_range)


class ElasticNemotronHModel(ElasticNemotronHPreTrainedModel):
    def __init__(self, config: ElasticNemotronHConfig) -> None:
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            ElasticNemotronHBlock(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm_f = ElasticNemotronHRMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask
        hidden = self.embeddings(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, mask)
        return self.norm_f(hidden)


class ElasticNemotronHForCausalLM(ElasticNemotronHPreTrainedModel, GenerationMixin):
    def __init__(self, config: ElasticNemotronHConfig) -> None:
        super().__init__(config)
        self.backbone = ElasticNemotronHModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.backbone.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.backbone.embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        hidden = self.backbone(input_ids, attention_mask)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)
