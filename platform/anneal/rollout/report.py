"""The rollout report: weights and gate figures over time, drawn from the rollout's MLflow run.

Everything comes from the run `RolloutTracker` keeps for each rollout attempt, so the report
is the same for both drivers and can be made again at any time (``anneal rollout report``,
``kubectl anneal report``):

* metrics ``rollout.weight.<variant>`` — one point per weight change;
* metrics ``analysis.<figure>``, ``analysis.verdict`` (1 pass, 0 wait, -1 fail) and
  ``rollout.step``, one point per analysis (the metric step is the analysis' index);
* params ``gate.<metric>`` = ``"max 0.02"`` / ``"min 0.5"`` — what each analysis checked;
* tags: service, outcome, reason, candidate and stable versions.

`render_png` draws one panel of weights and one panel per gate (its figure at each analysis,
the threshold dashed, each point coloured by the verdict); `render_html` wraps that picture
with the run's summary and a table of every analysis in one self-contained page (MLflow's
UI shows both artifacts in place). `log_report` writes ``rollout/report.png`` and
``rollout/report.html`` to the run.
"""

from __future__ import annotations

import base64
import html
import io
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anneal.api.service import Gate

ARTIFACT_DIR = "rollout"
PNG_NAME = "report.png"
HTML_NAME = "report.html"
WEIGHT_PREFIX = "rollout.weight."
GATE_PARAM_PREFIX = "gate."
VERDICTS = {1.0: "pass", 0.0: "wait", -1.0: "fail"}
_COLOURS = {"pass": "#2e7d32", "wait": "#9e9e9e", "fail": "#c62828"}


@dataclass
class AnalysisPoint:
    """One analysis: when (unix s), which step, the verdict and its figures."""

    index: int
    time: float
    verdict: str
    step: int | None = None
    candidate_weight: float | None = None
    figures: dict[str, float] = field(default_factory=dict)


@dataclass
class RolloutHistory:
    """What a rollout run recorded, in time order."""

    run_id: str
    service: str
    outcome: str
    reason: str
    candidate: str
    stable: str
    started: float
    ended: float | None
    gates: list[Gate]
    weights: dict[str, list[tuple[float, float]]]
    analyses: list[AnalysisPoint]


def gate_params(gates: list[dict[str, Any]] | tuple[dict[str, Any], ...]) -> dict[str, str]:
    """Run params for the gates of a rollout (``gate.errorRate`` = ``max 0.02``)."""
    return {f"{GATE_PARAM_PREFIX}{g['metric']}": f"{g['bound']} {float(g['threshold']):g}" for g in gates}


def _parse_gate(metric: str, text: str) -> Gate | None:
    """A `gate_params` value back as the `Gate` it was made from (None for what no Gate can be)."""
    bound, _, value = text.partition(" ")
    if bound not in ("max", "min"):
        return None
    try:
        return Gate.model_validate({"metric": metric, bound: float(value)})
    except ValueError:  # pydantic's ValidationError too: an unknown metric, a value that is no number
        return None


