"""lm-evaluation-harness as the real client of our budgets: the local tasks that
``tools/make_lm_eval_tasks.py`` writes, run by lm-eval's own ``hf`` model on an exported Hugging
Face directory, and by its ``local-completions`` model against ``tools/serve.py``'s server (no
tokenizer of its own: text prompts, and the server's tokenizer endpoints for log-likelihoods),
give per problem the completions and the accuracy that ``evaluate.py``'s code gives on the
elastic model at that budget, and the answer log-likelihoods we compute directly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_elastic.data.reasoning import ReasoningRecord, generate_records, render_text
from megatron_elastic.data.tokenizers import train_bpe_tokenizer
from megatron_elastic.eval import model_completer, reasoning_accuracy
from megatron_elastic.eval.lm_eval_tasks import (
    GENERATE_TASK,
    LOGLIK_TASK,
    PROBLEMS,
    write_lm_eval_tasks,
)
from megatron_elastic.export.hf import export_subnet_to_hf
from megatron_elastic.training.lm_step import position_ids_like

ROOT = Path(__file__).parents[2]
NUM_PROBLEMS, NEW_TOKENS, SEED = 4, 8, 20250
BUDGET = "50%"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval_tok")
    texts = [render_text(r) for r in generate_records(60, seed=7)]
    return root / "tokenizer.json", train_bpe_tokenizer(texts, 400, root / "tokenizer.json")


def _lm_eval(directory: Path, tasks_dir: Path, tasks: list[str]) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from megatron_elastic.platform import use_torch_nemotron_h_kernels

    use_torch_nemotron_h_kernels()  # CPU: transformers' torch Mamba path, as our own loader does

    return lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={directory},dtype=float32,device=cpu",
        tasks=tasks,
        task_manager=TaskManager(include_path=str(tasks_dir)),
        batch_size=1,
        log_samples=True,
    )


@pytest.fixture(scope="module")
def model(tokenizer, perturbed_checkpoint, pgs):
    """The tiny elastic model with the tokenizer's vocabulary (a padded vocabulary lets random
    weights pick ids the tokenizer cannot decode: ``evaluate.py`` never picks them, stock
    ``generate`` does), norms and biases off their init values; and the 50% spec of the
    perturbed checkpoint's trained router."""
    import dataclasses

    from megatron_elastic.elastic import build_elastic_model, load_elastic_recipe

    _, tok = tokenizer
    model_cfg, elastic = load_elastic_recipe(ROOT / "examples" / "tiny" / "elastic.yaml")
    torch.manual_seed(11)
    net = build_elastic_model(
        dataclasses.replace(model_cfg, vocab_size=tok.vocab_size), elastic, pgs
    )
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(("norm.weight", ".D")):
                p.uniform_(0.5, 1.5)
            elif name.endswith(("dt_bias", "conv1d_bias")):
                p.add_(torch.randn_like(p) * 0.5)
    _, _, router = perturbed_checkpoint
    return net, router.decide(BUDGET, 0, None, deterministic=True).spec


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """The tasks folder ``make_lm_eval_tasks.py`` writes, and its problems' rows."""
    tasks_dir = write_lm_eval_tasks(
        str(tmp_path_factory.mktemp("lm_eval_tasks")),
        num_problems=NUM_PROBLEMS,
        problem_seed=SEED,
        max_new_tokens=NEW_TOKENS,
    )
    rows = [json.loads(line) for line in (tasks_dir / PROBLEMS).read_text().splitlines()]
    return tasks_dir, rows


