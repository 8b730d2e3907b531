"""ModelService handlers: the operator's driver of a service.

Each pass observes Serve (the Serve REST API of a shared cluster, or the KubeRay RayService
built from the same app args), the router's stats and the probe answers, calls the shared
rollout tick (`anneal.control.rollout`) with the `anneal.dev/promote|abort|retry`
annotations as commands, deploys the Serve config with the weights it decided, moves the
MLflow aliases, and writes status once."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any, Mapping
from urllib.parse import urlparse

import kopf

from anneal import API_GROUP, API_VERSION
from anneal.api.resources import KINDS, ManifestError, parse_spec
from anneal.api.service import ServicePhase
from anneal.control import refs
from anneal.control.service import app_name, live_weights, route_prefix
from anneal.runtime.jobs_api import ray_auth_headers
from anneal.runtime import kuberay
from anneal_operator.settings import endpoint_problems
from anneal_operator.context import CleanupRefused, OperatorContext, bounded_cleanup, event, invalid_spec_status, snapshot, with_condition

log = logging.getLogger("anneal_operator.service")

KIND = "ModelService"
# Serve's default HTTP port, and the serve port of KubeRay's `<name>-serve-svc`. On a shared
# cluster the real port is read from the Serve REST API; this is only the fallback.
DEFAULT_SERVE_PORT = 8000


# ------------------------------------------------------------------------- pure parts


def shared_endpoint(address: str, namespace: str, name: str, port: int = DEFAULT_SERVE_PORT) -> str:
    """The Serve HTTP endpoint of the app on a shared cluster.

    The host is the dashboard's (the address the operator reaches the cluster by): the proxy
    usually binds 0.0.0.0, which names no host a client can dial.
    """
    host = urlparse(address).hostname or "127.0.0.1"
    return f"http://{host}:{port}{route_prefix(namespace, name)}"


def serve_http_port(details: Mapping[str, Any]) -> int | None:
    """The port Serve's HTTP proxies listen on, from the body of `GET /api/serve/applications/`.

    Args:
        details: Serve's instance details (`http_options`, `target_groups`, `applications`, ...).

    Returns:
        `http_options.port`; else the port of the HTTP target group's first proxy (Ray lists in
        `http_options` only the options Serve was started with explicitly, so a port left at
        Serve's default, which `RAY_SERVE_DEFAULT_HTTP_PORT` may change, appears only there);
        None when neither says, e.g. before Serve has started.
    """
    port = (details.get("http_options") or {}).get("port")
    if _is_port(port):
        return port
    for group in details.get("target_groups") or []:
        if str(group.get("protocol") or "").upper() != "HTTP":
            continue
        for target in group.get("targets") or []:
            if _is_port(target.get("port")):
                return target["port"]
    return None


def _is_port(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536


def serve_app_status(details: Mapping[str, Any], app: str) -> str | None:
    """The status of one Serve application in Serve's instance details (None: not deployed)."""
    return ((details.get("applications") or {}).get(app) or {}).get("status")


def rayservice_endpoint(rayservice: str, namespace: str, name: str) -> str:
    """KubeRay's serve Service of a RayService (`<name>-serve-svc`)."""
    return f"http://{rayservice}-serve-svc.{namespace}.svc:{DEFAULT_SERVE_PORT}{route_prefix(namespace, name)}"


def args_hash(entry: Mapping[str, Any]) -> str:
    """A digest of a Serve config entry without the router's live weights (those change in place).

    The variants' deployments are in it: a variant's model lives in its `user_config`.
    """
    from anneal.serve.app import ROUTER_DEPLOYMENT

    stripped = {**entry, "deployments": [d for d in entry.get("deployments") or [] if d.get("name") != ROUTER_DEPLOYMENT]}
    return hashlib.sha256(json.dumps(stripped, sort_keys=True).encode()).hexdigest()[:16]


def serve_phase(app_status: str | None) -> str:
    """The ModelService phase while no rollout runs, from the Serve app (or RayService) state."""
    if app_status in ("RUNNING", "Running"):
        return ServicePhase.READY.value
    if app_status in ("DEPLOY_FAILED", "UNHEALTHY", "Failed"):
        return ServicePhase.FAILED.value
    return ServicePhase.DEPLOYING.value


# ------------------------------------------------------------------------ reconcile


