"""Serve app planning (args, Serve config), the stats document, the OpenAI request checks: no Ray needed."""

import json

import pytest

from anneal.api.resources import parse_spec
from anneal.serve import protocol
from anneal.serve.app import AppArgs, args_from_spec, build_serve_config, entry_models, policy_from_args
from anneal.local.service import cpu_scale, default_lookup, resolve_model_uris, service_status
from anneal.serve.metrics import ServiceMetrics, merge_stats

SPEC = {
    "variants": [
        {"name": "stable", "model": {"uri": "models:/math@champion"}, "weight": 90, "replicas": 2,
         "resources": {"cpusPerWorker": 2, "gpusPerWorker": 1, "memory": "8Gi", "acceleratorType": "H100"}},
        {"name": "candidate", "model": {"fromResource": {"kind": "DistillationJob", "name": "student"}}, "weight": 10,
         "autoscaling": {"minReplicas": 1, "maxReplicas": 4, "targetOngoingRequests": 3},
         "generation": {"maxTokens": 64, "temperature": 0.7}},
    ],
    "routing": {"sticky": {"header": "X-User-Id"}, "shadow": {"variant": "candidate", "percent": 5},
                "reasoning": {"default": "off", "maxTokensOn": 256, "maxTokensOff": 32}},
    "rollout": {"stable": "stable", "candidate": "candidate"},
}


@pytest.fixture
def args():
    spec = parse_spec("ModelService", SPEC)
    return args_from_spec("ns-math", spec, {"candidate": "models:/student/3"}, cache_dir="/cache",
                          tracking_uri="http://mlflow:5000")


def test_args_carry_scale_resources_and_routing_from_the_spec(args):
    stable, candidate = args.variants
    assert (stable.replicas, stable.num_cpus, stable.num_gpus, stable.accelerator_type) == (2, 2, 1, "H100")
    assert stable.memory_bytes == 8 * 2**30 and stable.model_uri == "models:/math@champion"
    assert candidate.autoscaling == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 3}
    assert candidate.model_uri == "models:/student/3" and (candidate.max_tokens, candidate.temperature) == (64, 0.7)
    assert args.weights == {"stable": 90, "candidate": 10}
    assert args.sticky_header == "x-user-id"  # HTTP header names are case-insensitive
    policy = policy_from_args(args)
    assert (policy.shadow_variant, policy.shadow_percent) == ("candidate", 5)
    assert (policy.reasoning.default, policy.reasoning.max_tokens_off) == ("off", 32)
    assert policy.line() == ("stable", "candidate")  # the rollout pair are neighbours


def test_cpu_scale_shrinks_cpu_requests_only(args):
    spec = parse_spec("ModelService", SPEC)
    scaled = args_from_spec("x", spec, {"candidate": "p"}, cache_dir="/c", cpu_scale=0.25)
    assert scaled.variants[0].num_cpus == 0.5 and scaled.variants[0].num_gpus == 1
    # 0.5 router + 2 × 2 + 1 × 1 CPUs requested; 2 local CPUs × 0.8 budget.
    assert cpu_scale(spec, 2) == pytest.approx(1.6 / 5.5)
    assert cpu_scale(spec, 64) == 1.0


def test_serve_config_is_json_with_weights_in_the_router_user_config(args):
    entry = build_serve_config(args, {"stable": 50, "candidate": 50})
    assert entry["import_path"] == "anneal.serve.app:app_builder"
    assert entry["deployments"][0] == {"name": "router", "user_config": {"weights": {"stable": 50, "candidate": 50}}}
    # The args plus each variant's user_config give back the whole AppArgs.
    back = json.loads(json.dumps(entry["args"]))
    for v in back["variants"]:
        d = next(d for d in entry["deployments"] if d["name"] == f"variant-{v['name']}")
        v.update(d["user_config"])
    assert AppArgs.model_validate(back) == args
    assert entry_models(entry) == {v.name: v.model_uri for v in args.variants}
    # Only the user_config differs between weightings: Serve sees the same code version.
    assert build_serve_config(args, {"stable": 0, "candidate": 100})["args"] == entry["args"]


