"""The official clients, unchanged, against a real `olora serve` process: `openai`, `huggingface_hub`'s
InferenceClient (text_generation with/without stream/details/adapter_id, chat_completion), `text-generation` and
`lorax-client` (in .venv-clients: they pin huggingface-hub<1.0). Greedy outputs must equal PEFT's."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub import constants as hf_constants
from transformers import AutoTokenizer

from app.server.routers.openai_compat import chat_prompt
from helpers import save_random_lora, save_tiny_checkpoint
from http_helpers import peft_greedy_text, tar_gz
from server_process import Replica

PROMPT = "Return the number of items"
N = 8
ROOT = Path(__file__).resolve().parent.parent
CLIENTS_VENV = ROOT / ".venv-clients"
MESSAGES = [{"role": "user", "content": "Open the file"}]


def clients_python() -> Path:
    """.venv-clients' python, made from tests/clients-requirements.txt when missing (as `make test` does)."""
    python, stamp = CLIENTS_VENV / "bin" / "python", CLIENTS_VENV / ".installed"
    if not stamp.exists():
        subprocess.run([sys.executable, "-m", "venv", str(CLIENTS_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-r",
                        str(ROOT / "tests" / "clients-requirements.txt")], check=True)
        stamp.touch()
    return python


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("clients")
    base = Path(save_tiny_checkpoint(root / "base", seed=0))
    lora = Path(save_random_lora(base, root / "lora", r=4, seed=5, task_type="CAUSAL_LM"))
    server = Replica("server", base, root / "store", root)
    try:
        server.wait_ready()
        r = httpx.post(server.url + "/adapters", data={"adapter_id": "ad1"}, timeout=60,
                       files={"archive": ("a.tgz", tar_gz(lora), "application/gzip")})
        assert r.status_code == 201, r.text
        chat_text = chat_prompt(AutoTokenizer.from_pretrained(str(base)), MESSAGES)
        expected = {"base": peft_greedy_text(base, None, PROMPT, N), "ad1": peft_greedy_text(base, lora, PROMPT, N),
                    "chat": peft_greedy_text(base, lora, chat_text, N)}
        assert expected["base"] != expected["ad1"]
        yield server, expected
    finally:
        server.stop()


def test_openai_client(served):
    server, expected = served
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    c = client.completions.create(model="ad1", prompt=PROMPT, max_tokens=N, temperature=0)
    assert c.choices[0].text == expected["ad1"] and c.usage.completion_tokens == N
    stream = client.completions.create(model="ad1", prompt=PROMPT, max_tokens=N, stream=True, temperature=0,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == expected["ad1"]
    assert chunks[-1].usage.completion_tokens == N
    chat = client.chat.completions.create(model="ad1", messages=MESSAGES, max_tokens=N, logprobs=True,
                                          top_logprobs=2, temperature=0)
    assert chat.choices[0].message.content == expected["chat"]
    assert len(chat.choices[0].logprobs.content) == N
    streamed = client.chat.completions.create(model="ad1", messages=MESSAGES, max_tokens=N, stream=True,
                                              temperature=0)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == expected["chat"]
    two = client.completions.create(model="ad1", prompt=[PROMPT, PROMPT], max_tokens=N, n=2, temperature=0)
    assert [ch.text for ch in two.choices] == [expected["ad1"]] * 4
    assert client.models.retrieve("ad1").id == "ad1"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-adapter")
    with pytest.raises(openai.UnprocessableEntityError):  # unknown options are refused, never ignored
        client.completions.create(model="ad1", prompt=PROMPT, max_tokens=2, extra_body={"no_such_option": 1})


def test_openai_client_reads_the_error_envelope(served):
    server, _ = served
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="no-such-adapter", prompt=PROMPT, max_tokens=2)
    assert "no-such-adapter" in missing.value.message  # the client shows only error.message
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.completions.create(model="ad1", prompt=PROMPT, max_tokens=2, extra_body={"no_such_option": 1})
    assert "no_such_option" in refused.value.message


def test_huggingface_hub_inference_client(served, monkeypatch):
    server, expected = served
    # conftest's HF_HUB_OFFLINE=1 makes huggingface_hub refuse every HTTP call, even to loopback: lift it here only
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    client = InferenceClient(base_url=server.url)
    assert client.text_generation(PROMPT, max_new_tokens=N) == expected["base"]
    assert client.text_generation(PROMPT, max_new_tokens=N, adapter_id="ad1") == expected["ad1"]
    out = client.text_generation(PROMPT, max_new_tokens=N, adapter_id="ad1", details=True)
    assert out.generated_text == expected["ad1"] and out.details.generated_tokens == N
    assert out.details.finish_reason == "length" and len(out.details.tokens) == N
    assert "".join(client.text_generation(PROMPT, max_new_tokens=N, adapter_id="ad1", stream=True)) == \
        expected["ad1"]
    events = list(client.text_generation(PROMPT, max_new_tokens=N, adapter_id="ad1", stream=True, details=True))
    assert events[-1].generated_text == expected["ad1"] and events[-1].details.generated_tokens == N
    chat = client.chat_completion(MESSAGES, model="ad1", max_tokens=N, temperature=0)
    assert chat.choices[0].message.content == expected["chat"]
    streamed = client.chat_completion(MESSAGES, model="ad1", max_tokens=N, stream=True, temperature=0)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == expected["chat"]


def test_text_generation_and_lorax_clients(served):
    server, expected = served
    done = subprocess.run([str(clients_python()), str(Path(__file__).parent / "tgi_clients_driver.py"),
                           server.url, PROMPT, str(N), "ad1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["tgi_base"] == out["lorax_base"] == expected["base"]
    assert out["tgi_adapter"] == out["tgi_adapter_stream"] == out["tgi_adapter_stream_final"] == expected["ad1"]
    assert out["lorax_adapter"] == out["lorax_adapter_stream"] == expected["ad1"]
    assert out["lorax_finish"] == "length" and len(out["tgi_base_tokens"]) == N
    assert [step[0] for step in out["tgi_top_tokens"]] == out["tgi_base_tokens"][:2]  # greedy: the top token
    assert len(out["tgi_prefill"]) > 1
    assert "no-such-adapter" in out["lorax_missing"]