def _resolve_models(op: OperatorContext, spec: Any, namespace: str) -> dict[str, str]:
    """variant → model URI: the spec's `uri`, or what its `fromResource` resolves to (`anneal.control.refs`)."""
    def observe(kind: str, ns: str, name: str) -> Mapping[str, Any] | None:
        other = op.get(kind, ns, name)
        return None if other is None else (other.get("status") or {})

    resolved = refs.resolve(spec, namespace, observe)
    return {v.name: resolved.get(v.name) or v.served_model() for v in spec.variants}


def _serve_details(address: str) -> dict[str, Any]:
    """`GET /api/serve/applications/` of a shared cluster: Serve's HTTP options and app states."""
    import httpx

    r = httpx.get(address.rstrip("/") + "/api/serve/applications/", timeout=10, headers=ray_auth_headers())
    r.raise_for_status()
    return r.json()


def serve_app_problem(details: Mapping[str, Any], app: str) -> str | None:
    """Why a Serve app is not serving, in Serve's own words (app message, unhealthy deployments)."""
    body = (details.get("applications") or {}).get(app) or {}
    parts = []
    if body.get("status") not in (None, "RUNNING") and body.get("message"):
        parts.append(str(body["message"]).strip())
    for dep_name, dep in (body.get("deployments") or {}).items():
        if dep.get("status") not in (None, "HEALTHY") and dep.get("message"):
            parts.append(f"{dep_name} {dep.get('status')}: {str(dep['message']).strip()}")
    return "; ".join(parts)[:2000] or None


class AuthWaiting(Exception):
    """A Secret that `spec.auth` names cannot be read yet; the message says which and why."""


