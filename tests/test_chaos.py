"""Real `olora serve` processes: keys are checked before an upload's body is read, concurrent uploads are bounded,
and a server killed with SIGKILL during an upload, a merge and a stream restarts onto a clean, consistent store
that still serves PEFT's greedy output."""
from __future__ import annotations

import io
import json
import os
import socket
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from helpers import save_random_lora
from http_helpers import peft_greedy_text, tar_gz
from server_process import Replica
from test_http_api import base_dir  # noqa: F401 - fixture

PROMPT = "Return the number of items"
BOUNDARY = "olora-chaos-boundary"


def _multipart_head(adapter_id: str, declared_archive_bytes: int) -> tuple[bytes, bytes, int]:
    """(the bytes before the archive, the closing bytes, the total Content-Length) of an upload body."""
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"adapter_id\"\r\n\r\n{adapter_id}\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"archive\"; filename=\"a.tgz\"\r\n"
            "Content-Type: application/gzip\r\n\r\n").encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    return head, tail, len(head) + declared_archive_bytes + len(tail)


def _start_upload(url: str, adapter_id: str, declared: int, headers: dict | None = None,
                  first: bytes = b"") -> socket.socket:
    """Open a raw connection and send an upload's headers, the form's head and `first` archive bytes only."""
    host, port = url.removeprefix("http://").split(":")
    head, _, length = _multipart_head(adapter_id, declared)
    sock = socket.create_connection((host, int(port)), timeout=15)
    lines = ["POST /adapters HTTP/1.1", f"Host: {host}", f"Content-Length: {length}",
             f"Content-Type: multipart/form-data; boundary={BOUNDARY}",
             *[f"{k}: {v}" for k, v in (headers or {}).items()]]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + head + first)
    return sock


def _read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


@pytest.fixture(scope="module")
def lora_dir(base_dir, tmp_path_factory) -> Path:
    return Path(save_random_lora(base_dir, tmp_path_factory.mktemp("lora") / "good", r=4, seed=1,
                                 task_type="CAUSAL_LM"))


@pytest.fixture(scope="module")
def keyed_server(base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("keyed")
    server = Replica("keyed", base_dir, root / "store", root, extra_env={
        "OLORA_API_KEYS": "user-key", "OLORA_ADMIN_KEYS": "admin-key", "OLORA_MAX_CONCURRENT_UPLOADS": "1"})
    server.wait_ready()
    yield server, root / "store"
    server.stop()


@pytest.mark.parametrize("headers,status", [({}, 401), ({"Authorization": "Bearer wrong"}, 401),
                                            ({"Authorization": "Bearer user-key"}, 403)])
def test_upload_is_refused_before_its_body_is_read(keyed_server, headers, status):
    """10.5: 150 MiB declared, 64 KiB sent: the refusal arrives without the server waiting for (or spooling) it."""
    server, store = keyed_server
    sock = _start_upload(server.url, "x", 150 << 20, headers, first=os.urandom(64 << 10))
    try:
        got, response_headers, body = _read_response(sock)
    finally:
        sock.close()
    assert got == status and response_headers["content-type"] == "application/json"
    assert json.loads(body)["error_type"] in ("unauthorized", "forbidden")
    assert list((store / ".staging").iterdir()) == []


def test_concurrent_uploads_are_bounded(keyed_server, lora_dir):
    server, _ = keyed_server
    admin = {"Authorization": "Bearer admin-key"}
    slow = _start_upload(server.url, "slow", 10 << 20, admin, first=b"\x1f\x8b")  # holds the one upload place
    try:
        time.sleep(0.5)
        files = {"archive": ("a.tgz", tar_gz(lora_dir), "application/gzip")}
        r = httpx.post(server.url + "/adapters", data={"adapter_id": "second"}, files=files, headers=admin,
                       timeout=30)
        assert r.status_code == 429 and r.headers["retry-after"] and r.json()["error_type"] == "too_many_requests"
    finally:
        slow.close()
    deadline = time.monotonic() + 20
    while True:  # the place is given back once the server sees the first client gone
        r = httpx.post(server.url + "/adapters", data={"adapter_id": "second"}, files=files, headers=admin,
                       timeout=30)
        if r.status_code != 429 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.status_code == 201, r.text


def _junk_archive(lora_dir: Path, megabytes: int) -> bytes:
    """A valid adapter plus an incompressible extra member: large enough that spooling it takes a moment."""
    buf = io.BytesIO(tar_gz(lora_dir))
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue()), mode="r:gz") as src:
        members = [(m, src.extractfile(m).read() if m.isfile() else None) for m in src.getmembers()]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz", compresslevel=1) as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data) if data is not None else None)
        noise = os.urandom(megabytes << 20)
        info = tarfile.TarInfo("adapter/README.bin")
        info.size = len(noise)
        tar.addfile(info, io.BytesIO(noise))
    return out.getvalue()


