"""The pure parts of the ModelService handlers: Serve's real HTTP port, app states, endpoints, live weights."""

from __future__ import annotations

from typing import Any

import pytest

from anneal.api.service import ModelServiceSpec
from anneal_operator import service

# The body of `GET /api/serve/applications/` (Ray 2.60) trimmed to what matters: `http_options`
# holds only the options Serve was started with explicitly; `target_groups` one target per
# healthy proxy, with the port the proxy really uses.
RUNNING = {
    "controller_info": {"node_ip": "10.0.0.5"},
    "proxy_location": "EveryNode",
    "http_options": {"host": "0.0.0.0", "port": 8123, "root_path": ""},
    "grpc_options": {"port": 9000, "grpc_servicer_functions": []},
    "applications": {"ns-svc": {"name": "ns-svc", "route_prefix": "/ns/svc", "status": "RUNNING"},
                     "other": {"name": "other", "status": "DEPLOYING"}},
    "target_groups": [
        {"protocol": "HTTP", "route_prefix": "/", "app_name": "",
         "targets": [{"ip": "10.0.0.5", "port": 8123, "instance_id": "", "name": "SERVE_PROXY_ACTOR-1"}]},
    ],
}
NOT_STARTED = {"controller_info": {}, "proxies": {}, "applications": {}, "target_groups": [], "target_capacity": None}


def _targets(protocol: str, port: Any) -> list[dict[str, Any]]:
    return [{"protocol": protocol, "route_prefix": "/", "targets": [{"ip": "10.0.0.5", "port": port, "name": "p"}]}]


@pytest.mark.parametrize(
    "details, port",
    [
        (RUNNING, 8123),
        ({**RUNNING, "http_options": {"host": "0.0.0.0", "port": 18000}}, 18000),
        # Started with a default port: only the proxies' target group says which.
        ({**RUNNING, "http_options": {"host": "0.0.0.0"}, "target_groups": _targets("HTTP", 8555)}, 8555),
        ({"http_options": None, "target_groups": _targets("gRPC", 9000) + _targets("HTTP", 8555)}, 8555),
        ({"http_options": {}, "target_groups": _targets("gRPC", 9000)}, None),
        ({"http_options": {"port": "8000"}, "target_groups": _targets("HTTP", True)}, None),  # not ports
        ({"http_options": {"port": 0}}, None),
        (NOT_STARTED, None),
        ({}, None),
    ],
    ids=["http-options", "other-port", "default-port-from-targets", "http-target-after-grpc", "grpc-only",
         "malformed", "zero", "serve-not-started", "empty"],
)
def test_serve_http_port(details, port):
    assert service.serve_http_port(details) == port


@pytest.mark.parametrize("app, state", [("ns-svc", "RUNNING"), ("other", "DEPLOYING"), ("gone", None)])
def test_serve_app_status(app, state):
    assert service.serve_app_status(RUNNING, app) == state
    assert service.serve_app_status(NOT_STARTED, app) is None


@pytest.mark.parametrize(
    "address, port, endpoint",
    [
        ("http://10.0.0.5:8265", 8123, "http://10.0.0.5:8123/ns/svc"),
        ("http://127.0.0.1:40111/", 41234, "http://127.0.0.1:41234/ns/svc"),
        ("http://ray-head.ray.svc:8265", 8000, "http://ray-head.ray.svc:8000/ns/svc"),
    ],
)
def test_shared_endpoint_uses_the_dashboard_host_and_the_given_port(address, port, endpoint):
    assert service.shared_endpoint(address, "ns", "svc", port) == endpoint


def _spec(weights: tuple[int, int], rollout: bool) -> ModelServiceSpec:
    body: dict[str, Any] = {"variants": [
        {"name": "stable", "model": {"uri": "file:///m/a"}, "weight": weights[0]},
        {"name": "canary", "model": {"uri": "file:///m/b"}, "weight": weights[1]},
    ]}
    if rollout:
        body["rollout"] = {"stable": "stable", "candidate": "canary", "steps": [{"setWeight": 50}]}
    return ModelServiceSpec.model_validate(body)


@pytest.mark.parametrize(
    "weights, rollout, status_weights, live",
    [
        ((70, 30), False, None, {"stable": 70, "canary": 30}),
        # Without a rollout an edit of the spec's weights wins over what status last applied.
        ((50, 50), False, {"stable": 70, "canary": 30}, {"stable": 50, "canary": 50}),
        # With one, the rollout's weights stand...
        ((100, 0), True, {"stable": 75, "canary": 25}, {"stable": 75, "canary": 25}),
        ((100, 0), True, None, {"stable": 100, "canary": 0}),
        # ...unless they name other variants than the spec's.
        ((100, 0), True, {"stable": 50, "old": 50}, {"stable": 100, "canary": 0}),
    ],
    ids=["first-pass", "spec-edit", "rollout-owns", "rollout-first-pass", "rollout-stale-variants"],
)
def test_live_weights(weights, rollout, status_weights, live):
    assert service.live_weights(_spec(weights, rollout), status_weights) == live


def test_serve_app_problem_quotes_serve_on_unhealthy_deployments():
    details = {"applications": {"ns_svc": {
        "status": "DEPLOYING", "message": "",
        "deployments": {
            "router": {"status": "UPDATING", "message": 'Deployment "router" has 1 replicas that have taken more '
                       'than 30s to be scheduled. Resources required for each replica: {"CPU": 0.5}, '
                       'total resources available: {}.'},
            "variant-stable": {"status": "HEALTHY", "message": ""},
        }}}}
    problem = service.serve_app_problem(details, "ns_svc")
    assert problem.startswith("router UPDATING: ") and '{"CPU": 0.5}' in problem
    assert "variant-stable" not in problem
    assert service.serve_app_problem(RUNNING, "ns-svc") is None
    assert service.serve_app_problem(NOT_STARTED, "ns-svc") is None
