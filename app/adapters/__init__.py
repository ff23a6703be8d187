"""The adapter domain: the store, uploads, per-request merges, the engine's adapter source, demo adapters."""
