"""The `anneal` command: validate, generate CRDs, run manifests locally, and talk to services."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer
from rich.console import Console

app = typer.Typer(
    name="anneal",
    help="Distill, compress and serve LLMs as declarative resources on Ray, tracked in MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)

DEFAULT_CRD_DIR = Path("charts/anneal/crds")
SUCCESS_PHASES = {"Succeeded", "Ready", "Promoted"}


def _quiet_libraries(level: str) -> None:
    """Below DEBUG, `anneal run` shows its own progress only: no per-request httpx lines, no library progress bars."""
    if level.upper() == "DEBUG":
        return
    import os

    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    # Read when those libraries are imported (later, lazily): transformers' and the hub's tqdm bars,
    # MLflow's artifact download bars.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


@app.command()
def config() -> None:
    """Print the effective settings (ANNEAL_* environment variables and their defaults)."""
    from anneal.settings import Settings

    for key, value in Settings().effective().items():
        typer.echo(f"{key}={value}")


@app.command()
def crds(
    out: Annotated[Path, typer.Option("--out", help="Directory for the CRD YAML files.")] = DEFAULT_CRD_DIR,
    check: Annotated[bool, typer.Option("--check", help="Exit 1 if the files differ from the models.")] = False,
) -> None:
    """Generate the CustomResourceDefinitions from the typed API models."""
    from anneal.api.crd import diff_crds, write_crds

    if check:
        stale = diff_crds(out)
        if stale:
            raise fail(f"CRDs in {out} are out of date: {', '.join(stale)} (run `anneal crds`)")
        typer.echo(f"CRDs in {out} are up to date")
        return
    for path in write_crds(out):
        typer.echo(f"wrote {path}")


@app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(help="Manifest files (multi-document YAML).")],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print problems only.")] = False,
) -> None:
    """Validate manifests offline with the same models the operator uses."""
    from anneal.api.loader import load_file

    failed = 0
    for path in files:
        for report in load_file(path):
            for line in report.lines():
                typer.echo(line, err=not report.ok)
            if not report.ok:
                failed += 1
            elif not quiet:
                typer.echo(f"{report.file}: document {report.index} ({report.label}): valid")
    if failed:
        raise fail(f"{failed} document(s) failed validation")


@contextlib.contextmanager
def _stdout_to_stderr(enabled: bool) -> Iterator[None]:
    """Keep stdout clean for JSON output: everything else (Ray, libraries) goes to stderr."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    real_stdout = sys.stdout
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        sys.stdout = real_stdout


class _ProgressView:
    """A rich progress line on stderr, fed by status updates."""

    def __init__(self, label: str):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), console=err, transient=False,
        )
        self.task = self.progress.add_task(label, total=None, info="starting")

    def __enter__(self) -> "_ProgressView":
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def update(self, status: dict[str, Any]) -> None:
        p = status.get("progress") or {}
        info = status.get("phase", "")
        if status.get("message"):
            info += f" · {status['message']}"
        if p.get("loss") is not None:
            info += f" · loss {p['loss']:.4f}"
        if p.get("step") is not None and p.get("totalSteps"):
            self.progress.update(self.task, completed=p["step"], total=p["totalSteps"], info=info)
        else:
            self.progress.update(self.task, info=info)


