"""The `vllm` engine's spec side: engineOptions, their validation, what reaches the replica, and the
quantization read from a checkpoint. vLLM itself runs in tests/integration/test_serve_vllm.py (it
lives in its own environment, .venv-vllm, so nothing here imports it)."""

from __future__ import annotations

import pytest

from anneal.api.resources import ManifestError, parse_spec


def _vllm(**extra):
    return {"name": "fast", "model": {"uri": "file:///m/w8a16"}, "engine": "vllm", "weight": 100, **extra}


def test_engine_options_become_vllm_engine_arguments_of_the_variant():
    from anneal.serve.app import args_from_spec, build_serve_config, variant_actor_options

    spec = parse_spec("ModelService", {"variants": [_vllm(engineOptions={
        "tensorParallelSize": 1, "gpuMemoryUtilization": 0.85, "kvCacheMemory": "512Mi", "maxModelLen": 2048,
        "dtype": "bfloat16", "enablePrefixCaching": True, "maxNumSeqs": 32, "enforceEager": True})]})
    args = args_from_spec("team_svc", spec, {"fast": "/m/w8a16"}, cache_dir="/c", vllm_python="/srv/.venv-vllm/bin/python")
    v = args.variant("fast")
    assert v.engine_options == {"tensor_parallel_size": 1, "gpu_memory_utilization": 0.85,
                                "kv_cache_memory_bytes": 512 << 20, "max_model_len": 2048, "dtype": "bfloat16",
                                "enable_prefix_caching": True, "max_num_seqs": 32, "enforce_eager": True}
    assert v.max_ongoing_requests == 32  # the replica holds as many requests as vLLM batches
    # the options are the model's (user_config: a change redeploys this variant only), not the app's args
    entry = build_serve_config(args)
    assert entry["deployments"][1]["user_config"]["engine_options"] == v.engine_options
    assert "engine_options" not in entry["args"]["variants"][0]
    # the replica runs in the serving environment; the router does not
    assert variant_actor_options(v)["runtime_env"] == {"py_executable": "/srv/.venv-vllm/bin/python"}


def test_a_vllm_variant_without_options_gets_vllms_defaults_and_a_batching_replica():
    from anneal.serve.app import VLLM_MAX_ONGOING_REQUESTS, args_from_spec, variant_actor_options

    spec = parse_spec("ModelService", {"variants": [_vllm(weight=50), {"name": "hf", "model": {"uri": "/m/a"},
                                                                        "weight": 50}]})
    args = args_from_spec("svc", spec, {}, cache_dir="/c", vllm_python="/p/python")
    fast, hf = args.variant("fast"), args.variant("hf")
    assert fast.engine_options == {} and fast.max_ongoing_requests == VLLM_MAX_ONGOING_REQUESTS
    assert hf.python_executable is None and "runtime_env" not in variant_actor_options(hf)
    assert hf.max_ongoing_requests == 8


@pytest.mark.parametrize("variant,path,rule", [
    ({"name": "a", "model": {"uri": "/m"}, "engineOptions": {"maxNumSeqs": 8}},
     "spec.variants[0].engineOptions", "set engine: vllm"),
    (_vllm(engineOptions={"tensorParallelSize": 2}), "spec.variants[0].engineOptions.tensorParallelSize",
     "resources.gpusPerWorker to 2"),
    (_vllm(engineOptions={"maxNumSeqs": 0}), "spec.variants[0].engineOptions.maxNumSeqs", "greater than or equal to 1"),
    (_vllm(engineOptions={"gpuMemoryUtilization": 1.5}), "spec.variants[0].engineOptions.gpuMemoryUtilization",
     "less than or equal to 1"),
    (_vllm(engineOptions={"dtype": "int8"}), "spec.variants[0].engineOptions.dtype", "'auto'"),
    (_vllm(engineOptions={"quantization": "awq"}), "spec.variants[0].engineOptions.quantization", "unknown field"),
    (_vllm(engineOptions={"maxModelLen": 8}), "spec.variants[0].engineOptions.maxModelLen", "16"),
    (_vllm(engineOptions={"kvCacheMemory": "lots"}), "spec.variants[0].engineOptions.kvCacheMemory", "lots"),
])
def test_engine_option_errors_name_the_field(variant, path, rule):
    with pytest.raises(ManifestError) as e:
        parse_spec("ModelService", {"variants": [{**variant, "weight": 100}]})
    assert path in str(e.value) and rule in str(e.value), str(e.value)


