"""Adapter registration: upload (archive -> checks -> OLoRA/PiSSA conversion -> engine check -> store), list,
delete, merge. No web framework here: routers call these methods and map the typed errors to 4xx bodies.

Order of an upload, each step before anything is written to the store:
  1. the id is checked, the archive is extracted into a private staging dir (links, `..`, bombs refused);
  2. olora_core reads it: safetensors only (pickles refused unopened), a LoRA config without code keys,
     float finite tensors;
  3. the upload plan is chosen once (app/adapters/upload_plan.py: plain, PEFT conversion, quantization-aware,
     recomputed init) from the request, the adapter's kind and the served base (`engine.base`); OLoRA/PiSSA
     adapters are converted to plain LoRA with their initial checkpoint (without it the base would have to be
     mutated, which a shared base cannot be), after checking that the checkpoint is the init of *this* base
     (olora_core.provenance: 422 naming the layer and the distance otherwise), or with their init recomputed;
  4. the engine checks it against the served base (targets exist, shapes, rank <= max_rank);
  5. the store commits it atomically, bound to the base fingerprint; the engine forgets an older version.
Warnings (a config naming another base model, an init whose provenance cannot be checked, recompute_init's notes)
are stored in metadata.json and returned by the upload and by GET /adapters/{id}.
"""
from __future__ import annotations

import contextlib
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Any

from olora_core.adapter_io import (CONFIG_NAME, MUTATED_INIT_KINDS, WEIGHTS_NAME, adapter_kind, load_adapter_dir,
                                   save_adapter_dir)
from olora_core.default_model import sha256_of_file
from olora_core.convert import convert

from app.adapters.index import AdapterIndex
from app.adapters.merge_plan import MergeLimits, plan_merge
from app.engine.errors import AdapterUnavailable
from app.adapters.store.adapter_store import AdapterMissing, StoredAdapter, check_adapter_id
from app.adapters.store.archive import ArchiveLimits, extract_archive
from app.adapters.upload_plan import UploadPath, UploadPlan, UploadRefused, UploadRequest, choose_plan

if TYPE_CHECKING:
    from app.engine.engine import Engine


@dataclass
class AdapterSummary:
    """What the API reports about a stored adapter (also the response body of the /adapters routes)."""

    id: str
    kind: str
    rank: int
    alpha: float
    target_modules: list[str]
    sha256: str
    size_bytes: int
    base_fingerprint: str
    created: float
    version: str
    servable: bool
    sources: list[dict] | None = None
    problem: str | None = None
    warnings: list[str] = field(default_factory=list)
    tier: str = "disk"  # where it is now: "device" (a slot), "host" (host-memory cache) or "disk" (the store only)


def _norm_name(name: str) -> str:
    """The last part of a model name or path, lower-cased, without punctuation."""
    return re.sub(r"[^a-z0-9]", "", name.rstrip("/").rsplit("/", 1)[-1].lower())


