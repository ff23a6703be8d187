"""OpenTelemetry traces: one server span per HTTP request, continuing the client's W3C `traceparent`.

Semantics: spans are exported over OTLP/HTTP when one of the standard variables `OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (the exporter reads them and the other `OTEL_EXPORTER_OTLP_*` ones
itself); otherwise no provider is installed and the API's spans cost nothing. The span is named after the route
template and carries `http.request.method`, `http.route`, `http.response.status_code`, `olora.request_id`,
`olora.adapter_id`; the generation adds `olora.prompt_tokens`, `olora.generated_tokens`,
`olora.queue_wait_s` (the engine's submit -> admission into the batch, from its request handle) and
`olora.time_to_first_token_s` (app/server/generation.py, through the current span).
"""
from __future__ import annotations

import os
from typing import Callable

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_propagator = TraceContextTextMapPropagator()


def tracer_provider_from_env():
    """An SDK TracerProvider exporting over OTLP/HTTP when the standard variables ask for it, else None."""
    if not any(os.environ.get(name) for name in ENDPOINT_VARIABLES):
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME",
                                                                                        "olora-serve")}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


class TracingMiddleware:
    def __init__(self, app, provider, route_of: Callable[[dict], str]):
        self.app = app
        self.tracer = provider.get_tracer("olora-serve")
        self.route_of = route_of  # the route template a request is counted under (bounded span names)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers") or []}
        parent = _propagator.extract(carrier)
        status = {"code": 500}

        async def recording_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        with self.tracer.start_as_current_span(f"{scope.get('method')} {scope.get('path')}", context=parent,
                                               kind=trace.SpanKind.SERVER) as span:
            try:
                await self.app(scope, receive, recording_send)
            finally:
                route = self.route_of(scope)
                state = scope.get("state") or {}
                span.update_name(f"{scope.get('method')} {route}")
                span.set_attribute("http.request.method", scope.get("method") or "")
                span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status["code"])
                span.set_attribute("olora.request_id", state.get("request_id") or "")
                if state.get("adapter_id"):
                    span.set_attribute("olora.adapter_id", state["adapter_id"])
                if status["code"] >= 500:
                    span.set_status(trace.Status(trace.StatusCode.ERROR))


def record_generation(prompt_tokens: int, generated_tokens: int, time_to_first_token_s: float | None,
                      queue_wait_s: float | None) -> None:
    """Add a finished generation's counts to the request's span (no-op without tracing). Several sequences of one
    request add up; the queue wait is the longest of theirs (the request waited that long), the time to first
    token the first one's."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    attributes = getattr(span, "attributes", None) or {}
    span.set_attribute("olora.prompt_tokens", int(attributes.get("olora.prompt_tokens", 0)) + prompt_tokens)
    span.set_attribute("olora.generated_tokens",
                       int(attributes.get("olora.generated_tokens", 0)) + generated_tokens)
    if queue_wait_s is not None and queue_wait_s > attributes.get("olora.queue_wait_s", -1.0):
        span.set_attribute("olora.queue_wait_s", queue_wait_s)
    if time_to_first_token_s is not None and "olora.time_to_first_token_s" not in attributes:
        span.set_attribute("olora.time_to_first_token_s", time_to_first_token_s)
