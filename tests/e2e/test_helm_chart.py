"""The Helm chart rendered by the real helm, applied server-side to a real API server.

helm is built from its Go module by `deploy/local/cluster.py build`. Each values variant is
linted and rendered; the output is applied with `kubectl apply --server-side` into a namespace
that enforces Pod Security "restricted", and a Pod made from each Deployment's template goes
through that admission (Deployments are only warned about; Pods are refused). With
`operator.namespaces` set the operator then runs on the chart's RBAC alone, as its
ServiceAccount's token, and does its work in the namespace it watches.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.test_operator import TINY_SFT, Operator, _apply, _events, _get, _job, _status, _wait

pytestmark = pytest.mark.e2e

CHART = Path(__file__).resolve().parents[2] / "charts" / "anneal"
WATCHED = "{watched}"  # replaced by a namespace the test creates

#: Values beside the defaults, together reaching every branch of values.schema.json and the templates.
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "namespaced": {"operator": {"namespaces": [WATCHED]}},
    "everything": {
        "image": {"tag": "0.1.0-rc1", "pullPolicy": "Always"},
        "replicas": 1,
        "operator": {"namespaces": [WATCHED], "leaderElection": False, "rayAddress": "http://ray-head.ray.svc:8265",
                     "allowedRayAddresses": ["http://ray-head.ray.svc:8265"], "sharedVolumeClaim": "anneal-rwx",
                     "workDir": "/mnt/anneal/work", "cacheDir": "/mnt/anneal/cache", "shmSize": "16Gi",
                     "gangScheduler": "volcano", "logLevel": "DEBUG"},
        "serviceAccount": {"create": False, "name": "anneal-custom"},
        "metricsService": {"enabled": False},
        "dashboards": {"enabled": True, "folder": "Anneal"},
        "rayAuthTokenSecret": "ray-token",
        "secretAccess": {"names": ["hf-token", "router-keys"]},
        "mlflow": {"enabled": True, "credentialsSecret": "mlflow-creds", "allowedHosts": ["mlflow.example.com"],
                   "persistence": {"enabled": True, "existingClaim": "mlflow-data"}},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 1, "preference": {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["ops"]}]}}]}},
        "podAnnotations": {"example.com/team": "ml"},
    },
    "mlflow-pvc": {"dashboards": {"enabled": False},
                   "mlflow": {"enabled": True, "persistence": {"size": "20Gi", "storageClass": "standard"}}},
    "mlflow-ephemeral": {"mlflow": {"enabled": True, "port": 5500, "persistence": {"enabled": False}}},
}


def _fill(obj: Any, watched: str) -> Any:
    return json.loads(json.dumps(obj).replace(WATCHED, watched))


def _helm(helm: Path, *args: str, values: dict[str, Any] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run helm; `values` go in on stdin (`-f -`)."""
    extra = ["-f", "-"] if values is not None else []
    proc = subprocess.run([str(helm), *args, *extra], input=yaml.safe_dump(values) if values is not None else None,
                          capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def render(helm: Path, values: dict[str, Any], release: str = "anneal", namespace: str = "anneal",
           include_crds: bool = False) -> list[dict]:
    crds = ["--include-crds"] if include_crds else []
    out = _helm(helm, "template", release, str(CHART), "-n", namespace, *crds, values=values).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _rules(docs: list[dict]) -> list[tuple[dict, dict]]:
    return [(d, r) for d in docs if d["kind"] in ("Role", "ClusterRole") for r in d.get("rules") or []]


def _pod_of(deployment: dict, name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": deployment["spec"]["template"]["spec"]}


# ----------------------------------------------------------------------------- lint and render


@pytest.mark.parametrize("variant", VARIANTS)
def test_helm_lint_passes_for_every_variant(helm, variant):
    proc = _helm(helm, "lint", "--strict", str(CHART), values=_fill(VARIANTS[variant], "team-a"))
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout, proc.stdout


def test_the_built_helm_is_the_pinned_version(helm):
    script = (CHART.parents[1] / "deploy" / "local" / "cluster.py").read_text()
    pinned = re.search(r'^HELM_VERSION = "(v[0-9.]+)"$', script, re.M).group(1)
    assert _helm(helm, "version", "--short").stdout.startswith(pinned)


@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_rbac_is_namespaced_when_namespaces_are_set_and_never_reaches_unnamed_secrets(helm, variant):
    values = _fill(VARIANTS[variant], "team-a")
    docs = render(helm, values)
    kinds = {d["kind"] for d in docs}
    namespaces = values.get("operator", {}).get("namespaces")
    if namespaces:
        assert not kinds & {"ClusterRole", "ClusterRoleBinding"}, "namespaced mode must grant nothing cluster-wide"
        roles = {d["metadata"]["namespace"] for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "anneal-operator"}
        assert roles == set(namespaces)
    else:
        (cr,) = [d for d in docs if d["kind"] == "ClusterRole"]
        assert any("customresourcedefinitions" in r["resources"] for r in cr["rules"])
    names = values.get("secretAccess", {}).get("names", [])
    secret_rules = [r for _, r in _rules(docs) if "secrets" in r["resources"] or "*" in r["resources"]]
    if not names:
        assert secret_rules == [], "no Secret access unless secretAccess.names lists them"
    else:
        assert secret_rules and all(r["resourceNames"] == names and r["verbs"] == ["get"] for r in secret_rules)
    assert all("*" not in r["verbs"] for _, r in _rules(docs))
    lease = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"].endswith("-lease")]
    assert bool(lease) == values.get("operator", {}).get("leaderElection", True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_objects_follow_the_values(helm, variant):
    values = _fill(VARIANTS[variant], "team-a")
    docs = render(helm, values)
    by = {(d["kind"], d["metadata"]["name"]) for d in docs}
    mlflow = values.get("mlflow", {})
    assert (("Deployment", "anneal-mlflow") in by) == bool(mlflow.get("enabled"))
    persistence = mlflow.get("persistence", {})
    creates_pvc = bool(mlflow.get("enabled")) and persistence.get("enabled", True) and not persistence.get("existingClaim")
    assert (("PersistentVolumeClaim", "anneal-mlflow") in by) == creates_pvc
    assert (("ConfigMap", "anneal-dashboard") in by) == values.get("dashboards", {}).get("enabled", True)
    assert (("Service", "anneal-operator-metrics") in by) == values.get("metricsService", {}).get("enabled", True)
    assert (("ServiceAccount", "anneal-operator") in by) == values.get("serviceAccount", {}).get("create", True)

    operator = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "anneal-operator")
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]}
    names = [e["name"] for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]]
    assert len(names) == len(set(names)), "an env variable is set twice"
    expected_uri = (f"http://anneal-mlflow.anneal.svc:{mlflow.get('port', 5000)}" if mlflow.get("enabled")
                    else "http://mlflow.anneal.svc:5000")
    assert env["ANNEAL_OPERATOR_TRACKING_URI"] == expected_uri
    if mlflow.get("credentialsSecret"):
        assert env["MLFLOW_TRACKING_TOKEN"] == {"secretKeyRef": {"name": "mlflow-creds", "key": "MLFLOW_TRACKING_TOKEN",
                                                                 "optional": True}}
    for dep in (d for d in docs if d["kind"] == "Deployment"):
        # Beyond what "restricted" admission checks: a read-only root, writes go to an emptyDir.
        pod = dep["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, dep["metadata"]["name"]
        tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
        assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp["name"])
    if mlflow.get("enabled"):
        server = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "anneal-mlflow")
        menv = {e["name"]: e["value"] for e in server["spec"]["template"]["spec"]["containers"][0]["env"]}
        hosts = menv["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
        assert "anneal-mlflow.anneal.svc:*" in hosts and "10.*" in hosts
        assert set(mlflow.get("allowedHosts", [])) <= set(hosts)


@pytest.mark.parametrize(("set_arg", "named"), [
    ("operator.gangScheduler=slurm", "gangScheduler"),
    ("operator.namespaces[0]=Team_A", "namespaces"),
    ("secretAccess.names[0]=UPPER", "secretAccess"),
    ("mlflow.enable=true", "enable"),  # a typo of mlflow.enabled: refused, not ignored
    ("mlflow.persistence.size=lots", "size"),
    ("mlflow.port=0", "port"),
])
def test_invalid_values_are_refused_naming_the_field(helm, set_arg, named):
    for cmd in (["lint", str(CHART)], ["template", "x", str(CHART)]):
        proc = _helm(helm, *cmd, "--set", set_arg, check=False)
        assert proc.returncode != 0, (cmd, proc.stdout)
        said = proc.stdout + proc.stderr
        assert "schema" in said and named in said, said


# ----------------------------------------------------------------------------- applied for real


@pytest.fixture
def restricted(kube_cluster, namespace) -> str:
    """The test's namespace, enforcing Pod Security "restricted" on the API server's admission."""
    kube_cluster.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted",
                         "pod-security.kubernetes.io/enforce-version=latest")
    return namespace


