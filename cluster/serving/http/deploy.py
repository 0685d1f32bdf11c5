"""Building and deploying the HTTP API: the Serve application from a config (``build``),
KubeRay's application builder (``app_builder``, named by ``serveConfigV2``), and
``deploy``/``shutdown`` for ``shardlm serve`` and tests.

Two ways in (``ingress``): ``"direct"`` (``deploy``'s default) has each API replica listen on
the port itself, on the head node, and starts no Serve proxy; ``"proxy"`` (and KubeRay) has
Serve's proxy take the requests and forward them to the replicas. Direct ingress saves the
proxy's hop for every streamed chunk (docs/ARCHITECTURE.md, "A request's walk")."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import yaml
from ray import serve

from cluster.contract.config import SECTIONS, EngineConfig
from cluster.serving.http.app import DEFAULT_MAX_BODY_BYTES, OpenAIServer, Settings
from cluster.serving.http.listener import check_port_free

log = logging.getLogger("shardlm.serve")
INGRESS = ("direct", "proxy")
HEAD_NODE = "node:__internal_head__"  # Ray's resource of the head node


def build(config: EngineConfig, api_keys=None, served_model_name: str | None = None,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, num_replicas: int = 1,
          listen: tuple[str, int] | None = None) -> serve.Application:
    """The Serve application for ``config``; keys from ``api_keys`` plus ``$SHARDLM_API_KEY``.
    ``listen``: (host, port) on which the replicas listen themselves, on the head node
    (direct ingress); None: behind Serve's proxy, on nodes with ``deployment.resources``."""
    keys = _keys(api_keys) + _keys(os.environ.get("SHARDLM_API_KEY"))
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes={max_body_bytes!r}: must be a positive integer")
    settings = Settings(config.to_dict(), served_model_name or config.model.model,
                        tuple(dict.fromkeys(keys)), max_body_bytes,
                        (listen[0], int(listen[1])) if listen else None)
    options = {"num_replicas": num_replicas}
    if listen:  # where the port was promised: the head node, as Serve's own proxy would be
        options["ray_actor_options"] = {"num_cpus": 0, "resources": {HEAD_NODE: 0.001}}
    elif config.deployment.resources:  # behind the proxy: where the engine services may run
        options["ray_actor_options"] = {"num_cpus": 0,
                                        "resources": dict(config.deployment.resources)}
    return OpenAIServer.options(**options).bind(settings)


def app_builder(args: dict) -> serve.Application:
    """Serve's application builder. ``args``: ``config`` (YAML path), any EngineConfig field
    as an override (``model``, ``tensor_parallel_size``, ...), ``api_key``/``api_keys``,
    ``served_model_name``, ``max_body_bytes``, ``num_replicas``. Strings from ``serve run
    ... key=value`` are parsed as YAML scalars for non-string fields."""
    args = dict(args or {})
    path = args.pop("config", None)
    keys = _keys(args.pop("api_key", None)) + _keys(args.pop("api_keys", None))
    served = args.pop("served_model_name", None)
    max_body = _scalar(args.pop("max_body_bytes", DEFAULT_MAX_BODY_BYTES))
    replicas = _scalar(args.pop("num_replicas", 1))
    config = EngineConfig.from_yaml(path) if path else EngineConfig()
    config = config.with_overrides(**{k: _coerce(k, v) for k, v in args.items()})
    return build(config, keys, served, max_body, replicas)


def deploy(config: EngineConfig | str | Path, host: str = "127.0.0.1", port: int = 8000,
           api_keys=None, blocking: bool = False, ingress: str = "direct", **kwargs) -> str:
    """Run the API on ``host:port`` of the head node; the base URL. ``ingress``: "direct"
    (the replicas listen themselves) or "proxy" (Serve's proxy listens)."""
    from cluster.ray_utils import connect_ray

    if ingress not in INGRESS:
        raise ValueError(f"ingress={ingress!r}: must be one of {', '.join(INGRESS)}")
    config = config if isinstance(config, EngineConfig) else EngineConfig.from_yaml(config)
    connect_ray(config.deployment.ray_address)
    if ingress == "direct":
        if _on_head_node():  # else the replica's own bind names the address if it fails
            check_port_free(host, port)
        serve.start(proxy_location="Disabled")
        kwargs["listen"] = (host, port)
    else:
        serve.start(http_options={"host": host, "port": port})
    url = f"http://{host}:{port}/v1"
    log.info("OpenAI API for %s at %s (%s; %s)", config.model.model, url,
             "API keys required" if _keys(api_keys) or os.environ.get("SHARDLM_API_KEY")
             else "open: no API key configured", f"{ingress} ingress")
    serve.run(build(config, api_keys, **kwargs), name=config.deployment.name, route_prefix="/",
              blocking=blocking)
    return url


def _on_head_node() -> bool:
    import ray

    here = ray.get_runtime_context().get_node_id()
    return any(n["NodeID"] == here and HEAD_NODE in n.get("Resources", {})
               for n in ray.nodes() if n.get("Alive"))


def shutdown(name: str = "shardlm", namespace: str = "shardlm", replicas: int = 1) -> None:
    """Stop Serve, the engine services of deployment ``name`` (each of its replicas) and its
    response store."""
    from cluster.serving.http.store import stop_store
    from cluster.serving.service import stop_services

    serve.shutdown()
    stop_services(name, namespace, replicas)
    stop_store(name, namespace)


def _keys(value) -> list[str]:
    if not value:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(k).strip() for k in items if str(k).strip()]


def _scalar(value):
    return yaml.safe_load(value) if isinstance(value, str) else value


def _coerce(name: str, value):
    """``"2"`` -> 2 for an int field; strings stay strings for string fields."""
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            if f.name == name and isinstance(value, str) and not str(f.type).startswith("str"):
                return yaml.safe_load(value)
    return value
