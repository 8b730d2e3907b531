"""Model URIs (paths, hf://, s3://, models:/) resolved to local checkpoint directories and loaded."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

CONFIG_FILE = "config.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
#: Files that mark a checkpoint directory: a full model, or an unmerged LoRA adapter.
CHECKPOINT_MARKERS = (CONFIG_FILE, ADAPTER_CONFIG_FILE)
_MLFLOW_NAME_RE = re.compile(r"^[^/@]+$")


class ModelNotFoundError(FileNotFoundError):
    """A model URI parsed, but no checkpoint could be found or fetched there."""


@dataclass(frozen=True)
class ModelURI:
    """A parsed ModelRef URI; which fields are set depends on `scheme`."""

    raw: str
    scheme: Literal["file", "hf", "s3", "models"]
    path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None
    bucket: str | None = None
    prefix: str | None = None
    name: str | None = None
    version: int | None = None
    alias: str | None = None


def parse_model_uri(s: str) -> ModelURI:
    """Parse a model URI.

    Accepted: `file:///abs/path`, a relative or absolute path, `hf://org/name[@revision]`,
    `s3://bucket/prefix`, `models:/Name/3`, `models:/Name@alias`.

    Args:
        s: the URI.

    Returns:
        The parsed URI.

    Raises:
        ValueError: the URI has an unknown scheme or a malformed body; the message says
            which form was expected.
    """
    if not isinstance(s, str) or not s.strip():
        raise ValueError(f"model uri {s!r} is empty; give a path, hf://org/name, s3://bucket/prefix or models:/Name/N")
    s = s.strip()
    if s.startswith("models:"):
        body = s[len("models:"):]
        if not body.startswith("/") or body.startswith("//"):
            raise ValueError(f"{s}: an MLflow registry URI is written models:/Name/3 or models:/Name@alias")
        body = body[1:]
        if "@" in body:
            name, _, alias = body.partition("@")
            if not name or not _MLFLOW_NAME_RE.match(name) or not alias or "/" in alias:
                raise ValueError(f"{s}: expected models:/Name@alias, with a model name and an alias")
            return ModelURI(raw=s, scheme="models", name=name, alias=alias)
        name, _, version = body.partition("/")
        if not name:
            raise ValueError(f"{s}: expected models:/Name/3 or models:/Name@alias; the model name is missing")
        if not version:
            raise ValueError(
                f"{s}: model {name!r} needs a version or an alias: models:/{name}/3 or models:/{name}@champion"
            )
        if not version.isdigit() or int(version) < 1:
            raise ValueError(
                f"{s}: version {version!r} must be a positive integer (models:/{name}/3); "
                f"for a moving reference use an alias (models:/{name}@champion)"
            )
        return ModelURI(raw=s, scheme="models", name=name, version=int(version))
    if s.startswith("hf://"):
        repo, _, revision = s[len("hf://"):].partition("@")
        pieces = repo.strip("/").split("/")
        if pieces[0] == "datasets":
            raise ValueError(f"{s}: this is a data set; a model is hf://org/name[@revision]")
        if len(pieces) != 2 or not all(pieces):
            raise ValueError(f"{s}: expected hf://org/name[@revision], got repo {repo!r}")
        if "@" in s and not revision:
            raise ValueError(f"{s}: empty revision after '@'; drop the '@' or name a branch, tag or commit")
        return ModelURI(raw=s, scheme="hf", repo_id="/".join(pieces), revision=revision or None)
    if s.startswith("s3://"):
        parts = urlsplit(s)
        if not parts.netloc:
            raise ValueError(f"{s}: expected s3://bucket/prefix; the bucket is missing")
        return ModelURI(raw=s, scheme="s3", bucket=parts.netloc, prefix=parts.path.strip("/"))
    if s.startswith("file:"):
        parts = urlsplit(s)
        if not s.startswith("file://") or parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ValueError(f"{s}: a file URI needs an absolute path, e.g. file:///models/student")
        return ModelURI(raw=s, scheme="file", path=Path(unquote(parts.path)))
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", s) and not re.match(r"^[A-Za-z]:[\\/]", s):
        scheme = s.split(":", 1)[0]
        raise ValueError(
            f"{s}: unsupported scheme {scheme!r}; use a path, file://, hf://, s3:// or models:/"
        )
    return ModelURI(raw=s, scheme="file", path=Path(s).expanduser())


def find_checkpoint_dir(root: Path, source: str) -> Path:
    """The directory holding `config.json`: `root` itself or exactly one child of it.

    Args:
        root: a downloaded or local directory.
        source: the URI it came from, for error messages.

    Returns:
        The checkpoint directory.
    """
    if any((root / marker).is_file() for marker in CHECKPOINT_MARKERS):
        return root
    found = sorted({p.parent for marker in CHECKPOINT_MARKERS for p in root.glob(f"*/{marker}")})
    if len(found) == 1:
        return found[0]
    if not found:
        raise ModelNotFoundError(
            f"{source}: no {CONFIG_FILE} in {root} or its subdirectories; point the URI at a "
            "Hugging Face checkpoint directory (saved with save_pretrained)"
        )
    raise ModelNotFoundError(
        f"{source}: several checkpoints under {root} ({[p.name for p in found]}); point the URI at one"
    )


def _publish(tmp: Path, target: Path) -> None:
    """Move a finished download into place, atomically where the filesystem allows."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # target exists (a concurrent download won): keep it
        shutil.rmtree(tmp, ignore_errors=True)


