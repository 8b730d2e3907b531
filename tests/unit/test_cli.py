"""The `anneal` command: validate, crds, config — run as a user would, through the console script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from anneal.api.crd import build_crd, render_crds
from anneal.api.resources import KINDS

ROOT = Path(__file__).resolve().parents[2]
ANNEAL = [sys.executable, "-m", "anneal.cli"]


def anneal(*args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """The CLI in a subprocess; `ANNEAL_*` settings come only from `env`, never from the caller's shell."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("ANNEAL_")}
    return subprocess.run([*ANNEAL, *args], capture_output=True, text=True, cwd=cwd, env={**base, **(env or {})}, timeout=120)


def test_examples_validate():
    examples = sorted(str(p) for p in (ROOT / "deploy/examples").glob("*.yaml"))
    assert examples, "deploy/examples has manifests"
    res = anneal("validate", *examples)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count(": valid") >= len(examples)


MULTI = """\
apiVersion: anneal.dev/v1alpha1
kind: ModelService
metadata: {name: good}
spec:
  variants: [{name: a, model: {uri: models:/m/1}}]
---
apiVersion: anneal.dev/v1alpha1
kind: ModelService
metadata: {name: split}
spec:
  variants:
    - {name: a, model: {uri: models:/m/1}, weight: 60}
    - {name: b, model: {uri: models:/m/2}, weight: 30}
---
apiVersion: anneal.dev/v1alpha1
kind: Widget
metadata: {name: w}
spec: {}
"""


def test_validate_names_file_document_kind_field_value_rule(tmp_path):
    f = tmp_path / "multi.yaml"
    f.write_text(MULTI)
    res = anneal("validate", str(f))
    assert res.returncode == 1
    assert f"{f}: document 1 (ModelService/good): valid" in res.stdout
    assert (
        f"{f}: document 2 (ModelService/split): error: spec.variants[1].weight: 30: "
        "the weights of all variants must sum to 100 (they sum to 90)"
    ) in res.stderr
    assert f"{f}: document 3 (Widget/w): error: kind: 'Widget': unknown kind" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(
    "content,expected",
    [
        ("", "no resources in the file (empty)"),
        ("kind: [unclosed\n", "YAML syntax error"),
        ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n", "apiVersion: 'v1': must be anneal.dev/v1alpha1"),
    ],
    ids=["empty", "syntax", "foreign"],
)
def test_validate_bad_files(tmp_path, content, expected):
    f = tmp_path / "bad.yaml"
    f.write_text(content)
    res = anneal("validate", str(f))
    assert res.returncode == 1
    assert expected in res.stderr
    assert "Traceback" not in res.stderr


def test_validate_missing_file(tmp_path):
    res = anneal("validate", str(tmp_path / "nope.yaml"))
    assert res.returncode == 1 and "cannot read" in res.stderr


def test_reasoning_threshold_warning(tmp_path):
    f = tmp_path / "small.yaml"
    f.write_text(yaml.safe_dump({
        "apiVersion": "anneal.dev/v1alpha1", "kind": "DistillationJob", "metadata": {"name": "small"},
        "spec": {"method": "sft", "student": {"config": {"hiddenSize": 1024, "layers": 12, "heads": 16}},
                 "dataset": {"reasoning": "on"}},
    }))
    res = anneal("validate", str(f))
    assert res.returncode == 0
    assert "warning: spec.dataset.reasoning" in res.stdout and "1.6B" in res.stdout
    # A toy model (the quickstart's) gets no such warning, nor does reasoning off.
    f.write_text(f.read_text().replace("reasoning: 'on'", "reasoning: 'off'"))
    assert "warning" not in anneal("validate", str(f)).stdout


def test_crds_check_passes_on_committed_files():
    res = anneal("crds", "--check")
    assert res.returncode == 0, res.stderr


def test_crds_check_fails_on_drift(tmp_path):
    out = tmp_path / "crds"
    assert anneal("crds", "--out", str(out)).returncode == 0
    assert anneal("crds", "--check", "--out", str(out)).returncode == 0
    victim = out / "modelservices.anneal.dev.yaml"
    victim.write_text(victim.read_text().replace("maxItems: 8", "maxItems: 9"))
    res = anneal("crds", "--check", "--out", str(out))
    assert res.returncode == 1 and "modelservices.anneal.dev.yaml" in res.stderr


def test_config_prints_effective_settings(tmp_path):
    res = anneal("config", env={"ANNEAL_HOME": str(tmp_path), "ANNEAL_RAY_ADDRESS": "http://ray:8265"})
    lines = dict(line.split("=", 1) for line in res.stdout.splitlines())
    assert lines["ANNEAL_HOME"] == str(tmp_path)
    assert lines["ANNEAL_MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path}/mlflow.db"
    assert lines["ANNEAL_RAY_ADDRESS"] == "http://ray:8265"


def test_run_rejects_invalid_manifest_without_traceback(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(MULTI.split("---")[1])
    res = anneal("run", str(f), env={"ANNEAL_HOME": str(tmp_path)})
    assert res.returncode == 1
    assert "spec.variants[1].weight" in res.stderr and "Traceback" not in res.stderr


def _walk(node, path="schema"):
    yield path, node
    for key, child in (node.get("properties") or {}).items():
        yield from _walk(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("kind", list(KINDS))
def test_crd_is_structural(kind):
    crd = build_crd(KINDS[kind])
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert crd["spec"]["names"]["categories"] == ["anneal"]
    assert crd["spec"]["names"]["shortNames"] == list(KINDS[kind].short_names)
    assert [c["name"] for c in version["additionalPrinterColumns"]][0] == "Phase"
    schema = version["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "$ref" not in node and "anyOf" not in node and "title" not in node, path
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), f"{path} has no type"
        assert not ("properties" in node and "additionalProperties" in node), path


def test_crd_carries_rules():
    svc = build_crd(KINDS["ModelService"])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = [v["rule"] for v in svc["x-kubernetes-validations"]]
    assert any(".sum() == 100" in r for r in rules)
    weight = svc["properties"]["variants"]["items"]["properties"]["weight"]
    assert (weight["minimum"], weight["maximum"], weight["type"]) == (0, 100, "integer")
    dj = build_crd(KINDS["DistillationJob"])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert dj["properties"]["method"]["enum"] == ["sft", "cpt", "kd", "lora-kd", "kd-rl"]
    assert dj["required"] == ["method", "student"]
    assert "description" in dj["properties"]["backoffLimit"]


def test_rendered_crds_are_yaml():
    for name, text in render_crds().items():
        assert yaml.safe_load(text)["metadata"]["name"] + ".yaml" == name


def test_short_error_strips_ray_tracebacks():
    from anneal.runtime.errors import short_error

    wrapped = RuntimeError(
        "Training failed:\nTraceback (most recent call last):\n  File \"x.py\", line 1, in f\n    g()\n"
        "anneal.data.datasets.DatasetError: data.jsonl: no such file"
    )
    assert short_error(wrapped) == "anneal.data.datasets.DatasetError: data.jsonl: no such file"
    try:
        try:
            raise ValueError("bad value")
        except ValueError as inner:
            raise RuntimeError("outer") from inner
    except RuntimeError as exc:
        assert short_error(exc) == "ValueError: bad value"
