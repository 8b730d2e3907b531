"""Where the reasoning toggle's system message goes: only to a model trained with it.

What a model declares (config.json `anneal_reasoning_toggle`, or Anneal's own chat format), how a
DistillationJob resolves `reasoningToggle` for its student and writes it on the output, and how a
served variant takes (or does not take) the router's toggle prompt. Real tokenizers, real saved
model directories, real `VariantServer`s on the echo engine.
"""

from __future__ import annotations

import json

import pytest

from anneal.data.formats import CHAT_TEMPLATE
from anneal.modeling.chat import (
    REASONING_TOGGLE_KEY,
    declares_reasoning_toggle,
    dir_declares_reasoning_toggle,
    mark_reasoning_toggle,
)
from anneal.modeling.families import FAMILIES

LLAMA3 = FAMILIES["llama3"].chat_template


@pytest.mark.parametrize("config,template,declared", [
    ({}, CHAT_TEMPLATE, True),  # Anneal's own format: made for the built-in task, which carries the toggle
    ({}, None, True),  # no template: rendered in Anneal's format
    ({}, LLAMA3, False),  # a chat model of its own that does not declare it
    ({REASONING_TOGGLE_KEY: True}, LLAMA3, True),  # ... and one Anneal trained with it
    ({REASONING_TOGGLE_KEY: False}, CHAT_TEMPLATE, False),  # Anneal trained without it
])
def test_what_a_model_declares(config, template, declared):
    assert declares_reasoning_toggle(config, template) is declared


def _family_dir(tmp_path, family="llama3"):
    from anneal.modeling.families import save_family_model
    from anneal.modeling.tiny import LlamaShape

    return save_family_model(family, tmp_path / family,
                             LlamaShape(hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64))


def test_a_saved_model_declares_what_its_files_say_and_the_marker_survives_transformers(tmp_path):
    from transformers import AutoConfig

    from anneal.modeling.tiny import LlamaShape, build_llama, save_pretrained
    from anneal.modeling.tokenizer import builtin_tokenizer

    family = _family_dir(tmp_path)
    assert dir_declares_reasoning_toggle(family) is False
    mark_reasoning_toggle(family, True)
    assert dir_declares_reasoning_toggle(family) is True
    # transformers keeps the key through load and save (what every Anneal stage does to a model)
    config = AutoConfig.from_pretrained(str(family))
    assert getattr(config, REASONING_TOGGLE_KEY) is True
    config.save_pretrained(str(tmp_path / "resaved"))
    assert json.loads((tmp_path / "resaved" / "config.json").read_text())[REASONING_TOGGLE_KEY] is True
    tok = builtin_tokenizer(tmp_path / "tok")
    own = save_pretrained(build_llama(LlamaShape(hidden_size=32, layers=1, heads=2), tok), tok, tmp_path / "anneal")
    assert dir_declares_reasoning_toggle(own) is True


@pytest.mark.parametrize("setting,declared,expected", [
    (None, False, False), (None, True, True), (True, False, True), (False, True, False),
])
def test_a_distillation_students_toggle_is_the_setting_else_its_start(tmp_path, setting, declared, expected):
    from anneal.api.distillation import DistillationJobSpec
    from anneal.distill.harness import student_toggle

    init = _family_dir(tmp_path)
    mark_reasoning_toggle(init, declared)
    spec = DistillationJobSpec.model_validate({"method": "sft", "student": {"uri": str(init)},
                                               **({} if setting is None else {"reasoningToggle": setting})})
    assert student_toggle(spec, init) is expected


