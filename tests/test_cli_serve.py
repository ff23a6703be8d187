"""`olora serve --help` shows the real defaults and choices; a bad value is one clear line, not a pydantic dump;
/docs and /redoc work offline."""
from __future__ import annotations

import re
import socket
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.server.cli_serve import build_parser, main
from app.server.main import create_app
from app.server.settings import Settings
from helpers import save_tiny_checkpoint
from server_process import Replica


def test_help_shows_real_defaults_and_choices():
    text = " ".join(build_parser().format_help().split())  # argparse wraps lines
    assert "(default: None)" not in text
    assert "{auto,bf16,fp16,fp32}" in text and "{none,nf4,fp4,int8}" in text
    for default in ("default: 8000)", "default: 127.0.0.1)", "default: adapters)", "default: 0)", "default: 64)"):
        assert default in text, default


def status_of(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own refusals (type, choices)
        return exc.code


@pytest.mark.parametrize("argv, names", [
    (["--port", "abc"], "--port"), (["--dtype", "fp64"], "fp64"),
    (["--max-loras", "-1"], "--max-loras / OLORA_MAX_LORAS"), (["--max-rank", "-3"], "--max-rank")])
def test_bad_value_is_one_clear_line(argv, names, capsys):
    assert status_of(argv) == 2
    err = capsys.readouterr().err.strip()
    assert names in err and len(err.splitlines()) == 1 and err.startswith("error:")
    assert "validation error" not in err and "https://errors.pydantic.dev" not in err


def test_env_values_are_checked_the_same_way(monkeypatch, capsys):
    monkeypatch.setenv("OLORA_MAX_BATCH_SIZE", "-1")
    assert main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: invalid setting: --max-batch-size / OLORA_MAX_BATCH_SIZE") and "\n" not in err


def test_docs_pages_work_offline(tmp_path):
    """/docs and /redoc load every asset from this server (no CDN): the pages work without a network."""
    client = TestClient(create_app(Settings(demo_adapters=False, adapter_dir=tmp_path)))  # no lifespan: no model
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        assets = re.findall(r"""(?:src|href)=["']([^"']+)["']|url: ?["']([^"']+)["']""", html)
        urls = [a or b for a, b in assets]
        assert urls and not [u for u in urls if u.startswith(("http:", "https:", "//"))], (page, urls)
        for url in urls:
            assert client.get(url).status_code == 200, url


def test_a_second_serve_on_a_busy_port_does_not_collide(tmp_path, capsys):
    """The README tour's `make serve &` while the set-up's server runs: says so and exits 0; another program on
    the port: a one-line error."""
    server = Replica("server", Path(save_tiny_checkpoint(tmp_path / "base")), tmp_path / "store", tmp_path)
    try:
        server.wait_ready()
        assert main(["--port", str(server.port), "--no-demo-adapters"]) == 0
        assert "already running" in capsys.readouterr().err
        assert server.proc.poll() is None and httpx.get(server.url + "/health").status_code == 200
    finally:
        server.stop()
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        assert main(["--port", str(other.getsockname()[1])]) == 2
        assert "in use by another program" in capsys.readouterr().err