@pytest.fixture
def watched(kube_cluster) -> str:
    name = f"e2e-helm-watched-{uuid.uuid4().hex[:6]}"
    kube_cluster.kubectl("create", "namespace", name)
    yield name
    kube_cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


def _release() -> str:
    return f"a{uuid.uuid4().hex[:6]}"  # cluster-scoped names (ClusterRole) differ per test


def _cleanup_cluster_scoped(kube, release: str) -> None:
    for kind in ("clusterrolebinding", "clusterrole"):
        kube.kubectl("delete", kind, f"{release}-operator", "--ignore-not-found", check=False)


@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_chart_applies_server_side_and_its_pods_pass_restricted(helm, kube_cluster, restricted, watched,
                                                                         variant):
    kube, release = kube_cluster, _release()
    values = _fill(VARIANTS[variant], watched)
    # The default install as `helm install` makes it, CRDs included (the session created them already:
    # the same objects, applied again without a conflict).
    docs = render(helm, values, release=release, namespace=restricted, include_crds=variant == "default")
    if variant == "default":
        assert len([d for d in docs if d["kind"] == "CustomResourceDefinition"]) == len(list((CHART / "crds").glob("*.yaml")))
    if not values.get("serviceAccount", {}).get("create", True):
        kube.kubectl("create", "serviceaccount", values["serviceAccount"]["name"], "-n", restricted)
    try:
        proc = kube.kubectl("apply", "--server-side", "--field-manager=anneal-e2e", "-f", "-",
                            input=yaml.safe_dump_all(docs), timeout=120)
        # A Deployment whose template breaks the namespace's level is stored with a warning.
        assert "PodSecurity" not in proc.stderr, proc.stderr
        for doc in docs:
            ns = ["-n", doc["metadata"]["namespace"]] if "namespace" in doc["metadata"] else []
            kube.kubectl("get", doc["kind"].lower(), doc["metadata"]["name"], *ns)
        deployments = [d for d in docs if d["kind"] == "Deployment"]
        assert len(deployments) == (2 if values.get("mlflow", {}).get("enabled") else 1)
        for dep in deployments:
            pod = _pod_of(dep, dep["metadata"]["name"])
            p = kube.kubectl("create", "--dry-run=server", "-n", restricted, "-f", "-", input=json.dumps(pod), check=False)
            assert p.returncode == 0, (dep["metadata"]["name"], p.stderr)
    finally:
        _cleanup_cluster_scoped(kube, release)


