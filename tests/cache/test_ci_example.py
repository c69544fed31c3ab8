"""The CI example (.github/workflows/images.yml) is a valid workflow that keeps the trust model: a matrix
of release × arch jobs on one cache, `doit -n 2` each, and only main pushes (and sees the signing key).

actionlint checks it when installed (Debian and PyPI have none that installs offline here); a schema of
the workflow's shape checks it always.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

WORKFLOW = Path(__file__).resolve().parents[2] / ".github" / "workflows" / "images.yml"
MAIN_ONLY = "github.event_name == 'push' && github.ref == 'refs/heads/main'"

STEP = {"type": "object", "additionalProperties": False,
        "properties": {"name": {"type": "string"}, "uses": {"type": "string", "pattern": r"^[\w.-]+/[\w.-]+@v\d+$"},
                       "run": {"type": "string"}, "with": {"type": "object"}, "env": {"type": "object"},
                       "if": {"type": "string"}, "id": {"type": "string"}},
        "oneOf": [{"required": ["uses"]}, {"required": ["run"]}]}
SCHEMA = {
    "type": "object", "required": ["name", "on", "jobs"],
    "properties": {
        "name": {"type": "string"},
        "on": {"type": "object", "minProperties": 1},
        "permissions": {"type": "object", "additionalProperties": {"enum": ["read", "write", "none"]}},
        "concurrency": {"type": "object", "required": ["group"]},
        "env": {"type": "object", "additionalProperties": {"type": "string"}},
        "jobs": {"type": "object", "minProperties": 1, "additionalProperties": {
            "type": "object", "required": ["runs-on", "steps"],
            "properties": {"runs-on": {"type": "string"}, "name": {"type": "string"},
                           "timeout-minutes": {"type": "integer"},
                           "strategy": {"type": "object", "properties": {"matrix": {"type": "object"}}},
                           "steps": {"type": "array", "minItems": 1, "items": STEP}}}},
    },
    "additionalProperties": False,
}


def _workflow() -> dict[str, Any]:
    data = yaml.safe_load(WORKFLOW.read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as true
    return dict(data)


def test_the_workflow_has_the_shape_of_one() -> None:
    jsonschema.validate(_workflow(), SCHEMA)


@pytest.mark.skipif(shutil.which("actionlint") is None, reason="actionlint is not installed")
def test_actionlint() -> None:
    proc = subprocess.run(["actionlint", str(WORKFLOW)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_trust_model_holds() -> None:
    workflow = _workflow()
    job = workflow["jobs"]["build"]
    matrix = job["strategy"]["matrix"]
    assert set(matrix) == {"release", "arch"} and len(matrix["release"]) > 1 and matrix["arch"] == ["x86_64", "aarch64"]
    assert workflow["env"]["EULERBAKE_SUBSTITUTERS"].startswith("s3://")
    assert "EULERBAKE_TRUSTED_PUBLIC_KEYS" in workflow["env"]
    runs = [step.get("run", "") for step in job["steps"]]
    assert any(run.startswith("doit -n 2 ") for run in runs)
    with_secrets = [step for step in job["steps"] if "secrets." in yaml.safe_dump(step)]
    pushing = [step for step in job["steps"] if "cache push" in step.get("run", "")]
    assert with_secrets == pushing and len(pushing) == 1  # the signing key reaches the push step only
    assert pushing[0]["if"] == MAIN_ONLY
    assert "install -m 600" in pushing[0]["run"]  # the key file is never readable by others
    role = next(step for step in job["steps"] if "configure-aws-credentials" in step.get("uses", ""))
    assert MAIN_ONLY in role["with"]["role-to-assume"] and "CACHE_READER_ROLE" in role["with"]["role-to-assume"]
    assert "pull_request" in workflow["on"]
