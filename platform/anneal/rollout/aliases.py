"""MLflow follows the rollout: challenger/champion aliases, a rolled-back tag, analyses as run metrics.

Acts only on variants whose model is an MLflow registry URI (``models:/Name/N`` or
``models:/Name@alias``; the alias is resolved to its version once, when the rollout starts,
so later alias moves cannot change which version the rollout is about). Everything else —
paths, ``hf://``, ``s3://`` — is left alone.

* rollout starts → the candidate version gets the challenger alias;
* promoted → it gets the champion alias and loses the challenger alias;
* rolled back → the champion stays; the candidate version is tagged ``rolled-back`` with the
  reason and loses the challenger alias;
* every analysis → metrics of one MLflow run per rollout attempt, tagged with both versions
  (and the versions are tagged with that run's id), each rate gate's interval included;
  every weight change → metrics ``rollout.weight.<variant>``; the gates → params
  ``gate.<metric>``; each gate's verdict → a row of the table ``rollout/analyses.json``;
  the compared shadow pairs (disagreements first) → rows of ``rollout/shadow_pairs.json``;
* the rollout ends (promoted or rolled back) → its report, weights and gate figures over
  time, logged to the run as ``rollout/report.png`` and ``rollout/report.html``
  (`anneal.rollout.report`).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping

log = logging.getLogger(__name__)

ROLLED_BACK_TAG = "rolled-back"
TAG_RUN = "anneal.rollout.run_id"
TAG_OUTCOME = "anneal.rollout.outcome"
#: Table artifacts of a rollout run (JSON, appended to as analyses come).
ANALYSES_TABLE = "rollout/analyses.json"
PAIRS_TABLE = "rollout/shadow_pairs.json"
#: Compared pairs one rollout run keeps at most (prompts and answers are ~2 KB a row).
PAIRS_PER_RUN = 500
#: Rows held before a table is appended to MLflow (each append rewrites the artifact).
TABLE_FLUSH_ROWS = 50
_REGISTRY_RE = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[0-9]+)|@(?P<alias>[A-Za-z0-9_-]+))$")


@dataclass(frozen=True)
class ModelVersionRef:
    """A registered model version: ``models:/name/version``."""

    name: str
    version: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def parse_registry_uri(uri: str | None) -> tuple[str, str | None, str | None] | None:
    """(name, version, alias) of a ``models:/`` URI, None for any other URI."""
    m = _REGISTRY_RE.match((uri or "").strip())
    if not m:
        return None
    return m.group("name"), m.group("version"), m.group("alias")


def resolve_version(client: Any, uri: str | None) -> ModelVersionRef | None:
    """The registered version a URI names (an alias resolved through `client`), else None."""
    parsed = parse_registry_uri(uri)
    if parsed is None:
        return None
    name, version, alias = parsed
    if version is not None:
        return ModelVersionRef(name, version)
    return ModelVersionRef(name, str(client.get_model_version_by_alias(name, alias).version))


class RolloutTracker:
    """Moves aliases and logs analyses for one service's rollouts.

    Failures to reach MLflow are logged, never raised: the rollout itself must not stop
    because the registry is down.

    Args:
        tracking_uri: the MLflow tracking URI.
        experiment: the experiment the rollout runs go to.
        service: the service name (run names and tags).
        champion_alias, challenger_alias: from ``spec.mlflow``.
        artifact_root: where a new experiment keeps its artifacts (the report); None for the
            tracking server's default.
    """

    def __init__(self, tracking_uri: str, experiment: str, service: str,
                 champion_alias: str = "champion", challenger_alias: str = "challenger",
                 artifact_root: str | None = None):
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.experiment = experiment
        self.service = service
        self.champion_alias = champion_alias
        self.challenger_alias = challenger_alias
        self.artifact_root = artifact_root
        self.candidate: ModelVersionRef | None = None
        self.stable: ModelVersionRef | None = None
        self.run_id: str | None = None
        self._analyses = 0
        self._seen_start = False
        self._weights: dict[str, int] | None = None  # last logged to the run
        self._weight_changes = 0
        self._reports: list[threading.Thread] = []
        self._pairs_logged: set[str] = set()
        self._pending: dict[str, list[dict[str, Any]]] = {}

    # --------------------------------------------------------------------- events

    def started(self, candidate_uri: str | None, stable_uri: str | None, attempt: int = 1,
                gates: tuple[dict[str, Any], ...] | list[dict[str, Any]] = ()) -> None:
        """A rollout (attempt) began: pin both versions, set the challenger alias, open a run.

        `gates` (``{"metric", "bound", "threshold"}``) are logged as the run's params.
        """
        self._close_run("superseded")
        self._seen_start = True
        self.candidate = self._resolve(candidate_uri)
        self.stable = self._resolve(stable_uri)
        self._analyses = 0
        self._pairs_logged = set()
        if self.candidate is not None and self.candidate == self.stable:
            # Same version on both sides (a config-only candidate): its aliases and tags
            # belong to the stable model; moving them would mislabel the champion.
            log.info("candidate and stable are both %s: MLflow aliases stay as they are", self.candidate.uri)
            self.candidate = None
        if self.candidate is not None:
            self._safe(self.client.set_registered_model_alias, self.candidate.name, self.challenger_alias,
                       self.candidate.version)
        self._open_run(candidate_uri, stable_uri, attempt)
        self._weights, self._weight_changes = None, 0
        if self.run_id is not None and gates:
            from mlflow.entities import Param

            from anneal.rollout.report import gate_params

            self._safe(self.client.log_batch, self.run_id,
                       params=[Param(k, v) for k, v in gate_params(gates).items()])

    def weighted(self, weights: Mapping[str, int]) -> None:
        """Log the variants' weights to the rollout run when they changed since the last call."""
        if self.run_id is None or dict(weights) == self._weights:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        n = self._weight_changes
        self._weight_changes += 1
        self._weights = dict(weights)
        self._safe(self.client.log_batch, self.run_id,
                   metrics=[Metric(f"rollout.weight.{v}", float(w), ts, n) for v, w in sorted(weights.items())])

    def analysed(self, figures: Mapping[str, float | None], verdict: str, step: int, weight: int,
                 gates: list[Mapping[str, Any]] | tuple[Mapping[str, Any], ...] = (),
                 pairs: tuple[Mapping[str, Any], ...] = (), reason: str = "") -> None:
        """Log one analysis to the rollout run.

        Metrics: every figure, each rate gate's interval (``analysis.<gate>.low|high``), the
        verdict, step and weight. Tables (JSON artifacts, appended to): ``rollout/analyses.json``
        one row per gate per analysis (estimate, interval, samples, verdict), and
        ``rollout/shadow_pairs.json`` the compared pairs not logged before (capped per run), so
        a person can read the disagreements behind a verdict.
        """
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        n = self._analyses
        self._analyses += 1
        metrics = [Metric(f"analysis.{k}", float(v), ts, n) for k, v in figures.items() if v is not None]
        for g in gates:
            for end in ("low", "high"):
                if g.get(end) is not None:
                    metrics.append(Metric(f"analysis.{g['metric']}.{end}", float(g[end]), ts, n))
        metrics += [
            Metric("analysis.verdict", {"pass": 1.0, "wait": 0.0, "fail": -1.0}[verdict], ts, n),
            Metric("rollout.step", float(step), ts, n),
            Metric("rollout.candidateWeight", float(weight), ts, n),
        ]
        self._safe(self.client.log_batch, self.run_id, metrics=metrics)
        if gates:
            rows = [{"analysis": n, "time": ts / 1000, "step": step, "candidateWeight": weight,
                     "verdict": verdict, "reason": reason[:1000], "gate": g.get("metric"), "bound": g.get("bound"),
                     "threshold": g.get("threshold"), "value": g.get("value"), "low": g.get("low"),
                     "high": g.get("high"), "samples": g.get("samples"), "gateVerdict": g.get("verdict")}
                    for g in gates]
            self._pending.setdefault(ANALYSES_TABLE, []).extend(rows)
        new = [dict(p, analysis=n) for p in pairs if p.get("requestId") not in self._pairs_logged]
        room = PAIRS_PER_RUN - len(self._pairs_logged)
        if new and room > 0:
            new = new[:room]
            self._pairs_logged.update(str(p.get("requestId")) for p in new)
            self._pending.setdefault(PAIRS_TABLE, []).extend(new)
        # A verdict that decides something is readable at once; waits are batched.
        self.flush_tables(force=verdict != "wait")

    def flush_tables(self, force: bool = True) -> None:
        """Append the held table rows to the run's artifacts (all of them, or those over the batch size)."""
        if self.run_id is None:
            return
        for artifact_file, rows in list(self._pending.items()):
            if not rows or (not force and len(rows) < TABLE_FLUSH_ROWS):
                continue
            self._pending[artifact_file] = []
            columns = sorted({k for r in rows for k in r})
            data = {c: [r.get(c) for r in rows] for c in columns}
            self._safe(self.client.log_table, self.run_id, data=data, artifact_file=artifact_file)

    def promoted(self, reason: str = "", candidate_uri: str | None = None) -> None:
        """The candidate becomes champion and stops being challenger.

        `candidate_uri` is used when this tracker did not see the start (a restarted operator).
        """
        c = self._candidate_or(candidate_uri)
        if c is not None:
            self._safe(self.client.set_registered_model_alias, c.name, self.champion_alias, c.version)
            self._drop_challenger(c)
        self._close_run("Promoted", reason)

    def rolled_back(self, reason: str, candidate_uri: str | None = None) -> None:
        """The champion stays; the candidate version is tagged rolled-back = reason."""
        c = self._candidate_or(candidate_uri)
        if c is not None:
            self._safe(self.client.set_model_version_tag, c.name, c.version, ROLLED_BACK_TAG, reason[:5000] or "rolled back")
            self._drop_challenger(c)
        self._close_run("RolledBack", reason)

    def close(self) -> None:
        self._close_run("stopped")

    def wait_reports(self, timeout: float = 120.0) -> None:
        """Wait for the reports still being drawn (a driver that stops calls this)."""
        for t in self._reports:
            t.join(timeout)
        self._reports = [t for t in self._reports if t.is_alive()]

    def apply(self, actions: Any, status: Any) -> None:
        """Record a tick's `RegistryAction`s; keep the rollout run's id in ``status.rollout.mlflowRunId``.

        A tracker that did not see the start (a restarted driver) takes the run up again from
        the id in status, so analyses go on into the same run and the aliases still move.
        """
        rs = status.rollout
        if rs is not None and self.run_id is None and not self._seen_start and rs.mlflow_run_id \
                and rs.outcome is None:
            self.run_id = rs.mlflow_run_id
            self._seen_start = True
            self.candidate = self._resolve(rs.candidate_model)
            self.stable = self._resolve(rs.stable_model)
            self._analyses = int(rs.analyses or 0)
        for a in actions:
            if a.kind == "started":
                self.started(a.candidate_model, a.stable_model, a.attempt, a.gates)
                self.weighted(status.weights or {})  # the rollout's first weights, before any analysis
            elif a.kind == "analysed":
                self.analysed(a.analysis.get("figures") or {}, a.analysis.get("verdict", "wait"),
                              int(a.analysis.get("step", 0)), int(a.analysis.get("candidateWeight", 0)),
                              a.analysis.get("gates") or (), a.pairs, str(a.analysis.get("reason") or ""))
            elif a.kind == "promoted":
                self.weighted(status.weights or {})  # the final split goes in before the run closes
                self.promoted(a.reason, a.candidate_model)
            elif a.kind == "rolled_back":
                self.weighted(status.weights or {})
                self.rolled_back(a.reason, a.candidate_model)
        if rs is not None and any(a.kind == "started" for a in actions):
            rs.mlflow_run_id = self.run_id
        if rs is not None and rs.outcome is None:
            self.weighted(status.weights or {})

    # -------------------------------------------------------------------- helpers

    def _candidate_or(self, uri: str | None) -> ModelVersionRef | None:
        if self._seen_start or uri is None:
            return self.candidate
        return self._resolve(uri)

    def _resolve(self, uri: str | None) -> ModelVersionRef | None:
        try:
            return resolve_version(self.client, uri)
        except Exception as exc:  # noqa: BLE001 - a missing alias must not stop the rollout
            log.warning("cannot resolve %s in the MLflow registry: %s", uri, exc)
            return None

    def _drop_challenger(self, version: ModelVersionRef) -> None:
        try:
            current = self.client.get_model_version_by_alias(version.name, self.challenger_alias)
        except Exception:  # noqa: BLE001 - no such alias
            return
        if str(current.version) == version.version:
            self._safe(self.client.delete_registered_model_alias, version.name, self.challenger_alias)

    def _open_run(self, candidate_uri: str | None, stable_uri: str | None, attempt: int) -> None:
        try:
            exp = self.client.get_experiment_by_name(self.experiment)
            location = f"{self.artifact_root.rstrip('/')}/{self.experiment}" if self.artifact_root else None
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(
                self.experiment, artifact_location=location)
            tags = {
                "anneal.kind": "ModelService",
                "anneal.name": self.service,
                "anneal.rollout.attempt": str(attempt),
                "anneal.rollout.candidate_model": candidate_uri or "",
                "anneal.rollout.stable_model": stable_uri or "",
                "mlflow.runName": f"rollout-{self.service}-{int(time.time())}",
            }
            if self.candidate is not None:
                tags["anneal.rollout.candidate_version"] = self.candidate.uri
            if self.stable is not None:
                tags["anneal.rollout.stable_version"] = self.stable.uri
            run = self.client.create_run(exp_id, tags=tags)
            self.run_id = run.info.run_id
        except Exception as exc:  # noqa: BLE001
            log.warning("cannot open the MLflow run of the rollout: %s", exc)
            self.run_id = None
            return
        for version in (self.candidate, self.stable):
            if version is not None:
                self._safe(self.client.set_model_version_tag, version.name, version.version, TAG_RUN, self.run_id)

    def _close_run(self, outcome: str, reason: str = "") -> None:
        if self.run_id is None:
            return
        self.flush_tables()
        run_id, self.run_id = self.run_id, None
        self._pending = {}
        self._safe(self.client.set_tag, run_id, TAG_OUTCOME, outcome)
        if reason:
            self._safe(self.client.set_tag, run_id, "anneal.rollout.reason", reason[:5000])
        if outcome in ("Promoted", "RolledBack"):
            from anneal.rollout.report import log_report

            # Off the tick: drawing and uploading the report (a second or more) must not delay
            # what the driver does next; in the operator that is applying the rollback's weights.
            t = threading.Thread(target=self._safe, args=(log_report, self.client, run_id),
                                 name=f"rollout-report-{run_id[:8]}", daemon=True)
            t.start()
            self._reports = [r for r in self._reports if r.is_alive()] + [t]
        self._safe(self.client.set_terminated, run_id, "FINISHED" if outcome == "Promoted" else "KILLED"
                   if outcome in ("stopped", "superseded") else "FAILED")

    @staticmethod
    def _safe(fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - MLflow trouble is logged, the rollout goes on
            log.warning("MLflow %s failed: %s", getattr(fn, "__name__", fn), exc)
            return None
