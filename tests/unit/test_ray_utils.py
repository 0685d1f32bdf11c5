"""Finding a running local Ray cluster: an address file left by a cluster that is gone must
not be joined (ray.init(address="auto") retries such an address for minutes)."""

from __future__ import annotations

import socket

from cluster.ray_utils import running_local_cluster


def _write_address(tmp_path, address: str) -> str:
    (tmp_path / "ray_current_cluster").write_text(address + "\n")
    return str(tmp_path)


def test_stale_address_file_is_ignored(tmp_path):
    """A recorded address nothing answers at is skipped, and nothing else is looked for."""
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert running_local_cluster(_write_address(tmp_path, f"127.0.0.1:{port}")) is None


def test_address_that_answers_is_returned(tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        address = f"127.0.0.1:{port}"
        assert running_local_cluster(_write_address(tmp_path, address)) == address