def read_history(client: Any, run_id: str) -> RolloutHistory:
    """A rollout run's recorded history, through an `mlflow.MlflowClient`."""
    run = client.get_run(run_id)
    tags, params = run.data.tags, run.data.params
    metric_names = list(run.data.metrics)
    gates = [g for k, v in sorted(params.items()) if k.startswith(GATE_PARAM_PREFIX)
             and (g := _parse_gate(k[len(GATE_PARAM_PREFIX):], v)) is not None]
    weights: dict[str, list[tuple[float, float]]] = {}
    analyses: dict[int, AnalysisPoint] = {}
    for name in metric_names:
        history = client.get_metric_history(run_id, name)
        if name.startswith(WEIGHT_PREFIX):
            weights[name[len(WEIGHT_PREFIX):]] = sorted((m.timestamp / 1000.0, m.value) for m in history)
            continue
        for m in history:
            if name == "analysis.verdict":
                point = analyses.setdefault(m.step, AnalysisPoint(m.step, m.timestamp / 1000.0, "wait"))
                point.verdict = VERDICTS.get(m.value, "wait")
                point.time = m.timestamp / 1000.0
            elif name.startswith("analysis.") or name in ("rollout.step", "rollout.candidateWeight"):
                point = analyses.setdefault(m.step, AnalysisPoint(m.step, m.timestamp / 1000.0, "wait"))
                if name == "rollout.step":
                    point.step = int(m.value)
                elif name == "rollout.candidateWeight":
                    point.candidate_weight = m.value
                else:
                    point.figures[name[len("analysis."):]] = m.value
    info = run.info
    return RolloutHistory(
        run_id=run_id, service=tags.get("anneal.name", ""), outcome=tags.get("anneal.rollout.outcome", "running"),
        reason=tags.get("anneal.rollout.reason", ""),
        candidate=tags.get("anneal.rollout.candidate_version") or tags.get("anneal.rollout.candidate_model", ""),
        stable=tags.get("anneal.rollout.stable_version") or tags.get("anneal.rollout.stable_model", ""),
        started=info.start_time / 1000.0, ended=info.end_time / 1000.0 if info.end_time else None,
        gates=gates, weights=weights, analyses=sorted(analyses.values(), key=lambda a: (a.time, a.index)),
    )


def _title(h: RolloutHistory) -> str:
    return f"rollout of {h.service}: {h.outcome}"


def render_png(h: RolloutHistory, dpi: int = 100) -> bytes:
    """The report's picture: weights over time, then one panel per gate."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # no pyplot: no global state, safe in a server thread

    panels = 1 + max(1, len(h.gates))
    fig = Figure(figsize=(9, 2.2 + 2.0 * panels), dpi=dpi, layout="constrained")
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    t0 = h.started
    last = max([h.ended or t0] + [a.time for a in h.analyses] + [t for pts in h.weights.values() for t, _ in pts])
    end = last + 0.05 * max(last - t0, 1.0)  # the last split stays visible a little past its change
    ax = axes[0]
    # Variants that never took traffic (a service's other candidates) would only hide each
    # other along 0 %: they are named in a note instead of drawn.
    drawn = {v: pts for v, pts in sorted(h.weights.items()) if any(w for _, w in pts)}
    idle = sorted(set(h.weights) - set(drawn))
    for variant, points in drawn.items():
        xs = [t - t0 for t, _ in points] + [end - t0]
        ys = [w for _, w in points] + [points[-1][1]]
        ax.step(xs, ys, where="post", label=variant, linewidth=2)
    ax.set_ylim(-5, 105)
    ax.set_ylabel("weight (%)")
    ax.set_title(_title(h), loc="left", fontsize=11)
    if drawn:
        ax.legend(loc="center left", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no weight changes recorded", ha="center", va="center", transform=ax.transAxes)
    if idle:
        ax.text(0.99, 0.03, f"at 0 % throughout: {', '.join(idle)}", ha="right", va="bottom", fontsize=8,
                color="#616161", transform=ax.transAxes)
    for a in h.analyses:
        ax.axvline(a.time - t0, color=_COLOURS[a.verdict], alpha=0.35, linewidth=1)
    gate_axes = axes[1:]
    if not h.gates:
        gate_axes[0].text(0.5, 0.5, "no gates recorded", ha="center", va="center", transform=gate_axes[0].transAxes)
    for ax, gate in zip(gate_axes, h.gates):
        points = [(a.time - t0, a.figures[gate.metric], a.verdict) for a in h.analyses if gate.metric in a.figures]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], color="#455a64", linewidth=1)
            ax.scatter([p[0] for p in points], [p[1] for p in points], c=[_COLOURS[p[2]] for p in points], s=28,
                       zorder=3)
        else:
            ax.text(0.5, 0.5, f"no {gate.metric} figure recorded", ha="center", va="center", transform=ax.transAxes)
        ax.axhline(gate.threshold, color="#c62828", linestyle="--", linewidth=1,
                   label=f"{gate.bound} {gate.threshold:g}")
        ax.set_ylabel(gate.metric)
        ax.legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("seconds since the rollout began")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def render_html(h: RolloutHistory, png: bytes) -> str:
    """One self-contained page: summary, the picture (inline) and every analysis as a table row."""
    esc = html.escape
    metrics = [g.metric for g in h.gates] or sorted({k for a in h.analyses for k in a.figures})
    extra = [k for k in ("requests", "probes") if k not in metrics and any(k in a.figures for a in h.analyses)]
    head = "".join(f"<th>{esc(m)}</th>" for m in ["t (s)", "step", "candidate %", "verdict", *metrics, *extra])
    rows = []
    for a in h.analyses:
        cells = [f"{a.time - h.started:.1f}", "" if a.step is None else str(a.step), _cell(a.candidate_weight)]
        verdict = f'<td class="{a.verdict}">{a.verdict}</td>'
        figs = []
        for m in metrics + extra:
            v = a.figures.get(m)
            gate = next((g for g in h.gates if g.metric == m), None)
            cls = "" if v is None or gate is None else (' class="pass"' if gate.holds(v) else ' class="fail"')
            figs.append(f"<td{cls}>{_cell(v)}</td>")
        rows.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + verdict + "".join(figs) + "</tr>")
    gates = ", ".join(f"{g.metric} {'<=' if g.bound == 'max' else '>='} {g.threshold:g}" for g in h.gates) or "none"
    summary = [("service", h.service), ("outcome", h.outcome), ("reason", h.reason or "—"),
               ("candidate", h.candidate), ("stable", h.stable), ("gates", gates),
               ("analyses", str(len(h.analyses))), ("MLflow run", h.run_id)]
    image = base64.b64encode(png).decode("ascii")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(_title(h))}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; color: #212121; }}
table {{ border-collapse: collapse; margin: 0.75rem 0; font-size: 0.85rem; }}
th, td {{ border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: right; }}
th {{ background: #eceff1; }} .summary td {{ text-align: left; }}
td.pass {{ background: #e8f5e9; }} td.fail {{ background: #ffebee; }} td.wait {{ background: #f5f5f5; }}
img {{ max-width: 100%; }}
</style></head>
<body>
<h1>{esc(_title(h))}</h1>
<table class="summary">{"".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in summary)}</table>
<img alt="weights and gate figures over time" src="data:image/png;base64,{image}">
<h2>Analyses</h2>
<table><tr>{head}</tr>{"".join(rows) or '<tr><td colspan="4">no analyses recorded</td></tr>'}</table>
</body></html>
"""


