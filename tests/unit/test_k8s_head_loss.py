"""k8s/ manifests against losing the Ray head (k8s/README.md, "Losing the head"): GCS fault
tolerance on the Redis each manifest deploys, nothing of shardlm's on the head, clients that
come in through the worker pods. tests/cluster/test_head_failure.py runs the same set-up on
local Ray nodes; KubeRay itself is not run here."""

from __future__ import annotations

import json
import warnings

import pytest
import yaml

from cluster.contract.config import EngineConfig
from tests.k8s_schema import validate_file
from tests.unit.test_k8s_manifests import (K8S, _cluster_spec, _config_maps, _ray_object, _selects,
                                           schemas)

__all__ = ["schemas"]  # the fixture, shared with test_k8s_manifests

HA_MANIFESTS = ("rayservice.yaml", "raycluster.yaml")  # a RayJob's cluster lives as long as its job


def _ray_resources(params: dict) -> dict[str, float]:
    """A node's custom resources from rayStartParams: KubeRay passes ``resources`` to
    ``ray start --resources`` as the quoted JSON text ``"{\"name\": n}"``."""
    text = params.get("resources")
    if text is None:
        return {}
    assert text.startswith('"') and text.endswith('"'), f"{text!r}: KubeRay wants it quoted"
    return json.loads(json.loads(text))


@pytest.mark.parametrize("name", HA_MANIFESTS)
def test_gcs_fault_tolerance_uses_the_redis_the_manifest_deploys(name, schemas):
    documents = validate_file(K8S / name, schemas)
    obj = _ray_object(name)
    cluster = _cluster_spec(obj)
    ft = cluster["gcsFaultToleranceOptions"]
    assert "ray.io/ft-enabled" not in obj["metadata"].get("annotations", {})  # the old way
    # no fixed storage namespace: KubeRay takes the RayCluster's UID, so the old and the new
    # cluster of a RayService upgrade never share one
    assert "externalStorageNamespace" not in ft
    for params in [cluster["headGroupSpec"]["rayStartParams"]] + [
            g["rayStartParams"] for g in cluster["workerGroupSpecs"]]:
        assert "redis-password" not in params  # KubeRay refuses it beside redisPassword
    host, _, port = ft["redisAddress"].partition(":")
    (service,) = [d for d in documents if d["kind"] == "Service" and d["metadata"]["name"] == host]
    assert [p["port"] for p in service["spec"]["ports"]] == [int(port)]
    (deployment,) = [d for d in documents if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (redis,) = pod["spec"]["containers"]
    assert redis["image"].startswith("redis:")
    assert {p["containerPort"] for p in redis["ports"]} == {int(port)}
    command = " ".join(redis["command"] + redis["args"])
    assert "redis-server" in command and "--appendonly yes" in command
    env = {e["name"]: e for e in redis["env"]}
    assert '--requirepass "$REDIS_PASSWORD"' in command
    # the password Redis requires is the one the GCS is given: the same Secret and key
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == \
        ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    sec = redis["securityContext"]
    assert sec["runAsNonRoot"] is True and sec["allowPrivilegeEscalation"] is False
    assert "ALL" in sec["capabilities"]["drop"] and sec["readOnlyRootFilesystem"] is True
    # only the Ray pods of shardlm reach Redis, only on its port
    templates = [cluster["headGroupSpec"]["template"]]
    templates += [g["template"] for g in cluster["workerGroupSpecs"]]
    (policy,) = [d for d in documents if d["kind"] == "NetworkPolicy" and _selects(d, pod)]
    assert not any(_selects(policy, t) for t in templates)
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    assert peer.keys() == {"podSelector"}
    assert all(peer["podSelector"]["matchLabels"].items() <= t["metadata"]["labels"].items()
               for t in templates)
    assert rule["ports"] == [{"port": int(port), "protocol": "TCP"}]


@pytest.mark.parametrize("name", HA_MANIFESTS)
def test_api_replicas_and_engine_services_stay_off_the_head(name, tmp_path):
    """The config asks for a custom resource that every worker group advertises and the head
    does not, and the Serve application KubeRay deploys puts it on the API replicas; the
    head takes no CPU work either. So a head loss takes none of them (and no stream's journal)."""
    with warnings.catch_warnings():  # pydantic deprecation noise from Ray Serve's models
        warnings.simplefilter("ignore")
        from cluster.serving.http.deploy import app_builder

    cluster = _cluster_spec(_ray_object(name))
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    config_map, = _config_maps(name).values()
    (key, text), = config_map["data"].items()
    wanted = EngineConfig.from_dict(yaml.safe_load(text)).deployment.resources
    assert wanted, f"{key}: deployment.resources is empty: the engine may land on the head"
    assert not set(wanted) & set(_ray_resources(head["rayStartParams"]))
    for group in cluster["workerGroupSpecs"]:
        advertised = _ray_resources(group["rayStartParams"])
        for resource, amount in wanted.items():
            assert advertised.get(resource, 0) >= amount, (group["groupName"], resource)
    path = tmp_path / key
    path.write_text(text)
    app = app_builder({"config": str(path)})  # what serveConfigV2 names: proxy ingress
    options = app._bound_deployment.ray_actor_options
    assert options["resources"] == wanted and options["num_cpus"] == 0


def test_rayservice_sends_clients_to_the_worker_pods():
    """With the head out of shardlm-serve-svc a client's stream goes through a worker pod's
    Serve proxy to an API replica there: nothing of it passes through the head."""
    assert _ray_object("rayservice.yaml")["spec"]["excludeHeadPodFromServeSvc"] is True
