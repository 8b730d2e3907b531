#!/usr/bin/env python3
"""A local, Docker-free Kubernetes control plane: etcd, kube-apiserver and
kube-controller-manager on loopback.

There are no nodes, no kubelet and no scheduler: resources are stored, validated,
garbage-collected and reconciled by controllers (an operator, the namespace and
garbage-collector controllers), but no Pod ever runs. That is what the e2e tests
and operator development need, and it starts in seconds.

Standard library only, so it runs before any virtualenv exists. Subcommands:

    build    compile etcd, kube-apiserver, kube-controller-manager, kubectl and helm
             from source with the Go toolchain into a cache outside the repository
             (${ANNEAL_CACHE_DIR:-~/.cache/anneal}/k8s), and fetch the KubeRay CRDs;
             only what is missing or pinned at another version is (re)built
    up       start the control plane (certificates, service-account key, admin
             kubeconfig in the state directory), wait for /readyz, create CRDs
    crds     (re)create CRDs from directories in a running cluster
    down     stop it, via the pidfiles in the state directory
    env      print shell exports (KUBECONFIG, PATH) for a running cluster
    status   print what is running; exit status 1 when not everything is

Importable from tests by path: ``build()``, ``up()``, ``down()``, ``status()``,
``apply_crds()`` and ``Paths`` are the API.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ETCD_VERSION = "v3.6.16"
KUBERNETES_VERSION = "v1.34.4"
KUBERAY_VERSION = "v1.6.2"
KUBERAY_MODULE = "github.com/ray-project/kuberay/ray-operator"
HELM_VERSION = "v4.3.2"
HELM_MODULE = "helm.sh/helm/v4"
KWOK_VERSION = "v0.8.0"
KWOK_MODULE = "sigs.k8s.io/kwok"
KUEUE_VERSION = "v0.17.0"
KUEUE_MODULE = "sigs.k8s.io/kueue"

REPO_ROOT = Path(__file__).resolve().parents[2]
ANNEAL_CRDS = REPO_ROOT / "charts" / "anneal" / "crds"

#: What each pinned component puts into bin/ (besides files: KubeRay's and Kueue's CRDs,
#: kwok's stages); `build` redoes only the components whose output
#: is missing or whose pinned version changed.
COMPONENT_BINARIES = {
    "etcd": ("etcd",),
    "kubernetes": ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl"),
    "helm": ("helm",),
    "kuberay": ("ray-operator",),
    "kwok": ("kwok",),
    "kueue": ("kueue",),
}
BINARIES = tuple(b for bins in COMPONENT_BINARIES.values() for b in bins)
# Start order; `down` stops in reverse.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager")

# Controllers that make a node-less cluster behave like a real one for API objects.
# No pod-creating controllers (deployment, replicaset, job, ...): nothing would run them.
DEFAULT_CONTROLLERS = (
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "clusterrole-aggregation-controller",
    "root-ca-certificate-publisher-controller",
)

SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"  # allocation only; no traffic ever flows
KUBERNETES_SERVICE_IP = "10.0.0.1"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"


class ClusterError(RuntimeError):
    """A failure with a message meant for the user (no traceback needed)."""


class BuildError(ClusterError):
    """The Go build failed; the message carries the tail of the build log."""


# --------------------------------------------------------------------------- paths


def cache_root() -> Path:
    base = os.environ.get("ANNEAL_CACHE_DIR") or str(Path.home() / ".cache" / "anneal")
    return Path(base).expanduser() / "k8s"


@dataclass(frozen=True)
class Paths:
    """Where the build cache lives (binaries, wrapper modules, CRDs, build log)."""

    root: Path

    @classmethod
    def default(cls) -> "Paths":
        return cls(cache_root())

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def src(self) -> Path:
        return self.root / "src"

    @property
    def kuberay_crds(self) -> Path:
        return self.root / "crds" / "kuberay"

    @property
    def kueue_crds(self) -> Path:
        return self.root / "crds" / "kueue"

    @property
    def kwok_stages(self) -> Path:
        """kwok's node and pod stages: nodes Ready at once, bound pods Running and Ready, deleted pods gone."""
        return self.root / "kwok" / "stages.yaml"

    @property
    def build_log(self) -> Path:
        return self.root / "build.log"

    @property
    def stamp(self) -> Path:
        return self.bin / "versions.json"

    def binary(self, name: str) -> Path:
        return self.bin / name


def default_state_dir() -> Path:
    return Path(os.environ.get("ANNEAL_K8S_STATE_DIR") or cache_root() / "state")


def _wanted_versions() -> dict[str, str]:
    return {"etcd": ETCD_VERSION, "kubernetes": KUBERNETES_VERSION, "kuberay": KUBERAY_VERSION,
            "helm": HELM_VERSION, "kwok": KWOK_VERSION, "kueue": KUEUE_VERSION}


def _built_versions(paths: Paths) -> dict[str, str]:
    try:
        stamp = json.loads(paths.stamp.read_text())
    except (OSError, ValueError):
        return {}
    return stamp if isinstance(stamp, dict) else {}


def _component_built(paths: Paths, component: str, stamp: dict[str, str]) -> bool:
    if stamp.get(component) != _wanted_versions()[component]:
        return False
    files = {
        "kuberay": [any(paths.kuberay_crds.glob("*.yaml"))],
        "kueue": [any(paths.kueue_crds.glob("*.yaml"))],
        "kwok": [paths.kwok_stages.is_file()],
    }.get(component, [])
    return all(files) and all(paths.binary(b).is_file() for b in COMPONENT_BINARIES[component])


def missing_components(paths: Paths | None = None) -> list[str]:
    """The components (COMPONENT_BINARIES' keys) whose output is absent or of another pinned version."""
    paths = paths or Paths.default()
    stamp = _built_versions(paths)
    return [c for c in COMPONENT_BINARIES if not _component_built(paths, c, stamp)]


def is_built(paths: Paths | None = None) -> bool:
    return not missing_components(paths)


