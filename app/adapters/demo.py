"""The two demo adapters shipped in the repo (trained with `olora train` on the embedded default model and
converted to plain LoRA). Registered at first start when the server runs the embedded default model."""
from __future__ import annotations

import logging
from pathlib import Path

from app.adapters.service import AdapterService
from app.adapters.store.adapter_store import AdapterExists

DEMO_DIR = Path(__file__).parent / "demo_adapters"
log = logging.getLogger("olora.server")


def demo_adapter_dirs() -> dict[str, Path]:
    if not DEMO_DIR.is_dir():
        return {}
    return {d.name: d for d in sorted(DEMO_DIR.iterdir()) if (d / "adapter_config.json").is_file()}


def register_demo_adapters(service: AdapterService, base_model: str | None) -> list[str]:
    """Register every demo adapter the store does not have yet; returns the ids registered now.

    `base_model` is the served model setting: None is the embedded default model the demos were trained on."""
    if base_model is not None:
        return []  # trained for the embedded model only
    registered = []
    for adapter_id, path in demo_adapter_dirs().items():
        if service.index.lookup(adapter_id) is not None:
            continue
        try:
            service.register_dir(adapter_id, path, "olora-converted", extra={"demo": True})
        except AdapterExists:
            continue  # another replica sharing the store registered it first
        except OSError as exc:  # a read-only store: serve what it holds
            log.warning("demo adapter %s not registered: the adapter store cannot be written (%s)", adapter_id,
                        exc.strerror)
            return registered
        registered.append(adapter_id)
        log.info("registered demo adapter %s", adapter_id)
    return registered
