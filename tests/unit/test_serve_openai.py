"""The `openai` engine: a variant that is an existing OpenAI-compatible server, over real HTTP.

The server here is a small Starlette app run by uvicorn on loopback in a thread. It stands in for
vLLM / SGLang / TGI / NIM / llama.cpp's server, none of which is installed in this checkout: it
speaks their wire format (chat and text completions, SSE streaming with a usage chunk, OpenAI's and
vLLM's error bodies) and can be told, by the `model` it is asked for, to fail in each way a real
one fails (400, 401, 404, 429, 500, a hang, an error in the middle of a stream). The router,
variant server and engine are the real ones (`make_router`: only Ray's transport is replaced by
direct calls); the integration test (`tests/integration/test_serve_openai.py`) puts a real Anneal
service behind a real Serve app instead.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import threading
import time

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from anneal.serve.app import VariantArgs, VariantServer
from anneal.serve.engines import EngineError, GenerateRequest, OpenAIEngine, UpstreamError, make_engine
from tests.unit.test_serve_hardening import make_router

KEY = "sk-upstream-7f3a9c"  # what the stand-in requires; it must never appear in a log or a message
WORDS = ["one ", "two ", "three ", "four ", "five ", "six "]
PIECE_GAP_S = 0.15


class StandIn:
    """The stand-in server and what it saw: request bodies, Authorization headers, closed streams."""

    def __init__(self):
        self.seen: list[dict] = []
        self.auth: list[str | None] = []
        self.sent_at: list[float] = []
        self.closed = threading.Event()
        self.port = 0

    def app(self) -> Starlette:
        async def complete(request: Request):
            body = await request.json()
            self.seen.append(body)
            self.auth.append(request.headers.get("authorization"))
            chat = request.url.path.endswith("/chat/completions")
            model = body.get("model")
            if request.headers.get("authorization") != f"Bearer {KEY}":
                return JSONResponse({"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                                               "param": None, "code": "invalid_api_key"}}, 401)
            if model == "too-long":  # vLLM's answer to a prompt over the context
                return JSONResponse({"object": "error", "message": "This model's maximum context length is 16 tokens.",
                                     "type": "BadRequestError", "param": None, "code": 400}, 400)
            if model == "tgi-invalid":
                return JSONResponse({"error": "Input validation error: `top_p` must be > 0.0", "error_type": "validation"},
                                    422)
            if model == "busy":
                return JSONResponse({"error": {"message": "rate limited", "type": "rate_limit", "code": None}}, 429)
            if model == "crash":
                return PlainTextResponse("Internal Server Error", 500)
            if model == "hang":  # never answers; notices the client going away
                while not await request.is_disconnected():
                    await asyncio.sleep(0.02)
                self.closed.set()
                return PlainTextResponse("", 499)
            if model not in ("tiny", "drip", "broken-stream"):
                return JSONResponse({"object": "error", "message": f"The model `{model}` does not exist.",
                                     "type": "NotFoundError", "param": None, "code": 404}, 404)
            words = WORDS[: body.get("max_tokens", 16)]
            usage = {"prompt_tokens": 7, "completion_tokens": len(words), "total_tokens": 7 + len(words)}
            if not body.get("stream"):
                choice = ({"index": 0, "message": {"role": "assistant", "content": "".join(words)},
                           "finish_reason": "length"} if chat else
                          {"index": 0, "text": "".join(words), "finish_reason": "length"})
                return JSONResponse({"id": "x", "object": "chat.completion", "model": model, "choices": [choice],
                                     "usage": usage})

            async def events():
                try:
                    for i, w in enumerate(words):
                        if i:
                            await asyncio.sleep(PIECE_GAP_S)
                        if model == "broken-stream" and i == 1:
                            yield b'data: {"error": {"message": "CUDA out of memory", "code": "oom"}}\n\n'
                            return
                        self.sent_at.append(time.monotonic())
                        piece = {"delta": {"content": w}} if chat else {"text": w}
                        yield f"data: {json.dumps({'choices': [{'index': 0, **piece, 'finish_reason': None}]})}\n\n".encode()
                    while model == "drip":
                        await asyncio.sleep(0.05)
                        yield b": keep-alive\n\n"
                    yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {}, 'text': '', 'finish_reason': 'length'}]})}\n\n".encode()
                    yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode()
                    yield b"data: [DONE]\n\n"
                finally:
                    self.closed.set()

            return StreamingResponse(events(), media_type="text/event-stream")

        return Starlette(routes=[Route("/v1/chat/completions", complete, methods=["POST"]),
                                 Route("/v1/completions", complete, methods=["POST"])])


@pytest.fixture(scope="module")
def standin():
    import uvicorn

    s = StandIn()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    s.port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(s.app(), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    yield s
    server.should_exit = True
    thread.join(5)


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv("T_UPSTREAM_KEY", KEY)
    return "T_UPSTREAM_KEY"


def openai_variant(standin, name="ext", model="tiny", *, timeout_s=5.0, **kw) -> VariantArgs:
    return VariantArgs(name=name, engine="openai", engine_options={
        "url": f"http://127.0.0.1:{standin.port}/v1", "model": model, "api_key_env": "T_UPSTREAM_KEY",
        "timeout_s": timeout_s}, **kw)


def routed(monkeypatch, standin, model="tiny", **kw):
    """A router whose every request goes to an openai variant (the second variant is an echo at weight 0)."""
    router, servers, client = make_router(
        monkeypatch, variants=[openai_variant(standin, model=model, **kw), VariantArgs(name="echo", engine="echo")])
    return router, servers, client


def _error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# ------------------------------------------------------------------------- forwarding


@pytest.mark.parametrize("path,body,text", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100},
     "one two three "),
    ("/v1/completions", {"prompt": "2 + 3 =", "max_tokens": 2, "stop": ["\n"], "seed": 5}, "one two "),
])
def test_requests_are_forwarded_with_the_variants_caps_and_key(monkeypatch, standin, key_env, path, body, text):
    router, _, client = routed(monkeypatch, standin, max_tokens=3)
    before = len(standin.seen)
    with client:
        r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    got = answer["choices"][0]["message"]["content"] if "messages" in body else answer["choices"][0]["text"]
    assert got == text and answer["usage"]["prompt_tokens"] == 7 and r.headers["x-anneal-variant"] == "ext"
    sent, authorization = standin.seen[before], standin.auth[before]
    assert sent["model"] == "tiny" and authorization == f"Bearer {KEY}"
    assert sent["max_tokens"] == min(body["max_tokens"], 3)  # the variant's cap, not the client's ask
    assert sent.get("stop") == body.get("stop") and sent.get("seed") == body.get("seed")
    assert "ignore_eos" not in sent  # vLLM's extension is sent only when asked for
    stats = router.local_stats()["variants"]["ext"]["total"]
    assert stats["requests"] == 1 and stats["errors"] == 0 and stats["completionTokens"] == len(text.split())


def test_streamed_pieces_arrive_as_the_server_sends_them(standin, key_env):
    """The engine yields each piece when it comes, not the answer at the end."""
    engine = OpenAIEngine(f"http://127.0.0.1:{standin.port}/v1", "tiny", api_key_env=key_env)

    async def run():
        got = []
        async for piece in engine.astream(GenerateRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=4)):
            got.append((time.monotonic(), piece))
        await engine.aclose()
        return got

    standin.sent_at.clear()
    got = asyncio.run(run())
    texts = [p.text for _, p in got if p.text]
    assert texts == WORDS[:4]
    assert got[0][0] < standin.sent_at[-1]  # the first piece was here before the server sent the last one
    last = got[-1][1]
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == ("length", 7, 4)


def test_a_streamed_answer_through_the_router_is_sse_with_usage(monkeypatch, standin, key_env):
    router, _, client = routed(monkeypatch, standin)
    with client:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                                                      "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "one two three "
    assert chunks[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert router.local_stats()["variants"]["ext"]["total"]["completionTokens"] == 3


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("model,status,code,counted", [
    ("too-long", 400, "400", False),             # the caller's request: stays a 400, the server's words
    ("tgi-invalid", 400, "validation", False),   # TGI's 422 is OpenAI's 400
    ("nope", 502, "upstream_not_found", True),   # backend.model is wrong: the variant is misconfigured
    ("busy", 503, "upstream_unavailable", True),
    ("crash", 502, "upstream_error", True),
])
def test_upstream_errors_answer_in_openai_shape(monkeypatch, standin, key_env, model, status, code, counted):
    router, _, client = routed(monkeypatch, standin, model=model)
    with client:
        r = client.post("/v1/completions", json={"prompt": "x"})
    err = _error(r, status)
    assert err["code"] == code and err["message"].startswith("variant ext: ")
    if model == "too-long":
        assert "maximum context length is 16 tokens" in err["message"] and err["type"] == "invalid_request_error"
    if status == 503:
        assert r.headers["retry-after"] == "1"
    errors = router.local_stats()["variants"]["ext"]["total"]["errors"]
    assert errors == (1 if counted else 0)  # only what the variant did wrong reaches the rollout gates


def test_a_wrong_key_is_the_variants_fault_and_never_echoed(monkeypatch, standin, caplog):
    monkeypatch.setenv("T_UPSTREAM_KEY", "sk-wrong-key-123")
    caplog.set_level(logging.DEBUG)
    router, servers, client = routed(monkeypatch, standin)
    with client:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    err = _error(r, 502)
    assert err["code"] == "upstream_auth_failed" and "apiKeySecret" in err["message"]
    assert router.local_stats()["variants"]["ext"]["total"]["errors"] == 1
    assert standin.auth[-1] == "Bearer sk-wrong-key-123"  # it was sent ...
    for text in (r.text, caplog.text, repr(servers["ext"].engine)):  # ... and is nowhere else
        assert "sk-wrong-key-123" not in text


def test_an_unreachable_server_is_a_502_counted_against_the_variant(monkeypatch, key_env):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    v = VariantArgs(name="ext", engine="openai", engine_options={"url": f"http://127.0.0.1:{port}/v1", "model": "m"})
    router, _, client = make_router(monkeypatch, variants=[v, VariantArgs(name="echo", engine="echo")])
    with client:
        r = client.post("/v1/completions", json={"prompt": "x", "stream": True})
    err = _error(r, 502)
    assert err["code"] == "upstream_unreachable" and f"127.0.0.1:{port}" in err["message"]
    assert router.local_stats()["variants"]["ext"]["total"]["errors"] == 1


def test_an_error_in_the_middle_of_a_stream_ends_it_in_openai_shape(monkeypatch, standin, key_env):
    router, _, client = routed(monkeypatch, standin, model="broken-stream")
    with client:
        r = client.post("/v1/completions", json={"prompt": "x", "stream": True})
    assert r.status_code == 200  # the status went out with the first piece
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert "CUDA out of memory" in error["message"] and error["code"] == "oom"
    assert router.local_stats()["variants"]["ext"]["total"]["errors"] == 1


def test_a_server_slower_than_the_timeout_is_a_504_and_its_request_is_closed(monkeypatch, standin, key_env):
    router, _, client = routed(monkeypatch, standin, model="hang", timeout_s=0.3)
    standin.closed.clear()
    with client:
        r = client.post("/v1/completions", json={"prompt": "x"})
    err = _error(r, 504)
    assert err["code"] == "timeout" and "0.3s" in err["message"]
    assert standin.closed.wait(5)  # the server saw the connection go
    assert router.local_stats()["variants"]["ext"]["total"]["errors"] == 1


def test_cancelling_a_call_closes_the_request_to_the_server(standin, key_env):
    """What the router's timeout or a client leaving does to the variant: its call is cancelled."""
    server = VariantServer(openai_variant(standin, model="drip").model_dump(mode="json"), "/tmp", None)
    server.reconfigure({"engine": "openai", "model_uri": None, "engine_options": server.args.engine_options})

    async def run(model: str, stream: bool) -> None:
        req = GenerateRequest(prompt="x", max_tokens=1)
        if stream:
            pieces = server.stream(req)
            first = await pieces.__anext__()
            assert first.text == "one "
            task = asyncio.ensure_future(pieces.__anext__())  # waits on the server's next piece, which never comes
        else:
            task = asyncio.ensure_future(server.generate(req))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        if stream:
            await pieces.aclose()

    standin.closed.clear()
    asyncio.run(run("drip", True))
    assert standin.closed.wait(5)
    server.engine.model = "hang"
    standin.closed.clear()
    asyncio.run(run("hang", False))
    assert standin.closed.wait(5)