def _say(msg: str) -> None:
    print(f"[anneal-k8s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- build


def _find_go() -> str:
    for candidate in (os.environ.get("GO"), shutil.which("go"), "/usr/local/go/bin/go"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise BuildError("the Go toolchain was not found (set $GO, or put `go` on PATH)")


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        GOTOOLCHAIN="local",  # never download a toolchain
        GOFLAGS="-mod=mod",
        CGO_ENABLED="0",  # static binaries, no C toolchain needed
    )
    return env


def _run_logged(cmd: list[str], cwd: Path, log, env: dict[str, str]) -> str:
    """Run a command, append its output to the build log, return its stdout."""
    log.write(f"\n$ (cd {cwd} && {' '.join(cmd)})\n")
    log.flush()
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    if proc.returncode != 0:
        log.write(proc.stdout)
        log.flush()
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return proc.stdout


def _module_download(go: str, module: str, version: str, cwd: Path, log, env) -> dict:
    out = _run_logged([go, "mod", "download", "-json", f"{module}@{version}"], cwd, log, env)
    info = json.loads(out)
    if info.get("Error"):
        raise BuildError(f"go mod download {module}@{version}: {info['Error']}")
    return info


def _local_replaces(gomod_text: str) -> list[str]:
    """Module paths that a go.mod replaces with local directories (`=> ./x`, `=> ../x`).

    Those replaces are why such a module cannot be `go install`ed or required as-is;
    the wrapper module replaces each with its published version instead.
    """
    modules: list[str] = []
    in_block = False
    for raw in gomod_text.splitlines():
        line = raw.split("//", 1)[0].strip()
        if not line:
            continue
        if line.startswith("replace ("):
            in_block = True
            continue
        if in_block and line == ")":
            in_block = False
            continue
        if line.startswith("replace "):
            line = line[len("replace ") :].strip()
        elif not in_block:
            continue
        if "=>" not in line:
            continue
        left, right = (s.strip() for s in line.split("=>", 1))
        target = right.split()[0]
        if target.startswith(".") and "FORBIDDEN" not in target:
            modules.append(left.split()[0])
    return modules


def _write_wrapper_module(
    directory: Path, name: str, requires: dict[str, str], replaces: dict[str, str], files: dict[str, str]
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    lines = [f"module {name}", "", "go 1.24.0", "", "require ("]
    lines += [f"\t{mod} {ver}" for mod, ver in requires.items()]
    lines += [")", "", "replace ("]
    lines += [f"\t{mod} => {mod} {ver}" for mod, ver in sorted(replaces.items())]
    lines += [")", ""]
    (directory / "go.mod").write_text("\n".join(lines))
    for rel, text in files.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


_KUBECTL_MAIN = """\
// kubectl, built from k8s.io/kubectl at the version the wrapper module pins.
package main

import (
\t"os"

\t"k8s.io/component-base/cli"
\t"k8s.io/kubectl/pkg/cmd"
)

func main() {
\tos.Exit(cli.Run(cmd.NewDefaultKubectlCommand()))
}
"""


def _tools_go(imports: list[str]) -> str:
    body = "\n".join(f'\t_ "{imp}"' for imp in imports)
    return f"//go:build tools\n\n// Keeps the main packages in go.mod for `go mod tidy`.\npackage tools\n\nimport (\n{body}\n)\n"


def _build_etcd(go: str, paths: Paths, log, env, jobs: int) -> None:
    module = "go.etcd.io/etcd/server/v3"
    work = paths.src / "etcd"
    work.mkdir(parents=True, exist_ok=True)
    info = _module_download(go, module, ETCD_VERSION, work, log, env)
    staged = _local_replaces(Path(info["GoMod"]).read_text())
    _write_wrapper_module(
        work,
        "anneal.local/etcd-build",
        {module: ETCD_VERSION},
        {m: ETCD_VERSION for m in staged},
        {"tools.go": _tools_go([module])},
    )
    _run_logged([go, "mod", "tidy"], work, log, env)
    _run_logged(
        [go, "build", "-p", str(jobs), "-trimpath", "-ldflags=-s -w", "-o", str(paths.binary("etcd")), module],
        work,
        log,
        env,
    )


def _build_kubernetes(go: str, paths: Paths, log, env, jobs: int) -> None:
    module = "k8s.io/kubernetes"
    work = paths.src / "kubernetes"
    work.mkdir(parents=True, exist_ok=True)
    info = _module_download(go, module, KUBERNETES_VERSION, work, log, env)
    # Staging modules (k8s.io/api, client-go, ...) are published as v0.<minor>.<patch>.
    staging_version = "v0." + KUBERNETES_VERSION.split(".", 1)[1]
    staged = _local_replaces(Path(info["GoMod"]).read_text())
    mains = ["k8s.io/kubernetes/cmd/kube-apiserver", "k8s.io/kubernetes/cmd/kube-controller-manager",
             "k8s.io/kubernetes/cmd/kube-scheduler"]
    _write_wrapper_module(
        work,
        "anneal.local/kubernetes-build",
        {module: KUBERNETES_VERSION},
        {m: staging_version for m in staged},
        {"tools.go": _tools_go(mains), "cmd/kubectl/main.go": _KUBECTL_MAIN},
    )
    _run_logged([go, "mod", "tidy"], work, log, env)
    # What hack/lib/version.sh stamps in; without it the binaries report v0.0.0-master.
    major, minor = KUBERNETES_VERSION.lstrip("v").split(".")[:2]
    stamp = {"gitVersion": KUBERNETES_VERSION, "gitMajor": major, "gitMinor": minor, "gitTreeState": "clean",
             "buildDate": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    ldflags = ["-s", "-w"] + [f"-X={pkg}.{key}={val}" for pkg in ("k8s.io/component-base/version",
                                                                  "k8s.io/client-go/pkg/version")
                              for key, val in stamp.items()]
    _run_logged(
        [go, "build", "-p", str(jobs), "-trimpath", "-ldflags=" + " ".join(ldflags), "-o", str(paths.bin) + "/",
         *mains, "./cmd/kubectl"],
        work,
        log,
        env,
    )


def _go_install(go: str, paths: Paths, log, env, jobs: int, target: str, ldflags: list[str] | None = None) -> None:
    """`go install module/cmd@version` into the cache's bin/ (for modules whose go.mod has no local replaces)."""
    # `go install m@v` resolves the module on its own; -mod=mod is refused outside a main module.
    env = dict(env, GOBIN=str(paths.bin), GOFLAGS="")
    _run_logged([go, "install", "-p", str(jobs), "-trimpath", "-ldflags=" + " ".join(["-s", "-w", *(ldflags or [])]),
                 target], paths.root, log, env)


def _build_helm(go: str, paths: Paths, log, env, jobs: int) -> None:
    # What helm's Makefile stamps in; without it `helm version` says only "v4.3".
    _go_install(go, paths, log, env, jobs, f"{HELM_MODULE}/cmd/helm@{HELM_VERSION}",
                [f"-X={HELM_MODULE}/internal/version.version={HELM_VERSION}",
                 f"-X={HELM_MODULE}/internal/version.gitTreeState=clean"])


def _copy_files(sources: list[Path], dest: Path) -> None:
    """Module-cache files are read-only: copy contents, not modes."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for src in sources:
        (dest / src.name).write_bytes(src.read_bytes())


def _build_kuberay(go: str, paths: Paths, log, env, jobs: int) -> None:
    """The KubeRay operator (its module's root package is the manager) and its CRDs."""
    work = paths.src
    work.mkdir(parents=True, exist_ok=True)
    info = _module_download(go, KUBERAY_MODULE, KUBERAY_VERSION, work, log, env)
    sources = sorted((Path(info["Dir"]) / "config" / "crd" / "bases").glob("*.yaml"))
    if not sources:
        raise BuildError(f"no CRDs in {KUBERAY_MODULE}@{KUBERAY_VERSION}")
    _copy_files(sources, paths.kuberay_crds)
    log.write(f"copied {len(sources)} KubeRay CRDs\n")
    _go_install(go, paths, log, env, jobs, f"{KUBERAY_MODULE}@{KUBERAY_VERSION}")


def _build_kwok(go: str, paths: Paths, log, env, jobs: int) -> None:
    """kwok (the controller, not kwokctl) and its "fast" stages, which it needs in its --config.

    Not `pod-complete` (a Job's pods Succeeded at once): KubeRay's job submitter is a Job, and a
    submitter that "finished" with no Ray job behind it would end the RayJob. Pods stay Running,
    as a long training job's would."""
    info = _module_download(go, KWOK_MODULE, KWOK_VERSION, paths.root, log, env)
    stage_dir = Path(info["Dir"]) / "kustomize" / "stage"
    files = [stage_dir / "node" / "fast" / "node-initialize.yaml", stage_dir / "node" / "heartbeat" / "node-heartbeat.yaml",
             *(stage_dir / "pod" / "fast" / f"pod-{s}.yaml" for s in ("ready", "delete"))]
    paths.kwok_stages.parent.mkdir(parents=True, exist_ok=True)
    paths.kwok_stages.write_text("\n---\n".join(f.read_text().strip() for f in files) + "\n")
    _go_install(go, paths, log, env, jobs, f"{KWOK_MODULE}/cmd/kwok@{KWOK_VERSION}",
                [f"-X={KWOK_MODULE}/pkg/consts.Version={KWOK_VERSION.lstrip('v')}"])


def _build_kueue(go: str, paths: Paths, log, env, jobs: int) -> None:
    """Kueue's manager and its CRDs."""
    info = _module_download(go, KUEUE_MODULE, KUEUE_VERSION, paths.root, log, env)
    components = Path(info["Dir"]) / "config" / "components"
    sources = sorted((components / "crd" / "bases").glob("*.yaml"))
    if not sources:
        raise BuildError(f"no CRDs in {KUEUE_MODULE}@{KUEUE_VERSION}")
    _copy_files(sources, paths.kueue_crds)
    _go_install(go, paths, log, env, jobs, f"{KUEUE_MODULE}/cmd/kueue@{KUEUE_VERSION}",
                [f"-X={KUEUE_MODULE}/pkg/version.GitVersion={KUEUE_VERSION}"])


def log_tail(paths: Paths | None = None, lines: int = 40) -> str:
    paths = paths or Paths.default()
    try:
        return "\n".join(paths.build_log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no build log)"


@contextlib.contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build(paths: Paths | None = None, force: bool = False, jobs: int | None = None) -> Paths:
    """Build the binaries and fetch the KubeRay CRDs into the cache, once.

    Concurrent callers serialise on a lock file; the second finds the cache filled.
    Raises BuildError with the tail of the build log on failure.
    """
    paths = paths or Paths.default()
    jobs = jobs or os.cpu_count() or 2
    with _lock(paths.root / "build.lock"):
        if not force and is_built(paths):
            return paths
        go = _find_go()
        env = _go_env()
        env.setdefault("GOMAXPROCS", str(jobs))
        paths.bin.mkdir(parents=True, exist_ok=True)
        stamp = {} if force else _built_versions(paths)
        todo = list(COMPONENT_BINARIES) if force else missing_components(paths)
        steps = {
            "etcd": (f"etcd {ETCD_VERSION}", _build_etcd),
            "kubernetes": (f"kube-apiserver, kube-controller-manager, kube-scheduler, kubectl {KUBERNETES_VERSION}",
                           _build_kubernetes),
            "helm": (f"helm {HELM_VERSION}", _build_helm),
            "kuberay": (f"KubeRay operator and CRDs {KUBERAY_VERSION}", _build_kuberay),
            "kwok": (f"kwok {KWOK_VERSION}", _build_kwok),
            "kueue": (f"Kueue {KUEUE_VERSION}", _build_kueue),
        }
        started = time.monotonic()
        _say(f"building {', '.join(todo)} into {paths.bin} (log: {paths.build_log}); a cold build of "
             "everything takes about 16 minutes on 2 cores")
        with open(paths.build_log, "w") as log:
            log.write(f"go: {go}\nversions: {json.dumps(_wanted_versions())}\nbuilding: {todo}\n")
            for component in todo:
                label, step = steps[component]
                _say(label)
                t0 = time.monotonic()
                try:
                    step(go, paths, log, env, jobs)
                except (subprocess.CalledProcessError, OSError, ValueError, BuildError) as exc:
                    log.write(f"\nBUILD FAILED: {exc}\n")
                    log.flush()
                    raise BuildError(f"build failed: {exc}\n--- tail of {paths.build_log} ---\n{log_tail(paths)}") from exc
                log.write(f"{component}: {time.monotonic() - t0:.0f}s\n")
                # Stamped one by one: a later failure keeps what was built.
                stamp = {**stamp, component: _wanted_versions()[component]}
                paths.stamp.write_text(json.dumps(stamp))
            elapsed = time.monotonic() - started
            log.write(f"\nbuild finished in {elapsed:.0f}s\n")
        _say(f"built in {elapsed:.0f}s")
        return paths


# --------------------------------------------------------------------------- certificates


def _openssl() -> str:
    found = shutil.which("openssl")
    if not found:
        raise ClusterError("`openssl` is needed to generate the cluster's certificates; install it (apt-get install openssl)")
    return found


def _ossl(*args: str, cwd: Path) -> None:
    proc = subprocess.run([_openssl(), *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ClusterError(f"openssl {' '.join(args[:2])} failed: {proc.stderr.strip()}")


_CA_CONF = """\
[req]
distinguished_name = dn
prompt = no
x509_extensions = ext
[dn]
CN = anneal-local-ca
[ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign, digitalSignature
subjectKeyIdentifier = hash
"""


def _leaf_conf(subject: list[tuple[str, str]], usage: str, sans: list[str] | None) -> str:
    dn = "\n".join(f"{i}.{k} = {v}" for i, (k, v) in enumerate(subject))
    ext = [
        "basicConstraints = critical, CA:FALSE",
        "keyUsage = critical, digitalSignature, keyEncipherment",
        f"extendedKeyUsage = {usage}",
        "authorityKeyIdentifier = keyid",
    ]
    if sans:
        ext.append("subjectAltName = " + ", ".join(sans))
    return "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\n" + dn + "\n[ext]\n" + "\n".join(ext) + "\n"


def _issue(pki: Path, name: str, subject: list[tuple[str, str]], usage: str, sans: list[str] | None = None) -> None:
    conf = pki / f"{name}.cnf"
    conf.write_text(_leaf_conf(subject, usage, sans))
    _ossl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
          "-config", conf.name, cwd=pki)
    _ossl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-set_serial",
          str(int.from_bytes(os.urandom(8), "big")), "-days", "3650", "-sha256", "-out", f"{name}.crt",
          "-extfile", conf.name, "-extensions", "ext", cwd=pki)
    (pki / f"{name}.csr").unlink()
    conf.unlink()


def _ensure_pki(pki: Path) -> None:
    """CA, serving cert, client certs and the service-account key; kept across restarts."""
    if (pki / "complete").exists():
        return
    if pki.exists():
        shutil.rmtree(pki)
    pki.mkdir(parents=True)
    os.chmod(pki, 0o700)
    (pki / "ca.cnf").write_text(_CA_CONF)
    _ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "3650",
          "-sha256", "-config", "ca.cnf", cwd=pki)
    (pki / "ca.cnf").unlink()
    sans = ["IP:127.0.0.1", f"IP:{KUBERNETES_SERVICE_IP}", "DNS:localhost", "DNS:kubernetes",
            "DNS:kubernetes.default", "DNS:kubernetes.default.svc", "DNS:kubernetes.default.svc.cluster.local"]
    _issue(pki, "apiserver", [("CN", "kube-apiserver")], "serverAuth", sans)
    # Admin: system:masters bypasses RBAC, like kubeadm's admin.conf.
    _issue(pki, "admin", [("O", "system:masters"), ("CN", "anneal-admin")], "clientAuth")
    # The controller manager runs with --use-service-account-credentials=false, so its own
    # identity needs every permission its controllers use: system:masters again.
    _issue(pki, "controller-manager", [("O", "system:masters"), ("CN", "system:kube-controller-manager")],
           "clientAuth")
    _ossl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "sa.key", cwd=pki)
    _ossl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
    (pki / "complete").write_text("")


def _kubeconfig(server: str, pki: Path, user: str, cert: str) -> str:
    def b64(name: str) -> str:
        return base64.b64encode((pki / name).read_bytes()).decode()

    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "anneal-local", "cluster": {"server": server,
                                                               "certificate-authority-data": b64("ca.crt")}}],
            "users": [{"name": user, "user": {"client-certificate-data": b64(f"{cert}.crt"),
                                              "client-key-data": b64(f"{cert}.key")}}],
            "contexts": [{"name": "anneal-local", "context": {"cluster": "anneal-local", "user": user}}],
            "current-context": "anneal-local",
            "preferences": {},
        },
        indent=2,
    )


