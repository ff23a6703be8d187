"""Log-probabilities on every route are finite or null and valid JSON, whatever the sampling masks: every body and
every SSE event is parsed with a strict parser (NaN/Infinity refused), and the top-n alternatives are those of the
distribution the token was drawn from (never the -inf of a token top-k/top-p/typical-p masked out)."""
from __future__ import annotations

import json
import math

import pytest
from fastapi.testclient import TestClient

from app.engine.sampling import drawable_top
from app.server.main import create_app
from test_http_api import base_dir, make_settings  # noqa: F401 - base_dir is a fixture

PROMPT = "Return the number of items"
MASKS = [{"top_p": 0.5}, {"top_p": 0.5, "temperature": 0.05}, {"top_k": 2}, {"typical_p": 0.5},
         {"temperature": 0.3}, {"temperature": 2.0}, {"top_k": 3, "top_p": 0.9, "temperature": 0.7}]
N_TOP = 5  # more alternatives than top_k lets through


def _refuse_constant(name: str):
    raise ValueError(f"non-JSON constant {name} in a response")


def strict_json(text: str):
    return json.loads(text, parse_constant=_refuse_constant)


def sse_events(text: str) -> list:
    """Every `data:` payload of an SSE body, strictly parsed ([DONE] left out)."""
    events = []
    for line in text.splitlines():
        if line.startswith("data:"):
            payload = line[len("data:"):].strip()
            if payload != "[DONE]":
                events.append(strict_json(payload))
    assert events, text
    return events


def _numbers(obj, key: str):
    """Every value under `key`, anywhere in obj."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key:
                yield v
            yield from _numbers(v, key)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v, key)


def _check(obj) -> None:
    assert "error" not in obj, obj
    for value in _numbers(obj, "logprob"):
        assert value is None or math.isfinite(value), obj
    for top in _numbers(obj, "top_logprobs"):  # completions: [{text: lp}] / chat: [{token, logprob, bytes}]
        for entry in top if isinstance(top, list) else []:
            values = entry.values() if isinstance(entry, dict) and "token" not in entry else []
            assert all(v is None or math.isfinite(v) for v in values), obj


@pytest.fixture(scope="module")
def client(tmp_path_factory, base_dir):
    settings = make_settings(tmp_path_factory.mktemp("srv"), base_dir)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize("mask", MASKS, ids=[json.dumps(m) for m in MASKS])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_tgi_routes_strict_json(client, mask, stream):
    params = {"max_new_tokens": 3, "details": True, "top_n_tokens": N_TOP, "return_k_alternatives": N_TOP,
              "do_sample": True, "seed": 7, **mask}
    if not stream:
        params["decoder_input_details"] = True
    for path, body in (("/generate_stream" if stream else "/generate", {"inputs": PROMPT, "parameters": params}),
                       ("/", {"inputs": PROMPT, "parameters": params, "stream": stream})):
        r = client.post(path, json=body)
        assert r.status_code == 200, r.text
        for obj in sse_events(r.text) if stream else [strict_json(r.text)]:
            _check(obj if isinstance(obj, dict) else obj[0])


@pytest.mark.parametrize("mask", MASKS, ids=[json.dumps(m) for m in MASKS])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_openai_routes_strict_json(client, mask, stream):
    openai_mask = {k: v for k, v in mask.items() if k in ("top_p", "temperature")} or {"top_p": 0.3, "temperature": 0.1}
    common = {"model": "base", "max_tokens": 3, "seed": 7, "stream": stream, "n": 2, **openai_mask}
    requests = [("/v1/completions", {"prompt": PROMPT, "logprobs": N_TOP, **common}),
                ("/v1/completions", {"prompt": PROMPT, "logprobs": N_TOP, "echo": not stream, **common}),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}], "logprobs": True,
                                          "top_logprobs": N_TOP, **common})]
    for path, body in requests:
        r = client.post(path, json=body)
        assert r.status_code == 200, r.text
        for obj in sse_events(r.text) if stream else [strict_json(r.text)]:
            _check(obj)


def test_alternatives_are_the_drawn_distribution(client):
    """top_k=2 with 5 alternatives asked: exactly the 2 tokens the draw could produce, their probabilities summing
    to 1 (float32 softmax of two values, read as float64: error far below 1e-5), the drawn token among them."""
    r = client.post("/generate", json={"inputs": PROMPT, "parameters": {
        "max_new_tokens": 4, "details": True, "top_n_tokens": N_TOP, "do_sample": True, "top_k": 2, "seed": 3}})
    assert r.status_code == 200, r.text
    details = strict_json(r.text)["details"]
    for token, top in zip(details["tokens"], details["top_tokens"]):
        assert len(top) == 2, top
        assert token["id"] in {t["id"] for t in top}
        assert math.fsum(math.exp(t["logprob"]) for t in top) == pytest.approx(1.0, abs=1e-5)


def test_drawable_top_drops_masked_tokens():
    assert drawable_top([5.0, 9.0, 2.0], [-0.1, -2.5, -math.inf]) == ((5, -0.1), (9, -2.5))
    assert drawable_top([1.0], [math.nan]) == ()