def test_a_key_variable_that_is_unset_refuses_to_start(monkeypatch):
    monkeypatch.delenv("T_UNSET_KEY", raising=False)
    with pytest.raises(EngineError, match="T_UNSET_KEY"):
        make_engine("openai", None, cache_dir="/tmp", tracking_uri=None,
                    options={"url": "http://127.0.0.1:1/v1", "model": "m", "api_key_env": "T_UNSET_KEY"})
    with pytest.raises(EngineError, match="url and model"):
        make_engine("openai", None, cache_dir="/tmp", tracking_uri=None, options={"model": "m"})


def test_upstream_error_survives_pickling():
    import pickle

    e = pickle.loads(pickle.dumps(UpstreamError(400, "too long", "ctx", "messages", "invalid_request_error")))
    assert (e.status, e.message, e.code, e.param, e.type) == (400, "too long", "ctx", "messages", "invalid_request_error")


# --------------------------------------------------------------------- spec, args, drivers

EXT = {"name": "ext", "engine": "openai", "weight": 30,
       "backend": {"url": "http://vllm.team.svc:8000/v1", "model": "meta-llama/Llama-3.1-8B-Instruct",
                   "apiKeySecret": {"name": "vllm-key", "key": "token"}, "timeoutSeconds": 30, "maxConcurrency": 16}}
