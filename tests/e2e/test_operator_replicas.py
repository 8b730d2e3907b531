"""Two operator replicas with leader election (a coordination.k8s.io Lease) against a real
API server, a real local Ray head and a real MLflow server.

Both replicas run as subprocesses (`python -m anneal_operator`) watching only the test's
namespace and competing for one Lease (unique name) in it. The test kills the leader with
SIGKILL while a shared-cluster job runs, and checks that the standby takes over only once the
Lease has expired, finishes the job, and that Ray saw one submission, not two.
"""

from __future__ import annotations

import re
import signal
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.e2e.test_operator import TINY_SFT, Operator, _apply, _get, _job, _status, _stop_group, _wait

pytestmark = pytest.mark.e2e

LEASE_SECONDS = 5
# Beyond the Lease's duration a standby needs up to one poll (duration / 5) and an API round
# trip; on two loaded cores (API server, etcd, Ray, a training job) allow a few seconds more.
TAKEOVER_MARGIN = 10.0
IDENTITIES = ("replica-a", "replica-b")
STOP_SECONDS = 60  # kopf winds down its watches and timers first


def _lease_spec(kube, namespace: str, name: str) -> dict[str, Any]:
    return (_get(kube, namespace, "lease", name) or {}).get("spec") or {}


def _holder(kube, namespace: str, name: str) -> str | None:
    return _lease_spec(kube, namespace, name).get("holderIdentity")


def _metrics(op: Operator) -> str:
    port = op.env["ANNEAL_OPERATOR_METRICS_PORT"]
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text


def _sample(text: str, name: str) -> float | None:
    """The value of an unlabelled sample in Prometheus text, or None when it is absent."""
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def _readyz(op: Operator) -> int:
    port = op.env["ANNEAL_OPERATOR_HEALTH_PORT"]
    return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code


def _of_job(ray_job: dict[str, Any], namespace: str, name: str, uid: str, sid: str) -> bool:
    """Whether a Ray job belongs to the resource: by its metadata, or by any attempt's submission id."""
    meta = ray_job.get("metadata") or {}
    stem = sid.rsplit("-a", 1)[0]  # anneal-<ns>-<name>-<hash>, without -a<attempt>
    return (meta.get("anneal.dev/uid") == uid
            or (meta.get("anneal.dev/namespace"), meta.get("anneal.dev/name")) == (namespace, name)
            or (ray_job.get("submission_id") or "").startswith(stem))


def _micro(ts: str) -> float:
    """Seconds since the epoch of a Lease MicroTime (`2024-01-02T03:04:05.123456Z`)."""
    from datetime import datetime

    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


@contextmanager
def _with_logs(ops: dict[str, Operator], lines: int = 40) -> Iterator[None]:
    """Re-raise a failed assertion with the tail of every replica's log."""
    try:
        yield
    except AssertionError as exc:
        tails = "\n".join(f"----- {who} (log tail) -----\n" + ("\n".join(op.log().splitlines()[-lines:]) or "(empty)")
                          for who, op in ops.items())
        raise AssertionError(f"{exc}\n{tails}") from None


@pytest.fixture
def replicas(kube_cluster, namespace, mlflow_server) -> Iterator[tuple[str, dict[str, Operator]]]:
    """Two operators, each with its own identity and ports, competing for one fresh Lease."""
    lease = f"anneal-operator-{uuid.uuid4().hex[:8]}"
    root = Path(tempfile.mkdtemp(prefix="anneal-e2e-replicas-"))  # outside basetemp (see test_operator.py)
    ops: dict[str, Operator] = {}
    for who in IDENTITIES:
        (root / who).mkdir()
        ops[who] = Operator(
            kube_cluster.kubeconfig, mlflow_server, root / who,
            ANNEAL_OPERATOR_NAMESPACES=namespace,  # an exact name, not a glob: watched from the start
            ANNEAL_OPERATOR_LEADER_ELECTION="true",
            ANNEAL_OPERATOR_LEASE_NAME=lease,
            ANNEAL_OPERATOR_LEASE_NAMESPACE=namespace,
            ANNEAL_OPERATOR_LEASE_DURATION=str(LEASE_SECONDS),
            ANNEAL_OPERATOR_IDENTITY=who,
        )
    try:
        with _with_logs(ops):
            for op in ops.values():
                op.start()  # returns once /readyz is 200: a standby is ready too
        yield lease, ops
    finally:
        for op in ops.values():
            op.stop()


