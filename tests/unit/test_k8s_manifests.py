"""k8s/ manifests against the KubeRay CRD schemas, their embedded configs, the Grafana dashboard.

The CRDs are read from ``../shared/k8s-schemas`` beside the repository (or
``$SHARDLM_K8S_SCHEMAS``); without them these tests fail, they never skip.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import warnings
from pathlib import Path, PurePosixPath

import pytest
import yaml

from cluster.contract.config import EngineConfig
from tests.k8s_schema import (SCHEMAS_ENV, ManifestError, load_documents, schemas_dir,
                              validate_file, validate_object)

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
MANIFESTS = {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob",
             "rayservice.yaml": "RayService"}
SERVE_IMPORT_PATH = "cluster.serving.http.deploy:app_builder"
HEAD_PORTS = {6379, 8265, 10001, 8000, 8080}
METRICS = {
    "shardlm:num_requests_running", "shardlm:num_requests_waiting", "shardlm:kv_cache_usage_perc",
    "shardlm:prompt_tokens_total", "shardlm:generation_tokens_total",
    "shardlm:time_to_first_token_seconds", "shardlm:time_per_output_token_seconds",
    "shardlm:e2e_request_latency_seconds", "shardlm:num_preemptions_total",
    "shardlm:prefix_cache_hits_total", "shardlm:worker_restarts_total",
    "shardlm:moe_expert_tokens_total", "shardlm:moe_expert_step_tokens",
    "shardlm:moe_expert_load_imbalance", "shardlm:spec_decode_num_drafts_total",
    "shardlm:spec_decode_num_draft_tokens_total", "shardlm:spec_decode_num_accepted_tokens_total",
    "shardlm:spec_decode_num_accepted_tokens_per_pos_total",
}
HISTOGRAMS = {"shardlm:time_to_first_token_seconds", "shardlm:time_per_output_token_seconds",
              "shardlm:e2e_request_latency_seconds"}


@pytest.fixture(scope="module")
def schemas() -> Path:
    try:
        return schemas_dir(REPO)
    except FileNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)


def _ray_object(name: str) -> dict:
    (obj,) = [d for d in load_documents(K8S / name) if d["apiVersion"].startswith("ray.io/")]
    return obj


def _cluster_spec(obj: dict) -> dict:
    """The RayCluster spec: the object's own, or the one a RayJob/RayService embeds."""
    key = {"RayCluster": None, "RayJob": "rayClusterSpec",
           "RayService": "rayClusterConfig"}[obj["kind"]]
    return obj["spec"][key] if key else obj["spec"]


def _pod_specs(cluster: dict):
    yield "head", cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster["workerGroupSpecs"]:
        yield group["groupName"], group["template"]["spec"]


def _resolve_config(path: str, pod: dict, config_maps: dict[str, dict]) -> str:
    """The text a pod sees at ``path`` when that path lies in a mounted ConfigMap."""
    target = PurePosixPath(path)
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for container in pod["containers"]:
        for mount in container.get("volumeMounts", []):
            mount_path = PurePosixPath(mount["mountPath"])
            if mount_path in target.parents and "configMap" in volumes[mount["name"]]:
                data = config_maps[volumes[mount["name"]]["configMap"]["name"]]["data"]
                key = str(target.relative_to(mount_path))
                assert key in data, f"{path}: no key {key!r} in the ConfigMap at {mount_path}"
                return data[key]
    raise AssertionError(f"{path} is not inside a ConfigMap mounted in the pod")


def _config_maps(name: str) -> dict[str, dict]:
    documents = load_documents(K8S / name)
    return {d["metadata"]["name"]: d for d in documents if d["kind"] == "ConfigMap"}


# ---- the schema and the validator ----------------------------------------------------------

def test_missing_schema_directory_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(SCHEMAS_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=SCHEMAS_ENV) as info:
        schemas_dir(REPO)
    assert "ray.io_rayclusters.yaml" in str(info.value)


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_validates(name, schemas):
    documents = validate_file(K8S / name, schemas)
    ray_objects = [d for d in documents if d["apiVersion"] == "ray.io/v1"]
    assert [d["kind"] for d in ray_objects] == [MANIFESTS[name]]
    assert {d["kind"] for d in documents} <= {MANIFESTS[name], "ConfigMap", "NetworkPolicy",
                                              "Deployment", "Service"}


