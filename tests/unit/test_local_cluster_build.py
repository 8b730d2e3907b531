"""deploy/local/cluster.py rebuilds only the components whose binaries are missing or pinned anew."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "local" / "cluster.py"


@pytest.fixture(scope="module")
def cluster():
    spec = importlib.util.spec_from_file_location("anneal_local_cluster_unit", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _filled(cluster, root: Path):
    paths = cluster.Paths(root)
    paths.bin.mkdir(parents=True)
    for name in cluster.BINARIES:
        paths.binary(name).write_text("")
    paths.kuberay_crds.mkdir(parents=True)
    (paths.kuberay_crds / "ray.io_rayjobs.yaml").write_text("")
    paths.kueue_crds.mkdir(parents=True)
    (paths.kueue_crds / "kueue.x-k8s.io_workloads.yaml").write_text("")
    paths.kwok_stages.parent.mkdir(parents=True)
    paths.kwok_stages.write_text("")
    paths.stamp.write_text(json.dumps(cluster._wanted_versions()))
    return paths


def test_every_binary_belongs_to_one_pinned_component(cluster):
    owned = [b for bins in cluster.COMPONENT_BINARIES.values() for b in bins]
    assert len(owned) == len(set(owned))
    assert set(cluster.COMPONENT_BINARIES) == set(cluster._wanted_versions())
    # what `up --scheduling` starts is built by some component
    assert set(cluster.SCHEDULING) <= set(owned)
    assert cluster._wanted_versions()["helm"] == cluster.HELM_VERSION and cluster.HELM_MODULE == "helm.sh/helm/v4"


def test_a_full_cache_needs_nothing(cluster, tmp_path):
    paths = _filled(cluster, tmp_path)
    assert cluster.missing_components(paths) == [] and cluster.is_built(paths)


def test_a_cache_from_before_helm_rebuilds_helm_alone(cluster, tmp_path):
    paths = _filled(cluster, tmp_path)
    paths.binary("helm").unlink()
    old = {k: v for k, v in cluster._wanted_versions().items() if k != "helm"}
    paths.stamp.write_text(json.dumps(old))
    assert cluster.missing_components(paths) == ["helm"] and not cluster.is_built(paths)


def test_a_cache_from_before_the_scheduling_controllers_builds_only_those(cluster, tmp_path):
    """A machine whose cache was built before kube-scheduler, KubeRay, kwok and Kueue were added
    rebuilds the Kubernetes module (for kube-scheduler) and the three new components, nothing else."""
    paths = _filled(cluster, tmp_path)
    for name in ("kube-scheduler", "ray-operator", "kwok", "kueue"):
        paths.binary(name).unlink()
    paths.kwok_stages.unlink()
    old = {k: v for k, v in cluster._wanted_versions().items() if k not in ("kwok", "kueue")}
    paths.stamp.write_text(json.dumps(old))
    assert cluster.missing_components(paths) == ["kubernetes", "kuberay", "kwok", "kueue"]


@pytest.mark.parametrize(("component", "change"), [
    ("helm", "version"), ("etcd", "version"), ("kubernetes", "binary"), ("kuberay", "crds"),
    ("kueue", "crds"), ("kwok", "stages"), ("kuberay", "binary"), ("kueue", "version"),
])
def test_a_changed_pin_or_a_lost_output_rebuilds_that_component(cluster, tmp_path, component, change):
    paths = _filled(cluster, tmp_path)
    if change == "version":
        paths.stamp.write_text(json.dumps({**cluster._wanted_versions(), component: "v0.0.1"}))
    elif change == "binary":
        paths.binary(cluster.COMPONENT_BINARIES[component][0]).unlink()
    elif change == "stages":
        paths.kwok_stages.unlink()
    else:
        crds = paths.kuberay_crds if component == "kuberay" else paths.kueue_crds
        for f in crds.glob("*.yaml"):
            f.unlink()
    assert cluster.missing_components(paths) == [component]


def test_an_unreadable_stamp_rebuilds_everything(cluster, tmp_path):
    paths = _filled(cluster, tmp_path)
    paths.stamp.write_text("not json")
    assert cluster.missing_components(paths) == list(cluster.COMPONENT_BINARIES)