# --------------------------------------------------------------------------- scheduling

#: The controllers that make Pods land on nodes, started by `up(scheduling=True)` after the
#: control plane: kube-scheduler binds Pods, kwok plays the kubelet of fake nodes (marks bound
#: Pods Running and Ready; no container runs), the KubeRay operator turns RayJobs and
#: RayServices into RayClusters and Pods, and Kueue admits queued workloads against quota.
SCHEDULING = ("kube-scheduler", "kwok", "ray-operator", "kueue")
KUEUE_NAMESPACE = "kueue-system"
KUEUE_CERT_SECRET = "kueue-webhook-server-cert"
#: Kueue's integrations that Anneal's objects use; its webhooks for other kinds are not installed.
KUEUE_FRAMEWORKS = ("ray.io/rayjob", "ray.io/raycluster", "ray.io/rayservice")
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_TAINT = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}


def fake_node(name: str, *, cpu: str = "32", memory: str = "128Gi", gpus: int = 0, product: str = "",
              labels: dict[str, str] | None = None, taints: list[dict[str, str]] | None = None) -> dict:
    """A Node that kwok runs: allocatable capacity as given; a GPU node gets what the NVIDIA
    device plugin and GPU Feature Discovery put on a real one (`nvidia.com/gpu` capacity,
    `nvidia.com/gpu.product` etc.) and the GPU taint that GPU node pools carry."""
    node_labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                   "type": "kwok"}
    capacity = {"cpu": cpu, "memory": memory, "pods": "110", "ephemeral-storage": "1Ti"}
    node_taints = list(taints or [])
    if gpus:
        node_labels.update({"nvidia.com/gpu.present": "true", "nvidia.com/gpu.count": str(gpus),
                            "nvidia.com/gpu.product": product})
        capacity[GPU_RESOURCE] = str(gpus)
        if taints is None:
            node_taints.append(dict(GPU_TAINT))
    node_labels.update(labels or {})
    spec: dict = {"taints": node_taints} if node_taints else {}
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": node_labels, "annotations": {KWOK_NODE_ANNOTATION: "fake"}},
            "spec": spec, "status": {"capacity": capacity, "allocatable": dict(capacity)}}


