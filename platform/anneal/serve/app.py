"""The Ray Serve application of a ModelService: a router ingress in front of one deployment per variant.

`build_app(AppArgs) -> Application` is used as is by the embedded runner (`serve.run`), and
`build_serve_config(args)` gives the same application as a Serve config entry (import path
`anneal.serve.app:app_builder` + args) for the Serve REST API and a KubeRay `RayService`'s
`serveConfigV2`. Weights change live through the router's `reconfigure` (see `apply_weights`).
"""

import asyncio
import dataclasses
import hmac
import json
import logging
import math
import os
import random
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException as StarletteHTTPException

from anneal.serve import auth, protocol
from anneal.serve.engines import (
    AttentionNotSupported,
    ContextLengthExceeded,
    GenerateRequest,
    GenerateResult,
    StreamPiece,
    UpstreamError,
)
from anneal.serve.metrics import ServiceMetrics, merge_stats
from anneal.serve.shadow import judge_prompt, judge_verdict, make_pair
from anneal.serve.routing import (
    REASON_OVERRIDE,
    DynamicPolicy,
    LargeShareTracker,
    ReasoningPolicy,
    RouteDecision,
    RoutingError,
    RoutingPolicy,
    apply_reasoning,
    cap_max_tokens,
    decide,
    line_order,
    normalise_weights,
)

log = logging.getLogger("anneal.serve")
decision_log = logging.getLogger("anneal.serve.decisions")

ROUTER_DEPLOYMENT = "router"
IMPORT_PATH = "anneal.serve.app:app_builder"


def variant_deployment_name(variant: str) -> str:
    return f"variant-{variant}"


# ------------------------------------------------------------------------------ args


class VariantArgs(BaseModel):
    """One variant deployment: model, engine, scale and default generation settings."""

    model_config = ConfigDict(extra="forbid")

    name: str
    model_uri: str | None = Field(default=None, description="Resolved model URI (path, models:/, hf://, s3://).")
    engine: Literal["transformers", "vllm", "openai", "echo", "faulty", "judge-rule"] = "transformers"
    engine_options: dict[str, Any] = Field(default_factory=dict)
    replicas: int = 1
    autoscaling: dict[str, Any] | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory_bytes: int | None = None
    accelerator_type: str | None = None
    max_tokens: int = 128
    max_tokens_over: Literal["clamp", "reject"] = Field(
        default="clamp", description="A request asking for more than max_tokens: clamped to it, or a 400.")
    temperature: float = 0.0
    top_p: float = 1.0
    max_ongoing_requests: int = 8
    max_queued_requests: int = 512
    reasoning_toggle: bool | None = Field(
        default=None, description="The reasoning toggle's system message goes to this variant's model; None: as the "
        "model declares (`anneal.modeling.chat.declares_reasoning_toggle`; an openai variant: no).")
    python_executable: str | None = Field(
        default=None, description="The Python the variant's replicas run in (Ray's runtime_env py_executable): "
        "a vllm variant's serving environment (.venv-vllm); None: Ray's own.")


#: Requests a vllm replica takes at once when `maxNumSeqs` is not set: vLLM batches them continuously.
VLLM_MAX_ONGOING_REQUESTS = 64


class AppArgs(BaseModel):
    """Everything the Serve app of one ModelService needs; JSON-serialisable (Serve config `args`)."""

    model_config = ConfigDict(extra="forbid")

    service: str = Field(description="Serve application name (namespace-name).")
    route_prefix: str = "/"
    variants: list[VariantArgs]
    weights: dict[str, int]
    line: list[str] = Field(default_factory=list, description="Order of variants on the weight line.")
    sticky_header: str | None = None
    override_header: str = "x-anneal-variant"
    shadow_variant: str | None = None
    shadow_percent: float = 0.0
    shadow_compare: Literal["exact", "answer"] = "exact"
    shadow_answer_pattern: str | None = None
    shadow_record_pairs: int = 20
    judge_variant: str | None = None
    judge_template: str | None = None
    judge_share: float = 0.25
    judge_max_per_minute: int = 60
    reasoning: dict[str, Any] = Field(default_factory=dict)
    dynamic: dict[str, Any] | None = None
    router_replicas: int = 1
    router_num_cpus: float = 0.5
    router_max_ongoing_requests: int = 512
    request_timeout_s: float = 120.0
    max_request_bytes: int = 1 << 20
    max_tokens_limit: int = 4096
    max_shadow_in_flight: int = 64
    decision_log_rate: float = 0.01
    decision_flush_s: float = 30.0
    tracking_uri: str | None = None
    experiment: str | None = None
    cache_dir: str = "~/.anneal/cache"
    seed: int | None = None
    api_keys_env: list[str] = Field(
        default_factory=list, description="Names of environment variables of the router's process whose keys "
        "(comma-separated) are accepted as `Authorization: Bearer` on /v1/*; empty: /v1/* is open.")
    admin_key_env: str | None = Field(
        default=None, description="Name of the environment variable holding the admin key (/-/stats, /-/metrics, "
        "pinning a variant); None with no api_keys_env: authentication is off.")

    def variant(self, name: str) -> VariantArgs:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)