@pytest.fixture(autouse=True)
def _offline(monkeypatch) -> None:
    """Local files only: lm-eval's datasets never reach a hub."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_invariant_lm_eval_on_an_hf_export_equals_evaluate_on_the_elastic_budget(
    model, tokenizer, tasks, tmp_path
) -> None:
    tasks_dir, rows = tasks
    tok_path, tok = tokenizer
    model, spec = model
    export_subnet_to_hf(model, spec, tmp_path / "hf", tokenizer_path=tok_path)
    problems = [ReasoningRecord.from_json(r) for r in rows]
    assert problems == generate_records(NUM_PROBLEMS, seed=SEED)  # evaluate.py's problems

    results = _lm_eval(tmp_path / "hf", tasks_dir, [GENERATE_TASK, LOGLIK_TASK])
    texts, accuracy, logliks = _reference(model, spec, tok, rows)

    samples = sorted(results["samples"][GENERATE_TASK], key=lambda s: s["doc_id"])
    # evaluate.py judges the text before "\nQuestion:" (completion_answer): _reference cuts there
    assert [s["resps"][0][0] for s in samples] == texts and all(texts)
    em = results["results"][GENERATE_TASK]["exact_match,none"]
    assert em == pytest.approx(accuracy)
    ll_samples = sorted(results["samples"][LOGLIK_TASK], key=lambda s: s["doc_id"])
    theirs_ll = [s["resps"][0][0][0] for s in ll_samples]
    worst = max(abs(a / b - 1) for a, b in zip(theirs_ll, logliks, strict=True))
    print(f"answer log-likelihoods: lm-eval (hf) vs elastic, worst rel diff {worst:.2e}")
    assert theirs_ll == pytest.approx(logliks, rel=3e-7)  # measured 1.05e-7


def _reference(model, spec, tok, rows):
    """evaluate.py's completions and accuracy, and the answers' log-likelihoods, on the elastic
    ``model`` at ``spec``."""
    problems = [ReasoningRecord.from_json(r) for r in rows]
    model.set_subnet(spec, mode="slice")
    try:
        complete = model_completer(model, tok, max_new_tokens=NEW_TOKENS)
        texts = complete([r["prompt"] for r in rows])
        accuracy = reasoning_accuracy(problems, complete)
        logliks = []
        with torch.no_grad():
            for r in rows:
                context = tok.encode(f"{r['prompt']} {r['solution']}\n####")
                target = tok.encode(f"{r['prompt']} {r['solution']}\n#### {r['answer']}")
                assert target[: len(context)] == context
                ids = torch.tensor([target])
                logits = model(ids, position_ids_like(ids), None)[0].float()
                logp = torch.log_softmax(logits[:-1, : tok.vocab_size], -1)
                cont = ids[0, len(context) :]
                logliks.append(float(logp[len(context) - 1 :].gather(-1, cont[:, None]).sum()))
    finally:
        model.set_subnet(None)
    return [t.split("\nQuestion:", 1)[0] for t in texts], accuracy.accuracy, logliks


def test_invariant_lm_eval_against_the_server_equals_evaluate_on_the_elastic_budget(
    perturbed_checkpoint, tokenizer, tasks, pgs
) -> None:
    import socket
    import threading
    import time

    import lm_eval
    import uvicorn
    from lm_eval.tasks import TaskManager

    from megatron_elastic.serving.api import create_app, load_models

    tok_path, tok = tokenizer
    tasks_dir, rows = tasks
    path, model, router = perturbed_checkpoint
    spec = router.decide(BUDGET, 0, None, deterministic=True).spec
    texts, accuracy, logliks = _reference(model, spec, tok, rows)

    models = load_models(path, pgs, tokenizer=tok_path.parent)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(models), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the server did not start"
    url = f"http://127.0.0.1:{port}/v1/completions"
    common = f"base_url={url},model=elastic@{BUDGET},num_concurrent=1,max_retries=1"
    manager = TaskManager(include_path=str(tasks_dir))
    try:
        generated = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=f"{common},tokenizer_backend=None,tokenized_requests=False",
            tasks=[GENERATE_TASK],
            task_manager=manager,
            log_samples=True,
        )
        scored = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=f"{common},tokenizer_backend=remote",
            tasks=[LOGLIK_TASK],
            task_manager=manager,
            log_samples=True,
        )
    finally:
        server.should_exit = True
        thread.join(timeout=30)

    samples = sorted(generated["samples"][GENERATE_TASK], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in samples] == texts and all(texts)
    em = generated["results"][GENERATE_TASK]["exact_match,none"]
    assert em == pytest.approx(accuracy)
    ll_samples = sorted(scored["samples"][LOGLIK_TASK], key=lambda s: s["doc_id"])
    theirs = [s["resps"][0][0][0] for s in ll_samples]
    worst = max(abs(a / b - 1) for a, b in zip(theirs, logliks, strict=True))
    print(f"answer log-likelihoods: lm-eval (server) vs elastic, worst rel diff {worst:.2e}")
    assert theirs == pytest.approx(logliks, rel=3e-7)
