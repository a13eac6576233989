"""Parity with the reference implementations (HF transformers 4.31 and the official mPLUG-Owl code),
on the fixtures in tests/fixtures/reference (a copy of shared/reference): fp32, CPU."""
import json
import os

import pytest
import torch

import owl
from owl.generate import prefill, decode_one_token
from tests.conftest import load_cases


def scaled_err(a, b):  # max abs error relative to max(1, max |reference|)
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


def ref_images(ref):
    return [owl.load_image(os.path.join(ref, "images", f)) for f in ("public_0.jpg", "public_1.png", "public_2.jpg")]


def test_preprocess_matches_official(ref, expected):
    px = torch.stack([owl.preprocess_image(im, 56) for im in ref_images(ref)])
    assert px.shape == (3, 3, 56, 56)
    assert float((px - expected["pixel_values"]).abs().max()) <= 2e-5


def test_hf_clip_vision_tower(ref, expected):
    vit = owl.load_vision(os.path.join(ref, "hf_clip"))
    assert vit.config.layer_norm_eps == 1e-5  # CLIP's own eps, so the outputs are CLIP's
    with torch.no_grad():
        out = vit(expected["pixel_values"])
    assert scaled_err(out, expected["clip_post_layernorm"]) <= 1e-4
    assert scaled_err(out[:, 0], expected["clip_pooler_output"]) <= 1e-4


def test_hf_llama_from_shards(ref, expected):
    llm = owl.load_llama(os.path.join(ref, "hf_llama"))
    with torch.no_grad():
        logits = llm(expected["llama_input_ids"])
    assert scaled_err(logits, expected["llama_logits"]) <= 1e-4


def test_official_vision_and_abstractor(owl_model, expected):
    model, _ = owl_model
    with torch.no_grad():
        feats = model.vision_model(expected["pixel_values"])
        tokens = model.encode_images(expected["pixel_values"])
    assert scaled_err(feats, expected["owl_vision_last_hidden_state"]) <= 1e-4
    assert tokens.shape == (3, 65, 96)
    assert scaled_err(tokens, expected["owl_abstractor_out"]) <= 1e-4


def test_encode_prompt_cases(ref, owl_model, expected):
    _, tok = owl_model
    for i, case in enumerate(load_cases(ref)):
        ids = tok.encode_prompt(case["prompt"])
        assert ids == case["input_ids"] == expected[f"case{i}_input_ids"].tolist(), case["name"]
        assert ids.count(-1) == 65 * len(case["images"])
    with open(os.path.join(ref, "tokenizer_cases.json")) as f:
        for case in json.load(f):
            assert tok.encode_prompt(case["text"]) == case["ids"], case["text"]


@pytest.mark.parametrize("i", range(4))
def test_greedy_generation_and_step_logits(ref, owl_model, expected, i):
    model, tok = owl_model
    case = load_cases(ref)[i]
    images = [owl.load_image(os.path.join(ref, p)) for p in case["images"]]
    ids = owl.generate(model, tok, case["prompt"], images, max_new_tokens=16)
    assert ids == case["generated_ids"]
    assert tok.decode(ids) == case["generated_text"]
    # the logits at each step, recomputed without a cache on prompt + generated ids (teacher forcing)
    full = torch.tensor([case["input_ids"] + ids[:-1]])
    px = torch.stack([owl.preprocess_image(im, 56) for im in images]) if images else None
    with torch.no_grad():
        logits = model(full, pixel_values=px)[0, len(case["input_ids"]) - 1:]  # (16, vocab)
    assert scaled_err(logits, expected[f"case{i}_step_logits"]) <= 1e-3


def test_kv_cache_matches_recompute(ref, owl_model):
    """Step logits from prefill + one-token decoding == a full forward without any cache."""
    model, tok = owl_model
    case = load_cases(ref)[3]
    images = [owl.load_image(os.path.join(ref, p)) for p in case["images"]]
    px = torch.stack([owl.preprocess_image(im, 56) for im in images])
    ids = torch.tensor([case["input_ids"] + case["generated_ids"]])
    T = len(case["input_ids"])
    with torch.no_grad():
        full = model(ids, pixel_values=px)[0]  # (T + 16, vocab), no cache
        embeds = model.encode_images(px)
        model.language_model.setup_caches(1, ids.shape[1])
        try:
            steps = [prefill(model, ids[:, :T], embeds)[0]]
            for t in range(T, ids.shape[1]):
                steps.append(decode_one_token(model, ids[:, t], t)[0])
        finally:
            model.language_model.reset_caches()
    cached = torch.stack(steps)  # (17, vocab)
    assert float((cached - full[T - 1:]).abs().max()) < 1e-4
    assert torch.equal(cached.argmax(-1), full[T - 1:].argmax(-1))
