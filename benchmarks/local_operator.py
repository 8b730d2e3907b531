"""What the operator benchmarks share: an `mlflow server` (and, when asked, a Ray head), the local
control plane from deploy/local/cluster.py with Anneal's CRDs, and Anneal's operator process on
it, all in one temporary directory that is removed, with every process stopped, on the way out.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@dataclass
class LocalOperator:
    """tmp: the run's directory; kube: tests.e2e.conftest.KubeCluster; urls: "mlflow" (and "ray")."""

    tmp: Path
    kube: Any
    urls: dict[str, str]
    op: Any = field(default=None)

    def start_operator(self) -> Any:
        """Anneal's operator (`python -m anneal_operator`) against the cluster and MLflow."""
        from tests.e2e.test_operator import Operator

        (self.tmp / "operator").mkdir()
        self.op = Operator(self.kube.kubeconfig, self.urls["mlflow"], self.tmp / "operator").start()
        return self.op


@contextlib.contextmanager
def local_operator(prefix: str, *, ray: bool = False, kuberay: bool = False, scheduling: bool = False,
                   nodes: list[dict] | tuple[dict, ...] = ()) -> Iterator[LocalOperator]:
    """Start MLflow (and a Ray head), build and start the control plane (`kuberay`, `scheduling`
    as `cluster.up` takes them), add `nodes`; the operator is started by `start_operator()`."""
    from tests.e2e.conftest import KubeCluster, cluster, mlflow_service, ray_head_service

    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    services = {**({"ray": ray_head_service(tmp / "ray")} if ray else {}), "mlflow": mlflow_service(tmp / "mlflow")}
    env: LocalOperator | None = None
    try:
        for s in services.values():
            s.launch()
        cluster.build()
        info = cluster.up(tmp / "k8s", crd_dirs=[REPO / "charts" / "anneal" / "crds"], kuberay=kuberay,
                          scheduling=scheduling)
        if nodes:
            cluster.add_nodes(tmp / "k8s", nodes)
        kube = KubeCluster(Path(info["kubeconfig"]), info["server"], Path(info["state_dir"]), Path(info["bin_dir"]))
        env = LocalOperator(tmp, kube, {name: s.url() for name, s in services.items()})
        yield env
    finally:
        if env is not None and env.op is not None:
            env.op.stop()
        cluster.down(tmp / "k8s")
        for s in services.values():
            s.stop()
        if "ray" in services:
            shutil.rmtree(services["ray"].temp_dir, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
