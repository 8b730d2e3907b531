"""The embedded rollout driver: runs a ModelService's rollout against a local Serve app.

`drive` ticks about once a second: it takes a pending manual command, reads the router's
``/-/stats`` window since the current step began, adds the labelled probe results, calls the
pure state machine, applies new weights through ``anneal.serve.app.apply_weights``
(``reconfigure``, no restart), moves the MLflow aliases, logs every event, publishes the
state for ``anneal rollout status`` and calls ``on_update`` (the CLI's live view).

Optionally it generates N req/s of built-in-task traffic (``anneal run --traffic N``) so a
rollout can be watched end to end on a laptop.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from anneal.api.service import ModelServiceSpec, ModelServiceStatus
from anneal.control.rollout import Observation, stats_since, tick
from anneal.rollout import machine
from anneal.rollout.analysis import ProbeResults
from anneal.rollout.control import CommandInbox, service_dir, write_json_atomic
from anneal.rollout.machine import TERMINAL, Event
from anneal.rollout.probes import start_probe_loop
from anneal.serve.client import stats as serve_stats

log = logging.getLogger("anneal.rollout")

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


# --------------------------------------------------------------------------- traffic


@dataclass
class VariantTraffic:
    """Client-side view of the generated traffic for one variant (from `x-anneal-variant`)."""

    sent: int = 0
    ok: int = 0
    failed: int = 0
    correct: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"sent": self.sent, "ok": self.ok, "failed": self.failed, "correct": self.correct}


class TrafficGenerator:
    """N requests/s of built-in-task questions to a local endpoint, in a background thread.

    Bounded: at most `max_in_flight` requests at once (a tick that finds them all busy skips
    its request and counts it in `skipped`), and only to loopback unless `allow_remote`.

    Args:
        endpoint: the service base URL.
        rps: requests per second (> 0).
        reasoning: "on"/"off": the reasoning toggle header sent with each request.
        max_tokens: cap on each answer.
        seed: seed of the questions.
    """

    def __init__(self, endpoint: str, rps: float, *, reasoning: str = "off", max_tokens: int = 32,
                 seed: int = 0, max_in_flight: int = 16, timeout_s: float = 30.0, allow_remote: bool = False,
                 headers: Mapping[str, str] | None = None):
        host = urlsplit(endpoint).hostname or ""
        if not allow_remote and host not in LOOPBACK:
            raise ValueError(f"traffic generation targets loopback only; {endpoint!r} is not a local endpoint")
        if rps <= 0:
            raise ValueError(f"traffic rate must be > 0 requests/s, got {rps}")
        import httpx

        from anneal.data.reasoning import generate, render_messages

        self.url = endpoint.rstrip("/") + "/v1/chat/completions"
        self.rps = rps
        self.reasoning = reasoning
        self.max_tokens = max_tokens
        self.max_in_flight = max_in_flight
        self.headers = {"x-anneal-reasoning": reasoning, **dict(headers or {})}
        self._problems = [(render_messages(p, reasoning == "on"), p.answer) for p in generate(200, seed=seed)]
        self._http = httpx.Client(timeout=timeout_s, limits=httpx.Limits(max_connections=max_in_flight * 2))
        self._pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="anneal-traffic")
        self._lock = threading.Lock()
        self._in_flight = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="anneal-traffic", daemon=True)
        self.variants: dict[str, VariantTraffic] = {}
        self.unrouted_failures = 0
        self.skipped = 0
        self.abandoned = 0
        self.failures: deque[tuple[float, str, int | str]] = deque(maxlen=200)
        self._n = 0

    def start(self) -> "TrafficGenerator":
        self._thread.start()
        return self

    def stop(self, wait: bool = True) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._pool.shutdown(wait=wait, cancel_futures=not wait)
        self._http.close()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "rps": self.rps,
                "variants": {k: v.to_dict() for k, v in self.variants.items()},
                "unroutedFailures": self.unrouted_failures,
                "skipped": self.skipped,
                "abandoned": self.abandoned,
                "inFlight": self._in_flight,
            }

    def _run(self) -> None:
        period = 1.0 / self.rps
        next_at = time.monotonic()
        while not self._stop.is_set():
            with self._lock:
                busy = self._in_flight >= self.max_in_flight
                if busy:
                    self.skipped += 1
                else:
                    self._in_flight += 1
            if not busy:
                messages, answer = self._problems[self._n % len(self._problems)]
                self._n += 1
                try:
                    self._pool.submit(self._one, messages, answer)
                except RuntimeError:  # pool shut down
                    return
            next_at += period
            delay = next_at - time.monotonic()
            if delay < -1.0:
                next_at = time.monotonic()  # fell behind (a stall): do not burst to catch up
            elif delay > 0:
                self._stop.wait(delay)

    def _one(self, messages: list[dict[str, str]], answer: int) -> None:
        from anneal.data.reasoning import check_answer

        variant, ok, correct, status = "", False, False, "error"
        try:
            r = self._http.post(self.url, json={"messages": messages, "max_tokens": self.max_tokens},
                                headers=self.headers)
            variant = r.headers.get("x-anneal-variant", "")
            status = r.status_code
            ok = r.status_code == 200
            if ok:
                correct = check_answer(r.json()["choices"][0]["message"]["content"] or "", answer)
        except Exception as exc:  # noqa: BLE001 - counted as a failure
            status = f"{type(exc).__name__}: {exc}"[:200]
        with self._lock:
            self._in_flight -= 1
            if not ok and not variant and self._stop.is_set():
                self.abandoned += 1  # cut off by stop() closing the client: not the service's failure
                return
            if variant:
                vt = self.variants.setdefault(variant, VariantTraffic())
                vt.sent += 1
                vt.ok += ok
                vt.failed += not ok
                vt.correct += correct
            elif not ok:
                self.unrouted_failures += 1
            if not ok:
                self.failures.append((time.time(), variant, status))


# ------------------------------------------------------------------------ the driver


@dataclass
class RolloutUpdate:
    """One tick's view for the CLI (`on_update`)."""

    service: str
    time: float
    status: ModelServiceStatus
    steps: int
    current_step: str
    events: list[Event] = field(default_factory=list)
    traffic: dict[str, Any] | None = None
    probes: dict[str, ProbeResults] = field(default_factory=dict)
    stats_error: str | None = None


