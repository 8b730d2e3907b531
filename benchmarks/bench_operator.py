"""Operator throughput: N DistillationJobs against a real API server, Ray stubbed at the HTTP boundary.

What is real: etcd + kube-apiserver (deploy/local/cluster.py), the CRDs, the operator process
(`python -m anneal_operator`, kopf, its status writes and events) and MLflow (a `mlflow server`
on loopback: every job gets its run id before it is submitted). What is stubbed: the Ray Jobs
API (a small HTTP server that records submissions and answers RUNNING), so the figures are the
operator's own.

Measured: time from the first create until every job has its Ray submission and a status
(resources/s), p50/p99 latency from create to the first status write, duplicate submissions,
and the operator's peak RSS (VmHWM).

    .venv/bin/python benchmarks/bench_operator.py --jobs 500 [--kubeconfig K] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayJobsStub:
    """POST /api/jobs/ records a submission; GET /api/jobs/<id> answers RUNNING (404 if unknown)."""

    def __init__(self) -> None:
        self.submissions: dict[str, float] = {}
        self.posts = 0
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _send(self, code: int, body: dict | list | None = None) -> None:
                data = json.dumps(body if body is not None else {}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                m = re.match(r"^/api/jobs/([^/]+)$", self.path)
                if m and m.group(1) in stub.submissions:
                    self._send(200, {"submission_id": m.group(1), "status": "RUNNING", "message": "stub"})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                sid = body["submission_id"]
                with stub.lock:
                    stub.posts += 1
                    if sid in stub.submissions:
                        self._send(400, {"error": f"Job with submission_id {sid} already exists."})
                        return
                    stub.submissions[sid] = time.time()
                self._send(200, {"submission_id": sid, "job_id": sid})

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", _free_port()), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _load_cluster():
    spec = importlib.util.spec_from_file_location("anneal_local_cluster", REPO / "deploy" / "local" / "cluster.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


def run(n: int, kubeconfig: str | None, tracking_uri: str | None, workers: int) -> dict:
    from kubernetes import client, config, watch

    tmp = Path(tempfile.mkdtemp(prefix="bench-operator-"))
    cluster_mod, state = None, None
    procs: list[subprocess.Popen] = []
    try:
        if kubeconfig is None:
            cluster_mod = _load_cluster()
            cluster_mod.build()
            state = tmp / "k8s"
            info = cluster_mod.up(state, crd_dirs=[REPO / "charts" / "anneal" / "crds"], kuberay=False)
            kubeconfig = info["kubeconfig"]
        if tracking_uri is None:
            port = _free_port()
            procs.append(subprocess.Popen(
                [PY, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
                 "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--artifacts-destination", str(tmp / "art")],
                stdout=open(tmp / "mlflow.log", "w"), stderr=subprocess.STDOUT, start_new_session=True))
            tracking_uri = f"http://127.0.0.1:{port}"
            import httpx

            deadline = time.time() + 180
            while True:
                try:
                    if httpx.get(tracking_uri + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline:
                    raise RuntimeError("mlflow server did not start")
                time.sleep(1)
        stub = RayJobsStub()
        api = config.new_client_from_config(config_file=kubeconfig)
        core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
        ns = f"bench-{int(time.time())}"
        core.create_namespace({"metadata": {"name": ns}})
        metrics_port, health_port = _free_port(), _free_port()
        env = {**os.environ, "ANNEAL_OPERATOR_KUBECONFIG": kubeconfig, "ANNEAL_OPERATOR_NAMESPACES": ns,
               "ANNEAL_OPERATOR_RAY_ADDRESS": stub.url, "ANNEAL_OPERATOR_TRACKING_URI": tracking_uri,
               "ANNEAL_OPERATOR_LEADER_ELECTION": "false", "ANNEAL_OPERATOR_METRICS_PORT": str(metrics_port),
               "ANNEAL_OPERATOR_HEALTH_PORT": str(health_port), "ANNEAL_OPERATOR_BIND_ADDRESS": "127.0.0.1",
               "ANNEAL_OPERATOR_HANDLER_WORKERS": str(workers), "ANNEAL_OPERATOR_POLL_INTERVAL": "10",
               "ANNEAL_OPERATOR_LOG_LEVEL": "WARNING"}
        op = subprocess.Popen([PY, "-m", "anneal_operator"], env=env, stdout=open(tmp / "operator.log", "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(op)
        import httpx

        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{health_port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if op.poll() is not None or time.time() > deadline:
                raise RuntimeError("operator did not become ready: " + (tmp / "operator.log").read_text()[-2000:])
            time.sleep(0.5)
        rss_idle = _peak_rss_mb(op.pid)

        created: dict[str, float] = {}
        first_status: dict[str, float] = {}
        submitted: dict[str, float] = {}
        done = threading.Event()

        def watcher() -> None:
            w = watch.Watch()
            for ev in w.stream(custom.list_namespaced_custom_object, "anneal.dev", "v1alpha1", ns,
                               "distillationjobs", timeout_seconds=900):
                obj = ev["object"]
                name, st, now = obj["metadata"]["name"], obj.get("status") or {}, time.time()
                if st.get("phase") and name not in first_status:
                    first_status[name] = now
                if st.get("phase") in ("Submitted", "Running") and st.get("submissionId") and name not in submitted:
                    submitted[name] = now
                if len(submitted) >= n:
                    done.set()
                    w.stop()

        threading.Thread(target=watcher, daemon=True).start()
        time.sleep(1)
        spec = {"method": "sft", "student": {"config": {"hiddenSize": 32, "layers": 1, "heads": 2}},
                "training": {"steps": 10}, "mlflow": {"experiment": ns}}

        def create(i: int) -> None:
            name = f"job-{i:04d}"
            body = {"apiVersion": "anneal.dev/v1alpha1", "kind": "DistillationJob",
                    "metadata": {"name": name}, "spec": spec}
            custom.create_namespaced_custom_object("anneal.dev", "v1alpha1", ns, "distillationjobs", body)
            created[name] = time.time()

        t0 = time.time()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(create, range(n)))
        t_created = time.time()
        finished = done.wait(timeout=900)
        t_all = time.time()
        rss_peak = _peak_rss_mb(op.pid)
        lat = [first_status[k] - created[k] for k in first_status if k in created]
        dupes = stub.posts - len(stub.submissions)
        return {
            "jobs": n,
            "all_done": finished and len(stub.submissions) >= n,
            "create_seconds": round(t_created - t0, 2),
            "total_seconds": round(t_all - t0, 2),
            "resources_per_second": round(n / (t_all - t0), 1),
            "first_status_p50_s": round(_pct(lat, 0.50), 3) if lat else None,
            "first_status_p99_s": round(_pct(lat, 0.99), 3) if lat else None,
            "submissions": len(stub.submissions),
            "duplicate_submission_posts": dupes,
            "operator_rss_idle_mb": round(rss_idle, 1),
            "operator_rss_peak_mb": round(rss_peak, 1),
            "handler_workers": workers,
            "cpus": os.cpu_count(),
        }
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
        if cluster_mod is not None and state is not None:
            cluster_mod.down(state)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=500)
    ap.add_argument("--kubeconfig", default=None, help="use a running cluster (with the CRDs) instead of starting one")
    ap.add_argument("--tracking-uri", default=None, help="use this MLflow instead of starting `mlflow server`")
    ap.add_argument("--workers", type=int, default=16, help="operator handler threads")
    ap.add_argument("--json", default=None, help="write the result here too")
    args = ap.parse_args()
    result = run(args.jobs, args.kubeconfig, args.tracking_uri, args.workers)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if result["all_done"] and result["duplicate_submission_posts"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
