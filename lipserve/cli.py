"""`lipserve` command line.

    lipserve run --video me.mp4 --text "Hello there" --out said.mp4   # the whole pipeline, one process, no Ray
    lipserve run --video me.mp4 --audio speech.wav --box 100 60 300 280 --out said.mp4   # own speech and face box
    lipserve call --url http://host:8000 --video gs://b/me.mp4 --text "Hello there"   # a running server
    lipserve call --url http://host:8000 --video gs://b/me.mp4 --text "Hello" --stream -o - | ffplay -   # as it is made
    lipserve weights fetch|verify|list                                 # checkpoints (lipserve/weights/cli.py)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from .errors import LipserveError


class StageLines:
    """Progress for the long steps: one line when a stage starts and one when it ends."""

    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stderr  # the stderr of now (tests capture it)
        self.t0 = time.perf_counter()

    def __call__(self, stage: str, event: str, seconds: float | None) -> None:
        now = time.perf_counter() - self.t0
        if event == "start":
            print(f"[{now:7.2f}s] {stage:<9} ...", file=self.stream, flush=True)
        else:
            print(f"[{now:7.2f}s] {stage:<9} done in {seconds:.2f}s", file=self.stream, flush=True)

    def note(self, stage: str, text: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.2f}s] {stage:<9} {text}", file=self.stream, flush=True)


def _local_uri(value: str) -> str:
    """gs:// as given; anything else becomes an absolute local path."""
    return value if value.startswith("gs://") else str(Path(value).expanduser().resolve())


