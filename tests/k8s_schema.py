"""Offline structural validation of Kubernetes manifests (a test helper, not shipped).

KubeRay objects are checked against the ``openAPIV3Schema`` of the served CRD version
(the CRD files live in ``../shared/k8s-schemas`` next to the repository, or wherever
``$SHARDLM_K8S_SCHEMAS`` points); a Service and a Deployment against the core types those CRDs
embed (``EMBEDDED_KINDS``); a ConfigMap and a NetworkPolicy against the subsets below. The
walker does what the API server does before it accepts an object, as far as a structural
schema can tell:

- ``null`` values of fields that are not ``nullable`` are dropped (the server prunes them);
- ``default`` values are filled in before ``required`` is checked;
- ``type`` (object, array, string, integer, number, boolean), ``x-kubernetes-int-or-string``,
  ``anyOf``, ``enum``, ``pattern``, ``minimum``/``maximum``, ``maxLength``,
  ``minItems``/``maxItems``, ``format: int32/int64`` and the key uniqueness of
  ``x-kubernetes-list-type: map``/``set`` lists;
- unknown fields are errors wherever the schema neither preserves them
  (``x-kubernetes-preserve-unknown-fields``) nor allows them (``additionalProperties``),
  where the server would silently prune them: this is what catches typos.

CEL rules (``x-kubernetes-validations``) are not evaluated. Every error names its path,
e.g. ``spec.workerGroupSpecs[0].replicass: unknown field``.
"""

from __future__ import annotations

import copy
import functools
import os
import re
from pathlib import Path
from typing import Any

import yaml

SCHEMAS_ENV = "SHARDLM_K8S_SCHEMAS"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}

# Root ``metadata`` is ``{type: object}`` in every CRD (the server checks it as ObjectMeta);
# this is the subset of ObjectMeta a manifest should set.
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "maxLength": 253,
                 "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
}
_LABEL_SELECTOR = {
    "type": "object",
    "properties": {
        "matchLabels": _STRING_MAP,
        "matchExpressions": {"type": "array", "items": {
            "type": "object", "required": ["key", "operator"],
            "properties": {"key": {"type": "string"},
                           "operator": {"type": "string", "enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                           "values": {"type": "array", "items": {"type": "string"}}}}},
    },
}
_POLICY_PEER = {
    "type": "object",
    "properties": {
        "podSelector": _LABEL_SELECTOR,
        "namespaceSelector": _LABEL_SELECTOR,
        "ipBlock": {"type": "object", "required": ["cidr"],
                    "properties": {"cidr": {"type": "string"},
                                   "except": {"type": "array", "items": {"type": "string"}}}},
    },
}
_POLICY_PORTS = {"type": "array", "items": {
    "type": "object",
    "properties": {"port": {"x-kubernetes-int-or-string": True},
                   "endPort": {"type": "integer"},
                   "protocol": {"type": "string", "enum": ["TCP", "UDP", "SCTP"]}}}}
# Core kinds a manifest file may carry next to its KubeRay object (subsets of core/v1 and
# networking.k8s.io/v1, as the Kubernetes API reference defines them).
CORE_SCHEMAS = {
    ("networking.k8s.io/v1", "NetworkPolicy"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": OBJECT_META,
            "spec": {
                "type": "object",
                "required": ["podSelector"],
                "properties": {
                    "podSelector": _LABEL_SELECTOR,
                    "policyTypes": {"type": "array",
                                    "items": {"type": "string", "enum": ["Ingress", "Egress"]}},
                    "ingress": {"type": "array", "items": {
                        "type": "object",
                        "properties": {"from": {"type": "array", "items": _POLICY_PEER},
                                       "ports": _POLICY_PORTS}}},
                    "egress": {"type": "array", "items": {
                        "type": "object",
                        "properties": {"to": {"type": "array", "items": _POLICY_PEER},
                                       "ports": _POLICY_PORTS}}},
                },
            },
        },
    },
    ("v1", "ConfigMap"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": OBJECT_META,
            "data": _STRING_MAP,
            "binaryData": _STRING_MAP,
            "immutable": {"type": "boolean"},
        },
    },
}

# Core kinds whose schemas the KubeRay CRDs carry: controller-gen copies the Kubernetes types a
# CRD embeds, so a head group's ``headService`` is a whole core/v1 Service and a group's
# ``template`` a core/v1 PodTemplateSpec (what a Deployment's ``spec.template`` is too).
EMBEDDED_KINDS = (("v1", "Service"), ("apps/v1", "Deployment"))


def embedded_schema(directory: str, api_version: str, kind: str) -> dict[str, Any]:
    """The schema of a core kind built from the RayCluster CRD (see ``EMBEDDED_KINDS``)."""
    head = crd_schema(directory, "RayCluster", "v1")["properties"]["spec"]["properties"][
        "headGroupSpec"]["properties"]
    envelope = {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                "metadata": OBJECT_META}
    if kind == "Service":
        service = copy.deepcopy(head["headService"])
        service["properties"] |= envelope
        service["required"] = ["apiVersion", "kind", "metadata", "spec"]
        return service
    int32 = {"type": "integer", "format": "int32"}
    return {  # apps/v1 DeploymentSpec, as the Kubernetes API reference defines it
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": envelope | {"spec": {
            "type": "object",
            "required": ["selector", "template"],
            "properties": {
                "replicas": int32, "minReadySeconds": int32, "revisionHistoryLimit": int32,
                "progressDeadlineSeconds": int32, "paused": {"type": "boolean"},
                "selector": _LABEL_SELECTOR,
                "strategy": {"type": "object", "properties": {
                    "type": {"type": "string", "enum": ["Recreate", "RollingUpdate"]},
                    "rollingUpdate": {"type": "object", "properties": {
                        "maxSurge": {"x-kubernetes-int-or-string": True},
                        "maxUnavailable": {"x-kubernetes-int-or-string": True}}}}},
                "template": copy.deepcopy(head["template"]),
            },
        }},
    }


