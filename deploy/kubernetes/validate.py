"""Validate the manifests in this directory against the Kubernetes API schemas (strict:
unknown fields are errors). kubernetes-validate has no schema for the Percona CRD, so each
sidecar of a PerconaPGCluster is checked as a container of a Pod instead -- the part of
the CR that pgoom adds.

    .venv/bin/python deploy/kubernetes/validate.py     (scripts/lint.sh runs it)
"""

from __future__ import annotations

import glob
import os
import sys

import kubernetes_validate
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
VERSION = "1.30.0"  # the oldest Kubernetes these manifests are meant for


def check(resource: dict[str, object], where: str) -> list[str]:
    try:
        kubernetes_validate.validate(resource, VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        return [f"{where}: {err.message}"]
    return []


def sidecars_as_pods(cluster: dict[str, object], where: str) -> list[str]:
    spec = cluster.get("spec")
    instances = spec.get("instances", []) if isinstance(spec, dict) else []
    errors: list[str] = []
    for instance in instances:
        for sidecar in instance.get("sidecars", []):
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "sidecar-check"},
                "spec": {
                    "shareProcessNamespace": True,
                    "containers": [sidecar],
                    "volumes": [{"name": "postgres-data", "emptyDir": {}}],
                },
            }
            errors += check(pod, f"{where} sidecar {sidecar.get('name')}")
    return errors


def main() -> int:
    errors: list[str] = []
    count = 0
    for path in sorted(glob.glob(os.path.join(HERE, "*.yaml"))):
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if not doc:
                    continue
                count += 1
                where = f"{os.path.relpath(path)} {doc.get('kind')}/{doc['metadata']['name']}"
                if doc.get("kind") == "PerconaPGCluster":
                    errors += sidecars_as_pods(doc, where)
                else:
                    errors += check(doc, where)
    for error in errors:
        print(f"invalid: {error}", file=sys.stderr)
    print(f"deploy/kubernetes: {count} resources, {len(errors)} invalid (Kubernetes {VERSION})")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
