"""`python -m app [--runs-dir DIR] [--host 127.0.0.1] [--port N] [--share] [--auth user:pass]`."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m app",
        description="sdft-lite app: launch, watch, stop, resume, compare and try training runs in a browser.",
    )
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The app's options (shared with `sdft-lite ui`)."""
    p.add_argument("--runs-dir", default="runs", help="folder that holds run folders (default: runs)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it to your network)",
    )
    p.add_argument("--port", type=int, default=None, help="port (default: 7860 or the next free one)")
    p.add_argument(
        "--share", action="store_true", help="also open a public *.gradio.live link (off by default)"
    )
    p.add_argument(
        "--auth", default=None, metavar="USER:PASS", help="require this login (needed with --share)"
    )
    p.add_argument(
        "--max-running",
        type=int,
        default=1,
        help="trainings run at the same time; further launches wait in the queue (default 1)",
    )


def run(args: argparse.Namespace) -> int:
    """Launch from parsed `add_arguments` options (`python -m app` and `sdft-lite ui`). Blocks."""
    from . import launch, parse_auth

    try:
        parse_auth(args.auth)
        if args.share and not args.auth:
            raise ValueError("--share makes the app public: also pass --auth user:password")
        import gradio  # noqa: F401 - fail here with an install hint, not deep inside the app
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError:
        print("error: the app needs gradio: pip install 'sdft-lite[app]'", file=sys.stderr)
        return 2
    launch(
        runs_dir=args.runs_dir,
        host=args.host,
        port=args.port,
        share=args.share,
        auth=args.auth,
        max_running=args.max_running,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