def test_a_model_change_updates_that_variant_only(args):
    """Serve's own code-version rule: any change of an app's args restarts all its deployments."""
    from ray.serve._private.deploy_utils import get_app_code_version
    from ray.serve.schema import ServeApplicationSchema

    before = build_serve_config(args)
    changed = args.model_copy(update={"variants": [
        v.model_copy(update={"model_uri": "models:/other/7"}) if v.name == "candidate" else v for v in args.variants]})
    after = build_serve_config(changed)
    version = lambda e: get_app_code_version(ServeApplicationSchema.model_validate(e))  # noqa: E731
    assert version(before) == version(after)
    differ = [d["name"] for d, e in zip(before["deployments"], after["deployments"]) if d != e]
    assert differ == ["variant-candidate"]
    assert entry_models(after)["candidate"] == "models:/other/7"


def test_embedded_from_resource_is_looked_up_in_the_services_own_mlflow(tmp_path):
    """A service with spec.mlflow.trackingUri finds its jobs there, not in the settings' default store."""
    from types import SimpleNamespace

    from mlflow import MlflowClient

    from anneal.tracking import mlflow_store as store

    own, default = f"sqlite:///{tmp_path / 'own.db'}", f"sqlite:///{tmp_path / 'default.db'}"
    client = MlflowClient(tracking_uri=own)
    run = client.create_run(client.create_experiment("jobs"), tags={
        store.TAG_KIND: "DistillationJob", store.TAG_NAMESPACE: "team", store.TAG_NAME: "s",
        store.TAG_PHASE: "Succeeded", store.TAG_MODEL_URI: "models:/team.s/3"})
    client.set_terminated(run.info.run_id)
    spec = parse_spec("ModelService", {"mlflow": {"trackingUri": own}, "variants": [
        {"name": "b", "model": {"fromResource": {"kind": "DistillationJob", "name": "s"}}, "weight": 100}]})
    settings = SimpleNamespace(tracking_uri=default)
    assert resolve_model_uris(spec, "team", default_lookup(spec, settings)) == {"b": "models:/team.s/3"}
    elsewhere = spec.model_copy(update={"mlflow": spec.mlflow.model_copy(update={"tracking_uri": None})})
    with pytest.raises(Exception, match="DistillationJob/s"):
        resolve_model_uris(elsewhere, "team", default_lookup(elsewhere, settings))


def test_model_paths_become_absolute_and_from_resource_goes_through_the_lookup(tmp_path):
    spec = parse_spec("ModelService", {"variants": [
        {"name": "a", "model": {"uri": "models/tiny"}, "weight": 50},
        {"name": "b", "model": {"fromResource": {"kind": "DistillationJob", "name": "s"}}, "weight": 50}]})
    seen = {("DistillationJob", "team", "s"): {"phase": "Succeeded", "modelUri": "models:/team.s/1"}}
    uris = resolve_model_uris(spec, "team", lambda *key: seen.get(key), base_dir=tmp_path)
    assert uris == {"a": str(tmp_path / "models" / "tiny"), "b": "models:/team.s/1"}
    with pytest.raises(Exception, match=r"spec.variants\[1\].model.fromResource"):
        resolve_model_uris(spec, "team", None)
    with pytest.raises(Exception, match=r"spec.variants\[1\].model.fromResource: DistillationJob/s has not succeeded"):
        resolve_model_uris(spec, "team", lambda *key: {"phase": "Running"})


def test_service_status_shape():
    st = service_status("ns-x", "http://127.0.0.1:8000", {"a": 90, "b": 10}, {"a": "/m"})
    assert st["phase"] == "Ready" and st["weightsSummary"] == "a=90,b=10" and st["endpoint"].endswith(":8000")


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_stats_document_totals_and_window():
    clock = Clock()
    m = ServiceMetrics(["a", "b"], clock=clock)
    for i in range(100):
        m.record("a", float(i + 1), error=i < 5, prompt_tokens=3, completion_tokens=2)
    clock.t = 2000.0
    for i in range(10):
        m.record("a", 500.0, error=False)
    m.record("b", 40.0, error=True)
    m.record("b", 7.0, error=False, shadow=True)
    m.record_route("weighted")
    doc = m.stats(since=1500.0, weights={"a": 90, "b": 10})
    a = doc["variants"]["a"]
    assert a["total"]["requests"] == 110 and a["total"]["errors"] == 5 and a["total"]["promptTokens"] == 300
    assert a["window"] == {"requests": 10, "errors": 0, "errorRate": 0.0, "latencyP50Ms": 500.0,
                           "latencyP95Ms": 500.0, "latencyP99Ms": 500.0, "promptTokens": 0,
                           "completionTokens": 0}
    # Totals come from log-spaced buckets (upper bound, within 25 %): p50 of 1..100 and 10 × 500 ms.
    assert 55 <= a["total"]["latencyP50Ms"] <= 70
    assert doc["variants"]["b"]["window"]["errorRate"] == 1.0
    assert doc["shadow"] == {"b": {"requests": 1, "errors": 0, "latencyP95Ms": pytest.approx(7.0, rel=0.25),
                                   "window": {"requests": 1, "errors": 0, "latencyP95Ms": 7.0}}}
    assert doc["routes"] == {"weighted": 1} and doc["weights"] == {"a": 90, "b": 10}
    assert doc["since"] == 1500.0 and doc["time"] == 2000.0