#: `up --scheduling` creates these unless told otherwise: one CPU node for Ray heads, two 8×H100
#: SXM nodes and one 8×A100 80GB node (the product values GFD writes for those GPUs).
DEFAULT_NODES = (
    fake_node("cpu-0"),
    fake_node("gpu-h100-0", cpu="192", memory="2Ti", gpus=8, product="NVIDIA-H100-80GB-HBM3"),
    fake_node("gpu-h100-1", cpu="192", memory="2Ti", gpus=8, product="NVIDIA-H100-80GB-HBM3"),
    fake_node("gpu-a100-0", cpu="96", memory="1Ti", gpus=8, product="NVIDIA-A100-SXM4-80GB"),
)


def _apply_objects(paths: Paths, state: State, objects: list[dict], what: str) -> None:
    proc = subprocess.run([str(paths.binary("kubectl")), f"--kubeconfig={state.kubeconfig}", "apply",
                           "--server-side", "--force-conflicts", "--field-manager=anneal-local", "-f", "-"],
                          input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}),
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise ClusterError(f"creating {what} failed: {proc.stderr.strip() or proc.stdout.strip()}")


def add_nodes(state_dir: Path | str, nodes: list[dict] | tuple[dict, ...], paths: Paths | None = None) -> None:
    """Create (or update) fake nodes; kwok marks them Ready. Their status is written through the
    status subresource, as a kubelet would (a create ignores `status`)."""
    paths = paths or Paths.default()
    state = State(Path(state_dir).resolve())
    _apply_objects(paths, state, [{k: v for k, v in n.items() if k != "status"} for n in nodes], "fake nodes")
    for node in nodes:
        # The API server's TaintNodesByCondition admission adds node.kubernetes.io/not-ready at
        # creation; the node lifecycle controller (not run here) would lift it once kwok reports
        # Ready. The node's own taints are set instead, as that controller would leave them.
        proc = _kubectl(paths, state, "patch", "node", node["metadata"]["name"], "--type=merge", "-p",
                        json.dumps({"spec": {"taints": (node.get("spec") or {}).get("taints") or None}}))
        if proc.returncode != 0:
            raise ClusterError(f"setting the taints of node {node['metadata']['name']} failed: {proc.stderr.strip()}")
        proc = _kubectl(paths, state, "patch", "node", node["metadata"]["name"], "--subresource=status",
                        "--type=merge", "-p", json.dumps({"status": node["status"]}))
        if proc.returncode != 0:
            raise ClusterError(f"setting the capacity of node {node['metadata']['name']} failed: {proc.stderr.strip()}")


