"""The sdft-lite app: a Gradio front end over the same engine as the CLI.

It writes a recipe, runs `sdft-lite train` as a subprocess, and reads only run folders, so a page
refresh or an app restart loses nothing. Start it with `sdft-lite ui` or `python -m app`.
Importing this package imports nothing heavy (gradio is imported by `launch`).
"""

from __future__ import annotations

import importlib
import threading
from pathlib import Path
from typing import Any


def parse_auth(auth: str | tuple[str, str] | None) -> tuple[str, str] | None:
    """'user:pass' -> ('user', 'pass'); None stays None (no login)."""
    if auth is None or isinstance(auth, tuple):
        return auth
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth must look like user:password")
    return user, password


def build(runs_dir: str | Path = "runs", max_running: int = 1):
    """(gradio Blocks, Jobs): the app, with its queue scheduler started."""
    from .handlers import Handlers
    from .jobs import Jobs
    from .main import build_app

    jobs = Jobs(runs_dir, max_running=max_running).start()
    # Compare and Try need sdft_lite.assess, which imports transformers and torch (10-20 s on a busy
    # CPU): import it in the background now rather than on the first click.
    threading.Thread(target=importlib.import_module, args=("sdft_lite.assess",), daemon=True).start()
    demo = build_app(Handlers(jobs))
    demo.queue(default_concurrency_limit=2)
    demo.jobs = jobs  # so callers can close the scheduler
    return demo, jobs


def launch(
    runs_dir: str | Path = "runs",
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    auth: str | tuple[str, str] | None = None,
    prevent_thread_lock: bool = False,
    max_running: int = 1,
    **launch_kwargs: Any,
):
    """Start the app. Binds 127.0.0.1 unless `host` says otherwise; `share` and `auth` are opt-in.

    Returns the gradio Blocks (when `prevent_thread_lock`, the server runs in a background thread;
    call `.close()` and `.jobs.close()` to stop it). Trainings keep running when the app stops.
    """
    from .main import CSS, theme

    credentials = parse_auth(auth)
    if share and credentials is None:
        # Anyone with the link could read files on this machine (data previews) and run code
        # (`module:function` scorers, trust_remote_code): a public link needs a login.
        raise ValueError("--share makes the app public: also pass --auth user:password")
    demo, _ = build(runs_dir, max_running)
    demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        auth=credentials,
        prevent_thread_lock=prevent_thread_lock,
        theme=theme(),
        css=CSS,
        **launch_kwargs,
    )
    return demo
