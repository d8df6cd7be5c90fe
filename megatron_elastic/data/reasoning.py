"""Offline reasoning text for the tiny recipe, generated with ``reasoning-gym`` (Apache-2.0).

reasoning-gym generates each problem (question and final answer) and scores answers, but of the
tasks used here only ``gsm_symbolic`` ships a worked solution (its ``metadata["answer_cot"]``,
written per problem template by the reasoning-gym authors). For the other tasks this module
derives the steps itself from the task's metadata:

- ``basic_arithmetic``, ``chain_sum``: the expression is evaluated one operation at a time in
  Python's order (innermost first, left to right), one line per operation. ``/`` is integer
  division rounded down, as reasoning-gym computes the answer; the rare inexact division says so.
- ``simple_equations``: the linear equation ``a*x + b = c`` is solved by moving the constant and
  dividing by the coefficient (the long variant also substitutes the solution back as a check).

Every derived solution ends in reasoning-gym's own answer (checked while generating). Records are
deterministic for a seed; questions within one call are distinct, so a train/valid split of one
call's records does not share problems.
"""

from __future__ import annotations

import ast
import operator
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_TASKS",
    "PROBLEM_SIZES",
    "QUICKSTART_TASKS",
    "ReasoningRecord",
    "extract_answer",
    "generate_records",
    "render_prompt",
    "render_text",
    "score_answer",
]

ANSWER_MARK = "####"
"""Separates the worked solution from the final answer in the rendered text (GSM8K style)."""


@dataclass(frozen=True)
class ReasoningRecord:
    """One problem with its worked solution."""

    task: str
    """reasoning-gym task name; :func:`score_answer` scores with that task's scorer."""
    question: str
    solution: str
    """Multi-line worked solution (the steps), without the final answer line."""
    answer: str
    """Final answer exactly as reasoning-gym states it."""

    def to_json(self) -> dict[str, str]:
        """The jsonl row: the rendered training ``text`` and the fields it was made from."""
        return {
            "text": render_text(self),
            "task": self.task,
            "question": self.question,
            "solution": self.solution,
            "answer": self.answer,
        }

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> ReasoningRecord:
        return cls(row["task"], row["question"], row.get("solution", ""), row["answer"])


def render_prompt(record: ReasoningRecord) -> str:
    """The text a model continues at evaluation time; :func:`render_text` starts with it."""
    return f"Question: {record.question}\nAnswer:"


def render_text(record: ReasoningRecord) -> str:
    """``Question: ...\\nAnswer: <steps>\\n#### <answer>``."""
    return f"{render_prompt(record)} {record.solution}\n{ANSWER_MARK} {record.answer}"


def extract_answer(generated: str) -> str | None:
    """The final answer in generated text: what follows the last ``####`` on its line."""
    _, mark, rest = generated.rpartition(ANSWER_MARK)
    if not mark:
        return None
    return rest.strip().split("\n", 1)[0].strip()


def score_answer(record: ReasoningRecord, predicted: str | None) -> float:
    """Score ``predicted`` (a final answer, e.g. from :func:`extract_answer`) with the task's own
    reasoning-gym scorer: 1.0 for a correct answer. The scorers give some partial credit to wrong
    answers (``basic_arithmetic``/``simple_equations``: ``len(answer)/len(predicted)`` when the
    answer is a substring of the prediction; ``gsm_symbolic``: 0.01 for a wrong number), so count
    accuracy as ``score == 1.0``."""
    import reasoning_gym

    scorer = reasoning_gym.create_dataset(record.task, seed=0, size=1)  # a few microseconds
    entry = {"question": record.question, "answer": record.answer, "metadata": {}}
    return float(scorer.score_answer(predicted, entry))


# --- step builders -----------------------------------------------------------------------------

_BIN_OPS: dict[type, tuple[str, Callable[[int, int], int]]] = {
    ast.Add: ("+", operator.add),
    ast.Sub: ("-", operator.sub),
    ast.Mult: ("*", operator.mul),
    ast.Div: ("/", operator.floordiv),  # reasoning-gym's answers use integer (floor) division
}


def _operand(value: int) -> str:
    return f"({value})" if value < 0 else str(value)


_PRECEDENCE = {ast.Add: 1, ast.Sub: 1, ast.Mult: 2, ast.Div: 2}


def _format(node: ast.expr) -> str:
    """Infix text of an arithmetic tree: negative numbers in parentheses, minimal parentheses
    otherwise (operators are left-associative)."""
    if isinstance(node, ast.Constant):
        return _operand(node.value)
    if isinstance(node, ast.UnaryOp):
        inner = _format(node.operand)
        return f"-{inner}" if isinstance(node.operand, ast.Constant) else f"-({inner})"
    prec = _PRECEDENCE[type(node.op)]
    left, right = _format(node.left), _format(node.right)
    if isinstance(node.left, ast.BinOp) and _PRECEDENCE[type(node.left.op)] < prec:
        left = f"({left})"
    if isinstance(node.right, ast.BinOp) and _PRECEDENCE[type(node.right.op)] <= prec:
        right = f"({right})"
    return f"{left} {_BIN_OPS[type(node.op)][0]} {right}"


