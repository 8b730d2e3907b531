"""ModelService: a Ray Serve app with weighted variants, routing policies and staged rollouts."""

from __future__ import annotations

import enum
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from anneal.api.common import (
    ApiModel,
    DatasetRef,
    Duration,
    DNS_SUBDOMAIN,
    MlflowTarget,
    ModelRef,
    Name,
    Quantity,
    RayTarget,
    Resources,
    SecretKeySelector,
    StatusBase,
    cross_field,
    parse_quantity,
)


class Autoscaling(ApiModel):
    """Ray Serve autoscaling of a variant."""

    min_replicas: int = Field(default=1, ge=0, le=1000)
    max_replicas: int = Field(default=2, ge=1, le=1000)
    target_ongoing_requests: float = Field(default=2, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> "Autoscaling":
        if self.max_replicas < self.min_replicas:
            raise cross_field("maxReplicas", self.max_replicas, f"must be >= minReplicas ({self.min_replicas})")
        return self


class Generation(ApiModel):
    """Default generation settings of a variant."""

    max_tokens: int = Field(default=128, ge=1, le=32768,
                            description="Tokens of an answer when the request does not say, and the most it may ask for.")
    max_tokens_over: Literal["clamp", "reject"] = Field(
        default="clamp",
        description="A request asking for more than maxTokens: clamp (answer at most maxTokens, finish_reason "
        "length) or reject (400 naming max_tokens).")
    temperature: float = Field(default=0.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)


#: An environment variable's name (POSIX: letters, digits, underscores, not starting with a digit).
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"

#: CPUs an `openai` variant's replica asks for when `resources.cpusPerWorker` is not given: it
#: only forwards requests (the model runs elsewhere).
OPENAI_VARIANT_CPUS = 0.1


class Backend(ApiModel):
    """An existing OpenAI-compatible server (vLLM, SGLang, TGI, NIM, llama.cpp's server) behind an `openai` variant."""

    url: str = Field(
        max_length=2048,
        description="Base URL of the server's OpenAI API, as an OpenAI SDK's base_url: "
        "http://vllm.team.svc:8000/v1 (the variant posts to <url>/chat/completions and <url>/completions).")
    model: str = Field(min_length=1, max_length=512,
                       description="The model name the server serves: the `model` of every request sent to it.")
    api_key_secret: SecretKeySelector | None = Field(
        default=None, description="The server's API key, from a Secret in the service's namespace (operator); "
        "it reaches the Ray containers as a secretKeyRef variable, never through a manifest.")
    api_key_env: str | None = Field(
        default=None, pattern=ENV_NAME, max_length=253,
        description="Embedded mode: the environment variable holding the server's API key (default "
        "ANNEAL_BACKEND_KEY_<VARIANT> when apiKeySecret is set). No key at all: requests carry no Authorization.")
    timeout_seconds: float = Field(
        default=60, gt=0, le=3600,
        description="How long the server may take to answer (a whole answer, or the next streamed piece); "
        "then the request is a 504 counted against the variant.")
    max_concurrency: int = Field(
        default=64, ge=1, le=4096,
        description="Requests in flight to the server per replica (pooled connections); more wait in Serve's queue.")

    @model_validator(mode="after")
    def _url(self) -> "Backend":
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(self.url)
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as e:
            raise cross_field("url", self.url, f"not a URL: {e}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise cross_field("url", self.url, "must be an http:// or https:// URL with a host, e.g. "
                              "http://vllm.team.svc:8000/v1")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise cross_field("url", self.url, "must have no query, fragment or user:password (give the key "
                              "as apiKeySecret or apiKeyEnv)")
        return self


class VllmOptions(ApiModel):
    """vLLM engine settings of a `vllm` variant (vLLM's own engine arguments, camelCased). Unset: vLLM's default.

    The quantization is not set here: vLLM reads it from the checkpoint's config.json
    (`quantization_config`, e.g. a CompressionJob's compressed-tensors W4A16)."""

    tensor_parallel_size: int | None = Field(
        default=None, ge=1, le=64,
        description="GPUs one replica shards the model over; more than 1 needs resources.gpusPerWorker equal to it.")
    gpu_memory_utilization: float | None = Field(
        default=None, gt=0, le=1,
        description="Share of each GPU's memory vLLM may take (weights, activations, KV cache). On CPU, vLLM "
        "reads it as the share of the node's memory to reserve: prefer kvCacheMemory there.")
    kv_cache_memory: Quantity | None = Field(
        default=None, description="The KV cache's size, e.g. 2Gi (vLLM's kv_cache_memory_bytes); it replaces "
        "gpuMemoryUtilization's sizing. On CPU without either, the replica takes 1Gi.")
    max_model_len: int | None = Field(
        default=None, ge=16, le=1048576,
        description="Longest sequence (prompt + answer) served; default the model's own context length.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] | None = Field(
        default=None, description="Weights' and activations' dtype; auto takes the checkpoint's (float32 becomes "
        "bfloat16 on CPU).")
    enable_prefix_caching: bool | None = Field(
        default=None, description="Reuse the KV cache of a prompt prefix already seen (system prompts).")
    max_num_seqs: int | None = Field(
        default=None, ge=1, le=4096,
        description="Requests decoded together in one batch step (continuous batching); more wait in vLLM's queue.")
    enforce_eager: bool | None = Field(
        default=None, description="Run the model eagerly, without torch.compile and graph capture: the engine "
        "starts in seconds instead of a minute or more, and decodes more slowly.")

    def engine_kwargs(self) -> dict[str, Any]:
        """vLLM's `AsyncEngineArgs` keyword arguments of the fields set (snake_case, unset ones left out)."""
        kwargs = self.model_dump(exclude_none=True)
        if "kv_cache_memory" in kwargs:
            kwargs["kv_cache_memory_bytes"] = int(parse_quantity(kwargs.pop("kv_cache_memory")))
        return kwargs


class Variant(ApiModel):
    """One model behind the service."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "!(has(self.replicas) && has(self.autoscaling))", "message": "set replicas or autoscaling, not both"},
                {"rule": "(has(self.engine) && self.engine == 'openai') ? has(self.backend) : "
                         "(has(self.model) && !has(self.backend))",
                 "message": "an openai variant needs backend {url, model}; any other needs model, and no backend"},
                {"rule": "!has(self.engineOptions) || (has(self.engine) && self.engine == 'vllm')",
                 "message": "engineOptions are vLLM's: set engine: vllm, or remove engineOptions"},
                {"rule": "!has(self.engineOptions) || !has(self.engineOptions.tensorParallelSize) || "
                         "self.engineOptions.tensorParallelSize == 1 || (has(self.resources) && "
                         "has(self.resources.gpusPerWorker) && "
                         "self.resources.gpusPerWorker == double(self.engineOptions.tensorParallelSize))",
                 "message": "engineOptions.tensorParallelSize above 1 needs resources.gpusPerWorker equal to it"},
            ]
        }
    )

    name: Name = Field(description="Variant name (DNS label).")
    model: ModelRef | None = Field(
        default=None, description="The model this variant serves. Required, except with engine openai, where it "
        "only says what the backend serves (recorded in MLflow as deployed; nothing is loaded).")
    weight: int | None = Field(
        default=None, ge=0, le=100, description="Share of traffic 0..100; all weights sum to 100."
    )
    engine: Literal["transformers", "vllm", "openai"] = Field(
        default="transformers", description="transformers or vllm load `model`; openai forwards to `backend`.")
    backend: Backend | None = Field(
        default=None, description="engine openai: the existing OpenAI-compatible server this variant is.")
    engine_options: VllmOptions | None = Field(
        default=None, description="engine vllm: vLLM's engine settings (tensorParallelSize, gpuMemoryUtilization, "
        "kvCacheMemory, maxModelLen, dtype, enablePrefixCaching, maxNumSeqs, enforceEager); the quantization comes "
        "from the checkpoint.")
    replicas: int | None = Field(default=None, ge=0, le=1000, description="Fixed replicas (default 1).")
    autoscaling: Autoscaling | None = None
    resources: Resources = Field(
        default_factory=Resources, description="Per replica: cpusPerWorker, gpusPerWorker, memory."
    )
    generation: Generation = Field(default_factory=Generation)
    reasoning_toggle: bool | None = Field(
        default=None,
        description="Whether this variant's model gets the reasoning toggle's system message (routing.reasoning "
        "onPrompt/offPrompt). Unset: as its model declares (config.json anneal_reasoning_toggle, which Anneal's "
        "training writes; a model in Anneal's own chat format takes it, one with a chat template of its own does not "
        "unless it declares it; an openai variant does not).",
    )

    @model_validator(mode="after")
    def _scale(self) -> "Variant":
        if self.replicas is not None and self.autoscaling is not None:
            raise cross_field("autoscaling", "set", "set replicas or autoscaling, not both")
        if self.engine_options is not None and self.engine != "vllm":
            raise cross_field("engineOptions", self.engine_options, f"engineOptions are vLLM's engine settings "
                              f"(engine is {self.engine}): set engine: vllm, or remove engineOptions")
        tp = self.engine_options.tensor_parallel_size if self.engine_options else None
        if tp is not None and tp > 1 and self.resources.gpus_per_worker != tp:
            raise cross_field("engineOptions.tensorParallelSize", tp, f"shards the model over {tp} GPUs of one "
                              f"replica: set resources.gpusPerWorker to {tp} (it is "
                              f"{self.resources.gpus_per_worker:g})")
        if self.engine == "openai":
            if self.backend is None:
                raise cross_field("backend", None, "engine openai needs backend {url, model}: the OpenAI-compatible "
                                  "server this variant forwards to")
            if self.resources.gpus_per_worker:
                raise cross_field("resources.gpusPerWorker", self.resources.gpus_per_worker,
                                  "an openai variant runs its model elsewhere (backend.url): it needs no GPU")
            if "cpus_per_worker" not in self.resources.model_fields_set:
                self.resources = self.resources.model_copy(update={"cpus_per_worker": OPENAI_VARIANT_CPUS})
        else:
            if self.backend is not None:
                raise cross_field("backend", self.backend, f"only an openai variant has a backend (engine is "
                                  f"{self.engine}): set engine: openai, or remove backend")
            if self.model is None:
                raise cross_field("model", None, f"required: the model engine {self.engine} loads")
        return self

    def served_model(self) -> str | None:
        """What the variant serves, as recorded: the model's URI, else (openai) the backend's
        `<url>#<model>`; None for a reference not resolved here (`fromResource`, `fromStage`)."""
        if self.model is not None:
            return self.model.uri
        return f"{self.backend.url.rstrip('/')}#{self.backend.model}" if self.backend else None


class StickyRouting(ApiModel):
    header: str = Field(default="x-user-id", max_length=128, description="Header whose value keeps a variant.")


DEFAULT_JUDGE_TEMPLATE = (
    "You compare two answers to the same question.\n"
    "Question: {question}\n"
    "Answer A: {stable}\n"
    "Answer B: {candidate}\n"
    "Is answer B at least as good as answer A? Reply with yes or no."
)


class ShadowJudge(ApiModel):
    """A variant of this service that scores compared pairs: is the candidate's answer at least as good?"""

    variant: Name = Field(description="The judge: a variant with weight 0 (it takes no user traffic).")
    template: str = Field(
        default=DEFAULT_JUDGE_TEMPLATE, max_length=8192,
        description="The judge's prompt; {question}, {stable} and {candidate} are filled in. Its answer's "
        "first `yes` or `no` is the verdict (anything else is a judge error, not a sample).",
    )
    share: float = Field(default=0.25, gt=0, le=1, description="Share of compared pairs sent to the judge.")
    max_per_minute: int = Field(default=60, ge=1, le=100000,
                                description="Cap on judge calls per router replica and minute.")

    @model_validator(mode="after")
    def _placeholders(self) -> "ShadowJudge":
        try:
            self.template.format(question="", stable="", candidate="")
        except (KeyError, IndexError, ValueError) as e:
            raise cross_field("template", self.template[:80], f"placeholders are {{question}}, {{stable}}, "
                              f"{{candidate}} (literal braces doubled): {e!r}") from None
        return self


class ShadowRouting(ApiModel):
    """Mirror a share of live requests to a variant; its answers are compared, never returned."""

    variant: Name = Field(description="Variant that receives mirrored traffic.")
    percent: float = Field(default=10, ge=0, le=100, description="Share of requests mirrored.")
    compare: Literal["exact", "answer"] = Field(
        default="exact",
        description="How a mirrored answer is compared with the one the user got: `exact` (the same "
        "text after normalisation: case, white space, a leading <think> block), `answer` (the same final "
        "answer, taken by answerPattern; by default the built-in task's `Answer: N` or GSM8K's `#### N`).",
    )
    answer_pattern: str | None = Field(
        default=None, max_length=512,
        description="With compare: answer, a regular expression whose last match (its first group, or "
        "the whole match) is the final answer.",
    )
    record_pairs: int = Field(
        default=20, ge=0, le=200,
        description="Compared pairs (disagreements first) each analysis logs to the rollout's MLflow "
        "run, prompts and answers included; 0 logs none.",
    )
    judge: ShadowJudge | None = Field(
        default=None, description="Score a share of the compared pairs with a judge variant (judgeWinRate).")

    @model_validator(mode="after")
    def _pattern(self) -> "ShadowRouting":
        if self.answer_pattern is not None:
            import re

            try:
                re.compile(self.answer_pattern)
            except re.error as e:
                raise cross_field("answerPattern", self.answer_pattern, f"not a regular expression: {e}") from None
            if self.compare != "answer":
                raise cross_field("answerPattern", self.answer_pattern, "applies only with compare: answer")
        return self


class ReasoningRouting(ApiModel):
    default: Literal["on", "off"] = "on"
    header: str = Field(default="x-anneal-reasoning", max_length=128)
    on_prompt: str = Field(default="detailed thinking on", max_length=1024)
    off_prompt: str = Field(default="detailed thinking off", max_length=1024)
    max_tokens_on: int | None = Field(default=None, ge=1, le=32768)
    max_tokens_off: int | None = Field(default=None, ge=1, le=32768)


class DynamicRouting(ApiModel):
    small: Name = Field(description="Variant for easy requests.")
    large: Name = Field(description="Variant for hard requests.")
    threshold: float = Field(default=0.5, ge=0, description="Difficulty above which a request goes to large.")
    large_share: float = Field(default=1.0, ge=0, le=1, description="Cap on the share sent to large.")


class Routing(ApiModel):
    sticky: StickyRouting | None = None
    override_header: str = Field(default="x-anneal-variant", max_length=128)
    shadow: ShadowRouting | None = None
    reasoning: ReasoningRouting = Field(default_factory=ReasoningRouting)
    policy: Literal["weighted", "dynamic"] = "weighted"
    dynamic: DynamicRouting | None = None


Metric = Literal[
    "errorRate", "latencyP95Ms", "accuracy", "errorRateVsStable",
    "shadowAgreement", "shadowErrorRate", "shadowLatencyRatio", "judgeWinRate",
]
#: Gates on a share of samples: decided on a confidence interval (`anneal.rollout.statistics`).
RATE_METRICS = ("errorRate", "errorRateVsStable", "accuracy", "shadowAgreement", "shadowErrorRate", "judgeWinRate")
#: Gates on pairs of live answers: they need `routing.shadow` mirroring to the candidate.
SHADOW_METRICS = ("shadowAgreement", "shadowErrorRate", "shadowLatencyRatio", "judgeWinRate")


class Gate(ApiModel):
    """A threshold on one analysis metric of the candidate."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "has(self.max) != has(self.min)", "message": "set exactly one of max or min"}
            ]
        }
    )

    metric: Metric
    max: float | None = None
    min: float | None = None

    @model_validator(mode="after")
    def _one(self) -> "Gate":
        if (self.max is None) == (self.min is None):
            raise cross_field("", self.to_dict(), "set exactly one of max or min")
        return self

    @property
    def bound(self) -> Literal["max", "min"]:
        """Which side the threshold is on: ``max`` (figure <= threshold) or ``min`` (>=)."""
        return "max" if self.max is not None else "min"

    @property
    def threshold(self) -> float:
        return float(self.max if self.max is not None else self.min)  # type: ignore[arg-type]

    def holds(self, value: float) -> bool:
        """Whether `value` is on the right side of the threshold."""
        return value <= self.threshold if self.bound == "max" else value >= self.threshold


class Probes(ApiModel):
    """Labelled probe requests the controller sends to measure `accuracy`."""

    dataset: DatasetRef = Field(default_factory=lambda: DatasetRef(split="test"))
    per_interval: int = Field(default=8, ge=1, le=1000)
    reasoning: Literal["on", "off"] = "off"


#: Added to the gates of every analysis that has no error-rate gate of its own: a candidate
#: whose requests all fail must never be promoted, whatever else is measured.
DEFAULT_ERROR_GATE = {"metric": "errorRate", "max": 0.05}


class Analysis(ApiModel):
    interval: Duration = "30s"
    min_requests: int = Field(
        default=20, ge=0,
        description="A floor: fewer candidate requests (routed and mirrored) in the window make the "
        "analysis wait, whatever the gates say.",
    )
    failure_limit: int = Field(default=2, ge=0, le=100)
    confidence: float = Field(
        default=0.95, ge=0.5, le=0.999,
        description="Level of the interval every rate gate (errorRate, errorRateVsStable, accuracy, "
        "shadowAgreement, shadowErrorRate, judgeWinRate) is decided on: pass when the whole interval is on the right "
        "side of the threshold, fail when it is wholly on the wrong side, wait otherwise.",
    )
    gates: list[Gate] = Field(
        default_factory=list, max_length=16,
        description="Thresholds on the candidate's figures. Without an errorRate or errorRateVsStable "
        "gate, errorRate <= 0.05 is checked as well.",
    )
    probes: Probes = Field(default_factory=Probes)

    def effective_gates(self) -> list[Gate]:
        """The gates an analysis checks: the declared ones, plus the default error-rate gate."""
        if any(g.metric in ("errorRate", "errorRateVsStable") for g in self.gates):
            return list(self.gates)
        return [*self.gates, Gate.model_validate(DEFAULT_ERROR_GATE)]


class RolloutStep(ApiModel):
    """Exactly one of setWeight, pause or analysis."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "[has(self.setWeight), has(self.pause), has(self.analysis)].filter(x, x).size() == 1",
                    "message": "a step is exactly one of setWeight, pause or analysis",
                }
            ]
        }
    )

    set_weight: int | None = Field(default=None, ge=0, le=100)
    pause: Duration | dict[str, Any] | None = Field(
        default=None, description="A duration, or {} to wait for promote."
    )
    analysis: dict[str, Any] | None = Field(default=None, description="{}: run the analysis gates now.")

    @model_validator(mode="after")
    def _one(self) -> "RolloutStep":
        chosen = [n for n in ("set_weight", "pause", "analysis") if getattr(self, n) is not None]
        if len(chosen) != 1:
            raise cross_field("", chosen or None, "a step is exactly one of setWeight, pause or analysis")
        if isinstance(self.pause, dict) and self.pause:
            raise cross_field("pause", self.pause, "pause is a duration or {} (wait for promote)")
        return self


