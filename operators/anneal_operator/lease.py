"""Leader election with a coordination.k8s.io Lease: of several replicas, only the holder acts."""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

log = logging.getLogger("anneal_operator.lease")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _fmt(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    text = str(value).replace("Z", "+00:00")
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


class LeaderElector:
    """Acquire and renew one Lease (optimistic concurrency on its resourceVersion).

    A replica takes the Lease when it is absent, expired (not renewed for `duration`
    seconds) or already its own. `acquire` blocks until leadership is won; `keep` renews every
    `duration / 5` seconds in a daemon thread and calls `on_lost` when no renewal has succeeded
    for `renew_deadline` (2/3 of `duration`, as client-go does): the leader steps down *before*
    the Lease can expire and a standby take it, so two replicas never act at once. Every API
    call has a timeout well inside that deadline, so a hung connection cannot stall the renewal.
    """

    def __init__(self, api_client: Any, name: str, namespace: str, identity: str, duration: float = 15.0,
                 renew_deadline: float | None = None):
        from kubernetes import client

        self.api = client.CoordinationV1Api(api_client)
        self.name, self.namespace, self.identity, self.duration = name, namespace, identity, duration
        self.renew_deadline = renew_deadline if renew_deadline is not None else duration * 2 / 3
        if not 0 < self.renew_deadline < duration:
            raise ValueError(f"renew deadline {self.renew_deadline:g}s must be in (0, {duration:g}s)")
        self.retry_period = max(0.2, duration / 5)
        self.request_timeout = max(0.5, self.renew_deadline / 3)
        self.is_leader = threading.Event()
        self._stop = threading.Event()
        #: seconds since the last successful renewal when leadership was given up (None: kept)
        self.lost_after: float | None = None

    def _body(self, acquired: datetime | None, transitions: int) -> dict[str, Any]:
        now = _now()
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": int(max(1, round(self.duration))),
                "acquireTime": _fmt(acquired or now),
                "renewTime": _fmt(now),
                "leaseTransitions": transitions,
            },
        }

    def try_acquire(self) -> bool:
        """One attempt to take or renew the Lease; True when this replica holds it afterwards."""
        from kubernetes.client.exceptions import ApiException

        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace, _request_timeout=self.request_timeout)
        except ApiException as exc:
            if exc.status != 404:
                raise
            try:
                self.api.create_namespaced_lease(self.namespace, self._body(None, 0), _request_timeout=self.request_timeout)
                return True
            except ApiException as exc2:
                if exc2.status == 409:
                    return False
                raise
        spec = lease.spec
        holder = spec.holder_identity
        renewed = _parse(spec.renew_time) or _parse(spec.acquire_time)
        duration = spec.lease_duration_seconds or self.duration
        expired = renewed is None or _now() - renewed > timedelta(seconds=duration)
        if holder not in (None, "", self.identity) and not expired:
            return False
        mine = holder == self.identity
        body = self._body(_parse(spec.acquire_time) if mine else None,
                          (spec.lease_transitions or 0) + (0 if mine else 1))
        body["metadata"]["resourceVersion"] = lease.metadata.resource_version
        try:
            self.api.replace_namespaced_lease(self.name, self.namespace, body, _request_timeout=self.request_timeout)
            return True
        except ApiException as exc:
            if exc.status == 409:  # someone else wrote it first
                return False
            raise

    def acquire(self, stop: threading.Event | None = None) -> bool:
        """Block until this replica leads (True) or `stop` is set (False)."""
        while not (stop and stop.is_set()):
            try:
                if self.try_acquire():
                    self.is_leader.set()
                    log.info("leader: %s holds Lease %s/%s", self.identity, self.namespace, self.name)
                    return True
            except Exception as exc:
                log.warning("Lease %s/%s: %s", self.namespace, self.name, exc)
            if stop is not None:
                stop.wait(self.retry_period)
            else:
                time.sleep(self.retry_period)
        return False

    def keep(self, on_lost: Callable[[], None]) -> threading.Thread:
        """Renew in the background; `on_lost` runs once when leadership cannot be kept."""

        def loop() -> None:
            last_ok = time.monotonic()
            while not self._stop.wait(self.retry_period):
                started = time.monotonic()
                try:
                    if self.try_acquire():
                        last_ok = started  # the Lease is good for `duration` from when the write was sent
                        continue
                    reason = "another replica holds the Lease"
                except Exception as exc:
                    if time.monotonic() - last_ok < self.renew_deadline:
                        log.warning("Lease %s/%s: renewal failed (%s); retrying", self.namespace, self.name, exc)
                        continue
                    reason = f"no renewal for {time.monotonic() - last_ok:.1f}s: {exc}"
                self.lost_after = time.monotonic() - last_ok
                self.is_leader.clear()
                log.error("lost leadership of Lease %s/%s: %s", self.namespace, self.name, reason)
                on_lost()
                return

        t = threading.Thread(target=loop, name="anneal-lease", daemon=True)
        t.start()
        return t

    def release(self) -> None:
        """Stop renewing and hand the Lease back (a successor need not wait for expiry)."""
        self._stop.set()
        if not self.is_leader.is_set():
            return
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace, _request_timeout=self.request_timeout)
            if lease.spec.holder_identity == self.identity:
                lease.spec.holder_identity = None
                lease.spec.renew_time = None
                self.api.replace_namespaced_lease(self.name, self.namespace, lease, _request_timeout=self.request_timeout)
        except Exception as exc:
            log.warning("could not release Lease %s/%s: %s", self.namespace, self.name, exc)
        self.is_leader.clear()
