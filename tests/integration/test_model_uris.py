"""Integration tests: model URIs resolved and loaded from real local stores (paths, HF cache, MLflow, S3)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from anneal.modeling.tiny import LlamaShape, build_llama, save_pretrained
from anneal.modeling.tokenizer import builtin_tokenizer
from anneal.modeling.uris import ModelNotFoundError, load_model, load_tokenizer, resolve_model_dir

pytestmark = pytest.mark.integration

SHAPE = LlamaShape(hidden_size=32, layers=2, heads=4, kv_heads=2, intermediate_size=64, max_position_embeddings=128)
SNAPSHOT_SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model saved as a Hugging Face checkpoint, and its logits on a fixed input."""
    tokenizer = builtin_tokenizer(tmp_path_factory.mktemp("tok"))
    model = build_llama(SHAPE, tokenizer, seed=3).eval()
    path = save_pretrained(model, tokenizer, tmp_path_factory.mktemp("ckpt") / "tiny")
    ids = tokenizer("<|user|>Ana has 5 apples.<|end|><|assistant|>", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return path, ids, logits


def _assert_same_model(model, tokenizer, saved):
    path, ids, logits = saved
    assert tokenizer.eos_token == "<|end|>" and tokenizer.chat_template
    assert tokenizer("<|user|>Ana has 5 apples.<|end|><|assistant|>", return_tensors="pt")["input_ids"].equal(ids)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, logits)


@pytest.mark.parametrize("form", ["absolute", "file-uri", "relative"])
def test_load_from_path(saved, tmp_path, monkeypatch, form):
    path = saved[0]
    if form == "relative":
        monkeypatch.chdir(path.parent)
        uri = path.name
    else:
        uri = path.as_uri() if form == "file-uri" else str(path)
    assert resolve_model_dir(uri, cache_dir=tmp_path) == path.resolve()
    _assert_same_model(*load_model(uri, cache_dir=tmp_path), saved)
    assert not any(tmp_path.iterdir())  # local paths are used in place, never copied


def test_path_without_checkpoint(tmp_path):
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        resolve_model_dir(str(tmp_path), cache_dir=tmp_path / "cache")
    with pytest.raises(ModelNotFoundError, match="is not a directory"):
        resolve_model_dir(str(tmp_path / "missing"), cache_dir=tmp_path / "cache")


@pytest.fixture
def hf_cache(saved, tmp_path, monkeypatch):
    """A Hugging Face hub cache holding `acme/tiny` (branch main, tag v1), used offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    repo = tmp_path / "hub" / "models--acme--tiny"
    shutil.copytree(saved[0], repo / "snapshots" / SNAPSHOT_SHA)
    (repo / "refs").mkdir()
    for ref in ("main", "v1"):
        (repo / "refs" / ref).write_text(SNAPSHOT_SHA)
    return tmp_path / "hub"


@pytest.mark.parametrize("uri", ["hf://acme/tiny", "hf://acme/tiny@v1", f"hf://acme/tiny@{SNAPSHOT_SHA}"])
def test_load_from_hf_cache_offline(saved, hf_cache, uri):
    assert resolve_model_dir(uri, cache_dir=hf_cache).name == SNAPSHOT_SHA
    _assert_same_model(*load_model(uri, cache_dir=hf_cache), saved)


@pytest.mark.parametrize("uri", ["hf://acme/missing", "hf://acme/tiny@v9"])
def test_hf_offline_miss_names_the_fix(hf_cache, uri):
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE is set"):
        resolve_model_dir(uri, cache_dir=hf_cache)


@pytest.fixture(scope="module")
def mlflow_registry(saved, tmp_path_factory):
    """A real MLflow SQLite store with `TinyStudent` v1 (aliased champion) and v2 (challenger)."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    experiment_id = client.create_experiment("uris", artifact_location=(root / "artifacts").as_uri())
    client.create_registered_model("TinyStudent")
    for version, alias in ((1, "champion"), (2, "challenger")):
        run = client.create_run(experiment_id)
        client.log_artifacts(run.info.run_id, str(saved[0]), artifact_path="model")
        client.set_terminated(run.info.run_id)
        mv = client.create_model_version("TinyStudent", source=f"{run.info.artifact_uri}/model",
                                         run_id=run.info.run_id)
        assert int(mv.version) == version
        client.set_registered_model_alias("TinyStudent", alias, mv.version)
    return tracking_uri, client