def args_from_spec(
    service: str,
    spec: Any,
    model_uris: Mapping[str, str],
    *,
    cache_dir: str,
    tracking_uri: str | None = None,
    cpu_scale: float = 1.0,
    key_from_secrets: bool = False,
    vllm_python: str | None = None,
    **overrides: Any,
) -> AppArgs:
    """The app args of a parsed `ModelServiceSpec`.

    Args:
        service: application name (deterministic: `anneal.control.service.app_name`, `<namespace>_<name>`).
        spec: the parsed ModelServiceSpec.
        model_uris: variant name → resolved model URI (fromResource already resolved).
        cache_dir: model download cache on the serving nodes.
        tracking_uri: MLflow tracking URI (for `models:/` and the routing decision log).
        cpu_scale: factor on every CPU request, so a laptop can hold a spec sized for a cluster.
        key_from_secrets: the operator's RayService: an openai variant's `backend.apiKeySecret` is in
            the variable `backend_key_var(variant)` (`backend_secret_refs`); else (`anneal run`)
            `backend.apiKeyEnv` when given.
        vllm_python: the Python a vllm variant's replicas run in (`anneal run`: the serving environment
            `.venv-vllm`); None: Ray's own (an image with vllm installed).
        overrides: any other `AppArgs` field.
    """
    variants = []
    for v in spec.variants:
        uri = model_uris.get(v.name) or v.served_model()
        if not uri:
            raise ValueError(f"variants.{v.name}.model: no resolved model URI for {v.model.describe()}")
        r = v.resources
        extra: dict[str, Any] = {}
        if v.engine == "openai":
            b = v.backend
            extra = {"engine_options": {"url": b.url, "model": b.model, "timeout_s": b.timeout_seconds,
                                        "max_concurrency": b.max_concurrency,
                                        "api_key_env": backend_key_env(v, from_secret=key_from_secrets)},
                     # I/O only: a replica holds as many requests as it may send to the server.
                     "max_ongoing_requests": b.max_concurrency}
        elif v.engine == "vllm":
            options = v.engine_options.engine_kwargs() if v.engine_options else {}
            # One engine batches every request it holds: the replica takes as many as vLLM decodes at once.
            extra = {"engine_options": options, "python_executable": vllm_python,
                     "max_ongoing_requests": options.get("max_num_seqs") or VLLM_MAX_ONGOING_REQUESTS}
        variants.append(VariantArgs(
            name=v.name,
            model_uri=uri,
            engine=v.engine,
            **extra,
            replicas=v.replicas if v.replicas is not None else 1,
            autoscaling=(
                {"min_replicas": v.autoscaling.min_replicas, "max_replicas": v.autoscaling.max_replicas,
                 "target_ongoing_requests": v.autoscaling.target_ongoing_requests}
                if v.autoscaling else None
            ),
            num_cpus=round(r.cpus_per_worker * cpu_scale, 4),
            num_gpus=r.gpus_per_worker,
            memory_bytes=_memory(r.memory),
            accelerator_type=r.accelerator_type,
            max_tokens=v.generation.max_tokens,
            max_tokens_over=v.generation.max_tokens_over,
            temperature=v.generation.temperature,
            top_p=v.generation.top_p,
            reasoning_toggle=v.reasoning_toggle,
        ))
    routing = spec.routing
    pair = (spec.rollout.stable, spec.rollout.candidate) if spec.rollout else None
    fields: dict[str, Any] = dict(
        service=service,
        variants=variants,
        weights=spec.weights(),
        line=list(line_order([v.name for v in spec.variants], pair)),
        sticky_header=routing.sticky.header.lower() if routing.sticky else None,
        override_header=routing.override_header.lower(),
        shadow_variant=routing.shadow.variant if routing.shadow else None,
        shadow_percent=routing.shadow.percent if routing.shadow else 0.0,
        shadow_compare=routing.shadow.compare if routing.shadow else "exact",
        shadow_answer_pattern=routing.shadow.answer_pattern if routing.shadow else None,
        shadow_record_pairs=routing.shadow.record_pairs if routing.shadow else 20,
        **_judge_args(routing.shadow.judge if routing.shadow else None),
        reasoning=routing.reasoning.model_dump(),
        dynamic=routing.dynamic.model_dump() if routing.policy == "dynamic" and routing.dynamic else None,
        router_num_cpus=round(0.5 * cpu_scale, 4),
        tracking_uri=tracking_uri,
        experiment=spec.mlflow.experiment if spec.mlflow else None,
        cache_dir=cache_dir,
        **auth_env(spec),
    )
    fields.update(overrides)
    return AppArgs(**fields)


#: Where `anneal run` reads the keys when the spec names only Secrets (it has none to read).
DEFAULT_API_KEYS_ENV = "ANNEAL_API_KEYS"
DEFAULT_ADMIN_KEY_ENV = "ANNEAL_ADMIN_KEY"


def auth_env(spec: Any) -> dict[str, Any]:
    """`api_keys_env` / `admin_key_env` of a spec's `auth` as `anneal run` reads them: the variables it
    names (`apiKeysEnv`, `adminKeyEnv`), else `ANNEAL_API_KEYS` / `ANNEAL_ADMIN_KEY` for a key given
    as a Secret. The operator passes its own names (`anneal_operator.service.auth_secret_env`)."""
    a = getattr(spec, "auth", None)
    if a is None:
        return {}
    api = a.api_keys_env or (DEFAULT_API_KEYS_ENV if a.api_keys_secret else None)
    return {"api_keys_env": [api] if api else [],
            "admin_key_env": a.admin_key_env or (DEFAULT_ADMIN_KEY_ENV if a.admin_key_secret else None)}


#: The variable an openai variant's backend key is in when it comes from a Secret (the operator sets
#: it with `valueFrom.secretKeyRef`; `anneal run` reads it when the spec names no `apiKeyEnv`).
BACKEND_KEY_VAR = "ANNEAL_BACKEND_KEY_{}"


def backend_key_var(variant: str) -> str:
    """`ANNEAL_BACKEND_KEY_<VARIANT>`: the variant's name upper-cased, `-` as `_`."""
    return BACKEND_KEY_VAR.format(variant.upper().replace("-", "_"))


def backend_key_env(v: Any, *, from_secret: bool = False) -> str | None:
    """The variable an openai variant's replica reads its backend's API key from (None: no key).

    Args:
        v: the spec's `Variant`.
        from_secret: the operator passes `apiKeySecret` in `backend_key_var` (it wins over `apiKeyEnv`).
    """
    b = v.backend
    if b is None:
        return None
    if b.api_key_secret is not None and (from_secret or not b.api_key_env):
        return backend_key_var(v.name)
    return b.api_key_env


def backend_secret_refs(spec: Any) -> tuple:
    """The `secretKeyRef` variables of every openai variant's `backend.apiKeySecret` (pure): the
    Ray containers get the key from the Secret, and no manifest holds its value."""
    from anneal.runtime.secrets import SecretRef

    return tuple(SecretRef(backend_key_var(v.name), v.backend.api_key_secret.name, v.backend.api_key_secret.key)
                 for v in spec.variants if v.backend is not None and v.backend.api_key_secret is not None)


def _judge_args(judge: Any) -> dict[str, Any]:
    if judge is None:
        return {}
    return {"judge_variant": judge.variant, "judge_template": judge.template, "judge_share": judge.share,
            "judge_max_per_minute": judge.max_per_minute}


def _memory(quantity: str | None) -> int | None:
    if not quantity:
        return None
    from anneal.api.common import parse_quantity

    return int(parse_quantity(quantity))


