"""``instructx2x-web``: the InstructX2X panel in a browser, over trame-slicer.

The page is the desktop panel's workflow on the same layers: MRML in and out through
``scene``, jobs, queue, worker and result import through ``session.EditSession`` (the model
stays warm in ``instructx2x serve``, one job at a time). ``panel.WebPanel`` puts the page
together from its parts; this module is the command line that checks the settings, loads the
model and serves the page.

One server process is one workspace: every browser tab connected to it sees the same
radiograph and results. Several readers each run their own server (own port) and share one
warm model through ``--worker-socket`` (``instructx2x serve --socket``); their jobs then run
one at a time and the page shows its place in the queue. It listens on loopback unless
``--host`` says otherwise, and answers only those who hold the launch's token
(``access``; docs/security.md): the address it prints carries it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from instructx2x.errors import InstructX2XError

from ..session import DEFAULT_QUOTA_BYTES
from ..worker import WorkerError
from .access import AccessPolicy, new_token, read_token_file
from .messages import logger
from .pacs_targets import PacsTargets
from .panel import WebPanel
from .uploads import MAX_UPLOAD_BYTES

__all__ = ["main", "build_parser"]


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of MB >= 1, got {text!r}")
    return int(text)


def _unusable_address(host: str, port: int) -> str | None:
    """Why the server could not listen on ``host:port`` (None when it can)."""
    import socket

    try:
        with socket.create_server((host, port)):
            return None
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        return f"cannot listen on {host}:{port} ({reason}); choose another --port or --host."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instructx2x-web",
        description=(
            "The InstructX2X panel in a browser (trame-slicer). Images it writes are SYNTHETIC, "
            "not for diagnosis. The address it prints carries a token that every page must show."
        ),
    )
    parser.add_argument("--model", default="demo", help="model folder, demo (default) or untrained-tiny")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to listen on (default loopback; anything else exposes the page: put a "
        "reverse proxy with TLS and a login in front, docs/security.md)",
    )
    parser.add_argument(
        "--origin",
        action="append",
        default=[],
        metavar="URL",
        help="an address the page is served under besides this server's own, e.g. "
        "https://xray.example.org behind a reverse proxy (repeatable)",
    )
    parser.add_argument(
        "--token-file",
        metavar="PATH",
        help="read the access token from this file (first line, at least 32 characters) "
        "instead of drawing a new one",
    )
    parser.add_argument(
        "--max-upload-mb",
        type=_positive,
        default=MAX_UPLOAD_BYTES // 2**20,
        help="largest upload in MB (default %(default)s)",
    )
    parser.add_argument(
        "--quota-mb",
        type=_positive,
        default=DEFAULT_QUOTA_BYTES // 2**20,
        help="the most disk the session's uploads, jobs and results may take, in MB (default %(default)s)",
    )
    parser.add_argument(
        "--max-connections", type=_positive, default=8, help="pages open at once (default %(default)s)"
    )
    parser.add_argument(
        "--pacs",
        action="append",
        default=[],
        metavar="NAME=AET@HOST:PORT",
        help="a PACS the page may send results to (repeatable); the page chooses by name",
    )
    parser.add_argument(
        "--pacs-config",
        metavar="PATH",
        help='a JSON file {NAME: "AET@HOST:PORT", ...} of PACS targets, beside --pacs',
    )
    parser.add_argument(
        "--worker-socket",
        metavar="PATH",
        help="use the shared worker of instructx2x serve --socket PATH (one warm model for "
        "several servers; --model and --device are then the worker's)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)  # our own lines only: the frameworks' INFO echoes page content
    for framework in ("wslink", "trame_server", "trame", "aiohttp", "asyncio"):
        # their lines quote what clients send (text frames, call arguments, malformed requests)
        # and a flood of them would fill the disk: refusals are logged by access, by kind
        logging.getLogger(framework).setLevel(logging.CRITICAL + 1)
    try:  # every setting checked before the model loads
        token = read_token_file(arguments.token_file) if arguments.token_file else new_token()
        access = AccessPolicy(
            token,
            host=arguments.host,
            origins=tuple(arguments.origin),
            max_connections=arguments.max_connections,
        )
        pacs_targets = PacsTargets.from_arguments(arguments.pacs, arguments.pacs_config)
    except InstructX2XError as error:
        print(f"instructx2x-web: {error}", file=sys.stderr)
        return 2
    if arguments.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"WARNING: listening on {arguments.host}: whoever reaches this machine and learns the token can open "
            "the page and its radiographs, over plain HTTP. Put a reverse proxy with TLS and a login in front "
            "(docs/security.md), and name its address with --origin.",
            file=sys.stderr,
        )
    problem = _unusable_address(arguments.host, arguments.port)  # before the model loads
    if problem:
        print(f"instructx2x-web: {problem}", file=sys.stderr)
        return 2
    # SIGTERM (a service manager, a test) ends the server like Ctrl-C, so that the worker stops
    # and the session's temporary files are removed, at any moment from here on.
    signal.signal(signal.SIGTERM, _interrupt)
    panel = WebPanel(
        model=arguments.model,
        device=arguments.device,
        max_upload_bytes=arguments.max_upload_mb * 2**20,
        worker_socket=arguments.worker_socket,
        access=access,
        pacs_targets=pacs_targets,
        quota_bytes=arguments.quota_mb * 2**20,
    )
    try:
        # the model loads before the page is served
        model = panel.session.start_worker(panel.controls.settings())
        panel.jobs.show_model_defaults()
        panel.jobs.show_worker()
        logger.info("%s", model.describe())
        panel.ctrl.on_server_ready.add(
            lambda **_: print(
                f"InstructX2X web panel: {_announced_address(arguments.host, panel.server.port, token)}"
                + "".join(
                    f"\n  through {origin}: {origin.rstrip('/')}/?token={token}"
                    for origin in arguments.origin
                ),
                flush=True,
            )
        )
        panel.server.start(
            host=arguments.host,
            port=arguments.port,
            open_browser=False,
            show_connection_info=False,
            disable_logging=True,
            timeout=0,
        )  # timeout 0: no shutdown when the last tab closes
    except WorkerError as error:
        print(f"instructx2x-web: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    finally:
        panel.close()
    return 0


def _announced_address(host: str, port: int, token: str) -> str:
    """The address to open, token included (loopback for a server on every interface)."""
    name = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    name = f"[{name}]" if ":" in name else name
    return f"http://{name}:{port}/?token={token}"


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