def test_two_replicas_one_leader_fail_over_without_a_second_submission(
    kube_cluster, namespace, replicas, ray_head, mlflow_server
):
    lease, ops = replicas
    kube = kube_cluster
    with _with_logs(ops):
        # Exactly one replica holds the Lease; only it says so in its metrics; both are ready.
        first = _wait("a Lease holder", lambda: (h := _holder(kube, namespace, lease)) in ops and h, 60)
        second = next(who for who in ops if who != first)
        leader, standby = ops[first], ops[second]
        _wait(f"anneal_operator_leader 1 on {first} and 0 on {second}",
              lambda: _sample(_metrics(leader), "anneal_operator_leader") == 1.0
              and _sample(_metrics(standby), "anneal_operator_leader") == 0.0, 60)
        _wait(f"/readyz 200 on the leader {first} (kopf up)", lambda: _readyz(leader) == 200, 60)
        assert _readyz(standby) == 200, f"the standby {second} is not ready"

        # A shared-cluster job; the leader submits it, the standby does nothing.
        spec = {**TINY_SFT, "ray": {"address": ray_head},
                "mlflow": {"experiment": f"e2e-{namespace}", "registeredModelName": f"tiny-{namespace}"}}
        _apply(kube, namespace, _job("tiny", spec))
        uid = _wait("resource", lambda: _get(kube, namespace, "dj", "tiny"), 30)["metadata"]["uid"]
        st = _wait("submission", lambda: (s := _status(kube, namespace, "dj", "tiny")).get("phase")
                   in ("Submitted", "Running") and s, 120)
        sid = st["submissionId"]
        assert _holder(kube, namespace, lease) == first, "leadership moved while both replicas were alive"
        assert not re.search(r"^anneal_operator_reconciles_total\{", _metrics(standby), re.M), "the standby reconciled"

        # SIGKILL the leader mid-job: no release, the Lease must expire before the standby acts.
        leader.kill()
        killed_at = time.monotonic()
        before = _lease_spec(kube, namespace, lease)  # the dead leader's last renewal
        assert before.get("holderIdentity") == first, before
        bound = LEASE_SECONDS + TAKEOVER_MARGIN
        _wait(f"{second} to take the Lease within {bound:g}s of the kill",
              lambda: _holder(kube, namespace, lease) == second, bound, every=0.25)
        took = time.monotonic() - killed_at
        after = _lease_spec(kube, namespace, lease)
        waited = _micro(after["acquireTime"]) - _micro(before["renewTime"])
        assert waited >= LEASE_SECONDS, (
            f"{second} took the Lease {waited:.2f}s after the last renewal, before it expired ({LEASE_SECONDS}s)")
        assert after.get("leaseTransitions", 0) == before.get("leaseTransitions", 0) + 1, (before, after)
        print(f"\nfail-over: {second} took the Lease {took:.1f}s after the kill "
              f"({waited:.1f}s after the last renewal; Lease {LEASE_SECONDS}s)")
        _wait(f"anneal_operator_leader 1 on {second}",
              lambda: _sample(_metrics(standby), "anneal_operator_leader") == 1.0, 30)
        _wait(f"/readyz 200 on the new leader {second}", lambda: _readyz(standby) == 200, 60)

        # The new leader finishes the job on the same submission.
        st = _wait("Succeeded", lambda: (s := _status(kube, namespace, "dj", "tiny")).get("phase") in
                   ("Succeeded", "Failed") and s, 420, 2)
        assert st["phase"] == "Succeeded", st.get("message")
        assert st["submissionId"] == sid and st["attempts"] == 1, st
        ray_jobs = httpx.get(ray_head + "/api/jobs/", timeout=10).json()
        assert [j["submission_id"] for j in ray_jobs if j.get("submission_id") == sid] == [sid]
        ours = {j.get("submission_id") for j in ray_jobs if _of_job(j, namespace, "tiny", uid, sid)}
        assert ours == {sid}, f"Ray has other submissions of this job: {sorted(ours - {sid})}"
        assert 'outcome="submitted"' not in _metrics(standby), "the new leader submitted the job again"

        # SIGTERM: the last replica stops cleanly and hands the Lease back.
        stopping = time.monotonic()
        _stop_group(standby.proc, signal.SIGTERM, STOP_SECONDS)  # SIGKILL after STOP_SECONDS
        assert standby.proc.returncode == 0, (
            f"{second} did not exit cleanly within {STOP_SECONDS}s of SIGTERM (status {standby.proc.returncode})")
        print(f"{second} exited {time.monotonic() - stopping:.1f}s after SIGTERM")
        released = _lease_spec(kube, namespace, lease)
        assert not released.get("holderIdentity") and not released.get("renewTime"), (
            f"the Lease was not released: {released}")
