"""`kubectl anneal`: watch and steer rollouts on Kubernetes, and read a model's lineage, as Argo Rollouts users expect.

Installed as the `kubectl-anneal` executable, so `kubectl anneal ...` finds it on PATH:

    kubectl anneal get rollout NAME [-n NS] [--watch]   steps, weights, last analysis (each gate's
                                                        figure against its threshold), history
    kubectl anneal promote NAME [--full] | abort NAME | retry NAME
                                                        through the anneal.dev/* annotations (each
                                                        value acts once; a fresh one is written)
    kubectl anneal lineage NAME [-n NS] [--kind ...]    teacher → student → compressed → deployed,
                                                        from the MLflow registry's lineage tags
    kubectl anneal report NAME [-n NS] [--out DIR]      the rollout's weights and gate figures over
                                                        time, logged to its MLflow run (PNG, HTML)

The rendering is pure (`rollout_view`, `lineage_of`) over the objects the API server and MLflow
return; `anneal rollout ...` does the same for a service `anneal run` is serving.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Mapping, Optional

import typer

from anneal import API_GROUP, API_VERSION

app = typer.Typer(help="Anneal on Kubernetes: rollouts and lineage.", no_args_is_help=True, add_completion=False)
get_app = typer.Typer(help="Show a resource.", no_args_is_help=True)
app.add_typer(get_app, name="get")

PLURALS = {"ModelService": "modelservices", "DistillationJob": "distillationjobs",
           "CompressionJob": "compressionjobs", "ModelPipeline": "modelpipelines"}
KIND_NAMES = {"msvc": "ModelService", "modelservice": "ModelService", "dj": "DistillationJob",
              "distillationjob": "DistillationJob", "cj": "CompressionJob", "compressionjob": "CompressionJob",
              "mpipe": "ModelPipeline", "modelpipeline": "ModelPipeline"}


class PluginError(RuntimeError):
    """What went wrong, said for the person at the terminal."""


# --------------------------------------------------------------------------- rollout view


def _step_text(step: Any) -> str:
    """A rollout step as the state machine names it (`describe_step`), a pause-for-promote said plainly."""
    from anneal.rollout.machine import describe_step

    text = describe_step(step)
    return "pause (until promoted)" if text == "pause {}" else text


def _gate_rows(gates: list[Any], analysis: Mapping[str, Any] | None) -> list[str]:
    """Each gate of the analysis: the figure it saw, for a rate gate the confidence interval it
    was decided on (and over how many samples), its threshold, and its verdict."""
    figures = (analysis or {}).get("figures") or {}
    failed = set((analysis or {}).get("failedGates") or [])
    checks = {c.get("metric"): c for c in (analysis or {}).get("gates") or []}
    rows = []
    for g in gates:
        value = figures.get(g.metric)
        bound = " and ".join(x for x in (f">= {g.min:g}" if g.min is not None else "",
                                          f"<= {g.max:g}" if g.max is not None else "") if x)
        check = checks.get(g.metric) or {}
        if check:
            verdict = {"pass": "ok", "fail": "fail"}.get(check.get("verdict"), "wait" if value is not None else "-")
        else:  # an analysis written before per-gate checks
            verdict = "fail" if g.metric in failed else ("-" if value is None else "ok")
        shown = "n/a" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))
        interval = ""
        if check.get("low") is not None and check.get("high") is not None:
            interval = f"[{check['low']:.3g}, {check['high']:.3g}] n={check.get('samples')}"
        rows.append(f"  {g.metric:<20} {shown:>10}  {interval:<22} {bound:<16} {verdict}")
    return rows


def rollout_view(obj: Mapping[str, Any], history: int = 5) -> str:
    """`kubectl anneal get rollout`: a ModelService's rollout as lines of text."""
    from anneal.api.resources import ManifestError, parse_spec

    meta, spec, st = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    try:
        parsed = parse_spec("ModelService", dict(spec)).rollout
    except ManifestError:
        parsed = None
    ro = st.get("rollout") or {}
    lines = [f"Name:        {meta.get('name')}", f"Namespace:   {meta.get('namespace')}",
             f"Status:      {st.get('phase') or 'Unknown'}" + (f" — {st.get('message')}" if st.get("message") else "")]
    if ro.get("pausedReason"):
        lines.append(f"Paused:      {ro['pausedReason']}" + (" (kubectl anneal promote to go on)"
                                                              if ro["pausedReason"] == "WaitingForPromote" else ""))
    if ro.get("holding"):
        lines.append(f"Holding:     {ro['holding']}")
    if ro.get("outcome") or ro.get("reason"):
        lines.append(f"Outcome:     {ro.get('outcome') or ''}" + (f": {ro['reason']}" if ro.get("reason") else ""))
    weights = st.get("weights") or {}
    declared = [v.get("name") for v in spec.get("variants") or []]  # in the spec's order, not the API server's
    ordered = [k for k in declared if k in weights] + [k for k in weights if k not in declared]
    lines.append("Weights:     " + (" ".join(f"{k}={weights[k]}" for k in ordered) or "-"))
    if parsed is None:
        lines.append("Rollout:     none declared (spec.rollout)")
        return "\n".join(lines)
    models = st.get("models") or {}
    lines.append(f"Stable:      {parsed.stable} = {ro.get('stableModel') or models.get(parsed.stable, '-')}")
    lines.append(f"Candidate:   {parsed.candidate} = {ro.get('candidateModel') or models.get(parsed.candidate, '-')}")
    lines.append(f"Attempt:     {ro.get('attempt') or '-'}   consecutive failures: {ro.get('consecutiveFailures', 0)}")
    lines.append("Steps:")
    current = ro.get("step", 0)
    ended = st.get("phase") in ("Promoted", "RolledBack")
    for i, step in enumerate(parsed.steps if parsed is not None else []):
        mark = "✔" if i < current or (ended and st.get("phase") == "Promoted") else ("▶" if i == current and not ended else "·")
        lines.append(f"  {mark} {i}: {_step_text(step)}")
    last = ro.get("lastAnalysis")
    if last:
        lines.append(f"Last analysis: {last.get('verdict')} at {last.get('time')} (step {last.get('step')}, "
                     f"candidate at {last.get('candidateWeight')}%)" + (f": {last['reason']}" if last.get("reason") else ""))
        confidence = last.get("confidence")
        lines.append(f"  {'gate':<20} {'figure':>10}  {'interval' + (f' ({confidence:.0%})' if confidence else ''):<22} "
                     f"{'threshold':<16} verdict")
        lines.extend(_gate_rows(parsed.analysis.effective_gates() if parsed is not None else [], last))
        extra = {k: v for k, v in (last.get("figures") or {}).items() if v is not None}
        if extra:
            lines.append("  figures: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                   for k, v in sorted(extra.items())))
    past = (ro.get("history") or [])[-history:]
    if past:
        lines.append("History:")
        for a in past:
            failed = ",".join(a.get("failedGates") or [])
            lines.append(f"  {a.get('time')}  step {a.get('step')}  {a.get('verdict')}"
                         + (f"  failed: {failed}" if failed else ""))
    return "\n".join(lines)


# ------------------------------------------------------------------------------ lineage


@dataclass
class LineageNode:
    uri: str
    role: str
    kind: str | None = None
    method: str | None = None
    resource: str | None = None
    run_id: str | None = None
    note: str | None = None
    parents: list["LineageNode"] = field(default_factory=list)


def lineage_of(uri: str, role: str, version_tags: Callable[[str], Mapping[str, str] | None],
               depth: int = 6) -> LineageNode:
    """The lineage of a model URI, walked back through the registry's tags (`anneal.teacher`, `anneal.source`).

    Args:
        uri: a model URI (`models:/Name/N` is followed; anything else is a leaf).
        role: what this model is to its child (``deployed as student``, ``teacher``, ``source``).
        version_tags: the tags of a `models:/Name/N` version (None: not in the registry).
        depth: how far back to walk.
    """
    from anneal.tracking import mlflow_store as store

    node = LineageNode(uri=uri, role=role)
    tags = version_tags(uri) if uri.startswith("models:/") else None
    if tags is None:
        node.note = "not in the registry" if uri.startswith("models:/") else "not a registered model"
        return node
    node.kind, node.method = tags.get(store.TAG_KIND), tags.get(store.TAG_METHOD)
    if tags.get(store.TAG_NAME):
        node.resource = f"{tags.get(store.TAG_KIND)}/{tags.get(store.TAG_NAMESPACE, '')}/{tags[store.TAG_NAME]}"
    node.run_id = tags.get("anneal.mlflow_run_id")
    if depth <= 0:
        return node
    for key, version_key, parent_role in ((store.TAG_TEACHER, store.TAG_TEACHER_VERSION, "teacher"),
                                          (store.TAG_SOURCE, store.TAG_SOURCE_VERSION, "source")):
        parent = tags.get(key)
        if not parent:
            continue
        if parent.startswith("models:/") and tags.get(version_key) and "@" in parent:
            parent = f"models:/{parent[len('models:/'):].split('@')[0]}/{tags[version_key]}"
        node.parents.append(lineage_of(parent, parent_role, version_tags, depth - 1))
    return node


def format_lineage(roots: list[LineageNode]) -> str:
    lines: list[str] = []

    def walk(node: LineageNode, indent: int) -> None:
        what = " ".join(x for x in (node.kind, f"({node.method})" if node.method else None) if x)
        detail = f"  {what}" if what else ""
        if node.resource:
            detail += f"  {node.resource}"
        if node.run_id:
            detail += f"  run {node.run_id}"
        if node.note:
            detail += f"  [{node.note}]"
        lines.append(f"{'  ' * indent}{'└─ ' if indent else ''}{node.role}: {node.uri}{detail}")
        for p in node.parents:
            walk(p, indent + 1)

    for r in roots:
        walk(r, 0)
    return "\n".join(lines)


def registry_tags(tracking_uri: str) -> Callable[[str], Mapping[str, str] | None]:
    """`lineage_of`'s lookup against an MLflow server: a `models:/Name/N` (or `@alias`) version's tags."""
    from anneal.tracking import mlflow_store as store

    def tags(uri: str) -> Mapping[str, str] | None:
        try:
            found = store.model_version_of(tracking_uri, uri)
            if found is None:
                return None
            v = store.client(tracking_uri).get_model_version(*found)
        except Exception:
            return None
        return {**dict(v.tags or {}), **({"anneal.mlflow_run_id": v.run_id} if v.run_id else {})}

    return tags


# ----------------------------------------------------------------------------- the API


def _custom(context: str | None) -> Any:
    from kubernetes import client, config

    try:
        config.load_kube_config(context=context)
    except Exception:
        try:
            config.load_incluster_config()
        except Exception as exc:
            raise PluginError(f"no Kubernetes configuration found (KUBECONFIG, ~/.kube/config): {exc}") from None
    return client.CustomObjectsApi()


def _namespace(namespace: str | None, context: str | None) -> str:
    """`-n`, else the namespace of the kubeconfig context (`--context`, else the current one), else default."""
    if namespace:
        return namespace
    try:
        from kubernetes import config

        contexts, active = config.list_kube_config_contexts()
    except Exception:
        return "default"
    if context:
        active = next((c for c in contexts if c["name"] == context), active)
    return (active or {}).get("context", {}).get("namespace") or "default"


def _get(api: Any, kind: str, namespace: str, name: str) -> dict[str, Any]:
    from kubernetes.client.exceptions import ApiException

    try:
        return api.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURALS[kind], name)
    except ApiException as exc:
        if exc.status == 404:
            raise PluginError(f"{kind} {namespace}/{name} not found") from None
        raise PluginError(f"{kind} {namespace}/{name}: {exc.status} {exc.reason}") from None