def policy_from_args(args: AppArgs, weights: Mapping[str, int] | None = None,
                     overrides: Mapping[str, Any] | None = None) -> RoutingPolicy:
    """The pure routing policy of the app args (with live weights and routing overrides)."""
    o = dict(overrides or {})
    shadow = o.get("shadow", {"variant": args.shadow_variant, "percent": args.shadow_percent}) or {}
    dynamic = o.get("dynamic", args.dynamic)
    reasoning = {**args.reasoning, **(o.get("reasoning") or {})}
    return RoutingPolicy(
        weights=dict(weights if weights is not None else args.weights),
        order=tuple(args.line or sorted(args.weights)),
        sticky_header=o.get("stickyHeader", args.sticky_header),
        override_header=args.override_header,
        shadow_variant=shadow.get("variant"),
        shadow_percent=float(shadow.get("percent") or 0.0),
        reasoning=ReasoningPolicy(**{k: v for k, v in reasoning.items() if v is not None}),
        dynamic=DynamicPolicy(**dynamic) if dynamic else None,
    )


# -------------------------------------------------------------------------- variant


def _free_accelerator_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # no torch / no CUDA: nothing to free
        pass


# What a variant serves, kept out of the app's `args`: Serve keys every deployment's code version
# on the app's import path and args, so a model URI in the args would restart the router and every
# other variant whenever one variant's model changes. In the variant deployment's `user_config`,
# a model change is an update of that deployment alone (`VariantServer.reconfigure`).
MODEL_FIELDS = ("model_uri", "engine", "engine_options")


def variant_user_config(v: VariantArgs) -> dict[str, Any]:
    """The live part of a variant deployment: which model, through which engine."""
    return {"model_uri": v.model_uri, "engine": v.engine, "engine_options": dict(v.engine_options)}


@dataclasses.dataclass
class VariantRequest(GenerateRequest):
    """What the router sends a variant: the request without any reasoning-toggle system message, and the
    toggle's system prompt for the mode it resolved, which the variant puts first only if its model takes
    the toggle (`VariantServer.takes_toggle`). The engine gets a plain `GenerateRequest`."""

    toggle: str | None = None


def engine_takes_toggle(engine_name: str, engine: Any, setting: bool | None) -> bool:
    """Whether a variant's model gets the reasoning toggle's system message: `reasoningToggle`, else
    what the loaded model declares (config.json `anneal_reasoning_toggle`, or Anneal's own chat format);
    an openai variant's model is elsewhere and declares nothing: no."""
    from anneal.modeling.chat import declares_reasoning_toggle, resolve_reasoning_toggle

    if setting is not None:
        return bool(setting)
    if engine_name == "openai":
        return False
    config = getattr(getattr(engine, "model", None), "config", None)
    if config is None:  # vllm: the Hugging Face config it loaded
        config = getattr(engine, "hf_config", None)
    template = getattr(getattr(engine, "tokenizer", None), "chat_template", None)
    return resolve_reasoning_toggle(None, declares_reasoning_toggle(config, template))


def _shutdown(engine: Any) -> None:
    stop = getattr(engine, "shutdown", None)
    if callable(stop):
        try:
            stop()
        except Exception as e:  # the new engine serves already; an old one that fails to stop is only logged
            log.warning("could not shut the replaced engine down: %s", e)