def _secret_value(op: OperatorContext, namespace: str, name: str, key: str | None = None) -> Any:
    """The decoded values of a Secret (`key` None: all of them, as a dict), or AuthWaiting."""
    import base64
    import binascii

    try:
        data = op.read_secret(namespace, name)
    except PermissionError as exc:
        raise AuthWaiting(str(exc)) from None
    if data is None:
        raise AuthWaiting(f"Secret {name} does not exist in namespace {namespace}")
    wanted = dict(data) if key is None else {key: data.get(key)}
    out = {}
    for k, v in wanted.items():
        if v is None:
            raise AuthWaiting(f"Secret {namespace}/{name} has no key {k}")
        try:
            out[k] = base64.b64decode(v, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise AuthWaiting(f"key {k} of Secret {namespace}/{name} is not UTF-8 text") from None
    return out if key is None else out[key]


def service_auth(op: OperatorContext, spec: Any, namespace: str) -> tuple[Any, dict[str, str], str | None]:
    """The router's key variables (`anneal.serve.auth.secret_key_env`), their values, and the admin key.

    The values go only where no Secret reference can: the Serve REST API of a shared cluster
    (an app's `runtime_env`). A RayService's containers read them from the Secrets themselves.

    Raises:
        AuthWaiting: a Secret or key of `spec.auth` is not there (or the operator may not read it).
    """
    from anneal.serve.auth import secret_key_env

    a = spec.auth
    if a is None:
        return secret_key_env(None, ()), {}, None
    api = _secret_value(op, namespace, a.api_keys_secret) if a.api_keys_secret else {}
    if a.api_keys_secret and not api:
        raise AuthWaiting(f"Secret {namespace}/{a.api_keys_secret} (spec.auth.apiKeysSecret) holds no keys")
    env = secret_key_env(a, list(api))
    admin = None
    if a.admin_key_secret is not None:
        admin = _secret_value(op, namespace, a.admin_key_secret.name, a.admin_key_secret.key).strip()
    values = {ref.var: (admin if ref.var == env.admin_key_env else api[ref.key]) for ref in env.refs}
    return env, values, admin


def backend_key_values(op: OperatorContext, refs: tuple, namespace: str) -> dict[str, str]:
    """The values of the openai variants' backend keys (`anneal.serve.app.backend_secret_refs`), for a
    shared cluster only: its Serve REST API takes no Secret reference.

    Raises:
        AuthWaiting: a Secret or key is not there (or the operator may not read it).
    """
    return {ref.var: _secret_value(op, namespace, ref.name, ref.key).strip() for ref in refs}


def reconcile(op: OperatorContext, body: Any, meta: Mapping[str, Any]) -> None:
    """One pass: observe Serve (and the stats), decide (`anneal.control.rollout.tick`), deploy, write status once."""
    from anneal.serve.app import args_from_spec, backend_secret_refs, build_serve_config

    ns, name, generation = meta["namespace"], meta["name"], meta.get("generation")
    old = op.current_status(body)
    try:
        spec = parse_spec(KIND, dict(body.get("spec") or {}))
        problems = endpoint_problems(spec, op.settings)
        if problems:
            raise ManifestError(problems)
    except ManifestError as exc:
        new = invalid_spec_status(old, exc, generation)
        if op.write_status(KIND, body, old, new):
            event(body, "Warning", "InvalidSpec", str(exc))
        return
    s = op.settings
    try:
        uris = _resolve_models(op, spec, ns)
    except refs.Unresolved as exc:
        new = with_condition({**old, "phase": old.get("phase") or ServicePhase.DEPLOYING.value, "message": f"waiting for {exc}"},
                             "Ready", "False", "WaitingForInput", f"waiting for {exc}")
        op.write_status(KIND, body, old, new)
        raise kopf.TemporaryError(f"waiting for {exc}", delay=10) from None
    try:
        key_env, key_values, admin_key = service_auth(op, spec, ns)
    except AuthWaiting as exc:
        msg = f"waiting for spec.auth: {exc}"
        new = with_condition({**old, "phase": old.get("phase") or ServicePhase.DEPLOYING.value, "message": msg},
                             "Ready", "False", "WaitingForInput", msg)
        op.write_status(KIND, body, old, new)
        raise kopf.TemporaryError(msg, delay=10) from None
    address = spec.ray.address or s.ray_address
    # openai variants' backend keys: secretKeyRef variables in a RayService; values on a shared cluster.
    backend_refs = backend_secret_refs(spec)
    if address and backend_refs:
        try:
            key_values = {**key_values, **backend_key_values(op, backend_refs, ns)}
        except AuthWaiting as exc:
            msg = f"waiting for spec.variants[].backend.apiKeySecret: {exc}"
            new = with_condition({**old, "phase": old.get("phase") or ServicePhase.DEPLOYING.value, "message": msg},
                                 "Ready", "False", "WaitingForInput", msg)
            op.write_status(KIND, body, old, new)
            raise kopf.TemporaryError(msg, delay=10) from None
    tracking = spec.mlflow.tracking_uri or s.tracking_uri
    app = app_name(ns, name)
    args = args_from_spec(app, spec, uris, cache_dir=s.cache_dir, tracking_uri=tracking, key_from_secrets=True,
                          route_prefix=route_prefix(ns, name), router_num_cpus=s.router_cpus, **key_env.app_args())
    events: list[tuple[str, str, str]] = []
    rs_name = kuberay.kuberay_name(name, "-serve")
    # Observe.
    problem = None
    if address:
        details = _serve_details(address)
        app_status = serve_app_status(details, app)
        problem = serve_app_problem(details, app)
        port = serve_http_port(details)
        endpoint = shared_endpoint(address, ns, name, port or DEFAULT_SERVE_PORT)
        if port is None and old.get("endpoint") != endpoint:
            log.warning("Serve REST API at %s reports no HTTP port (is Serve running?); %s assumes Serve's "
                        "default port %d", address, app, DEFAULT_SERVE_PORT)
    else:
        endpoint = rayservice_endpoint(rs_name, ns, name)
        app_status = _rayservice_app_status(op, ns, rs_name, app)
    # Decide.
    if spec.rollout is None:
        status = dict(old)
        if old.get("phase") in (ServicePhase.ROLLING_OUT, ServicePhase.PAUSED):
            events.append(("Warning", "RolloutRemoved", "the rollout section was removed mid-rollout; declared "
                                                        "weights apply"))
            op.forget_attachments(meta["uid"])
        status.update(models=dict(uris), weights=spec.weights(), phase=serve_phase(app_status))
        status["weightsSummary"] = " ".join(f"{k}={v}" for k, v in status["weights"].items())
    else:
        status = _rollout_pass(op, spec, body, old, endpoint, app, app_status, problem, uris, events, admin_key)
    weights = live_weights(spec, status.get("weights"))
    # Act: the Serve config with the decided weights (only the router's user_config differs on a
    # weight change, so Serve reconfigures it in place). Level-based: an app that vanished is redeployed.
    entry = build_serve_config(args, weights)
    if address and key_values:
        # The REST API takes no Secret reference: the keys travel in the app's runtime env (on
        # the cluster only; a RayService's containers read them from the Secrets instead).
        entry["runtime_env"] = {"env_vars": dict(key_values)}
    digest = args_hash(entry)
    short = None
    if address and (old.get("appHash") != digest or app_status is None):
        short = _capacity_problem(address, spec, s.router_cpus)
        if short:
            events.append(("Warning", "InsufficientResources", f"Serve app {app} {short}"))
    if address:
        if old.get("appHash") != digest or old.get("weights") != weights or app_status is None:
            from anneal.serve.deploy import deploy_entries

            deploy_entries([entry], dashboard_url=address, wait_s=0)
            if old.get("appHash") != digest or app_status is None:
                events.append(("Normal", "Deployed", f"Serve app {app} deployed to {address}"))
            else:
                events.append(("Normal", "WeightsApplied", f"Serve app {app}: weights {weights}"))
        status["appHash"] = digest
    else:
        _apply_rayservice(op, spec, meta, rs_name, entry, status, events, missing=app_status is None,
                          secret_env=key_env.refs + backend_refs)
        status["rayService"] = rs_name
    status.update(endpoint=endpoint, observedGeneration=generation)
    serving = app_status in ("RUNNING", "Running")
    if problem and not serving:
        status["message"] = f"Serve app {app}: {problem}"
    elif short and not serving:
        status["message"] = f"Serve app {app} {short}"
    with_condition(status, "Ready", "True" if serving else "False",
                   "Serving" if serving else ("ServeProblem" if problem else (app_status or "NotDeployed")),
                   f"Serve app {app}: {app_status or 'absent'}" + (f": {problem}" if problem else ""))
    if problem and not serving and problem != _last_problem(old):
        events.append(("Warning", "ServeProblem", f"Serve app {app}: {problem}"))
    if serving:
        _record_deployment(spec, ns, name, app, old, status, tracking, op.settings.experiment, events)
    if op.write_status(KIND, body, old, status):
        if status.get("phase") != old.get("phase"):
            op.metrics.phases.labels(KIND, status.get("phase") or "").inc()
            events.append(("Normal" if status.get("phase") != ServicePhase.FAILED else "Warning", status.get("phase") or "",
                           f"{app}: {status.get('phase')} at {endpoint}"))
        for type_, reason, message in events:
            event(body, type_, reason, message)


def _capacity_problem(address: str, spec: Any, router_cpus: float) -> str | None:
    """Why the service cannot fit the shared Ray cluster (`anneal.control.capacity`), None if it fits or is unknown."""
    from anneal.control.capacity import service_request, shortfall
    from anneal.runtime.jobs_api import cluster_resources_cached

    capacity = cluster_resources_cached(address)
    return shortfall(service_request(spec, router_cpus), capacity) if capacity else None


def _record_deployment(spec: Any, ns: str, name: str, app: str, old: Mapping[str, Any], status: dict[str, Any],
                       tracking: str, default_experiment: str, events: list) -> None:
    """The deployed end of the lineage in MLflow, once per change of models or weights (`status.recordedDeployment`)."""
    from anneal.tracking.deployments import deployment_digest, record_deployment

    models, weights = status.get("models") or {}, status.get("weights") or {}
    digest = deployment_digest(models, weights)
    if old.get("recordedDeployment") == digest:
        return
    try:
        record_deployment(tracking, spec.mlflow.experiment or default_experiment, namespace=ns, name=name,
                          service=app, models=models, weights=weights, previous_models=old.get("models"))
    except Exception as exc:  # noqa: BLE001 - MLflow down: serving goes on, the record is retried next pass
        log.warning("%s/%s: cannot record the deployment in MLflow %s: %s", ns, name, tracking, exc)
        return
    status["recordedDeployment"] = digest
    events.append(("Normal", "DeploymentRecorded", f"MLflow serve-{app}: " +
                   ", ".join(f"{v}={models[v]}@{weights.get(v, 0)}%" for v in models)))


def _last_problem(status: Mapping[str, Any]) -> str | None:
    for c in status.get("conditions") or []:
        if c.get("type") == "Ready" and c.get("reason") == "ServeProblem":
            return str(c.get("message") or "").split(": ", 2)[-1] or None
    return None


def _rayservice_app_status(op: OperatorContext, namespace: str, rs_name: str, app: str) -> str | None:
    """The Serve app's state as KubeRay reports it on the RayService (None: no RayService yet)."""
    from kubernetes.client.exceptions import ApiException

    try:
        obj = op.custom.get_namespaced_custom_object("ray.io", "v1", namespace, "rayservices", rs_name)
    except ApiException:
        return None
    st = obj.get("status") or {}
    return ((st.get("activeServiceStatus") or {}).get("applicationStatuses") or {}).get(app, {}).get("status") \
        or st.get("serviceStatus")


def _apply_rayservice(op: OperatorContext, spec: Any, meta: Mapping[str, Any], rs_name: str, entry: dict[str, Any],
                      status: dict[str, Any], events: list, missing: bool = False, secret_env: tuple = ()) -> None:
    """Create or update the service's RayService; level-based: one that vanished (`missing`) is created again.

    The RayService carries the router's weights in its serve config, so its `appHash` covers the
    whole entry (a weight change is a patch of `serveConfigV2`, which KubeRay applies in place).
    """
    from kubernetes.client.exceptions import ApiException

    s = op.settings
    resources = spec.variants[0].resources
    cluster = kuberay.ClusterOptions(
        image=spec.ray.image or s.image, ray_version=spec.ray.ray_version or s.ray_version,
        resources=resources.model_copy(update={"workers": max(1, sum((v.replicas or 1) for v in spec.variants))}),
        head_cpus=spec.ray.head_resources.cpus, head_memory=spec.ray.head_resources.memory,
        gang_scheduler=s.gang_scheduler, labels={"anneal.dev/kind": KIND, "anneal.dev/name": meta["name"]},
        shm_size=s.shm_size, shared_volume_claim=s.shared_volume_claim, shared_volume_path=s.shared_volume_path,
        secret_env=tuple(secret_env),  # the router's keys: `valueFrom.secretKeyRef`, never in the manifest
    )
    owner = kuberay.owner_reference(f"{API_GROUP}/{API_VERSION}", KIND, meta["name"], meta["uid"])
    body = kuberay.build_rayservice(rs_name, meta["namespace"], [entry], cluster, owner)
    wanted = hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:16]
    if status.get("appHash") != wanted or missing:
        try:
            op.custom.create_namespaced_custom_object("ray.io", "v1", meta["namespace"], "rayservices", body,
                                                      field_validation="Strict")
            events.append(("Normal", "RayServiceCreated", f"RayService {rs_name} created"))
        except ApiException as exc:
            if exc.status != 409:
                raise
            patch = {"serveConfigV2": body["spec"]["serveConfigV2"]}
            if secret_env:
                # The keys' variables are in the cluster's containers: one more key in the Secret is
                # one more variable, which the new serve config's router reads (KubeRay rolls the
                # cluster when its spec changes; an unchanged spec is left as it is).
                patch["rayClusterConfig"] = body["spec"]["rayClusterConfig"]
            op.custom.patch_namespaced_custom_object("ray.io", "v1", meta["namespace"], "rayservices", rs_name,
                                                     {"spec": patch})
    status["appHash"] = wanted


