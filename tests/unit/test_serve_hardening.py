"""The router answers bad input and unauthorised calls in OpenAI's error shape; keys reach it by reference only.

The router here is the real `Router` and its FastAPI app (`anneal.serve.app.api`), run by
Starlette's test client; the variants are real `VariantServer`s with the `echo` engine. Only Ray's
transport between them is replaced by direct calls (`Handle`), so no Ray is started.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import types

import pytest
from fastapi.testclient import TestClient

from anneal.serve import auth, protocol
from anneal.serve.app import AppArgs, Router, VariantArgs, VariantServer, api, build_serve_config
from anneal.serve.engines import ContextLengthExceeded, GenerateRequest, GenerateResult

SERVICE = "ns_svc"
KEYS, ADMIN = "key-one, key-two", "admin-secret"


class _Response:
    """What `DeploymentHandle.method.remote()` gives: awaitable and cancellable."""

    def __init__(self, task: asyncio.Task):
        self.task = task

    def __await__(self):
        return self.task.__await__()

    def cancel(self) -> None:
        self.task.cancel()


class _Stream:
    def __init__(self, agen):
        self.agen = agen

    def __anext__(self):
        return self.agen.__anext__()

    def cancel(self) -> None:
        pass


class Handle:
    """A DeploymentHandle on one in-process VariantServer."""

    def __init__(self, server: VariantServer):
        self.server = server
        self.generate = types.SimpleNamespace(
            remote=lambda req: _Response(asyncio.ensure_future(server.generate(req))))
        self.stream = types.SimpleNamespace(remote=lambda req: _Stream(server.stream(req)))

    def options(self, **_):
        return self


def make_router(monkeypatch, *, variants=None, **overrides):
    variants = variants or [VariantArgs(name="echo", engine="echo"), VariantArgs(name="other", engine="echo")]
    args = AppArgs(service=SERVICE, variants=variants, weights={v.name: (100 if i == 0 else 0)
                                                                 for i, v in enumerate(variants)},
                   **overrides)
    servers = {}
    for v in args.variants:
        server = VariantServer(v.model_dump(mode="json"), "/tmp", None)
        server.reconfigure({"engine": v.engine, "model_uri": None, "engine_options": dict(v.engine_options)})
        servers[v.name] = server
    router = object.__new__(Router)
    Router.__mro__[1].__init__(router, args=args.model_dump(mode="json"),
                               variants={k: Handle(s) for k, s in servers.items()})
    # Serve's class-based view finds the replica's router through the replica context.
    from ray import serve

    monkeypatch.setattr(serve, "get_replica_context",
                        lambda: types.SimpleNamespace(servable_object=router, replica_tag="test"))
    return router, servers, TestClient(api)


@pytest.fixture
def client(monkeypatch):
    _, _, c = make_router(monkeypatch, max_request_bytes=4096, max_tokens_limit=512)
    return c


def _raw(text: str) -> dict:
    return {"content": text, "headers": {"content-type": "application/json"}}


def _error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


NESTED = '{"prompt": "x", "extra": ' + "[" * 100_000 + "]" * 100_000 + "}"


@pytest.mark.parametrize("path,text,param,code", [
    # Python's json takes NaN and Infinity; OpenAI's API does not.
    ("/v1/completions", '{"prompt": "x", "temperature": NaN}', "body", "invalid_json"),
    ("/v1/completions", '{"prompt": "x", "temperature": Infinity}', "body", "invalid_json"),
    ("/v1/completions", '{"prompt": "x", "top_p": -Infinity}', "body", "invalid_json"),
    ("/v1/completions", '{"prompt": "x", "top_p": NaN}', "body", "invalid_json"),
    ("/v1/completions", '{"prompt": "x", "temperature": 1e999}', "temperature", "invalid_value"),  # parses as inf
    ("/v1/completions", '{"prompt": "x", "top_p": -1e999}', "top_p", "invalid_value"),
    # Integers of hundreds and thousands of digits (Python refuses more than 4300 with a ValueError).
    ("/v1/completions", '{"prompt": "x", "max_tokens": 1' + "0" * 300 + "}", "body", "invalid_json"),
    ("/v1/completions", '{"prompt": "x", "seed": ' + "9" * 5000 + "}", "body", "invalid_json"),
    ("/v1/completions", '{"prompt": "x", "max_tokens": 1e400}', "max_tokens", "invalid_value"),
    ("/v1/completions", '{"prompt": "x", "max_tokens": 1' + "0" * 40 + "}", "max_tokens", "invalid_value"),
    ("/v1/completions", '{"prompt": "x", "seed": 1' + "0" * 30 + "}", "seed", "invalid_value"),
    ("/v1/completions", '{"prompt": "x", "temperature": 1' + "0" * 60 + "}", "temperature", "invalid_value"),
    # 100k-deep nesting: a RecursionError inside json, answered as bad JSON.
    ("/v1/completions", NESTED, "body", "invalid_json"),
    # Lone surrogates: valid JSON escapes, but no tokenizer or UTF-8 answer can carry them.
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages[0].content",
     "invalid_value"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
     "messages[0].content[0].text", "invalid_value"),
    ("/v1/completions", '{"prompt": "\\ud83d"}', "prompt", "invalid_value"),
    ("/v1/completions", '{"prompt": "x", "stop": ["ok", "\\udc00"]}', "stop[1]", "invalid_value"),
    ("/v1/completions", '{"prompt": "x", "model": "\\ud800"}', "model", "invalid_value"),
    ("/v1/chat/completions", '{"messages": [{"role": "' + "r" * 10_000 + '", "content": "x"}]}',
     "messages[0].role", "invalid_value"),
])
def test_bad_input_gets_a_400_in_openai_shape(monkeypatch, path, text, param, code):
    _, _, c = make_router(monkeypatch, max_tokens_limit=512)  # the default 1 MiB body limit
    error = _error(c.post(path, **_raw(text)), 400)
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert len(error["message"]) < 400  # a huge value is not echoed back


def test_a_surrogate_pair_is_one_valid_character(client):
    r = client.post("/v1/completions", **_raw('{"prompt": "smile \\ud83d\\ude00", "max_tokens": 5}'))
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "smile \U0001F600"


def test_a_chunked_body_over_the_limit_is_413_without_reading_it_all(client):
    sent = []

    def body():
        for _ in range(1000):  # 1 MB in 1 kB pieces, no Content-Length
            sent.append(1)
            yield b" " * 1024

    error = _error(client.post("/v1/completions", content=body(), headers={"content-type": "application/json"}), 413)
    assert error["code"] == "request_too_large"
    big = client.post("/v1/completions", **_raw(json.dumps({"prompt": "x" * 5000})))
    assert _error(big, 413)["code"] == "request_too_large"  # with Content-Length: refused before reading
    small = client.post("/v1/completions", content=iter([b'{"prompt": ', b'"chunked"}']),
                        headers={"content-type": "application/json"})
    assert small.status_code == 200 and small.json()["choices"][0]["text"] == "chunked"


@pytest.mark.parametrize("method,path,status,code", [
    ("GET", "/v1/nothing", 404, "not_found"),
    ("POST", "/v1/embeddings", 404, "not_found"),
    ("GET", "/v1/chat/completions", 405, "method_not_allowed"),
    ("DELETE", "/v1/models", 405, "method_not_allowed"),
    ("POST", "/-/stats", 405, "method_not_allowed"),
])
def test_unknown_routes_and_methods_answer_in_openai_shape(client, method, path, status, code):
    error = _error(client.request(method, path), status)
    assert error["code"] == code and path in error["message"]


@pytest.mark.parametrize("query,param", [
    ("since=nan", "since"), ("since=NaN", "since"), ("since=abc", "since"), ("since=inf", "since"),
    ("since=-inf", "since"), ("since=1e400", "since"), ("since=-5", "since"), ("since=" + "9" * 5000, "since"),
    ("local=maybe", "local"),
])
def test_bad_stats_parameters_are_400(client, query, param):
    error = _error(client.get("/-/stats?" + query), 400)
    assert error["param"] == param


def test_good_stats_parameters_still_work(client):
    assert client.get("/-/stats?since=0").json()["since"] == 0.0
    assert client.get("/-/stats?since=1795459100.5&local=true").status_code == 200
    assert client.get("/-/stats").json()["since"] is None


@pytest.mark.parametrize("over,asked,status,tokens", [
    ("clamp", 3, 200, 3), ("clamp", 50, 200, 6), ("clamp", None, 200, 6),
    ("reject", 6, 200, 6), ("reject", 7, 400, None), ("reject", None, 200, 6),
])
def test_generation_max_tokens_is_a_cap_clamped_or_rejected(monkeypatch, over, asked, status, tokens):
    _, _, c = make_router(monkeypatch, variants=[VariantArgs(name="echo", engine="echo", max_tokens=6,
                                                             max_tokens_over=over)])
    body = {"prompt": " ".join(["w"] * 20)}
    if asked is not None:
        body["max_tokens"] = asked
    r = c.post("/v1/completions", json=body)
    if status == 400:
        error = _error(r, 400)
        assert error["param"] == "max_tokens" and "6" in error["message"]
    else:
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == tokens  # echo: min(words, max)


class _TooLong:
    def generate(self, req):
        raise ContextLengthExceeded(700, 512)

    def stream(self, req):
        raise ContextLengthExceeded(700, 512)
        yield  # pragma: no cover


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_over_the_context_is_400_context_length_exceeded(monkeypatch, stream):
    router, servers, c = make_router(monkeypatch)
    servers["echo"].engine = _TooLong()
    error = _error(c.post("/v1/completions", json={"prompt": "long", "stream": stream}), 400)
    assert error["code"] == "context_length_exceeded" and "512" in error["message"]
    # The caller's error: not counted against the variant (the rollout gates read errors).
    assert c.get("/-/stats").json()["variants"]["echo"]["total"]["errors"] == 0


def test_context_length_exceeded_survives_pickling():
    import pickle

    e = pickle.loads(pickle.dumps(ContextLengthExceeded(700, 512)))
    assert (e.prompt_tokens, e.max_context) == (700, 512) and "700" in str(e)


def test_the_transformers_engine_knows_its_context(tmp_path):
    from anneal.modeling.tiny import LlamaShape, build_llama, save_pretrained
    from anneal.modeling.tokenizer import builtin_corpus, train_tokenizer
    from anneal.serve.engines import TransformersEngine

    tokenizer = train_tokenizer(builtin_corpus(5), vocab_size=300)
    shape = LlamaShape(hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate_size=32, max_position_embeddings=40)
    path = save_pretrained(build_llama(shape, tokenizer, seed=0), tokenizer, tmp_path / "m")
    engine = TransformersEngine(str(path), cache_dir=str(tmp_path / "cache"), device="cpu")
    assert engine.max_context == 40
    with pytest.raises(ContextLengthExceeded) as e:
        engine.generate(GenerateRequest(prompt="Ana has 3 apples and buys 4 more. " * 10, max_tokens=4))
    assert e.value.max_context == 40 and e.value.prompt_tokens >= 40
    prompt = "Ana has 3 apples."
    used = len(engine.tokenizer(prompt)["input_ids"])
    out = engine.generate(GenerateRequest(prompt=prompt, max_tokens=100, ignore_eos=True))
    # The answer stops where the context ends, as a length stop.
    assert (out.completion_tokens, out.finish_reason) == (40 - used, "length")
    cancel = __import__("threading").Event()
    cancel.set()
    stopped = engine.generate(GenerateRequest(prompt=prompt, max_tokens=20, ignore_eos=True, cancel=cancel))
    assert stopped.completion_tokens == 0  # a cancelled request generates nothing more


def test_a_timed_out_request_frees_the_engine_slot(monkeypatch):
    _, servers, c = make_router(monkeypatch, request_timeout_s=0.2, variants=[
        VariantArgs(name="echo", engine="echo", engine_options={"delay_ms": 5000})])
    start = time.monotonic()
    error = _error(c.post("/v1/completions", json={"prompt": "slow"}), 504)
    assert error["code"] == "timeout"
    # The replica has one engine thread: it is free again long before the 5 s the engine would take.
    assert servers["echo"]._executor.submit(lambda: "free").result(timeout=2) == "free"
    assert time.monotonic() - start < 3


# ------------------------------------------------------------------------------ auth


@pytest.fixture
def secured(monkeypatch):
    monkeypatch.setenv("T_API_KEYS", KEYS)
    monkeypatch.setenv("T_ADMIN_KEY", ADMIN)
    router, _, c = make_router(monkeypatch, api_keys_env=["T_API_KEYS"], admin_key_env="T_ADMIN_KEY")
    return c


def bearer(key):
    return {"authorization": f"Bearer {key}"} if key else {}


CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("key,headers,body,status,code,param", [
    (None, {}, CHAT, 401, "invalid_api_key", None),
    ("wrong", {}, CHAT, 401, "invalid_api_key", None),
    ("key-one ", {}, CHAT, 200, None, None),  # header whitespace is not part of the key
    ("key-two", {}, CHAT, 200, None, None),
    (ADMIN, {}, CHAT, 200, None, None),  # the admin key opens everything
    ("key-on", {}, CHAT, 401, "invalid_api_key", None),  # a prefix of a key is no key
    ("ключ", {}, CHAT, 401, "invalid_api_key", None),  # non-ASCII: refused, not a 500
    ("key-one", {"x-anneal-variant": "other"}, CHAT, 403, "admin_key_required", "x-anneal-variant"),
    ("key-one", {}, {**CHAT, "model": "other"}, 403, "admin_key_required", "model"),
    (ADMIN, {"x-anneal-variant": "other"}, CHAT, 200, None, None),
    (ADMIN, {}, {**CHAT, "model": "other"}, 200, None, None),
    ("key-one", {}, {**CHAT, "model": SERVICE}, 200, None, None),
])
def test_api_keys_guard_the_openai_endpoints(secured, key, headers, body, status, code, param):
    h = {**({"authorization": f"Bearer  {key}".encode()} if key else {}), **headers}  # raw bytes: any key
    r = secured.post("/v1/chat/completions", json=body, headers=h)
    if status == 200:
        assert r.status_code == 200, r.text
        return
    error = _error(r, status)
    assert (error["code"], error["param"], error["type"]) == (code, param, "invalid_request_error")
    assert ADMIN not in error["message"] and "key-one" not in error["message"]
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("scheme", ["Basic key-one", "key-one", "Bearer", "Bearer  "])
def test_only_a_bearer_key_counts(secured, scheme):
    assert _error(secured.post("/v1/chat/completions", json=CHAT, headers={"authorization": scheme}), 401)


@pytest.mark.parametrize("path", ["/-/stats", "/-/metrics"])
@pytest.mark.parametrize("key,status", [(None, 401), ("key-one", 403), ("nope", 401), (ADMIN, 200)])
def test_operational_endpoints_need_the_admin_key(secured, path, key, status):
    r = secured.get(path, headers=bearer(key))
    if status == 200:
        assert r.status_code == 200
    else:
        assert _error(r, status)["code"] == ("admin_key_required" if status == 403 else "invalid_api_key")


def test_models_lists_the_variants_to_the_admin_only(secured):
    assert _error(secured.get("/v1/models"), 401)
    user = [m["id"] for m in secured.get("/v1/models", headers=bearer("key-two")).json()["data"]]
    admin = [m["id"] for m in secured.get("/v1/models", headers=bearer(ADMIN)).json()["data"]]
    assert user == [SERVICE] and admin == [SERVICE, "echo", "other"]
    assert secured.get("/healthz").status_code == 200  # liveness probes carry no key


def test_an_admin_key_alone_leaves_the_openai_endpoints_open(monkeypatch):
    monkeypatch.setenv("T_ADMIN_KEY", ADMIN)
    _, _, c = make_router(monkeypatch, admin_key_env="T_ADMIN_KEY")
    # The OpenAI SDK always sends some key ("unused" in the docs' example).
    assert c.post("/v1/chat/completions", json=CHAT, headers=bearer("unused")).status_code == 200
    assert _error(c.get("/-/stats", headers=bearer("unused")), 401)
    assert _error(c.post("/v1/chat/completions", json=CHAT, headers={"x-anneal-variant": "other"}), 401)


def test_a_router_whose_key_variable_is_unset_refuses_to_start(monkeypatch):
    monkeypatch.delenv("T_MISSING", raising=False)
    with pytest.raises(auth.AuthConfigError, match="T_MISSING"):
        make_router(monkeypatch, api_keys_env=["T_MISSING"])


def test_rollout_clients_send_the_admin_key_and_probes_stay_pinned(secured):
    """The controllers' stats reader and probe sender, against the secured router."""
    from anneal.rollout.probes import LabelledQuestion, ProbeSender
    from anneal.serve.client import ServeClientError, stats

    with pytest.raises(ServeClientError) as e:
        stats("http://testserver", http=secured)
    assert e.value.status == 401
    sender = ProbeSender("http://testserver", [LabelledQuestion([{"role": "user", "content": "1 + 1?"}], "2")],
                         api_key=ADMIN)
    sender._http = secured
    assert sender.send("other", 3).total == 3
    doc = stats("http://testserver", http=secured, api_key=ADMIN)
    assert doc["pinned"]["other"]["requests"] == 3 and doc["variants"]["other"]["total"]["requests"] == 0
    bad = ProbeSender("http://testserver", [LabelledQuestion([{"role": "user", "content": "x"}], "2")],
                      api_key="key-one")
    bad._http = secured
    bad.send("other", 2)
    assert stats("http://testserver", http=secured, api_key=ADMIN)["pinned"]["other"]["requests"] == 3


