"""A lint of deploy/images/*.Containerfile and build.sh: CI has no container builder, so what
can be checked without one is checked here (hadolint is not installable from the package
registries this CI reaches).

Rules: a pinned base (a tag, never `latest`), the Ray base on the Ray of requirements.lock and
of the operator's `rayVersion`; every COPY source exists in the build context (the repository
root); dependencies from requirements.lock and the package itself with `--no-deps` (the image
runs the pins the suite tested); a non-root USER after the last RUN; ENTRYPOINT/CMD in exec
form; the operator's entrypoint module exists; the tags build.sh makes are the ones the chart
and the operator settings name.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from anneal_operator.settings import OperatorSettings

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "deploy" / "images"
FILES = sorted(IMAGES.glob("*.Containerfile"))


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, f"{path.name}: a line continues past the end"
    return out


def _args(path: Path) -> dict[str, str]:
    return {k: v for word, rest in instructions(path) if word == "ARG" and "=" in rest
            for k, v in [rest.split("=", 1)]}


def lint(path: Path) -> list[str]:
    """What is wrong with a Containerfile, one line each (empty: nothing)."""
    problems: list[str] = []
    ins = instructions(path)
    args = _args(path)
    words = [w for w, _ in ins]
    if not ins or words[0] not in ("FROM", "ARG"):
        problems.append("the first instruction must be FROM (or an ARG it uses)")
    for word, rest in ins:
        if word == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), rest.split()[0])
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            if "@sha256:" not in image and (not tag or tag == "latest" or "$" in tag):
                problems.append(f"FROM {rest}: pin a tag (not latest, every ARG with a default)")
        elif word in ("COPY", "ADD"):
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            for src in parts[:-1]:
                if not (ROOT / src).exists():
                    problems.append(f"{word} {src}: not in the build context (the repository root)")
        elif word == "RUN" and "pip install" in rest:
            for cmd in re.split(r"&&|;", rest):
                if "pip install" in cmd and not any(ok in cmd for ok in ("-r requirements.lock", "--no-deps", "uv==")):
                    problems.append(f"RUN {cmd.strip()}: install from requirements.lock, or the package with --no-deps")
        elif word in ("ENTRYPOINT", "CMD"):
            try:
                if not isinstance(json.loads(rest), list):
                    raise ValueError
            except ValueError:
                problems.append(f"{word} {rest}: use the exec form (a JSON array)")
    runs = [i for i, w in enumerate(words) if w == "RUN"]
    users = [(i, rest) for i, (w, rest) in enumerate(ins) if w == "USER"]
    if not users or (runs and users[-1][0] < runs[-1]):
        problems.append("no USER after the last RUN: the image would run as root")
    elif users[-1][1].split(":")[0] in ("0", "root"):
        problems.append(f"USER {users[-1][1]}: run as a non-root user")
    text = path.read_text()
    if "-r requirements.lock" not in text or "--no-deps ." not in text:
        problems.append("install requirements.lock and then the package with --no-deps")
    return problems


def test_there_is_an_operator_and_a_ray_image():
    assert {p.name for p in FILES} == {"operator.Containerfile", "ray.Containerfile"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_containerfile_lints_clean(path):
    assert lint(path) == []


def test_the_lint_finds_what_it_is_for(tmp_path):
    bad = tmp_path / "bad.Containerfile"
    bad.write_text("FROM python:latest\nCOPY nowhere/ /x\nRUN pip install torch\nENTRYPOINT python -m x\n")
    problems = lint(bad)
    assert any("pin a tag" in p for p in problems)
    assert any("nowhere/" in p for p in problems)
    assert any("pip install torch" in p for p in problems)
    assert any("exec form" in p for p in problems)
    assert any("run as root" in p for p in problems)


def test_the_ray_image_is_the_ray_the_suite_and_the_operator_use():
    ray = _args(IMAGES / "ray.Containerfile")["RAY_VERSION"]
    lock = re.search(r"^ray==(\S+)$", (ROOT / "requirements.lock").read_text(), re.M).group(1)
    values = yaml.safe_load((ROOT / "charts" / "anneal" / "values.yaml").read_text())
    assert ray == lock == OperatorSettings().ray_version == values["operator"]["rayVersion"]
    from anneal.runtime.kuberay import RAY_GID, RAY_UID

    assert f"USER {RAY_UID}:{RAY_GID}" in (IMAGES / "ray.Containerfile").read_text()  # the pods' securityContext


def test_the_operator_entrypoint_exists_and_build_sh_tags_what_the_chart_runs():
    ins = instructions(IMAGES / "operator.Containerfile")
    entry = json.loads(next(rest for w, rest in ins if w == "ENTRYPOINT"))
    assert entry[-2:] == ["-m", "anneal_operator"] and (ROOT / "operators" / "anneal_operator" / "__main__.py").exists()
    values = yaml.safe_load((ROOT / "charts" / "anneal" / "values.yaml").read_text())
    script = (IMAGES / "build.sh").read_text()
    assert values["image"]["repository"] == "ghcr.io/anneal-dev/anneal" and 'REGISTRY:-ghcr.io/anneal-dev' in script
    assert '"$REGISTRY/anneal:$VERSION"' in script and '"$REGISTRY/anneal-ray:$VERSION"' in script
    assert OperatorSettings().image == values["operator"]["image"] == "ghcr.io/anneal-dev/anneal-ray:0.1.0"


def test_build_sh_without_a_builder_says_so():
    subprocess.run(["bash", "-n", str(IMAGES / "build.sh")], check=True)
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    if any((Path(d) / b).exists() for d in ("/usr/bin", "/bin") for b in ("docker", "podman", "buildah")):
        pytest.skip("this machine has a container builder: build.sh would build")
    proc = subprocess.run([str(IMAGES / "build.sh")], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 3 and "no container builder" in proc.stderr, proc.stderr
