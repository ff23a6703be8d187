"""Fault isolation of the engine loop: which rows a fault ends, and when the loop itself gives up.

Semantics (one loop iteration):
    try: step()                                   # decode + prefill + sample + emit
    except Exception as exc:
        failures += 1
        if failures >= MAX_CONSECUTIVE_STEP_FAILURES: the loop dies (a persistent fault: /health 503, restart)
        else: every row of that step ends with StepFailed; waiting requests and the loop go on
    inside step(): rows whose logits are NaN/Inf or beyond ±LOGIT_BOUND end with NonFiniteLogits, and so do
    rows whose sampling processors leave nothing finite; the others are sampled as usual (sampling never sees a
    non-finite value: such rows are sampled from zeros and the result is discarded). The flags come back with
    the sampled tokens in the step's one device->host transfer (sampling.choose_tokens).
"""
from __future__ import annotations

import sys
import traceback

import torch

from .errors import NonFiniteLogits, StepFailed

LOGIT_BOUND = 1e6  # |logit| past it ends the request: no trained model gets near it, only an overflowing adapter
MAX_CONSECUTIVE_STEP_FAILURES = 3  # then the loop is declared dead (/health 503) and the process restarted


def finite_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits: (B, V) -> (B,) bool: the rows that may be sampled (False for NaN, Inf and |x| > LOGIT_BOUND)."""
    return logits.abs().amax(dim=-1) <= LOGIT_BOUND


def non_finite_error(adapter_id: str | None, generated: int) -> NonFiniteLogits:
    return NonFiniteLogits(
        f"the model's logits for this request are not finite (NaN/Inf or beyond {LOGIT_BOUND:g}) after "
        f"{generated} tokens: adapter {adapter_id!r} overflows on this input; the request was ended")


def row_fault_error(fault: str, adapter_id: str | None, generated: int) -> NonFiniteLogits:
    """The error a row ends with for a `Choices.faults` entry ("logits" | "processors")."""
    if fault == "logits":
        return non_finite_error(adapter_id, generated)
    return NonFiniteLogits("the logits became non-finite after the repetition penalty/temperature/top-k/top-p "
                           "processors")


def step_failed(exc: Exception, n_rows: int) -> StepFailed:
    """Report a failed step on stderr and build the error its rows end with (no internals for the client)."""
    print(f"olora-serve: an engine step failed, its {n_rows} request(s) end with an error: "
          f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    traceback.print_exc()
    return StepFailed(f"the engine step running this request failed ({type(exc).__name__}); "
                      "the request was ended, the server goes on")


def report_loop_death(exc: BaseException) -> None:
    print(f"olora-serve: the engine loop died ({type(exc).__name__}: {exc}); /health and /ready now answer 503 "
          "so the orchestrator restarts this process", file=sys.stderr, flush=True)
    traceback.print_exc()
