"""A real local Ray Serve app over real HTTP: two tiny-model variants at 90/10, and every router behaviour.

One Ray and one Serve app for the whole module (model loading is the slow part). The app has
four variants: `a` and `b` are tiny Llama models built here; `echo` answers with the exact
prompt it received (to see the router's rewriting); `broken` raises on every call (it stands
in for a broken model).
"""

import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.integration

SERVICE = "test-chat"
MAX_ON, MAX_OFF = 6, 2


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from anneal.modeling.tiny import LlamaShape, build_llama, save_pretrained
    from anneal.modeling.tokenizer import builtin_corpus, train_tokenizer

    root = tmp_path_factory.mktemp("serve-models")
    tokenizer = train_tokenizer(builtin_corpus(20), vocab_size=300)
    paths = {}
    for i, (name, hidden) in enumerate([("small", 32), ("large", 64)]):
        shape = LlamaShape(hidden_size=hidden, layers=2, heads=4, kv_heads=2, intermediate_size=2 * hidden)
        paths[name] = str(save_pretrained(build_llama(shape, tokenizer, seed=i), tokenizer, root / name))
    return paths, tokenizer


@pytest.fixture(scope="module")
def service(models):
    import ray
    from ray import serve

    from anneal.serve.app import AppArgs, VariantArgs, build_serve_config
    from anneal.serve.deploy import deploy_entries

    paths, _ = models
    from anneal.local.jobs import ray_session
    from anneal.local.service import start_http
    from anneal.settings import Settings

    settings = Settings()
    settings.ray.num_cpus, settings.ray.address = 2, None
    session = ray_session(settings)
    session.__enter__()
    port = start_http("127.0.0.1", 0)
    light = {"num_cpus": 0.1}
    args = AppArgs(
        service=SERVICE,
        variants=[
            # maxTokens is a cap too: above the reasoning caps, so those are what the tests see.
            VariantArgs(name="a", model_uri=paths["small"], max_tokens=8, **light),
            VariantArgs(name="b", model_uri=paths["large"], max_tokens=8, **light),
            VariantArgs(name="echo", engine="echo", **light),
            VariantArgs(name="broken", engine="faulty", **light),
        ],
        weights={"a": 90, "b": 10, "echo": 0, "broken": 0},
        sticky_header="x-user-id",
        shadow_variant="echo",
        shadow_percent=20,
        reasoning={"default": "off", "max_tokens_on": MAX_ON, "max_tokens_off": MAX_OFF},
        router_num_cpus=0.1,
        request_timeout_s=60,
        max_request_bytes=64 * 1024,
        max_tokens_limit=512,
        cache_dir=str(paths["small"]) + "-cache",
        seed=11,
    )
    deploy_entries([build_serve_config(args)], wait_s=900)
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=120) as http:
        yield {"args": args, "base": base, "http": http, "port": port}
    serve.shutdown()
    session.__exit__(None, None, None)


def post(http, path="/v1/completions", body=None, headers=None, **kw):
    return http.post(path, content=json.dumps(body) if body is not None else kw.pop("content"), headers={
        "content-type": "application/json", **(headers or {})}, **kw)


def many(base, n, make, concurrency=16):
    """Send n requests from a thread pool; returns the responses (status, headers, json)."""
    def one(i):
        body, headers = make(i)
        with_client = clients[threading.get_ident() % len(clients)]
        r = with_client.post("/v1/completions", json=body, headers=headers)
        return r.status_code, r.headers, r.json()

    clients = [httpx.Client(base_url=base, timeout=120) for _ in range(concurrency)]
    try:
        with ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(one, range(n)))
    finally:
        for c in clients:
            c.close()