#: The CRDs whose conversion webhook Kueue's certificate rotator fills in (cmd/kueue, pkg/util/cert).
KUEUE_CONVERSION_CRDS = tuple(f"{r}.kueue.x-k8s.io" for r in
                              ("localqueues", "clusterqueues", "workloads", "cohorts", "multikueueclusters"))
KUEUE_WEBHOOK_SERVICE = {"name": "kueue-webhook-service", "namespace": KUEUE_NAMESPACE}
KUEUE_CONVERSION = {"strategy": "Webhook", "webhook": {
    "conversionReviewVersions": ["v1"], "clientConfig": {"service": {**KUEUE_WEBHOOK_SERVICE, "path": "/convert"}}}}


def _kueue_webhook_placeholders() -> list[dict]:
    """The validating and mutating webhook configurations Kueue's certificate rotator injects its CA
    into (it does not start until it has), each with one webhook that matches nothing.

    Kueue's real webhooks are not installed: the API server reaches a webhook through a Service,
    and nothing routes Services here (docs/local-cluster.md). The same holds for the CRDs'
    conversion webhook, declared (KUEUE_CONVERSION) only for the rotator: v1beta2 is the storage
    version and the only one to use here; a v1beta1 request would fail to convert.
    """
    out = []
    for kind in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"):
        suffix = "validating" if kind.startswith("Validating") else "mutating"
        out.append({"apiVersion": "admissionregistration.k8s.io/v1", "kind": kind,
                    "metadata": {"name": f"kueue-{suffix}-webhook-configuration"},
                    "webhooks": [{
                        "name": f"placeholder.{suffix}.kueue.x-k8s.io", "admissionReviewVersions": ["v1"],
                        "sideEffects": "None", "failurePolicy": "Ignore", "timeoutSeconds": 1,
                        "clientConfig": {"service": {**KUEUE_WEBHOOK_SERVICE, "path": "/placeholder"}},
                        # a group no object has: the API server never calls it
                        "rules": [{"apiGroups": ["placeholder.anneal.invalid"], "apiVersions": ["v1"],
                                   "operations": ["CREATE"], "resources": ["nothing"]}]}]})
    return out