_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


class ManifestError(ValueError):
    """A manifest that does not validate; ``errors`` lists one message per problem."""

    def __init__(self, where: str, errors: list[str]):
        self.errors = errors
        super().__init__(f"{where}: " + "; ".join(errors))


def schemas_dir(repo_root: str | Path) -> Path:
    """The CRD directory: ``$SHARDLM_K8S_SCHEMAS`` or ``<repo>/../shared/k8s-schemas``."""
    default = Path(repo_root).resolve().parent / "shared" / "k8s-schemas"
    path = Path(os.environ.get(SCHEMAS_ENV) or default)
    missing = [name for name in CRD_FILES.values() if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"KubeRay CRD schemas not found: {path} lacks {missing}. Put the CRDs from "
            f"kuberay ray-operator/config/crd/bases/ there, or point ${SCHEMAS_ENV} at them.")
    return path


@functools.lru_cache(maxsize=None)
def crd_schema(directory: str, kind: str, version: str) -> dict[str, Any]:
    """The ``openAPIV3Schema`` of ``kind`` at a served ``version`` from its CRD file."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~1 MB each
    crd = yaml.load((Path(directory) / CRD_FILES[kind]).read_text(), Loader=loader)
    if crd["spec"]["names"]["kind"] != kind:
        raise ValueError(f"{CRD_FILES[kind]} defines {crd['spec']['names']['kind']}, not {kind}")
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version and entry.get("served"):
            return entry["schema"]["openAPIV3Schema"]
    raise ValueError(f"{kind} version {version!r} is not served by {CRD_FILES[kind]}")


def validate_object(obj: Any, directory: str | Path) -> list[str]:
    """Every problem with one manifest document (empty when it validates)."""
    if not isinstance(obj, dict):
        return [f"<root>: expected a mapping, got {type(obj).__name__}"]
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    if kind in CRD_FILES:
        group, _, version = str(api_version).partition("/")
        if group != "ray.io" or not version:
            return [f"apiVersion: {api_version!r} is not ray.io/<version>"]
        schema = crd_schema(str(directory), kind, version)
        schema = {**schema, "properties": {**schema["properties"], "metadata": OBJECT_META}}
        schema["required"] = sorted({*schema.get("required", ()), "apiVersion", "kind", "metadata"})
    elif (api_version, kind) in CORE_SCHEMAS:
        schema = CORE_SCHEMAS[(api_version, kind)]
    elif (api_version, kind) in EMBEDDED_KINDS:
        schema = embedded_schema(str(directory), api_version, kind)
    else:
        return [f"<root>: no schema for apiVersion={api_version!r} kind={kind!r}"]
    errors: list[str] = []
    check(obj, schema, "", errors)
    return errors


def check(value: Any, schema: dict[str, Any], path: str, errors: list[str]) -> None:
    """Append to ``errors`` every way ``value`` breaks the structural ``schema``."""
    where = path or "<root>"
    if not _type_ok(value, schema):
        got = f"{type(value).__name__} {value!r}"
        errors.append(f"{where}: expected {_type_name(schema)}, got {got}")
        return
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, dict):
        _check_object(value, schema, path, errors)
    elif isinstance(value, list):
        _check_array(value, schema, path, errors)
    else:
        _check_scalar(value, schema, where, errors)


def _type_ok(value: Any, schema: dict[str, Any]) -> bool:
    if schema.get("x-kubernetes-int-or-string"):
        return isinstance(value, (int, str)) and not isinstance(value, bool)
    if "anyOf" in schema and not any(_type_ok(value, branch) for branch in schema["anyOf"]):
        return False
    kind = schema.get("type")
    return kind is None or {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
    }[kind](value)


def _type_name(schema: dict[str, Any]) -> str:
    if schema.get("x-kubernetes-int-or-string"):
        return "integer or string"
    return schema.get("type") or " or ".join(b.get("type", "?") for b in schema.get("anyOf", ()))


def _check_object(value: dict, schema: dict[str, Any], path: str, errors: list[str]) -> None:
    props = schema.get("properties", {})
    extra = schema.get("additionalProperties")
    preserve = schema.get("x-kubernetes-preserve-unknown-fields") or extra is True
    # The API server prunes non-nullable nulls, then defaults, then validates.
    value = {k: v for k, v in value.items() if v is not None or props.get(k, {}).get("nullable")}
    for key, sub in props.items():
        if key not in value and "default" in sub:
            value[key] = copy.deepcopy(sub["default"])
    for key in schema.get("required", ()):
        if key not in value:
            errors.append(f"{_join(path, key)}: required field is missing")
    for key, item in value.items():
        if key in props:
            check(item, props[key], _join(path, key), errors)
        elif isinstance(extra, dict):
            check(item, extra, _join(path, key), errors)
        elif not preserve:
            errors.append(f"{_join(path, key)}: unknown field (not in the schema; "
                          f"known: {', '.join(sorted(props)) or 'none'})")


def _check_array(value: list, schema: dict[str, Any], path: str, errors: list[str]) -> None:
    where = path or "<root>"
    if "minItems" in schema and len(value) < schema["minItems"]:
        errors.append(f"{where}: needs at least {schema['minItems']} item(s)")
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        errors.append(f"{where}: allows at most {schema['maxItems']} item(s)")
    items = schema.get("items") or {}
    for index, item in enumerate(value):
        check(item, items, f"{path}[{index}]", errors)
    list_type = schema.get("x-kubernetes-list-type")
    if list_type in ("map", "set"):
        keys = schema.get("x-kubernetes-list-map-keys", ())
        defaults = {k: items.get("properties", {}).get(k, {}).get("default") for k in keys}
        seen: set[str] = set()
        for index, item in enumerate(value):
            if list_type == "map" and isinstance(item, dict):
                ident = repr(tuple(item.get(k, defaults[k]) for k in keys))
            else:
                ident = repr(item)
            if ident in seen:
                errors.append(f"{path}[{index}]: duplicate entry {ident} "
                              f"in a list-type={list_type} list")
            seen.add(ident)


def _check_scalar(value: Any, schema: dict[str, Any], where: str, errors: list[str]) -> None:
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where}: {value!r} does not match {schema['pattern']!r}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{where}: longer than {schema['maxLength']} characters")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        low, high = _INT_RANGES.get(schema.get("format", ""), (None, None))
        low = schema.get("minimum", low)
        high = schema.get("maximum", high)
        if low is not None and value < low:
            errors.append(f"{where}: {value!r} is below the minimum {low}")
        if high is not None and value > high:
            errors.append(f"{where}: {value!r} is above the maximum {high}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def load_documents(path: str | Path) -> list[dict[str, Any]]:
    """The non-empty YAML documents of a manifest file."""
    return [doc for doc in yaml.safe_load_all(Path(path).read_text()) if doc is not None]


def validate_file(path: str | Path, directory: str | Path) -> list[dict[str, Any]]:
    """The documents of a manifest file; raises :class:`ManifestError` when one is invalid."""
    documents = load_documents(path)
    if not documents:
        raise ManifestError(str(path), ["the file holds no YAML document"])
    for index, doc in enumerate(documents):
        errors = validate_object(doc, directory)
        if errors:
            raise ManifestError(f"{path} (document {index}, {doc.get('kind')})", errors)
    return documents