def test_split_is_90_10_within_3_points_over_2000_requests(service):
    stats_before = service["http"].get("/-/stats").json()
    responses = many(service["base"], 2000, lambda i: ({"prompt": "2 + 3 =", "max_tokens": 1}, {}))
    assert all(status == 200 for status, _, _ in responses)
    counts = Counter(h["x-anneal-variant"] for _, h, _ in responses)
    assert set(counts) <= {"a", "b"}  # zero-weight variants (echo, broken) get no weighted traffic
    assert abs(counts["b"] / 2000 * 100 - 10) <= 3, counts
    assert {h["x-anneal-route-reason"] for _, h, _ in responses} == {"weighted"}
    stats = service["http"].get("/-/stats", params={"since": stats_before["time"]}).json()
    assert stats["variants"]["a"]["window"]["requests"] == counts["a"]
    assert stats["variants"]["b"]["window"]["requests"] == counts["b"]
    assert stats["variants"]["a"]["window"]["completionTokens"] == counts["a"]  # max_tokens 1
    assert stats["variants"]["a"]["total"]["latencyP95Ms"] > 0


def test_sticky_users_never_switch_and_split_by_weight(service):
    users = [f"user-{i}" for i in range(300)]
    responses = many(service["base"], 900, lambda i: ({"prompt": "hi", "max_tokens": 1},
                                                      {"x-user-id": users[i % 300]}))
    seen: dict[str, set] = {}
    for i, (status, h, _) in enumerate(responses):
        assert status == 200 and h["x-anneal-route-reason"] == "sticky"
        seen.setdefault(users[i % 300], set()).add(h["x-anneal-variant"])
    assert all(len(v) == 1 for v in seen.values())
    share_b = sum(v == {"b"} for v in seen.values()) / len(seen)
    assert 0.03 <= share_b <= 0.2


def test_shadow_answers_are_recorded_never_returned(service):
    before = service["http"].get("/-/stats").json()["shadow"].get("echo", {"requests": 0})["requests"]
    responses = many(service["base"], 200, lambda i: ({"prompt": "shadow me", "max_tokens": 1}, {}))
    assert all(h["x-anneal-variant"] != "echo" for _, h, _ in responses)
    deadline = time.time() + 30
    while time.time() < deadline:
        shadow = service["http"].get("/-/stats").json()["shadow"]["echo"]
        if shadow["requests"] - before >= 20:
            break
        time.sleep(0.2)
    assert 20 <= shadow["requests"] - before <= 80  # 20 % of 200, loosely
    assert shadow["errors"] == 0 and shadow["latencyP95Ms"] > 0
    prom = service["http"].get("/-/metrics").text
    assert 'anneal_serve_shadow_requests_total{service="test-chat",variant="echo"}' in prom


@pytest.mark.parametrize("headers,system,expected", [
    ({"x-anneal-reasoning": "on"}, None, "detailed thinking on"),
    ({"x-anneal-reasoning": "off"}, "detailed thinking on", "detailed thinking off"),  # header wins
    ({}, "detailed thinking on", "detailed thinking on"),
    ({}, None, "detailed thinking off"),  # the service default
])
def test_reasoning_toggle_sets_the_system_prompt(service, headers, system, expected):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "7 * 6?"}]
    r = post(service["http"], "/v1/chat/completions", {"messages": messages},
             headers={"x-anneal-variant": "echo", **headers})
    assert r.status_code == 200, r.text
    prompt = r.json()["choices"][0]["message"]["content"]
    assert prompt == f"<|system|>{expected}<|end|><|user|>7 * 6?<|end|><|assistant|>"
    assert r.headers["x-anneal-reasoning"] == expected.split()[-1]