def annotate_command(api: Any, namespace: str, name: str, command: str, full: bool = False) -> str:
    """Write `anneal.dev/<command>` with a fresh value (each value acts once); returns the value."""
    value = f"{'full-' if full else ''}{int(time.time() * 1000)}"
    _get(api, "ModelService", namespace, name)
    api.patch_namespaced_custom_object(API_GROUP, API_VERSION, namespace, "modelservices", name,
                                       {"metadata": {"annotations": {f"anneal.dev/{command}": value}}})
    return value


# ---------------------------------------------------------------------------- commands

Namespace = Annotated[Optional[str], typer.Option("--namespace", "-n", help="Namespace (default: the context's).")]
Context = Annotated[Optional[str], typer.Option("--context", help="kubeconfig context.")]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


@get_app.command("rollout")
def get_rollout(
    name: Annotated[str, typer.Argument(help="The ModelService.")],
    namespace: Namespace = None,
    context: Context = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Keep printing as the rollout changes.")] = False,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between reads with --watch.")] = 2.0,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="`json`: the rollout status.")] = None,
) -> None:
    """Steps, weights, last analysis (each gate's figure and threshold) and history of a rollout."""
    if output not in (None, "json"):
        raise _fail(f"--output {output!r}: only 'json' is supported")
    try:
        api = _custom(context)
        ns = _namespace(namespace, context)
        seen = None
        while True:
            obj = _get(api, "ModelService", ns, name)
            version = (obj.get("metadata") or {}).get("resourceVersion")
            if version != seen:
                seen = version
                if output == "json":
                    typer.echo(json.dumps((obj.get("status") or {}).get("rollout") or {}, indent=2))
                else:
                    if watch:
                        typer.echo(f"--- {time.strftime('%H:%M:%S')}")
                    typer.echo(rollout_view(obj))
            if not watch:
                return
            time.sleep(interval)
    except PluginError as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        return