class VariantServer:
    """One variant's model, served by one Serve deployment (replicas and resources from the spec).

    The model arrives through `reconfigure` (the deployment's `user_config`, see `MODEL_FIELDS`),
    which Serve calls before the replica takes traffic and again, in place, when only this
    variant's model changes.
    """

    def __init__(self, variant: dict[str, Any], cache_dir: str, tracking_uri: str | None):
        self.args = VariantArgs(**variant)
        self.cache_dir = os.path.expanduser(cache_dir)
        self.tracking_uri = tracking_uri
        self.engine: Any = None
        self.loaded: dict[str, Any] | None = None
        self.takes_toggle = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{self.args.name}")

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load the model `user_config` names (`variant_user_config`) unless it is the one loaded.

        On a GPU the old engine is released first (two copies of a large model rarely fit);
        on CPU the new one is loaded before the swap, so the replica never serves nothing.
        """
        from anneal.serve.engines import make_engine

        want = {k: (user_config or {}).get(k, getattr(self.args, k)) for k in MODEL_FIELDS}
        want["engine_options"] = dict(want["engine_options"] or {})
        if want == self.loaded:
            return
        options = dict(want["engine_options"])
        if want["engine"] == "transformers" and self.args.num_gpus == 0:
            # A replica owns its share of the CPUs: torch should not spin up a thread per core.
            options.setdefault("num_threads", max(1, int(self.args.num_cpus)))
        if self.args.num_gpus > 0 and self.engine is not None:
            self.engine, old = None, self.engine
            _shutdown(old)
            del old
            _free_accelerator_memory()
        engine = make_engine(want["engine"], want["model_uri"], cache_dir=self.cache_dir,
                             tracking_uri=self.tracking_uri, options=options)
        self.engine, old = engine, self.engine
        self.loaded = want
        if old is not None:
            _shutdown(old)  # vllm: its engine process
        self.args = self.args.model_copy(update=want)
        self.takes_toggle = engine_takes_toggle(want["engine"], engine, self.args.reasoning_toggle)
        log.info("variant %s serves %s (%s engine; reasoning toggle %s)", self.args.name, want["model_uri"],
                 want["engine"], "on" if self.takes_toggle else "off")

    def for_model(self, req: GenerateRequest) -> GenerateRequest:
        """The engine's request: the router's toggle system prompt first only if this model takes the toggle."""
        toggle = getattr(req, "toggle", None)
        fields = {f.name: getattr(req, f.name) for f in dataclasses.fields(GenerateRequest)}
        if req.messages is not None and toggle is not None and self.takes_toggle:
            fields["messages"] = [{"role": "system", "content": toggle}, *req.messages]
        return GenerateRequest(**fields)

    def engine_stats(self) -> dict[str, Any]:
        """The engine's own figures (vllm: requests running in its last batch step, the most ever
        batched together, unfinished ones); {} for engines without any."""
        stats = getattr(self.engine, "stats", None)
        return stats() if callable(stats) else {}

    def _engine(self) -> Any:
        if self.engine is None:  # Serve always calls reconfigure first; this is a config without user_config
            raise RuntimeError(f"variant {self.args.name}: no model configured (deployment user_config is empty)")
        return self.engine

    async def generate(self, req: GenerateRequest) -> GenerateResult:
        # The engine runs in the replica's one worker thread. When the router gives up (its
        # timeout cancels the call) the task here is cancelled, but a thread cannot be: the
        # event tells the engine to stop at its next token, so the slot is free for the next call.
        engine = self._engine()
        req = self.for_model(req)
        if getattr(engine, "is_async", False):  # openai: on this event loop; a cancel closes its request
            return await engine.agenerate(req)
        loop = asyncio.get_running_loop()
        req = dataclasses.replace(req, cancel=threading.Event())
        try:
            return await loop.run_in_executor(self._executor, engine.generate, req)
        except asyncio.CancelledError:
            req.cancel.set()
            raise

    async def explain(self, req: GenerateRequest) -> tuple[GenerateResult, dict[str, Any]]:
        """The answer and its attention map (the debug header); engines without attention weights refuse."""
        engine = self._engine()
        if not hasattr(engine, "explain"):
            raise AttentionNotSupported(self.args.name, self.args.engine)
        loop = asyncio.get_running_loop()
        req = dataclasses.replace(self.for_model(req), cancel=threading.Event())
        try:
            return await loop.run_in_executor(self._executor, engine.explain, req)
        except asyncio.CancelledError:
            req.cancel.set()
            raise

    async def stream(self, req: GenerateRequest) -> AsyncIterator[StreamPiece]:
        engine = self._engine()
        req = self.for_model(req)
        if getattr(engine, "is_async", False):
            # Each piece as the server sends it; closing this generator closes the server's stream.
            pieces = engine.astream(req)
            try:
                async for piece in pieces:
                    yield piece
            finally:
                await pieces.aclose()
            return
        loop = asyncio.get_running_loop()
        req = dataclasses.replace(req, cancel=threading.Event())
        it = engine.stream(req)
        done = object()
        try:
            while True:
                piece = await loop.run_in_executor(self._executor, next, it, done)
                if piece is done:
                    return
                yield piece
        finally:  # finished, cancelled, or the caller went away: stop the engine at its next token
            req.cancel.set()


# --------------------------------------------------------------------------- router

# Serve's ingress snapshots the class with the module globals it can see at decoration time:
# everything the router uses is defined above it.

def _awaitable(response: Any):
    async def wait():
        return await response
    return wait()


def _headers(request: Request) -> dict[str, str]:
    return {k.lower(): v for k, v in request.headers.items()}


def _replica_context() -> str:
    try:
        return serve.get_replica_context().replica_tag
    except Exception:
        try:
            return str(serve.get_replica_context().replica_id)
        except Exception:
            return f"pid-{os.getpid()}"


#: A request with ``x-anneal-debug: attention`` and the admin key gets the answer's attention map.
DEBUG_HEADER = "x-anneal-debug"
DEBUG_VALUES = ("attention",)


def check_debug(keys: auth.Keys, headers: Mapping[str, str]) -> None:
    """The debug header takes the admin key (403 with a user key, 401 without) and a known value (400)."""
    auth.check(keys, headers, admin=True, what=f"the {DEBUG_HEADER} header", param=DEBUG_HEADER)
    value = headers[DEBUG_HEADER].strip().lower()
    if value not in DEBUG_VALUES:
        raise protocol.ApiError(400, f"{DEBUG_HEADER}: {protocol.brief(value)!s} is not a debug view; use "
                                f"{' or '.join(DEBUG_VALUES)}", param=DEBUG_HEADER, code="invalid_value")


def _upstream_error(variant: str, e: BaseException) -> protocol.ApiError:
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

    if isinstance(e, (BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError, RayActorError)):
        return protocol.ApiError(503, f"variant {variant} is unavailable ({type(e).__name__}); retry later",
                                 code="variant_unavailable")
    cause = getattr(e, "cause", None) or e
    if isinstance(cause, UpstreamError) or isinstance(e, UpstreamError):
        u = cause if isinstance(cause, UpstreamError) else e
        return protocol.ApiError(u.status, f"variant {variant}: {u.message}", param=u.param, code=u.code,
                                 type=u.type if u.status < 500 else None)
    if isinstance(cause, ContextLengthExceeded) or isinstance(e, ContextLengthExceeded):
        return protocol.ApiError(400, str(cause if isinstance(cause, ContextLengthExceeded) else e),
                                 code="context_length_exceeded")
    if isinstance(cause, AttentionNotSupported) or isinstance(e, AttentionNotSupported):
        return protocol.ApiError(400, str(cause if isinstance(cause, AttentionNotSupported) else e),
                                 param=DEBUG_HEADER, code="debug_not_supported")
    text = str(cause).strip().splitlines()
    detail = text[-1] if text else type(cause).__name__
    return protocol.ApiError(502, f"variant {variant} failed: {detail[:300]}", code="variant_error")


def _error_response(e: protocol.ApiError, decision: RouteDecision | None, rid: str) -> JSONResponse:
    headers = {}
    if decision is not None:
        headers["x-anneal-variant"] = decision.variant
        headers["x-anneal-route-reason"] = decision.reason
    if e.status == 503:
        headers["retry-after"] = "1"
    if e.status == 401:
        headers["www-authenticate"] = "Bearer"
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def parse_since(value: str | None) -> float | None:
    """The `since` of `GET /-/stats`: unix seconds, finite and not negative.

    Raises:
        ApiError: 400 naming `since`.
    """
    if value is None or value == "":
        return None
    try:
        since = float(value)
    except ValueError:
        since = math.nan
    if not math.isfinite(since) or since < 0:
        raise protocol.invalid("since", f"{value[:40]!r} must be unix seconds (a finite number >= 0)")
    return since


def write_decisions_to_mlflow(tracking_uri: str, experiment: str, service: str, batch: list[dict[str, Any]],
                              replica: str, cache: Any = None) -> str:
    """Append a batch of sampled routing decisions to the service's MLflow run (`serve-<service>`).

    Each batch becomes one `routing/decisions-<time>-<replica>.jsonl` artifact, plus per-variant
    counts as metrics `routed.<variant>`. Returns the run id.
    """
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from anneal.tracking.deployments import service_run

    client = MlflowClient(tracking_uri=tracking_uri)
    run_id = getattr(cache, "_mlflow_run_id", None)
    if run_id is None:
        run_id = service_run(client, experiment, service)
        if cache is not None:
            cache._mlflow_run_id = run_id
    now = int(time.time() * 1000)
    lines = "\n".join(json.dumps(e) for e in batch) + "\n"
    client.log_text(run_id, lines, f"routing/decisions-{now}-{replica.replace('/', '_')}.jsonl")
    counts: dict[str, int] = {}
    for e in batch:
        counts[e["variant"]] = counts.get(e["variant"], 0) + 1
    client.log_batch(run_id, metrics=[Metric(f"routed.{v}", n, now, 0) for v, n in counts.items()])
    return run_id


_UNSET: Any = object()


class _PairSlot:
    """The two halves of one mirrored request while they come in (see `Router._pair_done`)."""

    __slots__ = ("rid", "primary_variant", "shadow_variant", "prompt", "primary", "shadow",
                 "primary_set", "shadow_set")

    def __init__(self, rid: str, primary_variant: str, shadow_variant: str, prompt: str):
        self.rid, self.primary_variant, self.shadow_variant, self.prompt = rid, primary_variant, shadow_variant, prompt
        self.primary: tuple[str, float] | None = None
        self.shadow: tuple[str | None, float] | None = None
        self.primary_set = self.shadow_set = False


# No `from __future__ import annotations` here: FastAPI must see real types on the routes
# (`request: Request`), and the snapshot holds no globals for string annotations.
api = FastAPI(title="Anneal ModelService", docs_url=None, redoc_url=None)


# Whatever FastAPI itself answers (no route, wrong method, a bad query parameter, a bug) answers in
# OpenAI's error shape too: a client's error handling sees one format.
@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    where = f"{request.method} {request.url.path}"
    message, code = {404: (f"{where}: no such route", "not_found"),
                     405: (f"{where}: method not allowed", "method_not_allowed")}.get(
        exc.status_code, (f"{where}: {exc.detail}", None))
    e = protocol.ApiError(exc.status_code, message, code=code,
                          type="invalid_request_error" if exc.status_code < 500 else None)
    return JSONResponse(e.body(), status_code=exc.status_code, headers=dict(exc.headers or {}))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = (exc.errors() or [{}])[0]
    param = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "header", "body")) or None
    e = protocol.ApiError(400, f"{param}: {first.get('msg', 'invalid')}", param=param, code="invalid_value")
    return JSONResponse(e.body(), status_code=400)


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path)
    e = protocol.ApiError(500, "internal error in the router (it is logged)", code="internal_error")
    return JSONResponse(e.body(), status_code=500)


@serve.ingress(api)
class Router:
    """The ingress: OpenAI-compatible API, routing decisions, metrics and the decision log."""

    def __init__(self, args: dict[str, Any], variants: dict[str, Any]):
        self.args = AppArgs(**args)
        self.handles = variants
        self.weights = dict(self.args.weights)
        self.policy = policy_from_args(self.args)
        self.tracker = LargeShareTracker(self.policy.dynamic.window if self.policy.dynamic else 200)
        self.metrics = ServiceMetrics([v.name for v in self.args.variants])
        self.rng = random.Random(self.args.seed)
        self.defaults = {v.name: v for v in self.args.variants}
        self._shadow_tasks: set[asyncio.Task] = set()
        self.shadow_dropped = 0
        self._answer_pattern = re.compile(self.args.shadow_answer_pattern) if self.args.shadow_answer_pattern else None
        self._judge_tasks: set[asyncio.Task] = set()
        self._judge_calls: deque[float] = deque()  # monotonic times of the last minute's judge calls
        self.judge_skipped = 0
        self._decisions: list[dict[str, Any]] = []
        self._flusher: asyncio.Task | None = None
        self._mlflow_run_id: str | None = None
        self.replica = _replica_context()
        # Fails the replica (the app shows the message) rather than serve without the keys it must require.
        self.keys = auth.load_keys(self.args.api_keys_env, self.args.admin_key_env, os.environ)

    # ---- contract 2
    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply `{"weights": {variant: int}, "routing": {...}}` in place (no restart).

        `routing` may override `shadow` (`{variant, percent}`), `dynamic` and `reasoning`.
        """
        user_config = user_config or {}
        weights = normalise_weights(user_config.get("weights") or self.weights, list(self.defaults))
        policy = policy_from_args(self.args, weights, user_config.get("routing"))
        self.weights, self.policy = weights, policy
        log.info("service %s: weights now %s", self.args.service, weights)

    # ---- API
    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, "chat")

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._complete(request, "completion")

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        try:
            level = auth.check(self.keys, _headers(request), admin=False)
        except protocol.ApiError as e:
            return _error_response(e, None, "")
        created = int(self.metrics.started)
        data = [{"id": self.args.service, "object": "model", "created": created, "owned_by": "anneal"}]
        if level == auth.ADMIN:  # variants are for pinning, which takes the admin key
            data += [{"id": v, "object": "model", "created": created, "owned_by": "anneal",
                      "parent": self.args.service} for v in self.defaults]
        return JSONResponse({"object": "list", "data": data})

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "service": self.args.service, "weights": self.weights}

    @api.get("/-/stats")
    async def stats(self, request: Request, since: str | None = None, local: bool = False) -> Response:
        """Contract 1: cumulative and windowed per-variant stats (all router replicas merged)."""
        try:
            auth.check(self.keys, _headers(request), admin=True, what="GET /-/stats")
            start = parse_since(since)
        except protocol.ApiError as e:
            return _error_response(e, None, "")
        doc = self.local_stats(start)
        if not local and self.args.router_replicas > 1:
            doc = await self._merged_stats(start, doc)
        return JSONResponse(doc)

    @api.get("/-/metrics")
    async def prometheus(self, request: Request) -> Response:
        try:
            auth.check(self.keys, _headers(request), admin=True, what="GET /-/metrics")
        except protocol.ApiError as e:
            return _error_response(e, None, "")
        return Response(self.metrics.prometheus_text(self.args.service, self.weights),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    def current_weights(self) -> dict[str, int]:
        return dict(self.weights)

    def local_stats(self, since: float | None = None) -> dict[str, Any]:
        doc = self.metrics.stats(since, self.weights, self.args.shadow_record_pairs)
        doc["replica"] = self.replica
        doc["shadow_dropped"] = self.shadow_dropped
        doc["judge_skipped"] = self.judge_skipped
        return doc

    async def _merged_stats(self, since: float | None, own: dict[str, Any]) -> dict[str, Any]:
        try:
            me = serve.get_deployment_handle(ROUTER_DEPLOYMENT, self.args.service)
            results = await asyncio.wait_for(me.broadcast("local_stats", since).results_async(), timeout=10)
            docs = [r for r in results if isinstance(r, dict)]
            merged = merge_stats(docs or [own], self.args.shadow_record_pairs)
            merged["replicas"] = len(docs)
            return merged
        except Exception as e:  # a partial answer beats none: say so
            log.warning("stats: could not reach every router replica: %s", e)
            own["replicas"] = 1
            own["partial"] = True
            return own

    # ---- request path
    async def _complete(self, request: Request, kind: str) -> Response:
        start = time.perf_counter()
        # Serve's proxy gives every request an id (and echoes it in the `x-request-id` response header).
        rid = protocol.new_id(kind, request.headers.get("x-request-id"))
        decision: RouteDecision | None = None
        pair: _PairSlot | None = None
        try:
            headers = _headers(request)
            level = auth.check(self.keys, headers, admin=False)
            limit = self.args.max_request_bytes
            length = headers.get("content-length", "")
            if length.isdigit() and (len(length) > 18 or int(length) > limit):
                raise protocol.too_large(length if len(length) <= 18 else f"over {limit}", limit)
            # Piece by piece: a chunked body (no Content-Length) is cut off at the limit, not held whole.
            debug = DEBUG_HEADER in headers  # the one look the hot path pays for the debug header
            if debug:
                check_debug(self.keys, headers)
            body = await protocol.read_body(request.stream(), limit)
            parsed = protocol.parse_request(protocol.parse_json(body, limit), kind, self.args.max_tokens_limit)
            if debug and parsed.stream:
                raise protocol.ApiError(400, f"{DEBUG_HEADER}: attention maps come with a whole answer; "
                                        "send the request without stream", param="stream", code="invalid_value")
            override = self.policy.override_header
            if override in headers:
                auth.check(self.keys, headers, admin=True, what="pinning a variant", param=override)
            if parsed.model and parsed.model != self.args.service:
                if parsed.model not in self.defaults:
                    raise protocol.ApiError(
                        404, f"model: {protocol.brief(parsed.model)} is not served here; use {self.args.service!r}"
                        + (f" or a variant ({', '.join(self.defaults)})" if level == auth.ADMIN else ""),
                        param="model", code="model_not_found")
                # `model` naming a variant pins it, like the override header: that takes the admin key.
                auth.check(self.keys, headers, admin=True, what="pinning a variant", param="model")
                headers.setdefault(override, parsed.model)
            try:
                decision = decide(self.policy, headers=headers, messages=parsed.messages, prompt=parsed.prompt,
                                  draw=self.rng.random(), shadow_draw=self.rng.random(), tracker=self.tracker)
            except RoutingError as e:
                raise protocol.ApiError(400, str(e), param=e.param, code="invalid_value") from None
            self.metrics.record_route(decision.reason_prefix)
            self._log_decision(rid, decision)
            req = self._engine_request(parsed, decision)
            if debug:  # no mirror, no metrics: a debug answer costs a second pass and is no user's latency
                return await self._explain(kind, rid, decision, req)
            if decision.shadow:
                pair = self._mirror(decision, parsed, rid)
            route_headers = {"x-anneal-variant": decision.variant, "x-anneal-route-reason": decision.reason,
                             "x-anneal-reasoning": decision.reasoning}
            if parsed.stream:
                return await self._stream(parsed, decision, req, rid, start, route_headers, pair)
            result = await self._call(decision.variant, req)
        except protocol.ApiError as e:
            if pair is not None:
                self._pair_done(pair, primary=None)
            if decision is not None and e.status >= 500:
                self.metrics.record(decision.variant, (time.perf_counter() - start) * 1000, True,
                                    pinned=decision.reason == REASON_OVERRIDE)
            return _error_response(e, decision, rid)
        latency = (time.perf_counter() - start) * 1000
        if pair is not None:
            self._pair_done(pair, primary=(result.text, latency))
        self.metrics.record(decision.variant, latency, False, result.prompt_tokens, result.completion_tokens,
                            pinned=decision.reason == REASON_OVERRIDE)
        body = protocol.completion_body(kind, rid, decision.variant, result.text, result.finish_reason,
                                        result.prompt_tokens, result.completion_tokens)
        return JSONResponse(body, headers=route_headers)

    def _engine_request(self, parsed: protocol.ParsedRequest, decision: RouteDecision,
                        variant: str | None = None) -> GenerateRequest:
        """What `variant` (default the decision's) is asked: the request with that variant's
        generation defaults and cap, so a mirror answers as the candidate would answer the user.
        The caller's toggle system message is taken out; the mode's prompt travels beside the
        messages, and the variant puts it first if its model was trained with it."""
        v = self.defaults[variant or decision.variant]
        messages, toggle = parsed.messages, None
        if messages is not None:
            toggle, *messages = apply_reasoning(messages, decision.reasoning, self.policy.reasoning)
            toggle = toggle["content"]
        return VariantRequest(
            toggle=toggle,
            messages=messages,
            prompt=parsed.prompt,
            max_tokens=self._max_tokens(parsed.max_tokens, v, decision),
            temperature=parsed.temperature if parsed.temperature is not None else v.temperature,
            top_p=parsed.top_p if parsed.top_p is not None else v.top_p,
            stop=parsed.stop,
            ignore_eos=parsed.ignore_eos,
            seed=parsed.seed,
        )

    def _max_tokens(self, requested: int | None, v: VariantArgs, decision: RouteDecision) -> int:
        try:
            return cap_max_tokens(requested, v.max_tokens, decision.reasoning, self.policy.reasoning,
                                  over=v.max_tokens_over)
        except RoutingError as e:
            raise protocol.ApiError(400, str(e), param=e.param, code="invalid_value") from None

    async def _explain(self, kind: str, rid: str, decision: RouteDecision, req: GenerateRequest) -> Response:
        """The answer with its attention map in ``anneal_debug.attention`` (transformers variants only)."""
        v = self.defaults[decision.variant]
        if v.engine != "transformers":
            raise _upstream_error(decision.variant, AttentionNotSupported(decision.variant, v.engine))
        result, attention = await self._call(decision.variant, req, method="explain")
        body = protocol.completion_body(kind, rid, decision.variant, result.text, result.finish_reason,
                                        result.prompt_tokens, result.completion_tokens)
        body["anneal_debug"] = {"attention": attention}
        return JSONResponse(body, headers={"x-anneal-variant": decision.variant,
                                           "x-anneal-route-reason": decision.reason,
                                           "x-anneal-reasoning": decision.reasoning})

    async def _call(self, variant: str, req: GenerateRequest, method: str = "generate") -> Any:
        """`method` (generate, or explain: result and attention) of the variant, within the request timeout."""
        response = getattr(self.handles[variant], method).remote(req)
        try:
            return await asyncio.wait_for(_awaitable(response), timeout=self.args.request_timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            raise protocol.ApiError(504, f"variant {variant} did not answer within "
                                    f"{self.args.request_timeout_s:g}s", code="timeout") from None
        except protocol.ApiError:
            raise
        except Exception as e:
            raise _upstream_error(variant, e) from None

    async def _stream(self, parsed: protocol.ParsedRequest, decision: RouteDecision, req: GenerateRequest,
                      rid: str, start: float, headers: dict[str, str], pair: "_PairSlot | None" = None) -> Response:
        gen = self.handles[decision.variant].options(stream=True).stream.remote(req)
        timeout = self.args.request_timeout_s
        try:
            # The status line goes out with the first piece, so a failing variant still gets a 5xx.
            first = await asyncio.wait_for(gen.__anext__(), timeout=timeout)
        except StopAsyncIteration:
            first = StreamPiece("", "stop")
        except asyncio.TimeoutError:
            gen.cancel()
            raise protocol.ApiError(504, f"variant {decision.variant} did not answer within {timeout:g}s",
                                    code="timeout") from None
        except Exception as e:
            raise _upstream_error(decision.variant, e) from None
        kind, model = parsed.kind, decision.variant

        async def events() -> AsyncIterator[bytes]:
            piece: StreamPiece | None = first
            error = False
            last = StreamPiece("", "stop")
            is_first = True
            texts: list[str] = []
            try:
                while piece is not None:
                    texts.append(piece.text)
                    if piece.finish_reason is not None:
                        last = piece
                        if piece.text:
                            yield protocol.sse(protocol.chunk_body(kind, rid, model, piece.text, None, first=is_first))
                        break
                    yield protocol.sse(protocol.chunk_body(kind, rid, model, piece.text, None, first=is_first))
                    is_first = False
                    try:
                        piece = await asyncio.wait_for(gen.__anext__(), timeout=timeout)
                    except StopAsyncIteration:
                        piece = None
                yield protocol.sse(protocol.chunk_body(kind, rid, model, None, last.finish_reason))
                if parsed.include_usage:
                    usage = {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
                             "total_tokens": last.prompt_tokens + last.completion_tokens}
                    yield protocol.sse(protocol.chunk_body(kind, rid, model, None, None, usage=usage))
            except (asyncio.CancelledError, GeneratorExit):  # the client went away: stop the variant's engine too
                gen.cancel()
                raise
            except Exception as e:  # the status is sent: report in the stream, then end it
                error = True
                gen.cancel()
                err = e if isinstance(e, protocol.ApiError) else _upstream_error(decision.variant, e)
                yield protocol.sse(err.body())
            finally:
                latency = (time.perf_counter() - start) * 1000
                if pair is not None:
                    self._pair_done(pair, primary=None if error else ("".join(texts), latency))
                self.metrics.record(decision.variant, latency, error,
                                    last.prompt_tokens, last.completion_tokens,
                                    pinned=decision.reason == REASON_OVERRIDE)
            yield protocol.sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={**headers, "cache-control": "no-cache"})

    # ---- shadow
    def _mirror(self, decision: RouteDecision, parsed: protocol.ParsedRequest, rid: str) -> "_PairSlot | None":
        """Send a copy of the request to the shadow variant in the background (with that variant's
        own generation settings); returns the slot its answer is paired in, None when not sent."""
        variant = decision.shadow
        assert variant is not None
        if len(self._shadow_tasks) >= self.args.max_shadow_in_flight:
            self.shadow_dropped += 1  # shadow traffic must never queue up behind the caller's
            return None
        try:
            req = self._engine_request(parsed, decision, variant)
        except protocol.ApiError:  # over the shadow variant's cap (maxTokensOver: reject): the user is not refused
            self.shadow_dropped += 1
            return None
        prompt = parsed.prompt if parsed.messages is None else (parsed.messages[-1].get("content") or "")
        slot = _PairSlot(rid, decision.variant, variant, prompt or "")
        task = asyncio.get_running_loop().create_task(self._shadow(variant, req, slot))
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)
        return slot

    async def _shadow(self, variant: str, req: GenerateRequest, slot: "_PairSlot | None" = None) -> None:
        start = time.perf_counter()
        try:
            result = await self._call(variant, req)
        except Exception:
            latency = (time.perf_counter() - start) * 1000
            self.metrics.record(variant, latency, True, shadow=True)
            if slot is not None:
                self._pair_done(slot, shadow=(None, latency))
            return
        latency = (time.perf_counter() - start) * 1000
        self.metrics.record(variant, latency, False, result.prompt_tokens, result.completion_tokens, shadow=True)
        if slot is not None:
            self._pair_done(slot, shadow=(result.text, latency))

    def _pair_done(self, slot: "_PairSlot", *, primary: Any = _UNSET, shadow: Any = _UNSET) -> None:
        """One side of a mirrored request finished; with both, the pair is compared and kept.

        `primary` is ``(text, ms)`` or None when the user's call failed (no reference: no pair);
        `shadow` is ``(text, ms)``, text None when the mirrored call failed.
        """
        if primary is not _UNSET:
            slot.primary, slot.primary_set = primary, True
        if shadow is not _UNSET:
            slot.shadow, slot.shadow_set = shadow, True
        if not (slot.primary_set and slot.shadow_set) or slot.primary is None:
            return
        (primary_text, primary_ms), (shadow_text, shadow_ms) = slot.primary, slot.shadow
        pair = make_pair(
            time=self.metrics.clock(), request_id=slot.rid, primary=slot.primary_variant,
            shadow=slot.shadow_variant, prompt=slot.prompt, primary_answer=primary_text,
            shadow_answer=shadow_text, primary_ms=primary_ms, shadow_ms=shadow_ms,
            compare=self.args.shadow_compare, pattern=self._answer_pattern,
        )
        self.metrics.record_pair(pair)
        if self.args.judge_variant and not pair.shadow_error and self._judge_allowed():
            pair.judge = "pending"
            task = asyncio.get_running_loop().create_task(self._judge(pair))
            self._judge_tasks.add(task)
            task.add_done_callback(self._judge_tasks.discard)

    def _judge_allowed(self) -> bool:
        """A share of the pairs, at most `judge_max_per_minute` a minute and never piling up."""
        if self.rng.random() >= self.args.judge_share:
            return False
        now = time.monotonic()
        while self._judge_calls and now - self._judge_calls[0] > 60.0:
            self._judge_calls.popleft()
        if len(self._judge_calls) >= self.args.judge_max_per_minute or \
                len(self._judge_tasks) >= self.args.max_shadow_in_flight:
            self.judge_skipped += 1
            return False
        self._judge_calls.append(now)
        return True

    async def _judge(self, pair: Any) -> None:
        """Ask the judge variant about one pair (after the user had the answer: nobody waits)."""
        from anneal.api.service import DEFAULT_JUDGE_TEMPLATE

        template = self.args.judge_template or DEFAULT_JUDGE_TEMPLATE
        req = GenerateRequest(messages=[{"role": "user", "content": judge_prompt(template, pair)}],
                              max_tokens=min(64, self.defaults[self.args.judge_variant].max_tokens), temperature=0.0)
        try:
            result = await self._call(self.args.judge_variant, req)
        except Exception as e:  # noqa: BLE001 - a judge that fails scores nothing
            log.info("judge %s failed on %s: %s", self.args.judge_variant, pair.request_id, e)
            pair.judge = "error"
            return
        pair.judge = judge_verdict(result.text)

    # ---- decision log
    def _log_decision(self, rid: str, d: RouteDecision) -> None:
        if self.args.decision_log_rate <= 0 or self.rng.random() >= self.args.decision_log_rate:
            return
        entry = {"time": time.time(), "requestId": rid, "variant": d.variant, "reason": d.reason,
                 "reasoning": d.reasoning, "shadow": d.shadow}
        decision_log.info(json.dumps(entry))
        if self.args.tracking_uri:
            self._decisions.append(entry)
            if len(self._decisions) > 10000:  # MLflow unreachable for long: keep the newest
                del self._decisions[:5000]
            if self._flusher is None or self._flusher.done():
                self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.args.decision_flush_s)
            batch, self._decisions = self._decisions, []
            if not batch:
                continue
            try:
                await asyncio.to_thread(self._flush_to_mlflow, batch)
            except Exception as e:
                log.warning("routing decision log: MLflow write failed (%s); %d entries kept", e, len(batch))
                self._decisions = batch + self._decisions

    def _flush_to_mlflow(self, batch: list[dict[str, Any]]) -> None:
        write_decisions_to_mlflow(self.args.tracking_uri, self.args.experiment or "anneal-serving",
                                  self.args.service, batch, self.replica, self)


