"""TGI / LoRAX protocol parity (TGI's docs/openapi.json, lorax-client 0.6 types), through TestClient, with the
numbers checked against the HF model computed here (greedy loops, log-softmax over the prompt)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.server.main import create_app
from app.server.schemas import GenerateParameters
from helpers import save_random_lora, save_tiny_checkpoint
from http_helpers import peft_greedy_text, tar_gz, upload
from test_http_api import make_settings

PROMPT = "Return the number of items"

# TGI's GenerateParameters (docs/openapi.json, components.schemas.GenerateParameters.properties) ...
TGI_PARAMETERS = ["adapter_id", "best_of", "decoder_input_details", "details", "do_sample", "frequency_penalty",
                  "grammar", "max_new_tokens", "repetition_penalty", "return_full_text", "seed", "stop",
                  "temperature", "top_k", "top_n_tokens", "top_p", "truncate", "typical_p", "watermark"]
# ... and lorax-client 0.6's Parameters
LORAX_PARAMETERS = ["adapter_id", "adapter_source", "merged_adapters", "api_token", "do_sample", "max_new_tokens",
                    "ignore_eos_token", "repetition_penalty", "return_full_text", "stop", "seed", "temperature",
                    "top_k", "top_p", "truncate", "typical_p", "best_of", "watermark", "details",
                    "decoder_input_details", "return_k_alternatives", "response_format"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return Path(save_tiny_checkpoint(tmp_path_factory.mktemp("base") / "tiny", seed=0))


@pytest.fixture(scope="module")
def hf(base_dir):
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(base_dir))


@pytest.fixture(scope="module")
def client(tmp_path_factory, base_dir):
    with TestClient(create_app(make_settings(tmp_path_factory.mktemp("srv"), base_dir))) as c:
        yield c


def logits_of(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()  # (T, V)


def reference_loop(model, ids: list[int], steps: int, pick) -> list[int]:
    """Token by token with full forwards: pick(logits (V,), generated so far) -> next id."""
    out: list[int] = []
    for _ in range(steps):
        out.append(int(pick(logits_of(model, ids + out)[-1], out)))
    return out


def post(client, path="/generate", prompt=PROMPT, stream=None, **params):
    params.setdefault("max_new_tokens", 8)
    body = {"inputs": prompt, "parameters": params}
    if stream is not None:
        body["stream"] = stream
    return client.post(path, json=body)


def sse(response) -> list[dict]:
    return [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]


def test_schema_has_every_tgi_and_lorax_parameter():
    assert set(TGI_PARAMETERS + LORAX_PARAMETERS) <= set(GenerateParameters.model_fields)


def test_compat_route_is_a_list_of_one_or_the_stream(client):
    expected = post(client, details=True).json()
    r = post(client, "/", details=True)
    assert r.status_code == 200 and r.json() == [expected]
    with client.stream("POST", "/", json={"inputs": PROMPT, "stream": True,
                                          "parameters": {"max_new_tokens": 8}}) as r:
        events = sse(r)
    assert [e["index"] for e in events] == list(range(1, 9))
    assert events[-1]["generated_text"] == expected["generated_text"]
    assert events[-1]["details"]["input_length"] == events[-1]["details"]["prompt_tokens"] == \
        expected["details"]["prompt_tokens"]


def test_every_parameter_at_its_default_is_accepted(client):
    """What text_generation.Client and lorax.Client send for a plain call (their pydantic dumps)."""
    nulls = {name: None for name in set(TGI_PARAMETERS + LORAX_PARAMETERS)}
    nulls.update(do_sample=False, watermark=False, details=False, decoder_input_details=False, stop=[],
                 ignore_eos_token=False, return_full_text=False, max_new_tokens=4)
    r = client.post("/", json={"inputs": PROMPT, "parameters": nulls, "stream": False})
    assert r.status_code == 200, r.text
    assert r.json()[0]["generated_text"] == post(client, max_new_tokens=4).json()["generated_text"]


@pytest.mark.parametrize("option, value", [("watermark", True), ("grammar", {"type": "regex", "value": "a+"}),
                                           ("response_format", {"type": "json_object", "schema": {}}),
                                           ("api_token", "hf_x"), ("adapter_source", "hub")])
def test_unhonoured_options_are_refused_by_name(client, option, value):
    r = post(client, **{option: value})
    assert r.status_code == 422 and option in r.json()["error"]


@pytest.mark.parametrize("path, stream", [("/generate_stream", None), ("/", True)])
def test_decoder_input_details_is_refused_when_streaming(client, path, stream):
    """TGI's validation refuses it (PrefillDetailsStream): its stream details carry no prefill tokens."""
    r = post(client, path, stream=stream, decoder_input_details=True)
    assert r.status_code == 422 and "decoder_input_details" in r.json()["error"], r.text
    assert post(client, path, stream=stream, decoder_input_details=False).status_code == 200


def test_truncate_keeps_the_last_tokens(client, hf):
    model, tok = hf
    ids = tok(PROMPT)["input_ids"]
    body = post(client, truncate=5, details=True).json()
    expected = reference_loop(model, ids[-5:], 8, lambda lg, _: lg.argmax())
    assert [t["id"] for t in body["details"]["tokens"]] == expected and body["details"]["prompt_tokens"] == 5


