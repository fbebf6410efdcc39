"""The waitress server refuses what the app would refuse before reading it: oversized bodies and
headers get their 4xx at once, over raw sockets, and no request body is ever spooled to disk."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import suppress
from pathlib import Path

import pytest
import waitress.buffers

from smallscale.humaneval.app import MAX_REQUEST_BYTES, create_server
from smallscale.humaneval.items import load_pool
from smallscale.humaneval.loadcheck import write_synthetic_study

PROMPTLY_S = 2.0  # an answer later than this counts as none: the server would be waiting for the body
MIB = 2**20


@pytest.fixture
def port(tmp_path: Path):
    """A real waitress server for a 2-system study, serving on a free port in a thread of this process."""
    write_synthetic_study(tmp_path, n_systems=2, n_prompts=1)
    server = create_server(load_pool([tmp_path]), tmp_path / "human_eval.sqlite", port=0, threads=2)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield server.effective_port
    server.trigger.pull_trigger(server.close)  # closed by the server's own loop thread
    server.task_dispatcher.shutdown()
    thread.join(timeout=5)


@pytest.fixture
def spooled(monkeypatch) -> list[int]:
    """Records every temporary file waitress opens to hold a request (or response) that outgrew memory."""
    opened: list[int] = []
    newfile = waitress.buffers.TempfileBasedBuffer.newfile

    def recording_newfile(self):
        opened.append(1)
        return newfile(self)

    monkeypatch.setattr(waitress.buffers.TempfileBasedBuffer, "newfile", recording_newfile)
    return opened


def request_head(content_length: int | None = None, chunked: bool = False, extra: str = "") -> bytes:
    framing = "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {content_length}\r\n"
    return (
        "POST /vote HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        f"{framing}{extra}Connection: close\r\n\r\n"
    ).encode()


def status_of_answer(sock: socket.socket) -> int:
    """The status code of the server's answer; fails the test if none comes within PROMPTLY_S."""
    sock.settimeout(PROMPTLY_S)
    received = b""
    try:
        while b"\r\n" not in received:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
    except TimeoutError:
        pytest.fail(f"no answer within {PROMPTLY_S} s: the server is still reading (or waiting for) the request")
    return int(received.split(b" ", 2)[1])


def send_ignoring_refusal(sock: socket.socket, data: bytes) -> None:
    """Send as a client would; the server may close the connection once it has answered."""
    try:
        sock.sendall(data)
    except OSError:  # broken pipe or reset: the refusal came first
        pass


def test_a_declared_500_mib_body_is_refused_at_once_without_waiting_for_it(port):
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request_head(content_length=500 * MIB))
        assert status_of_answer(sock) == 413


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_8_mib_body_is_refused_without_being_spooled_to_disk(port, spooled, chunked):
    body = b"reason=" + b"x" * (8 * MIB)
    data = request_head(len(body), chunked) + (b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if chunked else body)
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sender = threading.Thread(target=send_ignoring_refusal, args=(sock, data), daemon=True)
        sender.start()
        status = status_of_answer(sock)
        with suppress(OSError):  # already reset by the server, or else unblocks the sender
            sock.shutdown(socket.SHUT_RDWR)
        sender.join(timeout=PROMPTLY_S)
    assert status == 413 and time.perf_counter() - start < PROMPTLY_S
    assert spooled == []


def test_headers_over_32_kib_are_refused(port):
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request_head(content_length=0, extra=f"Cookie: other-app={'x' * 64 * 1024}\r\n"))
        assert status_of_answer(sock) == 431


def test_a_body_of_the_largest_allowed_size_reaches_the_app(port, spooled):
    body = b"reason=" + b"x" * (MAX_REQUEST_BYTES - 7)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request_head(len(body)) + body)
        assert status_of_answer(sock) == 403  # the app's answer: no CSRF token (waitress would say 413)
    assert spooled == []
