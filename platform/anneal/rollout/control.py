"""Manual control of a rollout: `anneal rollout status|promote|abort|retry` and the annotations.

Embedded mode talks to the running driver through files under
``ANNEAL_HOME/services/<name>/``, so no port has to be opened:

* ``rollout.json`` — written by the driver (atomically) every tick: pid, endpoint, the
  service status (phase, weights, rollout, last analysis), traffic figures, and the results
  of the last commands;
* ``commands/<ns>-<kind>.json`` — dropped by the CLI; the driver takes the oldest one each
  tick, applies it through the state machine, deletes the file and records the result in
  ``rollout.json`` under ``commands`` (so the CLI can wait for it and print what happened).

In Kubernetes the same commands are annotations on the ModelService:
``anneal.dev/promote`` (value ``full`` or ``full-…`` for a full promote), ``anneal.dev/abort``,
``anneal.dev/retry``. Any new value is one command; the handled values are kept in
``status.rollout.handledCommands`` so each is acted on once.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from anneal.rollout.machine import Command

STATE_FILE = "rollout.json"
COMMANDS_DIR = "commands"
ANNOTATION_PROMOTE = "anneal.dev/promote"
ANNOTATION_ABORT = "anneal.dev/abort"
ANNOTATION_RETRY = "anneal.dev/retry"
#: Checked in this order: an abort wins over a promote sent at the same time.
ANNOTATIONS = (ANNOTATION_ABORT, ANNOTATION_PROMOTE, ANNOTATION_RETRY)
STALE_AFTER_S = 15.0


class ControlError(RuntimeError):
    """A rollout command could not be delivered; the message says what to do."""


@dataclass(frozen=True)
class CommandResult:
    """What the driver did with a command (`handled` False: not picked up within the wait)."""

    id: str
    kind: str
    handled: bool
    accepted: bool
    message: str
    phase: str | None = None


# ------------------------------------------------------------------------ annotations


def command_from_annotations(
    annotations: Mapping[str, str] | None, handled: Mapping[str, str] | None
) -> Command | None:
    """The manual command the annotations ask for and that was not acted on yet.

    Args:
        annotations: the resource's ``metadata.annotations``.
        handled: ``status.rollout.handledCommands`` (annotation → value already acted on).

    Returns:
        A `Command` with ``source=(annotation, value)`` (the state machine records it as
        handled), or None.
    """
    annotations = annotations or {}
    handled = handled or {}
    for key in ANNOTATIONS:
        if key not in annotations:
            continue
        value = str(annotations[key])
        if handled.get(key) == value:
            continue
        kind = key.rsplit("/", 1)[1]
        full = kind == "promote" and (value == "full" or value.startswith("full-") or value.startswith("full:"))
        return Command(kind=kind, full=full, reason=f"annotation {key}={value}", source=(key, value))  # type: ignore[arg-type]
    return None


# --------------------------------------------------------------------------- files


def default_home() -> Path:
    from anneal.settings import AnnealSettings

    return AnnealSettings().root


def service_dir(name: str, home: Path | None = None) -> Path:
    """``ANNEAL_HOME/services/<name>``: the embedded service's control directory."""
    return Path(home or default_home()) / "services" / name


def write_json_atomic(path: Path, doc: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, path)


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


def read_state(name: str, home: Path | None = None) -> dict[str, Any]:
    """The last state the service's driver published.

    Raises:
        ControlError: no embedded service of that name is running.
    """
    path = service_dir(name, home) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise ControlError(
            f"no embedded service {name!r} under {path.parent}; start it with "
            f"`anneal run <service.yaml>` (a ModelService with a rollout section)"
        ) from None
    except json.JSONDecodeError as exc:
        raise ControlError(f"{path} is not valid JSON ({exc}); is another program writing it?") from None
    state["running"] = _pid_alive(state.get("pid")) and not state.get("stopped", False)
    return state


class CommandInbox:
    """The driver's side: takes commands the CLI dropped, oldest first."""

    def __init__(self, directory: Path):
        self.dir = directory / COMMANDS_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob("*.json"):
            stale.unlink(missing_ok=True)  # left by an earlier run: not meant for this one

    def take(self) -> tuple[str, Command] | None:
        """The oldest pending command (removed from the inbox), or None."""
        for path in sorted(self.dir.glob("*.json")):
            try:
                doc = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue  # still being written; next tick
            finally:
                pass
            path.unlink(missing_ok=True)
            kind = doc.get("kind")
            if kind not in ("promote", "abort", "retry"):
                continue
            cmd = Command(kind=kind, full=bool(doc.get("full")), reason=str(doc.get("reason") or ""))
            return str(doc.get("id") or path.stem), cmd
        return None