def test_restricted_admission_is_live_the_old_pod_settings_are_refused(helm, kube_cluster, restricted):
    dep = next(d for d in render(helm, {}, namespace=restricted) if d["kind"] == "Deployment")
    container = dep["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"] = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": False}
    dep["spec"]["template"]["spec"]["securityContext"] = {"runAsNonRoot": True, "runAsUser": 1000}
    kube_cluster.kubectl("create", "serviceaccount", "anneal-operator", "-n", restricted)
    p = kube_cluster.kubectl("create", "--dry-run=server", "-n", restricted, "-f", "-",
                             input=json.dumps(_pod_of(dep, "old")), check=False)
    assert p.returncode != 0 and 'violates PodSecurity "restricted' in p.stderr, p.stderr
    assert "capabilities" in p.stderr and "seccompProfile" in p.stderr, p.stderr


def _can(kube, sa: str, verb: str, what: str, namespace: str | None) -> bool:
    ns = ["-n", namespace] if namespace else []
    p = kube.kubectl("auth", "can-i", verb, what, *ns, f"--as={sa}", check=False)
    return p.stdout.strip() == "yes"


def _token_kubeconfig(kube, namespace: str, sa: str, path: Path) -> Path:
    """A kubeconfig that authenticates as the ServiceAccount (a TokenRequest token), as its pod would."""
    token = kube.kubectl("create", "token", sa, "-n", namespace, "--duration=1h").stdout.strip()
    admin = yaml.safe_load(kube.kubeconfig.read_text())
    ca = admin["clusters"][0]["cluster"]["certificate-authority-data"]
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "local", "cluster": {"server": kube.server, "certificate-authority-data": ca}}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "local", "user": "sa", "namespace": namespace}}],
    }))
    return path


