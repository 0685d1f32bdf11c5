"""Several "hosts" on one machine: Ray nodes in Linux network namespaces.

Each host is a network namespace (``shardlm-t-head``, ``shardlm-t-w1``, ...) with its own
loopback and one interface (``eth-<host>``) on 198.51.100.0/24; the interfaces are veth
pairs whose other ends sit on a Linux bridge in a namespace of its own
(``shardlm-t-br``), so nothing in the root namespace changes. Processes in one
namespace reach the others only through those interfaces, as on separate machines; the
file system, /dev/shm and the process table stay shared (same machine).

``netns_ray_cluster()`` builds the hosts, starts a Ray head in the first and a Ray
worker node in each of the others (``ray start --block``, each in a session of its own,
with its own ``--temp-dir``), waits until every node is alive, and yields a
:class:`NetnsRayCluster`. ``kill_node`` SIGKILLs every process inside a host's namespace
(a lost machine); ``start_node`` brings it back. Everything is torn down on exit, and
leftovers of a crashed earlier run (namespaces named ``shardlm-t-*`` and the processes
inside them) are removed first. One run at a time per machine (a file lock).

Never ``ray stop``: it kills Ray processes by name, machine-wide, including other
people's clusters.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "shardlm-t-"
BRIDGE_NS = PREFIX + "br"
SUBNET = "198.51.100"
RUN_DIR = Path("/tmp/shardlm-t")  # Ray temp dirs and logs, one folder per host
LOCK_FILE = Path("/tmp/shardlm-t.lock")
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
HEAD_PORT = 6379  # free by construction: the head namespace has its own port space

# GCS notices a lost node after period * threshold (defaults 3 s * 5): shorter here.
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be used here (not root, or no ``ip netns``)."""


def unavailable_reason() -> str | None:
    """Why this machine cannot host the namespaces, or None when it can."""
    if sys.platform != "linux":
        return f"network namespaces need Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return "network namespaces need root (euid is %d)" % os.geteuid()
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    name = f"{PREFIX}probe-{os.getpid()}"
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    if probe.returncode != 0:
        return f"`ip netns add` failed: {probe.stderr.strip()}"
    return None


@dataclass
class Host:
    ns: str
    ip: str
    ifname: str
    head: bool
    num_cpus: int
    temp_dir: Path
    proc: subprocess.Popen | None = None
    log: Path | None = None
    ray: bool = True  # False: a host on the same network that runs no Ray node (a Redis, a client)
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources of its node


