"""Finding a running local Ray cluster: an address file left by a cluster that is gone must
not be joined (ray.init(address="auto") retries such an address for minutes)."""

from __future__ import annotations

import socket
import time

from cluster.ray_utils import running_local_cluster


def _write_address(tmp_path, address: str) -> str:
    (tmp_path / "ray_current_cluster").write_text(address + "\n")
    return str(tmp_path)


def test_stale_address_file_is_ignored_quickly(tmp_path):
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    assert running_local_cluster(_write_address(tmp_path, f"127.0.0.1:{port}")) is None
    assert time.monotonic() - started < 5


def test_address_that_answers_is_returned(tmp_path):
    with socket.socket() as server:  # all interfaces: Ray names localhost by the node's IP
        server.bind(("", 0))
        server.listen()
        port = server.getsockname()[1]
        found = running_local_cluster(_write_address(tmp_path, f"127.0.0.1:{port}"))
        assert found is not None and found.endswith(f":{port}")