def test_replica_stats_merge_by_summing_counts_and_taking_the_worst_latency():
    one, two = ServiceMetrics(["a"]), ServiceMetrics(["a"])
    one.record("a", 10.0, False)
    two.record("a", 100.0, True)
    merged = merge_stats([one.stats(0.0, {"a": 100}), two.stats(0.0, {"a": 100})])
    w = merged["variants"]["a"]["window"]
    assert (w["requests"], w["errors"], w["errorRate"], w["latencyP99Ms"]) == (2, 1, 0.5, 100.0)


def test_prometheus_text_has_per_variant_series():
    m = ServiceMetrics(["a"])
    m.record("a", 3.0, False, 2, 1)
    text = m.prometheus_text("svc", {"a": 100}).decode()
    assert 'anneal_serve_requests_total{service="svc",variant="a"} 1.0' in text
    assert 'anneal_serve_weight{service="svc",variant="a"} 100.0' in text
    assert 'anneal_serve_latency_ms_count{service="svc",variant="a"} 1.0' in text


@pytest.mark.parametrize("body,param", [
    ({}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2.5}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
])
def test_bad_chat_requests_name_the_field(body, param):
    with pytest.raises(protocol.ApiError) as e:
        protocol.parse_request(body, "chat", 1024)
    assert e.value.status == 400 and e.value.param == param and e.value.body()["error"]["param"] == param


def test_text_content_parts_are_joined():
    req = protocol.parse_request({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "max_completion_tokens": 5}, "chat", 8)
    assert req.messages == [{"role": "user", "content": "ab"}] and req.max_tokens == 5


def test_body_limit_and_json_errors():
    with pytest.raises(protocol.ApiError) as e:
        protocol.parse_json(b"x" * 11, 10)
    assert e.value.status == 413
    with pytest.raises(protocol.ApiError) as e:
        protocol.parse_json(b"\xff", 10)
    assert e.value.status == 400 and e.value.param == "body"


def test_sampled_decisions_are_appended_to_the_service_run_in_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    from anneal.serve.app import write_decisions_to_mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    batch = [{"time": 1.0, "requestId": "r1", "variant": "a", "reason": "weighted"},
             {"time": 2.0, "requestId": "r2", "variant": "b", "reason": "sticky"},
             {"time": 3.0, "requestId": "r3", "variant": "a", "reason": "override"}]
    run_id = write_decisions_to_mlflow(uri, "serving", "ns-svc", batch, "rep/1")
    assert write_decisions_to_mlflow(uri, "serving", "ns-svc", batch[:1], "rep/1") == run_id  # same run
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(run_id).data.metrics == {"routed.a": 1.0, "routed.b": 1.0}
    files = [f.path for f in client.list_artifacts(run_id, "routing")]
    assert len(files) == 2 and all(f.endswith("-rep_1.jsonl") for f in files)


def test_pinned_requests_are_counted_apart_and_never_in_the_windows():
    t = [100.0]
    m = ServiceMetrics(["a", "b"], clock=lambda: t[0])
    m.record("b", 10.0, False)
    m.record("b", 10.0, True, pinned=True)  # a probe or a person pinning b by header / model
    m.record("b", 12.0, True, pinned=True)
    doc = m.stats(50.0, {"a": 50, "b": 50})
    assert doc["variants"]["b"]["window"]["requests"] == 1 and doc["variants"]["b"]["window"]["errors"] == 0
    assert doc["variants"]["b"]["total"]["requests"] == 1
    assert doc["pinned"]["b"]["requests"] == 2 and doc["pinned"]["b"]["errors"] == 2
    merged = merge_stats([doc, m.stats(50.0, {"a": 50, "b": 50})])
    assert merged["pinned"]["b"]["requests"] == 4 and merged["variants"]["b"]["window"]["requests"] == 2
