"""Run by tests/cluster/test_head_failure.py inside the hosts of a network-namespace cluster
(tests/netns.py), one step per command; each prints one ``RESULT {json}`` line.

    deploy ADDRESS CHECKPOINT     (a worker host) the HTTP API behind Serve's proxies on port
                                  8000, with deployment.resources so that the API replicas and
                                  the engine service stay off the head; then where things run
    healed ADDRESS OLD_HEAD IP T  (a worker host) once the head is back at IP (in T s at
                                  most): Ray's node and actor tables, the Serve application's
                                  status, the engine service's incarnation
    stream URL MODEL MAX_TOKENS   (the client host) one streamed completion; a ``TOKENS n t``
                                  line per chunk (t: CLOCK_MONOTONIC, shared by the hosts)
    redis HOST PORT PASSWORD NS   (the Redis host) the GCS's keys under its storage namespace
"""

from __future__ import annotations

import json
import sys
import time

NAME = "headloss"
RESOURCE = "shardlm_serving"  # advertised by the worker nodes only
PORT = 8000
PROMPT = [5, 17, 33, 9]


def _result(value: dict) -> None:
    print("RESULT " + json.dumps(value), flush=True)


def config(address: str, checkpoint: str):
    from cluster.contract.config import EngineConfig

    return EngineConfig().with_overrides(
        dtype="float32", model=checkpoint, tensor_parallel_size=1, cpus_per_worker=0.5,
        threads_per_worker=1, kv_cache_bytes=1 << 22, name=NAME, namespace=NAME,
        ray_address=address, resources={RESOURCE: 0.001})


def deploy(address: str, checkpoint: str) -> None:
    import ray
    import requests

    from cluster.serving.http.deploy import deploy as deploy_api

    deploy_api(config(address, checkpoint), host="0.0.0.0", port=PORT, ingress="proxy")
    here = ray.util.get_node_ip_address()
    deadline = time.monotonic() + 180
    while True:  # this host's proxy, once the engine serves
        try:
            if requests.get(f"http://{here}:{PORT}/health", timeout=5).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("the API did not become ready")
        time.sleep(0.5)
    _result(state())


def state() -> dict:
    """What Ray's own tables say: nodes, live actors and where they run; Serve's view of the
    application; the engine service's incarnation (a new one after a restart)."""
    import ray
    from ray import serve
    from ray._private import state as ray_state

    nodes = [{"id": n["NodeID"], "ip": n["NodeManagerAddress"], "alive": n["Alive"]}
             for n in ray.nodes()]
    actors = [{"id": a["ActorID"], "class": a["ActorClassName"], "name": a["Name"],
               "ip": a["Address"]["IPAddress"], "node": a["Address"]["NodeID"],
               "restarts": a["NumRestarts"], "pid": a["Pid"]}
              for a in ray_state.actors().values() if a["State"] == "ALIVE"]
    engine = ray.get_actor(NAME, namespace=NAME)
    health = ray.get(engine.health.remote(), timeout=30)
    app = serve.status().applications.get(NAME)
    return {"nodes": nodes, "actors": actors, "incarnation": health["incarnation"],
            "engine_status": health["status"], "app_status": str(app.status) if app else None}


def healed(address: str, old_head: str, head_ip: str, timeout: float) -> None:
    """Wait until Ray's node table has the old head dead and a new one alive at ``head_ip``
    and Serve's application runs again (its controller back on the new head); then the
    state, with the seconds it took."""
    import ray

    started, now, error = time.monotonic(), {}, None
    while time.monotonic() - started < timeout:
        try:  # the new GCS may not answer yet, Serve's controller not be back yet
            if not ray.is_initialized():
                ray.init(address=address, log_to_driver=False)
            now, error = state(), None
        except Exception as exc:
            error = repr(exc)
            time.sleep(1.0)
            continue
        alive = {n["id"]: n["ip"] for n in now["nodes"] if n["alive"]}
        if (old_head not in alive and head_ip in alive.values()
                and now["app_status"] == "ApplicationStatus.RUNNING"):
            break
        time.sleep(0.5)
    _result(now | {"waited_s": time.monotonic() - started, "error": error})


def stream(url: str, model: str, max_tokens: int) -> None:
    import requests

    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "logprobs": 0}
    text, tokens, finish, error = "", 0, None, None
    try:
        with requests.post(url + "/completions", json=body, stream=True, timeout=120) as r:
            if r.status_code != 200:
                error = f"HTTP {r.status_code}: {r.text[:500]}"
            for line in r.iter_lines() if error is None else ():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[len(b"data: "):])
                if "error" in chunk:
                    error = json.dumps(chunk["error"])
                    break
                choice = chunk["choices"][0]
                text += choice["text"]
                tokens += len((choice.get("logprobs") or {}).get("tokens") or [])
                finish = choice.get("finish_reason") or finish
                print(f"TOKENS {tokens} {time.monotonic()}", flush=True)
    except requests.RequestException as exc:  # a connection cut: the stream was lost
        error = repr(exc)
    _result({"text": text, "tokens": tokens, "finish": finish, "error": error})


def redis_keys(host: str, port: int, password: str, namespace: str) -> None:
    import redis

    client = redis.Redis(host=host, port=port, password=password, socket_timeout=10)
    _result({"keys": sorted(k.decode() for k in client.scan_iter(f"RAY{namespace}@*"))})


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "deploy":
        deploy(*args)
    elif command == "healed":
        healed(args[0], args[1], args[2], float(args[3]))
    elif command == "stream":
        stream(args[0], args[1], int(args[2]))
    elif command == "redis":
        redis_keys(args[0], int(args[1]), args[2], args[3])
    else:
        raise SystemExit(f"unknown command {command!r}")
