"""Tiny Llamas that answer every question with a fixed text: `Answer: 7` (right) or `Answer: 8` (wrong).

A model this small cannot learn the task within a test, so the weights are set by hand: the
attention and MLP outputs are zeroed (each position's hidden state is its token's embedding)
and the lm_head maps each token of a chain to the next one, so greedy decoding after the chat
template's `<|assistant|>` writes the answer and stops. Both are real checkpoints served by the
transformers engine; only their answers differ, so only a quality gate (labelled probes, or
shadow agreement with the stable variant) can tell them apart. The probe set is a jsonl whose
every question's answer is 7. `build` checks its own claim by generating from each saved model.
Shared by the e2e rollout tests and the embedded shadow-gate tests.
"""

from __future__ import annotations

import json
from pathlib import Path

PROBE_ANSWER = 7
QUESTIONS = ["What is 3 + 4?", "What is 10 - 3?", "What is 14 / 2?", "Ana has 2 pens and buys 5. How many now?",
             "What is 1 + 6?", "A box holds 9 eggs; 2 break. How many are whole?"]


def build(root: Path) -> dict[str, str]:
    """Save the two models and the probe set under `root`.

    Returns:
        ``{"right": path, "wrong": path, "probes": jsonl path}``.
    """
    import torch

    from anneal.modeling.tiny import LlamaShape, build_llama, save_pretrained
    from anneal.modeling.tokenizer import builtin_corpus, train_tokenizer
    from anneal.serve.engines import GenerateRequest, TransformersEngine

    root.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(builtin_corpus(20), vocab_size=300)
    probe_set = root / "probes.jsonl"
    probe_set.write_text("".join(json.dumps({"prompt": q, "completion": f"Answer: {PROBE_ANSWER}",
                                             "answer": PROBE_ANSWER}) + "\n" for q in QUESTIONS))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}], tokenize=False,
                                           add_generation_prompt=True)
    start = tokenizer(prompt, add_special_tokens=False)["input_ids"][-1]
    paths = {"probes": str(probe_set)}
    for name, answer in (("right", PROBE_ANSWER), ("wrong", PROBE_ANSWER + 1)):
        text = f"Answer: {answer}"
        chain = [start, *tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        assert len(set(chain)) == len(chain), f"a token repeats in {chain}; the chain would loop"
        model = build_llama(LlamaShape(hidden_size=64, layers=1, heads=1, kv_heads=1, intermediate_size=128),
                            tokenizer, seed=1)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            emb, head = model.model.embed_tokens.weight, model.lm_head.weight
            head.zero_()
            for token, following in zip(chain, chain[1:]):
                h = model.model.norm(emb[token])
                head[following] = 10 * h / h.norm()
        paths[name] = str(save_pretrained(model, tokenizer, root / name))
        engine = TransformersEngine(paths[name], cache_dir=str(root / "cache"), device="cpu")
        for q in QUESTIONS:
            got = engine.generate(GenerateRequest(messages=[{"role": "user", "content": q}], max_tokens=16,
                                                  temperature=0.0)).text
            assert got == text, (name, q, got)
    return paths