def _fold_literals(node: ast.expr) -> ast.expr:
    """``-3`` parses as negation of 3; make it the literal -3 (no step for it)."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.operand, ast.Constant):
        return ast.Constant(-node.operand.value)
    if isinstance(node, ast.UnaryOp):
        return ast.UnaryOp(node.op, _fold_literals(node.operand))
    if isinstance(node, ast.BinOp):
        return ast.BinOp(_fold_literals(node.left), node.op, _fold_literals(node.right))
    return node


def _reduce_once(node: ast.expr) -> tuple[ast.expr, str] | None:
    """Evaluate the first operation whose operands are numbers; None when ``node`` is a number.
    Negating a group that has become a number folds into that number unless it flips a negative
    number (``-(-9) = 9`` is a step of its own)."""
    if isinstance(node, ast.Constant):
        return None
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        if isinstance(node.operand, ast.Constant):
            v = node.operand.value
            return ast.Constant(-v), f"-({v}) = {-v}"
        reduced = _reduce_once(node.operand)
        assert reduced is not None
        operand, step = reduced
        if isinstance(operand, ast.Constant) and operand.value >= 0:
            return ast.Constant(-operand.value), step
        return ast.UnaryOp(ast.USub(), operand), step
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN_OPS:
        for side in ("left", "right"):
            reduced = _reduce_once(getattr(node, side))
            if reduced is not None:
                new = ast.BinOp(node.left, node.op, node.right)
                setattr(new, side, reduced[0])
                return new, reduced[1]
        a, b = node.left.value, node.right.value
        symbol, fn = _BIN_OPS[type(node.op)]
        c = fn(a, b)
        note = " (rounded down)" if symbol == "/" and a % b else ""
        return ast.Constant(c), f"{_operand(a)} {symbol} {_operand(b)} = {c}{note}"
    raise ValueError(f"unsupported arithmetic node {ast.dump(node)}")


def _arithmetic_solution(metadata: Mapping[str, Any], verbose: bool) -> tuple[str, str] | None:
    tree = _fold_literals(ast.parse(metadata["expression"], mode="eval").body)
    lines = []
    while (reduced := _reduce_once(tree)) is not None:
        tree, step = reduced
        if verbose and not isinstance(tree, ast.Constant):
            step = f"{step}, so the expression becomes {_format(tree)}"
        lines.append(step)
    if not lines:
        lines.append(f"The expression is just {tree.value}.")
    return "\n".join(lines), str(tree.value)


def _evaluate(node: ast.expr, names: Mapping[str, int]) -> int:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return names[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand, names)
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN_OPS:
        fn = _BIN_OPS[type(node.op)][1]
        return fn(_evaluate(node.left, names), _evaluate(node.right, names))
    raise ValueError(f"unsupported equation node {ast.dump(node)}")


def _term(coefficient: int, name: str) -> str:
    return {1: name, -1: f"-{name}"}.get(coefficient, f"{coefficient}*{name}")


def _equation_solution(metadata: Mapping[str, Any], verbose: bool) -> tuple[str, str] | None:
    """The left side is linear in the variable, ``a*x + b`` (sympy already multiplied it out when
    reasoning-gym printed it); None for a degenerate equation (it now and then emits ``0 = 0``)."""
    name = metadata["variable"]
    left_text, right_text = (side.strip() for side in metadata["equation"].split("="))
    left = ast.parse(left_text, mode="eval").body
    right = int(right_text)
    b = _evaluate(left, {name: 0})
    a = _evaluate(left, {name: 1}) - b
    if a == 0:
        return None
    assert _evaluate(left, {name: 2}) == 2 * a + b, metadata["equation"]
    lines = [f"We solve {left_text} = {right} for {name}."]
    rest = right - b
    if b > 0:
        lines.append(f"Subtract {b} from both sides: {_term(a, name)} = {right} - {b} = {rest}")
    elif b < 0:
        lines.append(f"Add {-b} to both sides: {_term(a, name)} = {right} + {-b} = {rest}")
    solution, remainder = divmod(rest, a)
    assert remainder == 0, metadata["equation"]
    if a != 1:
        lines.append(f"Divide both sides by {a}: {name} = {rest} / {_operand(a)} = {solution}")
    if verbose:
        substituted = re.sub(rf"\b{name}\b", f"({solution})", left_text)
        lines.append(f"Check: {substituted} = {_evaluate(left, {name: solution})}")
    lines.append(f"So {name} = {solution}.")
    return "\n".join(lines), str(solution)


def _gsm_solution(metadata: Mapping[str, Any], verbose: bool) -> tuple[str, str]:
    """reasoning-gym's worked solution minus its last line (``#### <answer>``, sometimes written
    as a float such as ``16.0``: the record keeps the task's answer string instead)."""
    cot = metadata["answer_cot"].strip()
    body, _, last = cot.rpartition("\n")
    assert last.startswith(ANSWER_MARK), last
    return body.strip(), last[len(ANSWER_MARK) :].strip()


