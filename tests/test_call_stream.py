"""`lipserve call --stream` against a stand-in for the stream route on 127.0.0.1 (no Ray).

The stand-in answers each POST from a script: a JSON refusal (as the route answers before its
first byte), or a chunked 200 sent piece by piece that ends cleanly or is cut off mid-body (as
the route ends an answer that fails after its first byte). Hooks between the pieces let a test
look at what the client has written before the server sends the rest."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Callable

from lipserve.cli import main
from tests.fixtures.http_files import ThreadServer

ROOT = Path(__file__).resolve().parents[1]
ROUTE = "/api/v1/lip-video/stream"
# stand-ins for an fMP4's pieces: the client must not care what they hold
PIECES = [b"ftyp+moov " * 30, b"moof+mdat one " * 200, b"moof+mdat two " * 200, b"last fragment " * 50]
HOLD_S = 20.0  # how long the stand-in waits for a test's look before sending the rest regardless


def refusal(status: int, code: str, retry_after: str | None = None) -> dict:
    return {"status": status, "code": code, "retry_after": retry_after}


def stream(pieces: list[bytes], *, cut_after: int | None = None,
           after_piece: Callable[[int], None] | None = None) -> dict:
    """A chunked 200 of `pieces`; `cut_after` pieces, then the connection is closed without the
    body's last chunk; `after_piece(i)` runs once piece i is sent."""
    return {"status": 200, "pieces": pieces, "cut_after": cut_after, "after_piece": after_piece}


class StreamRouteStandIn(ThreadServer):
    """Answers the n-th request with script[n] (the last repeats) and records each request."""

    def __init__(self, script: list[dict]):
        self.script, self.hits = script, []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # chunked transfer, as Serve's proxy sends it

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                stand_in.hits.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
                answer = stand_in.script[min(len(stand_in.hits), len(stand_in.script)) - 1]
                if answer["status"] != 200:
                    self.refuse(answer)
                else:
                    self.stream(answer)

            def refuse(self, answer: dict) -> None:
                data = json.dumps({"error": {"code": answer["code"], "message": f"{answer['code']} message",
                                             "request_id": "rid-refused"}}).encode()
                self.send_response(answer["status"])
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if answer["retry_after"] is not None:
                    self.send_header("Retry-After", answer["retry_after"])
                self.end_headers()
                self.wfile.write(data)

            def stream(self, answer: dict) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "video/mp4")
                self.send_header("Transfer-Encoding", "chunked")
                self.send_header("X-Request-ID", "rid-streamed")
                self.end_headers()
                for i, piece in enumerate(answer["pieces"]):
                    if answer["cut_after"] is not None and i == answer["cut_after"]:
                        self.close_connection = True  # no terminating chunk: an incomplete body
                        return
                    self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                    self.wfile.flush()
                    if answer["after_piece"] is not None:
                        answer["after_piece"](i)
                self.wfile.write(b"0\r\n\r\n")

            def log_message(self, *args):  # keep the test output clean
                pass

        super().__init__(Handler)


def call_args(url: str, *extra: str) -> list[str]:
    return ["call", "--url", url, "--video", "gs://b/in.mp4", "--text", "Hi there.", "--out", "gs://b/said.mp4",
            "--token", "t0k", "--attempts", "3", *extra]


def partial_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.part"))


def test_a_stream_is_written_beside_the_target_as_it_comes_and_renamed_at_its_clean_end(tmp_path, capsys):
    target = tmp_path / "answer.mp4"
    seen_mid_stream: dict[int, tuple] = {}

    def look(i: int) -> None:
        """After piece i: the bytes in the client's temporary file (given up to HOLD_S to show
        them), and whether the target exists yet."""
        if i == len(PIECES) - 1:
            return
        expected, deadline = b"".join(PIECES[:i + 1]), time.monotonic() + HOLD_S
        while not ((parts := partial_files(tmp_path)) and parts[0].read_bytes() == expected):
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        seen_mid_stream[i] = (parts[0].read_bytes() if parts else None, target.exists())

    # a 503 first: refused before any byte, so the client retries after Retry-After as on every call
    script = [refusal(503, "overloaded", retry_after="0"), stream(PIECES, after_piece=look)]
    with StreamRouteStandIn(script) as server:
        code = main(call_args(server.url, "--stream", "-o", str(target)))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert target.read_bytes() == b"".join(PIECES) and partial_files(tmp_path) == []
    for i in range(len(PIECES) - 1):  # each piece was on disk (flushed) before the next was sent
        assert seen_mid_stream[i] == (b"".join(PIECES[:i + 1]), False), i
    assert [h["path"] for h in server.hits] == [ROUTE, ROUTE]
    sent = server.hits[-1]
    assert sent["body"]["output_video_gs"] == "gs://b/said.mp4" and sent["body"]["word"] == "Hi there."
    assert sent["headers"]["Authorization"] == "Bearer t0k"
    assert "stream    first byte after " in err and f"stream    done: {len(b''.join(PIECES))} bytes" in err
    assert "total " in err and "(request rid-streamed)" in err and out == ""
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)  # not left private like a temporary file