def cmd_run(args) -> int:
    from .contract import LipVideoRequest, RequestOptions
    from .logs import configure_logging
    from .settings import Settings

    configure_logging(logging.DEBUG if args.verbose else logging.WARNING)
    overrides: dict = {}
    # the command line works on the user's own files: any local path, and any bucket unless
    # LIPSERVE_ALLOWED_BUCKETS narrows it
    overrides["storage_root"] = Path("/")
    if "LIPSERVE_ALLOWED_BUCKETS" not in os.environ:
        overrides["allowed_buckets"] = ["*"]
    if args.synthetic_weights:
        overrides["allow_synthetic_weights"] = True
    if args.weights_dir:
        overrides["weights_dir"] = args.weights_dir
    settings = Settings(**overrides)

    if not args.text and not args.audio:
        print("error: give --text (what to say) or --audio (a recording to say it with)", file=sys.stderr)
        return 2
    if not stream_arguments_fit(args):
        return 2
    options = {"overwrite": args.overwrite, "tts_engine": args.engine}
    if args.face_mode:
        options["face_mode"] = args.face_mode
    if args.box:
        x1, y1, x2, y2 = args.box
        options["box"] = {"x1": x1, "y1": y1, "x2": x2, "y2": y2}
    if args.audio:
        options["audio"] = _local_uri(args.audio)
    if args.reference:
        options["reference_audio"] = _local_uri(args.reference)
    if args.seed is not None:
        options["seed"] = args.seed
    request = LipVideoRequest(word=args.text or "", user_video_gs=_local_uri(args.video),
                              output_video_gs=_local_uri(args.out), tts_lang=args.lang,
                              options=RequestOptions(**options))

    # refuse what can be refused before the models load (tens of seconds on a CPU)
    from .checks import check_video, check_voice_source, preflight
    from .pipeline import Pipeline
    from .storage import Storage

    storage = Storage(settings)
    pre = preflight(request, settings, storage)
    check_voice_source(check_video(storage.read_bytes(request.user_video_gs), settings).info, pre.reference_uri)

    progress = StageLines()
    print("loading models (once per process) ...", file=sys.stderr, flush=True)

    t = time.perf_counter()
    pipeline = Pipeline(settings, storage=storage, warm_up=False)  # one request: a warm-up would only add to it
    print(f"models loaded in {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)
    if args.stream:
        # the answer as it is made (fragmented MP4), beside the whole file the pipeline writes at --out
        with atomic_output(args.output_file) as sink:
            def on_piece(piece: bytes) -> None:
                sink.write(piece)
                sink.flush()

            response = pipeline.run(request, progress=progress, on_piece=on_piece)
        progress.note("stream", f"first fragment after {response.step_times.get('first_fragment', 0.0):.2f}s")
    else:
        response = pipeline.run(request, progress=progress)
    # with the video on stdout, the summary goes to stderr
    summary = sys.stderr if args.stream and args.output_file == "-" else sys.stdout

    if response.synthetic_weights:
        print("\n" + "!" * 78 + "\n!! SYNTHETIC WEIGHTS: the models ran without their checkpoints."
              " The output is NOT meaningful.\n!! Fetch them with `lipserve weights fetch`.\n" + "!" * 78,
              file=sys.stderr)
    if args.json:
        print(json.dumps(response.model_dump(), indent=2), file=summary)
    else:
        print(f"wrote {response.output_video_gs} ({response.duration_s:.2f}s)"
              + (f"; streamed to {'stdout' if args.output_file == '-' else args.output_file}" if args.stream else ""),
              file=summary)
        print("engines: " + ", ".join(f"{k}={v}" for k, v in response.engines.items()), file=summary)
        print("step times: " + ", ".join(f"{k}={v:.2f}s" for k, v in response.step_times.items()), file=summary)
    print_warnings(response.warnings)
    return 0


def print_warnings(warnings: list[str], stream=sys.stderr) -> None:
    """The response's warnings, one per line (also with --json: people read stderr)."""
    for text in warnings:
        print(f"warning: {text}", file=stream)


def default_output(video: str) -> str:
    """Beside a gs:// source (same bucket), else under results/ in the server's storage root."""
    tag = uuid.uuid4().hex[:8]
    if video.startswith("gs://"):
        stem = video.rsplit(".", 1)[0] if "." in video.rsplit("/", 1)[-1] else video
        return f"{stem}-said-{tag}.mp4"
    return f"results/{Path(video).stem}-said-{tag}.mp4"


def stream_arguments_fit(args, refused: tuple[str, ...] = ()) -> bool:
    """--stream and -o go together (run and call alike); say why not on stderr."""
    if args.stream and (not args.output_file or any(getattr(args, name) for name in refused)):
        taken = f", and takes no {' or '.join('--' + n for n in refused)} (its answer is the video itself)" if refused else ""
        print(f"error: --stream needs -o FILE (or -o - for stdout){taken}", file=sys.stderr)
        return False
    if args.output_file and not args.stream:
        print("error: -o is where --stream writes the video as it is made; --out gets the whole answer",
              file=sys.stderr)
        return False
    return True


def cmd_call(args) -> int:
    from .client import IncompleteAnswer, LipserveHTTPError

    if not stream_arguments_fit(args, refused=("job", "json")):
        return 2
    try:
        return call_server(args)
    except LipserveHTTPError as exc:
        print(f"error [{exc.status} {exc.code}]: {exc.message}"
              + (f" (request {exc.request_id})" if exc.request_id else ""), file=sys.stderr)
        return 1
    except IncompleteAnswer as exc:
        target = "stdout" if args.output_file == "-" else f"{args.output_file} (left as it was)"
        print(f"error: {exc}; nothing complete was written to {target}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # the player reading stdout went away; stdout goes to /dev/null so the exit's flush cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print("error: the reader of stdout closed it before the answer ended", file=sys.stderr)
        return 1


@contextmanager
def atomic_output(target: str) -> Iterator[BinaryIO]:
    """Where a streamed answer goes: stdout for '-', else a temporary file beside `target` that
    becomes `target` only when the block ends without an error (a cut-off answer is removed)."""
    if target == "-":
        yield sys.stdout.buffer
        return
    path = Path(target)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".part", delete=False)
    try:
        with handle:
            yield handle
        umask = os.umask(0)  # a temporary file is private (0600); the answer gets a new file's usual mode
        os.umask(umask)
        os.chmod(handle.name, 0o666 & ~umask)
        os.replace(handle.name, path)
    except BaseException:
        os.unlink(handle.name)
        raise


def stream_to_output(client, args, video: str, out: str, options: dict) -> int:
    """POST the stream route and write each chunk as it comes, flushed, so a pipe plays it at once."""
    progress = StageLines()
    progress("stream", "start", None)
    with client.stream_lip_video(args.text, video, out, args.lang, options) as answer:
        with atomic_output(args.output_file) as sink:
            first_byte_s = None
            for chunk in answer.chunks():
                if first_byte_s is None:
                    first_byte_s = time.perf_counter() - progress.t0
                    progress.note("stream", f"first byte after {first_byte_s:.2f}s")
                sink.write(chunk)
                sink.flush()
    total_s = time.perf_counter() - progress.t0
    first = "no bytes" if first_byte_s is None else f"first byte after {first_byte_s:.2f}s"
    progress.note("stream", f"done: {answer.received} bytes, {first}, total {total_s:.2f}s")
    where = "stdout" if args.output_file == "-" else args.output_file
    print(f"streamed to {where}; the server keeps the whole answer at {out}"
          + (f" (request {answer.request_id})" if answer.request_id else ""), file=sys.stderr)
    return 0


def call_server(args) -> int:
    from .client import LipserveClient, RetryPolicy

    token = args.token or os.environ.get("LIPSERVE_AUTH_TOKEN") or None
    options = {"overwrite": True} if args.overwrite else {}
    if args.face_mode:
        options["face_mode"] = args.face_mode
    retry = RetryPolicy(max_attempts=args.attempts)
    with LipserveClient(args.url, token, timeout=args.timeout, retry=retry) as client:
        video = args.video
        if args.upload:
            uploaded = client.upload(args.upload)
            print(f"uploaded {args.upload} as {uploaded.uri} ({uploaded.bytes} bytes, {uploaded.duration_s:.2f}s)",
                  file=sys.stderr)
            video = uploaded.uri
        out = args.out or default_output(video)
        if args.stream:
            return stream_to_output(client, args, video, out, options)
        if args.job:
            job = client.submit_job(args.text, video, out, args.lang, options)
            print(f"job {job.job_id} accepted", file=sys.stderr, flush=True)
            shown: set[tuple[str, str]] = set()

            def show(status) -> None:
                for stage, progress in status.stages.items():
                    if (stage, progress.state) not in shown:
                        shown.add((stage, progress.state))
                        took = f" in {progress.seconds:.2f}s" if progress.seconds is not None else " ..."
                        print(f"  {stage:<9} {progress.state}{took}", file=sys.stderr, flush=True)

            response = client.wait_job(job.job_id, poll_s=args.poll, on_status=show)
        else:
            response = client.lip_video(args.text, video, out, args.lang, options)
    if response.synthetic_weights:
        print("!! SYNTHETIC WEIGHTS on the server: the output is NOT meaningful.", file=sys.stderr)
    if args.json:
        print(json.dumps(response.model_dump(), indent=2))
    else:
        print(f"wrote {response.output_video_gs} ({response.duration_s:.2f}s) in {response.step_times['total']:.2f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lipserve", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="{run,call,weights}")

    run = sub.add_parser("run", help="make one lip-synced video in this process (no Ray)")
    run.add_argument("--video", required=True, help="source selfie video (path or gs://)")
    run.add_argument("--text", default=None, help="what the person will say (spoken by TTS)")
    run.add_argument("--audio", default=None,
                     help="a recording of what the person will say, instead of --text (any audio or video file)")
    run.add_argument("--out", required=True, help="output mp4 (path or gs://)")
    run.add_argument("--lang", default="en", help="TTS language code (default en)")
    run.add_argument("--engine", default="auto", help="TTS engine: auto, piper, espeak, gtts")
    run.add_argument("--face-mode", choices=["auto", "static", "track"], default=None,
                     help="face finding (default auto: one box for a still head, tracking for a moving one)")
    run.add_argument("--box", type=int, nargs=4, metavar=("X1", "Y1", "X2", "Y2"), default=None,
                     help="the face box in source pixels, used for every frame (no face detection)")
    run.add_argument("--reference", default=None, help="separate voice reference (audio or video file)")
    run.add_argument("--synthetic-weights", action="store_true",
                     help="allow synthetic weights when checkpoints are missing (output NOT meaningful)")
    run.add_argument("--weights-dir", default=None, help="checkpoint folder (default: settings.runtime.weights_dir)")
    run.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    run.add_argument("--seed", type=int, default=None,
                     help="make the random draws (TTS noise, voice prior) reproducible: same seed, same video")
    run.add_argument("--json", action="store_true", help="print the full response as JSON")
    run.add_argument("--stream", action="store_true",
                     help="also write the answer as it is made (fragmented MP4) to -o "
                          "(`lipserve run ... --stream -o - | ffplay -`); --out is still written whole at the end")
    run.add_argument("-o", "--output-file", default=None, metavar="FILE",
                     help="with --stream: a local file for the video as it is made (replaced only by a complete "
                          "answer), or - for stdout")
    run.add_argument("-v", "--verbose", action="store_true")
    run.set_defaults(func=cmd_run)

    call = sub.add_parser("call", help="ask a running lipserve server (HTTP) for one video")
    call.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    source = call.add_mutually_exclusive_group(required=True)
    source.add_argument("--video", help="source video as the server sees it: gs://bucket/object or a storage-root path")
    source.add_argument("--upload", help="a local video file to upload first (into the server's storage root)")
    call.add_argument("--text", required=True, help="what the person will say")
    call.add_argument("--out", default=None,
                      help="where the server writes the output (default: beside a gs:// source, else results/)")
    call.add_argument("--lang", default="en", help="TTS language code (default en)")
    call.add_argument("--face-mode", choices=["auto", "static", "track"], default=None)
    call.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    call.add_argument("--token", default=None, help="bearer token (default: $LIPSERVE_AUTH_TOKEN)")
    call.add_argument("--job", action="store_true", help="run it as a job: submit, then poll with progress")
    call.add_argument("--stream", action="store_true",
                      help="take the video itself as it is made (fragmented MP4) and write it to -o")
    call.add_argument("-o", "--output-file", default=None, metavar="FILE",
                      help="with --stream: a local file for the video (replaced only by a complete answer), "
                           "or - for stdout")
    call.add_argument("--poll", type=float, default=1.0, help="seconds between job polls")
    call.add_argument("--timeout", type=float, default=600.0, help="HTTP timeout per call, seconds")
    call.add_argument("--attempts", type=int, default=5, help="attempts on 503 / connection refused")
    call.add_argument("--json", action="store_true", help="print the full response as JSON")
    call.set_defaults(func=cmd_call)

    try:  # written separately; `lipserve run` must work without it
        from .weights.cli import register
    except ImportError as exc:
        logging.getLogger("lipserve.cli").debug("weights commands unavailable: %s", exc)
    else:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except LipserveError as exc:
        print(f"error [{exc.status} {exc.code}]: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