def _wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def _check_store(store: Path) -> list[str]:
    """Every adapter's CURRENT names a complete version; nothing but complete versions and retired ones."""
    ids = []
    for child in sorted(store.iterdir()):
        if child.name.startswith("."):
            continue
        current = (child / "CURRENT").read_text().strip()
        for name in ("adapter_config.json", "adapter_model.safetensors", "metadata.json"):
            assert (child / current / name).is_file(), (child, current, name)
        json.loads((child / current / "metadata.json").read_text())
        ids.append(child.name)
    return ids


def test_kill_9_during_upload_merge_and_stream_leaves_a_clean_store(keyed_server, base_dir, lora_dir, tmp_path):
    """One SIGKILL while an upload is being written into staging, a merge and a stream are in flight (the server
    of the tests above, so no extra start); the restarted server finds a clean, consistent store."""
    server, store = keyed_server
    admin = {"Authorization": "Bearer admin-key"}
    files = {"archive": ("a.tgz", tar_gz(lora_dir), "application/gzip")}
    r = httpx.post(server.url + "/adapters", data={"adapter_id": "good"}, files=files, headers=admin, timeout=60)
    assert r.status_code == 201, r.text
    expected = peft_greedy_text(base_dir, lora_dir, PROMPT, 6)
    with httpx.Client(base_url=server.url, timeout=60, headers=admin) as c:
        stream = c.stream("POST", "/generate_stream", json={"inputs": PROMPT, "parameters": {
            "adapter_id": "good", "max_new_tokens": 100, "ignore_eos_token": True}})
        events = stream.__enter__().iter_lines()
        assert next(events).startswith("data:")  # the stream is running
        archive = _junk_archive(lora_dir, 48)
        _, tail, _ = _multipart_head("big", len(archive))
        upload = _start_upload(server.url, "big", len(archive), admin)
        upload.sendall(archive + tail)
        assert _wait_for(lambda: any((store / ".staging").iterdir()), 60), "the upload never reached staging"
        merge = c.stream("POST", "/adapters/merge", json={
            "adapter_id": "blend", "sources": [{"id": "good", "weight": 0.5}, {"id": "good", "weight": 0.5}],
            "method": "cat"})
        merge_thread = __import__("threading").Thread(target=lambda: _swallow(merge.__enter__))
        merge_thread.start()
        time.sleep(0.05)
        server.kill()
        merge_thread.join(30)
        upload.close()
    assert any((store / ".staging").iterdir())  # debris of the killed writer

    restarted = Replica("after-kill", base_dir, store, tmp_path, extra_env={
        "OLORA_API_KEYS": "user-key", "OLORA_ADMIN_KEYS": "admin-key"})
    try:
        restarted.wait_ready()
        assert list((store / ".staging").iterdir()) == []  # cleaned at start
        ids = _check_store(store)
        assert "good" in ids and "big" not in ids and set(ids) <= {"good", "second", "blend"}
        with httpx.Client(base_url=restarted.url, timeout=60, headers=admin) as c:
            assert c.get("/health").status_code == 200
            assert {a["id"] for a in c.get("/adapters").json()["adapters"]} == set(ids)
            r = c.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "good",
                                                                            "max_new_tokens": 6}})
            assert r.json()["generated_text"] == expected
    finally:
        restarted.stop()


def _swallow(call) -> None:
    try:
        call()
    except httpx.HTTPError:
        pass  # the server was killed under it
