"""What every handler shares: settings, Kubernetes clients, metrics, per-object locks, status writes, events."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import kopf

from anneal import API_GROUP, API_VERSION
from anneal.api.common import Condition, set_condition
from anneal.api.resources import KINDS, ManifestError
from anneal_operator.metrics import OperatorMetrics
from anneal_operator.settings import OperatorSettings

log = logging.getLogger("anneal_operator")

#: status keys kopf itself may keep (never ours to diff or drop).
KOPF_KEYS = ("kopf",)


def load_api_client(kubeconfig: str | None = None):
    """A kubernetes ApiClient: the given kubeconfig, else in-cluster, else $KUBECONFIG / ~/.kube/config."""
    from kubernetes import client, config

    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)
    try:
        config.load_incluster_config()
        return client.ApiClient()
    except config.ConfigException:
        return config.new_client_from_config()


@dataclass
class OperatorContext:
    """Built once in `main`, closed over by every kind's handlers."""

    settings: OperatorSettings
    api_client: Any
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    #: Factory of Ray Jobs API clients by address (tests and the benchmark pass a stubbed transport).
    jobs_client_factory: Callable[[str], Any] | None = None
    #: Reader of a Secret's `data` by (namespace, name), None when it does not exist (tests pass
    #: their own); by default the API server's (the Helm chart grants `get` only on the Secrets
    #: named in its secretAccess.names; without them a read is a 403 and the pass waits).
    secret_reader: Callable[[str, str], Mapping[str, str] | None] | None = None
    _locks: dict[str, threading.Lock] = field(default_factory=dict)
    #: uid → (resourceVersion, status) of our last status write: a pass that runs before the
    #: watch delivered that write must not act on the older status it was handed.
    _written: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    _locks_guard: threading.Lock = field(default_factory=threading.Lock)
    #: key → when `due(key, ...)` last said yes (paced reads, e.g. job progress from MLflow).
    _last: dict[str, float] = field(default_factory=dict)
    #: Ray Jobs API clients by address, kept for the process (one connection pool each).
    _jobs_clients: dict[str, Any] = field(default_factory=dict)
    #: uid → name → (value, close): what a resource's passes keep between them (a rollout's
    #: probe loop and MLflow tracker), closed when the resource is forgotten.
    _attachments: dict[str, dict[str, tuple[Any, Callable[[Any], None] | None]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from kubernetes import client

        self.custom = client.CustomObjectsApi(self.api_client)

    # ------------------------------------------------------------------ concurrency

    def lock(self, uid: str) -> threading.Lock:
        """The lock of one object: its timer, delete and update handlers never overlap."""
        with self._locks_guard:
            return self._locks.setdefault(uid, threading.Lock())

    def attachment(self, uid: str, name: str) -> Any:
        """What `attach` kept for the resource under `name` (None: nothing)."""
        with self._locks_guard:
            return self._attachments.get(uid, {}).get(name, (None, None))[0]

    def attach(self, uid: str, name: str, value: Any, close: Callable[[Any], None] | None = None) -> None:
        """Keep `value` for the resource's later passes; `close(value)` runs when it is forgotten."""
        with self._locks_guard:
            if value is None:
                self._attachments.get(uid, {}).pop(name, None)
            else:
                self._attachments.setdefault(uid, {})[name] = (value, close)

    def forget_attachments(self, uid: str) -> None:
        with self._locks_guard:
            held = self._attachments.pop(uid, {})
        for value, close in held.values():
            if close is not None:
                try:
                    close(value)
                except Exception as exc:  # noqa: BLE001 - a close must not stop the forgetting
                    log.warning("closing %s of %s: %s", value, uid, exc)

    def forget(self, uid: str) -> None:
        self.forget_attachments(uid)
        with self._locks_guard:
            self._locks.pop(uid, None)
            self._written.pop(uid, None)
            for key in [k for k in self._last if k.endswith("/" + uid)]:
                self._last.pop(key, None)

    def due(self, key: str, interval: float, now: float) -> bool:
        """True at most once per `interval` seconds for `key` (and the first time it is asked)."""
        with self._locks_guard:
            last = self._last.get(key)
            if last is not None and now - last < interval:
                return False
            self._last[key] = now
            return True

    def current_status(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """The object's status: the body's, or our own newer write if the watch has not caught up."""
        meta = body.get("metadata") or {}
        seen = self._written.get(meta.get("uid", ""))
        if seen is not None and _rv(meta) < seen[0]:
            return clean_status(seen[1])
        return clean_status(body.get("status"))

    # --------------------------------------------------------------------- Ray

    def jobs_client(self, address: str):
        """The Ray Jobs API client of `address`, shared by every handler thread (httpx clients are thread-safe)."""
        with self._locks_guard:
            c = self._jobs_clients.get(address)
            if c is None:
                if self.jobs_client_factory is not None:
                    c = self.jobs_client_factory(address)
                else:
                    from anneal.runtime.jobs_api import JobsApiClient

                    c = JobsApiClient(address)
                self._jobs_clients[address] = c
            return c

    def close(self) -> None:
        for uid in list(self._attachments):
            self.forget_attachments(uid)
        with self._locks_guard:
            clients, self._jobs_clients = list(self._jobs_clients.values()), {}
        for c in clients:
            c.close()

    # -------------------------------------------------------------- Kubernetes IO

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """An Anneal resource of this namespace, or None."""
        from kubernetes.client.exceptions import ApiException

        try:
            return self.custom.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, KINDS[kind].plural, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def read_secret(self, namespace: str, name: str) -> Mapping[str, str] | None:
        """A Secret's `data` (key → base64 value, as the API server has it), or None when there is no such Secret.

        Raises:
            PermissionError: the operator may not read it (403: its role lacks `get` on secrets there).
        """
        if self.secret_reader is not None:
            return self.secret_reader(namespace, name)
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        try:
            secret = client.CoreV1Api(self.api_client).read_namespaced_secret(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            if exc.status == 403:
                raise PermissionError(f"the operator may not read Secret {namespace}/{name} (403 Forbidden): "
                                      f"its role needs get on this Secret in {namespace} (with the Helm chart: "
                                      f"add {name} to secretAccess.names; docs/helm.md)") from None
            raise
        return dict(secret.data or {})

    def write_status(self, kind: str, body: Mapping[str, Any], old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
        """Merge-patch `status` to `new` if it differs from `old`; returns whether it wrote.

        Keys present before and absent now are removed, at any depth (`merge_patch`). The patch
        carries the resourceVersion the pass read: if anyone changed the object since, the
        API server answers 409 and the pass is retried on fresh data instead of overwriting.
        """
        from kubernetes.client.exceptions import ApiException

        old_clean = {k: v for k, v in old.items() if k not in KOPF_KEYS}
        new_clean = {k: v for k, v in new.items() if k not in KOPF_KEYS}
        if old_clean == new_clean:
            return False
        patch = merge_patch(old_clean, new_clean)
        meta = body.get("metadata") or {}
        uid = meta.get("uid", "")
        rv = _rv(meta)
        seen = self._written.get(uid)
        if seen is not None and seen[0] > rv:
            rv = seen[0]
        doc: dict[str, Any] = {"status": patch}
        if rv:
            doc["metadata"] = {"resourceVersion": str(rv)}
        try:
            written = self.custom.patch_namespaced_custom_object_status(
                API_GROUP, API_VERSION, meta["namespace"], KINDS[kind].plural, meta["name"], doc
            )
        except ApiException as exc:
            if exc.status == 409:
                self._written.pop(uid, None)
                raise kopf.TemporaryError(f"{kind} {meta['name']} changed while reconciling; again on fresh data",
                                          delay=0.5) from None
            raise
        try:
            self._written[uid] = (_rv(written.get("metadata") or {}), clean_status(written.get("status")))
        except AttributeError:
            pass
        return True


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns `old` into `new`.

    Nested objects are patched key by key, so a key the new status no longer has is sent as
    null at its own depth (``status.rollout.holding`` cleared): a merge patch that only
    replaced top-level keys would merge the new ``rollout`` into the stored one and keep it.
    """
    patch: dict[str, Any] = {}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            sub = merge_patch(before, value)
            if sub:
                patch[key] = sub
        elif key not in old or before != value:
            patch[key] = value
    for key in old:
        if key not in new:
            patch[key] = None
    return patch


def _rv(meta: Mapping[str, Any]) -> int:
    try:
        return int(meta.get("resourceVersion") or 0)
    except (TypeError, ValueError):
        return 0


def snapshot(body: Any) -> dict[str, Any]:
    """A frozen, plain copy of a kopf body, taken at the start of a pass.

    kopf's `body` and `meta` are live views: they move to the newest version as watch events
    arrive, in the middle of a pass. A status write must carry the resourceVersion of the
    version the pass *read*, or it silently overwrites whatever changed in between (a user's
    `kubectl patch`, another writer) instead of getting a 409.
    """
    import copy

    return copy.deepcopy(dict(body))


def event(body: Any, type: str, reason: str, message: str) -> None:
    """A Kubernetes Event on the resource (kopf posts it in the background)."""
    try:
        kopf.event(body, type=type, reason=reason, message=message[:1000])
    except Exception as exc:  # events are best effort; never fail a reconcile pass for one
        log.debug("could not post event %s: %s", reason, exc)


def bounded_cleanup(body: Any, runtime: Any, limit_s: float, what: str, cleanup: Callable[[], None]) -> None:
    """Run a deletion's cleanup; past `limit_s` since the deletion began, stop retrying.

    A finalizer must never hold a resource forever: when Ray stays unreachable (or refuses
    the operator, 401/403), the cleanup is given up with a Warning event naming what may be
    left behind, and the handler returns so kopf releases the finalizer.

    Args:
        body: the resource (for the event).
        runtime: how long the deletion handler has been retrying (kopf's `runtime`, a timedelta).
        limit_s: `cleanup_timeout`.
        what: what the cleanup does, for the event ("stop Ray job X at Y").
        cleanup: raises `kopf.TemporaryError` to be retried, or `CleanupRefused` to give up now.
    """
    try:
        cleanup()
    except CleanupRefused as exc:
        event(body, "Warning", "CleanupAbandoned", f"could not {what}: {exc}; it may be left behind")
    except kopf.TemporaryError as exc:
        if runtime is None or runtime.total_seconds() < limit_s:
            raise
        event(body, "Warning", "CleanupAbandoned",
              f"could not {what} within {limit_s:g}s: {exc}; the finalizer is released, it may be left behind")


class CleanupRefused(RuntimeError):
    """A deletion's cleanup that retrying cannot help (e.g. 401/403 from Ray)."""


def conditions_of(status: Mapping[str, Any]) -> list[Condition]:
    return [Condition.model_validate(c) for c in status.get("conditions") or []]


def with_condition(status: dict[str, Any], type: str, value: str, reason: str, message: str = "") -> dict[str, Any]:
    """`status` with condition `type` set (lastTransitionTime moves only on a flip)."""
    conds = set_condition(conditions_of(status), type, value, reason, message)
    status["conditions"] = [c.to_dict() for c in conds]
    return status


def invalid_spec_status(status: Mapping[str, Any], exc: ManifestError, generation: int | None,
                        failed_phase: str | None = "Failed") -> dict[str, Any]:
    """The status of a resource whose spec breaks a rule the CRD schema could not express."""
    first = exc.errors[0]
    new = dict(status)
    if failed_phase:
        new["phase"] = failed_phase
    new["message"] = f"invalid spec: {exc}"
    new["observedGeneration"] = generation
    return with_condition(new, "Ready", "False", "InvalidSpec", f"{first.path}: {first.rule}")


def clean_status(status: Mapping[str, Any] | None) -> dict[str, Any]:
    """A plain, deep-copied dict of a kopf status view (kopf's own keys dropped)."""
    import copy

    return {k: copy.deepcopy(v) for k, v in dict(status or {}).items() if k not in KOPF_KEYS}
