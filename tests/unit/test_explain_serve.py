"""The router's debug header: an admin gets the answer's attention map; others get OpenAI-shaped refusals.

The router is the real `Router` and FastAPI app run by Starlette's test client, in front of real
`VariantServer`s: a tiny Llama on the transformers engine (saved here) and the echo engine
standing in for an engine without attention weights (vllm). Only Ray's transport is replaced by
direct calls (as in test_serve_hardening).
"""

from __future__ import annotations

import asyncio
import types

import pytest
from fastapi.testclient import TestClient

from anneal.serve.app import DEBUG_HEADER, AppArgs, Router, VariantArgs, VariantServer, _upstream_error, api
from anneal.serve.engines import AttentionNotSupported
from tests.unit.test_serve_hardening import Handle, _Response

SERVICE = "ns_explained"
USER_KEY, ADMIN_KEY = "user-key", "admin-key"
CHAT = {"messages": [{"role": "user", "content": "Tom has 3 apples and buys 12 more. How many?"}], "max_tokens": 6}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from anneal.modeling.tiny import LlamaShape, build_llama, save_pretrained
    from anneal.modeling.tokenizer import builtin_tokenizer

    root = tmp_path_factory.mktemp("explain-serve")
    tokenizer = builtin_tokenizer(root / "tok")
    model = build_llama(LlamaShape(hidden_size=32, layers=2, heads=4, kv_heads=2, intermediate_size=64), tokenizer)
    return save_pretrained(model, tokenizer, root / "model")


@pytest.fixture
def client(monkeypatch, model_dir):
    monkeypatch.setenv("T_KEYS", USER_KEY)
    monkeypatch.setenv("T_ADMIN", ADMIN_KEY)
    variants = [VariantArgs(name="tiny", engine="transformers", model_uri=str(model_dir), max_tokens=16),
                VariantArgs(name="echo", engine="echo")]
    args = AppArgs(service=SERVICE, variants=variants, weights={"tiny": 100, "echo": 0},
                   api_keys_env=["T_KEYS"], admin_key_env="T_ADMIN")
    handles = {}
    for v in args.variants:
        server = VariantServer(v.model_dump(mode="json"), "/tmp", None)
        server.reconfigure({"engine": v.engine, "model_uri": v.model_uri, "engine_options": {"num_threads": 1}})
        handle = Handle(server)
        handle.explain = types.SimpleNamespace(
            remote=lambda req, s=server: _Response(asyncio.ensure_future(s.explain(req))))
        handles[v.name] = handle
    router = object.__new__(Router)
    Router.__mro__[1].__init__(router, args=args.model_dump(mode="json"), variants=handles)
    from ray import serve

    monkeypatch.setattr(serve, "get_replica_context",
                        lambda: types.SimpleNamespace(servable_object=router, replica_tag="test"))
    c = TestClient(api)
    c.router = router
    return c


def _auth(key: str, **extra: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}", **extra}


def _error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_an_admin_gets_the_answer_and_its_attention_map(client):
    plain = client.post("/v1/chat/completions", json=CHAT, headers=_auth(ADMIN_KEY))
    assert plain.status_code == 200 and "anneal_debug" not in plain.json()
    r = client.post("/v1/chat/completions", json=CHAT, headers=_auth(ADMIN_KEY, **{DEBUG_HEADER: "attention"}))
    assert r.status_code == 200, r.text
    body = r.json()
    # The same greedy answer as without the header, and the map of exactly that answer.
    assert body["choices"][0]["message"]["content"] == plain.json()["choices"][0]["message"]["content"]
    attention = body["anneal_debug"]["attention"]
    assert attention["layers"] == [0, 1] and attention["skippedLayers"] == []
    assert 0.0 <= attention["numberAttention"] <= 1.0
    assert attention["answerTokens"] == body["usage"]["completion_tokens"]
    assert attention["promptTokens"] == body["usage"]["prompt_tokens"]
    assert attention["question"] == CHAT["messages"][0]["content"]
    page = attention["html"]
    assert page.startswith("<!doctype html>") and "Where the answer looked" in page and "data:image/png" in page
    assert r.headers["x-anneal-variant"] == "tiny"


def test_a_debug_request_is_not_counted_as_user_traffic(client):
    totals = client.router.metrics.totals
    assert client.post("/v1/chat/completions", json=CHAT, headers=_auth(USER_KEY)).status_code == 200
    assert totals["tiny"].requests == 1
    r = client.post("/v1/chat/completions", json=CHAT, headers=_auth(ADMIN_KEY, **{DEBUG_HEADER: "attention"}))
    assert r.status_code == 200 and totals["tiny"].requests == 1


@pytest.mark.parametrize("headers,status,code,param", [
    (_auth(USER_KEY, **{DEBUG_HEADER: "attention"}), 403, "admin_key_required", DEBUG_HEADER),
    ({DEBUG_HEADER: "attention"}, 401, "invalid_api_key", None),
    (_auth("wrong", **{DEBUG_HEADER: "attention"}), 401, "invalid_api_key", None),
    (_auth(ADMIN_KEY, **{DEBUG_HEADER: "gradients"}), 400, "invalid_value", DEBUG_HEADER),
    (_auth(ADMIN_KEY, **{DEBUG_HEADER: "attention", "x-anneal-variant": "echo"}), 400, "debug_not_supported",
     DEBUG_HEADER),
])
def test_the_debug_header_is_refused_in_openai_shape(client, headers, status, code, param):
    err = _error(client.post("/v1/chat/completions", json=CHAT, headers=headers), status)
    assert err["code"] == code and err["param"] == param
    if code == "debug_not_supported":
        assert "engine echo" in err["message"] and "transformers" in err["message"]


def test_a_streamed_debug_request_is_refused(client):
    err = _error(client.post("/v1/chat/completions", json={**CHAT, "stream": True},
                             headers=_auth(ADMIN_KEY, **{DEBUG_HEADER: "attention"})), 400)
    assert err["param"] == "stream" and "without stream" in err["message"]


def test_an_engine_without_attention_answers_400_through_ray():
    """A vllm variant's refusal crosses Ray as the exception itself (or wrapped): the router answers 400."""
    import pickle

    e = pickle.loads(pickle.dumps(AttentionNotSupported("small", "vllm")))
    err = _upstream_error("small", e)
    assert (err.status, err.code, err.param) == (400, "debug_not_supported", DEBUG_HEADER)
    assert "engine vllm" in err.message
    wrapped = types.SimpleNamespace(cause=e)
    assert _upstream_error("small", wrapped).status == 400
