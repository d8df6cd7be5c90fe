"""What sequence and context parallelism cannot do is refused before any compute, with a
``ValueError`` that names the field and the values that would work."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_elastic.config import ParallelConfig, check_parallel_fit
from megatron_elastic.elastic import ElasticConfig
from megatron_elastic.training.recipe import load_train_recipe

ROOT = Path(__file__).parents[2]
TINY_STAGE1 = ROOT / "examples" / "tiny" / "stage1.yaml"


def test_sequence_parallel_needs_a_sequence_divisible_by_tp() -> None:
    sp = ParallelConfig(tensor_parallel_size=4, sequence_parallel=True)
    assert sp.sequence_parallel_active and sp.sequence_multiple == 4
    sp.check_sequence_length(4096)
    with pytest.raises(ValueError, match=r"train.seq_length=4098 .*tensor_parallel_size=4 "):
        sp.check_sequence_length(4098)
    with pytest.raises(ValueError, match=r"multiple of 4 \(e.g. 4096 or 4100\)"):
        sp.check_sequence_length(4098)
    # megatron's rule: SP at TP 1 is a no-op, no constraint
    assert not ParallelConfig(sequence_parallel=True).sequence_parallel_active
    ParallelConfig(sequence_parallel=True).check_sequence_length(4097)


def test_context_parallel_needs_2cp_chunks_times_tp_under_sequence_parallel() -> None:
    cp = ParallelConfig(tensor_parallel_size=2, context_parallel_size=2, sequence_parallel=True)
    assert cp.sequence_multiple == 8 and cp.model_parallel_size == 4
    with pytest.raises(
        ValueError,
        match=r"2 x context_parallel_size=2 x tensor_parallel_size=2 \(sequence_parallel\) = 8",
    ):
        cp.check_sequence_length(36)
    without_sp = ParallelConfig(tensor_parallel_size=2, context_parallel_size=2)
    without_sp.check_sequence_length(36)  # 2 x CP = 4 only
    with pytest.raises(ValueError, match="context_parallel_size=2 = 4"):
        without_sp.check_sequence_length(38)


def test_bad_sequence_and_context_parallel_values_are_refused() -> None:
    with pytest.raises(ValueError, match="context_parallel_size must be a positive integer"):
        ParallelConfig(context_parallel_size=0)
    with pytest.raises(ValueError, match="sequence_parallel must be true or false"):
        ParallelConfig(sequence_parallel="yes")  # type: ignore[arg-type]


def test_recipe_refuses_what_context_parallel_cannot_split() -> None:
    overrides = ["parallel.context_parallel_size=2"]
    load_train_recipe(TINY_STAGE1, [*overrides, "train.seq_length=256"])
    with pytest.raises(ValueError, match=r"train.seq_length=258 is not divisible by"):
        load_train_recipe(TINY_STAGE1, [*overrides, "train.seq_length=258"])
    # the tiny recipe's 6-head Mamba choice is 3 heads per rank at TP 2: CP 2 cannot split it
    with pytest.raises(ValueError, match=r"mamba_heads choices \[6\].*valid values are \[4, 8\]"):
        load_train_recipe(TINY_STAGE1, [*overrides, "parallel.tensor_parallel_size=2"])


def test_context_parallel_refuses_parent_mamba_heads_it_cannot_split(small_config) -> None:
    # hybrid_small: 4 Mamba heads in 2 groups. TP 2 leaves 2 heads per rank: CP 2 splits them,
    # CP 4 cannot.
    two = ParallelConfig(tensor_parallel_size=2, context_parallel_size=2)
    check_parallel_fit(small_config, two)
    with pytest.raises(
        ValueError, match=r"ModelConfig.mamba_num_heads=4: 2 heads per tensor-parallel rank"
    ):
        check_parallel_fit(
            small_config, ParallelConfig(tensor_parallel_size=2, context_parallel_size=4)
        )


def test_context_parallel_refuses_elastic_mamba_heads_it_cannot_split(small_config) -> None:
    elastic = ElasticConfig(budgets={"half": 0.5}, mamba_head_choices=(2,), ffn_nesting_blocks=2)
    elastic.validate_for(small_config, ParallelConfig(tensor_parallel_size=2))  # fine without CP
    elastic.validate_for(small_config, ParallelConfig(context_parallel_size=2))  # 2 per rank
    with pytest.raises(
        ValueError,
        match=r"mamba_heads choices \[2\] are not possible with context_parallel_size=2 at "
        r"tensor_parallel_size=2.*valid values are \[4\]",
    ):
        elastic.validate_for(
            small_config, ParallelConfig(tensor_parallel_size=2, context_parallel_size=2)
        )
