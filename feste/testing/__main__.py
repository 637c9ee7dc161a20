"""Command line: ``python -m feste.testing --port 8000 --latency 0.05 ...``.

Design: one option per ``ServerConfig`` knob, generated from the dataclass so
the CLI cannot drift from it. The first line on stdout is the base URL,
flushed as soon as the server listens (``TestServer(mode="process")`` reads
it); nothing else is written to stdout. The server stops on Ctrl-C or SIGTERM,
and with ``--exit-on-stdin-eof`` also when its parent closes our stdin, so a
crashed parent leaves no stray server behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import threading

from ._config import LOOPBACK_HOSTS, add_knob_arguments, check_loopback_host, config_from_namespace
from ._run import serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m feste.testing",
        description="Serve a local imitation of the OpenAI (/v1) and Cohere (/v2) APIs.",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help=f"address to bind, loopback only: {', '.join(LOOPBACK_HOSTS)} (default: 127.0.0.1)",
    )
    parser.add_argument("--port", type=int, default=8000, help="port, 0 for any (default: 8000)")
    parser.add_argument("--exit-on-stdin-eof", action="store_true", help=argparse.SUPPRESS)
    add_knob_arguments(parser)
    return parser


async def _serve_until_stopped(args: argparse.Namespace, host: str) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # Windows, non-main thread
            loop.add_signal_handler(signum, stop.set)
    if args.exit_on_stdin_eof:

        def wait_for_eof() -> None:
            with contextlib.suppress(OSError, ValueError):
                sys.stdin.buffer.read()
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=wait_for_eof, name="stdin-eof-watch", daemon=True).start()

    def announce(url: str) -> None:
        print(url, flush=True)

    await serve(config_from_namespace(args), host, args.port, on_ready=announce, stop=stop)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        host = check_loopback_host(args.host)
        config_from_namespace(args)  # validate the knobs before binding anything
    except ValueError as exc:
        parser.error(str(exc))
    try:
        asyncio.run(_serve_until_stopped(args, host))
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # e.g. the port is taken
        print(f"feste.testing: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