def test_prefill_details_and_top_n_tokens_match_the_model(client, hf):
    model, tok = hf
    ids = tok(PROMPT)["input_ids"]
    d = post(client, details=True, decoder_input_details=True, top_n_tokens=3).json()["details"]
    generated = [t["id"] for t in d["tokens"]]
    lp = torch.log_softmax(logits_of(model, ids + generated), dim=-1)  # (T, V)
    assert [p["id"] for p in d["prefill"]] == ids and d["prefill"][0].get("logprob") is None
    want = [lp[t - 1, ids[t]].item() for t in range(1, len(ids))]
    assert [p["logprob"] for p in d["prefill"][1:]] == pytest.approx(want, abs=1e-4)
    for step, (token, top) in enumerate(zip(d["tokens"], d["top_tokens"])):
        values, best = torch.topk(lp[len(ids) - 1 + step], 3)
        assert [t["id"] for t in top] == best.tolist() and top[0]["id"] == token["id"]  # greedy: the top one
        assert [t["logprob"] for t in top] == pytest.approx(values.tolist(), abs=1e-4)
    alternatives = post(client, details=True, return_k_alternatives=2).json()["details"]["tokens"]
    assert [[a["id"] for a in t["alternative_tokens"]] for t in alternatives] == [
        [t["id"] for t in top[:2]] for top in d["top_tokens"]]


def test_typical_p_keeps_the_most_typical_token(client, hf):
    """With a tiny mass, typical decoding keeps one token: the one whose -log p is closest to the entropy."""
    model, tok = hf

    def most_typical(logits, _):
        logp = torch.log_softmax(logits, dim=-1)
        entropy = -(logp.exp() * logp).sum()
        return torch.argmin((-logp - entropy).abs())

    body = post(client, do_sample=True, typical_p=1e-6, seed=3, details=True).json()
    expected = reference_loop(model, tok(PROMPT)["input_ids"], 8, most_typical)
    assert [t["id"] for t in body["details"]["tokens"]] == expected
    greedy = post(client, details=True).json()["details"]["tokens"]
    assert [t["id"] for t in greedy] != expected  # typical_p changed the choice


def test_frequency_penalty_follows_openais_definition(client, hf):
    model, tok = hf
    ids = tok(PROMPT)["input_ids"]

    def penalised(logits, generated):
        counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=logits.shape[0])
        return (logits + 1.5 * counts).argmax()

    body = post(client, max_new_tokens=16, frequency_penalty=-1.5, details=True).json()  # favours repeats
    expected = reference_loop(model, ids, 16, penalised)
    assert [t["id"] for t in body["details"]["tokens"]] == expected
    assert expected != reference_loop(model, ids, 16, lambda lg, _: lg.argmax())  # the penalty mattered


def test_best_of_returns_the_most_likely_sequence(client):
    d = post(client, best_of=3, do_sample=True, temperature=1.5, details=True).json()["details"]
    others = d["best_of_sequences"]
    assert len(others) == 2
    best = sum(t["logprob"] for t in d["tokens"])
    assert all(best >= sum(t["logprob"] for t in o["tokens"]) for o in others)
    assert len({d["seed"], *(o["seed"] for o in others)}) == 3
    for refused in ({"seed": 1}, {"do_sample": False}):
        assert post(client, best_of=2, **{"do_sample": True, **refused}).status_code == 422
    r = client.post("/", json={"inputs": PROMPT, "stream": True, "parameters": {"best_of": 2, "do_sample": True}})
    assert r.status_code == 422 and "best_of" in r.json()["error"]


def test_x_adapter_id_header_alone_selects_the_adapter(tmp_path, base_dir):
    lora = save_random_lora(base_dir, tmp_path / "lora", r=4, seed=1, task_type="CAUSAL_LM")
    with TestClient(create_app(make_settings(tmp_path, base_dir))) as c:
        assert upload(c, "qv4", tar_gz(lora)).status_code == 201
        r = c.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 8}},
                   headers={"X-Adapter-Id": "qv4"})
        assert r.status_code == 200
        assert r.json()["generated_text"] == peft_greedy_text(base_dir, lora, PROMPT, 8)
        r = c.post("/v1/completions", json={"model": "qv4", "prompt": PROMPT, "max_tokens": 2},
                   headers={"X-Adapter-Id": "other"})
        assert r.status_code == 400 and "X-Adapter-Id" in str(r.json()["error"])


def test_info_has_tgis_fields_and_the_real_dtype(client):
    info = client.get("/info").json()
    required = ["model_id", "max_concurrent_requests", "max_best_of", "max_stop_sequences", "max_input_tokens",
                "max_total_tokens", "validation_workers", "max_client_batch_size", "router", "version"]
    assert all(k in info for k in required)
    assert info["dtype"] == "float32" and info["model_dtype"] == "torch.float32"  # CPU: auto -> fp32


def test_eos_token_is_special(tmp_path):
    """The embedded default model ends this prompt with EOS (TGI marks it special: true)."""
    settings = make_settings(tmp_path, base_dir=None, model=None, max_input_tokens=64, max_total_tokens=128)
    with TestClient(create_app(settings)) as c:
        d = post(c, prompt="Create a new", max_new_tokens=40, details=True).json()["details"]
        assert d["finish_reason"] == "eos_token"
        assert d["tokens"][-1]["special"] is True and not any(t["special"] for t in d["tokens"][:-1])