PROBLEM_SIZES = ("short", "standard", "long")
"""Problem sizes of :func:`generate_records`: ``short`` (few, small operands: what a tiny model
learns in minutes), ``standard``, ``long`` (long chains, verbose steps: the second stage)."""


@dataclass(frozen=True)
class _TaskSpec:
    configs: dict[str, dict[str, Any]]
    """reasoning-gym configuration per problem size (:data:`PROBLEM_SIZES`)."""
    solve: Callable[[Mapping[str, Any], bool], tuple[str, str] | None]
    """metadata, verbose -> (solution text, the answer it reaches), or None to skip the problem."""


_TASKS: dict[str, _TaskSpec] = {
    "basic_arithmetic": _TaskSpec(
        {
            "short": dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1),
            "standard": dict(min_terms=2, max_terms=4, min_digits=1, max_digits=2),
            "long": dict(min_terms=4, max_terms=8, min_digits=1, max_digits=3),
        },
        _arithmetic_solution,
    ),
    "chain_sum": _TaskSpec(
        {
            "short": dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2),
            "standard": dict(min_terms=2, max_terms=5, min_digits=1, max_digits=2),
            "long": dict(min_terms=6, max_terms=12, min_digits=1, max_digits=3),
        },
        _arithmetic_solution,
    ),
    "simple_equations": _TaskSpec(
        {
            "short": dict(min_terms=2, max_terms=2, min_value=1, max_value=9),
            "standard": dict(min_terms=2, max_terms=3, min_value=1, max_value=20),
            "long": dict(min_terms=3, max_terms=5, min_value=1, max_value=50),
        },
        _equation_solution,
    ),
    "gsm_symbolic": _TaskSpec({size: {} for size in PROBLEM_SIZES}, _gsm_solution),
}
DEFAULT_TASKS: tuple[str, ...] = tuple(_TASKS)
QUICKSTART_TASKS: tuple[str, ...] = ("chain_sum", "simple_equations")
"""The tasks ``make quickstart`` trains and evaluates (short size): ones whose answers the
4.9M-parameter tiny model learns within its CPU budget (README, "Two commands")."""


def _solution_answer_matches(reached: str, answer: str) -> bool:
    try:
        return float(reached) == float(answer)
    except ValueError:
        return reached == answer


def generate_records(
    num_records: int,
    *,
    seed: int,
    tasks: Sequence[str] = DEFAULT_TASKS,
    size: str = "standard",
) -> list[ReasoningRecord]:
    """``num_records`` records with distinct questions, tasks drawn uniformly from ``tasks``.
    ``size`` (:data:`PROBLEM_SIZES`): ``long`` makes longer problems and more verbose steps (the
    second training stage's long chains), ``short`` fewer and smaller operands. Deterministic
    for ``(num_records, seed, tasks, size)``."""
    import reasoning_gym

    unknown = [t for t in tasks if t not in _TASKS]
    if unknown or not tasks:
        raise ValueError(f"tasks must be a non-empty subset of {list(_TASKS)}, got {list(tasks)}")
    if num_records < 0:
        raise ValueError(f"num_records must be >= 0, got {num_records}")
    if size not in PROBLEM_SIZES:
        raise ValueError(f"size must be one of {PROBLEM_SIZES}, got {size!r}")
    master = random.Random(seed)
    max_draws = 4 * num_records + 64  # per task; only small problem spaces come near it
    datasets = {}
    for task in tasks:
        spec = _TASKS[task]
        config = spec.configs[size]
        task_seed = master.randrange(2**31)
        datasets[task] = reasoning_gym.create_dataset(
            task, seed=task_seed, size=max_draws, **config
        )
    next_index = dict.fromkeys(tasks, 0)
    seen: set[str] = set()
    records: list[ReasoningRecord] = []
    while len(records) < num_records:
        task = master.choice(tasks)
        if next_index[task] >= max_draws:
            raise ValueError(
                f"task {task!r} repeats its questions too often to give {num_records} distinct "
                "records; add tasks or use a larger --problem-size"
            )
        entry = datasets[task][next_index[task]]
        next_index[task] += 1
        if entry["question"] in seen:
            continue
        seen.add(entry["question"])
        solved = _TASKS[task].solve(entry["metadata"], size == "long")
        if solved is None:
            continue
        solution, reached = solved
        assert _solution_answer_matches(reached, entry["answer"]), (task, entry, reached)
        records.append(ReasoningRecord(task, entry["question"], solution, entry["answer"]))
    return records