# ---------------------------------------------------------------------------- build


def variant_actor_options(v: VariantArgs) -> dict[str, Any]:
    """A variant replica's Ray actor options: its resources, and the Python it runs in (a vllm variant's
    serving environment, as a runtime_env `py_executable`: the router and the other variants stay in Ray's)."""
    actor: dict[str, Any] = {"num_cpus": v.num_cpus, "num_gpus": v.num_gpus}
    if v.memory_bytes:
        actor["memory"] = v.memory_bytes
    if v.accelerator_type:
        actor["accelerator_type"] = v.accelerator_type
    if v.python_executable:
        actor["runtime_env"] = {"py_executable": v.python_executable}
    return actor


def build_app(args: AppArgs, *, router_user_config: Mapping[str, Any] | None = None) -> Application:
    """The Serve application: the router ingress bound to one deployment per variant.

    Args:
        args: the app args.
        router_user_config: the router's live config (contract 2); default the args' weights.
    """
    handles = {}
    for v in args.variants:
        actor = variant_actor_options(v)
        init = {"variant": v.model_dump(mode="json"), "cache_dir": args.cache_dir, "tracking_uri": args.tracking_uri}
        scale: dict[str, Any] = (
            {"autoscaling_config": v.autoscaling, "num_replicas": "auto"} if v.autoscaling
            else {"num_replicas": v.replicas}
        )
        deployment = serve.deployment(
            VariantServer,
            name=variant_deployment_name(v.name),
            ray_actor_options=actor,
            max_ongoing_requests=v.max_ongoing_requests,
            max_queued_requests=v.max_queued_requests,
            user_config=variant_user_config(v),
            **scale,
        )
        handles[v.name] = deployment.bind(**init)
    router_args = args.model_dump(mode="json")
    router = serve.deployment(
        Router,
        name=ROUTER_DEPLOYMENT,
        num_replicas=args.router_replicas,
        ray_actor_options={"num_cpus": args.router_num_cpus},
        max_ongoing_requests=args.router_max_ongoing_requests,
        user_config=dict(router_user_config or {"weights": dict(args.weights)}),
    )
    return router.bind(args=router_args, variants=handles)