def test_keys_are_compared_as_digests_against_every_key():
    keys = auth.Keys.of(["a", "b"], "adm")
    assert all(len(k) == 32 for k in keys.api) and len(keys.admin) == 32  # equal lengths: no length leak
    assert auth.access(keys, {"authorization": "Bearer b"}) == auth.USER
    assert auth.access(keys, {"authorization": "bearer adm"}) == auth.ADMIN
    assert auth.access(keys, {}) == auth.NONE
    assert auth.access(auth.Keys(), {}) == auth.ADMIN  # auth off
    assert auth.split_keys(" a,b\nc ,, ") == ["a", "b", "c"]


# ------------------------------------------------------------- where keys come from


def test_the_serve_config_names_the_key_variables_never_the_keys(monkeypatch):
    from anneal.api.resources import parse_spec
    from anneal.serve.app import args_from_spec

    spec = parse_spec("ModelService", {
        "variants": [{"name": "a", "model": {"uri": "/m"}}],
        "auth": {"apiKeysSecret": "svc-keys", "adminKeySecret": {"name": "svc-admin", "key": "token"}}})
    args = args_from_spec(SERVICE, spec, {}, cache_dir="/c")
    # Embedded defaults: `anneal run` reads these from its own environment.
    assert (args.api_keys_env, args.admin_key_env) == (["ANNEAL_API_KEYS"], "ANNEAL_ADMIN_KEY")
    custom = parse_spec("ModelService", {
        "variants": [{"name": "a", "model": {"uri": "/m"}}],
        "auth": {"apiKeysEnv": "MY_KEYS", "adminKeyEnv": "MY_ADMIN"}})
    args = args_from_spec(SERVICE, custom, {}, cache_dir="/c")
    assert (args.api_keys_env, args.admin_key_env) == (["MY_KEYS"], "MY_ADMIN")
    monkeypatch.setenv("MY_KEYS", "k-123")
    monkeypatch.setenv("MY_ADMIN", "a-456")
    text = json.dumps(build_serve_config(args))
    assert "MY_KEYS" in text and "k-123" not in text and "a-456" not in text


