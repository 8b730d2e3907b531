"""Operator throughput: N DistillationJobs against a real API server, Ray stubbed at the HTTP boundary.

What is real: etcd + kube-apiserver (deploy/local/cluster.py), the CRDs, the operator process
(`python -m anneal_operator`, kopf, its status writes and events) and MLflow (a `mlflow server`
on loopback, which the operator reads for progress; the jobs create their own runs, so it is
not on the path to submission). What is stubbed: the Ray Jobs API (a small HTTP server that
records submissions and answers RUNNING), so the figures are the operator's own.

Two modes:
- burst (default): the operator is running; 8 client threads create N jobs as fast as the API
  server takes them. Latency is from each create to that job's first status write.
- backlog: N jobs exist before the operator starts (a restart, or an outage): the operator's
  own throughput, with latency from the moment it reported ready.

Measured: time until every job has its Ray submission and a status (resources/s), p50/p99
first-status latency, duplicate submissions, and the operator's peak RSS (VmHWM).

    .venv/bin/python benchmarks/bench_operator.py --jobs 500 [--mode burst|backlog] [--json out.json]
        [--profile stacks.txt (py-spy)] [--kubeconfig K]
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


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (its own threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


def run(n: int, kubeconfig: str | None, tracking_uri: str | None, workers: int, profile: str | None = None,
        mode: str = "burst") -> dict:
    from kubernetes import client, config, watch

    tmp = Path(tempfile.mkdtemp(prefix="bench-operator-"))
    cluster_mod, state = None, None
    procs: list[subprocess.Popen] = []
    spy: subprocess.Popen | None = None
    cpu_ready = 0.0
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
        def start_operator() -> tuple[subprocess.Popen, float]:
            """Start the operator; returns it and when it reported ready."""
            nonlocal spy, cpu_ready
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
                time.sleep(0.2)
            ready = time.time()
            cpu_ready = _cpu_seconds(op.pid)
            if profile:  # where the operator's threads spend their time (py-spy, collapsed stacks)
                spy = subprocess.Popen([str(Path(PY).with_name("py-spy")), "record", "-p", str(op.pid), "-r", "50",
                                        "--format", "raw", "-o", profile],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
            return op, ready

        created: dict[str, float] = {}
        first_status: dict[str, float] = {}
        submitted: dict[str, float] = {}
        done = threading.Event()

        def seen(obj: dict) -> None:
            name, st, now = obj["metadata"]["name"], obj.get("status") or {}, time.time()
            if st.get("phase") and name not in first_status:
                first_status[name] = now
            if st.get("phase") in ("Submitted", "Running") and st.get("submissionId") and name not in submitted:
                submitted[name] = now
            if len(submitted) >= n:
                done.set()

        def watcher() -> None:
            """List, then watch from the list's resourceVersion; list again whenever the stream ends."""
            from kubernetes.client.exceptions import ApiException

            while not done.is_set():
                listed = custom.list_namespaced_custom_object("anneal.dev", "v1alpha1", ns, "distillationjobs")
                for obj in listed.get("items") or []:
                    seen(obj)
                w = watch.Watch()
                try:
                    for ev in w.stream(custom.list_namespaced_custom_object, "anneal.dev", "v1alpha1", ns,
                                       "distillationjobs", resource_version=listed["metadata"]["resourceVersion"],
                                       timeout_seconds=60, allow_watch_bookmarks=True):
                        if ev["type"] in ("ADDED", "MODIFIED"):
                            seen(ev["object"])
                        if done.is_set():
                            w.stop()
                except ApiException as exc:  # 410 Gone: the version is too old; list again
                    if exc.status != 410:
                        raise

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

        if mode == "burst":  # the operator is up; resources arrive as fast as 8 client threads create them
            op, t_ready = start_operator()
            rss_idle = _peak_rss_mb(op.pid)
            t0 = time.time()
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(create, range(n)))
            t_created = time.time() - t0
        else:  # backlog: all resources exist before the operator starts (a restart, or an outage)
            t_c = time.time()
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(create, range(n)))
            t_created = time.time() - t_c
            op, t_ready = start_operator()
            rss_idle = float("nan")
            t0 = t_ready
        finished = done.wait(timeout=900)
        t_all = max(submitted.values()) if finished else time.time()
        rss_peak = _peak_rss_mb(op.pid)
        cpu = _cpu_seconds(op.pid) - cpu_ready
        start = created if mode == "burst" else {k: t_ready for k in created}
        lat = [first_status[k] - start[k] for k in first_status if k in start]
        dupes = stub.posts - len(stub.submissions)
        return {
            "mode": mode,
            "jobs": n,
            "all_done": finished and len(stub.submissions) >= n,
            "create_seconds": round(t_created, 2),
            "total_seconds": round(t_all - t0, 2),
            "resources_per_second": round(n / (t_all - t0), 1),
            "first_status_p50_s": round(_pct(lat, 0.50), 3) if lat else None,
            "first_status_p99_s": round(_pct(lat, 0.99), 3) if lat else None,
            "submissions": len(stub.submissions),
            "duplicate_submission_posts": dupes,
            "operator_rss_idle_mb": None if rss_idle != rss_idle else round(rss_idle, 1),
            "operator_rss_peak_mb": round(rss_peak, 1),
            "operator_cpu_ms_per_job": round(1000 * cpu / n, 1),
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
        if spy is not None:  # it writes its file once the operator has exited
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
        if cluster_mod is not None and state is not None:
            cluster_mod.down(state)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=500)
    ap.add_argument("--kubeconfig", default=None, help="use a running cluster (with the CRDs) instead of starting one")
    ap.add_argument("--tracking-uri", default=None, help="use this MLflow instead of starting `mlflow server`")
    ap.add_argument("--workers", type=int, default=16, help="operator handler threads")
    ap.add_argument("--mode", choices=["burst", "backlog"], default="burst",
                    help="burst: create while the operator runs (latency from each create); backlog: create all, "
                    "then start the operator (throughput of the operator alone, latency from its readiness)")
    ap.add_argument("--json", default=None, help="write the result here too")
    ap.add_argument("--profile", default=None, help="record the operator with py-spy into this file (collapsed stacks)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up the control plane on `timeout`
    result = run(args.jobs, args.kubeconfig, args.tracking_uri, args.workers, args.profile, args.mode)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if result["all_done"] and result["duplicate_submission_posts"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