def _resolve_hf(uri: ModelURI, cache_dir: Path) -> Path:
    from huggingface_hub import constants, snapshot_download

    # Offline, go straight to the cache: otherwise a commit-hash revision still asks the hub
    # for its file list when the cache has no stored listing for it.
    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        local = snapshot_download(uri.repo_id, revision=uri.revision, cache_dir=str(cache_dir),
                                  local_files_only=offline)
    except Exception as e:
        hint = (
            f"HF_HUB_OFFLINE is set and the model is not in the cache at {cache_dir}; populate it "
            "or unset HF_HUB_OFFLINE" if offline else
            "check the repo id and revision, network access and HF_TOKEN for private repos"
        )
        raise ModelNotFoundError(
            f"{uri.raw}: could not fetch {uri.repo_id!r} (revision {uri.revision or 'main'}): "
            f"{type(e).__name__}: {e}. {hint}"
        ) from e
    return find_checkpoint_dir(Path(local), uri.raw)


def _resolve_s3(uri: ModelURI, cache_dir: Path, s3_endpoint_url: str | None) -> Path:
    from anneal.data.s3 import s3_client

    client = s3_client(s3_endpoint_url)
    target = cache_dir / "s3" / uri.bucket / (uri.prefix or "_root")
    prefix = f"{uri.prefix}/" if uri.prefix else ""
    tmp = Path(tempfile.mkdtemp(prefix=".s3-", dir=cache_dir))
    count = 0
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=uri.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                relative = obj["Key"][len(prefix):]
                if not relative or relative.endswith("/"):
                    continue  # "directory" placeholder objects
                dest = (tmp / relative).resolve()
                if not dest.is_relative_to(tmp.resolve()):
                    raise ModelNotFoundError(f"{uri.raw}: object key {obj['Key']!r} escapes the prefix")
                dest.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(uri.bucket, obj["Key"], str(dest))
                count += 1
    except ModelNotFoundError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelNotFoundError(
            f"{uri.raw}: could not download from S3: {type(e).__name__}: {e}. Check the bucket, "
            "credentials and ANNEAL_S3_ENDPOINT_URL for a non-AWS endpoint"
        ) from e
    if not count:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelNotFoundError(f"{uri.raw}: no objects under s3://{uri.bucket}/{prefix}")
    # S3 prefixes can be overwritten, so a fresh download replaces the cached copy.
    shutil.rmtree(target, ignore_errors=True)
    _publish(tmp, target)
    return find_checkpoint_dir(target, uri.raw)


