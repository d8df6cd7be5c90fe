"""The OpenAI-compatible server (``tools/serve.py``, ``megatron_elastic/serving/api.py``): every
endpoint; greedy completions equal ``cached_generate`` at every budget; streaming equals
non-streaming; two budgets interleaved in concurrent requests (batched per budget) give the
tokens of sequential ``cached_generate``; echo log-probabilities equal the elastic model's own
log-softmax; stop strings; OpenAI error objects for bad requests; the real server process
answers and exits 0 on SIGTERM while a request is in flight."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from megatron_elastic.data.reasoning import generate_records, render_text
from megatron_elastic.data.tokenizers import train_bpe_tokenizer
from megatron_elastic.serving import SamplingConfig, cached_generate
from megatron_elastic.serving.api import create_app, load_models
from megatron_elastic.training.lm_step import position_ids_like

ROOT = Path(__file__).parents[2]
BUDGETS = ["elastic@full", "elastic@75%", "elastic@50%", "elastic@0.6"]
PROMPTS = ["Question: What is 3 + 4?\nAnswer:", "The sum of", "x = 12; y ="]
NEW = 10
# The server's log-probabilities come from the cached path (chunked scan, batched rows), the
# reference from the elastic model's own forward: summation order only. Measured worst 3.5e-7
# (prompt and generated tokens, 75% budget); test_serving.py's logits bound.
LOGPROB_TOL = 3e-6
TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer with a chat template next to it."""
    directory = tmp_path_factory.mktemp("serve_tok")
    train_bpe_tokenizer(
        [render_text(r) for r in generate_records(30, seed=3)], 300, directory / "tokenizer.json"
    )
    (directory / "chat_template.jinja").write_text(TEMPLATE)
    return directory


@pytest.fixture(scope="module")
def models(perturbed_checkpoint, tokenizer_dir, pgs):
    return load_models(perturbed_checkpoint[0], pgs, interpolate=[0.6], tokenizer=tokenizer_dir)


@pytest.fixture(scope="module")
def client(models):
    app = create_app(models, batch_window_s=0.3)
    with TestClient(app) as c:
        yield c


def _generated(models, model: str, text: str, max_new_tokens: int = NEW, **sampling) -> list[int]:
    """The tokens cached_generate gives for one prompt alone at the model's budget."""
    tok = models.tokenizer
    out = cached_generate(
        models.session.net(models.budgets[model]),
        [tok.encode(text)],
        max_new_tokens=max_new_tokens,
        eos_id=tok.eod,
        vocab_size=tok.vocab_size,
        sampling=SamplingConfig(**sampling) if sampling else None,
    )
    return out.tokens[0]


def _expected(models, model: str, text: str, **sampling) -> str:
    return models.tokenizer.decode(_generated(models, model, text, **sampling))


