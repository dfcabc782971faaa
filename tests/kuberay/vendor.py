"""Write KubeRay's CRD files as the compact schemas tests/test_k8s.py reads (see README.md here).

python tests/kuberay/vendor.py v1.5.1 rayclusters.yaml rayjobs.yaml
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml


def strip_descriptions(node):
    """Every ``description`` string goes (the bulk of the file); a property named description stays."""
    if isinstance(node, dict):
        return {k: strip_descriptions(v) for k, v in node.items() if not (k == "description" and isinstance(v, str))}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def main(version: str, *crds: str) -> None:
    out = Path(__file__).parent / version
    out.mkdir(exist_ok=True)
    for path in crds:
        crd = strip_descriptions(yaml.safe_load(Path(path).read_text()))
        crd["spec"]["versions"] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        (out / f"{crd['metadata']['name']}.json").write_text(json.dumps(crd, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
