"""Offline checks for PyTorchJob manifests: the admission-webhook rules and the CRD schema.

The CRD's openAPIV3Schema checks only structure and types; the rules that make the training
operator reject a job (container `pytorch`, Master replicas 1, DNS-1035 name, ...) live in its
admission webhook (training-operator v1.9 `pkg/webhooks/pytorch`). `validate_pytorchjob`
re-implements those rules from their description, plus a few project rules for values the CRD
leaves as free strings (restartPolicy, cleanPodPolicy). Both return a list of one-line errors;
an empty list means the object passes.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

REPLICA_TYPES = ("Master", "Worker")
RESTART_POLICIES = ("Always", "OnFailure", "Never", "ExitCode")
CLEAN_POD_POLICIES = ("All", "Running", "None")
MANAGED_BY = ("kubeflow.org/training-operator", "kueue.x-k8s.io/multikueue")
NPROC_WORDS = ("auto", "cpu", "gpu")
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1035_PREFIX = re.compile(r"^[a-z][-a-z0-9]*$")  # a generateName may end in '-'
_GENERATED_SUFFIX = 5  # the API server appends 5 random characters to generateName


def _name_errors(meta: dict) -> list[str]:
    name, prefix = meta.get("name"), meta.get("generateName")
    if name:
        if not isinstance(name, str) or len(name) > 63 or not _DNS1035.match(name):
            return [f"metadata.name: '{name}' is not a DNS-1035 label (lower-case letters, digits "
                    "and '-', starting with a letter, ending with a letter or digit, <= 63 chars)"]
        return []
    if prefix:
        if (not isinstance(prefix, str) or not _DNS1035_PREFIX.match(prefix)
                or len(prefix) + _GENERATED_SUFFIX > 63):
            return [f"metadata.generateName: '{prefix}' cannot yield a DNS-1035 name (lower-case "
                    f"letters, digits and '-', starting with a letter, <= {63 - _GENERATED_SUFFIX} chars)"]
        return []
    return ["metadata: needs a name or a generateName"]


def _replica_errors(rtype: str, replica: dict) -> list[str]:
    where = f"spec.pytorchReplicaSpecs.{rtype}"
    if not isinstance(replica, dict):
        return [f"{where}: must be an object"]
    errors = []
    replicas = replica.get("replicas", 1)  # the operator defaults replicas to 1
    if rtype == "Master" and replicas != 1:
        errors.append(f"{where}.replicas: must be 1 (there is exactly one Master), got {replicas!r}")
    if rtype == "Worker" and (not isinstance(replicas, int) or replicas < 1):
        errors.append(f"{where}.replicas: must be >= 1, got {replicas!r}")
    policy = replica.get("restartPolicy")
    if policy is not None and policy not in RESTART_POLICIES:
        errors.append(f"{where}.restartPolicy: '{policy}' is not one of {', '.join(RESTART_POLICIES)}")
    containers = (((replica.get("template") or {}).get("spec") or {}).get("containers")) or []
    if not containers:
        errors.append(f"{where}.template.spec.containers: at least one container is required")
    for i, container in enumerate(containers):
        if not (container or {}).get("image"):
            errors.append(f"{where}.template.spec.containers[{i}].image: must be set")
    if containers and not any((c or {}).get("name") == "pytorch" for c in containers):
        errors.append(f"{where}.template.spec.containers: one container must be named 'pytorch'")
    return errors


def validate_pytorchjob(obj: dict) -> list[str]:
    """The admission-webhook rules (plus enum-like project rules) for one PyTorchJob dict."""
    if not isinstance(obj, dict):
        return ["PyTorchJob: must be a mapping"]
    errors = []
    if obj.get("apiVersion") != "kubeflow.org/v1":
        errors.append(f"apiVersion: must be kubeflow.org/v1, got {obj.get('apiVersion')!r}")
    if obj.get("kind") != "PyTorchJob":
        errors.append(f"kind: must be PyTorchJob, got {obj.get('kind')!r}")
    errors += _name_errors(obj.get("metadata") or {})
    spec = obj.get("spec") or {}
    replicas = spec.get("pytorchReplicaSpecs")
    if not isinstance(replicas, dict) or not replicas:
        return errors + ["spec.pytorchReplicaSpecs: must list at least one replica type"]
    for rtype, replica in replicas.items():
        if rtype not in REPLICA_TYPES:
            errors.append(f"spec.pytorchReplicaSpecs.{rtype}: replica type must be one of "
                          f"{', '.join(REPLICA_TYPES)}")
            continue
        errors += _replica_errors(rtype, replica)
    nproc = spec.get("nprocPerNode")
    if nproc is not None and not (isinstance(nproc, str) and (nproc in NPROC_WORDS or nproc.isdigit())):
        errors.append(f"spec.nprocPerNode: must be a string: 'auto', 'cpu', 'gpu' or a number "
                      f"like \"8\", got {nproc!r}")
    elastic = spec.get("elasticPolicy")
    if elastic is not None:
        if "Worker" not in replicas:
            errors.append("spec.elasticPolicy: needs a Worker replica spec")
        if elastic.get("nProcPerNode") is not None and nproc is not None:
            errors.append("spec.elasticPolicy.nProcPerNode: deprecated; set only spec.nprocPerNode")
    run = spec.get("runPolicy") or {}
    if run.get("cleanPodPolicy") is not None and run["cleanPodPolicy"] not in CLEAN_POD_POLICIES:
        errors.append(f"spec.runPolicy.cleanPodPolicy: '{run['cleanPodPolicy']}' is not one of "
                      f"{', '.join(CLEAN_POD_POLICIES)}")
    if run.get("managedBy") not in (None, "", *MANAGED_BY):
        errors.append(f"spec.runPolicy.managedBy: '{run['managedBy']}' is not one of {', '.join(MANAGED_BY)}")
    return errors


def _strict(schema):
    """Forbid unknown fields in every object that lists its properties (as `kubectl --validate`
    does); objects that preserve unknown fields or declare additionalProperties keep theirs."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.lru_cache(maxsize=4)
def load_crd_schema(crd_path: str, version: str = "v1", strict: bool = True) -> dict:
    """The openAPIV3Schema of `version` in a CRD YAML file (read once per process)."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(crd_path, encoding="utf-8") as fh:
        crd = yaml.load(fh, Loader=loader)  # noqa: S506 - a safe loader
    for item in crd["spec"]["versions"]:
        if item["name"] == version:
            schema = item["schema"]["openAPIV3Schema"]
            return _strict(schema) if strict else schema
    raise ValueError(f"{crd_path}: no version '{version}' in the CRD")


def validate_against_crd(obj: dict, crd_path: str | Path, *, strict: bool = True) -> list[str]:
    """Validate `obj` with jsonschema (Draft 7) against the CRD's v1 openAPIV3Schema.

    Catches wrong types (e.g. `nprocPerNode: 8`) and, with `strict`, unknown fields.
    """
    import jsonschema

    # The API server decodes integers into int32/int64: 1.2096e+06 (what a template gives for a
    # large number) is rejected there, so a float never counts as an integer here.
    checker = jsonschema.Draft7Validator.TYPE_CHECKER.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool))
    validator_cls = jsonschema.validators.extend(jsonschema.Draft7Validator, type_checker=checker)
    validator = validator_cls(load_crd_schema(str(crd_path), "v1", strict))
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in errors]