def send_command(
    name: str, kind: str, *, home: Path | None = None, full: bool = False, reason: str = "",
    wait_s: float = 10.0, poll_s: float = 0.2,
) -> CommandResult:
    """Drop a command for a running embedded service and wait for its driver to act on it.

    Raises:
        ControlError: the service is not running.
    """
    state = read_state(name, home)
    if not state["running"]:
        raise ControlError(
            f"service {name!r} is not running (its driver, pid {state.get('pid')}, is gone); "
            f"start it again with `anneal run`"
        )
    cid = f"{time.time_ns()}-{kind}"
    write_json_atomic(service_dir(name, home) / COMMANDS_DIR / f"{cid}.json",
                      {"id": cid, "kind": kind, "full": full, "reason": reason})
    deadline = time.monotonic() + wait_s
    while True:
        try:
            state = read_state(name, home)
        except ControlError:
            state = {}
        for done in state.get("commands", []):
            if done.get("id") == cid:
                return CommandResult(cid, kind, True, bool(done.get("accepted")), str(done.get("message", "")),
                                     (state.get("status") or {}).get("phase"))
        if time.monotonic() >= deadline:
            return CommandResult(cid, kind, False, False,
                                 f"{kind} queued but not picked up within {wait_s:.0f}s; it will be applied "
                                 "when the driver next polls")
        time.sleep(poll_s)


# ---------------------------------------------------------------------- CLI logic


def status(name: str, *, home: Path | None = None) -> dict[str, Any]:
    """`anneal rollout status SERVICE`: the published state (see `format_status`)."""
    return read_state(name, home)


def promote(name: str, *, home: Path | None = None, full: bool = False, reason: str = "",
            wait_s: float = 10.0) -> CommandResult:
    """`anneal rollout promote SERVICE [--full]`: skip the current step (pause, analysis), or all of them."""
    return send_command(name, "promote", home=home, full=full, reason=reason, wait_s=wait_s)


def abort(name: str, *, home: Path | None = None, reason: str = "", wait_s: float = 10.0) -> CommandResult:
    """`anneal rollout abort SERVICE`: roll back now (stable takes everything)."""
    return send_command(name, "abort", home=home, reason=reason, wait_s=wait_s)


def retry(name: str, *, home: Path | None = None, wait_s: float = 10.0) -> CommandResult:
    """`anneal rollout retry SERVICE`: start a rolled-back (or failure-paused) rollout again."""
    return send_command(name, "retry", home=home, wait_s=wait_s)


def format_status(state: Mapping[str, Any]) -> str:
    """A few human lines for `anneal rollout status`."""
    st = state.get("status") or {}
    ro = st.get("rollout") or {}
    lines = [
        f"service   {state.get('service')}  ({'running' if state.get('running') else 'not running'}, "
        f"{state.get('endpoint')})",
        f"phase     {st.get('phase')}" + (f" — {st.get('message')}" if st.get("message") else ""),
        f"weights   {st.get('weightsSummary') or st.get('weights')}",
    ]
    if ro:
        total = state.get("steps")
        lines.append(
            f"step      {ro.get('step')}{'/' + str(total) if total is not None else ''}"
            f"  {state.get('currentStep') or ''}  attempt {ro.get('attempt', 1)}"
            f"  failures {ro.get('consecutiveFailures', 0)}"
        )
        lines.append(f"candidate {ro.get('candidate')} = {ro.get('candidateModel')}")
        if ro.get("outcome"):
            lines.append(f"outcome   {ro.get('outcome')}: {ro.get('reason', '')}")
        last = ro.get("lastAnalysis")
        if last:
            figs = ", ".join(f"{k}={_short(v)}" for k, v in (last.get("figures") or {}).items() if v is not None)
            lines.append(f"analysis  {last.get('verdict')} at {last.get('time')}: {last.get('reason')}")
            lines.append(f"          {figs}")
    traffic = state.get("traffic")
    if traffic:
        lines.append(f"traffic   {traffic}")
    return "\n".join(lines)


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
