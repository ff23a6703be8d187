"""HTTP edges and connection limits on a real `olora serve` (raw sockets on loopback): one spelling per path for the
key check, the limits and the routers; chunked bodies over the limit are 413; Content-Length + Transfer-Encoding
is refused and the connection closed; HEAD works where GET does; connections that do not send their headers are
closed; a stalled upload gets 408 and frees its upload slot; past the connection cap new requests get 503."""
from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import pytest

from helpers import save_tiny_checkpoint
from server_process import Replica

KEY = "edge-key"
HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
MAX_REQUEST_BYTES = 4096
CLOSE_WAIT_S = 10.0  # a closed connection must be seen well within this (timeouts above are 1 s)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("edges")
    base = Path(save_tiny_checkpoint(root / "base", seed=0))
    replica = Replica("edges", base, root / "store", root, extra_env={
        "OLORA_API_KEYS": KEY, "OLORA_HEADER_TIMEOUT": str(HEADER_TIMEOUT_S),
        "OLORA_BODY_TIMEOUT": str(BODY_TIMEOUT_S), "OLORA_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES),
        "OLORA_MAX_CONCURRENT_UPLOADS": "1", "OLORA_MAX_CONNECTIONS": "6"})
    try:
        replica.wait_ready()
        yield replica
    finally:
        replica.stop()


def connect(server) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=CLOSE_WAIT_S)
    return s


def read_until_closed(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a timeout here fails the test)."""
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk


def request(server, raw: bytes) -> bytes:
    with connect(server) as s:
        s.sendall(raw)
        return read_until_closed(s)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


@pytest.mark.parametrize("path, status", [("/adapters%0A", 404), ("/adapters/", 404), ("/adapters/./x", 404),
                                          ("/generate%0A", 404), ("//adapters", 401), ("//generate", 401)])
def test_paths_have_one_spelling(server, path, status):
    """Without a key: the odd spelling must neither reach a route nor skip the key check or the upload bound."""
    raw = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
           f"Connection: close\r\n\r\n{{}}").encode()
    assert status_of(request(server, raw)) == status


def test_chunked_body_over_the_limit_is_413(server):
    chunk = b"x" * 1024
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(MAX_REQUEST_BYTES // 1024 + 2)) + b"0\r\n\r\n"
    raw = (b"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
           b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + body)
    response = request(server, raw)
    assert status_of(response) == 413, response[:300]


def test_content_length_with_transfer_encoding_is_refused_and_closed(server):
    raw = (b"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
           b"\r\nContent-Type: application/json\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"0\r\n\r\n")
    with connect(server) as s:  # keep-alive asked for (HTTP/1.1 default): the server must still close
        s.sendall(raw)
        response = read_until_closed(s)
    assert status_of(response) == 400, response[:300]


@pytest.mark.parametrize("path", ["/health", "/v1/models"])
def test_head_is_answered_where_get_is(server, path):
    headers = {"Authorization": f"Bearer {KEY}"}
    head = httpx.head(server.url + path, headers=headers, timeout=10)
    get = httpx.get(server.url + path, headers=headers, timeout=10)
    assert head.status_code == get.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]


@pytest.mark.parametrize("sent", [b"", b"GET /health HTTP/1.1\r\nHost: x\r\n"])
def test_a_connection_without_its_headers_is_closed(server, sent):
    with connect(server) as s:
        s.sendall(sent)
        started = time.monotonic()
        assert read_until_closed(s) == b""
        assert time.monotonic() - started < CLOSE_WAIT_S


def _upload_head(length: int) -> bytes:
    return (f"POST /adapters HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {length}\r\n\r\n").encode()


def test_a_stalled_upload_gets_408_and_frees_its_slot(server):
    with connect(server) as stalled:
        stalled.sendall(_upload_head(100_000) + b"--b\r\nContent-Disposition: form-data; name=\"archive\"; "
                                                b"filename=\"a.tgz\"\r\n\r\npartial")
        time.sleep(0.3)  # the stalled upload holds the only slot now
        busy = httpx.post(server.url + "/adapters", headers={"Authorization": f"Bearer {KEY}"},
                          data={"adapter_id": "x"}, files={"archive": ("a.tgz", b"junk")}, timeout=10)
        assert busy.status_code == 429, busy.text
        response = read_until_closed(stalled)
    assert status_of(response) == 408, response[:300]
    after = httpx.post(server.url + "/adapters", headers={"Authorization": f"Bearer {KEY}"},
                       data={"adapter_id": "x"}, files={"archive": ("a.tgz", b"junk")}, timeout=10)
    assert after.status_code == 422, after.text  # the slot is free: the junk archive itself is refused


def test_past_the_connection_cap_new_requests_get_503(server):
    held = [connect(server) for _ in range(6)]
    try:
        for s in held:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # open, headers incomplete
        time.sleep(0.2)
        assert httpx.get(server.url + "/health", timeout=10).status_code == 503
    finally:
        for s in held:
            s.close()
    time.sleep(HEADER_TIMEOUT_S)
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