def test_the_output_declares_its_training_and_an_imported_model_is_copied_only_to_change_it(tmp_path):
    from anneal.distill.recipe import JobContext, _declare_toggle

    work = tmp_path / "work"
    ctx = JobContext(kind="DistillationJob", namespace="ns", name="j", uid="u", tracking_uri="", experiment="e",
                     registered_model_name="m", work_dir=str(work), cache_dir=str(tmp_path / "cache"))
    trained = work / "student-final"
    trained.mkdir(parents=True)
    (trained / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert _declare_toggle(trained, False, ctx) == trained
    assert json.loads((trained / "config.json").read_text())[REASONING_TOGGLE_KEY] is False
    source = _family_dir(tmp_path)  # an import: the user's own directory is never written to
    assert _declare_toggle(source, False, ctx) == source  # declares that already
    out = _declare_toggle(source, True, ctx)
    assert out == work / "student-declared" and dir_declares_reasoning_toggle(out) is True
    assert dir_declares_reasoning_toggle(source) is False and REASONING_TOGGLE_KEY not in json.loads(
        (source / "config.json").read_text())


def test_an_unmerged_lora_adapter_declares_its_toggle_in_adapter_config(tmp_path):
    """lora-kd with merge: false saves an adapter (no config.json): the declaration goes in
    adapter_config.json, and PEFT still reads the adapter's config."""
    from peft import PeftConfig

    from anneal.distill.recipe import JobContext, _declare_toggle

    work = tmp_path / "work"
    ctx = JobContext(kind="DistillationJob", namespace="ns", name="j", uid="u", tracking_uri="", experiment="e",
                     registered_model_name="m", work_dir=str(work), cache_dir=str(tmp_path / "cache"))
    adapter = work / "student-final"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "base_model_name_or_path": "models:/t/1"}))
    assert _declare_toggle(adapter, False, ctx) == adapter
    assert not (adapter / "config.json").exists()
    assert json.loads((adapter / "adapter_config.json").read_text())[REASONING_TOGGLE_KEY] is False
    assert dir_declares_reasoning_toggle(adapter) is False
    mark_reasoning_toggle(adapter, True)
    assert dir_declares_reasoning_toggle(adapter) is True
    assert PeftConfig.from_pretrained(str(adapter)).r == 4


def test_the_api_field_and_its_crd_schema():
    from anneal.api.distillation import DistillationJobSpec
    from anneal.api.service import ModelServiceSpec

    spec = DistillationJobSpec.model_validate({"method": "sft", "student": {"uri": "/m"}, "reasoningToggle": True})
    assert spec.reasoning_toggle is True and spec.to_dict()["reasoningToggle"] is True
    svc = ModelServiceSpec.model_validate({"variants": [{"name": "a", "model": {"uri": "/m"}, "weight": 100,
                                                         "reasoningToggle": False}]})
    assert svc.variants[0].reasoning_toggle is False
    with pytest.raises(ValueError, match="reasoningToggle"):
        DistillationJobSpec.model_validate({"method": "sft", "student": {"uri": "/m"}, "reasoningToggle": "maybe"})


# ------------------------------------------------------------------------ serving


def _echo_server(toggle):
    from anneal.serve.app import VariantArgs, VariantServer

    server = VariantServer(VariantArgs(name="v", engine="echo", reasoning_toggle=toggle).model_dump(mode="json"),
                           "/tmp", None)
    server.reconfigure({"engine": "echo", "model_uri": None, "engine_options": {}})
    return server


@pytest.mark.parametrize("toggle,expected", [
    (None, "<|system|>detailed thinking on<|end|><|system|>Be brief.<|end|><|user|>2+2?<|end|><|assistant|>"),
    (True, "<|system|>detailed thinking on<|end|><|system|>Be brief.<|end|><|user|>2+2?<|end|><|assistant|>"),
    (False, "<|system|>Be brief.<|end|><|user|>2+2?<|end|><|assistant|>"),
])
def test_a_variant_puts_the_routers_toggle_first_only_if_its_model_takes_it(toggle, expected):
    """The router takes the caller's toggle message out and sends the mode's prompt beside the messages; the
    variant decides. The echo engine answers with the prompt it was given."""
    import asyncio

    from anneal.serve.app import VariantRequest
    from anneal.serve.routing import ReasoningPolicy, apply_reasoning

    caller = [{"role": "system", "content": "detailed thinking off"}, {"role": "system", "content": "Be brief."},
              {"role": "user", "content": "2+2?"}]
    first, *rest = apply_reasoning(caller, "on", ReasoningPolicy())
    req = VariantRequest(messages=rest, toggle=first["content"], max_tokens=64)
    result = asyncio.run(_echo_server(toggle).generate(req))
    assert result.text == expected


def test_an_openai_variant_takes_no_toggle_unless_set():
    from anneal.serve.app import engine_takes_toggle

    assert engine_takes_toggle("openai", object(), None) is False
    assert engine_takes_toggle("openai", object(), True) is True