def app_builder(args: dict[str, Any]) -> Application:
    """Serve config entry point (`import_path: anneal.serve.app:app_builder`)."""
    return build_app(AppArgs.model_validate(args))


def build_serve_config(args: AppArgs, weights: Mapping[str, int] | None = None,
                       routing: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One `applications[]` entry of a Serve config (REST API `PUT /api/serve/applications/`,
    KubeRay `RayService.spec.serveConfigV2`).

    Serve restarts every deployment of an app whose `args` change. So what changes live is
    kept out of them: the weights go in the router's `user_config` (a later entry that differs
    only there makes Serve call `Router.reconfigure` and restart nothing), and each variant's
    model in its own deployment's `user_config` (a model change touches that variant alone).
    """
    user_config: dict[str, Any] = {"weights": dict(weights if weights is not None else args.weights)}
    if routing:
        user_config["routing"] = dict(routing)
    app_args = args.model_dump(mode="json")
    for v in app_args["variants"]:
        for k in MODEL_FIELDS:
            v.pop(k, None)
    return {
        "name": args.service,
        "route_prefix": args.route_prefix,
        "import_path": IMPORT_PATH,
        "args": app_args,
        "deployments": [{"name": ROUTER_DEPLOYMENT, "user_config": user_config}] + [
            {"name": variant_deployment_name(v.name), "user_config": variant_user_config(v)} for v in args.variants
        ],
    }


def entry_models(entry: Mapping[str, Any]) -> dict[str, str | None]:
    """variant → model URI of a Serve config entry (`build_serve_config`)."""
    prefix = variant_deployment_name("")
    return {d["name"][len(prefix):]: (d.get("user_config") or {}).get("model_uri")
            for d in entry.get("deployments") or [] if d.get("name", "").startswith(prefix)}


__all__ = [
    "AppArgs", "VariantArgs", "args_from_spec", "backend_key_env", "backend_key_var", "backend_secret_refs",
    "build_app", "app_builder", "build_serve_config", "entry_models", "variant_actor_options",
    "variant_user_config",
    "policy_from_args", "write_decisions_to_mlflow", "Router", "VariantServer",
]