@app.command()
def run(
    file: Annotated[Path, typer.Argument(help="A manifest with one resource.")],
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="`json`: print the resource with its status.")] = None,
    duration: Annotated[Optional[float], typer.Option("--duration", help="ModelService: serve for N seconds, then stop.")] = None,
    traffic: Annotated[float, typer.Option("--traffic", help="ModelService: send N req/s of built-in-task traffic.")] = 0.0,
    port: Annotated[int, typer.Option("--port", help="ModelService: HTTP port on 127.0.0.1.")] = 8000,
) -> None:
    """Run a manifest on this machine (local Ray, local MLflow store) until it finishes."""
    from anneal.api.loader import load_file
    from anneal.local.runner import NotSupportedError, ResolutionError, run_manifest
    from anneal.settings import Settings

    if output not in (None, "json"):
        raise fail(f"--output {output!r}: only 'json' is supported")
    settings = Settings()
    logging.basicConfig(level=settings.anneal.log_level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries(settings.anneal.log_level)
    reports = load_file(file, settings.anneal.namespace)
    problems = [line for r in reports for line in r.lines() if not r.ok]
    if problems:
        for line in problems:
            err.print(line, highlight=False, markup=False)
        raise fail("the manifest is invalid")
    if len(reports) != 1:
        raise fail(f"{file}: `anneal run` takes one resource per file ({len(reports)} found)")
    report = reports[0]
    for w in report.warnings:
        err.print(f"[yellow]warning:[/yellow] {w}", highlight=False)
    manifest = report.manifest
    assert manifest is not None
    err.print(f"running {manifest.kind}/{manifest.name} (namespace {manifest.namespace}), MLflow at {settings.tracking_uri}")
    try:
        with _stdout_to_stderr(output == "json"), _ProgressView(f"{manifest.kind}/{manifest.name}") as view:
            status = run_manifest(manifest, settings, on_progress=view.update, duration=duration, traffic=traffic, port=port)
    except (NotSupportedError, ResolutionError) as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        raise fail("interrupted", 130) from None
    except Exception as exc:  # e.g. Ray could not start: a phase and a message, not a traceback
        from anneal.runtime.errors import short_error

        logging.getLogger("anneal").debug("run failed", exc_info=True)
        status = {"phase": "Failed", "message": short_error(exc)}
    phase = status.get("phase")
    if output == "json":
        resource = {
            "apiVersion": manifest.raw.get("apiVersion"),
            "kind": manifest.kind,
            "metadata": {"name": manifest.name, "namespace": manifest.namespace},
            "spec": manifest.raw.get("spec"),
            "status": status,
        }
        typer.echo(json.dumps(resource, indent=2, default=str))
    else:
        _print_status(status, manifest.kind)
    if phase not in SUCCESS_PHASES:
        raise fail(f"{manifest.kind}/{manifest.name} ended {phase}: {status.get('message', '')}")


def _print_status(status: dict[str, Any], kind: str | None = None) -> None:
    """The end of a run, for people (`anneal.report`): what happened, each figure named, what is missing and why."""
    from rich.table import Table

    from anneal import report

    head = Table(show_header=False, box=None)
    for key in ("phase", "message", "modelUri", "mlflowRunId", "endpoint"):
        if status.get(key):
            head.add_row(key, str(status[key]))
    if status.get("weights"):
        head.add_row("weights", " ".join(f"{k}={v}" for k, v in status["weights"].items()))
    err.print(head)
    if kind == "ModelPipeline" and status.get("stages"):
        stages = Table(title="stages", title_justify="left")
        for column in report.STAGE_COLUMNS:
            stages.add_column(column, overflow="fold")
        for row in report.stage_rows(status):
            stages.add_row(*(row[c] for c in report.STAGE_COLUMNS))
        err.print(stages)
        notes = report.stage_notes(status)
    else:
        metrics = status.get("metrics") or {}
        figures = report.figures(metrics, kind)
        if figures:
            table = Table(show_header=False, box=None, title="figures", title_justify="left")
            group = None
            for f in figures:
                table.add_row(f.group if f.group != group else "", f.label, report.format_value(f.key, f.value), f.key)
                group = f.group
            err.print(table)
        notes = report.missing_figures(metrics, kind) + report.comparison_notes(metrics, kind)
    for note in notes:
        err.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    for w in status.get("warnings") or []:
        err.print(f"[yellow]warning:[/yellow] {w}", highlight=False)


serve_app = typer.Typer(help="Talk to a running ModelService (embedded or on Kubernetes).", no_args_is_help=True)
rollout_app = typer.Typer(help="Watch and steer a ModelService rollout (embedded mode).", no_args_is_help=True)
app.add_typer(serve_app, name="serve")
app.add_typer(rollout_app, name="rollout")


def _endpoint_of(service: str, namespace: str | None) -> str:
    """A service's base URL: a URL as given, an embedded service's published endpoint, or status.endpoint on Kubernetes."""
    if service.startswith(("http://", "https://")):
        return service.rstrip("/")
    from anneal.rollout.control import ControlError, read_state

    try:
        state = read_state(service)
        if state.get("endpoint") and state.get("running"):
            return str(state["endpoint"]).rstrip("/")
    except ControlError:
        pass
    try:
        from kubernetes import client, config as kconfig

        kconfig.load_kube_config()
        obj = client.CustomObjectsApi().get_namespaced_custom_object(
            "anneal.dev", "v1alpha1", namespace or "default", "modelservices", service)
        endpoint = (obj.get("status") or {}).get("endpoint")
        if endpoint:
            return str(endpoint).rstrip("/")
    except Exception:
        pass
    raise fail(f"service {service!r}: no running embedded service or ModelService with an endpoint found; "
               "pass its URL instead (e.g. http://127.0.0.1:8000)")


@serve_app.command("call")
def serve_call(
    service: Annotated[str, typer.Argument(help="Service name or base URL (http://127.0.0.1:8000).")],
    prompt: Annotated[str, typer.Argument(help="The user message.")],
    reasoning: Annotated[Optional[str], typer.Option("--reasoning", help="on | off (default: the service's).")] = None,
    variant: Annotated[Optional[str], typer.Option("--variant", help="Pin a variant.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", help="Generation cap.")] = None,
    namespace: Annotated[Optional[str], typer.Option("--namespace", "-n")] = None,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", envvar="ANNEAL_API_KEY", show_default=False,
        help="The service's API key (spec.auth); the admin key to pin a --variant.")] = None,
) -> None:
    """Send one chat request and print the answer with the variant and routing reason."""
    from anneal.serve.client import ServeClientError, call

    if reasoning not in (None, "on", "off"):
        raise fail(f"--reasoning {reasoning!r}: use on or off")
    try:
        out = call(_endpoint_of(service, namespace), prompt, reasoning=reasoning, variant=variant, max_tokens=max_tokens,
                   api_key=api_key)
    except ServeClientError as exc:
        raise fail(str(exc)) from None
    err.print(f"[dim]variant={out.get('variant')} reason={out.get('reason')} reasoning={out.get('reasoning')}[/dim]")
    typer.echo(out.get("text", ""))