def write_report(h: RolloutHistory, out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.png`` and ``report.html`` into `out_dir`; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png = render_png(h)
    png_path, html_path = out_dir / PNG_NAME, out_dir / HTML_NAME
    png_path.write_bytes(png)
    html_path.write_text(render_html(h, png), encoding="utf-8")
    return png_path, html_path


def log_report(client: Any, run_id: str, out_dir: Path | None = None) -> list[str]:
    """Make the report of a rollout run and log it to the run (``rollout/report.{png,html}``).

    Returns the artifact paths; the files also stay in `out_dir` when one is given.
    """
    h = read_history(client, run_id)
    with tempfile.TemporaryDirectory(prefix="anneal-rollout-report-") as tmp:
        paths = write_report(h, out_dir or Path(tmp))
        for p in paths:
            client.log_artifact(run_id, str(p), artifact_path=ARTIFACT_DIR)
    return [f"{ARTIFACT_DIR}/{p.name}" for p in paths]


def run_id_of(status: Any) -> str | None:
    """The rollout run's id in a ModelService status (a dict as the API server or the embedded driver holds it)."""
    rollout = (status or {}).get("rollout") or {}
    return rollout.get("mlflowRunId") or None


def make_report(tracking_uri: str, run_id: str, out_dir: Path | None = None) -> list[str]:
    """`anneal rollout report` / `kubectl anneal report`: (re)make a rollout run's report and log it to the run."""
    from mlflow import MlflowClient

    return log_report(MlflowClient(tracking_uri=tracking_uri), run_id, out_dir)