class AdapterService:
    def __init__(self, repository, engine: Engine, archive_limits: ArchiveLimits,
                 index: AdapterIndex | None = None, max_merge_sources: int = 16):
        """`repository`: the AdapterRepository adapters are written to (app/adapters/repository.py; the local
        directory store by default); `index`: its in-memory index (built here when not given)."""
        self.repository = repository
        self.index = index if index is not None else AdapterIndex(repository)
        self.engine = engine
        self.archive_limits = archive_limits
        self.max_merge_sources = max_merge_sources

    # ---- reading ---------------------------------------------------------------------------------------
    def summary(self, stored: StoredAdapter, stats=None) -> AdapterSummary:
        """`stats`: the engine's stats when summarizing many adapters (read once for all of them)."""
        meta = stored.metadata
        bound, served = meta.get("base_fingerprint", ""), self.engine.base.fingerprint
        load_error = self.engine.cache.load_error(stored.adapter_id)  # its last load failed (and still stands)
        problem = stored.problem or (str(load_error) if load_error is not None else None) or (
            None if bound == served else f"adapter {stored.adapter_id!r} is bound to base {bound}, this server "
                                         f"serves {served}")
        servable = problem is None
        stats = stats if stats is not None else self.engine.stats()
        tier = ("device" if stored.adapter_id in stats.slot_adapters else
                "host" if stored.adapter_id in stats.host_adapter_ids else "disk")
        return AdapterSummary(
            id=stored.adapter_id, kind=meta.get("kind", "lora"), rank=int(meta.get("rank", 0)),
            alpha=float(meta.get("alpha", 0)), target_modules=list(meta.get("target_modules", [])),
            sha256=meta.get("sha256", ""), size_bytes=int(meta.get("size_bytes", 0)), base_fingerprint=bound,
            created=float(meta.get("created", 0)), version=stored.version, servable=servable,
            sources=meta.get("sources"), problem=problem, warnings=list(meta.get("warnings") or []), tier=tier)

    def get(self, adapter_id: str) -> AdapterSummary:
        stored = self.index.lookup(adapter_id)
        if stored is None:
            raise AdapterMissing(f"adapter {adapter_id!r} not found")
        return self.summary(stored)

    def list(self) -> list[AdapterSummary]:
        """From the in-memory index: no repository read."""
        stats = self.engine.stats()
        return [self.summary(s, stats) for s in self.index.all()]

    def stored(self, adapter_id: str) -> StoredAdapter:
        """The live version of `adapter_id` as a local folder (AdapterMissing if there is none)."""
        stored = self.index.lookup(adapter_id)
        if stored is None:
            raise AdapterMissing(f"adapter {adapter_id!r} not found")
        return self.repository.localize(stored)

    def reading(self, stored: StoredAdapter):
        """Hold a version folder while a long stream reads it (the store's sweep leaves it alone meanwhile)."""
        return self.repository.reading(stored)

    @contextlib.contextmanager
    def held(self, adapter_id: str, what: str) -> Iterator[StoredAdapter]:
        """The live version of `adapter_id`, its files on this machine and held while the caller reads them: a
        delete or overwrite racing the reader (a merge reading its sources) cannot remove them in between.
        AdapterMissing / AdapterUnavailable (damaged in the store) name `what`."""
        try:
            with self.repository.held(adapter_id) as stored:
                if stored.problem is not None:
                    raise AdapterUnavailable(f"{what} is damaged in the store ({stored.problem})")
                yield stored
        except AdapterMissing:
            raise AdapterMissing(f"{what} not found") from None

    def staging_dir(self) -> Path:
        """A fresh private work folder (on the local store's filesystem: its renames are atomic)."""
        return self.repository.staging_dir()

    # ---- writing ---------------------------------------------------------------------------------------
    def upload(self, adapter_id: str, archive: Path, initial_archive: Path | None = None, *,
               overwrite: bool = False, recompute_init: bool = False, init_dtype: str | None = None,
               quant_aware: bool | None = None, origin: dict[str, Any] | None = None) -> AdapterSummary:
        """`origin`: where the archives came from when not from a client (an on-demand load), kept in metadata."""
        check_adapter_id(adapter_id)
        request = UploadRequest(adapter_id, initial_archive is not None, recompute_init, init_dtype, quant_aware)
        work = self.repository.staging_dir()
        try:
            (work / "trained").mkdir()
            trained_dir = extract_archive(archive, work / "trained", self.archive_limits)
            files = load_adapter_dir(trained_dir)
            kind = adapter_kind(files.config, files.tensors)
            plan = choose_plan(request, kind, files.config.get("init_lora_weights"), self.engine.base.quantization)
            initial_dir = None
            if initial_archive is not None:  # the plan has refused it unless it needs it
                (work / "initial").mkdir()
                initial_dir = extract_archive(initial_archive, work / "initial", self.archive_limits)
            if plan.path is UploadPath.PLAIN:
                adapter_dir, extra = trained_dir, {"warnings": self._base_name_warnings(files.config)}
            else:
                adapter_dir, extra = work / "converted", self._convert(plan, work, trained_dir, initial_dir,
                                                                    files.config)
            if origin:
                extra = dict(extra, origin=origin)
            return self._commit(adapter_id, adapter_dir, plan.stored_kind, overwrite, extra)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _convert(self, plan: UploadPlan, work: Path, trained_dir: Path, initial_dir: Path | None,
                 config: dict) -> dict[str, Any]:
        """Run the plan's conversion into `work / "converted"`; returns the metadata it adds."""
        out = work / "converted"
        base_dir = self.engine.base.path  # always a local directory (resolved when the engine loaded it)
        if plan.path is UploadPath.PEFT_CONVERSION:
            notes = self._check_provenance(initial_dir, plan.init_dtype)
            convert(initial_dir, trained_dir, out)
            return {"warnings": notes + self._base_name_warnings(config)}
        # quantization-aware conversion / init recomputation (docs/beyond-peft.md)
        from olora_core.quant_convert import convert_quant_aware
        from olora_core.recompute_init import convert_recomputed

        spec = plan.quantization
        extra: dict[str, Any] = {"conversion": f"quant_aware:{spec.kind}" if spec is not None else "peft"}
        if plan.path is UploadPath.RECOMPUTED_INIT:
            dtype = plan.init_dtype or (str(spec.dtype).removeprefix("torch.") if spec is not None else "float32")
            report = convert_recomputed(trained_dir, Path(base_dir), out, init_dtype=dtype,
                                        quantization=spec if spec is not None else "none", emit_warnings=False,
                                        local_paths=False)
            extra.update(init="recomputed", init_dtype=dtype, warnings=report.warnings)
            conversion = report.conversion
        else:  # UploadPath.QUANT_AWARE
            extra["warnings"] = self._check_provenance(initial_dir, plan.init_dtype)
            conversion = convert_quant_aware(initial_dir, trained_dir, out, Path(base_dir), spec)
        if hasattr(conversion, "max_rel_error"):
            extra.update(max_rel_error=conversion.max_rel_error, max_peft_rel_error=conversion.max_peft_rel_error)
        return extra

    # ---- where the adapter comes from (olora_core/provenance.py, recompute_init.check_base_name) ---------------
    def _check_provenance(self, initial_dir: Path, init_dtype: str | None) -> list[str]:
        """Raises ProvenanceError (422) unless the initial checkpoint is OLoRA's/PiSSA's init of this base."""
        from olora_core.provenance import check_initial_provenance

        base = self.engine.base
        return check_initial_provenance(load_adapter_dir(initial_dir), base.path,
                                        init_dtype=init_dtype or "float32", quantization=base.quantization)

    def _base_name_warnings(self, config: dict) -> list[str]:
        """A base_model_name_or_path naming another model than the served one: accepted, with a warning. The name
        is compared as text only (a client's path is never looked at on this machine)."""
        name = config.get("base_model_name_or_path")
        if not isinstance(name, str) or not name:
            return []
        base = self.engine.base
        served = (base.name, str(base.path))
        if name in served or _norm_name(name) in {_norm_name(s) for s in served}:
            return []
        return [f"the adapter config names base model {name[:200]!r}, but this server serves "
                f"{Path(base.name).name!r}: an adapter is only right on the base it was trained on"]

    def register_dir(self, adapter_id: str, adapter_dir: Path, kind: str, *, overwrite: bool = False,
                     extra: dict[str, Any] | None = None) -> AdapterSummary:
        """Register a plain-LoRA directory this server produced or ships (demo adapters, merges)."""
        check_adapter_id(adapter_id)
        files = load_adapter_dir(adapter_dir)
        if adapter_kind(files.config, files.tensors) in MUTATED_INIT_KINDS:
            raise UploadRefused(f"{adapter_dir}: unconverted OLoRA/PiSSA adapter; convert it first")
        return self._commit(adapter_id, Path(adapter_dir), kind, overwrite, extra)

    def _commit(self, adapter_id: str, adapter_dir: Path, kind: str, overwrite: bool,
                extra: dict[str, Any] | None = None) -> AdapterSummary:
        info = self.engine.validate_adapter(adapter_dir)  # raises AdapterRejected subclasses (422)
        config = json.loads((adapter_dir / CONFIG_NAME).read_text())
        weights = adapter_dir / WEIGHTS_NAME
        metadata = dict(
            kind=kind, rank=info.rank, alpha=config.get("lora_alpha"), target_modules=list(info.target_kinds),
            use_rslora=info.use_rslora, sha256=sha256_of_file(weights), size_bytes=weights.stat().st_size,
            base_fingerprint=self.engine.base.fingerprint, created=time.time(), **(extra or {}))
        stored = self.repository.put(adapter_id, adapter_dir, metadata, overwrite=overwrite)
        self.index.note(stored)
        self.engine.invalidate(adapter_id)
        return self.summary(stored)

    def delete(self, adapter_id: str) -> AdapterSummary:
        stored = self.repository.delete(adapter_id)
        self.index.forget(adapter_id)
        self.engine.invalidate(adapter_id)
        return self.summary(stored)

    def merge(self, adapter_id: str, sources: list[tuple[str, float]], method: str, *, density: float | None = None,
              majority_sign_method: str = "total", svd_rank: int | None = None, seed: int = 0,
              overwrite: bool = False) -> AdapterSummary:
        """PEFT's add_weighted_adapter over stored adapters. The bounds (app/adapters/merge_plan.py: source count,
        duplicates, merged rank) are checked on the store's metadata first; each source is held while read."""
        from olora_core.merge import merge_adapters

        check_adapter_id(adapter_id)
        limits = MergeLimits(self.max_merge_sources, self.engine.config.max_rank)
        plan = plan_merge(sources, method, svd_rank, limits, self._source_rank)
        with contextlib.ExitStack() as held:
            loaded = []
            for source_id, weight in plan:
                stored = held.enter_context(self.held(source_id, f"merge source adapter {source_id!r}"))
                loaded.append((load_adapter_dir(stored.path), float(weight)))
            config, tensors = merge_adapters(loaded, method, density=density,
                                             majority_sign_method=majority_sign_method, svd_rank=svd_rank, seed=seed)
        work = self.repository.staging_dir()
        try:
            save_adapter_dir(work / "merged", config, tensors)
            extra = {"sources": [{"id": i, "weight": w} for i, w in plan], "merge_method": method}
            return self._commit(adapter_id, work / "merged", "merged", overwrite, extra)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _source_rank(self, source_id: str) -> int:
        stored = self.index.lookup(source_id)
        if stored is None:
            raise AdapterMissing(f"merge source adapter {source_id!r} not found")
        return int(stored.metadata.get("rank", 0))
