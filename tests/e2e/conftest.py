"""Fixtures for tests against a real control plane: etcd + kube-apiserver +
kube-controller-manager on loopback, started by deploy/local/cluster.py.

- ``kube_control_plane`` (session): builds the binaries if the cache lacks them (minutes,
  once per machine), starts a fresh control plane in a temporary state directory with the
  KubeRay CRDs, and stops it at the end. If the binaries cannot be built it fails with the
  build log's tail; ``ANNEAL_SKIP_E2E=1`` turns every use into a skip instead.
- ``kube_cluster`` (session): the same cluster once every manifest in charts/anneal/crds
  is created and Established; a CRD the API server rejects fails the tests that use it.
- ``namespace`` (function): a fresh namespace per test, deleted afterwards.
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
