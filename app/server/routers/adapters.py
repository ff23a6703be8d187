"""Adapter management: upload (multipart), list, show, delete, merge, merge-into-base."""
from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from app.adapters.service import AdapterSummary
from app.server.schemas import MAX_MERGE_SOURCES
from app.server.deps import State, policy
from app.server.route_policy import ADMIN, READ, UPLOAD

router = APIRouter(prefix="/adapters", tags=["adapters"])


class AdapterList(BaseModel):
    adapters: list[AdapterSummary]


class MergeSource(BaseModel):
    id: str
    weight: float = Field(1.0, allow_inf_nan=False)


class MergeRequest(BaseModel):
    adapter_id: str
    sources: list[MergeSource] = Field(min_length=1, max_length=MAX_MERGE_SOURCES)
    method: Literal["linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                    "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd"] = "cat"
    density: float | None = Field(None, gt=0, le=1)
    majority_sign_method: Literal["total", "frequency"] = "total"
    svd_rank: int | None = Field(None, ge=1)
    seed: int = Field(0, ge=0, lt=2**63)
    overwrite: bool = False


async def _spool(upload: UploadFile, directory: Path, name: str) -> Path:
    """Copy the upload to `directory / name`; the disk writes run in a worker thread, not on the event loop."""
    target = directory / name
    fh = await asyncio.to_thread(open, target, "wb")
    try:
        while chunk := await upload.read(1 << 20):
            await asyncio.to_thread(fh.write, chunk)
    finally:
        await asyncio.to_thread(fh.close)
    return target


@router.post("", status_code=201, response_model=AdapterSummary, dependencies=policy(UPLOAD))
async def upload_adapter(
    state: State,
    adapter_id: Annotated[str, Form(description="id to serve the adapter under")],
    archive: Annotated[UploadFile, File(description=".tar.gz/.tgz/.zip of a PEFT save_pretrained directory")],
    initial_archive: Annotated[UploadFile | None, File(description="untrained OLoRA/PiSSA checkpoint")] = None,
    overwrite: Annotated[bool, Query()] = False,
    # --- Beyond PEFT (docs/beyond-peft.md): recompute the OLoRA/PiSSA init from the served base; the
    # quantization-aware conversion (default for OLoRA on a quantized base; quant_aware=false for PEFT's)
    recompute_init: Annotated[bool, Query(description="no initial_archive: recompute the init from the base")] = False,
    recompute_init_field: Annotated[bool, Form(alias="recompute_init")] = False,
    init_dtype: Annotated[Literal["float32", "bfloat16", "float16"] | None, Form()] = None,
    quant_aware: Annotated[bool | None, Form()] = None,
) -> AdapterSummary:
    work = await asyncio.to_thread(state.adapters.staging_dir)
    try:
        trained = await _spool(archive, work, "trained.archive")
        initial = await _spool(initial_archive, work, "initial.archive") if initial_archive is not None else None
        summary = await asyncio.to_thread(state.adapters.upload, adapter_id, trained, initial, overwrite=overwrite,
                                          recompute_init=recompute_init or recompute_init_field, init_dtype=init_dtype,
                                          quant_aware=quant_aware)
    finally:
        await asyncio.to_thread(shutil.rmtree, work, ignore_errors=True)
    await state.recount_adapters()
    return summary


@router.get("", response_model=AdapterList, dependencies=policy(READ))
async def list_adapters(state: State) -> AdapterList:
    return AdapterList(adapters=await asyncio.to_thread(state.adapters.list))


@router.get("/{adapter_id}", response_model=AdapterSummary, dependencies=policy(READ))
async def show_adapter(adapter_id: str, state: State) -> AdapterSummary:
    return await asyncio.to_thread(state.adapters.get, adapter_id)


@router.delete("/{adapter_id}", response_model=AdapterSummary, dependencies=policy(ADMIN))
async def delete_adapter(adapter_id: str, state: State) -> AdapterSummary:
    """Running requests of the adapter finish; later ones get 404."""
    summary = await asyncio.to_thread(state.adapters.delete, adapter_id)
    await state.recount_adapters()
    return summary


@router.post("/merge", status_code=201, response_model=AdapterSummary, dependencies=policy(ADMIN))
async def merge_adapters(body: MergeRequest, state: State) -> AdapterSummary:
    """PEFT `add_weighted_adapter` semantics. Ranks: `cat` sums them (exact weighted sum of the deltas);
    `linear`/`ties`/`dare_*`/`magnitude_prune` need equal ranks; `*svd` truncate to `svd_rank` (default: the
    largest source rank). The result must fit `max_rank`."""
    summary = await asyncio.to_thread(
        state.adapters.merge, body.adapter_id, [(s.id, s.weight) for s in body.sources], body.method,
        density=body.density, majority_sign_method=body.majority_sign_method, svd_rank=body.svd_rank,
        seed=body.seed, overwrite=body.overwrite)
    await state.recount_adapters()
    return summary


@router.post("/{adapter_id}/merge-into-base", dependencies=policy(ADMIN),
             responses={200: {"content": {"application/x-tar": {}}}})
async def merge_into_base(adapter_id: str, state: State) -> StreamingResponse:
    """A standalone model (base + adapter merged; safetensors, config, tokenizer) streamed as a tar.
    Memory-bounded: the base is read one tensor at a time from its original safetensors files."""
    from olora_core.merge_into_base import iter_merged_model_tar

    stored = await asyncio.to_thread(state.adapters.stored, adapter_id)
    # The store keeps a version this stream reads (`reading`), so an overwrite during the stream does not cut it.
    def held():
        with state.adapters.reading(stored) as path:
            yield from iter_merged_model_tar(state.engine.base.path, path)

    return StreamingResponse(  # a sync iterator: Starlette runs it in its threadpool
        held(), media_type="application/x-tar",
        headers={"Content-Disposition": f'attachment; filename="{adapter_id}-merged.tar"'})