def test_namespaced_operator_works_on_the_charts_roles_alone(helm, kube_cluster, restricted, watched, tmp_path):
    kube, release = kube_cluster, _release()
    other = f"e2e-helm-other-{uuid.uuid4().hex[:6]}"
    kube.kubectl("create", "namespace", other)
    values = {"operator": {"namespaces": [watched]}, "secretAccess": {"names": ["hf-token"]}}
    docs = render(helm, values, release=release, namespace=restricted)
    try:
        kube.kubectl("apply", "--server-side", "--field-manager=anneal-e2e", "-f", "-", input=yaml.safe_dump_all(docs))
        sa = f"system:serviceaccount:{restricted}:{release}-operator"
        # What RBAC now says, asked of the API server as the ServiceAccount.
        assert _can(kube, sa, "create", "rayjobs.ray.io", watched)
        assert _can(kube, sa, "patch", "distillationjobs.anneal.dev/status", watched)
        assert not _can(kube, sa, "create", "rayjobs.ray.io", other)
        assert not _can(kube, sa, "list", "distillationjobs.anneal.dev", None)  # nothing cluster-wide
        assert not _can(kube, sa, "list", "namespaces", None)
        assert not _can(kube, sa, "list", "secrets", watched)
        assert _can(kube, sa, "get", "secrets/hf-token", watched)
        assert not _can(kube, sa, "get", "secrets/other", watched)
        assert _can(kube, sa, "update", "leases.coordination.k8s.io", restricted)

        # The operator itself, as that ServiceAccount: leader election in the release namespace,
        # a per-job RayJob, status, events, and the finalizer on deletion, in the watched namespace only.
        kubeconfig = _token_kubeconfig(kube, restricted, f"{release}-operator", tmp_path / "sa.kubeconfig")
        op = Operator(kubeconfig, "http://127.0.0.1:9", Path(tempfile.mkdtemp(prefix="anneal-e2e-helm-op-")),
                      ANNEAL_OPERATOR_NAMESPACES=watched, ANNEAL_OPERATOR_LEADER_ELECTION="true",
                      ANNEAL_OPERATOR_LEASE_NAMESPACE=restricted, ANNEAL_OPERATOR_LEASE_NAME=f"{release}-lease")
        op.start()
        try:
            _apply(kube, watched, _job("mine", TINY_SFT))
            _apply(kube, other, _job("not-mine", TINY_SFT))
            st = _wait("RayJob submission", lambda: (s := _status(kube, watched, "dj", "mine")).get("phase") == "Submitted"
                       and s, 90)
            assert _get(kube, watched, "rayjob", st["rayCluster"]) is not None
            assert any(e["reason"] == "Submitted" for e in _events(kube, watched, "mine"))
            assert kube.kubectl("get", "lease", f"{release}-lease", "-n", restricted, "-o",
                                "jsonpath={.spec.holderIdentity}").stdout
            kube.kubectl("delete", "dj", "mine", "-n", watched, "--timeout=60s")
            assert _status(kube, other, "dj", "not-mine") == {}, "the operator acted outside its namespaces"
            log = op.log()
            assert "Forbidden" not in log and "Not enough permissions" not in log, log[-3000:]
        finally:
            op.stop()
    finally:
        _cleanup_cluster_scoped(kube, release)
        kube.kubectl("delete", "namespace", other, "--wait=false", "--ignore-not-found", check=False)


def test_mlflow_credentials_and_ray_token_reach_the_pod_without_rbac(helm):
    values = {"mlflow": {"credentialsSecret": "mlflow-creds"}, "rayAuthTokenSecret": "ray-token"}
    docs = render(helm, values)
    assert not [r for _, r in _rules(docs) if "secrets" in r["resources"]]
    spec = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert {"name": "ray-auth", "secret": {"secretName": "ray-token", "items": [{"key": "token", "path": "token"}]}} \
        in spec["volumes"]
    refs = [e["valueFrom"]["secretKeyRef"]["name"] for e in spec["containers"][0]["env"] if "valueFrom" in e
            and "secretKeyRef" in e["valueFrom"]]
    assert refs == ["mlflow-creds"] * 3


def test_the_charts_mlflow_command_serves_its_service_names_and_refuses_others(helm, tmp_path):
    """The MLflow Deployment's own command and env, run with the MLflow the image pins (requirements.lock)."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    docs = render(helm, {"mlflow": {"enabled": True, "port": port, "allowedHosts": ["mlflow.example.com"]}})
    container = next(d for d in docs if d["metadata"]["name"] == "anneal-mlflow" and d["kind"] == "Deployment")[
        "spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["mlflow", "server"]
    # Loopback instead of every interface, and the pod's /mlflow volume under tmp_path.
    args = [a.replace("--host=0.0.0.0", "--host=127.0.0.1").replace("/mlflow/", f"{tmp_path / 'data'}/")
            for a in container["args"]]
    (tmp_path / "data").mkdir()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
           **{e["name"]: e["value"] for e in container["env"]}, "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent))
    proc = subprocess.Popen([mlflow, "server", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        def get(host: str, path: str = "/api/2.0/mlflow/experiments/search?max_results=1") -> int:
            return httpx.get(f"http://127.0.0.1:{port}{path}", headers={"Host": host}, timeout=5).status_code

        # /health (the probes' path) answers any Host; the API answers only the allowed ones.
        _wait("mlflow server", lambda: proc.poll() is None and get("127.0.0.1", "/health") == 200, 120)
        for host in (f"anneal-mlflow.anneal.svc:{port}", f"anneal-mlflow.anneal.svc.cluster.local:{port}",
                     f"anneal-mlflow:{port}", "mlflow.example.com", f"10.1.2.3:{port}"):
            assert get(host) == 200, host
        assert get(f"attacker.example:{port}") == 403
        assert (tmp_path / "data" / "mlflow.db").exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