def test_tensor_parallel_over_as_many_gpus_as_the_replica_has_is_accepted():
    spec = parse_spec("ModelService", {"variants": [_vllm(engineOptions={"tensorParallelSize": 2},
                                                          resources={"gpusPerWorker": 2})]})
    assert spec.variants[0].engine_options.tensor_parallel_size == 2


def test_the_crd_carries_the_engine_option_rules_for_the_api_server():
    from anneal.api.crd import build_crd
    from anneal.api.resources import KINDS

    variant = build_crd(KINDS["ModelService"])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"]["variants"]["items"]
    assert set(variant["properties"]["engineOptions"]["properties"]) == {
        "tensorParallelSize", "gpuMemoryUtilization", "kvCacheMemory", "maxModelLen", "dtype", "enablePrefixCaching",
        "maxNumSeqs", "enforceEager"}
    rules = " ".join(r["rule"] for r in variant["x-kubernetes-validations"])
    assert "self.engine == 'vllm'" in rules and "double(self.engineOptions.tensorParallelSize)" in rules


def _compressed(scheme: str) -> dict:
    """config.json's quantization_config as llm-compressor writes it for the API's scheme (the repo's own
    scheme definitions: `anneal.compress.quantization.scheme_args`)."""
    from anneal.compress.quantization import scheme_args

    return {"model_type": "llama", "quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], **scheme_args(scheme, 32)}}}}


@pytest.mark.parametrize("scheme", ["W8A16", "W4A16", "W8A8", "FP8"])
def test_the_quantization_is_read_from_the_checkpoint(scheme):
    from anneal.serve.engines import checkpoint_quantization

    assert checkpoint_quantization(_compressed(scheme)) == scheme


@pytest.mark.parametrize("config,expected", [
    ({"model_type": "llama"}, None),
    ({"quantization_config": {"quant_method": "awq", "bits": 4}}, "awq"),
    ({"quantization_config": {"quant_method": "fp8"}}, "fp8"),
])
def test_other_checkpoints_name_their_method_or_none(config, expected):
    from anneal.serve.engines import checkpoint_quantization

    assert checkpoint_quantization(config) == expected


def test_the_vllm_python_is_the_checkouts_serving_env_or_the_configured_one(tmp_path):
    from anneal.local.service import ServiceError, vllm_python

    with_vllm = parse_spec("ModelService", {"variants": [_vllm()]})
    without = parse_spec("ModelService", {"variants": [{"name": "a", "model": {"uri": "/m"}, "weight": 100}]})
    assert vllm_python(without, None, tmp_path) is None  # no vllm variant: nothing to find
    python = tmp_path / ".venv-vllm" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("")
    assert vllm_python(with_vllm, None, tmp_path) == str(python)
    assert vllm_python(with_vllm, str(python), tmp_path / "elsewhere") == str(python)
    with pytest.raises(ServiceError, match="ANNEAL_RAY_VLLM_PYTHON=/nope/python: no such file"):
        vllm_python(with_vllm, "/nope/python", tmp_path)


def test_without_a_serving_env_a_vllm_variant_says_what_to_run(tmp_path):
    import importlib.util

    from anneal.local.service import ServiceError, vllm_python

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed in this Python: Ray's own Python serves it")
    with pytest.raises(ServiceError, match="run scripts/setup.sh"):
        vllm_python(parse_spec("ModelService", {"variants": [_vllm()]}), None, tmp_path)


def test_vllm_engine_refuses_unknown_options_before_importing_vllm():
    from anneal.serve.engines import EngineError, make_engine

    with pytest.raises(EngineError, match="unknown engine option.*quantization"):
        make_engine("vllm", "/m", cache_dir="/c", tracking_uri=None, options={"quantization": "awq"})


@pytest.mark.parametrize("rank,engine_rank", [(1, 1), (4, 8), (8, 8), (9, 16), (16, 16), (300, 320), (512, 512)])
def test_vllm_is_sized_for_the_adapters_lora_rank(rank, engine_rank):
    from anneal.serve.engines import vllm_lora_rank

    assert vllm_lora_rank(rank) == engine_rank


def test_an_adapter_above_vllms_largest_rank_says_what_to_do():
    from anneal.serve.engines import EngineError, vllm_lora_rank

    with pytest.raises(EngineError, match="rank 1024 is above vLLM's largest \\(512\\).*merge: true"):
        vllm_lora_rank(1024)
