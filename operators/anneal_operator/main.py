"""Running the operator: settings, leader election, health and metrics servers, and kopf."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Awaitable, Callable, Sequence

import kopf

from anneal_operator import compression, distillation, pipeline, service
from anneal_operator.context import OperatorContext, load_api_client
from anneal_operator.metrics import OperatorMetrics
from anneal_operator.settings import OperatorSettings

log = logging.getLogger("anneal_operator")

KIND_MODULES = (distillation, compression, pipeline, service)


def build_registry(op: OperatorContext) -> kopf.OperatorRegistry:
    """A fresh registry with every kind's handlers (no module-level global registry)."""
    registry = kopf.OperatorRegistry()
    kubeconfig = op.settings.kubeconfig

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> Any:
        if kubeconfig:
            os.environ.setdefault("KUBECONFIG", kubeconfig)
            return kopf.login_with_kubeconfig(**kwargs)
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    for module in KIND_MODULES:
        module.register(registry, op)
    return registry


def exact_namespaces(watch: Sequence[str]) -> bool:
    """Whether the operator watches named namespaces only (no kopf globs such as `team-*`, no `!x`)."""
    return bool(watch) and not any(ch in name for name in watch for ch in "*?[!")


def kopf_settings(s: OperatorSettings, watch: Sequence[str] = ()) -> kopf.OperatorSettings:
    """kopf settings: our finalizer and progress storage under anneal.dev, enough worker threads.

    Args:
        s: the operator's settings.
        watch: the namespaces it watches (empty: the cluster).
    """
    settings = kopf.OperatorSettings()
    # Watching named namespaces, kopf needs no cluster-wide access: it would list and watch
    # Namespaces and CRDs only to match globs and to notice CRD changes, and the Helm chart's
    # namespaced mode grants neither (docs/helm.md). Its kinds come from API discovery at start.
    settings.scanning.disabled = exact_namespaces(watch)
    settings.persistence.finalizer = "anneal.dev/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="anneal.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="anneal.dev", key="last-handled-configuration"
    )
    settings.posting.reporting_component = "anneal-operator"
    settings.posting.level = logging.INFO
    settings.execution.max_workers = s.handler_workers
    settings.peering.standalone = True  # one actor at a time comes from the Lease, not kopf peering
    settings.watching.server_timeout = 300
    settings.batching.worker_limit = None
    # A timer mid-pass (a sync handler in a thread) cannot exit at once on deletion; poll for it
    # every second instead of kopf's 60 s, so the finalizer goes as soon as the pass ends.
    settings.background.instant_exit_timeout = 0.5
    settings.background.cancellation_polling = 1
    return settings


class Health:
    """`/healthz` (alive) and `/readyz` (leading and kopf ready, or a healthy standby)."""

    def __init__(self) -> None:
        self.kopf_ready = threading.Event()
        self.standby = threading.Event()
        self.failed = threading.Event()

    def serve(self, port: int, addr: str) -> ThreadingHTTPServer | None:
        if port <= 0:
            return None
        health = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path.startswith("/healthz"):
                    ok = not health.failed.is_set()
                elif self.path.startswith("/readyz"):
                    ok = not health.failed.is_set() and (health.kopf_ready.is_set() or health.standby.is_set())
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200 if ok else 503)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"ok\n" if ok else b"not ready\n")

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer((addr, port), Handler)
        threading.Thread(target=server.serve_forever, name="anneal-health", daemon=True).start()
        return server


async def until_stopped(operator: Awaitable[Any], stop: threading.Event) -> None:
    """Await kopf, then set `stop`, however kopf ended (SIGTERM, SIGINT, `stop`, an error).

    kopf waits for a `threading.Event` stop flag in the event loop's default executor. When a
    signal stops kopf, that wait stays blocked, and `asyncio.run` then waits for the executor
    forever: the process would never exit (nor release its Lease) until it is SIGKILLed.
    """
    try:
        await operator
    finally:
        stop.set()


def run_operator(
    namespaces: Sequence[str] | None = None,
    *,
    settings: OperatorSettings | None = None,
    stop_flag: threading.Event | None = None,
    ready_flag: threading.Event | None = None,
    jobs_client_factory: Callable[[str], Any] | None = None,
) -> int:
    """Run the operator until stopped (SIGINT/SIGTERM, `stop_flag`, or a lost Lease).

    Args:
        namespaces: namespaces to watch; empty: `ANNEAL_OPERATOR_NAMESPACES`, else the cluster.
        settings: operator settings (default: from the environment).
        stop_flag: set it to stop the operator (tests run it in a thread); set once it stopped.
        ready_flag: set once kopf is up.
        jobs_client_factory: Ray Jobs API client by address (the benchmark stubs Ray with it).

    Returns:
        The exit status: 0 after a requested stop, 1 after a lost Lease.
    """
    s = settings or OperatorSettings()
    logging.basicConfig(level=s.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    watch = list(namespaces or s.namespaces)
    api_client = load_api_client(s.kubeconfig)
    op = OperatorContext(settings=s, api_client=api_client, metrics=OperatorMetrics(),
                         jobs_client_factory=jobs_client_factory)
    health = Health()
    servers = [op.metrics.serve(s.metrics_port, s.bind_address), health.serve(s.health_port, s.bind_address)]
    stop = stop_flag or threading.Event()
    lost = threading.Event()
    elector = None
    try:
        if s.leader_election:
            from anneal_operator.lease import LeaderElector

            identity = s.identity or f"{socket.gethostname()}-{os.getpid()}"
            elector = LeaderElector(api_client, s.lease_name, s.lease_namespace, identity, s.lease_duration)
            health.standby.set()
            # A standby waits here, before kopf (which handles signals once it runs): SIGTERM
            # must end the wait cleanly, not kill the process.
            previous = None
            if threading.current_thread() is threading.main_thread():
                previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
            try:
                if not elector.acquire(stop):
                    return 0
            finally:
                if previous is not None:
                    signal.signal(signal.SIGTERM, previous)
            health.standby.clear()
            op.metrics.leader.set(1)

            def on_lost() -> None:
                lost.set()
                stop.set()

            elector.keep(on_lost)
        kopf_ready = threading.Event()

        def mark_ready() -> None:
            kopf_ready.wait()
            health.kopf_ready.set()
            if ready_flag is not None:
                ready_flag.set()

        threading.Thread(target=mark_ready, daemon=True).start()
        log.info("anneal operator watching %s", ", ".join(watch) if watch else "all namespaces")
        registry = build_registry(op)
        asyncio.run(until_stopped(kopf.operator(
            registry=registry,
            settings=kopf_settings(s, watch),
            namespaces=watch,
            clusterwide=not watch,
            standalone=True,
            stop_flag=stop,
            ready_flag=kopf_ready,
            memo=kopf.Memo(op=op),
        ), stop))
    finally:
        if elector is not None:
            elector.release()
        for server in servers:
            if server is not None:
                server.shutdown()
                server.server_close()
        op.close()
        api_client.close()
    return 1 if lost.is_set() else 0


def main() -> int:
    return run_operator()
