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