def _rollout_pass(op: OperatorContext, spec: Any, body: Any, old: Mapping[str, Any], endpoint: str, app: str,
                  app_status: str | None, problem: str | None, uris: Mapping[str, str], events: list,
                  admin_key: str | None = None) -> dict[str, Any]:
    """Observe the rollout (stats, probes, the annotations' command), call the shared tick, act on MLflow and probes."""
    from anneal.api.service import ModelServiceStatus
    from anneal.control.rollout import Observation, stats_since, tick
    from anneal.rollout import control
    from anneal.serve.client import stats as serve_stats

    uid = body["metadata"]["uid"]
    current = ModelServiceStatus.model_validate({k: v for k, v in old.items() if k not in ("appHash", "rayService")})
    stats, unavailable = None, None
    if app_status not in ("RUNNING", "Running"):
        unavailable = f"Serve app {app} is {app_status or 'not deployed'}" + (f": {problem}" if problem else "")
    else:
        try:
            stats = serve_stats(endpoint, stats_since(current), timeout=5.0, api_key=admin_key)
        except Exception as exc:  # noqa: BLE001 - no stats: the rollout holds
            unavailable = f"stats unreadable: {exc}"
            log.info("rollout of %s: %s", app, unavailable)
    probes = _probe_loop(op, uid, spec, endpoint, admin_key)
    handled = current.rollout.handled_commands if current.rollout else None
    command = control.command_from_annotations(body.get("metadata", {}).get("annotations"), handled)
    obs = Observation(stats, unavailable, probes.results() if probes else {}, command)
    t = tick(spec, current, obs, time.time(), desired_models=dict(uris))
    if probes is not None:
        probes.follow_plan(t.probes)
    tracker = _tracker(op, uid, spec, body["metadata"]["name"], t.status)
    if tracker is not None:
        tracker.apply(t.registry, t.status)
    op.metrics.observe_rollout(body["metadata"].get("namespace", ""), body["metadata"]["name"], spec, t.status,
                               t.events)
    for ev in t.events:
        events.append((ev.type, ev.reason, ev.message))
    new = t.status.to_dict()
    for key in ("appHash", "rayService"):  # the operator's own keys; declared fields come through the tick
        if key in old:
            new[key] = old[key]
    return new


