"""The engine: one base model, many LoRA adapters in the same batch, continuous batching on a model thread.

    engine = Engine(EngineConfig(), DirectoryAdapterSource(root)); engine.start()
    handle = engine.submit(prompt_ids, "my-adapter", SamplingParams(max_new_tokens=32))
    async for event in handle: ...            # or handle.result() from blocking code

Every iteration of the model loop: drop finished/cancelled rows, admit newcomers (adapter in host memory and a
slot pinned), decode the running rows in one forward and prefill the newcomers in another, then sample one token
per row and hand it to the request's consumer.
"""
from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

from .adapter_cache import AdapterCache, AdapterKey
from .adapter_files import AdapterInfo, AdapterParser, AdapterSource, base_weight_norms, read_adapter_config
from .base_model import load_base_model
from .config import EngineConfig
from .engine_stats import EngineStats
from .cuda_graphs import choose_decode_graph
from .cpu_threads import apply_cpu_threads, choose_cpu_threads
from .errors import AdapterFilesUnreadable, AdapterUnavailable, EngineError, EngineNotRunning, InvalidRequest
from .faults import MAX_CONSECUTIVE_STEP_FAILURES, report_loop_death, row_fault_error, step_failed
from .handle import RequestHandle, TokenEvent, Wakeups
from .architecture import describe_architecture, layer_features
from .lora_layers import LoRASlotBank, find_target_modules
from .observer import EngineObserver, RequestStats, SafeObserver
from .runner import ModelRunner
from .sampling import RowSampler, SamplingParams, choose_tokens, prompt_logprobs
from .scheduler import Scheduler, Sequence
from .slot_budget import choose_max_loras, device_memory_bytes, slot_bytes
from .text import IncrementalDetokenizer, find_stop
from .token_bytes import TokenBytes

log = logging.getLogger("olora.engine")
__all__ = ["Engine", "EngineConfig", "EngineStats"]  # EngineConfig lives in config.py


