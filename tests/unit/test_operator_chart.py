"""The Helm chart's values map 1:1 onto the operator's ANNEAL_OPERATOR_* settings and validate."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from anneal_operator.settings import OperatorSettings

CHART = Path(__file__).resolve().parents[2] / "charts" / "anneal"
#: Set per pod by the Deployment (downward API), not by values.
PER_POD = {"lease_namespace", "identity", "kubeconfig", "bind_address"}


def _snake(key: str) -> str:
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key).lower()


def test_values_map_one_to_one_onto_settings():
    values = yaml.safe_load((CHART / "values.yaml").read_text())["operator"]
    fields = set(OperatorSettings.model_fields)
    assert {_snake(k) for k in values} == fields - PER_POD
    s = OperatorSettings(**{_snake(k): v for k, v in values.items()})  # the defaults are valid settings
    assert s.leader_election is True


def test_values_validate_against_the_schema():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.validate(values, schema)
    bad = {**values, "operator": {**values["operator"], "gangScheduler": "slurm"}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**values, "operator": {**values["operator"], "rayAdress": "x"}}, schema)


def test_schema_covers_every_operator_value():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())["operator"]
    assert set(schema["properties"]["operator"]["properties"]) == set(values)


def test_shm_size_in_the_schema_is_the_apis_quantity():
    from anneal.api.common import _QUANTITY_PATTERN

    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["properties"]["operator"]["properties"]["shmSize"]["pattern"] == "^$|" + _QUANTITY_PATTERN


def test_secret_access_is_off_by_default_and_the_rbac_template_names_no_secrets_otherwise():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["secretAccess"] == {"names": []}
    templates = "".join(p.read_text() for p in (CHART / "templates").glob("*"))
    # The only rule on secrets is the one guarded by secretAccess.names, limited to those names.
    assert templates.count("resources: [secrets]") == 1
    guarded = templates.split("{{- with .Values.secretAccess.names }}", 1)[1].split("{{- end }}", 1)[0]
    assert "resources: [secrets]" in guarded and "resourceNames: {{ toJson . }}" in guarded and "verbs: [get]" in guarded


def test_mlflow_is_optional_and_its_image_is_the_locked_mlflow():
    values = yaml.safe_load((CHART / "values.yaml").read_text())["mlflow"]
    assert values["enabled"] is False and values["credentialsSecret"] == ""
    lock = re.search(r"^mlflow==(\S+)$", (CHART.parents[1] / "requirements.lock").read_text(), re.M).group(1)
    assert values["image"]["tag"] == f"v{lock}"


@pytest.mark.parametrize(("patch", "error"), [
    ({"secretAccess": {"names": ["Not_A_Name"]}}, "does not match"),
    ({"secretAccess": {"names": ["a", "a"]}}, "non-unique"),
    ({"mlflow": {"enabled": "yes"}}, "is not of type 'boolean'"),
    ({"mlflow": {"persistence": {"size": "ten gigs"}}}, "does not match"),
    ({"mlflow": {"allowedHosts": ["a,b"]}}, "does not match"),
    ({"mlflow": {"enable": True}}, "Additional properties"),
])
def test_schema_refuses_bad_secret_access_and_mlflow_values(patch, error):
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    bad = {**values, **{k: {**values[k], **v} for k, v in patch.items()}}
    with pytest.raises(jsonschema.ValidationError, match=error):
        jsonschema.validate(bad, schema)


@pytest.mark.parametrize(("watch", "exact"), [
    ((), False),                    # the cluster: kopf scans (the ClusterRole lets it read CRDs)
    (("team-a",), True),
    (("team-a", "team-b"), True),
    (("team-*",), False),           # a glob needs kopf to list namespaces
    (("!kube-system",), False),
])
def test_kopf_scans_only_when_it_watches_more_than_named_namespaces(watch, exact):
    from anneal_operator.main import exact_namespaces, kopf_settings

    assert exact_namespaces(watch) is exact
    assert kopf_settings(OperatorSettings(), watch).scanning.disabled is exact