def _probe_loop(op: OperatorContext, uid: str, spec: Any, endpoint: str, admin_key: str | None = None) -> Any:
    """The service's probe loop (kept across passes; restarted when the endpoint or the probes change)."""
    from anneal.control.rollout import wants_probes
    from anneal.rollout.probes import start_probe_loop

    key = json.dumps([endpoint, spec.rollout.to_dict() if spec.rollout else None, spec.routing.to_dict(),
                      hashlib.sha256((admin_key or "").encode()).hexdigest()[:16]],
                     sort_keys=True) if wants_probes(spec) else None
    held = op.attachment(uid, "probes")
    if held is not None and held[0] == key:
        return held[1]
    if held is not None:
        held[1].stop()
    loop = None
    if key is not None:
        try:
            loop = start_probe_loop(spec, endpoint, admin_key)
        except ValueError as exc:
            log.warning("%s: accuracy probes cannot start: %s", endpoint, exc)
    op.attach(uid, "probes", (key, loop) if loop is not None else None, close=lambda h: h[1].stop())
    return loop


def _tracker(op: OperatorContext, uid: str, spec: Any, name: str, status: Any) -> Any:
    """The service's MLflow rollout tracker (aliases, rolled-back tag, the rollout run), when its models are registered."""
    from anneal.rollout.aliases import RolloutTracker, parse_registry_uri

    rs = status.rollout
    if rs is None or not any(parse_registry_uri(u) for u in (rs.candidate_model, rs.stable_model)):
        return None
    tracking = spec.mlflow.tracking_uri or op.settings.tracking_uri
    key = (tracking, spec.mlflow.experiment or op.settings.experiment, spec.mlflow.champion_alias,
           spec.mlflow.challenger_alias)
    held = op.attachment(uid, "tracker")
    if held is not None and held[0] == key:
        return held[1]
    try:
        tracker = RolloutTracker(tracking, key[1], name, champion_alias=key[2], challenger_alias=key[3])
    except Exception as exc:  # noqa: BLE001 - MLflow down: aliases wait, the rollout goes on
        log.warning("%s: MLflow unavailable, aliases will not move this pass: %s", name, exc)
        return None
    op.attach(uid, "tracker", (key, tracker))
    return tracker


