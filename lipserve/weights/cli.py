"""`lipserve weights fetch|verify|list`.

The main CLI (lipserve/cli.py) calls `register(subparsers)`; each parser sets `func`, which takes
the parsed args and returns the exit status. `python -m lipserve.weights.cli ...` runs the same
commands without it.

Exit status: 0 all good; 1 a file failed (fetch error, bad checksum/size, invalid layout);
3 no network (nothing reachable).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..settings import get_settings
from .fetch import FetchError, NoNetwork, fetch_entry
from .manifest import ManifestError, load_manifest
from .verify import needed_files, stage_plans, verify_all

EXIT_FAILED = 1
EXIT_NO_NETWORK = 3


def register(subparsers) -> argparse.ArgumentParser:
    weights = subparsers.add_parser("weights", help="fetch and verify the official checkpoints",
                                    description="Fetch and verify the checkpoints listed in weights/manifest.toml.")
    weights.set_defaults(func=lambda args: (weights.print_help(), 2)[1])
    sub = weights.add_subparsers(dest="weights_command", metavar="{fetch,verify,list}")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dest", type=Path, default=None,
                        help="weights folder (default: settings.runtime.weights_dir, LIPSERVE_WEIGHTS_DIR)")
    common.add_argument("--manifest", type=Path, default=None,
                        help="manifest file (default: weights/manifest.toml, LIPSERVE_WEIGHTS_MANIFEST)")

    fetch = sub.add_parser("fetch", parents=[common], help="download checkpoints (resumable, verified)")
    fetch.add_argument("names", nargs="*", help="files or names (default: what the current settings use)")
    fetch.add_argument("--all", action="store_true", help="every file in the manifest")
    fetch.add_argument("--record-sha256", action="store_true",
                       help="write the sha256 (and size) of files whose hash is not published into the manifest; "
                            "only with a source you trust")
    fetch.add_argument("--url-override", action="append", default=[], metavar="NAME=URL",
                       help="download NAME from URL instead of the manifest's URLs (repeatable); "
                            "LIPSERVE_WEIGHTS_BASE_URL=<base> fetches every file from <base>/<file>")
    fetch.add_argument("--no-progress", action="store_true", help="no progress bar")
    fetch.set_defaults(func=cmd_fetch)

    verify = sub.add_parser("verify", parents=[common], help="check the present files and report what each stage loads")
    verify.add_argument("names", nargs="*", help="files or names (default: all in the manifest)")
    verify.add_argument("--sha256", action="store_true", help="also hash each file (slow for large files)")
    verify.set_defaults(func=cmd_verify)

    lister = sub.add_parser("list", parents=[common], help="list the manifest")
    lister.set_defaults(func=cmd_list)
    return weights


def _context(args):
    settings = get_settings()
    manifest = load_manifest(args.manifest)
    dest = args.dest if args.dest is not None else Path(settings.runtime.weights_dir)
    return settings, manifest, dest


def cmd_fetch(args) -> int:
    try:
        settings, manifest, dest = _context(args)
        overrides = _parse_overrides(args.url_override, manifest)
        if args.names:
            entries = [manifest.get(n) for n in args.names]
        elif args.all:
            entries = list(manifest.entries)
        else:
            entries = [e for group in needed_files(settings, manifest).values() for e in group]
    except (ManifestError, KeyError, ValueError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return EXIT_FAILED
    status = 0
    for entry in entries:
        try:
            result = fetch_entry(entry, dest, url_override=overrides.get(entry.file), manifest=manifest,
                                 record_sha256=args.record_sha256, progress=not args.no_progress)
        except NoNetwork as exc:
            print(f"error: {exc}", file=sys.stderr)
            # every other file would fail the same way; stop now rather than time out per file
            rest = [e.file for e in entries[entries.index(entry) + 1:]]
            if rest:
                print(f"  Not tried either (place them in {dest} the same way): {', '.join(rest)}", file=sys.stderr)
            return EXIT_NO_NETWORK
        except FetchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = EXIT_FAILED
            continue
        extra = f", resumed from byte {result.resumed_from}" if result.resumed_from else ""
        extra += ", sha256 recorded in the manifest" if result.recorded else ""
        print(f"{result.status:8s} {result.file}  {result.size} bytes  sha256 {result.sha256}{extra}")
    _print_plans(settings, manifest, dest)
    return status


def cmd_verify(args) -> int:
    try:
        settings, manifest, dest = _context(args)
        checks = verify_all(manifest, dest, args.names or None, hash_check=args.sha256)
    except (ManifestError, KeyError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return EXIT_FAILED
    for check in checks:
        print(f"{check.status:8s} {check.file}: {check.message}")
        for warning in check.warnings:
            print(f"         warning: {warning}")
    _print_plans(settings, manifest, dest, checks)
    return EXIT_FAILED if any(c.status == "invalid" for c in checks) else 0


def cmd_list(args) -> int:
    try:
        _, manifest, dest = _context(args)
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    for e in manifest.entries:
        size = str(e.size) if e.size else (e.approx_size or "?")
        sha = e.sha256 or (f"{e.sha256_prefix}... (prefix only)" if e.sha256_prefix else "not published")
        present = "present" if (dest / e.file).is_file() else "missing"
        print(f"{e.file:28s} {e.stage:8s} {','.join(e.variants):18s} {size:>14s}  sha256 {sha}  [{present}]")
    return 0


def _print_plans(settings, manifest, dest, checks=None) -> None:
    if checks is None:
        checks = verify_all(manifest, dest)
    print(f"\nWhat each stage will load (weights_dir={dest}, "
          f"wav2lip_checkpoint={settings.lipsync.wav2lip_checkpoint}, freevc_variant={settings.voice.freevc_variant}):")
    for plan in stage_plans(settings, manifest, checks):
        print(f"  {plan.stage:8s} {plan.loads}")


def _parse_overrides(items: list[str], manifest) -> dict[str, str]:
    overrides = {}
    for item in items:
        name, sep, url = item.partition("=")
        if not sep or not url:
            raise ValueError(f"--url-override expects NAME=URL, got {item!r}")
        overrides[manifest.get(name).file] = url
    return overrides


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m lipserve.weights.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