def _resolve_mlflow(uri: ModelURI, cache_dir: Path, tracking_uri: str | None) -> Path:
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    where = f"tracking uri {tracking_uri or 'default'}"
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    version = uri.version
    if version is None:
        try:
            version = int(client.get_model_version_by_alias(uri.name, uri.alias).version)
        except Exception as e:
            raise ModelNotFoundError(
                f"{uri.raw}: could not resolve alias {uri.alias!r} of registered model {uri.name!r} "
                f"({where}): {e}. Check the name and alias (MlflowClient.set_registered_model_alias)"
            ) from e
    # A version is immutable, so its download is cached; an alias is resolved on every call.
    target = cache_dir / "mlflow" / uri.name / str(version)
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=target.parent))
        try:
            # Resolved through our client: download_artifacts("models:/...") looks the version up
            # in the process-wide registry, ignoring its registry_uri argument (MLflow 3.x).
            source = client.get_model_version_download_uri(uri.name, str(version))
            mlflow.artifacts.download_artifacts(
                artifact_uri=source, dst_path=str(tmp), tracking_uri=tracking_uri, registry_uri=tracking_uri,
            )
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ModelNotFoundError(
                f"{uri.raw}: could not download version {version} of registered model {uri.name!r} "
                f"({where}): {e}"
            ) from e
        _publish(tmp, target)
    return find_checkpoint_dir(target, uri.raw)


def resolve_model_dir(
    uri: str | ModelURI,
    *,
    cache_dir: str | Path,
    tracking_uri: str | None = None,
    s3_endpoint_url: str | None = None,
) -> Path:
    """A local directory holding the Hugging Face checkpoint a model URI names.

    Paths are used in place; `hf://` goes through the Hugging Face cache (so
    `HF_HUB_OFFLINE=1` works from a populated cache); `s3://` downloads every object under the
    prefix; `models:/` downloads the registered version's artifacts (an alias is resolved
    to its current version first).

    Args:
        uri: a model URI or a parsed `ModelURI`.
        cache_dir: where downloads go; for `hf://` it is the Hugging Face hub cache itself.
        tracking_uri: MLflow tracking (and registry) URI for `models:/`; None uses MLflow's default.
        s3_endpoint_url: S3 endpoint; None reads `ANNEAL_S3_ENDPOINT_URL` / `AWS_ENDPOINT_URL`.

    Returns:
        The directory containing `config.json`.
    """
    parsed = uri if isinstance(uri, ModelURI) else parse_model_uri(uri)
    cache_dir = Path(cache_dir)
    if parsed.scheme == "file":
        path = parsed.path.resolve()
        if not path.is_dir():
            raise ModelNotFoundError(f"{parsed.raw}: {path} is not a directory; point it at a saved checkpoint")
        if not any((path / marker).is_file() for marker in CHECKPOINT_MARKERS):
            raise ModelNotFoundError(
                f"{parsed.raw}: {path} has no {CONFIG_FILE}; point it at a checkpoint saved with save_pretrained"
            )
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    if parsed.scheme == "hf":
        return _resolve_hf(parsed, cache_dir)
    if parsed.scheme == "s3":
        return _resolve_s3(parsed, cache_dir, s3_endpoint_url)
    return _resolve_mlflow(parsed, cache_dir, tracking_uri)


def load_tokenizer(
    uri: str | ModelURI,
    *,
    cache_dir: str | Path,
    tracking_uri: str | None = None,
    s3_endpoint_url: str | None = None,
) -> Any:
    """Load the tokenizer saved with a model.

    Args:
        uri: a model URI.
        cache_dir: download cache (see `resolve_model_dir`).
        tracking_uri: MLflow tracking URI for `models:/`.
        s3_endpoint_url: S3 endpoint override.

    Returns:
        The tokenizer (`AutoTokenizer`).
    """
    from transformers import AutoTokenizer

    path = resolve_model_dir(uri, cache_dir=cache_dir, tracking_uri=tracking_uri,
                             s3_endpoint_url=s3_endpoint_url)
    from anneal.modeling.layerwise_llama import register

    register()  # an anneal_llama's config.json names its model_type, which AutoTokenizer reads
    return AutoTokenizer.from_pretrained(str(path))


