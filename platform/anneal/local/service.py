"""Serving a ModelService on this machine: `anneal run service.yaml` (local Ray + Serve on loopback)."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anneal.control.refs import Lookup
from anneal.control.service import app_name as serve_app_name
from anneal.serve.routing import weights_summary

log = logging.getLogger("anneal.local.service")


#: Share of the local Ray's CPUs the service's replicas may reserve (the rest is left for Serve's
#: own actors and the machine).
CPU_BUDGET = 0.8


class ServiceError(RuntimeError):
    """The service cannot be started; the message names the field or the step at fault."""


def default_lookup(spec: Any, settings: Any) -> Lookup:
    """How an embedded service observes the resources its variants name: their runs in the service's MLflow.

    That is `spec.mlflow.trackingUri` when set (where its jobs recorded themselves), else the
    settings' tracking URI.
    """
    from anneal.local.jobs import mlflow_lookup

    return mlflow_lookup(spec.mlflow.tracking_uri or settings.tracking_uri)


def resolve_model_uris(spec: Any, namespace: str, lookup: Lookup | None = None,
                       base_dir: Path | None = None) -> dict[str, str]:
    """variant name → a model URI every replica can load.

    Relative paths become absolute (replicas do not share the caller's working directory);
    `fromResource` is resolved by `anneal.control.refs` through `lookup`.

    Raises:
        ServiceError: naming `spec.variants[i].model` when a model cannot be resolved.
    """
    from anneal.control import refs
    from anneal.modeling.uris import parse_model_uri

    out = {}
    for i, v in enumerate(spec.variants):
        field_path = f"spec.variants[{i}].model"
        ref = v.model
        if ref is None:  # an openai variant: what it serves is its backend
            out[v.name] = v.served_model()
            continue
        if ref.uri:
            try:
                parsed = parse_model_uri(ref.uri)
            except ValueError as e:
                raise ServiceError(f"{field_path}.uri: {e}") from None
            if parsed.scheme == "file":
                path = Path(parsed.path)
                if not path.is_absolute():
                    path = (base_dir or Path.cwd()) / path
                out[v.name] = str(path.resolve())
            else:
                out[v.name] = ref.uri
        elif ref.from_resource is None:
            raise ServiceError(f"{field_path}: fromStage is only valid inside a ModelPipeline")
    found = refs.references(spec)
    if found:
        if lookup is None:
            first = found[0]
            raise ServiceError(f"{first.field}: {first.kind}/{first.name} cannot be looked up here "
                               "(run the producing job first, or give the model as a uri)")
        try:
            out.update(refs.resolve(spec, namespace, lookup))
        except refs.Unresolved as e:
            raise ServiceError(f"{e}; run that resource first") from None
        except Exception as e:  # the store could not be read
            raise ServiceError(f"spec.variants: fromResource: {e}") from None
    return out


def auth_keys(names: Mapping[str, Any], environ: Mapping[str, str]) -> str | None:
    """Check that the key variables the app's router will read are set here; the admin key.

    `anneal run` starts the local Ray from this process, so its Serve replicas inherit these
    variables: the keys never go into a Serve config. (With `ANNEAL_RAY_ADDRESS`, set them where
    that Ray was started too.)

    Args:
        names: `api_keys_env` and `admin_key_env` (`anneal.serve.app.auth_env` of the spec).
        environ: this process's environment.

    Raises:
        ServiceError: a variable is not set, naming the spec field that asks for it.
    """
    from anneal.serve.auth import AuthConfigError, load_keys

    admin_var = names.get("admin_key_env")
    try:
        load_keys(names.get("api_keys_env") or [], admin_var, environ)
    except AuthConfigError as e:
        raise ServiceError(f"spec.auth: {e}; export it before `anneal run`") from None
    return environ[admin_var].strip() if admin_var else None


def backend_keys(spec: Any, environ: Mapping[str, str]) -> None:
    """Check that the variable each openai variant reads its backend's API key from is set here
    (the local Ray inherits it; the key never goes into a Serve config).

    Raises:
        ServiceError: naming the variant's `backend` field and the variable.
    """
    from anneal.serve.app import backend_key_env

    for i, v in enumerate(spec.variants):
        var = backend_key_env(v)
        if var and not environ.get(var, "").strip():
            field_path = f"spec.variants[{i}].backend." + ("apiKeyEnv" if v.backend.api_key_env else "apiKeySecret")
            raise ServiceError(f"{field_path}: the backend's API key is read from the environment variable {var}, "
                               "which is not set; export it before `anneal run`")


def vllm_python(spec: Any, configured: str | None, checkout: Path | None = None) -> str | None:
    """The Python a vllm variant's replicas run in, or None when the spec has no vllm variant.

    `configured` (`ANNEAL_RAY_VLLM_PYTHON`) wins; else the checkout's `.venv-vllm` (scripts/setup.sh).

    Raises:
        ServiceError: a vllm variant and no serving environment: what to run.
    """
    if not any(v.engine == "vllm" for v in spec.variants):
        return None
    if configured:
        if not Path(configured).exists():
            raise ServiceError(f"ANNEAL_RAY_VLLM_PYTHON={configured}: no such file (the Python of the vllm serving "
                               "environment; scripts/setup.sh builds .venv-vllm)")
        return configured
    root = checkout or Path(__file__).resolve().parents[3]
    python = root / ".venv-vllm" / "bin" / "python"
    if python.exists():
        return str(python)
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return None  # vllm in this Python: Ray's own will do
    raise ServiceError("a vllm variant needs the vllm serving environment: run scripts/setup.sh (it builds "
                       f"{python}), or set ANNEAL_RAY_VLLM_PYTHON to a Python with vllm and anneal installed")


def cpu_scale(spec: Any, available_cpus: float, router_cpus: float = 0.5) -> float:
    """The factor on CPU requests that lets every replica of `spec` fit in `available_cpus`.

    A spec sized for a cluster (1 CPU per replica by default) must still start on a laptop;
    replicas of tiny models are light, so requests are scaled down, never up.
    """
    total = router_cpus
    for v in spec.variants:
        replicas = v.autoscaling.min_replicas if v.autoscaling else (v.replicas if v.replicas is not None else 1)
        total += max(1, replicas) * v.resources.cpus_per_worker
    return min(1.0, CPU_BUDGET * available_cpus / total) if total > 0 else 1.0


def service_status(app_name: str, endpoint: str, weights: dict[str, int], models: dict[str, str],
                   phase: str = "Ready", message: str | None = None) -> dict[str, Any]:
    """A ModelService status dict (camelCase, as written to `.status`)."""
    status: dict[str, Any] = {
        "phase": phase,
        "endpoint": endpoint,
        "weights": dict(weights),
        "weightsSummary": weights_summary(weights),
        "models": dict(models),
        "app": app_name,
    }
    if message:
        status["message"] = message
    return status


@dataclass
class RunningService:
    """A ModelService deployed on the local Serve; `stop()` takes it down."""

    app_name: str
    endpoint: str
    args: Any
    models: dict[str, str]
    weights: dict[str, int] = field(default_factory=dict)
    started_ray: bool = False
    recorder: Any = None  # anneal.tracking.deployments.DeploymentRecorder
    #: The admin key (`spec.auth`), which this driver's stats reads and probes send.
    admin_key: str | None = field(default=None, repr=False)

    def status(self) -> dict[str, Any]:
        return service_status(self.app_name, self.endpoint, self.weights, self.models)

    def apply_weights(self, weights: dict[str, int], routing: dict[str, Any] | None = None) -> dict[str, int]:
        """Contract 2 on the local Serve (see `anneal.serve.deploy.apply_weights`); the change is recorded in MLflow."""
        from anneal.serve.deploy import apply_weights

        self.weights = apply_weights(self.app_name, self.args, weights, routing=routing)
        if self.recorder is not None:
            self.recorder.update(self.models, self.weights)
        return self.weights

    def stop(self) -> None:
        from ray import serve

        try:
            serve.delete(self.app_name)
        except Exception as e:  # already gone, or Serve is shutting down
            log.debug("serve.delete(%s): %s", self.app_name, e)
        if self.started_ray:
            import ray

            serve.shutdown()
            ray.shutdown()


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _serving_port(asked: int) -> int:
    """The port Serve's proxy listens on: a Serve that was already running (a shared Ray) keeps its own."""
    import ray
    from ray.serve.context import _get_global_client

    try:
        actual = int(ray.get(_get_global_client()._controller.get_http_config.remote()).port)
    except Exception as e:  # noqa: BLE001 - private API moved: trust what was asked
        log.debug("cannot read Serve's HTTP config: %s", e)
        return asked
    if actual != asked:
        log.warning("Serve was already running on port %d (not %d): serving there", actual, asked)
    return actual


def start_http(host: str = "127.0.0.1", port: int = 8000, attempts: int = 3) -> int:
    """Start Serve's HTTP proxy on `host:port` (idempotent) and return the port it listens on.

    `port=0` picks a free port. A free port found this way can still be taken by another process
    (Ray itself opens ports while it starts) before the proxy binds it, so a bind failure on a
    picked port shuts Serve down and tries another one, up to `attempts` times. A fixed port that
    is taken fails at once with a message that names it.

    Raises:
        ServiceError: the proxy could not bind.
    """
    from ray import serve

    last: Exception | None = None
    for _ in range(attempts if port == 0 else 1):
        chosen = port or _free_port(host)
        try:
            serve.start(http_options={"host": host, "port": chosen})
            return _serving_port(chosen)
        except Exception as e:  # noqa: BLE001 - Ray wraps the bind error in RayTaskError
            if "bind" not in str(e).lower():
                raise
            last = e
            log.warning("Serve could not bind %s:%s; %s", host, chosen,
                        "trying another port" if port == 0 else "is the port in use?")
            try:
                serve.shutdown()
            except Exception as down:  # noqa: BLE001
                log.debug("serve.shutdown after a failed start: %s", down)
    raise ServiceError(f"Serve's HTTP proxy could not listen on {host}:{port or 'a free port'}: "
                       f"{str(last).strip().splitlines()[-1]}")


def start_service(
    manifest: Any,
    *,
    settings: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    route_prefix: str = "/",
    lookup: Lookup | None = None,
    base_dir: Path | None = None,
    wait_s: float = 600.0,
) -> RunningService:
    """Deploy a ModelService manifest on a local Ray Serve (started if needed) and wait until it serves.

    Args:
        manifest: a parsed `Manifest` (kind ModelService) or the manifest dict.
        settings: `anneal.settings.Settings` (cache dir, MLflow tracking URI, Ray address/CPUs).
        host, port: where Serve's HTTP proxy listens (loopback by default; port 0 picks a free one).
        route_prefix: URL prefix of this service.
        lookup: observes the resources `fromResource` names; None (default) reads their runs
            from the service's MLflow (`spec.mlflow.trackingUri`, else the settings'), as
            `anneal.local.jobs.mlflow_lookup` does.
        base_dir: directory relative model paths are relative to (default: the working directory).
        wait_s: how long model loading may take.

    Raises:
        ServiceError: the manifest is not a ModelService or a model cannot be resolved.
    """
    import os

    import ray
    from ray import serve

    from anneal.api.resources import Manifest, parse_manifest
    from anneal.serve.app import args_from_spec, auth_env, build_serve_config
    from anneal.serve.deploy import deploy_entries

    m = manifest if isinstance(manifest, Manifest) else parse_manifest(manifest)
    if m.kind != "ModelService":
        raise ServiceError(f"kind: {m.kind!r}: start_service serves ModelService resources")
    spec = m.spec
    admin_key = auth_keys(auth_env(spec), os.environ)
    backend_keys(spec, os.environ)
    tracking = spec.mlflow.tracking_uri or settings.tracking_uri
    models = resolve_model_uris(spec, m.namespace, lookup or default_lookup(spec, settings), base_dir)
    python_for_vllm = vllm_python(spec, settings.ray.vllm_python)
    # `started`: this process started the Ray (and so its Serve) and takes both down at the end.
    # Connected to a Ray of `ANNEAL_RAY_ADDRESS` instead, Serve serves other apps too: it stays.
    started = False
    if not ray.is_initialized():
        if settings.ray.address:
            ray.init(address=settings.ray.address, log_to_driver=False)
        else:
            ray.init(num_cpus=settings.ray.num_cpus, include_dashboard=settings.ray.include_dashboard,
                     log_to_driver=False)
            started = True
    try:
        port = start_http(host, port)
    except Exception:
        if started:
            ray.shutdown()
        raise
    from anneal.control.capacity import service_request, shortfall

    local = ray.cluster_resources()
    available = float(local.get("CPU", 1.0))
    # CPUs are scaled to fit (cpu_scale); anything else (GPUs) must be there as asked.
    short = shortfall({k: v for k, v in service_request(spec, 0.5).items() if k != "CPU"}, local)
    if short:
        log.warning("ModelService %s/%s %s (the local Ray)", m.namespace, m.name, short)
    app_name = serve_app_name(m.namespace, m.name)
    args = args_from_spec(
        app_name, spec, models,
        cache_dir=str(settings.anneal.cache_dir),
        tracking_uri=tracking,
        cpu_scale=cpu_scale(spec, available),
        route_prefix=route_prefix,
        vllm_python=python_for_vllm,
    )
    endpoint = f"http://{host}:{port}{route_prefix.rstrip('/')}"
    try:
        deploy_entries([build_serve_config(args)], wait_s=wait_s)
    except Exception as e:
        if started:
            serve.shutdown()
            ray.shutdown()
        raise ServiceError(f"ModelService {m.namespace}/{m.name} did not start: {e}") from e
    from anneal.tracking.deployments import DeploymentRecorder

    recorder = DeploymentRecorder(tracking,
                                  spec.mlflow.experiment or settings.mlflow.experiment,
                                  namespace=m.namespace, name=m.name, service=app_name)
    recorder.update(models, dict(args.weights))
    return RunningService(app_name, endpoint, args, models, dict(args.weights), started, recorder, admin_key)


def run_service(
    manifest: Any,
    *,
    settings: Any,
    duration: float | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    ready_callback: Callable[[dict[str, Any]], None] | None = None,
    lookup: Lookup | None = None,
    route_prefix: str = "/",
    stop_event: threading.Event | None = None,
) -> dict[str, Any]:
    """`anneal run service.yaml`: serve a ModelService on localhost until `duration` or Ctrl-C.

    Args:
        manifest: a parsed `Manifest` or the manifest dict.
        settings: `anneal.settings.Settings`.
        duration: seconds to serve; None: until interrupted (or `stop_event` is set).
        host, port: where Serve listens.
        ready_callback: called once with the status dict (phase Ready, endpoint, weights) when
            the service answers.
        lookup: observes the resources `fromResource` names (None: as `start_service`).
        route_prefix: URL prefix of the service.
        stop_event: set it (from another thread) to stop serving.

    Returns:
        The last status dict (phase `Ready` while it ran; the service is stopped on return).
    """
    service = start_service(manifest, settings=settings, host=host, port=port, lookup=lookup,
                            route_prefix=route_prefix)
    status = service.status()
    log.info("serving %s at %s (weights %s)", service.app_name, service.endpoint, status["weightsSummary"])
    if ready_callback is not None:
        ready_callback(status)
    try:
        _serve_until(duration, stop_event)
    finally:
        service.stop()
    return status


def _serve_until(duration: float | None, stop_event: threading.Event | None) -> None:
    """Block until `duration` passes, `stop_event` is set, SIGTERM or Ctrl-C."""
    stop = stop_event or threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    deadline = None if duration is None else time.monotonic() + duration
    try:
        while not stop.is_set():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            stop.wait(timeout=1.0 if left is None else min(1.0, left))
    except KeyboardInterrupt:
        log.info("interrupted: stopping")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run_service_manifest(manifest: Any, settings: Any, on_progress: Callable[[dict[str, Any]], None] | None = None,
                         *, duration: float | None = None, traffic: float = 0.0, port: int = 8000,
                         host: str = "127.0.0.1", stop_event: threading.Event | None = None,
                         **_: Any) -> dict[str, Any]:
    """`anneal run` for a ModelService (the `anneal.local.runner.run_manifest` hook).

    Serves the manifest, reports the Ready status through `on_progress`, then: with a
    `spec.rollout`, drives the rollout (`anneal.local.rollout.drive`) until it ends or
    `duration` passes; otherwise serves until `duration` or Ctrl-C, sending `traffic` req/s of
    built-in-task requests when asked.

    Returns:
        The final ModelService status dict.
    """
    service = start_service(manifest, settings=settings, host=host, port=port)
    status = service.status()
    if on_progress is not None:
        on_progress(status)
    spec = getattr(manifest, "spec", None)
    try:
        if spec is not None and spec.rollout is not None:
            from anneal.local.rollout import drive

            def show(update: Any) -> None:
                if on_progress is None:
                    return
                st = update.status
                ro = st.rollout
                last = ro.last_analysis if ro else None
                msg = f"step {ro.step if ro else 0}/{update.steps} {update.current_step} · {st.weights_summary or st.weights}"
                if last is not None:
                    msg += f" · analysis {last.verdict}: {last.reason}"
                on_progress({"phase": st.phase, "message": msg, "endpoint": service.endpoint})

            final = drive(manifest, endpoint=service.endpoint, app_name=service.app_name, args=service.args,
                          settings=settings, traffic_rps=traffic, stop_event=stop_event,
                          until_done=duration is None, timeout_s=duration, desired_models=service.models,
                          on_update=show, apply=lambda _app, _args, weights: service.apply_weights(weights),
                          admin_key=service.admin_key)
            out = final.to_dict() if hasattr(final, "to_dict") else dict(final)
            return {**status, **out}
        generator = None
        if traffic > 0:
            from anneal.local.rollout import TrafficGenerator

            generator = TrafficGenerator(service.endpoint, traffic, headers=(
                {"authorization": f"Bearer {service.admin_key}"} if service.admin_key else None)).start()
        try:
            _serve_until(duration, stop_event)
        finally:
            if generator is not None:
                generator.stop()
        return service.status()
    finally:
        service.stop()
