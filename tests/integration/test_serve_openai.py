"""An `openai` variant in front of an OpenAI-compatible server Anneal did not start, over real HTTP.

The "existing server" is itself an Anneal ModelService (a tiny Llama on the transformers engine,
with API keys), deployed as its own Serve app: its router and model run in other processes and
speak the OpenAI API on `/upstream/v1`, as a vLLM, SGLang or TGI server would (vLLM is not
installed in this checkout). The service under test has a local transformers variant, an
`openai` variant pointing at that server, and an `openai` variant pointing at a port nothing
listens on; it is built from a ModelService spec the way `anneal run` builds it.
"""

import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.integration

UPSTREAM_KEY = "k-upstream-5d1e"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from ray import serve

    from anneal.api.resources import parse_spec
    from anneal.local.jobs import ray_session
    from anneal.local.service import backend_keys, resolve_model_uris, start_http
    from anneal.modeling.tiny import LlamaShape, build_llama, save_pretrained
    from anneal.modeling.tokenizer import builtin_corpus, train_tokenizer
    from anneal.serve.app import AppArgs, VariantArgs, args_from_spec, build_serve_config
    from anneal.serve.deploy import deploy_entries
    from anneal.settings import Settings

    root = tmp_path_factory.mktemp("openai-models")
    tokenizer = train_tokenizer(builtin_corpus(20), vocab_size=300)
    shape = LlamaShape(hidden_size=32, layers=2, heads=4, kv_heads=2, intermediate_size=64, max_position_embeddings=64)
    path = str(save_pretrained(build_llama(shape, tokenizer, seed=0), tokenizer, root / "tiny"))
    # The keys must be in the environment Ray starts with (its replicas inherit it), as with `anneal run`.
    saved = {k: os.environ.get(k) for k in ("T_UP_KEYS", "T_UP_ADMIN", "T_FRONT_KEY")}
    os.environ.update(T_UP_KEYS=UPSTREAM_KEY, T_UP_ADMIN="adm-upstream", T_FRONT_KEY=UPSTREAM_KEY)
    settings = Settings()
    settings.ray.num_cpus, settings.ray.address = 2, None
    session = ray_session(settings)
    session.__enter__()
    try:
        port = start_http("127.0.0.1", 0)
        base = f"http://127.0.0.1:{port}"
        light = {"num_cpus": 0.1}
        upstream = AppArgs(service="upstream", route_prefix="/upstream",
                           variants=[VariantArgs(name="tiny", model_uri=path, max_tokens=16, **light)],
                           weights={"tiny": 100}, api_keys_env=["T_UP_KEYS"], admin_key_env="T_UP_ADMIN",
                           router_num_cpus=0.1, cache_dir=str(root / "cache"))
        with socket_port() as dead:
            pass
        spec = parse_spec("ModelService", {
            "variants": [
                {"name": "local", "model": {"uri": path}, "weight": 40, "resources": {"cpusPerWorker": 0.1},
                 "generation": {"maxTokens": 4}},
                {"name": "ext", "engine": "openai", "weight": 40, "generation": {"maxTokens": 4},
                 "backend": {"url": f"{base}/upstream/v1", "model": "upstream", "apiKeyEnv": "T_FRONT_KEY",
                             "timeoutSeconds": 30}},
                {"name": "down", "engine": "openai", "weight": 20,
                 "backend": {"url": f"http://127.0.0.1:{dead}/v1", "model": "m", "timeoutSeconds": 5}},
            ],
            "routing": {"shadow": {"variant": "ext", "percent": 50}},
        })
        backend_keys(spec, os.environ)
        front = args_from_spec("front", spec, resolve_model_uris(spec, "default"), cache_dir=str(root / "cache"),
                               router_num_cpus=0.1, route_prefix="/front", seed=3)
        deploy_entries([build_serve_config(upstream), build_serve_config(front)], wait_s=600)
        with httpx.Client(base_url=base, timeout=60) as http:
            yield {"base": base, "http": http, "front": front}
        serve.shutdown()
    finally:
        session.__exit__(None, None, None)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class socket_port:
    """A loopback port nothing listens on (bound, then released)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.sock.close()


def test_a_weighted_split_over_a_local_and_an_external_variant_both_answer_and_both_count(served):
    http = served["http"]

    def call(i):
        r = http.post("/front/v1/chat/completions", json={
            "messages": [{"role": "user", "content": f"What is {i} + 3?"}], "max_tokens": 50})
        return r.status_code, r.headers.get("x-anneal-variant"), r.json()

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(call, range(60)))
    by_variant = Counter(v for _, v, _ in results)
    assert set(by_variant) == {"local", "ext", "down"} and by_variant["ext"] >= 12 and by_variant["local"] >= 12
    for status, variant, body in results:
        if variant == "down":  # connection refused: a 502 in OpenAI's shape, the variant's fault
            assert status == 502 and body["error"]["code"] == "upstream_unreachable", body
        else:
            assert status == 200, body
            assert body["usage"]["completion_tokens"] <= 4  # the front's cap reached the server behind it
    doc = http.get("/front/-/stats").json()
    v = doc["variants"]
    assert v["ext"]["total"]["requests"] == by_variant["ext"] and v["ext"]["total"]["errors"] == 0
    assert v["ext"]["total"]["promptTokens"] > 0  # the server's usage, counted for the external variant
    assert v["local"]["total"]["requests"] == by_variant["local"]
    assert v["down"]["total"]["errors"] == v["down"]["total"]["requests"] == by_variant["down"]
    assert v["down"]["total"]["errorRate"] == 1.0  # what an errorRate gate would see
    # Mirrored to the external variant (the shadow): answers compared, never returned.
    mirrored = by_variant["local"] + by_variant["down"]
    assert 0 < doc["shadow"]["ext"]["requests"] <= mirrored and doc["shadow"]["ext"]["errors"] == 0


def test_streaming_through_an_external_variant_and_its_4xx_stay_the_callers(served):
    http = served["http"]
    with http.stream("POST", "/front/v1/completions", json={
            "prompt": "1 + 1 =", "max_tokens": 3, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}, headers={"x-anneal-variant": "ext"}) as r:
        assert r.status_code == 200 and r.headers["x-anneal-variant"] == "ext"
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len([c for c in chunks if c["choices"] and c["choices"][0]["text"]]) >= 2  # piece by piece
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    # A prompt over the server's context: the server's 400, passed on as the caller's error.
    r = http.post("/front/v1/completions", json={"prompt": "seven apples " * 100},
                  headers={"x-anneal-variant": "ext"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded" and "64 tokens" in r.json()["error"]["message"]
    pinned = http.get("/front/-/stats").json()["pinned"]["ext"]
    assert pinned["errors"] == 0  # a caller's 4xx is never the variant's error