class Rollout(ApiModel):
    stable: Name
    candidate: Name
    steps: list[RolloutStep] = Field(
        default_factory=lambda: [
            RolloutStep(set_weight=10),
            RolloutStep(analysis={}),
            RolloutStep(set_weight=50),
            RolloutStep(analysis={}),
            RolloutStep(set_weight=100),
        ],
        max_length=64,
    )
    analysis: Analysis = Field(default_factory=Analysis)
    auto_rollback: bool = True
    progress_deadline: Duration = Field(
        default="10m",
        description="How long the rollout may hold without evidence (the candidate not serving, stats "
        "unreadable or partial) before it is rolled back.",
    )

    @model_validator(mode="after")
    def _distinct(self) -> "Rollout":
        if self.stable == self.candidate:
            raise cross_field("candidate", self.candidate, "candidate must differ from stable")
        return self


class ServiceAuth(ApiModel):
    """API keys of the service (docs/serving.md, Authentication).

    The operator reads the keys from Secrets; `anneal run`, which has no Secrets, from environment
    variables (`apiKeysEnv` / `adminKeyEnv`, default `ANNEAL_API_KEYS` / `ANNEAL_ADMIN_KEY`).
    """

    api_keys_secret: str | None = Field(
        default=None, pattern=DNS_SUBDOMAIN, max_length=253,
        description="A Secret in the service's namespace: every value in it is accepted as an "
        "`Authorization: Bearer` key on the OpenAI endpoints. Unset (and no apiKeysEnv): those are open.")
    admin_key_secret: SecretKeySelector | None = Field(
        default=None,
        description="The admin key, needed for /-/stats, /-/metrics and for pinning a variant (the "
        "override header or `model: <variant>`); the rollout controllers send it.")
    api_keys_env: str | None = Field(
        default=None, pattern=ENV_NAME, max_length=253,
        description="Embedded mode: the environment variable holding the API keys (comma-separated); "
        "default ANNEAL_API_KEYS when apiKeysSecret is set.")
    admin_key_env: str | None = Field(
        default=None, pattern=ENV_NAME, max_length=253,
        description="Embedded mode: the environment variable holding the admin key; default ANNEAL_ADMIN_KEY.")

    @model_validator(mode="after")
    def _admin(self) -> "ServiceAuth":
        if self.admin_key_secret is None and self.admin_key_env is None:
            raise cross_field("adminKeySecret", None, "auth needs an admin key (adminKeySecret, or adminKeyEnv in "
                              "embedded mode): /-/stats, which the rollout controller reads, takes it")
        return self