def _spec_and_name(manifest: Any) -> tuple[str, ModelServiceSpec]:
    if isinstance(manifest, Mapping):
        from anneal.api import parse_manifest

        manifest = parse_manifest(dict(manifest))
    spec = manifest.spec
    if not isinstance(spec, ModelServiceSpec):
        raise ValueError(f"{getattr(manifest, 'kind', '?')}/{manifest.name}: a rollout needs a ModelService")
    return manifest.name, spec


def _current_step(spec: ModelServiceSpec, status: ModelServiceStatus) -> str:
    rs = status.rollout
    if spec.rollout is None or rs is None:
        return ""
    if rs.step >= len(spec.rollout.steps):
        return "done"
    return machine.describe_step(spec.rollout.steps[rs.step])




def drive(
    manifest: Any,
    *,
    endpoint: str,
    app_name: str,
    args: Any,
    settings: Any = None,
    traffic_rps: float = 0,
    on_update: Callable[[RolloutUpdate], None] | None = None,
    stop_event: threading.Event | None = None,
    until_done: bool = True,
    tick_s: float = 1.0,
    timeout_s: float | None = None,
    apply: Callable[[str, Any, dict[str, int]], Any] | None = None,
    track: bool = True,
    control: bool = True,
    desired_models: Mapping[str, str] | None = None,
    traffic_options: Mapping[str, Any] | None = None,
    admin_key: str | None = None,
) -> ModelServiceStatus:
    """Run a ModelService's rollout on a local Serve app.

    Args:
        manifest: the parsed `Manifest` (or the manifest dict) of a ModelService with a
            ``rollout`` section.
        endpoint: the app's base URL on loopback (``http://127.0.0.1:8000`` + route prefix).
        app_name: the Serve application name.
        args: the app's `AppArgs` (passed through to `apply_weights`).
        settings: `anneal.settings.Settings` (ANNEAL_HOME for the control files, MLflow);
            None: default settings.
        traffic_rps: generate this many built-in-task requests/s (0: none).
        on_update: called every tick with a `RolloutUpdate` (the live view).
        stop_event: set it to stop the driver.
        until_done: return once the rollout is Promoted or RolledBack (False: keep going
            until `stop_event`, so `anneal rollout retry` still works while serving).
        tick_s: seconds between ticks.
        timeout_s: give up (return the status as it is) after this long.
        apply: weights setter ``(app_name, args, weights)``; default
            `anneal.serve.deploy.apply_weights` (declarative, for apps deployed with
            `deploy_entries` / `start_service`), else `anneal.serve.app.apply_weights`.
        track: move MLflow aliases and log analyses (for `models:/` URIs).
        control: publish state and take commands under ``ANNEAL_HOME/services/<name>``.
        desired_models: variant → resolved model URI (default: the spec's URIs).
        traffic_options: extra keyword arguments of `TrafficGenerator`.
        admin_key: the service's admin key when it has ``spec.auth``: the stats, the probes
            and the generated traffic send it.

    Returns:
        The final status.
    """
    import httpx

    from anneal.settings import Settings

    name, spec = _spec_and_name(manifest)
    if spec.rollout is None:
        raise ValueError(f"ModelService/{name}: spec.rollout is not set; nothing to roll out")
    settings = settings or Settings()
    if apply is None:
        try:  # the declarative path, matching apps deployed by anneal.local.service.start_service
            from anneal.serve.deploy import apply_weights as apply
        except ImportError:  # contract 2 as first published
            from anneal.serve.app import apply_weights as apply
    stop_event = stop_event or threading.Event()
    r = spec.rollout
    http = httpx.Client(timeout=10.0)
    status = ModelServiceStatus(endpoint=endpoint)
    cdir = service_dir(name, settings.anneal.root)
    inbox = CommandInbox(cdir) if control else None
    command_log: deque[dict[str, Any]] = deque(maxlen=20)
    tracker = _make_tracker(spec, name, settings, desired_models) if track else None
    probes = start_probe_loop(spec, endpoint, admin_key)
    options = dict(traffic_options or {})
    if admin_key:
        options["headers"] = {**dict(options.get("headers") or {}), "authorization": f"Bearer {admin_key}"}
    traffic = TrafficGenerator(endpoint, traffic_rps, **options).start() if traffic_rps > 0 else None
    started = time.monotonic()
    try:
        while not stop_event.is_set():
            now = time.time()
            taken = inbox.take() if inbox is not None else None
            cid, command = taken if taken else (None, None)
            stats, stats_error = None, None
            try:
                stats = serve_stats(endpoint, stats_since(status), timeout=10.0, http=http, api_key=admin_key)
            except Exception as exc:  # noqa: BLE001 - no stats this tick: the rollout holds
                stats_error = f"stats unreadable: {exc}"
                log.warning("%s: cannot read the stats: %s", name, stats_error)
            obs = Observation(stats, stats_error, probes.results() if probes else {}, command)
            t = tick(spec, status, obs, now, desired_models)
            if t.weights is not None:
                try:
                    apply(app_name, args, dict(t.weights))
                except Exception as exc:  # noqa: BLE001 - keep the old status; the next tick tries again
                    log.error("%s: could not apply weights %s: %s", name, t.weights, exc)
                    if cid:
                        command_log.append({"id": cid, "kind": command.kind, "accepted": False,
                                            "message": f"could not apply weights: {exc}"})
                    stop_event.wait(tick_s)
                    continue
            status = t.status
            rs = status.rollout
            if t.weights is not None and rs is not None and rs.step_started_at == now:
                # The step's window starts when its weights are live, not when they were asked for.
                rs.step_started_at = max(now, time.time())
            for ev in t.events:
                _log_event(name, ev)
            if tracker is not None:
                tracker.apply(t.registry, status)
            if cid:
                command_log.append({
                    "id": cid, "kind": command.kind, "accepted": bool(t.command_accepted),
                    "message": "; ".join(e.message for e in t.events) or "ok", "phase": status.phase,
                })
            if probes is not None:
                probes.follow_plan(t.probes)
            update = RolloutUpdate(
                service=name, time=now, status=status, steps=len(r.steps), current_step=_current_step(spec, status),
                events=list(t.events), traffic=traffic.snapshot() if traffic else None,
                probes=probes.results() if probes else {}, stats_error=stats_error,
            )
            if control:
                _publish(cdir, name, endpoint, app_name, update, command_log)
            if on_update is not None:
                try:
                    on_update(update)
                except Exception as exc:  # noqa: BLE001 - a view must not stop the rollout
                    log.warning("rollout view failed: %s", exc)
            if until_done and status.phase in TERMINAL + (machine.Phase.READY,):
                break
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                log.warning("%s: rollout driver stopped after %.0fs in phase %s", name, timeout_s, status.phase)
                break
            stop_event.wait(max(0.0, tick_s - (time.time() - now)))
    finally:
        if probes is not None:
            probes.stop()
        if traffic is not None:
            traffic.stop(wait=False)
        if tracker is not None and status.phase not in TERMINAL:
            tracker.close()
        if tracker is not None:
            tracker.wait_reports()  # the ended rollout's report is in MLflow when drive() returns
        http.close()
        if control:
            _publish(cdir, name, endpoint, app_name,
                     RolloutUpdate(name, time.time(), status, len(r.steps), _current_step(spec, status),
                                   traffic=traffic.snapshot() if traffic else None),
                     command_log, stopped=True)
    return status


