"""Knowledge-distillation losses on (vocab-parallel) logits.

Forward KL from the teacher to the student on temperature-softened logits, scaled by T^2 (the
gradient magnitude then does not depend on T), per token. Logits may be split over the vocabulary
across tensor-parallel ranks (megatron's ``parallel_output``): normalisers and sums are reduced
over the TP group, and the gradient is written analytically, so every rank gets the exact
single-process gradient of its shard with no extra communication in backward. At TP=1 the value
equals ModelOpt's ``LogitsDistillationLoss`` (``modelopt.torch.distill``), tested.

Memory: the loss runs over chunks of tokens. It keeps for backward only the student and teacher
logits themselves (which exist anyway during the forward) and per-token normalisers; backward
recomputes each chunk's softmaxes from them with the same operations as the forward, so the
gradient is bit-for-bit what an unchunked pass would give. The fp32 (tokens x V/TP) temporaries
of a chunk are 1/``num_chunks`` of the whole. The same pass yields the student's cross entropy
(temperature 1) with megatron's ``vocab_parallel_cross_entropy`` arithmetic, and its gradient,
so no second full-vocabulary log-softmax over the student's logits is needed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["kd_and_ce_loss", "kd_kl_loss", "kd_loss_with_ce"]


def _all_reduce(t: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _fp32(logits: torch.Tensor) -> torch.Tensor:
    """An fp32 copy (never the caller's storage: the chunk is edited in place)."""
    return torch.empty(logits.shape, dtype=torch.float32, device=logits.device).copy_(logits)


def _shifted(logits: torch.Tensor, temperature: float, group) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x - max x, max x)`` for ``x = logits / T`` in fp32, the max over the whole (TP-split)
    vocabulary; (c, V/TP) and (c, 1)."""
    x = _fp32(logits).div_(temperature)
    shift = _all_reduce(x.max(dim=-1, keepdim=True).values, group, dist.ReduceOp.MAX)
    return x.sub_(shift), shift


def _sum_exp(x: torch.Tensor, group) -> torch.Tensor:
    """The vocabulary-wide sum of ``exp(x)`` (x already shifted), (c, 1)."""
    return _all_reduce(x.exp().sum(dim=-1, keepdim=True), group)


def _local_labels(labels: torch.Tensor, start: int, width: int):
    """Megatron's masking of labels for a vocabulary shard of ``width`` ids from ``start``: the
    shard-local index (0 where the label is on another shard) and whether it is on this one."""
    target = labels - start
    inside = (target >= 0) & (target < width)
    return target.masked_fill(~inside, 0), inside


def _label_logits(x: torch.Tensor, labels: torch.Tensor, start: int, group) -> torch.Tensor:
    """``x[label]`` summed over the vocabulary shards (0 from shards without the label)."""
    target, inside = _local_labels(labels, start, x.shape[-1])
    picked = x.gather(-1, target.unsqueeze(-1)).squeeze(-1).masked_fill(~inside, 0.0)
    return _all_reduce(picked, group)


class _ChunkedVocabParallelKD(torch.autograd.Function):
    """Per-token ``T^2 KL(p || q)`` and (with labels) the student's cross entropy, over chunks
    of the (tokens, V/TP) logits. Saves the logits and a (tokens, 6) fp32 table of shifts and
    normalisers. Temporaries, fp32 (chunk, V/TP): three in forward, two in backward (three when
    the CE is trained too)."""

    @staticmethod
    def forward(ctx, student, teacher, labels, temperature: float, num_chunks: int, group):
        ctx.set_materialize_grads(False)
        n = student.shape[0]
        size = -(-n // num_chunks)  # tokens per chunk
        kl = student.new_empty(n, dtype=torch.float32)
        ce = None if labels is None else student.new_empty(n, dtype=torch.float32)
        # per token: student shift, log-normaliser at T; teacher's; student shift, sum exp at 1
        norms = student.new_empty(n, 6, dtype=torch.float32)
        start = 0 if group is None else dist.get_rank(group) * student.shape[-1]
        for c in range(0, n, size):
            rows = slice(c, c + size)
            xs, s_shift = _shifted(student[rows], temperature, group)  # (c, V/TP) fp32
            s_sum = _sum_exp(xs, group)
            if labels is not None:
                if temperature == 1.0:  # xs is megatron's shifted fp32 logits already
                    predicted = _label_logits(xs, labels[rows], start, group)
                    shift1, sum1 = s_shift, s_sum
                else:
                    x1, shift1 = _shifted(student[rows], 1.0, group)
                    predicted = _label_logits(x1, labels[rows], start, group)
                    sum1 = _sum_exp(x1, group)
                    del x1
                # megatron's vocab_parallel_cross_entropy, operation for operation
                ce[rows] = sum1.squeeze(-1).log() - predicted
                norms[rows, 4:5], norms[rows, 5:6] = shift1, sum1
            s_lse = s_sum.log()
            xt, t_shift = _shifted(teacher[rows], temperature, group)
            t_lse = _sum_exp(xt, group).log()
            log_q, log_p = xs.sub_(s_lse), xt.sub_(t_lse)
            p = log_p.exp()
            kl[rows] = _all_reduce(p.mul_(log_p.sub_(log_q)).sum(dim=-1), group)
            del xs, xt, log_q, log_p, p
            norms[rows, 0:1], norms[rows, 1:2] = s_shift, s_lse
            norms[rows, 2:3], norms[rows, 3:4] = t_shift, t_lse
        ctx.save_for_backward(student, teacher, labels, norms)
        ctx.temperature, ctx.size, ctx.start = temperature, size, start
        return kl * temperature**2, ce

    @staticmethod
    def backward(ctx, grad_kl, grad_ce):
        student, teacher, labels, norms = ctx.saved_tensors
        t, size = ctx.temperature, ctx.size
        if grad_kl is None and grad_ce is None:
            return None, None, None, None, None, None
        grad = torch.empty_like(student)
        for c in range(0, student.shape[0], size):
            rows, n = slice(c, c + size), norms[c : c + size]
            g = None
            if grad_kl is not None:
                # d/ds [T^2 KL(p || softmax(s/T))] = T (q - p); local to each vocabulary shard.
                # q and p rebuilt with the forward's operations: bit-for-bit its values.
                q = _fp32(student[rows]).div_(t).sub_(n[:, 0:1]).sub_(n[:, 1:2]).exp_()
                p = _fp32(teacher[rows]).div_(t).sub_(n[:, 2:3]).sub_(n[:, 3:4]).exp_()
                g = q.sub_(p).mul_(t * grad_kl[rows].unsqueeze(-1))
                del p
            if grad_ce is not None:
                # megatron's: (softmax(s) - one_hot(label)) * grad
                soft = _fp32(student[rows]).sub_(n[:, 4:5]).exp_().div_(n[:, 5:6])
                target, inside = _local_labels(labels[rows], ctx.start, soft.shape[-1])
                one_hot = -inside.to(soft.dtype).unsqueeze(-1)  # -1 at the label, -0 off-shard
                soft.scatter_add_(-1, target.unsqueeze(-1), one_hot)
                soft.mul_(grad_ce[rows].unsqueeze(-1))
                g = soft if g is None else g.add_(soft)
            grad[rows] = g
        return grad, None, None, None, None, None


def kd_and_ce_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float = 1.0,
    tp_group=None,
    num_chunks: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token ``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` and, with ``labels``
    (global vocabulary ids, shape = logits without the vocabulary dim), the student's cross
    entropy at temperature 1 (else ``None``); both differentiable in the student logits, fp32,
    shape = logits without the vocabulary dim. The teacher gets no gradient. ``num_chunks``:
    token chunks the pass runs over (memory; the result does not depend on it)."""
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; both must cover the same tokens and vocabulary"
        )
    if not isinstance(num_chunks, int) or num_chunks < 1:
        raise ValueError(f"num_chunks must be a positive integer, got {num_chunks!r}")
    shape, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    if labels is not None and labels.shape != shape:
        raise ValueError(f"labels {tuple(labels.shape)} must have the logits' shape {tuple(shape)}")
    kl, ce = _ChunkedVocabParallelKD.apply(
        student_logits.reshape(-1, vocab),  # (tokens, V/TP)
        teacher_logits.detach().reshape(-1, vocab),
        None if labels is None else labels.reshape(-1),
        temperature,
        num_chunks,
        tp_group,
    )
    return kl.view(shape), None if ce is None else ce.view(shape)


def kd_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    tp_group=None,
    num_chunks: int = 1,
) -> torch.Tensor:
    """Per-token ``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` (shape = logits without
    the vocabulary dim). The teacher gets no gradient."""
    kl, _ = kd_and_ce_loss(student_logits, teacher_logits, None, temperature, tp_group, num_chunks)
    return kl


def kd_loss_with_ce(
    kd_per_token: torch.Tensor, ce_per_token: torch.Tensor | None, ce_weight: float
) -> torch.Tensor:
    """``KD + ce_weight * CE`` per token (the trainable-teacher / CE-mix option)."""
    if ce_weight == 0 or ce_per_token is None:
        return kd_per_token
    return kd_per_token + ce_weight * ce_per_token
