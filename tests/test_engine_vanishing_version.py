"""A version folder that vanishes between the id's lookup and the read of its config (the adapter deleted or
overwritten meanwhile) is looked up once more: deleted -> 404 AdapterNotFound, overwritten -> the new version is
served; files of the live version that still cannot be read are the server's fault (AdapterUnavailable, 503), never
the client's (422 adapter_rejected)."""
from __future__ import annotations

import pytest
from helpers import save_random_lora, save_tiny_checkpoint

from app.engine import Engine, EngineConfig
from app.engine.errors import AdapterNotFound, AdapterUnavailable
from app.engine.sampling import SamplingParams


class Answers:
    """An AdapterSource answering `paths` in turn (the last one from then on)."""

    def __init__(self, *paths):
        self.paths = list(paths)

    def path_for(self, adapter_id):
        return self.paths.pop(0) if len(self.paths) > 1 else self.paths[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("vanishing")
    base = save_tiny_checkpoint(root / "base")
    return base, save_random_lora(base, root / "live", r=4, seed=1), root / "gone"  # "gone" never exists


def engine_with(base, source) -> Engine:
    engine = Engine(EngineConfig(model=base, dtype="fp32", device="cpu", max_loras=1, max_rank=8, max_batch_size=2,
                                 max_input_tokens=16, max_total_tokens=32, max_batch_tokens=64), source)
    engine.start()
    return engine


@pytest.mark.parametrize("second, outcome", [(None, AdapterNotFound), ("gone", AdapterUnavailable), ("live", None)])
def test_a_version_gone_before_its_config_is_read(files, second, outcome):
    base, live, gone = files
    engine = engine_with(base, Answers(gone, {"gone": gone, "live": live, None: None}[second]))
    try:
        submit = lambda: engine.submit([5, 9, 200], "hot", SamplingParams(max_new_tokens=2))  # noqa: E731
        if outcome is None:
            assert len(submit().result().token_ids) == 2  # the newer version, served
        else:
            with pytest.raises(outcome):
                submit()
    finally:
        engine.shutdown()