def _make_tracker(spec: ModelServiceSpec, name: str, settings: Any,
                  desired_models: Mapping[str, str] | None = None) -> Any:
    from anneal.rollout.aliases import RolloutTracker, parse_registry_uri

    r = spec.rollout
    assert r is not None
    uris = [machine.desired_model(spec, v, desired_models) for v in (r.candidate, r.stable)]
    if not any(parse_registry_uri(u) for u in uris):
        return None
    try:
        return RolloutTracker(
            spec.mlflow.tracking_uri or settings.tracking_uri,
            spec.mlflow.experiment or settings.mlflow.experiment,
            name,
            champion_alias=spec.mlflow.champion_alias,
            challenger_alias=spec.mlflow.challenger_alias,
            # the embedded store's artifacts live under ANNEAL_HOME, not in the working directory
            artifact_root=None if spec.mlflow.tracking_uri else settings.artifact_root,
        )
    except Exception as exc:  # noqa: BLE001
        log.warning("%s: MLflow unavailable, aliases will not move: %s", name, exc)
        return None


def _log_event(name: str, ev: Event) -> None:
    level = logging.WARNING if ev.type == "Warning" else logging.INFO
    log.log(level, "%s: %s: %s", name, ev.reason, ev.message)


def _publish(cdir: Any, name: str, endpoint: str, app_name: str, update: RolloutUpdate,
             commands: deque, stopped: bool = False) -> None:
    try:
        write_json_atomic(cdir / "rollout.json", {
            "service": name, "app": app_name, "endpoint": endpoint, "pid": os.getpid(), "updatedAt": update.time,
            "stopped": stopped, "status": update.status.to_dict(), "steps": update.steps,
            "currentStep": update.current_step, "traffic": update.traffic,
            "probes": {k: {"correct": v.correct, "total": v.total} for k, v in update.probes.items()},
            "statsError": update.stats_error, "commands": list(commands),
        })
    except OSError as exc:
        log.warning("cannot publish the rollout state under %s: %s", cdir, exc)