@pytest.mark.parametrize("auth_spec,message", [
    ({"apiKeysSecret": "keys"}, "adminKeySecret"),
    ({"adminKeySecret": {"name": "Bad_Name", "key": "k"}}, "adminKeySecret.name"),
    ({"adminKeyEnv": "1BAD"}, "adminKeyEnv"),
])
def test_auth_spec_errors_name_the_field(auth_spec, message):
    from anneal.api.resources import ManifestError, parse_spec

    with pytest.raises((ManifestError, ValueError)) as e:
        parse_spec("ModelService", {"variants": [{"name": "a", "model": {"uri": "/m"}}], "auth": auth_spec})
    assert message in str(e.value)


def test_anneal_run_checks_its_key_variables_first(monkeypatch):
    from anneal.local.service import ServiceError, auth_keys

    names = {"api_keys_env": ["T_K"], "admin_key_env": "T_A"}
    with pytest.raises(ServiceError, match="spec.auth: .*T_K"):
        auth_keys(names, {"T_A": "adm"})
    assert auth_keys(names, {"T_K": "k1,k2", "T_A": " adm "}) == "adm"
    assert auth_keys({}, {}) is None


class _Op:
    def __init__(self, secrets):
        self.secrets = secrets

    def read_secret(self, namespace, name):
        data = self.secrets.get(name)
        return None if data is None else {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}