class ServiceMlflow(MlflowTarget):
    champion_alias: str = Field(default="champion", pattern=r"^[A-Za-z0-9_-]+$", max_length=64)
    challenger_alias: str = Field(default="challenger", pattern=r"^[A-Za-z0-9_-]+$", max_length=64)


class ModelServiceSpec(ApiModel):
    """Spec of a ModelService."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.variants.all(v, self.variants.exists_one(w, w.name == v.name))",
                    "message": "variant names must be unique",
                    "fieldPath": ".variants",
                },
                {
                    "rule": "(self.variants.size() == 1 && !has(self.variants[0].weight)) || "
                    "self.variants.map(v, has(v.weight) ? v.weight : 0).sum() == 100",
                    "message": "the weights of all variants must sum to 100",
                    "fieldPath": ".variants",
                },
                {
                    "rule": "!has(self.rollout) || (self.variants.exists(v, v.name == self.rollout.stable) && "
                    "self.variants.exists(v, v.name == self.rollout.candidate))",
                    "message": "rollout.stable and rollout.candidate must name variants",
                    "fieldPath": ".rollout",
                },
            ]
        }
    )

    variants: list[Variant] = Field(min_length=1, max_length=8)
    routing: Routing = Field(default_factory=Routing)
    rollout: Rollout | None = None
    ray: RayTarget = Field(default_factory=RayTarget)
    mlflow: ServiceMlflow = Field(default_factory=ServiceMlflow)
    auth: ServiceAuth | None = Field(
        default=None, description="API keys; without it every endpoint is open (docs/serving.md, Authentication).")

    @model_validator(mode="after")
    def _rules(self) -> "ModelServiceSpec":
        names = [v.name for v in self.variants]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise cross_field(f"variants[{i}].name", name, "variant names must be unique")
        if not (len(self.variants) == 1 and self.variants[0].weight is None):
            total = sum(v.weight or 0 for v in self.variants)
            if total != 100:
                i = len(self.variants) - 1
                raise cross_field(
                    f"variants[{i}].weight",
                    self.variants[i].weight,
                    f"the weights of all variants must sum to 100 (they sum to {total})",
                )
        known = set(names)
        r = self.routing
        if r.shadow is not None and r.shadow.variant not in known:
            raise cross_field("routing.shadow.variant", r.shadow.variant, f"must name a variant ({sorted(known)})")
        judge = r.shadow.judge if r.shadow is not None else None
        if judge is not None:
            if judge.variant not in known:
                raise cross_field("routing.shadow.judge.variant", judge.variant, f"must name a variant ({sorted(known)})")
            if judge.variant == r.shadow.variant:
                raise cross_field("routing.shadow.judge.variant", judge.variant, "the judge cannot be the mirrored variant")
            if self.variant(judge.variant).weight:
                raise cross_field("routing.shadow.judge.variant", judge.variant,
                                  "a judge takes no user traffic: give it weight 0")
        if r.policy == "dynamic":
            if r.dynamic is None:
                raise cross_field("routing.dynamic", None, "policy dynamic needs routing.dynamic {small, large}")
            for field in ("small", "large"):
                if getattr(r.dynamic, field) not in known:
                    raise cross_field(
                        f"routing.dynamic.{field}", getattr(r.dynamic, field), f"must name a variant ({sorted(known)})"
                    )
        if self.rollout is not None:
            for field in ("stable", "candidate"):
                if getattr(self.rollout, field) not in known:
                    raise cross_field(
                        f"rollout.{field}", getattr(self.rollout, field), f"must name a variant ({sorted(known)})"
                    )
            for i, gate in enumerate(self.rollout.analysis.gates):
                if gate.metric == "judgeWinRate" and judge is None:
                    raise cross_field(f"rollout.analysis.gates[{i}].metric", gate.metric,
                                      "judgeWinRate needs a judge: set routing.shadow.judge")
                if gate.metric in SHADOW_METRICS and (r.shadow is None or r.shadow.variant != self.rollout.candidate):
                    raise cross_field(
                        f"rollout.analysis.gates[{i}].metric", gate.metric,
                        f"a shadow gate compares the candidate's mirrored answers: set routing.shadow.variant "
                        f"to the candidate ({self.rollout.candidate!r})",
                    )
        return self

    def weights(self) -> dict[str, int]:
        """The weights as declared (a lone variant without a weight gets 100)."""
        if len(self.variants) == 1 and self.variants[0].weight is None:
            return {self.variants[0].name: 100}
        return {v.name: int(v.weight or 0) for v in self.variants}

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)


class ServicePhase(str, enum.Enum):
    DEPLOYING = "Deploying"
    READY = "Ready"
    ROLLING_OUT = "RollingOut"
    PAUSED = "Paused"
    PROMOTED = "Promoted"
    ROLLED_BACK = "RolledBack"
    FAILED = "Failed"


class GateCheck(ApiModel):
    """One gate of one analysis: the figure, its interval (rate gates) and the gate's verdict."""

    metric: str
    bound: Literal["max", "min"]
    threshold: float
    value: float | None = None
    low: float | None = Field(default=None, description="Lower end of the confidence interval (rate gates).")
    high: float | None = Field(default=None, description="Upper end of the confidence interval (rate gates).")
    samples: int | None = Field(default=None, description="Observations the figure is computed over.")
    verdict: Literal["pass", "fail", "wait"]