SPEC = {"variants": [{"name": "local", "model": {"uri": "file:///m/a"}, "weight": 70}, EXT]}


@pytest.mark.parametrize("variant,path,rule", [
    ({"name": "ext", "engine": "openai"}, "spec.variants[0].backend", "needs backend {url, model}"),
    ({"name": "ext", "engine": "openai", "backend": {"url": "vllm:8000/v1", "model": "m"}},
     "spec.variants[0].backend.url", "http:// or https://"),
    ({"name": "ext", "engine": "openai", "backend": {"url": "http://u:p@vllm/v1", "model": "m"}},
     "spec.variants[0].backend.url", "user:password"),
    ({"name": "ext", "engine": "openai", "backend": {"url": "http://vllm/v1"}}, "spec.variants[0].backend.model",
     "required"),
    ({"name": "ext", "engine": "openai", "backend": {"url": "http://vllm/v1", "model": "m", "timeoutSeconds": 0}},
     "spec.variants[0].backend.timeoutSeconds", "greater than 0"),
    ({"name": "ext", "engine": "openai", "resources": {"gpusPerWorker": 1},
      "backend": {"url": "http://vllm/v1", "model": "m"}}, "spec.variants[0].resources.gpusPerWorker", "no GPU"),
    ({"name": "a"}, "spec.variants[0].model", "required"),
    ({"name": "a", "model": {"uri": "/m"}, "backend": {"url": "http://vllm/v1", "model": "m"}},
     "spec.variants[0].backend", "only an openai variant"),
])
def test_backend_spec_errors_name_the_field(variant, path, rule):
    from anneal.api.resources import ManifestError, parse_spec

    with pytest.raises(ManifestError) as e:
        parse_spec("ModelService", {"variants": [variant]})
    assert path in str(e.value) and rule in str(e.value), str(e.value)