def test_the_operator_passes_keys_by_secret_reference(monkeypatch):
    from anneal.api.resources import parse_spec
    from anneal.runtime import kuberay
    from anneal_operator.service import AuthWaiting, service_auth

    spec = parse_spec("ModelService", {
        "variants": [{"name": "a", "model": {"uri": "/m"}}],
        "auth": {"apiKeysSecret": "svc-keys", "adminKeySecret": {"name": "svc-admin", "key": "token"}}})
    op = _Op({"svc-keys": {"bob": "k-bob", "alice": "k-alice"}, "svc-admin": {"token": "adm-1"}})
    env, values, admin = service_auth(op, spec, "team")
    assert env.api_keys_env == ("ANNEAL_SERVE_API_KEY_0", "ANNEAL_SERVE_API_KEY_1")
    assert env.admin_key_env == "ANNEAL_SERVE_ADMIN_KEY" and admin == "adm-1"
    assert values == {"ANNEAL_SERVE_API_KEY_0": "k-alice", "ANNEAL_SERVE_API_KEY_1": "k-bob",
                      "ANNEAL_SERVE_ADMIN_KEY": "adm-1"}
    # A RayService carries references only: the kubelet reads the values from the Secrets.
    cluster = kuberay.ClusterOptions(image="img", ray_version="2.60.0", secret_env=env.refs)
    manifest = json.dumps(kuberay.build_rayservice("svc-serve", "team", [{"name": SERVICE}], cluster))
    assert "k-alice" not in manifest and "adm-1" not in manifest
    assert '{"name": "ANNEAL_SERVE_ADMIN_KEY", "valueFrom": {"secretKeyRef": {"name": "svc-admin", "key": "token"}}}' \
        in manifest
    # The router reading those variables accepts exactly those keys.
    keys = auth.load_keys(env.api_keys_env, env.admin_key_env, values)
    assert auth.access(keys, {"authorization": "Bearer k-bob"}) == auth.USER
    with pytest.raises(AuthWaiting, match="svc-keys"):
        service_auth(_Op({"svc-admin": {"token": "adm-1"}}), spec, "team")
    with pytest.raises(AuthWaiting, match="no key token"):
        service_auth(_Op({"svc-keys": {"a": "b"}, "svc-admin": {}}), spec, "team")