@pytest.mark.parametrize(
    ("uri", "version"),
    [("models:/TinyStudent/1", "1"), ("models:/TinyStudent/2", "2"), ("models:/TinyStudent@champion", "1"),
     ("models:/TinyStudent@challenger", "2")],
)
def test_load_from_mlflow_registry(saved, mlflow_registry, tmp_path, uri, version):
    tracking_uri, _ = mlflow_registry
    path = resolve_model_dir(uri, cache_dir=tmp_path, tracking_uri=tracking_uri)
    assert path.parent.name == version  # cached per immutable version
    model, tokenizer = load_model(uri, cache_dir=tmp_path, tracking_uri=tracking_uri)
    _assert_same_model(model, tokenizer, saved)


def test_mlflow_alias_follows_moves(mlflow_registry, tmp_path):
    tracking_uri, client = mlflow_registry
    client.set_registered_model_alias("TinyStudent", "canary", "1")
    assert resolve_model_dir("models:/TinyStudent@canary", cache_dir=tmp_path, tracking_uri=tracking_uri).parent.name == "1"
    client.set_registered_model_alias("TinyStudent", "canary", "2")
    assert resolve_model_dir("models:/TinyStudent@canary", cache_dir=tmp_path, tracking_uri=tracking_uri).parent.name == "2"


@pytest.mark.parametrize(
    ("uri", "message"),
    [("models:/TinyStudent/9", "could not download version 9"),
     ("models:/TinyStudent@nope", "could not resolve alias 'nope'"),
     ("models:/Unknown/1", "registered model 'Unknown'")],
)
def test_mlflow_missing(mlflow_registry, tmp_path, uri, message):
    with pytest.raises(ModelNotFoundError, match=message):
        resolve_model_dir(uri, cache_dir=tmp_path, tracking_uri=mlflow_registry[0])


@pytest.fixture(scope="module")
def s3_server():
    """A local S3-compatible endpoint on loopback.

    moto's server stands in for S3 because no real S3 is reachable here; the code under test
    talks to it over HTTP with boto3 exactly as it would to S3 or MinIO.
    """
    moto_server = pytest.importorskip(
        "moto.server", reason="moto[server] is not installed; it provides the local S3 endpoint for this test"
    )
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    import boto3

    for var, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "ANNEAL_S3_ENDPOINT_URL": s3_server}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    client = boto3.client("s3", endpoint_url=s3_server)
    if "models" not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket="models")
    return client


def _upload_dir(client, path: Path, bucket: str, prefix: str) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            client.upload_file(str(file), bucket, f"{prefix}/{file.relative_to(path).as_posix()}")


@pytest.mark.parametrize("nested", [False, True])
def test_load_from_s3(saved, s3, tmp_path, nested):
    prefix = f"runs/{'nested' if nested else 'flat'}/tiny"  # the server outlives one test
    _upload_dir(s3, saved[0], "models", f"{prefix}/model" if nested else prefix)
    s3.put_object(Bucket="models", Key=f"{prefix}-other/config.json", Body=b"{}")  # shares the prefix text
    uri = f"s3://models/{prefix}"
    path = resolve_model_dir(uri, cache_dir=tmp_path)
    assert (path / "config.json").is_file() and (path.name == "model") is nested
    assert not (path.parent / "tiny-other").exists()
    _assert_same_model(*load_model(uri, cache_dir=tmp_path), saved)
    assert load_tokenizer(uri, cache_dir=tmp_path).eos_token == "<|end|>"


def test_s3_empty_prefix(s3, tmp_path):
    with pytest.raises(ModelNotFoundError, match="no objects under s3://models/nothing/here/"):
        resolve_model_dir("s3://models/nothing/here", cache_dir=tmp_path)
    with pytest.raises(ModelNotFoundError, match="could not download from S3"):
        resolve_model_dir("s3://no-such-bucket/x", cache_dir=tmp_path)


def test_dataset_jsonl_from_s3(s3):
    from anneal.data.datasets import DatasetError, load_samples

    records = [{"prompt": "What is 2 + 2?", "completion": "Answer: 4", "answer": 4}, {"text": "hello"}]
    s3.put_object(Bucket="models", Key="data/train.jsonl", Body="\n".join(map(json.dumps, records)).encode())
    samples = load_samples("s3://models/data/train.jsonl", format="prompt-completion")
    assert [(s.prompt, s.completion, s.answer) for s in samples] == [
        ("What is 2 + 2?", "Answer: 4", 4), ("", "hello", None)]
    with pytest.raises(DatasetError, match="s3://models/data/missing.jsonl: could not read the object"):
        load_samples("s3://models/data/missing.jsonl")