def test_an_openai_variant_becomes_engine_options_without_its_key():
    from anneal.api.resources import parse_spec
    from anneal.serve.app import args_from_spec, build_serve_config

    spec = parse_spec("ModelService", SPEC)
    assert spec.variants[1].model is None and spec.variants[1].resources.cpus_per_worker == 0.1
    args = args_from_spec("team_svc", spec, {"local": "/m/a"}, cache_dir="/c")
    ext = args.variant("ext")
    assert ext.model_uri == "http://vllm.team.svc:8000/v1#meta-llama/Llama-3.1-8B-Instruct"  # what status and MLflow show
    assert ext.engine_options == {"url": "http://vllm.team.svc:8000/v1", "model": "meta-llama/Llama-3.1-8B-Instruct",
                                  "timeout_s": 30.0, "max_concurrency": 16, "api_key_env": "ANNEAL_BACKEND_KEY_EXT"}
    assert ext.max_ongoing_requests == 16 and ext.num_cpus == 0.1
    entry = build_serve_config(args)
    (dep,) = [d for d in entry["deployments"] if d["name"] == "variant-ext"]
    assert dep["user_config"]["engine"] == "openai"  # a new URL or model redeploys this variant only
    # Embedded with apiKeyEnv: that variable; the operator: always the Secret's variable.
    spec2 = parse_spec("ModelService", {"variants": [
        SPEC["variants"][0], {**EXT, "backend": {**EXT["backend"], "apiKeyEnv": "VLLM_KEY"}}]})
    assert args_from_spec("s", spec2, {}, cache_dir="/c").variant("ext").engine_options["api_key_env"] == "VLLM_KEY"
    assert args_from_spec("s", spec2, {}, cache_dir="/c", key_from_secrets=True).variant(
        "ext").engine_options["api_key_env"] == "ANNEAL_BACKEND_KEY_EXT"


