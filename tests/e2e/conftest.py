"""Fixtures for tests against a real control plane: etcd + kube-apiserver +
kube-controller-manager on loopback, started by deploy/local/cluster.py.

- ``kube_control_plane`` (session): builds the binaries if the cache lacks them (minutes,
  once per machine), starts a fresh control plane in a temporary state directory with the
  KubeRay CRDs, and stops it at the end. If the binaries cannot be built it fails with the
  build log's tail; ``ANNEAL_SKIP_E2E=1`` turns every use into a skip instead.
- ``kube_cluster`` (session): the same cluster once every manifest in charts/anneal/crds
  is created and Established; a CRD the API server rejects fails the tests that use it.
- ``namespace`` (function): a fresh namespace per test, deleted afterwards.
- ``helm`` (session): the built helm binary (`cluster.py build` pins its version).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO_ROOT / "deploy" / "local" / "cluster.py"
ANNEAL_CRDS = REPO_ROOT / "charts" / "anneal" / "crds"


def _load_cluster_module():
    spec = importlib.util.spec_from_file_location("anneal_local_cluster", CLUSTER_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


cluster = _load_cluster_module()


class KubectlError(AssertionError):
    pass


@dataclass(frozen=True)
class KubeCluster:
    """A running local control plane."""

    kubeconfig: Path
    server: str
    state_dir: Path
    bin_dir: Path

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run the built kubectl against this cluster; text stdout/stderr.

        With ``check`` (the default) a non-zero exit raises KubectlError carrying stderr.
        """
        cmd = [str(self.bin_dir / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args]
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise KubectlError(f"kubectl {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def plugin_env(self) -> dict[str, str]:
        """The environment a kubectl plugin runs in here (see `kubectl_plugin`)."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig),
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    def kubectl_plugin(self, *args: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """``kubectl <args>`` the way a user runs a plugin: kubectl finds ``kubectl-anneal`` on PATH.

        The kubeconfig goes in ``KUBECONFIG`` (kubectl does not look for a plugin after a flag),
        and PATH starts with this interpreter's bin directory, where setup installs the plugin.
        """
        proc = subprocess.run([str(self.bin_dir / "kubectl"), *args], capture_output=True, text=True,
                              env=self.plugin_env(), timeout=timeout)
        if check and proc.returncode != 0:
            raise KubectlError(f"kubectl {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def api_client(self):
        """A kubernetes.client.ApiClient for this cluster (the caller closes it)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def apply_crds(self, *dirs: Path | str) -> list[str]:
        """(Re)create CRDs from directories, e.g. after regenerating charts/anneal/crds."""
        return cluster.apply_crds(self.state_dir, list(dirs))


@pytest.fixture(scope="session")
def kube_control_plane() -> KubeCluster:
    """The running control plane with the KubeRay CRDs, before Anneal's own CRDs."""
    if os.environ.get("ANNEAL_SKIP_E2E") == "1":
        pytest.skip("ANNEAL_SKIP_E2E=1")
    error = None
    try:
        cluster.build()
    except cluster.ClusterError as exc:
        error = f"could not build the local control plane:\n{exc}"
    if error:
        pytest.fail(error, pytrace=False)

    # Not under pytest's basetemp: concurrent pytest sessions prune each other's old
    # numbered directories, which would pull etcd's data and the pidfiles from under us.
    state_dir = Path(tempfile.mkdtemp(prefix="anneal-e2e-k8s-"))
    try:
        info = cluster.up(state_dir, kuberay=True)
    except cluster.ClusterError as exc:
        cluster.down(state_dir)
        error = f"could not start the local control plane (logs kept in {state_dir / 'logs'}):\n{exc}"
    if error:
        pytest.fail(error, pytrace=False)
    try:
        yield KubeCluster(
            kubeconfig=Path(info["kubeconfig"]),
            server=info["server"],
            state_dir=Path(info["state_dir"]),
            bin_dir=Path(info["bin_dir"]),
        )
    finally:
        cluster.down(state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def helm() -> Path:
    """The helm binary that `deploy/local/cluster.py build` puts in the cache; no API server needed."""
    if os.environ.get("ANNEAL_SKIP_E2E") == "1":
        pytest.skip("ANNEAL_SKIP_E2E=1")
    try:
        paths = cluster.build()
    except cluster.ClusterError as exc:
        pytest.fail(f"could not build helm and the local control plane:\n{exc}", pytrace=False)
    return paths.binary("helm")


@pytest.fixture(scope="session")
def kube_cluster(kube_control_plane: KubeCluster) -> KubeCluster:
    """The same cluster with every manifest in charts/anneal/crds created and Established.

    Kept apart from ``kube_control_plane`` so that CRDs the API server rejects fail the
    tests that need them, with the server's message, and nothing else.
    """
    try:
        kube_control_plane.apply_crds(ANNEAL_CRDS)
    except cluster.ClusterError as exc:
        error = f"the API server rejected charts/anneal/crds:\n{exc}"
    else:
        return kube_control_plane
    pytest.fail(error, pytrace=False)


@pytest.fixture
def namespace(kube_control_plane: KubeCluster, request) -> str:
    """A unique namespace for one test; deleted (without waiting) afterwards."""
    stem = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"e2e-{stem}-{uuid.uuid4().hex[:6]}"
    kube_control_plane.kubectl("create", "namespace", name)
    yield name
    kube_control_plane.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


# ------------------------------------------------------------------ Ray head and MLflow


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_alive(pgid: int) -> bool:
    """Whether any process of this process group is still alive (zombies excluded)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def stop_group(pgid: int, timeout: float = 20.0) -> None:
    """SIGTERM a process group we started (its own session), SIGKILL what is left after `timeout`."""
    import signal
    import time

    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _group_alive(pgid):
            return


class Service:
    """A server started in the background in its own process group; `url()` waits for it.

    Started early (the test module's first fixture) and awaited late, so that Ray and MLflow
    boot while the API-server-only tests run; on 2 loaded cores each takes a minute or more.
    """

    def __init__(self, name: str, cmd: list[str], url: str, probe_path: str, log: Path,
                 env: dict[str, str] | None = None, timeout: float = 300.0, launcher_exits: bool = False):
        self.name, self.cmd, self.base, self.probe_path, self.log = name, cmd, url, probe_path, log
        self.env, self.timeout, self.launcher_exits = env, timeout, launcher_exits
        self.proc: subprocess.Popen | None = None
        self._ready = False

    def launch(self) -> "Service":
        if self.proc is None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log, "w") as out:
                self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
            self.started = __import__("time").monotonic()
        return self

    def url(self) -> str:
        """The base URL once the service answers its probe; fails the test with the log's tail if it cannot."""
        import time

        import httpx

        self.launch()
        assert self.proc is not None
        deadline = self.started + self.timeout
        last: object = None
        while not self._ready:
            code = self.proc.poll()
            # `ray start` (no --block) exits 0 once the head is up; its processes live on in the group.
            if code is not None and not (self.launcher_exits and code == 0):
                pytest.fail(f"{self.name} exited with status {code}; tail of {self.log}:\n{self._tail()}", pytrace=False)
            try:
                r = httpx.get(self.base + self.probe_path, timeout=5)
                self._ready = r.status_code == 200
                last = f"HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                last = exc
            if not self._ready:
                if time.monotonic() > deadline:
                    pytest.fail(f"{self.name} not ready after {self.timeout:.0f}s ({last!r}); tail of {self.log}:\n"
                                f"{self._tail()}", pytrace=False)
                time.sleep(1)
        return self.base

    def _tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc.pid)
            with __import__("contextlib").suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)


def ray_head_service(root: Path) -> Service:
    """`ray start --head` on loopback only, with the dashboard (Jobs API, Serve REST API) on a free port.

    - RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps every Ray address on 127.0.0.1: on Linux Ray
      otherwise swaps 127.0.0.1 for the host's routable address.
    - No `--block`: with it, any Ray subprocess that dies takes the head down, and under load
      the Ray Client server (which we never use) gives up after 30 s waiting for the raylet.
      The head's processes stay in the process group of `ray start`, which `stop()` ends.
    - Every port is chosen here, so concurrent Ray instances on the machine never collide.
    """
    import sys

    ray = Path(sys.executable).parent / "ray"
    dash = free_port()
    # Worker ports below the kernel's ephemeral range (where free_port() picks the others), so the
    # two can never overlap; the pid spreads concurrent sessions apart.
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    slots = max(1, (low - 10000) // 100 - 1)
    base = 10000 + (os.getpid() % slots) * 100
    temp = Path(tempfile.mkdtemp(prefix="ae2e-ray-", dir="/tmp"))  # short: Ray's socket paths are length-bound
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_AUTH_MODE": "disabled", "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "300"}
    env.pop("RAY_ADDRESS", None)
    gcs = free_port()
    cmd = [str(ray), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--num-cpus=2", "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--ray-client-server-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
           f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
           f"--min-worker-port={base}", f"--max-worker-port={base + 99}", f"--temp-dir={temp}",
           "--disable-usage-stats"]
    svc = Service("ray head", cmd, f"http://127.0.0.1:{dash}", "/api/jobs/", root / "ray-start.log", env=env,
                  timeout=420, launcher_exits=True)
    svc.temp_dir = temp
    svc.gcs_address = f"127.0.0.1:{gcs}"  # what a Ray driver (`ray.init(address=...)`) connects to
    return svc


def mlflow_service(root: Path) -> Service:
    import sys

    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")]
    return Service("mlflow server", cmd, f"http://127.0.0.1:{port}", "/health", root / "mlflow.log", timeout=300)


@pytest.fixture(scope="session")
def e2e_services():
    """The session's one Ray head and one MLflow server, launched on first request, awaited by the fixtures below.

    Their logs live in a directory outside pytest's basetemp (concurrent sessions prune it).
    """
    root = Path(tempfile.mkdtemp(prefix="anneal-e2e-services-"))
    services = {"ray": ray_head_service(root / "ray"), "mlflow": mlflow_service(root / "mlflow")}
    for s in services.values():
        s.launch()
    try:
        yield services
    finally:
        for s in services.values():
            s.stop()
        shutil.rmtree(services["ray"].temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_head(e2e_services) -> str:
    """The dashboard URL (Jobs API, Serve REST API) of a Ray head on loopback."""
    return e2e_services["ray"].url()


@pytest.fixture(scope="session")
def ray_driver_address(e2e_services, ray_head) -> str:
    """The head's GCS address, for a Ray driver such as `anneal run` with `ANNEAL_RAY_ADDRESS`."""
    return e2e_services["ray"].gcs_address


@pytest.fixture(scope="session")
def mlflow_server(e2e_services) -> str:
    """The tracking URI of an `mlflow server` on loopback (SQLite store, local artifacts)."""
    return e2e_services["mlflow"].url()