def register(registry: kopf.OperatorRegistry, op: OperatorContext) -> None:
    plural = KINDS[KIND].plural

    @kopf.timer(API_GROUP, API_VERSION, plural, interval=max(1.0, op.settings.poll_interval / 2), registry=registry,
                id="reconcile")
    @op.metrics.timed(KIND, "reconcile")
    def service_timer(body: kopf.Body, meta: kopf.Meta, **_: Any) -> None:
        with op.lock(meta["uid"]):
            snap = snapshot(body)
            reconcile(op, snap, snap["metadata"])

    @kopf.on.delete(API_GROUP, API_VERSION, plural, registry=registry, id="remove-serve-app")
    @op.metrics.timed(KIND, "delete")
    def service_delete(body: kopf.Body, meta: kopf.Meta, spec: kopf.Spec, runtime: Any = None, **_: Any) -> None:
        """Remove the Serve app from a shared cluster (a RayService goes with its owner); bounded in time."""
        address = (spec.get("ray") or {}).get("address") or op.settings.ray_address
        op.forget(meta["uid"])  # stops its probe loop before the app goes
        op.metrics.forget_rollout(meta["namespace"], meta["name"])
        if address:
            app = app_name(meta["namespace"], meta["name"])
            bounded_cleanup(body, runtime, op.settings.cleanup_timeout, f"remove Serve app {app} from {address}",
                            lambda: _remove_serve_app(address, app))


def _remove_serve_app(address: str, name: str) -> None:
    import httpx

    from anneal.serve.deploy import update_serve_apps

    try:
        with httpx.Client(timeout=30, headers=ray_auth_headers()) as http:
            update_serve_apps(http, address, remove=(name,))
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code in (401, 403):
            raise CleanupRefused(f"Serve REST API {address} answered {exc.response.status_code}") from None
        raise kopf.TemporaryError(f"Serve REST API {address}: cannot remove app {name}: {exc}", delay=10)
    except Exception as exc:
        raise kopf.TemporaryError(f"Serve REST API {address}: cannot remove app {name}: {exc}", delay=10)