@pytest.mark.parametrize("mode,cap", [("on", MAX_ON), ("off", MAX_OFF)])
def test_reasoning_toggle_caps_the_output_length(service, models, mode, cap):
    _, tokenizer = models
    r = post(service["http"], "/v1/chat/completions",
             {"messages": [{"role": "user", "content": "Ana has 3 apples."}], "max_tokens": 50, "ignore_eos": True},
             headers={"x-anneal-variant": "a", "x-anneal-reasoning": mode})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["completion_tokens"] == cap
    expected_prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": f"detailed thinking {mode}"}, {"role": "user", "content": "Ana has 3 apples."}],
        tokenize=False, add_generation_prompt=True)
    assert usage["prompt_tokens"] == len(tokenizer(expected_prompt, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("path,content,headers,status,param", [
    ("/v1/chat/completions", "{not json", {}, 400, "body"),
    ("/v1/chat/completions", "[1, 2]", {}, 400, "body"),
    ("/v1/chat/completions", json.dumps({"model": SERVICE}), {}, 400, "messages"),
    ("/v1/chat/completions", json.dumps({"messages": []}), {}, 400, "messages"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "robot", "content": "x"}]}), {}, 400,
     "messages[0].role"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": 5}]}), {}, 400,
     "messages[0].content"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}),
     {}, 400, "max_tokens"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}),
     {}, 400, "temperature"),
    ("/v1/completions", json.dumps({"max_tokens": 3}), {}, 400, "prompt"),
    ("/v1/completions", json.dumps({"prompt": "x"}), {"x-anneal-variant": "nope"}, 400, "x-anneal-variant"),
    ("/v1/completions", json.dumps({"prompt": "x"}), {"x-anneal-reasoning": "maybe"}, 400, "x-anneal-reasoning"),
    ("/v1/completions", json.dumps({"prompt": "x" * 70_000}), {}, 413, None),
    ("/v1/completions", json.dumps({"prompt": "x", "model": "gpt-4"}), {}, 404, "model"),
])
def test_malformed_requests_get_openai_errors_naming_the_field(service, path, content, headers, status, param):
    r = post(service["http"], path, content=content, headers=headers)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    if param:
        assert param in error["message"]


@pytest.mark.parametrize("method,path,content,status,param,code", [
    ("POST", "/v1/completions", '{"prompt": "x", "temperature": NaN}', 400, "body", "invalid_json"),
    ("POST", "/v1/completions", '{"prompt": "x", "top_p": 1e999}', 400, "top_p", "invalid_value"),
    ("POST", "/v1/completions", '{"prompt": "x", "max_tokens": ' + "9" * 5000 + "}", 400, "body", "invalid_json"),
    ("POST", "/v1/completions", '{"prompt": ' + "[" * 30_000 + "]" * 30_000 + "}", 400, "body", "invalid_json"),
    ("POST", "/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}', 400,
     "messages[0].content", "invalid_value"),
    ("POST", "/v1/completions", iter([b'{"prompt": "'] + [b"x" * 1024] * 200 + [b'"}']), 413, None,
     "request_too_large"),  # chunked, no Content-Length
    ("POST", "/v1/completions", json.dumps({"prompt": "Ana has 3 apples and buys 4 more. " * 200,
                                            "model": "a"}), 400, None, "context_length_exceeded"),
    ("GET", "/v1/nothing", None, 404, None, "not_found"),
    ("GET", "/v1/chat/completions", None, 405, None, "method_not_allowed"),
    ("GET", "/-/stats?since=nan", None, 400, "since", "invalid_value"),
])
def test_bad_input_gets_a_clean_4xx_through_serve(service, method, path, content, status, param, code):
    """Through Serve's proxy: the router's own checks and FastAPI's errors, all in OpenAI's shape."""
    r = service["http"].request(method, path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["code"] == code


def test_a_failing_variant_gets_502_while_the_other_keeps_serving(service):
    def call(i):
        if i % 2:
            return post(service["http"], body={"prompt": "x", "max_tokens": 1}, headers={"x-anneal-variant": "broken"})
        return post(service["http"], body={"prompt": "x", "max_tokens": 1}, headers={"x-anneal-variant": "a"})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(call, range(40)))
    broken = [r for i, r in enumerate(responses) if i % 2]
    healthy = [r for i, r in enumerate(responses) if not i % 2]
    assert all(r.status_code == 502 for r in broken)
    assert all(r.json()["error"]["code"] == "variant_error" and "broken" in r.json()["error"]["message"]
               for r in broken)
    assert all(r.headers["x-anneal-variant"] == "broken" for r in broken)
    assert all(r.status_code == 200 for r in healthy)
    streamed = post(service["http"], body={"prompt": "x", "stream": True}, headers={"x-anneal-variant": "broken"})
    assert streamed.status_code == 502
    doc = service["http"].get("/-/stats").json()
    # Every request here was pinned by the header: counted apart, never in the routed totals a rollout reads.
    stats = doc["pinned"]["broken"]
    assert stats["errors"] == stats["requests"] >= 21 and stats["errorRate"] == 1.0
    assert doc["variants"]["broken"]["total"]["errors"] == 0