def _kueue_config(state: State, ports: dict[str, int]) -> Path:
    """Kueue's Configuration (JSON is YAML) on loopback ports.

    Kueue's admission webhooks are not installed. The API server reaches a webhook through a
    Service, verifying a certificate for `<service>.<namespace>.svc`; nothing routes Services here,
    and Kueue hard-codes where it reads other certificates from (/etc/kueue/...). Kueue makes its
    own certificates (internal cert management) for the webhook server nobody calls. What the
    rayjob/rayservice webhooks would add, suspending a queued job at creation, Anneal does itself.
    """
    certs = state.dir / "kueue-certs"
    certs.mkdir(exist_ok=True)
    config = {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration",
        "namespace": KUEUE_NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{ports['kueue_health']}"},
        "metrics": {"bindAddress": "0"},
        "webhook": {"port": ports["kueue_webhook"], "host": "127.0.0.1", "certDir": str(certs)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": True},
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": list(KUEUE_FRAMEWORKS)},
        # The on-demand visibility API is an aggregated API server: nothing here routes to it.
        "featureGates": {"VisibilityOnDemand": False},
    }
    path = state.dir / "kueue-config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def _kueue_probe(paths: Paths, state: State, ports: dict[str, int]):
    """Kueue's readiness, doing the kubelet's part meanwhile: Kueue's certificate rotator writes its
    webhook certificate into a Secret and waits for the file in its cert dir (in a pod: the
    Secret's volume), so the Secret's keys are copied there as soon as they are filled in."""
    certs = state.dir / "kueue-certs"
    ready = _http_probe(f"http://127.0.0.1:{ports['kueue_health']}/readyz")

    def probe() -> tuple[bool, str]:
        if not (certs / "tls.crt").is_file():
            proc = _kubectl(paths, state, "get", "secret", KUEUE_CERT_SECRET, "-n", KUEUE_NAMESPACE, "-o", "json")
            data = (json.loads(proc.stdout).get("data") or {}) if proc.returncode == 0 else {}
            if not {"tls.crt", "tls.key", "ca.crt"} <= data.keys():
                return False, f"Secret {KUEUE_NAMESPACE}/{KUEUE_CERT_SECRET} not yet filled in by Kueue"
            for name in ("ca.crt", "tls.key", "tls.crt"):  # tls.crt last: the one Kueue waits for
                target = certs / name
                target.write_bytes(base64.b64decode(data[name]))
                target.chmod(0o600)
        return ready()

    return probe


def start_scheduling(state_dir: Path | str, paths: Paths | None = None,
                     nodes: list[dict] | tuple[dict, ...] | None = DEFAULT_NODES, timeout: float = 180.0) -> dict:
    """Start kube-scheduler, kwok, the KubeRay operator and Kueue against a running control
    plane (or find them running), then create `nodes` (default: DEFAULT_NODES; None or () for none).

    Returns the ports they listen on, also recorded in cluster.json under "scheduling"."""
    paths = paths or Paths.default()
    state = State(Path(state_dir).resolve())
    missing = [b for b in SCHEDULING if not paths.binary(b).is_file()] + \
        [str(f) for f in (paths.kwok_stages,) if not f.is_file()]
    if missing:
        raise ClusterError(f"not built: {', '.join(missing)}; run `{sys.argv[0]} build` first")
    if not _ready(state):
        raise ClusterError(f"no control plane is ready in {state.dir}; run `up` first")
    info = json.loads(state.info.read_text())
    running = {c: _pid_alive(state, c) for c in SCHEDULING}
    if all(running.values()) and info.get("scheduling"):
        ports = info["scheduling"]
    else:
        for component in SCHEDULING:  # a partial set from an earlier run: start clean
            if running[component]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(running[component], signal.SIGTERM)
        ports = {}
        for name in ("scheduler", "kwok", "ray_operator_health", "kueue_health", "kueue_webhook"):
            port = _free_port()
            while port in ports.values():
                port = _free_port()
            ports[name] = port
        started = time.monotonic()
        kubeconfig = str(state.kubeconfig)
        env = {**os.environ, "KUBECONFIG": kubeconfig}
        insecure = ssl._create_unverified_context()  # their serving certs are self-signed
        # Kueue's CRDs, namespace, (empty) webhook certificate Secret and the webhook configurations
        # its certificate rotator injects a CA into first: Kueue waits for them before it starts.
        apply_crds(state.dir, [paths.kueue_crds], paths=paths)
        _apply_objects(paths, state, [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": KUEUE_NAMESPACE}},
            {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
             "metadata": {"name": KUEUE_CERT_SECRET, "namespace": KUEUE_NAMESPACE}},
            *_kueue_webhook_placeholders(),
        ], "Kueue's namespace, certificate Secret and webhook configurations")
        for crd in KUEUE_CONVERSION_CRDS:
            proc = _kubectl(paths, state, "patch", "crd", crd, "--type=merge", "-p",
                            json.dumps({"spec": {"conversion": KUEUE_CONVERSION}}))
            if proc.returncode != 0:
                raise ClusterError(f"declaring the conversion webhook of {crd} failed: {proc.stderr.strip()}")
        proc = _start(state, paths, "kube-scheduler", [
            f"--kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}", "--leader-elect=false", "--bind-address=127.0.0.1",
            f"--secure-port={ports['scheduler']}", f"--cert-dir={state.dir / 'scheduler-certs'}", "--profiling=false"])
        _wait_for(proc, state, "kube-scheduler",
                  _http_probe(f"https://127.0.0.1:{ports['scheduler']}/healthz", insecure), timeout)
        proc = _start(state, paths, "kwok", [
            f"--kubeconfig={kubeconfig}", f"--config={paths.kwok_stages}",
            f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
            f"--server-address=127.0.0.1:{ports['kwok']}", "--cidr=10.244.0.0/16", "--node-ip=10.1.0.1"], env=env)
        _wait_for(proc, state, "kwok", _http_probe(f"http://127.0.0.1:{ports['kwok']}/healthz"), timeout)
        proc = _start(state, paths, "ray-operator", [
            "--metrics-addr=0", f"--health-probe-bind-address=127.0.0.1:{ports['ray_operator_health']}",
            "--enable-leader-election=false", "--log-stdout-encoder=console"], env=env)
        _wait_for(proc, state, "ray-operator",
                  _http_probe(f"http://127.0.0.1:{ports['ray_operator_health']}/readyz"), timeout)
        proc = _start(state, paths, "kueue", [f"--config={_kueue_config(state, ports)}"], env=env)
        _wait_for(proc, state, "kueue", _kueue_probe(paths, state, ports), timeout)
        info["scheduling"] = ports
        state.info.write_text(json.dumps(info, indent=2))
        _say(f"kube-scheduler, kwok, KubeRay operator and Kueue ready in {time.monotonic() - started:.1f}s")
    if nodes:
        add_nodes(state.dir, nodes, paths=paths)
        _say(f"{len(nodes)} fake nodes: {', '.join(n['metadata']['name'] for n in nodes)}")
    return ports


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class State:
    """A control plane's state directory: pki, etcd data, kubeconfigs, logs, pidfiles."""

    dir: Path

    @property
    def pki(self) -> Path:
        return self.dir / "pki"

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "admin.kubeconfig"

    @property
    def info(self) -> Path:
        return self.dir / "cluster.json"

    def pidfile(self, component: str) -> Path:
        return self.dir / "run" / f"{component}.pid"

    def logfile(self, component: str) -> Path:
        return self.dir / "logs" / f"{component}.log"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _choose_ports(state: State) -> dict[str, int]:
    """Reuse the previous ports when still free (etcd's data remembers its peer URL)."""
    names = ("etcd_client", "etcd_peer", "apiserver", "controller_manager")
    previous: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError, KeyError):
        previous = json.loads(state.info.read_text())["ports"]
    ports: dict[str, int] = {}
    for name in names:
        port = previous.get(name)
        if not port or not _port_free(port) or port in ports.values():
            port = _free_port()
            while port in ports.values():
                port = _free_port()
        ports[name] = port
    return ports


