"""`make serve`'s set-up: the embedded default model with the two shipped demo adapters, registered at first
start, whose effect is visible in the output."""
from __future__ import annotations

from fastapi.testclient import TestClient

from app.adapters.demo import demo_adapter_dirs
from app.server.main import create_app
from app.server.settings import Settings

SHOUT_PROMPT = "text: Return the list of items.\nshout:"
PIRATE_PROMPT = "text: Return the list of items.\npirate:"


def _gen(client, prompt, adapter_id):
    r = client.post("/generate", json={"inputs": prompt, "parameters": {"adapter_id": adapter_id,
                                                                        "max_new_tokens": 16}})
    assert r.status_code == 200, r.text
    return r.json()["generated_text"]


def test_demo_adapters_are_registered_once_and_change_the_output(tmp_path):
    assert sorted(demo_adapter_dirs()) == ["pirate", "shout"]
    settings = Settings(adapter_dir=tmp_path / "store")  # defaults: embedded model, demo adapters on
    with TestClient(create_app(settings)) as client:
        listed = {a["id"]: a for a in client.get("/adapters").json()["adapters"]}
        assert set(listed) == {"pirate", "shout"}
        assert all(a["kind"] == "olora-converted" and a["servable"] for a in listed.values())
        shout, base = _gen(client, SHOUT_PROMPT, "shout"), _gen(client, SHOUT_PROMPT, None)
        letters = [c for c in shout if c.isalpha()]
        assert letters and sum(c.isupper() for c in letters) / len(letters) > 0.8, shout
        assert shout != base
        pirate = _gen(client, PIRATE_PROMPT, "pirate")
        assert "Arr" in pirate or "matey" in pirate, pirate
        assert pirate != _gen(client, PIRATE_PROMPT, None)
    with TestClient(create_app(settings)) as client:  # second start: nothing re-registered, still there
        versions = {a["id"]: a["version"] for a in client.get("/adapters").json()["adapters"]}
        assert versions == {k: v["version"] for k, v in listed.items()}
