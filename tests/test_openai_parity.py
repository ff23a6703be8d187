"""OpenAI parity, checked against the installed `openai` package's request types, through TestClient; numbers
are checked against the HF model computed here."""
from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient
from openai.types import completion_create_params as completion_params
from openai.types.chat import completion_create_params as chat_params

from app.server.main import create_app
from app.server.openai_schemas import ChatCompletionRequest, CompletionRequest
from test_http_api import make_settings
from test_tgi_parity import base_dir, hf, logits_of, reference_loop  # noqa: F401 - fixtures
from tolerances import ENGINE_VS_PEFT_LOGPROBS

PROMPT = "Return the number of items"


@pytest.fixture(scope="module")
def client(tmp_path_factory, base_dir):  # noqa: F811
    with TestClient(create_app(make_settings(tmp_path_factory.mktemp("srv"), base_dir))) as c:
        c.base_name = c.get("/v1/models").json()["data"][0]["id"]
        yield c


def complete(client, **body):
    body.setdefault("model", client.base_name)
    body.setdefault("temperature", 0)  # greedy: OpenAI's default temperature (1) samples
    body.setdefault("prompt", PROMPT)
    body.setdefault("max_tokens", 6)
    return client.post("/v1/completions", json=body)


def chat(client, **body):
    body.setdefault("model", client.base_name)
    body.setdefault("temperature", 0)  # greedy: OpenAI's default temperature (1) samples
    body.setdefault("messages", [{"role": "user", "content": "Open the file"}])
    body.setdefault("max_tokens", 6)
    return client.post("/v1/chat/completions", json=body)


def sse(client, path, body) -> list:
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        lines = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_request_models_know_every_field_of_the_openai_types():
    """Nothing the official client can send is unknown to us (so it is honoured or refused by name)."""
    for ours, theirs in ((CompletionRequest, completion_params.CompletionCreateParamsBase),
                         (ChatCompletionRequest, chat_params.CompletionCreateParamsBase)):
        assert set(theirs.__annotations__) | {"stream"} <= set(ours.model_fields), ours


@pytest.mark.parametrize("path, option, value", [
    ("/v1/completions", "suffix", "x"), ("/v1/completions", "logit_bias", {"5": 10}),
    ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
    ("/v1/chat/completions", "response_format", {"type": "json_object"}),
    ("/v1/chat/completions", "store", True), ("/v1/completions", "no_such_option", 1)])
def test_unknown_and_unhonoured_options_are_refused_by_name(client, path, option, value):
    send = complete if path == "/v1/completions" else chat
    r = send(client, **{option: value})
    assert r.status_code == 422 and option in str(r.json()["error"])


def test_neutral_values_of_unhonoured_options_are_accepted(client):
    assert chat(client, tools=[], tool_choice="none", store=False, response_format={"type": "text"},
                modalities=["text"], service_tier="auto", parallel_tool_calls=True, user="u").status_code == 200
    assert complete(client, suffix=None, logit_bias={}, user="u", best_of=1).status_code == 200


def test_completion_logprobs_match_the_model(client, hf):  # noqa: F811
    model, tok = hf
    ids = tok(PROMPT)["input_ids"]
    choice = complete(client, logprobs=3, temperature=0).json()["choices"][0]
    generated = reference_loop(model, ids, 6, lambda lg, _: lg.argmax())
    lp = torch.log_softmax(logits_of(model, ids + generated), dim=-1)[len(ids) - 1:-1]  # (6, V)
    got = choice["logprobs"]
    assert got["token_logprobs"] == pytest.approx([lp[i, t].item() for i, t in enumerate(generated)], abs=ENGINE_VS_PEFT_LOGPROBS)
    assert got["tokens"] == [tok.decode([t]) for t in generated]
    for i, top in enumerate(got["top_logprobs"]):
        values, best = torch.topk(lp[i], 3)
        # keyed by token text: tokens that decode alike (partial UTF-8 bytes) share one key
        assert 1 <= len(top) <= 3 and max(top.values()) == pytest.approx(values[0].item(), abs=ENGINE_VS_PEFT_LOGPROBS)
        assert all(min(abs(v - values).tolist()) < ENGINE_VS_PEFT_LOGPROBS for v in top.values())
    assert got["text_offset"][0] == 0 and got["text_offset"] == sorted(got["text_offset"])


def test_echo_with_logprobs_gives_the_prompts_logprobs(client, hf):  # noqa: F811
    model, tok = hf
    ids = tok(PROMPT)["input_ids"]
    choice = complete(client, echo=True, logprobs=0, max_tokens=2).json()["choices"][0]
    assert choice["text"].startswith(PROMPT)
    lp = torch.log_softmax(logits_of(model, ids), dim=-1)
    got = choice["logprobs"]["token_logprobs"]
    assert got[0] is None and len(got) == len(ids) + 2
    assert got[1:len(ids)] == pytest.approx([lp[t - 1, ids[t]].item() for t in range(1, len(ids))], abs=ENGINE_VS_PEFT_LOGPROBS)