def _command(name: str, namespace: str | None, context: str | None, command: str, full: bool = False) -> None:
    try:
        api = _custom(context)
        ns = _namespace(namespace, context)
        value = annotate_command(api, ns, name, command, full)
    except PluginError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"modelservice {ns}/{name}: anneal.dev/{command}={value} (the operator acts on it once)")


@app.command()
def promote(name: Annotated[str, typer.Argument(help="The ModelService.")], namespace: Namespace = None,
            context: Context = None,
            full: Annotated[bool, typer.Option("--full", help="Skip every remaining step.")] = False) -> None:
    """Go past the current pause or analysis step (all of them with --full)."""
    _command(name, namespace, context, "promote", full)


@app.command()
def abort(name: Annotated[str, typer.Argument(help="The ModelService.")], namespace: Namespace = None,
          context: Context = None) -> None:
    """Roll the candidate back now."""
    _command(name, namespace, context, "abort")


@app.command()
def retry(name: Annotated[str, typer.Argument(help="The ModelService.")], namespace: Namespace = None,
          context: Context = None) -> None:
    """Start a rolled-back rollout again."""
    _command(name, namespace, context, "retry")


@app.command()
def lineage(
    name: Annotated[str, typer.Argument(help="A ModelService, or a job with --kind.")],
    namespace: Namespace = None,
    context: Context = None,
    kind: Annotated[str, typer.Option("--kind", "-k", help="msvc | dj | cj")] = "msvc",
    tracking_uri: Annotated[Optional[str], typer.Option(
        "--tracking-uri", help="MLflow server (default: MLFLOW_TRACKING_URI / ANNEAL_MLFLOW_TRACKING_URI).")] = None,
) -> None:
    """Teacher → student → compressed → deployed: the versions behind a service (or a job's output)."""
    from anneal.settings import Settings

    resolved_kind = KIND_NAMES.get(kind.lower(), kind)
    if resolved_kind not in PLURALS or resolved_kind == "ModelPipeline":
        raise _fail(f"--kind {kind!r}: use msvc, dj or cj")
    try:
        api = _custom(context)
        ns = _namespace(namespace, context)
        obj = _get(api, resolved_kind, ns, name)
    except PluginError as exc:
        raise _fail(str(exc)) from None
    st = obj.get("status") or {}
    spec = obj.get("spec") or {}
    uri = tracking_uri or (spec.get("mlflow") or {}).get("trackingUri") or Settings().tracking_uri
    lookup = registry_tags(uri)
    if resolved_kind == "ModelService":
        weights = st.get("weights") or {}
        roots = [lineage_of(model, f"deployed as {variant} ({weights.get(variant, '?')}%)", lookup)
                 for variant, model in (st.get("models") or {}).items()]
    elif st.get("modelUri"):
        roots = [lineage_of(st["modelUri"], f"output of {resolved_kind}/{name}", lookup)]
    else:
        roots = []
    if not roots:
        raise _fail(f"{resolved_kind} {ns}/{name} has no model in its status yet (phase {st.get('phase')})")
    typer.echo(format_lineage(roots))


