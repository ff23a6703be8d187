"""OpenTelemetry on a real `olora serve`: with OTEL_EXPORTER_OTLP_ENDPOINT set, the span of one
/v1/chat/completions request reaches an OTLP/HTTP receiver (this test's, decoding with opentelemetry-proto) in the
client's trace (W3C traceparent), with the route, the adapter, the token counts, the queue wait and the time to first
token."""
from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from helpers import save_random_lora, save_tiny_checkpoint
from http_helpers import tar_gz
from server_process import Replica

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"
MAX_TOKENS = 5
WAIT_S = 30


class Receiver:
    """An OTLP/HTTP trace receiver on loopback: every span it is sent, as (span, its attributes)."""

    def __init__(self):
        self.spans: list = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                for resource_spans in request.resource_spans:
                    for scope_spans in resource_spans.scope_spans:
                        for span in scope_spans.spans:
                            attributes = {a.key: getattr(a.value, a.value.WhichOneof("value"))
                                          for a in span.attributes}
                            receiver.spans.append((span, attributes))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_a_chat_completion_span_reaches_the_otlp_receiver(tmp_path):
    receiver = Receiver()
    base = Path(save_tiny_checkpoint(tmp_path / "base", seed=0))
    lora = Path(save_random_lora(base, tmp_path / "lora", r=4, seed=3, task_type="CAUSAL_LM"))
    replica = Replica("traced", base, tmp_path / "store", tmp_path, extra_env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "100"})
    try:
        replica.wait_ready()
        up = httpx.post(replica.url + "/adapters", data={"adapter_id": "ad1"},
                        files={"archive": ("a.tgz", tar_gz(lora), "application/gzip")}, timeout=60)
        assert up.status_code == 201, up.text
        r = httpx.post(replica.url + "/v1/chat/completions", timeout=60,
                       json={"model": "ad1", "messages": [{"role": "user", "content": "hi"}],
                             "max_tokens": MAX_TOKENS, "temperature": 0},
                       headers={"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN}-01"})
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        deadline = time.monotonic() + WAIT_S
        chat = []
        while not chat and time.monotonic() < deadline:
            chat = [(s, a) for s, a in receiver.spans if a.get("http.route") == "/v1/chat/completions"]
            time.sleep(0.1)
        assert chat, f"no chat span within {WAIT_S} s; got {[a for _, a in receiver.spans]}"
        (span, attributes), = chat
        assert span.trace_id.hex() == TRACE_ID and span.parent_span_id.hex() == PARENT_SPAN
        assert span.name == "POST /v1/chat/completions"
        assert attributes["olora.adapter_id"] == "ad1" and attributes["http.response.status_code"] == 200
        assert attributes["olora.prompt_tokens"] == usage["prompt_tokens"]
        assert attributes["olora.generated_tokens"] == usage["completion_tokens"] == MAX_TOKENS
        assert attributes["olora.time_to_first_token_s"] >= 0
        # the engine's queue wait (submit -> admitted into the batch) lies within the request's own span
        duration_s = (span.end_time_unix_nano - span.start_time_unix_nano) / 1e9
        assert 0 <= attributes["olora.queue_wait_s"] <= duration_s
    finally:
        replica.stop()
        receiver.server.shutdown()
