"""Which Ray cluster a shardlm command joins: what Ray itself would join ($RAY_ADDRESS, an
address given, the cluster `ray start` recorded), never another process's private cluster
(the test session's own Ray here: started by ``ray.init`` in this process, as an ``LLM`` in a
script starts one, and gone when its process ends)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from cluster.ray_utils import running_local_cluster

ROOT = Path(__file__).parents[2]
PROBE = ("import ray; from cluster.ray_utils import connect_ray; connect_ray(); "
         "print('GCS', ray.get_runtime_context().gcs_address); ray.shutdown()")


def test_a_private_cluster_running_here_is_not_joined(ray_session, tmp_path):
    mine = ray_session.get_runtime_context().gcs_address
    assert running_local_cluster(str(tmp_path)) is None  # no recorded cluster in tmp_path
    # its own temp dir, with no cluster recorded in it (short: Ray's socket paths must fit)
    temp = tempfile.mkdtemp(prefix="rj-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": temp}
    try:
        proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (theirs,) = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("GCS ")]
    assert theirs != mine  # it started its own instead of joining this process's
