"""The API replica's own HTTP listener (``shardlm serve``'s default, ``ingress="direct"``).

Behind Ray Serve's proxy every server-sent event of every stream crosses one more process
as a Ray item: the proxy reads the client's request, calls the replica, and receives each
chunk the replica's app sends. With 16 streams that is 16 Ray items per decode step, and on
a small machine the proxy's CPU is taken from the workers (docs/ARCHITECTURE.md, "A
request's walk"). With direct ingress Serve still runs the replicas (placement, restarts,
health), but each replica answers HTTP itself: uvicorn serves the same FastAPI app in the
replica's event loop, on a socket bound with ``SO_REUSEPORT``, so that several replicas on
one node share the port and the kernel spreads connections over them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn

log = logging.getLogger("shardlm.serve")
BACKLOG = 2048


def listening_socket(host: str, port: int, share: bool = True) -> socket.socket:
    """A TCP socket listening on ``host:port`` (``share``: with ``SO_REUSEPORT``, so that the
    node's other replicas can bind the same port). Raises OSError with the address named."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if share:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.setblocking(False)
    return sock


def check_port_free(host: str, port: int) -> None:
    """Before deploying: fail at once, naming the address, if anything listens there (a
    probe bound without ``SO_REUSEPORT`` fails even against a socket that has it)."""
    listening_socket(host, port, share=False).close()


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the replica's process belongs to Ray."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class Listener:
    """Serve ``app`` on ``host:port`` from the running event loop until the process ends."""

    def __init__(self, app, host: str, port: int):
        self.sock = listening_socket(host, port)
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                                timeout_keep_alive=30)
        self.server = _Server(config)
        self.task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[self.sock]))
        self.task.add_done_callback(self._ended)
        log.info("the API replica listens on %s:%d itself (direct ingress)", host, port)

    def _ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("the API replica's listener failed: %r", task.exception())
