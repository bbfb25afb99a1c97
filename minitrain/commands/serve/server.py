"""Run ``minitrain serve``: check the options, load the model, bind the socket ourselves (so a
port in use is one clear line, and ``--port 0`` tells which port it got), and hand both to
uvicorn. On SIGTERM or Ctrl-C uvicorn stops accepting, lets the requests in flight finish, then
returns; the command then exits 0."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import signal
import socket
import warnings
from typing import TYPE_CHECKING

from minitrain.engine.errors import MinitrainError

if TYPE_CHECKING:
    from minitrain.commands.serve.model import Served


def serve(args: argparse.Namespace) -> int:
    _check(args)
    try:
        import uvicorn  # noqa: F401  (here: a missing extra is one line before anything starts)

        from minitrain.commands.serve.app import create  # noqa: F401
    except ImportError as exc:
        raise MinitrainError(
            f"minitrain serve needs the serve extra ({exc.name} is missing): pip install 'minitrain[serve]'"
        ) from None
    from minitrain.commands.serve.model import load

    sock = _bind(args.host, args.port)  # first: a port in use is said before the model loads
    try:
        return _run(args, sock, load(args.source))
    finally:
        sock.close()


def _run(args: argparse.Namespace, sock: socket.socket, served: Served) -> int:
    import uvicorn

    from minitrain.commands.serve.app import create

    app = create(served, args.max_batch, args.batch_timeout, args.workers, args.max_images, args.api_key)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    names = served.metadata["class_names"]
    print(
        f"minitrain serve: {args.source} ({served.runtime}, {len(names)} classes) at {url}/ ; "
        f"POST {url}/predict ; batches of up to {args.max_batch} images, waiting up to {args.batch_timeout:g} ms",
        flush=True,
    )
    if not _loopback(args.host):
        warnings.warn(
            f"serve: listening on {args.host}: reachable from the network, by anyone who can reach this "
            + ("machine (they need the API key)" if args.api_key else "machine; consider --api-key KEY"),
            stacklevel=1,
        )
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=30))
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully, to the
    # handler that was in place before: a no-op here, so that a SIGTERM ends the command with 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("minitrain serve: stopped", flush=True)
    return 0 if server.started else 1


def _check(args: argparse.Namespace) -> None:
    for name in ("max_batch", "workers", "max_images"):
        if getattr(args, name) < 1:
            raise MinitrainError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(args, name)}")
    if args.batch_timeout < 0:
        raise MinitrainError(f"--batch-timeout must be 0 or more milliseconds, not {args.batch_timeout:g}")
    if not 0 <= args.port <= 65535:
        raise MinitrainError(f"--port must be between 0 and 65535, not {args.port}")
    if args.api_key is not None and not args.api_key.strip():
        raise MinitrainError("--api-key is empty")


def _bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as exc:
        raise MinitrainError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on connections of a socket that says it is
    # TCP, and without it each answer after a connection's first waited 40 ms for a delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise MinitrainError(f"port {port} on {host} is in use (another server?); choose another --port") from None
        if exc.errno == errno.EACCES:
            raise MinitrainError(f"not allowed to listen on port {port} (below 1024 needs root)") from None
        raise MinitrainError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)  # now: clients that connect before uvicorn has started wait in the backlog
    return sock


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