def test_streaming_sends_sse_chunks_then_done(service):
    with service["http"].stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "count"}], "max_tokens": 3, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}, headers={"x-anneal-variant": "b", "x-anneal-reasoning": "on"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-anneal-variant"] == "b"
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 3


def test_openai_python_client_works(service):
    from openai import OpenAI

    client = OpenAI(base_url=service["base"] + "/v1", api_key="unused", max_retries=0)
    ids = {m.id for m in client.models.list().data}
    assert ids == {SERVICE, "a", "b", "echo", "broken"}
    out = client.chat.completions.create(model=SERVICE, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert out.choices[0].message.role == "assistant" and out.usage.completion_tokens <= 2
    pinned = client.chat.completions.with_raw_response.create(
        model="echo", messages=[{"role": "user", "content": "hi"}])
    assert pinned.headers["x-anneal-variant"] == "echo"
    assert pinned.headers["x-anneal-route-reason"] == "override"
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "hi there"}], stream=True) if c.choices)
    assert "<|user|>hi there<|end|>" in text
    comp = client.completions.create(model=SERVICE, prompt="1 + 1 =", max_tokens=1)
    assert comp.choices[0].finish_reason in ("length", "stop")
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=SERVICE, messages=[{"role": "user", "content": "x"}], max_tokens=100000)
    assert "max_tokens" in str(e.value)


def test_live_reweight_under_load_drops_nothing(service):
    from anneal.serve.deploy import apply_weights

    args, base = service["args"], service["base"]
    replica_before = service["http"].get("/-/stats").json()["replica"]
    stop = threading.Event()
    results: list[tuple[float, int, str]] = []

    def load():
        with httpx.Client(base_url=base, timeout=60) as c:
            while not stop.is_set():
                sent = time.time()
                r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
                results.append((sent, r.status_code, r.headers.get("x-anneal-variant", "")))

    threads = [threading.Thread(target=load) for _ in range(6)]
    for t in threads:
        t.start()
    marks = []
    try:
        time.sleep(2)
        for weights in ({"a": 50, "b": 50}, {"a": 0, "b": 100}, {"a": 90, "b": 10}):
            apply_weights(SERVICE, args, weights)
            marks.append(time.time())
            time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    duration = results[-1][0] - results[0][0]
    assert len(results) / duration >= 20, f"only {len(results) / duration:.1f} req/s"
    assert [s for _, s, _ in results if s != 200] == []
    # Sent after apply_weights returned (every router replica had the new weights) and before the next change.
    during_all_b = [v for t, _, v in results if marks[1] < t < marks[1] + 2]
    assert during_all_b and set(during_all_b) == {"b"}
    stats = service["http"].get("/-/stats").json()
    assert stats["weights"] == {"a": 90, "b": 10, "echo": 0, "broken": 0}
    assert stats["replica"] == replica_before  # reconfigured in place, not restarted