class AnalysisResult(ApiModel):
    """One analysis of a rollout: its verdict, the figures it saw and why."""

    time: str
    step: int
    verdict: Literal["pass", "fail", "wait"]
    figures: dict[str, float | None] = Field(default_factory=dict)
    failed_gates: list[str] = Field(default_factory=list)
    reason: str = ""
    consecutive_failures: int | None = None
    candidate_weight: int | None = None
    gates: list[GateCheck] = Field(default_factory=list)
    confidence: float | None = None


class RolloutStatus(ApiModel):
    """What the rollout state machine keeps between ticks.

    Every field is declared (not kept as extra fields) so that the CRD's structural schema
    lists it and the API server does not prune it on a status write.
    """

    step: int = 0
    step_started_at: float | None = None
    candidate_model: str | None = None
    consecutive_failures: int = 0
    last_analysis: AnalysisResult | None = None
    history: list[AnalysisResult] = Field(default_factory=list)
    outcome: str | None = None
    candidate: str | None = Field(default=None, description="The candidate variant this rollout is for.")
    stable: str | None = Field(default=None, description="The stable variant this rollout is for.")
    stable_model: str | None = None
    steps_hash: str | None = Field(default=None, description="Digest of spec.rollout.steps when last seen.")
    attempt: int | None = None
    started_at: float | None = None
    finished_at: float | None = None
    last_analysis_at: float | None = None
    paused_reason: Literal["PauseStep", "WaitingForPromote", "AnalysisFailed"] | None = None
    reason: str | None = Field(default=None, description="Why the rollout ended (or paused).")
    analyses: int | None = None
    handled_commands: dict[str, str] = Field(
        default_factory=dict, description="Annotation → value already acted on (each value acts once).")
    holding: str | None = Field(default=None, description="Why no step advances now (no evidence), if so.")
    holding_since: float | None = None
    mlflow_run_id: str | None = Field(default=None, description="The rollout's MLflow run.")


class ModelServiceStatus(StatusBase):
    phase: Literal["Deploying", "Ready", "RollingOut", "Paused", "Promoted", "RolledBack", "Failed"] | None = None
    endpoint: str | None = None
    weights: dict[str, int] = Field(default_factory=dict)
    weights_summary: str | None = None
    models: dict[str, str] = Field(default_factory=dict)
    rollout: RolloutStatus | None = None
    recorded_deployment: str | None = Field(
        default=None, description="Digest of the models and weights last recorded in MLflow (the service's "
                                  "serve-<app> run; see docs/serving.md).")