@app.command()
def report(
    name: Annotated[str, typer.Argument(help="The ModelService (its current or last rollout).")],
    namespace: Namespace = None,
    context: Context = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Also write report.png and report.html here.")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option(
        "--tracking-uri", help="MLflow server (default: the service's spec.mlflow, then MLFLOW_TRACKING_URI).")] = None,
) -> None:
    """Draw the rollout's weights and gate figures over time; log them to its MLflow run (PNG and HTML)."""
    from anneal.rollout.report import make_report, run_id_of
    from anneal.settings import Settings

    try:
        api = _custom(context)
        ns = _namespace(namespace, context)
        obj = _get(api, "ModelService", ns, name)
    except PluginError as exc:
        raise _fail(str(exc)) from None
    run_id = run_id_of(obj.get("status"))
    if run_id is None:
        raise _fail(f"ModelService {ns}/{name} has no rollout run in its status yet")
    uri = tracking_uri or ((obj.get("spec") or {}).get("mlflow") or {}).get("trackingUri") or Settings().tracking_uri
    try:
        paths = make_report(uri, run_id, out)
    except Exception as exc:  # noqa: BLE001 - MLflow's errors, said plainly
        raise _fail(f"cannot make the report of run {run_id} at {uri}: {exc}") from None
    typer.echo(f"logged {', '.join(paths)} to MLflow run {run_id}" + (f"; written to {out}" if out else ""))


def main() -> None:
    app(prog_name="kubectl anneal")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