def test_dynamic_routing_switched_on_live(service):
    from anneal.serve.deploy import apply_weights

    args = service["args"]
    apply_weights(SERVICE, args, {"a": 90, "b": 10}, routing={"dynamic": {"small": "a", "large": "b", "threshold": 0.5}})
    try:
        hard = ("Ana has 12 apples. She buys 5 more, gives away 3, doubles them, sells 7 and finds 9 more. "
                "How many are left?")
        r1 = post(service["http"], "/v1/chat/completions", {"messages": [{"role": "user", "content": hard}],
                                                           "max_tokens": 1})
        r2 = post(service["http"], "/v1/chat/completions", {"messages": [{"role": "user", "content": "2 + 2?"}],
                                                           "max_tokens": 1})
        assert (r1.headers["x-anneal-variant"], r2.headers["x-anneal-variant"]) == ("b", "a")
        assert r1.headers["x-anneal-route-reason"].startswith("dynamic:large(score=")
        assert r2.headers["x-anneal-route-reason"].startswith("dynamic:small(score=")
        routes = service["http"].get("/-/stats").json()["routes"]
        assert routes["dynamic:large"] >= 1 and routes["dynamic:small"] >= 1
    finally:
        apply_weights(SERVICE, args, {"a": 90, "b": 10})


def test_health_and_prometheus(service):
    assert service["http"].get("/healthz").json()["status"] == "ok"
    prom = service["http"].get("/-/metrics").text
    assert 'anneal_serve_requests_total{service="test-chat",variant="a"}' in prom
    assert "anneal_serve_latency_ms_bucket" in prom
    assert 'anneal_serve_route_decisions_total{reason="weighted",service="test-chat"}' in prom


def test_embedded_runner_serves_a_manifest_and_the_client_helpers_work(service, models):
    from anneal.serve.client import call, format_stats, stats
    from anneal.local.service import run_service
    from anneal.settings import Settings

    paths, _ = models
    manifest = {
        "apiVersion": "anneal.dev/v1alpha1", "kind": "ModelService", "metadata": {"name": "embedded"},
        "spec": {
            "variants": [
                {"name": "stable", "model": {"uri": paths["small"]}, "weight": 80,
                 "resources": {"cpusPerWorker": 0.1}, "generation": {"maxTokens": 2}},
                {"name": "canary", "model": {"uri": paths["large"]}, "weight": 20,
                 "resources": {"cpusPerWorker": 0.1}, "generation": {"maxTokens": 2}},
            ],
            "routing": {"sticky": {"header": "x-user-id"}, "reasoning": {"default": "off"}},
        },
    }
    ready: list[dict] = []
    stop = threading.Event()
    done: list[dict] = []
    runner = threading.Thread(target=lambda: done.append(run_service(
        manifest, settings=Settings(), duration=600, port=service["port"], route_prefix="/embedded",
        ready_callback=ready.append, stop_event=stop)))
    runner.start()
    try:
        deadline = time.time() + 600
        while not ready and runner.is_alive() and time.time() < deadline:
            time.sleep(0.5)
        assert ready, "run_service never became ready"
        status = ready[0]
        assert status["phase"] == "Ready"
        assert status["weights"] == {"stable": 80, "canary": 20} and status["weightsSummary"] == "stable=80,canary=20"
        assert status["endpoint"] == f"http://127.0.0.1:{service['port']}/embedded"
        answer = call(status["endpoint"], "What is 2 + 2?", reasoning="on", variant="canary")
        assert answer["variant"] == "canary" and answer["reason"] == "override" and answer["reasoning"] == "on"
        doc = stats(status["endpoint"])
        assert doc["pinned"]["canary"]["requests"] == 1  # pinned by variant=: counted apart from routed traffic
        assert doc["variants"]["canary"]["total"]["requests"] == 0
        table = format_stats(doc)
        assert "pinnedRequests" in table and "canary" in table
    finally:
        stop.set()
        runner.join(timeout=120)
    assert done and done[0]["phase"] == "Ready"


