"""vLLM-compatible adapter management (admin key), for the sidecars and controllers written for vLLM (the Gateway
API inference extension's former LoRA syncer sidecar, production-stack's LoRA controller):

    POST /v1/load_lora_adapter   {"lora_name": "x", "lora_path": "/adapters/x", "load_inplace": false}
        200 text "Success: LoRA adapter 'x' added successfully."
        400 both fields are needed / the name is already loaded (unless load_inplace) / a path outside the roots
    POST /v1/unload_lora_adapter {"lora_name": "x"}
        200 text "Success: LoRA adapter 'x' removed successfully."   404 the name is not loaded

`lora_path` is accepted only inside a configured folder of PEFT saves: `OLORA_PEFT_DIRS`, as a path or a
`file://` URI, or `OLORA_PEFT_S3_URIS`, as `s3://<bucket>/<prefix>/<id>` (the bucket and prefix of one of them,
one adapter folder below it); anything else (another bucket, a deeper or shallower key) is refused before it is
looked at further. The folder is loaded through the
upload path (app/adapters/on_demand.py): the same archive checks, conversion, provenance rule and refusals.
Unloading deletes the adapter from the store; an id that a configured folder still holds is loaded again on its
next request, as vLLM's filesystem resolver does.
"""
from __future__ import annotations

import asyncio
import functools
import os
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from app.adapters.store.adapter_store import AdapterExists, AdapterMissing, check_adapter_id
from app.adapters.store.s3_peft_folder import S3PeftFolderRepository
from app.server.deps import State, policy
from app.server.route_policy import ADMIN

router = APIRouter(prefix="/v1", tags=["vllm"])


class LoadLoRAAdapterRequest(BaseModel):
    lora_name: str = ""
    lora_path: str = ""
    load_inplace: bool = False  # vLLM: replace an adapter already loaded under this name


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str = ""
    lora_int_id: int | None = None  # accepted for vLLM's schema; names identify adapters here


def allowed_folder(lora_path: str, roots: list[Path]) -> Path:
    """The real folder `lora_path` names, if it lies inside one of `roots` (links resolved first); else 400."""
    raw = lora_path.removeprefix("file://")
    if not roots:
        raise HTTPException(400, "lora_path can only name a folder inside OLORA_PEFT_DIRS, and none is configured")
    if not os.path.isabs(raw) or "\x00" in raw:
        raise HTTPException(400, "lora_path must be an absolute path or file:// URI inside OLORA_PEFT_DIRS")
    real = Path(os.path.realpath(raw))
    for root in roots:
        root_real = Path(os.path.realpath(root))
        if real != root_real and real.is_relative_to(root_real):
            return real
    raise HTTPException(400, "lora_path is outside the configured adapter folders (OLORA_PEFT_DIRS)")


def allowed_s3_save(lora_path: str, sources: list) -> tuple[S3PeftFolderRepository, str]:
    """The bucket source and the id `lora_path` (s3://bucket/prefix/<id>) names inside it; else 400."""
    for source in sources:
        if isinstance(source, S3PeftFolderRepository):
            source_id = source.id_of_uri(lora_path)
            if source_id is not None:
                return source, source_id
    raise HTTPException(400, "lora_path is not an adapter folder inside the configured buckets (OLORA_PEFT_S3_URIS)")


@router.post("/load_lora_adapter", response_class=PlainTextResponse, dependencies=policy(ADMIN))
async def load_lora_adapter(body: LoadLoRAAdapterRequest, state: State) -> PlainTextResponse:
    if not body.lora_name or not body.lora_path:
        raise HTTPException(400, "Both 'lora_name' and 'lora_path' must be provided.")
    check_adapter_id(body.lora_name)
    origin = {"path": body.lora_path, "via": "load_lora_adapter"}  # no "source": never evicted from the cache
    if body.lora_path.startswith("s3://"):
        source, source_id = allowed_s3_save(body.lora_path, state.loader.sources)
        if await asyncio.to_thread(source.resolve, source_id) is None:
            raise HTTPException(404, f"No adapter found at {body.lora_path!r}")
        load = functools.partial(state.loader.load_source, body.lora_name, source, source_id)
    else:
        folder = allowed_folder(body.lora_path, state.settings.peft_dirs)
        if not folder.is_dir():
            raise HTTPException(404, f"No adapter found at {body.lora_path!r}")
        origin["path"] = str(folder)
        load = functools.partial(state.loader.load_folder, body.lora_name, folder)
    try:
        await asyncio.to_thread(load, overwrite=body.load_inplace, origin=origin)
    except AdapterExists:
        raise HTTPException(400, f"The lora adapter '{body.lora_name}' has already been loaded.") from None
    await state.recount_adapters()
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/unload_lora_adapter", response_class=PlainTextResponse, dependencies=policy(ADMIN))
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, state: State) -> PlainTextResponse:
    if not body.lora_name:
        raise HTTPException(400, "either 'lora_name' and 'lora_int_id' needs to be provided.")
    try:
        await asyncio.to_thread(state.adapters.delete, body.lora_name)
    except AdapterMissing:
        raise HTTPException(404, f"The lora adapter '{body.lora_name}' cannot be found.") from None
    await state.recount_adapters()
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
