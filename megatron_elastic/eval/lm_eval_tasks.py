"""lm-evaluation-harness tasks over the project's held-out reasoning problems, written to a local
folder (no hub access): what ``tools/make_lm_eval_tasks.py`` runs.

Two tasks read one ``problems.jsonl`` (the problems ``tools/evaluate.py`` draws with the same
``num_problems``, ``problem_seed``, ``tasks``, ``problem_size`` and ``exclude``):

- ``elastic_reasoning`` (``generate_until``): greedy completion of each prompt, scored by
  :func:`process_results` with the answer extraction and the task scorers of ``evaluate.py``
  (:func:`megatron_elastic.eval.accuracy.completion_answer`, ``score_answer == 1``), so its
  ``exact_match`` is ``evaluate.py``'s accuracy for the same greedy completions. Generation stops
  at ``"\\nQuestion:"`` (``evaluate.py`` judges only the text before it) and at end of text.
- ``elastic_reasoning_loglik`` (``loglikelihood``): the log-probability of `` <answer>`` after the
  worked solution and ``####``; ``acc`` is whether greedy decoding would produce it.

    lm_eval --model hf --model_args pretrained=runs/export_hf/50%,dtype=float32 \\
        --include_path runs/lm_eval_tasks --tasks elastic_reasoning,elastic_reasoning_loglik
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = ["GENERATE_TASK", "LOGLIK_TASK", "STOP", "process_results", "write_lm_eval_tasks"]

GENERATE_TASK = "elastic_reasoning"
LOGLIK_TASK = "elastic_reasoning_loglik"
STOP = "\nQuestion:"
"""Where a completion is cut: the model has started a new problem."""
PROBLEMS = "problems.jsonl"


def process_results(doc: dict[str, Any], results: Sequence[str]) -> dict[str, float]:
    """lm-eval's per-document scoring of :data:`GENERATE_TASK`: 1.0 when the completion's final
    answer is correct by the problem's task scorer (as ``evaluate.py`` counts it)."""
    from megatron_elastic.data.reasoning import ReasoningRecord, score_answer
    from megatron_elastic.eval.accuracy import completion_answer

    predicted = completion_answer(results[0])
    return {"exact_match": float(score_answer(ReasoningRecord.from_json(doc), predicted) == 1.0)}


def _task(name: str, output_type: str, data: Path, **fields: Any) -> dict[str, Any]:
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": output_type,
        **fields,
        "metadata": {"version": 1.0},
    }


def write_lm_eval_tasks(
    output: str = "runs/lm_eval_tasks",
    *,
    num_problems: int = 100,
    problem_seed: int = 20250,
    tasks: Sequence[str] | None = None,
    problem_size: str = "standard",
    exclude: str | None = None,
    max_new_tokens: int = 128,
) -> Path:
    """Write the two tasks' YAML, their ``utils.py`` hook and ``problems.jsonl`` under ``output``
    (pass it to ``lm_eval --include_path``); returns the folder. ``max_new_tokens`` is the
    generation task's ``max_gen_toks`` (``evaluate.py --max-new-tokens``)."""
    from megatron_elastic.data.reasoning import render_prompt
    from megatron_elastic.eval.run import held_out_problems

    if num_problems < 1:
        raise ValueError(f"--num-problems must be >= 1, got {num_problems}")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    problems = held_out_problems(
        num_problems, seed=problem_seed, tasks=tasks, size=problem_size, exclude=exclude
    )
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {output!r} is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    data = (out / PROBLEMS).resolve()
    rows = [{**r.to_json(), "prompt": render_prompt(r)} for r in problems]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    generate = _task(
        GENERATE_TASK,
        "generate_until",
        data,
        doc_to_text="{{prompt}}",
        doc_to_target="{{answer}}",
        generation_kwargs={"until": [STOP], "max_gen_toks": max_new_tokens, "do_sample": False},
        process_results="!function utils.process_results",
        metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    )
    loglik = _task(
        LOGLIK_TASK,
        "loglikelihood",
        data,
        doc_to_text="{{prompt}} {{solution}}\n####",
        doc_to_target=" {{answer}}",
        metric_list=[
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        ],
    )
    for task in (generate, loglik):
        text = yaml.safe_dump(task, sort_keys=False, width=1000)
        # lm-eval resolves "!function module.name" tags; PyYAML quotes the plain string
        text = text.replace("'!function utils.process_results'", "!function utils.process_results")
        (out / f"{task['task']}.yaml").write_text(text)
    (out / "utils.py").write_text(
        '"""Scoring hook of the elastic_reasoning task (megatron_elastic.eval.lm_eval_tasks)."""\n'
        "from megatron_elastic.eval.lm_eval_tasks import process_results  # noqa: F401\n"
    )
    return out