@serve_app.command("stats")
def serve_stats(
    service: Annotated[str, typer.Argument(help="Service name or base URL.")],
    since: Annotated[Optional[float], typer.Option("--since", help="Window start (unix seconds).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw /-/stats JSON.")] = False,
    namespace: Annotated[Optional[str], typer.Option("--namespace", "-n")] = None,
    admin_key: Annotated[Optional[str], typer.Option(
        "--admin-key", envvar="ANNEAL_ADMIN_KEY", show_default=False,
        help="The service's admin key (spec.auth).")] = None,
) -> None:
    """Per-variant requests, errors, latency and routing decisions."""
    from anneal.serve.client import ServeClientError, format_stats, stats

    try:
        doc = stats(_endpoint_of(service, namespace), since=since, api_key=admin_key)
    except ServeClientError as exc:
        raise fail(str(exc)) from None
    typer.echo(json.dumps(doc, indent=2) if as_json else format_stats(doc))


@rollout_app.command("status")
def rollout_status(service: Annotated[str, typer.Argument(help="The ModelService name.")]) -> None:
    """Phase, step, weights and the last analysis of a service's rollout."""
    from anneal.rollout.control import ControlError, format_status, status

    try:
        typer.echo(format_status(status(service)))
    except ControlError as exc:
        raise fail(str(exc)) from None


def _rollout_command(fn_name: str, service: str, **kwargs: Any) -> None:
    from anneal.rollout import control

    try:
        result = getattr(control, fn_name)(service, **kwargs)
    except control.ControlError as exc:
        raise fail(str(exc)) from None
    if result.handled and not result.accepted:
        raise fail(result.message)
    typer.echo(result.message + (f" (phase {result.phase})" if result.phase else ""))


@rollout_app.command("promote")
def rollout_promote(
    service: Annotated[str, typer.Argument(help="The ModelService name.")],
    full: Annotated[bool, typer.Option("--full", help="Skip all remaining steps.")] = False,
) -> None:
    """Skip the current pause or analysis (or, with --full, every remaining step)."""
    _rollout_command("promote", service, full=full)


@rollout_app.command("abort")
def rollout_abort(service: Annotated[str, typer.Argument(help="The ModelService name.")]) -> None:
    """Roll back now: the stable variant takes all traffic."""
    _rollout_command("abort", service)


@rollout_app.command("retry")
def rollout_retry(service: Annotated[str, typer.Argument(help="The ModelService name.")]) -> None:
    """Start a rolled-back or failure-paused rollout again."""
    _rollout_command("retry", service)