class _Endless:
    """Streams a piece every 10 ms until its request is cancelled."""

    def stream(self, req):
        while not req.cancelled():
            time.sleep(0.01)
            yield types.SimpleNamespace(text="t ", finish_reason=None)


def test_a_client_leaving_a_stream_cancels_the_variant_call(monkeypatch):
    router, servers, _ = make_router(monkeypatch)
    servers["echo"].engine = _Endless()
    streams = []
    handle = router.handles["echo"]
    make = handle.stream.remote
    handle.stream = types.SimpleNamespace(remote=lambda req: streams.append(make(req)) or streams[-1])
    cancelled = []
    monkeypatch.setattr(_Stream, "cancel", lambda self: cancelled.append(self))
    body = json.dumps({"prompt": "x", "stream": True}).encode()

    async def client_leaves_after_two_chunks():
        chunks, left = [], asyncio.Event()
        sent_body = False

        async def receive():
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await left.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.body" and message.get("body"):
                chunks.append(message["body"])
                if len(chunks) == 2:
                    left.set()

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
                 "root_path": "", "headers": [(b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 1), "server": ("testserver", 80)}
        await asyncio.wait_for(api(scope, receive, send), timeout=10)
        return chunks

    chunks = asyncio.run(client_leaves_after_two_chunks())
    assert len(chunks) >= 2 and streams and cancelled == streams  # the router gave the call up