def test_embedded_core_kinds_catch_typos(schemas):
    """A Deployment and a Service are checked against the core types the CRDs embed."""
    (redis,) = [d for d in load_documents(K8S / "rayservice.yaml") if d["kind"] == "Deployment"]
    broken = _edit(redis, ("spec", "template", "spec", "containers", 0, "image"), rename="imag")
    assert any(e.startswith("spec.template.spec.containers[0].imag: unknown field")
               for e in validate_object(broken, schemas))
    (service,) = [d for d in load_documents(K8S / "rayservice.yaml") if d["kind"] == "Service"]
    broken = _edit(service, ("spec", "ports", 0, "port"), value="6379")
    assert "spec.ports[0].port: expected integer, got str '6379'" in validate_object(broken, schemas)


def _edit(obj: dict, path: tuple, *, rename: str | None = None, value=None) -> dict:
    obj = copy.deepcopy(obj)
    parent = obj
    for step in path[:-1]:
        parent = parent[step]
    if rename is not None:
        parent[rename] = parent.pop(path[-1])
    else:
        parent[path[-1]] = value
    return obj


MISSPELT = [
    ("raycluster.yaml", ("spec", "headGroupSpec", "rayStartParams"), "rayStartParam",
     "spec.headGroupSpec.rayStartParam"),
    ("raycluster.yaml", ("spec", "workerGroupSpecs", 0, "replicas"), "replicass",
     "spec.workerGroupSpecs[0].replicass"),
    ("rayjob.yaml", ("spec", "shutdownAfterJobFinishes"), "shutdownAfterJobFinished",
     "spec.shutdownAfterJobFinished"),
    ("rayservice.yaml", ("spec", "rayClusterConfig", "workerGroupSpecs", 0, "template", "spec",
                         "containers", 0, "resources"), "resource",
     "spec.rayClusterConfig.workerGroupSpecs[0].template.spec.containers[0].resource"),
]


@pytest.mark.parametrize("name,path,new_key,where", MISSPELT, ids=[c[2] for c in MISSPELT])
def test_misspelt_field_fails_naming_its_path(name, path, new_key, where, schemas):
    broken = _edit(_ray_object(name), path, rename=new_key)
    errors = validate_object(broken, schemas)
    assert any(e.startswith(f"{where}: unknown field") for e in errors), errors


WRONG_TYPES = [
    ("raycluster.yaml", ("spec", "workerGroupSpecs", 0, "replicas"), "two",
     "spec.workerGroupSpecs[0].replicas: expected integer"),
    ("raycluster.yaml", ("spec", "headGroupSpec", "rayStartParams", "num-gpus"), 0,
     "spec.headGroupSpec.rayStartParams.num-gpus: expected string"),
    ("rayjob.yaml", ("spec", "shutdownAfterJobFinishes"), "yes",
     "spec.shutdownAfterJobFinishes: expected boolean"),
    ("rayservice.yaml", ("spec", "rayClusterConfig", "headGroupSpec", "template", "spec",
                         "containers", 0, "ports", 0, "containerPort"), "6379",
     "spec.rayClusterConfig.headGroupSpec.template.spec.containers[0].ports[0].containerPort: "
     "expected integer"),
    ("raycluster.yaml", ("spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0,
                         "resources", "limits", "nvidia.com/gpu"), [8],
     "spec.workerGroupSpecs[0].template.spec.containers[0].resources.limits.nvidia.com/gpu: "
     "expected integer or string"),
    ("raycluster.yaml", ("spec", "autoscalerOptions"), {"upscalingMode": "Fast"},
     "spec.autoscalerOptions.upscalingMode: 'Fast' is not one of"),
]


@pytest.mark.parametrize("name,path,value,message", WRONG_TYPES,
                         ids=[str(c[1][-1]) for c in WRONG_TYPES])
def test_wrong_type_fails_naming_its_path(name, path, value, message, schemas):
    broken = _edit(_ray_object(name), path, value=value)
    errors = validate_object(broken, schemas)
    assert any(e.startswith(message) for e in errors), errors


def test_defaults_apply_before_required_and_nulls_are_pruned(schemas):
    cluster = _ray_object("raycluster.yaml")
    group = cluster["spec"]["workerGroupSpecs"][0]
    del group["minReplicas"], group["maxReplicas"]  # required, but defaulted by the server
    group["template"]["metadata"] = None  # pruned by the server: not nullable
    assert validate_object(cluster, schemas) == []
    del group["groupName"]  # required, no default
    assert "spec.workerGroupSpecs[0].groupName: required field is missing" in \
        validate_object(cluster, schemas)