def load_model(
    uri: str | ModelURI,
    *,
    cache_dir: str | Path,
    tracking_uri: str | None = None,
    dtype: Any = None,
    device: str = "cpu",
    s3_endpoint_url: str | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from a model URI.

    Compressed-tensors (llm-compressor) checkpoints load through the same call.

    Args:
        uri: a model URI.
        cache_dir: download cache (see `resolve_model_dir`).
        tracking_uri: MLflow tracking URI for `models:/`.
        dtype: torch dtype or its name (`"bfloat16"`); None keeps the transformers default.
        device: where to put the model.
        s3_endpoint_url: S3 endpoint override.

    Returns:
        `(model, tokenizer)`, the model in eval mode on `device`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from anneal.modeling.layerwise_llama import register

    register()  # model_type anneal_llama (attention removal, FFN fusion)
    path = resolve_model_dir(uri, cache_dir=cache_dir, tracking_uri=tracking_uri,
                             s3_endpoint_url=s3_endpoint_url)
    kwargs = {} if dtype is None else {"dtype": dtype}
    if not (path / CONFIG_FILE).is_file() and (path / ADAPTER_CONFIG_FILE).is_file():
        # An unmerged LoRA adapter (lora-kd with merge: false): load it onto its base.
        model = load_adapter_model(path, cache_dir=cache_dir, tracking_uri=tracking_uri)
        model.to(device)
        return model, AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    model.to(device)
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(path))


def adapter_base(adapter_dir: str | Path) -> str | None:
    """The `base_model_name_or_path` an adapter directory points at (None if not an adapter)."""
    path = Path(adapter_dir) / ADAPTER_CONFIG_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text()).get("base_model_name_or_path")


def load_adapter_model(adapter_dir: str | Path, *, cache_dir: str | Path, tracking_uri: str | None = None) -> Any:
    """Load a registered (unmerged) LoRA adapter on top of its base, resolving the base URI.

    The base may be any model URI (`models:/`, `runs:/.../base-model`, a path): `runs:/` is
    downloaded through MLflow, the rest through `resolve_model_dir`.

    Args:
        adapter_dir: a directory with `adapter_config.json` and the adapter weights.
        cache_dir: download cache for the base.
        tracking_uri: MLflow tracking URI for `models:/` and `runs:/` bases.

    Returns:
        The peft model in eval mode.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_uri = adapter_base(adapter_dir)
    if not base_uri:
        raise ValueError(f"{adapter_dir}: no {ADAPTER_CONFIG_FILE} with base_model_name_or_path; not an adapter")
    base_dir = resolve_adapter_base(base_uri, cache_dir=cache_dir, tracking_uri=tracking_uri)
    from anneal.modeling.layerwise_llama import register

    register()
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def resolve_adapter_base(base_uri: str, *, cache_dir: str | Path, tracking_uri: str | None = None) -> Path:
    """A local directory for an adapter's base URI (`runs:/` included)."""
    if base_uri.startswith("runs:/"):
        import hashlib

        import mlflow.artifacts

        target = Path(cache_dir) / "runs" / hashlib.sha256(base_uri.encode()).hexdigest()[:16]
        if not (target / CONFIG_FILE).exists():
            target.mkdir(parents=True, exist_ok=True)
            mlflow.artifacts.download_artifacts(artifact_uri=base_uri, dst_path=str(target), tracking_uri=tracking_uri)
        found = [p.parent for p in target.rglob(CONFIG_FILE)]
        if not found:
            raise FileNotFoundError(f"{base_uri}: no {CONFIG_FILE} in the downloaded base")
        return found[0]
    return resolve_model_dir(base_uri, cache_dir=cache_dir, tracking_uri=tracking_uri)