# ------------------------------------------------------------------- the operator's pass


class _CustomObjects:
    """The custom-objects calls of a ModelService pass: no RayService yet; what is created; status patches."""

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


SECURED_SPEC = {"variants": [{"name": "a", "model": {"uri": "file:///m/a"}}],
                "auth": {"apiKeysSecret": "svc-keys", "adminKeySecret": {"name": "svc-admin", "key": "token"}}}


def _service_pass(monkeypatch, secrets, ray_address=None, seen=None):
    from kubernetes import client

    from anneal_operator import service
    from anneal_operator.context import OperatorContext
    from anneal_operator.settings import OperatorSettings

    encoded = {name: {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
               for name, data in secrets.items()}
    body = {"metadata": {"namespace": "team", "name": "svc", "uid": "u1", "generation": 1, "resourceVersion": "1"},
            "spec": json.loads(json.dumps(SECURED_SPEC)), "status": {}}
    if seen is not None:
        seen.append(body)
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


def test_an_operator_rayservice_reads_the_keys_from_the_secrets_itself(monkeypatch):
    _, created, _ = _service_pass(monkeypatch, {"svc-keys": {"alice": "k-alice", "bob": "k-bob"},
                                                "svc-admin": {"token": "adm-1"}})
    (rayservice,) = created
    text = json.dumps(rayservice)
    assert "k-alice" not in text and "k-bob" not in text and "adm-1" not in text
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in head["env"] if "valueFrom" in e}
    assert refs["ANNEAL_SERVE_API_KEY_1"] == {"name": "svc-keys", "key": "bob"}
    assert refs["ANNEAL_SERVE_ADMIN_KEY"] == {"name": "svc-admin", "key": "token"}
    import yaml

    (app,) = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    assert app["args"]["api_keys_env"] == ["ANNEAL_SERVE_API_KEY_0", "ANNEAL_SERVE_API_KEY_1"]
    assert app["args"]["admin_key_env"] == "ANNEAL_SERVE_ADMIN_KEY"


def test_an_operator_app_on_a_shared_cluster_gets_the_keys_in_its_runtime_env(monkeypatch):
    _, created, deployed = _service_pass(monkeypatch, {"svc-keys": {"alice": "k-alice"},
                                                       "svc-admin": {"token": "adm-1"}}, "http://ray-head:8265")
    (entry,) = deployed
    assert not created
    assert entry["runtime_env"] == {"env_vars": {"ANNEAL_SERVE_API_KEY_0": "k-alice", "ANNEAL_SERVE_ADMIN_KEY": "adm-1"}}
    assert "k-alice" not in json.dumps(entry["args"])


def test_an_operator_pass_waits_for_a_missing_key_secret(monkeypatch):
    import kopf

    seen = []
    with pytest.raises(kopf.TemporaryError, match="svc-admin"):
        _service_pass(monkeypatch, {"svc-keys": {"alice": "k-alice"}}, seen=seen)
    status = seen[0]["status"]
    assert "spec.auth: Secret svc-admin does not exist" in status["message"]
    assert any(c["reason"] == "WaitingForInput" for c in status["conditions"])