def test_changing_one_variants_model_updates_that_variant_only(service, models):
    """A model change reaches only its variant's deployment: the router and the other variants keep
    their replicas (Serve restarts every deployment of an app whose args change, so the model is
    in the variant's user_config), and requests to them keep succeeding meanwhile."""
    from ray.serve.context import _get_global_client

    from anneal.serve.app import build_serve_config
    from anneal.serve.deploy import deploy_entries

    paths, _ = models
    args, http = service["args"], service["http"]

    def replicas():
        deps = _get_global_client().get_serve_details()["applications"][SERVICE]["deployments"]
        return {name: sorted((r["replica_id"], r.get("pid")) for r in d["replicas"]) for name, d in deps.items()}

    def answer(variant):
        body = {"prompt": "Tom has 3 pens and buys 4 more. How many?", "max_tokens": 8, "temperature": 0}
        r = post(http, body=body, headers={"x-anneal-variant": variant})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    before = replicas()
    assert answer("b") != answer("a")  # b serves the larger model
    changed = args.model_copy(update={"variants": [
        v.model_copy(update={"model_uri": paths["small"]}) if v.name == "b" else v for v in args.variants]})
    stop, codes = threading.Event(), []

    def load():
        with httpx.Client(base_url=service["base"], timeout=60) as c:
            while not stop.is_set():
                codes.append(c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1},
                                    headers={"x-anneal-variant": "a"}).status_code)

    t = threading.Thread(target=load)
    t.start()
    try:
        deploy_entries([build_serve_config(changed)], wait_s=600)
        assert answer("b") == answer("a")  # b now serves the small model, as a does
    finally:
        stop.set()
        t.join()
        deploy_entries([build_serve_config(args)], wait_s=600)
    after = replicas()
    assert {k: v for k, v in after.items() if k != "variant-b"} == {k: v for k, v in before.items() if k != "variant-b"}
    assert codes and set(codes) == {200}


def test_api_keys_on_a_served_app_with_the_openai_sdk_and_the_rollout_clients(service):
    """A second app on the same Serve, with keys given as the operator gives them on a shared cluster."""
    import openai

    from anneal.rollout.probes import LabelledQuestion, ProbeSender
    from anneal.serve.app import AppArgs, VariantArgs, build_serve_config
    from anneal.serve.client import ServeClientError, stats
    from anneal.serve.deploy import deploy_entries

    light = {"num_cpus": 0.05}
    args = AppArgs(service="test-auth", route_prefix="/secured",
                   variants=[VariantArgs(name="stable", engine="echo", **light),
                             VariantArgs(name="candidate", engine="echo", **light)],
                   weights={"stable": 100, "candidate": 0}, router_num_cpus=0.05,
                   api_keys_env=["T_API_KEYS"], admin_key_env="T_ADMIN_KEY")
    entry = build_serve_config(args)
    assert "k-live" not in json.dumps(entry)  # the config names the variables only
    entry["runtime_env"] = {"env_vars": {"T_API_KEYS": "k-old,k-live", "T_ADMIN_KEY": "adm"}}
    deploy_entries([entry], wait_s=300)
    base = service["base"] + "/secured"
    client = openai.OpenAI(base_url=base + "/v1", api_key="k-live", max_retries=0)
    out = client.chat.completions.create(model="test-auth", messages=[{"role": "user", "content": "hi"}])
    assert out.choices[0].message.content.endswith("hi<|end|><|assistant|>")
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).completions.create(
            model="test-auth", prompt="x")
    assert e.value.code == "invalid_api_key"
    with pytest.raises(openai.PermissionDeniedError):  # pinning takes the admin key
        client.completions.create(model="candidate", prompt="x")
    with pytest.raises(ServeClientError) as stats_error:
        stats(base, api_key="k-live")
    assert stats_error.value.status == 403
    sender = ProbeSender(base, [LabelledQuestion([{"role": "user", "content": "1 + 1?"}], "2")], api_key="adm")
    try:
        assert sender.send("candidate", 2).total == 2
    finally:
        sender.close()
    doc = stats(base, api_key="adm")
    assert doc["pinned"]["candidate"]["requests"] == 2 and doc["variants"]["candidate"]["total"]["requests"] == 0
    assert doc["variants"]["stable"]["total"]["requests"] == 1
    from ray import serve

    serve.delete("test-auth")
