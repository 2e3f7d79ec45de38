"""What a connection may cost before the server has checked anything (issue 23, items 5, 7 and 8): the key is checked
before any body is read, half-sent requests are cut at their deadline, errors say what went wrong in OpenAI's shape
(405 with Allow, 401 with WWW-Authenticate, bodies that are not JSON text), and client text cannot forge log lines.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import httpx
import pytest

from tests.server.process import SERVED
from valora.server.logs import printable

KEY = "limits-key"
HEADER_TIMEOUT, BODY_TIMEOUT = 1.0, 1.5
BODY_LIMIT = 1 << 20


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(["--max-model-len", "512", "--num-kv-blocks", "256", "--max-request-body-bytes",
                         str(BODY_LIMIT), "--timeout-request-header", str(HEADER_TIMEOUT),
                         "--timeout-request-body", str(BODY_TIMEOUT)], api_key=KEY)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as client:
        yield client


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read())[1]) * 1024


def connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def head(path: str, length: int, key: str | None = None) -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n{auth}"
            f"Content-Length: {length}\r\n\r\n").encode()


def completion(**extra) -> dict:
    return {"model": SERVED, "prompt": "a dog runs", "max_tokens": 2, **extra}


def assert_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code, r.text
    return r.json()["error"]


def test_unauthenticated_bodies_are_not_read(server):
    """Six concurrent 60 MiB bodies without a key: each is answered 401 from its headers and the connection is
    closed; the server's memory does not grow with the bodies (the body limit used to buffer 64 MiB first)."""
    size, chunk = 60 << 20, b"x" * (1 << 20)
    before = rss_bytes(server.proc.pid)
    answers: list[bytes] = []

    def send() -> None:
        with connect(server) as s:
            s.sendall(head("/v1/chat/completions", size) + chunk)
            answers.append(s.recv(4096))
            try:
                for _ in range(size // len(chunk) - 1):
                    s.sendall(chunk)
            except OSError:  # closed by the server, as it should be
                pass

    threads = [threading.Thread(target=send) for _ in range(6)]
    for t in threads:
        t.start()
    peak = before
    while any(t.is_alive() for t in threads):
        peak = max(peak, rss_bytes(server.proc.pid))
        time.sleep(0.01)
    assert len(answers) == 6
    for answer in answers:
        head_lines = answer.lower()
        assert answer.startswith(b"HTTP/1.1 401"), answer
        assert b"www-authenticate: bearer" in head_lines and b"connection: close" in head_lines, answer
    assert peak - before < 50 << 20, f"RSS grew by {(peak - before) >> 20} MiB"


def test_half_sent_requests_are_closed_at_their_deadline(server, http):
    """Connections that send nothing, half a request line, or headers and part of the body are closed within
    --timeout-request-header / --timeout-request-body; so is one that keeps trickling bytes (uvicorn's keep-alive
    timer restarts with each byte). A stream that outlasts both deadlines is not cut."""
    authorized = head("/v1/completions", 100, KEY) + b'{"model": '
    sends = {"nothing": b"", "request-line": b"POST /v1/completions HTTP/1.1\r\nHost: te", "body": authorized}
    socks = {}
    start = time.monotonic()
    for name, data in sends.items():
        for i in range(3):
            s = connect(server)
            s.sendall(data)
            socks[f"{name}-{i}"] = s
    drip = connect(server)
    closed_at: dict[str, float] = {}

    def wait_closed(name: str, s: socket.socket) -> None:
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass
        closed_at[name] = time.monotonic() - start

    waiters = [threading.Thread(target=wait_closed, args=item) for item in socks.items()]
    waiters.append(threading.Thread(target=wait_closed, args=("drip", drip)))
    for w in waiters:
        w.start()
    for byte in b"GET /health HTTP/1.1\r\nHost: slowly-dripping-client\r\n":
        if "drip" in closed_at:
            break
        try:
            drip.send(bytes([byte]))
        except OSError:
            break
        time.sleep(0.1)

    with http.stream("POST", "/v1/completions", json=completion(max_tokens=40, ignore_eos=True, stream=True)) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
        time.sleep(HEADER_TIMEOUT + BODY_TIMEOUT + 0.5)  # both deadlines pass while the response is open
        assert [line for line in lines if line][-1] == "data: [DONE]"

    for w in waiters:
        w.join(timeout=10)
    for s in [*socks.values(), drip]:
        s.close()
    assert set(closed_at) == {*socks, "drip"}
    margin = 3.0  # the server's timers fire on a busy 2-core box too
    for name, t in closed_at.items():
        limit = HEADER_TIMEOUT + BODY_TIMEOUT if name.startswith("body") else HEADER_TIMEOUT
        assert HEADER_TIMEOUT - 0.2 <= t <= limit + margin, (name, t)
    assert "request headers not received within 1 s" in server.log_text()
    assert "request body not received within 1.5 s" in server.log_text()


def test_key_is_checked_before_the_body_is_parsed(server):
    for body in (b'{"model": "x", "prompt": [', b"\xff\xfe not even utf-8"):
        r = httpx.post(f"{server.url}/v1/completions", content=body, headers={"Content-Type": "application/json"})
        assert_error(r, 401, "invalid_api_key")
        assert r.headers["www-authenticate"] == "Bearer"


def test_bodies_that_are_not_json_text_are_invalid_json(http):
    cases = {"invalid utf-8": b'{"model": "\xff\xfe", "prompt": "hi"}', "deep nesting": b"[" * 100_000 + b"]" * 100_000,
             "truncated": b'{"model": '}
    for name, body in cases.items():
        err = assert_error(http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"}),
                           400, "invalid_json")
        assert "json" in err["message"].lower(), name


def test_chunked_body_over_the_limit_is_413(http):
    def chunks():
        for _ in range(BODY_LIMIT // 4096 + 2):
            yield b" " * 4096

    r = http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert_error(r, 413, "request_too_large")
    r = http.post("/v1/completions", content=b" " * (BODY_LIMIT + 1), headers={"Content-Type": "application/json"})
    assert_error(r, 413, "request_too_large")
    assert http.post("/v1/completions", json=completion()).status_code == 200


def test_wrong_method_names_the_allowed_ones(http):
    r = http.get("/v1/chat/completions")
    assert_error(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "POST"
    r = http.post("/v1/models")
    assert_error(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "GET"


def test_openapi_documents_errors_and_the_bearer_scheme(http):
    schema = http.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, operations in schema["paths"].items():
        for op in operations.values():
            assert "422" not in op["responses"], path
            assert (op.get("security") == [{"bearer": []}]) == path.startswith("/v1/"), path
            for status, response in op["responses"].items():
                if status[0] == "4":
                    assert response["content"] == {"application/json": {"schema": error_ref}}, (path, status)
    assert {"400", "401", "404", "413", "503"} <= set(schema["paths"]["/v1/chat/completions"]["post"]["responses"])


def test_client_text_cannot_forge_log_lines(server, http):
    forged = "nowhere\nINFO valora.server: forged line"
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": forged})
    assert_error(r, 400, "adapter_load_failed")
    log = server.log_text()
    assert "forged line" in log
    assert not any(line.startswith("INFO valora.server: forged") for line in log.splitlines())
    assert "nowhere\\nINFO valora.server: forged line" in log
    assert printable("a\x1b[31m\u2028" + "z" * 400).startswith("a\\x1b[31m\\u2028zz")
    assert printable("z" * 400).endswith("... (100 more characters)")
    assert json.loads(http.get("/v1/models").text)["data"][0]["id"] == SERVED