def _complete(client, **body) -> dict:
    response = client.post("/v1/completions", json={"max_tokens": NEW, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


def _stream(client, path: str, body: dict) -> list[dict]:
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_models_and_health(client, models) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    listed = client.get("/v1/models").json()
    assert [m["id"] for m in listed["data"]] == BUDGETS
    params = [m["params"] for m in listed["data"]]
    assert params[0] > params[1] > params[3] > params[2]  # 0.6 lies between 75% and 50%
    card = client.get("/v1/models/elastic@75%").json()
    assert card["budget"] == "75%" and card["params"] == params[1] and not card["interpolated"]


@pytest.mark.parametrize("model", BUDGETS)
def test_invariant_greedy_completion_equals_cached_generate(client, models, model) -> None:
    body = _complete(client, model=model, prompt=PROMPTS)
    assert [c["text"] for c in body["choices"]] == [_expected(models, model, p) for p in PROMPTS]
    assert body["object"] == "text_completion" and body["model"] == model
    assert body["usage"]["prompt_tokens"] == sum(len(models.tokenizer.encode(p)) for p in PROMPTS)


def test_budgets_decode_from_the_one_loaded_copy_of_the_weights(client, models) -> None:
    """Every served budget's network is held at once (interleaved requests rebuild nothing), the
    full budget's tensors are all views of the loaded parameters, and a smaller budget copies
    only its non-contiguous slices (its embedding is a view too)."""
    parent = models.checkpoint.model.parameters()
    storages = {p.untyped_storage().data_ptr() for p in parent}
    for name, budget in models.budgets.items():
        net = models.session.net(budget)
        tensors = [net.embedding, net.final_norm, net.output]
        tensors += [t for layer in net.layers for t in layer.weights.values()]
        size = [t.numel() * t.element_size() for t in tensors]
        copied = sum(
            n
            for t, n in zip(tensors, size, strict=True)
            if t.untyped_storage().data_ptr() not in storages
        )
        assert net.embedding.untyped_storage().data_ptr() in storages, name
        assert copied == 0 if budget == "full" else 0 < copied < sum(size), name
    assert len(models.session._nets) == len(models.budgets)


def test_seeded_sampling_equals_cached_generate_alone(client, models) -> None:
    body = _complete(client, model="elastic@75%", prompt=PROMPTS[0], temperature=1.3, seed=11)
    assert body["choices"][0]["text"] == _expected(
        models, "elastic@75%", PROMPTS[0], temperature=1.3, seed=11
    )


def test_streaming_equals_non_streaming(client) -> None:
    """Streamed chunks add up to the whole response: text, finish reason, usage and every
    log-probability field (tokens, text offsets continuing across chunks, with and without the
    echoed prompt)."""
    sampled = {"temperature": 1.0, "seed": 5, "logprobs": 2}
    for extra in ({"temperature": 0}, sampled, {**sampled, "echo": True}):
        body = {"model": "elastic@50%", "prompt": PROMPTS[:2], "max_tokens": NEW, **extra}
        whole = _complete(client, **body)
        chunks = _stream(
            client, "/v1/completions", {**body, "stream_options": {"include_usage": True}}
        )
        for i, choice in enumerate(whole["choices"]):
            mine = [
                c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == i
            ]
            assert "".join(c["text"] for c in mine) == choice["text"]
            assert mine[-1]["finish_reason"] == choice["finish_reason"]
            if "logprobs" in extra:
                for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    streamed = [v for c in mine if c["logprobs"] for v in c["logprobs"][key]]
                    assert streamed == choice["logprobs"][key], key
        assert chunks[-1]["usage"] == whole["usage"]
    chat = {
        "model": "elastic@full",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": NEW,
        "temperature": 0,
    }
    whole = client.post("/v1/chat/completions", json=chat).json()
    chunks = _stream(client, "/v1/chat/completions", chat)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]


def test_invariant_concurrent_budgets_batched_equal_sequential(models) -> None:
    """Six requests, two budgets interleaved, sent at once: each budget's three run as one batch
    (a batch closes when full, so the long window only bounds a stalled machine) and every
    completion equals cached_generate of its prompt alone."""
    jobs = [(m, p) for p in PROMPTS for m in ("elastic@full", "elastic@50%")]
    results: dict[int, str] = {}
    with TestClient(create_app(models, batch_window_s=10.0, max_batch=3)) as client:

        def ask(i: int) -> None:
            model, prompt = jobs[i]
            results[i] = _complete(client, model=model, prompt=prompt)["choices"][0]["text"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        batches = client.app.state.scheduler.batches
    assert [results.get(i) for i in range(len(jobs))] == [_expected(models, m, p) for m, p in jobs]
    assert sorted((str(b.budget), b.rows) for b in batches) == [("50%", 3), ("full", 3)]


def test_invariant_echo_logprobs_equal_model_log_softmax(client, models) -> None:
    """echo + max_tokens (0 and 4): every token's log-probability, prompt and generated, equals
    the elastic model's log-softmax over the whole sequence at that budget (slice mode, no
    cache), and the top ones are its largest."""
    ckpt, tok = models.checkpoint, models.tokenizer
    for max_tokens in (0, 4):
        body = _complete(
            client,
            model="elastic@75%",
            prompt=PROMPTS[0],
            echo=True,
            logprobs=3,
            max_tokens=max_tokens,
        )
        choice = body["choices"][0]
        assert choice["text"].startswith(PROMPTS[0])
        lp = choice["logprobs"]
        ids = tok.encode(PROMPTS[0]) + _generated(models, "elastic@75%", PROMPTS[0], max_tokens)
        assert lp["tokens"] == [tok.decode([i]) for i in ids] and lp["token_logprobs"][0] is None
        ckpt.set_budget("75%")
        try:
            tokens = torch.tensor([ids])
            with torch.no_grad():
                logits = ckpt.model(tokens, position_ids_like(tokens), None)[0, :, : tok.vocab_size]
        finally:
            ckpt.model.set_subnet(None)
        direct = torch.log_softmax(logits.double(), -1)
        want = direct[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        got = torch.tensor(lp["token_logprobs"][1:], dtype=torch.float64)
        assert (got - want).abs().max().item() < LOGPROB_TOL
        values, best = direct[:-1].topk(3, -1)
        for j, top in enumerate(lp["top_logprobs"][1:]):
            # the 3 most likely tokens and the chosen one, by text (the first of equal texts)
            want_top: dict[str, float] = {}
            for t, v in [
                *zip(best[j].tolist(), values[j].tolist(), strict=True),
                (ids[j + 1], want[j].item()),
            ]:
                want_top.setdefault(tok.decode([t]), v)
            assert top.keys() == want_top.keys()
            assert list(top.values()) == pytest.approx(list(want_top.values()), abs=LOGPROB_TOL)
        assert len(ids) == len(tok.encode(PROMPTS[0])) + max_tokens


def test_stop_strings_end_the_completion(client, models) -> None:
    full = _expected(models, "elastic@full", PROMPTS[1])
    stop = full[3:5]
    assert stop and full.find(stop) == 3, full
    body = _complete(client, model="elastic@full", prompt=PROMPTS[1], stop=[stop, "never"])
    assert body["choices"][0] == {**body["choices"][0], "text": full[:3], "finish_reason": "stop"}
    chunks = _stream(
        client,
        "/v1/completions",
        {
            "model": "elastic@full",
            "prompt": PROMPTS[1],
            "stop": stop,
            "max_tokens": NEW,
            "temperature": 0,
        },
    )
    assert "".join(c["choices"][0]["text"] for c in chunks) == full[:3]
    length = _complete(client, model="elastic@full", prompt=PROMPTS[1], max_tokens=2)
    assert length["choices"][0]["finish_reason"] == "length"
    # max_tokens null: up to the context (3 tokens after a prompt 3 short of it)
    near = [5] * (models.max_sequence_length - 3)
    unlimited = _complete(client, model="elastic@full", prompt=near, max_tokens=None)
    assert unlimited["usage"]["completion_tokens"] == 3


def test_chat_completion_uses_the_template(client, models) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    body = client.post(
        "/v1/chat/completions",
        json={
            "model": "elastic@50%",
            "messages": messages,
            "max_tokens": NEW,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 2,
        },
    ).json()
    rendered = "<|system|>Be brief.\n<|user|>2+2?\n<|assistant|>"
    choice = body["choices"][0]
    assert choice["message"]["content"] == _expected(models, "elastic@50%", rendered)
    assert len(choice["logprobs"]["content"]) == body["usage"]["completion_tokens"]
    assert all(len(t["top_logprobs"]) == 2 for t in choice["logprobs"]["content"])


def test_budget_schedule_equals_scheduled_generate(client, models) -> None:
    """A request whose thinking runs at 50% and answer at full (budget_schedule) gives the text
    scheduled_generate gives by hand; the marker is text the 50% budget writes after 3 tokens, so
    the answer phase runs; bad schedules get error objects."""
    from megatron_elastic.serving.schedule import BudgetSchedule, scheduled_generate

    tok, prompt = models.tokenizer, "Question: 7 + 5 = ?\nAnswer:"
    marker = tok.decode(_generated(models, "elastic@50%", prompt)[:3])
    phases = {"think": "elastic@50%", "answer": "elastic@full", "marker": marker}
    got = _complete(client, model="elastic@full", prompt=prompt, budget_schedule=phases)
    by_hand = scheduled_generate(
        models.session,
        BudgetSchedule("50%", "full", marker=marker),
        [tok.encode(prompt)],
        decode=tok.decode,
        max_new_tokens=NEW,
        eos_id=tok.eod,
        vocab_size=tok.vocab_size,
    )
    assert 0 < by_hand.thinking[0] < len(by_hand.generation.tokens[0])  # both phases ran
    assert got["choices"][0]["text"] == tok.decode(by_hand.generation.tokens[0])
    assert got["choices"][0]["text"] != _expected(models, "elastic@50%", prompt)
    post = lambda **b: client.post(
        "/v1/completions",
        json={"model": "elastic@full", "prompt": prompt, "temperature": 0, **b},
    )
    _error(post(budget_schedule={"think": "elastic@50%"}), 400, "budget_schedule")
    _error(
        post(budget_schedule={**phases, "think": "elastic@3%"}),
        404,
        "budget_schedule.think",
        "model_not_found",
    )
    _error(post(budget_schedule=phases, temperature=0.5), 400, "temperature")
    _error(post(budget_schedule=phases, logprobs=1), 400, "logprobs")
    _error(post(budget_schedule={**phases, "marker": ""}), 400, "budget_schedule.marker")


def _error(response, status: int, param: str | None, code: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert error["code"] == code and error["message"]
    return error["message"]


def test_bad_requests_get_error_objects(client, models) -> None:
    ok = {"model": "elastic@full", "prompt": "hi", "max_tokens": 2}
    post = lambda **b: client.post("/v1/completions", json={**ok, **b})
    assert "elastic@full" in _error(post(model="elastic@7%"), 404, "model", "model_not_found")
    assert _error(client.get("/v1/models/nope"), 404, "model", "model_not_found")
    long = "1 " * models.max_sequence_length
    assert "max_sequence_length" in _error(
        post(prompt=long), 400, "prompt", "context_length_exceeded"
    )
    _error(post(max_tokens=models.max_sequence_length), 400, "prompt", "context_length_exceeded")
    _error(post(temperature=-1), 400, "temperature")
    assert "n=1" in _error(post(n=2), 400, "n")
    _error(post(top_p=0), 400, "top_p")
    _error(post(logprobs=99), 400, "logprobs")
    _error(post(prompt=[5, 10_000]), 400, "prompt")
    _error(post(prompt=""), 400, "prompt")
    _error(client.post("/v1/completions", json={"prompt": "hi"}), 400, "model")
    bad_json = client.post(
        "/v1/completions", content=b"{", headers={"content-type": "application/json"}
    )
    assert bad_json.status_code == 400 and "error" in bad_json.json()
    chat = {"model": "elastic@full", "messages": [{"role": "user", "content": "hi"}]}
    _error(client.post("/v1/chat/completions", json={**chat, "messages": []}), 400, "messages")
    _error(
        client.post("/v1/chat/completions", json={**chat, "top_logprobs": 2}), 400, "top_logprobs"
    )
    assert client.get("/v1/nothing").status_code == 404
    assert _complete(client, **ok)["choices"][0]["finish_reason"] == "length"  # still serving


def test_no_chat_template_is_an_error_object(models) -> None:
    template = models._template
    models._template = None
    try:
        app = create_app(models)
        with TestClient(app) as c:
            response = c.post(
                "/v1/chat/completions",
                json={"model": "elastic@full", "messages": [{"role": "user", "content": "hi"}]},
            )
        assert "chat template" in _error(response, 400, "messages", "no_chat_template")
    finally:
        models._template = template


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_server_process_serves_and_exits_0_on_sigterm(perturbed_checkpoint, tokenizer_dir) -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = [
        sys.executable,
        str(ROOT / "tools" / "serve.py"),
        "--checkpoint",
        str(perturbed_checkpoint[0]),
    ]
    args += ["--tokenizer", str(tokenizer_dir), "--port", str(port)]
    start = time.monotonic()
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() - start < 60, "the server did not start within 60 s"
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        print(f"server ready in {time.monotonic() - start:.1f} s")
        with urllib.request.urlopen(f"{base}/v1/models", timeout=10) as r:
            assert [m["id"] for m in json.load(r)["data"]] == BUDGETS[:3]
        body = {
            "model": "elastic@50%",
            "prompt": PROMPTS[0],
            "max_tokens": 200,
            "temperature": 0,
            "stream": True,
        }
        request = urllib.request.Request(
            f"{base}/v1/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as stream:
            first = stream.readline()
            assert first.startswith(b"data: {")
            proc.send_signal(signal.SIGTERM)  # in flight: the stream is finished, then exit
            rest = stream.read().decode()
        assert rest.rstrip().endswith("data: [DONE]")
        assert proc.wait(timeout=60) == 0
        out = proc.stdout.read()
        assert "server stopped" in out, out
    finally:
        if proc.poll() is None:
            proc.kill()


def test_tool_refuses_bad_options_before_loading(perturbed_checkpoint, capsys) -> None:
    from megatron_elastic.serving.api_models import check_checkpoint

    spec = importlib.util.spec_from_file_location("serve_tool", ROOT / "tools" / "serve.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    path = str(perturbed_checkpoint[0])
    assert tool.main(["--checkpoint", path, "--port", "0"]) == 2
    assert capsys.readouterr().err == "error: --port must be in 1..65535, got 0\n"
    assert tool.main(["--checkpoint", path, "--interpolate", "0.1"]) == 2
    assert "outside the trained range" in capsys.readouterr().err
    with pytest.raises(ValueError, match="outside the trained range"):
        check_checkpoint(path, [0.6, 1.5])