@dataclass
class NetnsRayCluster:
    hosts: dict[str, Host]  # by namespace
    port: int
    env: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)
    head_args: list[str] = field(default_factory=list)  # more `ray start --head` options
    head_env: dict[str, str] = field(default_factory=dict)  # ... and environment

    @property
    def ray_hosts(self) -> list[Host]:
        return [h for h in self.hosts.values() if h.ray]

    @property
    def head(self) -> Host:
        return next(h for h in self.hosts.values() if h.head)

    @property
    def address(self) -> str:
        return f"{self.head.ip}:{self.port}"

    @property
    def node_ips(self) -> dict[str, str]:
        return {ns: h.ip for ns, h in self.hosts.items()}

    def ns_of(self, ip: str) -> str:
        return next(ns for ns, h in self.hosts.items() if h.ip == ip)

    # ---- running things inside a host ------------------------------------------------------
    def argv_in(self, ns: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", ns, *map(str, argv)]

    def run_in(self, ns: str, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        """``subprocess.run`` of ``argv`` inside namespace ``ns`` with the Ray environment."""
        kwargs.setdefault("env", self.env)
        return subprocess.run(self.argv_in(ns, argv), **kwargs)

    def popen_in(self, ns: str, argv: list[str], **kwargs) -> subprocess.Popen:
        kwargs.setdefault("env", self.env)
        return subprocess.Popen(self.argv_in(ns, argv), **kwargs)

    # ---- Ray nodes -------------------------------------------------------------------------
    def start_node(self, ns: str) -> None:
        """``ray start --block`` inside ``ns``, in a new session (its own process group)."""
        host = self.hosts[ns]
        assert host.ray, f"{ns} runs no Ray node"
        host.temp_dir.mkdir(parents=True, exist_ok=True)
        argv = [RAY, "start", "--block", "--node-ip-address", host.ip,
                "--num-cpus", str(host.num_cpus), "--temp-dir", str(host.temp_dir),
                "--object-store-memory", str(100 << 20), "--disable-usage-stats",
                "--include-log-monitor=false"]  # drivers here run with log_to_driver=False
        if host.head:
            argv += ["--head", "--port", str(self.port), "--include-dashboard=false",
                     *self.head_args]
        else:
            argv += ["--address", self.address]
        if host.resources:
            argv += ["--resources", json.dumps(host.resources)]
        host.log = host.temp_dir / "ray-start.log"
        with open(host.log, "ab") as log:
            host.proc = self.popen_in(ns, argv, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True,
                                      env=self.env | (self.head_env if host.head else {}))

    def kill_node(self, ns: str) -> int:
        """The host is lost: SIGKILL every process inside ``ns`` (raylet, agents, workers).

        Returns how many processes were killed."""
        host = self.hosts[ns]
        killed = _kill_namespace(ns)
        if host.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(host.proc.pid, signal.SIGKILL)
            host.proc.wait(timeout=30)
            host.proc = None
        return killed

    def pids_named(self, ns: str, name: str) -> list[int]:
        """The processes inside ``ns`` whose command name is ``name`` (e.g. ``gcs_server``)."""
        found = []
        for pid in _namespace_pids(ns):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == name:
                    found.append(pid)
        return found

    def wait_alive(self, count: int, timeout: float = 150.0) -> list[dict]:
        """Wait until the GCS lists ``count`` alive nodes; returns their node infos."""
        started = time.monotonic()
        poll = (
            "import json, sys, time\n"
            "from ray._raylet import GcsClient\n"
            "deadline = time.monotonic() + float(sys.argv[3])\n"
            "while True:\n"
            "    try:\n"
            "        infos = GcsClient(address=sys.argv[1]).get_all_node_info(timeout=5).values()\n"
            "        alive = [{'ip': i.node_manager_address, 'id': i.node_id.hex()}\n"
            "                 for i in infos if i.state == 0]\n"
            "    except Exception as exc:\n"
            "        alive = []\n"
            "    if len(alive) >= int(sys.argv[2]) or time.monotonic() > deadline:\n"
            "        print(json.dumps(alive)); break\n"
            "    time.sleep(0.5)\n")
        for host in self.ray_hosts:  # a node that exited early: say so now
            if host.proc is not None and host.proc.poll() is not None:
                raise RuntimeError(f"ray start in {host.ns} exited {host.proc.returncode}:\n"
                                   f"{_tail(host.log)}")
        out = self.run_in(self.head.ns, [sys.executable, "-c", poll, self.address, count, timeout],
                          capture_output=True, text=True, timeout=timeout + 60)
        try:
            alive = json.loads(out.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            alive = []
        if len(alive) < count:
            logs = "\n".join(f"--- {h.ns}:\n{_tail(h.log)}" for h in self.ray_hosts)
            raise RuntimeError(f"only {len(alive)} of {count} Ray nodes alive after "
                               f"{time.monotonic() - started:.0f}s: {alive}\n{out.stderr[-2000:]}\n{logs}")
        return alive


# ---- namespaces ----------------------------------------------------------------------------
def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")


def our_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(PREFIX)]


def _namespace_pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _kill_namespace(ns: str, timeout: float = 30.0) -> int:
    """SIGKILL every process whose network namespace is ``ns``; wait until they are gone."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while True:
        pids = [p for p in _namespace_pids(ns) if p != os.getpid()]
        if not pids:
            return len(killed)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes in {ns} survive SIGKILL: {pids}")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        time.sleep(0.2)  # also reaps: children of ours become zombies until waited for


def cleanup(remove_logs: bool = True) -> None:
    """Remove every ``shardlm-t-*`` namespace, the processes inside them, and the run dir.

    Safe on a clean machine; used before and after each run."""
    for ns in our_namespaces():
        _kill_namespace(ns)
    for ns in our_namespaces():
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    if remove_logs:
        shutil.rmtree(RUN_DIR, ignore_errors=True)


def _make_hosts(names: list[str]) -> dict[str, Host]:
    """The bridge namespace and one namespace per host, wired up; returns the hosts."""
    _ip("netns", "add", BRIDGE_NS)
    _ip("-n", BRIDGE_NS, "link", "set", "lo", "up")
    _ip("-n", BRIDGE_NS, "link", "add", "br0", "type", "bridge")
    _ip("-n", BRIDGE_NS, "link", "set", "br0", "up")
    hosts = {}
    for i, name in enumerate(names):
        ns, ifname, ip = PREFIX + name, f"eth-{name}", f"{SUBNET}.{i + 1}"
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", BRIDGE_NS, "link", "add", f"v-{name}", "type", "veth",
            "peer", "name", ifname, "netns", ns)
        _ip("-n", BRIDGE_NS, "link", "set", f"v-{name}", "master", "br0")
        _ip("-n", BRIDGE_NS, "link", "set", f"v-{name}", "up")
        _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", ifname)
        _ip("-n", ns, "link", "set", ifname, "up")
        # a default route through the interface, so "which source address reaches the
        # outside" (UDP connect, as Ray and Gloo probe) answers this host's IP, not an error
        _ip("-n", ns, "route", "add", "default", "dev", ifname)
        hosts[ns] = Host(ns, ip, ifname, head=i == 0, num_cpus=0 if i == 0 else 1,
                         temp_dir=RUN_DIR / name)
    return hosts


@contextlib.contextmanager
def _run_lock(timeout: float):
    RUN_DIR.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_FILE, "w") as lock:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another run holds {LOCK_FILE} "
                                       f"for over {timeout:.0f}s") from None
                time.sleep(1.0)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def netns_ray_cluster(workers: tuple[str, ...] = ("w1", "w2"), head: str = "head",
                      num_cpus: int = 1, lock_timeout: float = 600.0, others: tuple[str, ...] = (),
                      env: dict[str, str] | None = None, head_env: dict[str, str] | None = None,
                      head_args: list[str] | None = None,
                      worker_resources: dict[str, float] | None = None, before_start=None):
    """Hosts ``head`` (Ray head, 0 CPUs) and ``workers`` (Ray worker nodes, ``num_cpus``
    each) at 198.51.100.1, .2, ...; yields a :class:`NetnsRayCluster` once all are alive.

    ``others``: hosts on the same network, after the workers, that run no Ray node (a
    Redis, a client). ``env``: more environment for every process started in a host;
    ``head_env`` and ``head_args``: more environment and ``ray start --head`` options for
    the head alone; ``worker_resources``: the custom Ray resources of each worker node.
    ``before_start(cluster)`` runs once the hosts exist, before any Ray node starts (to start
    a service the head needs; it may add to ``cluster.head_env``)."""
    reason = unavailable_reason()
    if reason:
        raise NetnsUnavailable(reason)
    with _run_lock(lock_timeout):
        cleanup()  # a crashed earlier run's leftovers (we hold the lock: no run is live)
        failed, cluster = True, None
        try:
            started = time.monotonic()
            hosts = _make_hosts([head, *workers, *others])
            for host in hosts.values():
                host.num_cpus = 0 if host.head else num_cpus
                host.ray = host.ns.removeprefix(PREFIX) not in others
                if host.ray and not host.head:
                    host.resources = dict(worker_resources or {})
            base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
            cluster = NetnsRayCluster(hosts, HEAD_PORT, base | RAY_ENV | (env or {}),
                                      head_args=list(head_args or []),
                                      head_env=dict(head_env or {}))
            cluster.timings["namespaces_s"] = time.monotonic() - started
            if before_start is not None:
                before_start(cluster)
            for host in cluster.ray_hosts:  # workers retry until the head's GCS answers
                cluster.start_node(host.ns)
            cluster.wait_alive(len(cluster.ray_hosts))
            cluster.timings["ray_up_s"] = time.monotonic() - started
            yield cluster
            failed = False
        finally:
            if failed and RUN_DIR.exists():
                print(f"netns cluster failed; Ray logs kept under {RUN_DIR}", file=sys.stderr)
            if cluster is not None:
                for ns in list(cluster.hosts):
                    cluster.kill_node(ns)
            cleanup(remove_logs=not failed)


def _tail(path: Path | None, chars: int = 3000) -> str:
    if path is None or not path.exists():
        return "(no log)"
    return path.read_text(errors="replace")[-chars:]


def stdout_lines(proc: subprocess.Popen) -> queue.Queue:
    """``proc``'s standard output lines as they come, read on a thread of their own; None
    after the last."""
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for text in proc.stdout:
            lines.put(text)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines
