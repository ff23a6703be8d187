"""Run by tests/test_official_clients.py with .venv-clients' python: drives the official `text-generation` and
`lorax-client` packages, unchanged, against a server and prints what they returned as JSON.

    python tgi_clients_driver.py URL PROMPT MAX_NEW_TOKENS ADAPTER_ID
"""
from __future__ import annotations

import json
import sys

import lorax
import text_generation


def run(url: str, prompt: str, max_new_tokens: int, adapter_id: str) -> dict:
    out: dict = {}
    tgi = text_generation.Client(url)
    response = tgi.generate(prompt, max_new_tokens=max_new_tokens)
    out["tgi_base"] = response.generated_text
    out["tgi_base_tokens"] = [t.id for t in response.details.tokens]
    # TGI's client has no adapter_id: the affinity header selects the adapter
    tgi_adapter = text_generation.Client(url, headers={"X-Adapter-Id": adapter_id})
    out["tgi_adapter"] = tgi_adapter.generate(prompt, max_new_tokens=max_new_tokens).generated_text
    stream = list(tgi_adapter.generate_stream(prompt, max_new_tokens=max_new_tokens))
    out["tgi_adapter_stream"] = "".join(r.token.text for r in stream)
    out["tgi_adapter_stream_final"] = stream[-1].generated_text
    top = tgi.generate(prompt, max_new_tokens=2, top_n_tokens=2, decoder_input_details=True)
    out["tgi_top_tokens"] = [[t.id for t in step] for step in top.details.top_tokens]
    out["tgi_prefill"] = [t.id for t in top.details.prefill]

    lx = lorax.Client(url)
    response = lx.generate(prompt, adapter_id=adapter_id, max_new_tokens=max_new_tokens)
    out["lorax_adapter"] = response.generated_text
    out["lorax_finish"] = response.details.finish_reason.value
    stream = list(lx.generate_stream(prompt, adapter_id=adapter_id, max_new_tokens=max_new_tokens))
    out["lorax_adapter_stream"] = "".join(r.token.text for r in stream)
    out["lorax_base"] = lx.generate(prompt, max_new_tokens=max_new_tokens).generated_text
    try:
        lx.generate(prompt, adapter_id="no-such-adapter", max_new_tokens=2)
        out["lorax_missing"] = None
    except Exception as exc:  # noqa: BLE001 - the client's own error type and message are what is checked
        out["lorax_missing"] = f"{type(exc).__name__}: {exc}"
    return out


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])))