def test_validate_file_raises_with_every_error(tmp_path, schemas):
    cluster = _edit(_ray_object("raycluster.yaml"), ("spec", "workerGroupSpecs", 0, "replicas"),
                    value="two")
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(cluster))
    with pytest.raises(ManifestError, match=r"spec\.workerGroupSpecs\[0\]\.replicas"):
        validate_file(path, schemas)


# ---- what the manifests say ------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_pods_have_the_ray_and_gpu_shape(name):
    obj = _ray_object(name)
    cluster = _cluster_spec(obj)
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    head_container = head["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in head_container["ports"]} >= HEAD_PORTS
    for kind in ("requests", "limits"):
        assert "nvidia.com/gpu" not in head_container["resources"].get(kind, {})
    for group in cluster["workerGroupSpecs"]:
        resources = group["template"]["spec"]["containers"][0]["resources"]
        requested, limit = (int(resources[k]["nvidia.com/gpu"]) for k in ("requests", "limits"))
        assert requested == limit > 0
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for _, pod in _pod_specs(cluster):
        shm = [v["name"] for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
        for container in pod["containers"]:
            tag = container["image"].rpartition(":")[2]
            assert cluster["rayVersion"] in tag, f"{container['image']}: not Ray {cluster['rayVersion']}"
            assert any(m["mountPath"] == "/dev/shm" and m["name"] in shm
                       for m in container["volumeMounts"]), f"{container['name']} lacks /dev/shm"


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_embedded_configs_match_configs_dir_and_fit_the_cluster(name):
    cluster = _cluster_spec(_ray_object(name))
    gpus_per_pod = [int(g["template"]["spec"]["containers"][0]["resources"]["limits"]
                        ["nvidia.com/gpu"]) for g in cluster["workerGroupSpecs"]]
    total = sum(n * g["replicas"] for n, g in zip(gpus_per_pod, cluster["workerGroupSpecs"]))
    config_maps = _config_maps(name)
    assert config_maps, f"{name} ships no ConfigMap"
    for config_map in config_maps.values():
        for key, text in config_map["data"].items():
            shipped = REPO / "configs" / key
            assert shipped.is_file(), f"{name}: ConfigMap key {key} is not a file in configs/"
            config = EngineConfig.from_dict(yaml.safe_load(text))
            assert config == EngineConfig.from_yaml(shipped), f"{key} differs from configs/{key}"
            par = config.parallel
            assert par.device == "cuda" and config.model.dtype == "bfloat16"
            assert par.world_size <= total, f"{key} needs {par.world_size} GPUs, has {total}"
            assert par.tensor_parallel_size <= max(gpus_per_pod), f"{name}: a TP group spans pods"


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_ray_clusters_require_tokens_and_pods_run_unprivileged(name):
    cluster = _cluster_spec(_ray_object(name))
    assert cluster["authOptions"]["mode"] == "token"
    for pod_name, pod in _pod_specs(cluster):
        for container in pod["containers"]:
            sec = container.get("securityContext") or {}
            assert sec.get("runAsNonRoot") is True, (pod_name, container["name"])
            assert sec.get("allowPrivilegeEscalation") is False, (pod_name, container["name"])
            assert "ALL" in sec.get("capabilities", {}).get("drop", []), (pod_name, container["name"])


EXTERNAL_PORTS = {"rayservice.yaml": [8000], "raycluster.yaml": [8000], "rayjob.yaml": []}


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_network_policy_admits_only_the_api_from_outside(name, schemas):
    """One NetworkPolicy per manifest, selecting every Ray pod of it: a rule without sources
    (reachable from anywhere) opens the API port alone, every other rule names in-cluster
    sources only (pods, namespaces: no IP blocks), and the Ray pods reach each other."""
    documents = validate_file(K8S / name, schemas)
    cluster = _cluster_spec(_ray_object(name))
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    (policy,) = [d for d in documents if d["kind"] == "NetworkPolicy" and _selects(d, templates[0])]
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    selector = spec["podSelector"]["matchLabels"]
    for template in templates:
        assert selector.items() <= template["metadata"]["labels"].items()
    open_rules = [r for r in spec["ingress"] if not r.get("from")]
    assert sorted(p["port"] for r in open_rules for p in r["ports"]) == EXTERNAL_PORTS[name]
    for rule in spec["ingress"]:
        for peer in rule.get("from", []):
            assert "ipBlock" not in peer and peer.keys() <= {"podSelector", "namespaceSelector"}
    assert any(r.get("from") == [{"podSelector": {"matchLabels": selector}}] and not r.get("ports")
               for r in spec["ingress"])


def _selects(policy: dict, template: dict) -> bool:
    labels = template["metadata"]["labels"]
    return policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()


def test_rayservice_takes_its_api_key_from_a_secret():
    service = _ray_object("rayservice.yaml")
    assert "api_key" not in service["spec"]["serveConfigV2"]  # not in the visible config
    for pod_name, pod in _pod_specs(service["spec"]["rayClusterConfig"]):
        for container in pod["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            ref = env["SHARDLM_API_KEY"]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "shardlm-api-key", "key": "api-key"}, pod_name


def test_rayservice_serve_config_names_the_shardlm_application():
    with warnings.catch_warnings():  # pydantic deprecation noise from Ray Serve's models
        warnings.simplefilter("ignore")
        from ray.serve.schema import ServeDeploySchema

    service = _ray_object("rayservice.yaml")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)  # Ray Serve's own schema
    (app,) = serve_config["applications"]
    assert app["name"] == "shardlm"
    assert app["import_path"] == SERVE_IMPORT_PATH
    assert app["route_prefix"] == "/"
    config_maps = _config_maps("rayservice.yaml")
    for pod_name, pod in _pod_specs(service["spec"]["rayClusterConfig"]):
        text = _resolve_config(app["args"]["config"], pod, config_maps)
        config = EngineConfig.from_dict(yaml.safe_load(text))
        assert config.parallel.tensor_parallel_size == 8, pod_name
        assert config.model.model.startswith("/models/")


def test_rayjob_runs_shardlm_batch_with_its_config_on_the_head():
    job = _ray_object("rayjob.yaml")
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["shardlm", "batch"]
    options = dict(zip(argv[2::2], argv[3::2]))
    assert set(options) >= {"--input", "--output", "--config"}
    assert spec["shutdownAfterJobFinishes"] is True
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]  # the entrypoint runs here
    config = EngineConfig.from_dict(yaml.safe_load(
        _resolve_config(options["--config"], head, _config_maps("rayjob.yaml"))))
    assert config.parallel.world_size == 8
    mounts = {m["mountPath"]: m for m in head["containers"][0]["volumeMounts"]}
    for flag in ("--input", "--output"):
        parents = PurePosixPath(options[flag]).parents
        (mount,) = [m for path, m in mounts.items() if PurePosixPath(path) in parents]
        assert flag == "--input" or not mount.get("readOnly", False), f"{flag}: read-only mount"


# ---- what the pods install ---------------------------------------------------------------

SHA256_PIN = re.compile(r"--hash[= ]sha256:[0-9a-f]{64}(\s|$)")
_PIP_VALUE_OPTIONS = {"-r", "--requirement", "-c", "--constraint", "-f", "--find-links",
                      "-i", "--index-url", "--extra-index-url", "-e", "--editable"}
_SHELL_SEPARATORS = {"&&", "||", ";", "|"}


def _install_problem(entries: list[str], options: list[str]) -> str | None:
    """Why one pip/uv install could fetch a package by its bare name from an index, or None.

    Safe installs: every requirement carries a sha256 hash (pip's hash-checking mode, which
    then also refuses any dependency that has none), ``--require-hashes`` (the same for
    requirement files), or ``--no-index`` with local ``--find-links`` only."""
    if "--require-hashes" in options:
        return None
    if "--no-index" in options:
        links = [v for o, v in zip(options, options[1:]) if o in ("-f", "--find-links")]
        links += [o.split("=", 1)[1] for o in options if o.startswith("--find-links=")]
        remote = [link for link in links if "://" in link and not link.startswith("file://")]
        return f"--no-index but remote --find-links {remote}" if remote else None
    unpinned = [e for e in entries if not SHA256_PIN.search(e)]
    if unpinned or not entries:
        return f"installs {unpinned or entries} without a sha256 pin, from an index"
    return None


def _command_installs(text: str) -> list[tuple[list[str], list[str]]]:
    """(requirements, options) of each ``pip install``/``uv pip install`` in a shell text."""
    try:
        words = shlex.split(text, comments=True)
    except ValueError:
        words = text.split()
    installs = []
    for i, word in enumerate(words):
        if word != "install" or i == 0 or PurePosixPath(words[i - 1]).name not in ("pip", "pip3"):
            continue
        entries, options, rest = [], [], iter(words[i + 1:])
        for arg in rest:
            if arg in _SHELL_SEPARATORS or arg.endswith(";"):
                break
            if arg.startswith("-"):
                options.append(arg)
                if arg in _PIP_VALUE_OPTIONS:
                    options.append(next(rest, ""))
            else:
                entries.append(arg)
        installs.append((entries, options))
    return installs


def _runtime_env_installs(env: dict) -> list[tuple[str, object, list[str]]]:
    """(field, requirements, options) of a Ray runtime_env's ``pip``/``uv`` fields."""
    installs = []
    for field, options_key in (("pip", "pip_install_options"), ("uv", "uv_pip_install_options")):
        value = env.get(field)
        if isinstance(value, dict):
            installs.append((field, value.get("packages"), list(value.get(options_key) or [])))
        elif value is not None:
            installs.append((field, value, []))
    return installs


def _install_problems(node, where: str = "") -> list[str]:
    """Every install in a parsed manifest (runtime_env ``pip``/``uv`` fields at any depth,
    including YAML/JSON held in strings such as ``runtimeEnvYAML``, ``serveConfigV2`` or a
    ``--runtime-env-json`` argument; ``pip install`` in container commands, args and
    entrypoints) that could fetch a package by name from an index."""
    problems = []
    if isinstance(node, dict):
        for field, requirements, options in _runtime_env_installs(node):
            if isinstance(requirements, list) and all(isinstance(r, str) for r in requirements):
                problem = _install_problem(requirements, options)
            else:  # a requirements file on the pod (or garbage): nothing here can vouch for it
                problem = f"{requirements!r} is not a list of pinned requirements"
            if problem:
                problems.append(f"{where}.{field}: {problem}")
        for key, value in node.items():
            problems += _install_problems(value, f"{where}.{key}")
    elif isinstance(node, list):
        if node and all(isinstance(item, str) for item in node):  # a command: argv
            problems += _install_problems(" ".join(shlex.quote(w) for w in node), where)
        for i, item in enumerate(node):
            problems += _install_problems(item, f"{where}[{i}]")
    elif isinstance(node, str):
        for entries, options in _command_installs(node):
            problem = _install_problem(entries, options)
            if problem:
                problems.append(f"{where}: pip install {problem}")
        try:
            candidates = [node] + [w for w in shlex.split(node) if w[:1] in "{["]
        except ValueError:
            candidates = [node]
        for i, text in enumerate(candidates):
            if i == 0 and "\n" not in text and text[:1] not in "{[":
                continue
            try:
                inner = yaml.safe_load(text)
            except yaml.YAMLError:
                continue
            if isinstance(inner, (dict, list)):
                problems += _install_problems(inner, f"{where}<yaml>")
    return sorted(set(problems))


HASH = "0" * 64
INSTALLS = [
    ({"pip": ["shardlm==0.1.0"]}, True),
    ({"pip": ["shardlm"]}, True),
    ({"pip": [f"shardlm==0.1.0 --hash=sha256:{HASH}", "torch>=2.4"]}, True),
    ({"pip": [f"shardlm @ https://example.com/shardlm-0.1.0-py3-none-any.whl --hash=sha256:{HASH}"]},
     False),
    ({"pip": "/wheels/requirements.txt"}, True),
    ({"pip": {"packages": ["shardlm"]}}, True),
    ({"pip": {"packages": ["shardlm"], "pip_install_options": ["--no-index", "--find-links", "/wheels"]}},
     False),
    ({"pip": {"packages": ["shardlm"],
              "pip_install_options": ["--no-index", "--find-links", "https://example.com/wheels/"]}},
     True),
    ({"uv": ["shardlm==0.1.0"]}, True),
    ({"conda": {"dependencies": ["python=3.11", {"pip": ["shardlm==0.1.0"]}]}}, True),
    ({"spec": {"runtimeEnvYAML": "pip:\n  - shardlm==0.1.0\n"}}, True),
    ({"spec": {"serveConfigV2": "applications:\n  - name: x\n    runtime_env:\n      pip: [shardlm]\n"}},
     True),
    ({"command": ["pip", "install", "shardlm==0.1.0"]}, True),
    ({"command": ["bash", "-c", "pip install --no-cache-dir shardlm && ray start --head"]}, True),
    ({"args": ["python -m pip install -U 'shardlm[gpu]'"]}, True),
    ({"args": ["uv pip install shardlm"]}, True),
    ({"args": ["pip install --require-hashes -r /wheels/requirements.txt && ray start"]}, False),
    ({"args": ["pip install --no-index --find-links /wheels shardlm; ray start"]}, False),
    ({"args": ["pip install --no-index --find-links=https://example.com/ shardlm"]}, True),
    ({"entrypoint": "ray job submit --runtime-env-json '{\"pip\": [\"shardlm\"]}' -- shardlm batch"},
     True),
    ({"entrypoint": "shardlm batch --config /configs/a.yaml --input /data/p.jsonl"}, False),
]


@pytest.mark.parametrize("obj,flagged", INSTALLS, ids=[json.dumps(c[0])[:70] for c in INSTALLS])
def test_install_check_flags_installs_by_name(obj, flagged):
    assert bool(_install_problems(obj)) == flagged, _install_problems(obj)


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_pods_install_nothing_by_name_from_an_index(name):
    """Whoever registers a name on a public index would run code beside the API key: no pip
    install in a manifest may fetch a package by name without a sha256 pin."""
    problems = [p for d in load_documents(K8S / name) for p in _install_problems(d, d["kind"])]
    assert problems == [], problems


def _project_version() -> str:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def test_pods_run_the_image_k8s_dockerfile_builds_from_a_hashed_wheel():
    """Nothing installs shardlm when a pod starts, so every Ray container runs one image that
    carries it: k8s/Dockerfile on the Ray image of rayVersion, installing the wheel of this
    version by its sha256 and from no index."""
    version = _project_version()
    images, ray_versions = set(), set()
    for name in MANIFESTS:
        cluster = _cluster_spec(_ray_object(name))
        ray_versions.add(cluster["rayVersion"])
        images |= {c["image"] for _, pod in _pod_specs(cluster) for c in pod["containers"]}
    (ray_version,) = ray_versions
    (image,) = images
    repository, _, tag = image.rpartition(":")
    assert not repository.startswith(("rayproject/", "docker.io/rayproject/")), \
        f"{image}: the stock Ray image has no shardlm"
    assert tag == f"{version}-ray{ray_version}-gpu", image
    dockerfile = (K8S / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray_version)}-py311-gpu$", dockerfile, re.M)
    assert re.search(rf"^ARG SHARDLM_WHEEL=shardlm-{re.escape(version)}-py3-none-any\.whl$",
                     dockerfile, re.M)
    run_lines = " ".join(re.findall(r"^RUN (?:.*\\\n)*.*", dockerfile, re.M)).replace("\\\n", " ")
    (install,) = [i for i in _command_installs(run_lines) if "--no-deps" in i[1]]
    assert {"--require-hashes", "--no-index"} <= set(install[1]), install
    assert "--hash=sha256:${SHARDLM_SHA256}" in dockerfile