def test_chat_logprobs_and_top_logprobs(client):
    body = chat(client, logprobs=True, top_logprobs=2).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] == 6
    partial = 0
    for entry in content:
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"])  # greedy: the top one
        assert len(entry["top_logprobs"]) == 2
        try:
            assert bytes(entry["bytes"]).decode() == entry["token"]
        except UnicodeDecodeError:  # part of a character: the token decodes alone to U+FFFD, its bytes are exact
            partial += 1
            assert "\ufffd" in entry["token"]
    assert partial  # this tiny model's output has such tokens: the case is exercised
    # OpenAI's `bytes` are there to join: all tokens' bytes give the message's text back
    joined = b"".join(bytes(entry["bytes"]) for entry in content)
    assert joined.decode("utf-8", errors="replace") == body["choices"][0]["message"]["content"]
    assert chat(client, top_logprobs=2).status_code == 422  # needs logprobs: true


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_stream_include_usage_and_logprobs(client, path):
    send = complete if path == "/v1/completions" else chat
    whole = send(client).json()
    base = {"model": client.base_name, "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    base.update({"prompt": PROMPT} if path == "/v1/completions" else
                {"messages": [{"role": "user", "content": "Open the file"}]})
    chunks = sse(client, path, base)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])
    with_lp = sse(client, path, {**base, "logprobs": 1 if path == "/v1/completions" else True})
    if path == "/v1/completions":
        streamed = [lp for c in with_lp[:-1] for lp in c["choices"][0]["logprobs"]["token_logprobs"]]
        expected = complete(client, logprobs=1).json()["choices"][0]["logprobs"]["token_logprobs"]
    else:
        streamed = [e["logprob"] for c in with_lp[:-1] for e in c["choices"][0]["logprobs"]["content"]]
        expected = [e["logprob"] for e in chat(client, logprobs=True).json()["choices"][0]["logprobs"]["content"]]
    assert streamed == pytest.approx(expected, abs=1e-6)


def test_n_list_and_token_id_prompts(client, hf):  # noqa: F811
    _, tok = hf
    one = [complete(client, prompt=p).json()["choices"][0]["text"] for p in ("Return the", "Open the file")]
    body = complete(client, prompt=["Return the", "Open the file"], n=2).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == [one[0], one[0], one[1], one[1]]
    assert body["usage"]["completion_tokens"] == 24
    ids = tok("Return the")["input_ids"]
    assert complete(client, prompt=ids).json()["choices"][0]["text"] == one[0]
    assert complete(client, prompt=[ids, ids]).json()["choices"][1]["text"] == one[0]
    sampled = complete(client, n=2, temperature=1.0, top_p=0.9, seed=11).json()["choices"]
    for j, c in enumerate(sampled):  # choice j of a seeded request = the request with seed + j
        alone = complete(client, temperature=1.0, top_p=0.9, seed=11 + j).json()["choices"][0]["text"]
        assert c["text"] == alone
    chats = chat(client, n=3).json()["choices"]
    assert [c["index"] for c in chats] == [0, 1, 2] and len({c["message"]["content"] for c in chats}) == 1
    streamed = sse(client, "/v1/chat/completions", {"model": client.base_name, "max_tokens": 6, "n": 2,
                                                    "temperature": 0, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    texts = ["".join(c["choices"][0]["delta"]["content"] for c in streamed if c["choices"][0]["index"] == i)
             for i in range(2)]
    assert texts == [chat(client, messages=[{"role": "user", "content": "hi"}]).json()["choices"][0]["message"]
                     ["content"]] * 2


def test_best_of_keeps_the_most_likely(client):
    body = complete(client, n=1, best_of=3, temperature=1.5, logprobs=0).json()
    shown = len(body["choices"][0]["logprobs"]["tokens"])  # a sampled sequence may end early on EOS
    assert len(body["choices"]) == 1 and shown + 2 <= body["usage"]["completion_tokens"] <= 18  # all 3 counted
    assert complete(client, n=2, best_of=1).status_code == 422


def test_penalties_are_applied(client, hf):  # noqa: F811
    model, tok = hf
    ids = tok(PROMPT)["input_ids"]

    def penalised(logits, generated):
        counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=logits.shape[0])
        return (logits + 1.0 * counts + 0.5 * (counts > 0)).argmax()

    text = complete(client, max_tokens=12, frequency_penalty=-1.0, presence_penalty=-0.5).json()["choices"][0]["text"]
    assert text == tok.decode(reference_loop(model, ids, 12, penalised))


def test_models_by_id(client):
    assert client.get(f"/v1/models/{client.base_name}").json()["id"] == client.base_name
    r = client.get("/v1/models/nope")
    assert r.status_code == 404 and "nope" in str(r.json()["error"])


def test_default_temperature_samples_like_tgi_with_temperature_one(client):
    """OpenAI's temperature defaults to 1 and samples (as vLLM and TGI's /v1 routes do); only 0 is greedy. With a
    seed, an OpenAI completion that leaves temperature out (or sends 1) draws the same tokens as TGI's
    /generate with do_sample, temperature 1 and that seed; other seeds draw other tokens."""
    def openai_text(seed, **extra):
        body = {"model": client.base_name, "prompt": PROMPT, "max_tokens": 12, "seed": seed, **extra}
        return client.post("/v1/completions", json=body).json()["choices"][0]["text"]

    def tgi_text(seed):
        params = {"do_sample": True, "temperature": 1.0, "seed": seed, "max_new_tokens": 12}
        return client.post("/generate", json={"inputs": PROMPT, "parameters": params}).json()["generated_text"]

    greedy = complete(client, max_tokens=12).json()["choices"][0]["text"]
    sampled = {seed: openai_text(seed) for seed in (1, 2, 3)}
    assert sampled[1] == tgi_text(1) == openai_text(1, temperature=1.0)
    assert len(set(sampled.values())) > 1 and greedy not in sampled.values()
