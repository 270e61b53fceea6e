"""The try-it page's streamed playback (Media Source Extensions) in headless Chromium, against a
stand-in for the server (no Ray): the page itself, and a stream route that sends a real fragmented
MP4 piece by piece, cuts one off mid-body, or refuses before its first byte. The same page against
the served graph: tests/test_serve.py."""
from __future__ import annotations

import json
import time
from http.server import BaseHTTPRequestHandler

import pytest

from devtools import testmedia
from lipserve import media, web
from lipserve.media.fragments import stream_mp4
from tests.fixtures.browser import chromium, wait_for
from tests.fixtures.http_files import ThreadServer

pytestmark = pytest.mark.slow  # a browser per test

FPS = 25
SECONDS = 3.0
PIECE_GAP_S = 0.25  # the stand-in's pace: about two fragments' worth of frames per second of video


@pytest.fixture(scope="module")
def pieces() -> list[bytes]:
    clip = testmedia.astronaut_clip(seconds=SECONDS, fps=FPS, size=(320, 240), audio=None)
    return list(stream_mp4(media.decode_frames(clip), FPS, testmedia.speechlike(SECONDS, sample_rate=16000), 16000))


def codecs_of(data: bytes) -> str:
    """The MIME type of a fragmented MP4 as the page should build it: avc1 from the avcC record."""
    at = data.index(b"avcC") + 4
    return f'video/mp4; codecs="avc1.{data[at + 1:at + 4].hex()}, mp4a.40.2"'


class PageStandIn(ThreadServer):
    """GET / (the page), the JSON routes it reads, and POST /api/v1/lip-video/stream answered with
    `answer`: ("stream", pieces), ("cut", pieces, after) or ("refuse", status, code)."""

    def __init__(self, answer: tuple):
        self.answer, self.posts = answer, []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def send_json(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/":
                    data = web.page_html().encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                elif self.path == "/api/v1/languages":
                    self.send_json(200, {"engines": {"piper": ["en"]}, "languages": ["en"]})
                elif self.path == "/api/v1/models":
                    self.send_json(200, {"stages": {}, "synthetic_weights": True})
                else:
                    self.send_json(404, {"error": {"code": "not_found", "message": self.path, "request_id": "x"}})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                stand_in.posts.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
                kind, *rest = stand_in.answer
                if kind == "refuse":
                    status, code = rest
                    self.send_json(status, {"error": {"code": code, "message": f"{code} message", "request_id": "r0"}})
                    return
                pieces, cut_after = (rest[0], None) if kind == "stream" else rest
                self.send_response(200)
                self.send_header("Content-Type", "video/mp4")
                self.send_header("Transfer-Encoding", "chunked")
                self.send_header("X-Request-ID", "page-stream")
                self.end_headers()
                for i, piece in enumerate(pieces):
                    if i == cut_after:
                        self.close_connection = True  # no terminating chunk, as the route aborts a failed answer
                        return
                    self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                    self.wfile.flush()
                    time.sleep(PIECE_GAP_S)
                self.wfile.write(b"0\r\n\r\n")

            def log_message(self, *args):
                pass

        super().__init__(Handler, "/")


def run_page(stand_in: PageStandIn, seed: str = "") -> tuple:
    """Open the page, ask for gs://b/in.mp4 with the stream box as the page sets it, wait for the end;
    (final status state, status text, the video's state, the step rows, the meta line)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = chromium()
    try:
        driver.get(stand_in.url)
        driver.find_element(By.ID, "token").send_keys("tok" + Keys.TAB)
        assert driver.find_element(By.ID, "stream").is_selected(), "this Chromium has MSE: the page streams"
        driver.find_element(By.ID, "src-uri").click()
        driver.find_element(By.ID, "uri").send_keys("gs://b/in.mp4")
        driver.find_element(By.ID, "seed").send_keys(seed)
        driver.find_element(By.ID, "go").click()
        state = wait_for(driver, "const s = document.getElementById('status').dataset.state;"
                                 "return s === 'done' || s === 'failed' ? s : null", 60, "the request to end")
        video = driver.execute_script(
            "const v = document.getElementById('result'); return {data: Object.assign({}, v.dataset),"
            " duration: v.duration, error: v.error && v.error.code, src: v.currentSrc, width: v.videoWidth}")
        steps = {row.get_attribute("data-stage"): (row.get_attribute("data-state"), row.text)
                 for row in driver.find_elements(By.CSS_SELECTOR, "#steps tr")}
        return (state, driver.find_element(By.ID, "status").text, video, steps,
                driver.find_element(By.ID, "result-meta").text, driver.find_element(By.ID, "synthetic").text)
    finally:
        driver.quit()


def test_the_page_plays_a_streamed_answer_while_it_arrives(pieces):
    with PageStandIn(("stream", pieces)) as stand_in:
        state, status, video, steps, meta, synthetic = run_page(stand_in, seed="7")
    assert state == "done", status
    (post,) = stand_in.posts
    assert post["path"] == "/api/v1/lip-video/stream" and post["headers"]["Authorization"] == "Bearer tok"
    assert post["body"]["options"] == {"seed": 7} and post["body"]["output_video_gs"].startswith("results/")
    # the SourceBuffer was opened with the answer's own codecs (High profile at its level, AAC-LC)
    assert video["data"]["mime"] == codecs_of(b"".join(pieces)) == 'video/mp4; codecs="avc1.64000d, mp4a.40.2"'
    assert video["data"]["mode"] == "stream" and video["error"] is None and video["width"] == 320
    assert float(video["data"]["firstFrameMs"]) < float(video["data"]["streamDoneMs"])  # played while arriving
    assert abs(video["duration"] - SECONDS) < 2 / FPS  # endOfStream: the whole answer, no more
    assert steps["first"][0] == "done" and steps["stream"][0] == "done" and "first frame at" in steps["stream"][1]
    assert f"{sum(map(len, pieces)) / 1e3:.1f} KB streamed" in meta and "request page-stream" in meta
    assert "SYNTHETIC" in synthetic


def test_a_stream_cut_off_mid_body_shows_the_failed_state(pieces):
    after = len(pieces) // 2
    with PageStandIn(("cut", pieces, after)) as stand_in:
        state, status, video, steps, meta, synthetic = run_page(stand_in)
    assert state == "failed"
    received = sum(map(len, pieces[:after]))
    assert f"the stream broke off after {received} bytes: the answer is incomplete (request page-stream" in status
    assert steps["stream"][0] == "failed" and "cut off" in steps["stream"][1]
    assert video["error"] is not None and "streamDoneMs" not in video["data"]  # the player stopped, not "done"


def test_a_stream_refused_before_its_first_byte_shows_the_servers_error():
    with PageStandIn(("refuse", 409, "output_exists")) as stand_in:
        state, status, video, steps, meta, synthetic = run_page(stand_in)
    assert state == "failed" and status == "failed: 409 output_exists: output_exists message"
    assert steps["first"][0] == "failed" and steps["stream"][0] == "waiting" and video["src"] == ""