def _is_running(pid: int, component: str) -> bool:
    """Whether `pid` is a live (not zombie) process of the component's binary."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    except (OSError, IndexError):
        pass
    return os.path.basename(cmdline.decode(errors="replace")) == component


def _pid_alive(state: State, component: str) -> int | None:
    """The pid from the component's pidfile if that process is still our binary."""
    try:
        pid = int(state.pidfile(component).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _is_running(pid, component) else None


_CHILDREN: list[subprocess.Popen] = []


def _start(state: State, paths: Paths, component: str, args: list[str],
           env: dict[str, str] | None = None) -> subprocess.Popen:
    state.pidfile(component).parent.mkdir(parents=True, exist_ok=True)
    state.logfile(component).parent.mkdir(parents=True, exist_ok=True)
    with open(state.logfile(component), "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {component}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            [str(paths.binary(component)), *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives `up`; not killed by the terminal's ^C
            cwd=state.dir,
            env=env,
        )
    state.pidfile(component).write_text(f"{proc.pid}\n")
    _CHILDREN.append(proc)  # keeps Popen from warning when collected; it outlives us on purpose
    return proc


def _log_tail(state: State, component: str, lines: int = 25) -> str:
    try:
        return "\n".join(state.logfile(component).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_for(proc: subprocess.Popen, state: State, component: str, probe, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        ok, last = probe()
        if ok:
            return
        code = proc.poll()
        # Popen.poll() is not proof of death: when something else in this process reaps
        # children (a SIGCHLD handler, a waitpid(-1) loop), waitpid fails with ECHILD and
        # Popen reports "exit status 0" for a process that is still running. Ask /proc.
        if code is not None and not _is_running(proc.pid, component):
            reason = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            raise ClusterError(f"{component} exited during start-up ({reason}); tail of "
                               f"{state.logfile(component)}:\n{_log_tail(state, component)}")
        time.sleep(0.2)
    raise ClusterError(f"{component} not ready after {timeout:.0f}s ({last}); tail of "
                       f"{state.logfile(component)}:\n{_log_tail(state, component)}")


def _http_probe(url: str, context: ssl.SSLContext | None = None):
    def probe() -> tuple[bool, str]:
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as resp:
                body = resp.read().decode(errors="replace")
                return resp.status == 200, body[:200]
        except urllib.error.HTTPError as exc:
            return False, f"HTTP {exc.code}: {exc.read().decode(errors='replace')[:300]}"
        except (OSError, urllib.error.URLError) as exc:
            return False, str(exc)

    return probe


def _admin_ssl_context(state: State) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(state.pki / "ca.crt"))
    ctx.load_cert_chain(str(state.pki / "admin.crt"), str(state.pki / "admin.key"))
    return ctx


def _server(ports: dict[str, int]) -> str:
    return f"https://127.0.0.1:{ports['apiserver']}"


def _etcd_args(state: State, ports: dict[str, int]) -> list[str]:
    client = f"http://127.0.0.1:{ports['etcd_client']}"
    peer = f"http://127.0.0.1:{ports['etcd_peer']}"
    return [
        "--name=anneal-local",
        f"--data-dir={state.dir / 'etcd'}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=anneal-local={peer}",
        "--listen-metrics-urls=",
        "--unsafe-no-fsync",  # throwaway local data; fsync dominates API latency otherwise
        "--log-level=warn",
    ]


def _apiserver_args(state: State, ports: dict[str, int]) -> list[str]:
    pki = state.pki
    return [
        f"--etcd-servers=http://127.0.0.1:{ports['etcd_client']}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        f"--secure-port={ports['apiserver']}",
        f"--tls-cert-file={pki / 'apiserver.crt'}",
        f"--tls-private-key-file={pki / 'apiserver.key'}",
        f"--client-ca-file={pki / 'ca.crt'}",
        # Publishes a request-header CA so delegating servers (the controller manager,
        # aggregated APIs) stop complaining; only a cert named front-proxy-client may use it.
        f"--requestheader-client-ca-file={pki / 'ca.crt'}",
        "--requestheader-allowed-names=front-proxy-client",
        "--requestheader-username-headers=X-Remote-User",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
        f"--service-account-key-file={pki / 'sa.pub'}",
        f"--service-account-signing-key-file={pki / 'sa.key'}",
        "--authorization-mode=RBAC",
        f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
        "--allow-privileged=true",
        # The `kubernetes` Service cannot point at 127.0.0.1 (loopback endpoints are
        # invalid) and no Pod would use it; skip the reconciler rather than log its failure.
        "--endpoint-reconciler-type=none",
        "--profiling=false",
        f"--cert-dir={state.dir / 'apiserver-certs'}",
    ]


def _controller_manager_args(state: State, ports: dict[str, int], controllers: tuple[str, ...]) -> list[str]:
    pki = state.pki
    kubeconfig = state.dir / "controller-manager.kubeconfig"
    return [
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={ports['controller_manager']}",
        f"--cert-dir={state.dir / 'controller-manager-certs'}",
        f"--controllers={','.join(controllers)}",
        "--use-service-account-credentials=false",
        f"--root-ca-file={pki / 'ca.crt'}",
        f"--service-account-private-key-file={pki / 'sa.key'}",
        "--leader-elect=false",
        "--profiling=false",
    ]


def _running(state: State) -> dict[str, int | None]:
    return {c: _pid_alive(state, c) for c in COMPONENTS}


def _ready(state: State) -> bool:
    try:
        server = json.loads(state.info.read_text())["server"]
    except (OSError, ValueError, KeyError):
        return False
    ok, _ = _http_probe(server + "/readyz", _admin_ssl_context(state))()
    return ok


def _write_config(state: State, paths: Paths) -> dict:
    """Choose ports; write the kubeconfigs and cluster.json for them."""
    ports = _choose_ports(state)
    server = _server(ports)
    info = {"server": server, "kubeconfig": str(state.kubeconfig), "state_dir": str(state.dir),
            "bin_dir": str(paths.bin), "ports": ports}
    state.kubeconfig.write_text(_kubeconfig(server, state.pki, "anneal-admin", "admin"))
    os.chmod(state.kubeconfig, 0o600)
    kcm_kubeconfig = state.dir / "controller-manager.kubeconfig"
    kcm_kubeconfig.write_text(_kubeconfig(server, state.pki, "system:kube-controller-manager", "controller-manager"))
    os.chmod(kcm_kubeconfig, 0o600)
    state.info.write_text(json.dumps(info, indent=2))
    return info


def _start_components(state: State, paths: Paths, ports: dict[str, int], controllers: tuple[str, ...],
                      timeout: float) -> None:
    server = _server(ports)
    proc = _start(state, paths, "etcd", _etcd_args(state, ports))
    _wait_for(proc, state, "etcd", _http_probe(f"http://127.0.0.1:{ports['etcd_client']}/health"), timeout)
    proc = _start(state, paths, "kube-apiserver", _apiserver_args(state, ports))
    _wait_for(proc, state, "kube-apiserver", _http_probe(server + "/readyz", _admin_ssl_context(state)), timeout)
    proc = _start(state, paths, "kube-controller-manager", _controller_manager_args(state, ports, controllers))
    _wait_for(proc, state, "kube-controller-manager",
              _http_probe(f"https://127.0.0.1:{ports['controller_manager']}/healthz",
                          ssl._create_unverified_context()),  # its serving cert is self-signed
              timeout)


def up(
    state_dir: Path | str | None = None,
    crd_dirs: list[Path | str] | None = None,
    kuberay: bool = True,
    paths: Paths | None = None,
    controllers: tuple[str, ...] = DEFAULT_CONTROLLERS,
    timeout: float = 120.0,
    scheduling: bool = False,
    nodes: list[dict] | tuple[dict, ...] | None = DEFAULT_NODES,
) -> dict:
    """Start the control plane (or find it running) and create CRDs; with `scheduling`, also
    kube-scheduler, kwok, the KubeRay operator and Kueue, and the fake `nodes`
    (`start_scheduling`), with the job controller added to `controllers` (KubeRay's job
    submitter is a Job).

    Returns the cluster description written to <state>/cluster.json:
    {"server", "kubeconfig", "state_dir", "bin_dir", "ports"} (+ "scheduling": their ports).
    """
    if scheduling and "job-controller" not in controllers:
        controllers = (*controllers, "job-controller")
    paths = paths or Paths.default()
    state = State(Path(state_dir or default_state_dir()).resolve())
    needed = (*COMPONENTS, "kubectl", *(SCHEDULING if scheduling else ()))
    missing = [b for b in needed if not paths.binary(b).is_file()]
    if missing:
        raise ClusterError(f"{', '.join(missing)} missing under {paths.bin}; run `{sys.argv[0]} build` first")
    state.dir.mkdir(parents=True, exist_ok=True)

    running = _running(state)
    if all(running.values()) and _ready(state):
        _say(f"already running ({state.dir})")
        info = json.loads(state.info.read_text())
    else:
        if any(running.values()):
            _say("partially running; restarting")
            down(state.dir)
        started = time.monotonic()
        _ensure_pki(state.pki)
        for attempt in range(1, 4):
            info = _write_config(state, paths)
            try:
                _start_components(state, paths, info["ports"], controllers, timeout)
                break
            except ClusterError as exc:
                down(state.dir)
                # Ports are picked free, then bound by another process: another local cluster
                # or Ray on this machine may take one in between. Pick again.
                if attempt == 3 or "address already in use" not in str(exc):
                    raise
                _say(f"a port was taken while starting ({exc.args[0].splitlines()[0]}); trying other ports")
            except BaseException:
                down(state.dir)
                raise
        _say(f"control plane ready in {time.monotonic() - started:.1f}s at {info['server']}")

    dirs: list[Path] = [paths.kuberay_crds] if kuberay else []
    dirs += [Path(d) for d in crd_dirs or []]
    if dirs:
        apply_crds(state.dir, dirs, paths=paths)
    if scheduling:
        if not kuberay:
            raise ClusterError("scheduling runs the KubeRay operator, which needs the KubeRay CRDs")
        info["scheduling"] = start_scheduling(state.dir, paths=paths, nodes=nodes)
    _say(f"export KUBECONFIG={state.kubeconfig}")
    return info


def _kubectl(paths: Paths, state: State, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([str(paths.binary("kubectl")), f"--kubeconfig={state.kubeconfig}", *args],
                          capture_output=True, text=True, timeout=timeout)


def apply_crds(state_dir: Path | str, dirs: list[Path | str], paths: Paths | None = None,
               timeout: float = 60.0) -> list[str]:
    """Create or update, server-side, every YAML/JSON manifest in `dirs`; wait for CRDs
    among them to be Established. Missing or empty directories are skipped."""
    paths = paths or Paths.default()
    state = State(Path(state_dir).resolve())
    files: list[Path] = []
    for d in map(Path, dirs):
        if d.is_dir():
            files += sorted(p for p in d.iterdir() if p.suffix in (".yaml", ".yml", ".json") and p.is_file())
        elif d.is_file():
            files.append(d)
    if not files:
        return []
    args = ["apply", "--server-side", "--force-conflicts", "--field-manager=anneal-local", "-o", "name"]
    for f in files:
        args += ["-f", str(f)]
    proc = _kubectl(paths, state, *args)
    if proc.returncode != 0:
        raise ClusterError(f"creating CRDs failed: {proc.stderr.strip() or proc.stdout.strip()}")
    names = [n for n in proc.stdout.split() if n.startswith("customresourcedefinition")]
    if names:
        proc = _kubectl(paths, state, "wait", "--for=condition=Established", f"--timeout={timeout:.0f}s", *names,
                        timeout=timeout + 10)
        if proc.returncode != 0:
            raise ClusterError(f"CRDs not Established: {proc.stderr.strip()}")
    _say(f"{len(names)} CRDs established from {len(files)} files")
    return names


def down(state_dir: Path | str | None = None, timeout: float = 15.0) -> None:
    """Stop every component recorded in the state directory's pidfiles (reverse order)."""
    state = State(Path(state_dir or default_state_dir()).resolve())
    for component in (*reversed(SCHEDULING), *reversed(COMPONENTS)):
        pid = _pid_alive(state, component)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _pid_alive(state, component) is not None and time.monotonic() < deadline:
                _reap(pid)
                time.sleep(0.1)
            if _pid_alive(state, component) is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                time.sleep(0.2)
            _reap(pid)
        with contextlib.suppress(FileNotFoundError):
            state.pidfile(component).unlink()


def _reap(pid: int) -> None:
    """Collect the exit status when the component is our own child (in-process use)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def status(state_dir: Path | str | None = None) -> dict:
    state = State(Path(state_dir or default_state_dir()).resolve())
    info: dict = {}
    with contextlib.suppress(OSError, ValueError):
        info = json.loads(state.info.read_text())
    running = _running(state)
    scheduling = {c: _pid_alive(state, c) for c in SCHEDULING}
    if any(scheduling.values()) or state.pidfile(SCHEDULING[0]).exists():
        running = {**running, **scheduling}
    return {
        "state_dir": str(state.dir),
        "server": info.get("server"),
        "kubeconfig": str(state.kubeconfig) if state.kubeconfig.exists() else None,
        "processes": running,
        "ready": all(running.values()) and _ready(state),
        "built": is_built(),
    }


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cluster.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p_build = sub.add_parser("build", help="build the binaries into the cache (once)")
    p_build.add_argument("--force", action="store_true", help="rebuild even if the cache is complete")
    p_build.add_argument("-j", "--jobs", type=int, default=None, help="parallel compile jobs (default: cores)")

    def state_opt(p):
        p.add_argument("--state-dir", default=None,
                       help="state directory (default: $ANNEAL_K8S_STATE_DIR or <cache>/state)")

    p_up = sub.add_parser("up", help="start the control plane and create CRDs")
    state_opt(p_up)
    p_up.add_argument("--crds", action="append", default=[], metavar="DIR",
                      help="a directory of CRD manifests to create (repeatable)")
    p_up.add_argument("--no-kuberay", action="store_true", help="do not create the KubeRay CRDs")
    p_up.add_argument("--build", action="store_true", help="build first if the cache is incomplete")
    p_up.add_argument("--controllers", default=",".join(DEFAULT_CONTROLLERS),
                      help="kube-controller-manager --controllers list")
    p_up.add_argument("--scheduling", action="store_true",
                      help="also run kube-scheduler, kwok, the KubeRay operator and Kueue, with fake GPU nodes")
    p_up.add_argument("--no-nodes", action="store_true", help="with --scheduling: create no fake nodes")

    p_crds = sub.add_parser("crds", help="create CRDs in a running cluster")
    state_opt(p_crds)
    p_crds.add_argument("dirs", nargs="+", metavar="DIR")

    for name, text in (("down", "stop the control plane"), ("env", "print shell exports"),
                       ("status", "show what is running")):
        state_opt(sub.add_parser(name, help=text))

    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            build(force=args.force, jobs=args.jobs)
        elif args.command == "up":
            if args.build:
                build()
            up(args.state_dir, args.crds, kuberay=not args.no_kuberay,
               controllers=tuple(c for c in args.controllers.split(",") if c),
               scheduling=args.scheduling, nodes=() if args.no_nodes else DEFAULT_NODES)
        elif args.command == "crds":
            apply_crds(args.state_dir or default_state_dir(), args.dirs)
        elif args.command == "down":
            down(args.state_dir)
        elif args.command == "env":
            state = State(Path(args.state_dir or default_state_dir()).resolve())
            if not state.kubeconfig.exists():
                raise ClusterError(f"no cluster in {state.dir}; run `up` first")
            print(f"export KUBECONFIG={state.kubeconfig}")
            print(f'export PATH={Paths.default().bin}:"$PATH"')
        elif args.command == "status":
            st = status(args.state_dir)
            print(json.dumps(st, indent=2))
            return 0 if st["ready"] else 1
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
