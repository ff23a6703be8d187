"""Admission policy: which waiting sequences join the running batch this iteration. A pure function of a view
of the queues (no locks, no device copies, no store reads), so every rule is tested without a model.

Rules, in this order:
* A sequence is *ready* when it runs on the base model or its adapter is in host memory (or already in a slot);
  a loading one waits without holding anyone up.
* Rows: at most `free_rows` sequences. Prefill budget: the padded prompt tokens of the newcomers,
  `(n + 1) * longest <= max_batch_tokens`, first newcomer always allowed; admission stops at the first that
  does not fit (it goes first next time).
* Slots: a sequence whose adapter is in host memory only needs a free slot (an empty one, or one whose adapter no
  running row uses) and a host -> slot copy; one whose adapter is in a slot nobody uses takes that slot out of the
  free ones without a copy; one whose adapter is in a slot running rows use joins it for nothing. Sequences that
  share an adapter share the slot.
* Preference with bounded unfairness: ready sequences that cost no copy (base, adapter already in a slot) go
  before those that need one, FIFO within each class; but a sequence that later arrivals have passed
  `max_bypass` times goes first, whatever it costs, and while it waits for a slot nobody passes it. So no ready
  sequence is passed more than `max_bypass` times.
* Evictions: `needed` lists the adapters of the sequences left waiting, in the order they will be needed; the
  slot cache evicts an adapter not in it first (least recently used), else the one needed last.

    plan = plan_admission(QueueView(waiting=(...), free_rows=2, free_slots=1, max_batch_tokens=2048))
    plan.admit -> indices into view.waiting, in admission order
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Literal

Residency = Literal["pinned", "slot", "host", "loading"]
MAX_BYPASS = 8  # admission rounds a ready sequence may be passed by later arrivals before it goes first


@dataclass(frozen=True)
class Candidate:
    """One waiting sequence as the policy sees it (FIFO position = its index in QueueView.waiting)."""

    prompt_tokens: int
    adapter: Hashable | None = None  # None = the base model
    residency: Residency = "pinned"  # of its adapter: in a slot running rows use / in an idle slot / host / loading
    bypassed: int = 0  # admission rounds in which a later arrival was admitted while this one was ready

    @property
    def ready(self) -> bool:
        return self.adapter is None or self.residency != "loading"


@dataclass(frozen=True)
class QueueView:
    waiting: tuple[Candidate, ...]  # FIFO order
    free_rows: int
    free_slots: int  # slots that are empty or hold an adapter no running row uses
    max_batch_tokens: int
    max_bypass: int = MAX_BYPASS


@dataclass(frozen=True)
class AdmissionPlan:
    admit: tuple[int, ...]  # indices into QueueView.waiting, in admission order (= row order before sorting)
    bypassed: tuple[int, ...]  # ready, not admitted, with a later arrival admitted: their `bypassed` grows by one
    needed: tuple[Hashable, ...]  # adapters of the sequences left waiting, first needed first (eviction order)


def _costs_copy(c: Candidate, chosen: set) -> bool:
    return c.adapter is not None and c.residency == "host" and c.adapter not in chosen


def plan_admission(view: QueueView) -> AdmissionPlan:
    """See the module docstring."""
    ready = [i for i, c in enumerate(view.waiting) if c.ready]
    starving = [i for i in ready if view.waiting[i].bypassed >= view.max_bypass]
    rest = [i for i in ready if view.waiting[i].bypassed < view.max_bypass]
    cheap = [i for i in rest if not _costs_copy(view.waiting[i], set())]
    costly = [i for i in rest if _costs_copy(view.waiting[i], set())]
    admit: list[int] = []
    slot_taken: set[Hashable] = set()  # adapters whose slot this plan has taken out of the free ones
    free_slots = view.free_slots
    longest = 0
    for i in starving + cheap + costly:
        c = view.waiting[i]
        if len(admit) >= view.free_rows:
            break
        longest_after = max(longest, c.prompt_tokens)
        if admit and (len(admit) + 1) * longest_after > view.max_batch_tokens:
            break  # padded prefill budget used up
        needs_slot = c.adapter is not None and c.residency in ("slot", "host") and c.adapter not in slot_taken
        if needs_slot:
            if free_slots <= 0:
                if c.bypassed >= view.max_bypass:
                    break  # a starving sequence waits for a slot: nobody passes it meanwhile
                continue  # every slot is pinned: it waits; later ones that share a running slot may still go
            free_slots -= 1
            slot_taken.add(c.adapter)
        longest = longest_after
        admit.append(i)
    admitted = set(admit)
    last = max(admit, default=-1)
    bypassed = tuple(i for i in ready if i not in admitted and i < last)
    needed: list[Hashable] = []
    for i, c in enumerate(view.waiting):
        if i not in admitted and c.adapter is not None and c.adapter not in needed:
            needed.append(c.adapter)
    return AdmissionPlan(admit=tuple(admit), bypassed=bypassed, needed=tuple(needed))