def test_anneal_run_checks_the_backend_key_variable_first():
    from anneal.api.resources import parse_spec
    from anneal.local.service import ServiceError, backend_keys, resolve_model_uris

    spec = parse_spec("ModelService", SPEC)
    with pytest.raises(ServiceError, match=r"spec.variants\[1\].backend.apiKeySecret: .*ANNEAL_BACKEND_KEY_EXT"):
        backend_keys(spec, {})
    backend_keys(spec, {"ANNEAL_BACKEND_KEY_EXT": "k"})
    assert resolve_model_uris(spec, "team")["ext"] == "http://vllm.team.svc:8000/v1#meta-llama/Llama-3.1-8B-Instruct"


class _CustomObjects:
    def __init__(self, body):
        self.body, self.created = body, []

    def get_namespaced_custom_object(self, *args, **kwargs):
        from kubernetes.client.exceptions import ApiException

        raise ApiException(status=404)

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **_):
        self.created.append(body)
        return body

    def patch_namespaced_custom_object_status(self, group, version, namespace, plural, name, doc):
        self.body["status"] = {**(self.body.get("status") or {}), **doc["status"]}
        return self.body


def _operator_pass(monkeypatch, secrets, ray_address=None):
    from kubernetes import client

    from anneal_operator import service
    from anneal_operator.context import OperatorContext
    from anneal_operator.settings import OperatorSettings

    encoded = {name: {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
               for name, data in secrets.items()}
    body = {"metadata": {"namespace": "team", "name": "svc", "uid": "u1", "generation": 1, "resourceVersion": "1"},
            "spec": json.loads(json.dumps(SPEC)), "status": {}}
    op = OperatorContext(settings=OperatorSettings(ray_address=ray_address), api_client=client.ApiClient(),
                         secret_reader=lambda ns, name: encoded.get(name) if ns == "team" else None)
    op.custom = _CustomObjects(body)
    monkeypatch.setattr(service, "event", lambda *args: None)
    deployed = []
    if ray_address:
        import anneal.serve.deploy

        monkeypatch.setattr(service, "_serve_details", lambda address: {"applications": {}})
        monkeypatch.setattr(service, "_capacity_problem", lambda *args: None)
        monkeypatch.setattr(anneal.serve.deploy, "deploy_entries", lambda entries, **kw: deployed.extend(entries))
    snap = json.loads(json.dumps(body))
    service.reconcile(op, snap, snap["metadata"])
    return body, op.custom.created, deployed


def test_the_operator_gives_a_rayservice_the_backend_key_by_secret_reference(monkeypatch):
    import yaml

    body, created, _ = _operator_pass(monkeypatch, {"vllm-key": {"token": "sk-in-the-secret"}})
    (rayservice,) = created
    assert "sk-in-the-secret" not in json.dumps(rayservice)
    for group in [rayservice["spec"]["rayClusterConfig"]["headGroupSpec"],
                  *rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]]:
        env = group["template"]["spec"]["containers"][0]["env"]
        assert {"name": "ANNEAL_BACKEND_KEY_EXT", "valueFrom": {"secretKeyRef": {"name": "vllm-key", "key": "token"}}} \
            in env
    (app,) = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    (dep,) = [d for d in app["deployments"] if d["name"] == "variant-ext"]
    assert dep["user_config"]["engine_options"]["api_key_env"] == "ANNEAL_BACKEND_KEY_EXT"
    assert body["status"]["models"]["ext"] == "http://vllm.team.svc:8000/v1#meta-llama/Llama-3.1-8B-Instruct"


def test_the_operator_on_a_shared_cluster_sends_the_backend_key_in_the_runtime_env(monkeypatch):
    _, created, deployed = _operator_pass(monkeypatch, {"vllm-key": {"token": "sk-in-the-secret\n"}},
                                          "http://ray-head:8265")
    (entry,) = deployed
    assert not created and entry["runtime_env"] == {"env_vars": {"ANNEAL_BACKEND_KEY_EXT": "sk-in-the-secret"}}
    assert "sk-in-the-secret" not in json.dumps(entry["args"]) + json.dumps(entry["deployments"])


def test_the_operator_waits_for_a_missing_backend_key_secret(monkeypatch):
    import kopf

    with pytest.raises(kopf.TemporaryError, match="backend.apiKeySecret: Secret vllm-key does not exist"):
        _operator_pass(monkeypatch, {}, "http://ray-head:8265")