# ------------------------------------------------------------------------ live view


def render(update: RolloutUpdate) -> Any:
    """A rich renderable of one tick: phase, step, weights bar, gate figures, traffic."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    st = update.status
    rs = st.rollout
    head = Text.assemble(
        (f"{update.service}  ", "bold"),
        (f"{st.phase}", {"Promoted": "bold green", "RolledBack": "bold red", "Paused": "yellow"}.get(
            st.phase or "", "cyan")),
        f"  step {rs.step if rs else '-'}/{update.steps} {update.current_step}  ",
        (st.message or "", "dim"),
    )
    weights = Table.grid(padding=(0, 1))
    for variant, w in st.weights.items():
        weights.add_row(variant, Text("█" * (w // 4) + "·" * (25 - w // 4), "green" if w else "dim"), f"{w:3d}%")
    parts: list[Any] = [head, weights]
    if rs is not None and rs.last_analysis is not None:
        a = rs.last_analysis
        table = Table(title=f"analysis {a.verdict} ({rs.consecutive_failures} failed in a row)", title_justify="left")
        table.add_column("figure")
        table.add_column("value", justify="right")
        for key, value in a.figures.items():
            if value is not None:
                table.add_row(key, f"{value:.4g}")
        parts.append(table)
        parts.append(Text(a.reason, "dim"))
    if update.traffic:
        tv = update.traffic["variants"]
        parts.append(Text("traffic " + "  ".join(
            f"{k}: {v['ok']} ok / {v['failed']} failed" for k, v in tv.items())))
    if update.stats_error:
        parts.append(Text(f"stats unavailable: {update.stats_error}", "red"))
    return Group(*parts)