class Engine:
    def __init__(self, config: EngineConfig, adapters: AdapterSource, observer: EngineObserver | None = None):
        config.validate()
        self.config = config
        self.observer = SafeObserver(observer)
        base = load_base_model(config.model, config.dtype, config.quantize, config.device)
        self.tokenizer = base.tokenizer
        self.token_bytes = TokenBytes(base.tokenizer)  # raw bytes per token id (OpenAI logprob `bytes`)
        self.device = base.device
        threads = choose_cpu_threads(config.cpu_threads, base.device)
        log.info("forwards: %s", threads.reason)
        self.cpu_threads, self.loop_threads = threads.threads, 0  # loop_threads: as the loop thread sees it (stats)
        apply_cpu_threads(threads.threads)  # process-wide; the loop thread sets it again for itself
        self.dtype: torch.dtype = base.dtype  # compute dtype in use ("auto" resolved)
        self.model = base.model
        self.base = base.describe()  # frozen facts of the base for the adapter domain (BaseDescription)
        self.architecture = describe_architecture(base.model)  # raises BaseModelError for what it cannot run
        targets = find_target_modules(base.model, config.target_modules)
        if not targets:
            raise InvalidRequest(f"no Linear/Conv1D module of the decoder blocks matches "
                                 f"target_modules={config.target_modules}")
        shapes = {n: layer_features(base.model.get_submodule(n)) for n in targets}
        choice = choose_max_loras(config.max_loras, config.max_batch_size,
                                  slot_bytes(shapes, config.max_rank, base.dtype), device_memory_bytes(base.device),
                                  config.max_cpu_adapters)
        log.info("device slots: %s", choice.reason)
        graph = choose_decode_graph(config.decode_graph, base.device, config.quantize)
        # resolved, as stats() reports them
        self.config = config = replace(config, max_loras=choice.max_loras, decode_graph=graph)
        self.bank = LoRASlotBank(base.model, targets, config.max_loras, config.max_rank, base.dtype, base.device,
                                 kernel=config.kernel, max_rows=config.max_batch_size, cpu_gemm=config.cpu_gemm)
        self.parser = AdapterParser(self.bank.targets, config.max_rank, self.bank.dtype, base.fingerprint,
                                    base_weight_norms(base.model, targets, base.path))  # ||W||_F per module
        self.runner = ModelRunner(base.model, self.bank, self.architecture, config.max_batch_size,
                                  config.max_total_tokens,
                                  compile_decode=config.compile == "on", decode_graph=config.decode_graph,
                                  cpu_gemm=config.cpu_gemm)
        self._lifecycle = threading.Lock()  # start/shutdown
        self._wake = threading.Event()  # set by submit/cancel/invalidate and the cache's loader; the loop waits
        self.cache = AdapterCache(adapters, self.bank, config.max_cpu_adapters, self.parser, self.observer,
                                  self._wake, pin_memory=base.device.type == "cuda")
        self.scheduler = Scheduler(config, self.cache, self.runner.kv)
        self._eos_ids = self._find_eos_ids()
        self._special_ids = set(getattr(self.tokenizer, "all_special_ids", ())) | self._eos_ids
        self._ids = itertools.count()
        self._by_id: dict[str, Sequence] = {}
        self._thread: threading.Thread | None = None
        self._stop = False
        self._fatal: BaseException | None = None
        self._step_rows: list[Sequence] = []  # the rows of the step in progress (failed together if it raises)
        self._wakeups = Wakeups()  # a step's tokens wake each consumer loop once (handle.py)
        self.steps = 0

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        with self._lifecycle:
            if self._thread is not None:
                return
            self._stop = False
            self.cache.start()
            self._thread = threading.Thread(target=self._loop, name="olora-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        """Stop the threads; unfinished requests end with finish_reason "cancelled". Idempotent."""
        with self._lifecycle:
            self._stop = True
            self._wake.set()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=60)
        self.cache.stop()
        for seq in self.scheduler.running + self.scheduler.waiting_snapshot():
            if not seq.handle.done:
                self._finish(seq, "cancelled")

    # ---- public API --------------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], adapter_id: str | None, params: SamplingParams) -> RequestHandle:
        """Queue a request. Raises AdapterNotFound / AdapterRejected / InputTooLong / QueueFull /
        InvalidRequest / EngineNotRunning."""
        return self.submit_many([(prompt_ids, params)], adapter_id)[0]

    def submit_many(self, jobs: list[tuple[list[int], SamplingParams]], adapter_id: str | None
                    ) -> list[RequestHandle]:
        """Queue the sequences of one request (OpenAI's n and prompt lists, TGI's best_of), one per
        (prompt_ids, params) job, all with `adapter_id`: every one is queued or none is (the errors of submit)."""
        if self._thread is None or self._fatal is not None:
            died = f" (the engine loop died: {type(self._fatal).__name__})" if self._fatal is not None else ""
            raise EngineNotRunning(f"engine is not running{died}")
        for prompt_ids, params in jobs:
            self.config.check_request(prompt_ids, params, self.runner.vocab_size)
        key = self._resolve_checked(adapter_id) if adapter_id is not None else None
        seqs = []
        for prompt_ids, params in jobs:
            request_id = f"req-{next(self._ids)}"
            sampler = RowSampler(params, self.device, len(prompt_ids))  # draws the seed of an unseeded request
            handle = RequestHandle(request_id, self.cancel, seed=sampler.seed, wakeups=self._wakeups)
            seqs.append(Sequence(request_id=request_id, prompt_ids=list(prompt_ids), adapter_id=adapter_id,
                                 key=key, params=params, sampler=sampler,
                                 detok=IncrementalDetokenizer(self.tokenizer, prompt_ids), handle=handle))
        for seq in seqs:
            self._by_id[seq.request_id] = seq
        try:
            self.scheduler.enqueue(seqs)
        except EngineError:
            for seq in seqs:
                self._by_id.pop(seq.request_id, None)
            raise
        self._notify()
        return [seq.handle for seq in seqs]

    def _resolve_checked(self, adapter_id: str) -> AdapterKey:
        """The live version's key, its config read while it is not loaded yet (a cheap early refusal of unsupported
        configs). A version folder gone between the lookup and the read (deleted or overwritten meanwhile) is
        looked up once more: a deleted adapter is then AdapterNotFound (404), a newer version is checked in turn,
        and files of the live version that still cannot be read are the server's fault (AdapterUnavailable, 503)."""
        try:
            return self._checked(self.cache.resolve(adapter_id))
        except AdapterFilesUnreadable:
            pass
        try:
            return self._checked(self.cache.resolve(adapter_id))
        except AdapterFilesUnreadable as exc:
            raise AdapterUnavailable(f"adapter {adapter_id!r}: {exc}") from None

    def _checked(self, key: AdapterKey) -> AdapterKey:
        if self.cache.status(key) == "loading":
            read_adapter_config(Path(key.path))
        return key

    def cancel(self, request_id: str) -> None:
        seq = self._by_id.get(request_id)
        if seq is not None:
            seq.cancelled = True
            self.scheduler.withdraw(seq)  # a waiting one stops counting against max_waiting now
            self._notify()

    def loading_paths(self) -> set[str]:
        """Adapter version folders the engine has still to read (queued or loading into host memory); once read,
        it never opens them again."""
        return self.cache.loading_paths()

    def invalidate(self, adapter_id: str, current_path: str | None = None) -> None:
        """The adapter was deleted or overwritten: later requests get the new version or AdapterNotFound.
        `current_path`: the version now current, when known; a cache holding only it is left alone."""
        self.cache.invalidate(adapter_id, current_path)
        self._notify()

    def validate_adapter(self, path: str | Path) -> AdapterInfo:
        """Check an adapter directory against this base (targets, shapes, rank, finite floats, binding) without
        putting it in a slot. Raises the typed AdapterRejected subclasses."""
        return self.parser.parse(Path(path)).info

    def stats(self) -> EngineStats:
        snap = self.cache.snapshot()
        rows = list(self.scheduler.running)  # index == KV row
        running = [s for s in rows if not s.done]
        waiting = [s for s in self.scheduler.waiting_snapshot() if not s.cancelled]
        return EngineStats(
            waiting=len(waiting), running=len(running),
            running_adapters=tuple(sorted({s.adapter_id for s in running if s.adapter_id})),
            waiting_adapters=tuple(sorted({s.adapter_id for s in waiting if s.adapter_id})),
            max_loras=self.config.max_loras, slots_used=sum(s is not None for s in snap.slots),
            slots_pinned=sum(s is not None and s.pins > 0 for s in snap.slots),
            slot_adapters=tuple(None if s is None else s.adapter_id for s in snap.slots),
            host_adapters=len(snap.host_adapter_ids), host_adapter_ids=snap.host_adapter_ids,
            host_bytes=snap.host_bytes,
            max_cpu_adapters=self.config.max_cpu_adapters, pending_loads=snap.pending_loads, steps=self.steps,
            alive=self._thread is not None and self._thread.is_alive() and self._fatal is None,
            kv_rows=self.runner.kv.max_batch, kv_rows_used=len(rows), kv_row_tokens=self.runner.kv.max_tokens,
            kv_tokens_used=sum(max(s.cached_tokens, 0) for s in rows),
            observer_errors=self.observer.errors, cpu_threads=self.loop_threads)

    # ---- internals ---------------------------------------------------------------------------------------
    def _find_eos_ids(self) -> set[int]:
        ids: set[int] = set()
        gen = getattr(self.model, "generation_config", None)
        for value in (getattr(gen, "eos_token_id", None), getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(v for v in value if isinstance(v, int))
        return ids

    def _notify(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        failures = 0  # consecutive failed steps: a fault that outlives the rows it hit means the engine is broken
        try:
            apply_cpu_threads(self.cpu_threads)
            self.loop_threads = torch.get_num_threads()
            with torch.inference_mode():
                while not self._stop:
                    self._wake.clear()  # a wake-up during the step makes the wait below return at once
                    try:
                        worked = self._step()
                        if worked:
                            failures = 0
                    except Exception as exc:  # noqa: BLE001 - a step's fault is its rows' fault, not the loop's
                        failures += 1
                        if failures >= MAX_CONSECUTIVE_STEP_FAILURES:
                            raise
                        self._fail_step(exc)
                        continue
                    if not worked:
                        self._wake.wait(timeout=0.05)
        except BaseException as exc:  # persistent fault (device lost, OOM every step) or interpreter exit
            self._fatal = exc
            report_loop_death(exc)
            error = EngineNotRunning(f"engine loop died: {type(exc).__name__}")
            # every live request, including newcomers taken off the queue by the step that failed
            for seq in list(self._by_id.values()):
                if not seq.handle.done:
                    self._finish(seq, "error", error)

    def _fail_step(self, exc: Exception) -> None:
        """End the rows of the step that raised (running rows and the newcomers it took off the queue) with a
        StepFailed error; waiting requests and the loop go on. Their KV rows are compacted at the next step."""
        error = step_failed(exc, len(self._step_rows))
        for seq in self._step_rows:
            if not seq.handle.done:
                self._finish(seq, "error", error)
        self._step_rows = []

    def _step(self) -> bool:
        """One scheduler iteration; False when there was nothing to do."""
        sched = self.scheduler
        for seq in sched.running:
            if seq.cancelled and not seq.done:
                self._finish(seq, "cancelled")
        sched.compact()
        newcomers, dropped = sched.admit()
        for seq, error in dropped:
            self._finish(seq, "cancelled" if error is None else "error", error)
        old = list(sched.running)
        self._step_rows = old + newcomers  # who fails if this step raises
        if not old and not newcomers:
            return bool(dropped)
        rows: list[Sequence] = []
        logits = []
        if old:
            logits.append(self.runner.decode([s.generated[-1] for s in old], [s.cached_tokens for s in old],
                                             [s.slot for s in old]))
            rows += old
        prefill_tokens = 0
        if newcomers:
            newcomers.sort(key=lambda s: len(s.prompt_ids))  # rows in length order: little padding per group
            row = len(old)
            for group in _padding_groups(newcomers):
                width = len(group[-1].prompt_ids)
                prefill_tokens += len(group) * width
                if group[0].params.prompt_logprobs:  # a group of one: logits of every prompt position
                    seq = group[0]
                    every = self.runner.prefill(row, [seq.prompt_ids], [seq.slot], all_positions=True)[0]  # (T, V)
                    seq.prompt_logprobs = tuple(prompt_logprobs(every, seq.prompt_ids))
                    logits.append(every[len(seq.prompt_ids) - 1][None])  # (1, V)
                else:
                    logits.append(self.runner.prefill(row, [s.prompt_ids for s in group], [s.slot for s in group]))
                row += len(group)
            rows += newcomers
            sched.start_running(newcomers)
        batch_logits = torch.cat(logits) if len(logits) > 1 else logits[0]  # (B, V)
        choices = choose_tokens(batch_logits, [s.sampler for s in rows], [self._history(s) for s in rows])
        with self._wakeups.batch():  # one wake-up per consumer loop for the whole step's tokens
            for seq, token, logprob, top, fault in zip(rows, choices.tokens, choices.logprobs, choices.tops,
                                                       choices.faults):
                if fault is None:
                    self._emit(seq, token, logprob, top)
                else:  # this row's logits are not usable: it ends alone (faults.py)
                    self._finish(seq, "error", row_fault_error(fault, seq.adapter_id, len(seq.generated)))
        self._step_rows = []
        self.steps += 1
        self.observer.on_step(len(old) + len(newcomers), sched.n_waiting, prefill_tokens, len(old))
        return True

    def _history(self, seq: Sequence) -> torch.Tensor | None:
        if not seq.sampler.needs_history:
            return None
        return torch.tensor([seq.prompt_ids + seq.generated], dtype=torch.long, device=self.device)  # (1, n)

    def _emit(self, seq: Sequence, token: int, logprob: float, top: tuple = ()) -> None:
        seq.generated.append(token)
        text = seq.detok.add(token)
        reason = None
        if token in self._eos_ids and not seq.params.ignore_eos:
            reason = "eos_token"
        elif find_stop(seq.detok.text, len(text), seq.params.stop) >= 0:
            reason = "stop_sequence"
        elif len(seq.generated) >= seq.params.max_new_tokens or seq.cached_tokens + 1 >= self.config.max_total_tokens:
            reason = "length"
        if reason is not None:
            text += seq.detok.flush()
        prompt_lp = seq.prompt_logprobs if len(seq.generated) == 1 and seq.params.prompt_logprobs else None
        finite = logprob if math.isfinite(logprob) else None  # JSON has no NaN/Infinity
        seq.handle.push(TokenEvent(token, text, finite, reason, special=token in self._special_ids,
                                   top_tokens=top, prompt_logprobs=prompt_lp))
        if reason is not None:
            self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str, error: EngineError | None = None) -> None:
        """End a request (its handle records the outcome): free its slot pin now; its row is compacted at the
        next iteration."""
        if seq.handle.done:
            return
        if seq.admitted_at is not None and seq.slot:
            self.cache.release_slot(seq.slot)
            seq.slot = 0
        seq.handle.finish(reason, error)
        self._by_id.pop(seq.request_id, None)
        now = time.perf_counter()
        submitted_at = seq.handle.submitted_at
        self.observer.on_request_done(RequestStats(
            request_id=seq.request_id, adapter_id=seq.adapter_id, finish_reason=reason,
            prompt_tokens=len(seq.prompt_ids), generated_tokens=len(seq.generated),
            queue_seconds=(seq.admitted_at or now) - submitted_at,
            time_to_first_token=seq.handle.time_to_first_token, total_seconds=now - submitted_at,
            error=None if error is None else str(error)))


def _padding_groups(seqs: list[Sequence], max_waste: float = 0.2) -> list[list[Sequence]]:
    """Split length-sorted newcomers into consecutive prefill groups whose right-padding stays under `max_waste`
    of their real tokens (one forward per group; on CPU padded tokens cost as much as real ones). A request that
    asks for prompt log-probabilities gets a group of its own."""
    groups: list[list[Sequence]] = []
    real = 0
    for seq in seqs:
        n = len(seq.prompt_ids)
        if seq.params.prompt_logprobs:  # alone: its prefill keeps the logits of every position
            groups.append([seq])
            real = n
            continue
        joinable = bool(groups) and not groups[-1][0].params.prompt_logprobs
        if joinable and (len(groups[-1]) + 1) * n <= (1 + max_waste) * (real + n):
            groups[-1].append(seq)
            real += n
        else:
            groups.append([seq])
            real = n
    return groups