@rollout_app.command("report")
def rollout_report(
    service: Annotated[Optional[str], typer.Argument(help="The ModelService name (its last rollout).")] = None,
    run_id: Annotated[Optional[str], typer.Option("--run-id", help="A rollout's MLflow run instead.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Also write report.png and report.html here.")] = None,
) -> None:
    """Draw a rollout's weights and gate figures over time and log them to its MLflow run (PNG and HTML)."""
    from anneal.rollout import control
    from anneal.rollout.report import make_report, run_id_of
    from anneal.settings import Settings

    if run_id is None:
        if service is None:
            raise fail("name a service or give --run-id")
        try:
            run_id = run_id_of(control.status(service).get("status"))
        except control.ControlError as exc:
            raise fail(str(exc)) from None
        if run_id is None:
            raise fail(f"service {service!r} has no rollout run yet")
    try:
        paths = make_report(Settings().tracking_uri, run_id, out)
    except Exception as exc:  # noqa: BLE001 - MLflow's errors, said plainly
        raise fail(f"cannot make the report of run {run_id}: {exc}") from None
    typer.echo(f"logged {', '.join(paths)} to MLflow run {run_id}" + (f"; written to {out}" if out else ""))


@app.command()
def explain(
    model_uri: Annotated[str, typer.Argument(help="A model: a path, hf://org/name, s3://bucket/prefix, models:/Name/N.")],
    question: Annotated[str, typer.Argument(help="The question to answer and explain.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for attention.png, attention.html and attention.json.")] = Path("explain"),
    reasoning: Annotated[str, typer.Option("--reasoning", help="on | off: the \"detailed thinking\" system prompt.")] = "off",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="The answer's cap in tokens.", min=1)] = 96,
    device: Annotated[str, typer.Option("--device", help="cpu | cuda | auto (cuda when there is one).")] = "auto",
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="`json`: print the figures and paths as JSON.")] = None,
) -> None:
    """Answer a question greedily and map where the answer's tokens looked in the prompt (PNG and HTML)."""
    import time

    from anneal.settings import Settings

    if output not in (None, "json"):
        raise fail(f"--output {output!r}: only 'json' is supported")
    if reasoning not in ("on", "off"):
        raise fail(f"--reasoning {reasoning!r}: use on or off")
    if device not in ("cpu", "cuda", "auto"):
        raise fail(f"--device {device!r}: use cpu, cuda or auto")
    if not question.strip():
        raise fail("the question is empty: ask one")
    settings = Settings()
    logging.basicConfig(level=settings.anneal.log_level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries(settings.anneal.log_level)
    with _stdout_to_stderr(output == "json"):
        import torch

        from anneal.explain.attention import explain_prompt, question_prompt
        from anneal.explain.render import write_map
        from anneal.modeling.uris import ModelNotFoundError, load_model

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            model, tokenizer = load_model(model_uri, cache_dir=settings.anneal.cache_dir, tracking_uri=settings.tracking_uri,
                                          device=device)
        except (ValueError, ModelNotFoundError, OSError) as exc:
            raise fail(f"cannot load {model_uri}: {exc}") from None
        started = time.perf_counter()
        m = explain_prompt(model, tokenizer, question_prompt(tokenizer, question, reasoning),
                           max_new_tokens=max_new_tokens, question=question, model_name=model_uri)
        mapped = time.perf_counter() - started
        png, page, figures = write_map(m, out)
        rendered = time.perf_counter() - started - mapped
    doc = {**m.summary(), "png": str(png), "html": str(page), "json": str(figures),
           "seconds": {"map": round(mapped, 3), "render": round(rendered, 3)}}
    if output == "json":
        typer.echo(json.dumps(doc, indent=2))
        return
    na = m.number_attention
    typer.echo(f"answer: {m.answer}")
    typer.echo(f"numberAttention: {'n/a' if na is None else f'{na:.3f}'} "
               f"(numeric tokens are {m.number_token_share:.3f} of the prompt)")
    if m.skipped_layers:
        typer.echo(f"skipped (no attention): layers {', '.join(map(str, m.skipped_layers))}")
    typer.echo(f"wrote {page} and {png}")


@app.command()
def operator(
    namespace: Annotated[Optional[list[str]], typer.Option("--namespace", "-n", help="Namespaces to watch (default: all).")] = None,
) -> None:
    """Run the Kubernetes operator (same as `python -m anneal_operator`)."""
    try:
        from anneal_operator.main import run_operator
    except ImportError as exc:
        raise fail(f"the operator is not available: {exc}") from None
    run_operator(namespaces=namespace or [])


def main() -> None:
    app()


if __name__ == "__main__":
    main()