# ---- the Grafana dashboard --------------------------------------------------------------

def _panels(dashboard: dict):
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels folded into a row


def test_the_metrics_listed_here_are_the_ones_an_engine_exports():
    from cluster.serving.metrics import EngineMetrics

    families = EngineMetrics("m").registry.collect()
    assert {f.name + ("_total" if f.type == "counter" else "") for f in families} == METRICS


def test_grafana_dashboard_queries_exactly_the_exported_metrics():
    dashboard = json.loads((K8S / "grafana-dashboard.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = list(_panels(dashboard))
    assert len({p["id"] for p in panels}) == len(panels)
    queried: set[str] = set()
    exprs = []
    for panel in panels:
        for target in panel.get("targets", []):
            assert (target.get("datasource") or panel["datasource"])["uid"] == "${datasource}"
            exprs.append(target["expr"])
            for name in re.findall(r"shardlm:[A-Za-z0-9_:]+", target["expr"]):
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                queried.add(base if base in HISTOGRAMS else name)
    assert queried - METRICS == set(), "the dashboard queries metrics shardlm does not export"
    assert METRICS - queried == set(), "exported metrics missing from the dashboard"
    for histogram in HISTOGRAMS:
        for q in ("0.5", "0.9", "0.99"):
            assert any(f"histogram_quantile({q}," in e and f"{histogram}_bucket" in e
                       for e in exprs), \
                f"no p{q} panel for {histogram}"