def test_a_stream_to_stdout_reaches_the_reader_piece_by_piece():
    """`-o - | player`: the reader has the first piece before the server sends the second."""
    released = threading.Event()
    held: list[bool] = []

    def hold(i: int) -> None:
        if i == 0:
            held.append(released.wait(HOLD_S))

    with StreamRouteStandIn([stream(PIECES, after_piece=hold)]) as server:
        proc = subprocess.Popen([sys.executable, "-m", "lipserve.cli", *call_args(server.url, "--stream", "-o", "-")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                # buffered as in a user's shell, so only the client's flush sends a piece on
                                env={**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
                                     "PYTHONPATH": str(ROOT)})
        first = proc.stdout.read(len(PIECES[0]))
        released.set()
        rest = proc.stdout.read()
        err = proc.stderr.read().decode()
        code = proc.wait(timeout=60)
    assert code == 0, err
    assert held == [True], "the first piece reached stdout's reader only after the server sent more"
    assert first + rest == b"".join(PIECES)
    assert "first byte after" in err and "total" in err


def test_a_refusal_before_the_first_byte_prints_the_same_error_as_the_whole_answer_call(tmp_path, capsys):
    target = tmp_path / "answer.mp4"
    with StreamRouteStandIn([refusal(413, "text_too_long")]) as server:
        streamed_code = main(call_args(server.url, "--stream", "-o", str(target)))
        streamed_err = capsys.readouterr().err
        whole_code = main(call_args(server.url))
        whole_err = capsys.readouterr().err
    assert [h["path"] for h in server.hits] == [ROUTE, "/api/v1/lip-video"]  # a 4xx is not retried
    line = "error [413 text_too_long]: text_too_long message (request rid-refused)"
    assert streamed_code == whole_code == 1
    assert streamed_err.splitlines()[-1] == whole_err.splitlines()[-1] == line
    assert not target.exists() and partial_files(tmp_path) == []


def test_a_stream_cut_off_mid_body_exits_non_zero_and_leaves_no_complete_looking_file(tmp_path, capsysbinary):
    target = tmp_path / "answer.mp4"
    target.write_bytes(b"an earlier answer")
    sent = len(PIECES[0]) + len(PIECES[1])
    with StreamRouteStandIn([stream(PIECES, cut_after=2)]) as server:
        code = main(call_args(server.url, "--stream", "-o", str(target)))
        err = capsysbinary.readouterr().err.decode()
        assert code == 1
        assert f"the answer is incomplete: the stream ended after {sent} bytes" in err
        assert "(request rid-streamed)" in err and f"{target} (left as it was)" in err
        assert target.read_bytes() == b"an earlier answer" and partial_files(tmp_path) == []

        code = main(call_args(server.url, "--stream", "-o", "-"))
    captured = capsysbinary.readouterr()
    assert code == 1 and captured.out == PIECES[0] + PIECES[1]  # a player has what came; the exit says the rest
    assert b"the answer is incomplete" in captured.err and b"written to stdout" in captured.err


def test_stream_options_that_do_not_fit_are_refused_before_any_call(capsys):
    with StreamRouteStandIn([stream(PIECES)]) as server:
        codes = [main(call_args(server.url, "--stream")),                     # nowhere to write it
                 main(call_args(server.url, "--stream", "-o", "-", "--job")),
                 main(call_args(server.url, "-o", "x.mp4"))]                  # -o without --stream
    assert codes == [2, 2, 2] and server.hits == []
    assert "--stream needs -o FILE" in capsys.readouterr().err


def test_the_async_client_streams_the_same_way():
    from lipserve.client import AsyncLipserveClient, IncompleteAnswer

    async def take(url: str) -> tuple[list[bytes], Exception | None]:
        got = []
        async with AsyncLipserveClient(url, token="t0k", timeout=5) as client:
            async with client.stream_lip_video("Hi there.", "gs://b/in.mp4", "gs://b/said.mp4") as answer:
                try:
                    async for chunk in answer.achunks():
                        got.append(chunk)
                except IncompleteAnswer as exc:
                    return got, exc
        return got, None

    with StreamRouteStandIn([stream(PIECES), stream(PIECES, cut_after=1)]) as server:
        whole, whole_error = asyncio.run(take(server.url))
        cut, cut_error = asyncio.run(take(server.url))
    assert b"".join(whole) == b"".join(PIECES) and whole_error is None
    assert b"".join(cut) == PIECES[0] and cut_error.received == len(PIECES[0])
    assert cut_error.request_id == "rid-streamed" and "the answer is incomplete" in str(cut_error)
