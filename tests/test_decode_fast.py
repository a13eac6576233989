"""Decoding near the bandwidth bound, proven on the CPU (issue 23): the fused q/k/v and gate/up
projections give the unfused logits and keep the checkpoint's names; the sampling draw equals
torch.multinomial's; and the new loop (sampling inside the step, the host a step behind) gives the ids
of the loop it replaced, kept below verbatim as `old_generate_tokens`: greedy, sampled with a seed,
a left-padded batch, the streaming callback's order, EOS in some rows only, a stop from the stream.
The compiled paths (inductor on the CPU, ~20-40 s a graph) are in the last two tests."""
import copy
import os

import pytest
import torch
from torch._dynamo.utils import counters

import owl
from owl.generate import (compiled_decode_step, compiled_encode, compiled_prefill, decode_one_token, encode_batch,
                          generate_tokens, prefill, sample)
from owl.llama import fuse_projections
from owl.lora import apply_lora, merge_lora
from owl.quant import quantize_int8
from tests.conftest import load_cases, tiny_batch, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@torch.inference_mode()
def old_generate_tokens(model, input_ids, image_embeds=None, *, max_new_tokens=64, start_pos=0, pad_mask=None,
                        temperature=0.0, top_k=0, top_p=1.0, generator=None, eos_id=2, stream=None,
                        decode=decode_one_token):
    """owl.generate.generate_tokens before issue 23 (main @ 4d33e39), with its sample's
    torch.multinomial: logits out of the step, sampling outside, one host copy per step."""
    B, T = input_ids.shape
    L = getattr(model, "language_model", model).cache_len()
    position_ids = None
    if pad_mask is not None:
        position_ids = (pad_mask.long().cumsum(-1) - 1).clamp(min=0)
        full = pad_mask.new_ones(B, L)
        full[:, start_pos:start_pos + T] = pad_mask
        pad_mask = full
    logits = prefill(model, input_ids, image_embeds, start_pos, pad_mask, position_ids)
    pos = torch.tensor([start_pos + T], device=input_ids.device)
    out, done = [[] for _ in range(B)], [False] * B
    for step in range(max_new_tokens):
        if temperature <= 0:
            token = logits.argmax(-1)
        else:  # the old sample(): the top-k / top-p filter, then multinomial
            probs = sample_probs(logits, temperature, top_k, top_p)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        for b, t in enumerate(token.tolist()):
            if not done[b]:
                out[b].append(t)
                done[b] = t == eos_id
        if (stream is not None and stream(token)) or all(done) or step == max_new_tokens - 1:
            break
        if position_ids is not None:
            position_ids = position_ids[:, -1:] + 1
        logits = decode(model, token, pos, pad_mask, position_ids)
        pos += 1
    return out


def sample_probs(logits, temperature, top_k, top_p):
    """The distribution sample() draws from: the old sample()'s lines up to its multinomial."""
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.softmax(-1)


def case_images(ref, case):
    return [owl.load_image(os.path.join(ref, p)) for p in case["images"]]


def test_fused_projections_give_the_unfused_logits_and_keep_the_names(tmp_path):
    model, (ids, px) = tiny_model(), tiny_batch()
    fused = fuse_projections(copy.deepcopy(model))
    attn, mlp = fused.language_model.model.layers[0].self_attn, fused.language_model.model.layers[0].mlp
    assert attn.q_proj is None and attn.qkv_proj.weight.shape == (3 * 96, 96)
    assert mlp.gate_proj is None and mlp.gate_up_proj.weight.shape == (2 * 256, 96)
    with torch.no_grad():
        want, got = model(ids, px), fused(ids, px)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # state_dict speaks the checkpoint's names: saving writes the unfused file, loading reads it
    sd, fsd = model.state_dict(), fused.state_dict()
    assert sorted(sd) == sorted(fsd) and all(torch.equal(sd[k], fsd[k]) for k in sd)
    owl.save_model(fused, str(tmp_path / "m"))
    again = fuse_projections(tiny_model(seed=5))  # other weights, fused, then the saved ones loaded in
    owl.weights.load_checked(again, owl.weights.drop_rope_buffers(owl.weights.read_weights(
        owl.weights.weight_files(str(tmp_path / "m")))), "saved")
    with torch.no_grad():
        assert torch.equal(again(ids, px), got)
    assert fuse_projections(fused) is fused  # fusing twice changes nothing


def test_fuse_after_merging_lora_and_before_int8():
    """An adapter is merged first (fusing an unmerged one is an error naming the fix); int8's per-row
    scales do not care which rows share a matrix, so fused int8 == unfused int8."""
    model, (ids, px) = tiny_model(), tiny_batch()
    lora = copy.deepcopy(model)
    apply_lora(lora.language_model, ("q_proj", "v_proj"), r=4, alpha=8, dropout=0.0)
    for n, p in lora.named_parameters():
        if n.endswith("lora_B"):
            torch.nn.init.normal_(p, std=0.5)
    with pytest.raises(ValueError, match="merge LoRA first"):
        fuse_projections(copy.deepcopy(lora))
    with torch.no_grad():
        want = lora(ids, px)
        merge_lora(lora)
        torch.testing.assert_close(fuse_projections(lora)(ids, px), want, rtol=0, atol=1e-5)
        q_plain, q_fused = quantize_int8(copy.deepcopy(model)), quantize_int8(fuse_projections(copy.deepcopy(model)))
        torch.testing.assert_close(q_fused(ids, px), q_plain(ids, px), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="quantize after fusing"):
        fuse_projections(q_plain)


def test_sample_draws_what_multinomial_draws():
    """The exponential race with the generator's noise == torch.multinomial(probs, 1) with the same
    seed, draw for draw, and the generator ends in the same state."""
    logits = torch.randn(6, 50) * 3
    for kw in (dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8)):
        g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
        for _ in range(20):
            want = torch.multinomial(sample_probs(logits, kw["temperature"], kw.get("top_k", 0), kw.get("top_p", 1.0)),
                                     1, generator=g1).squeeze(-1)
            assert torch.equal(sample(logits, generator=g2, **kw), want)
        assert torch.equal(g1.get_state(), g2.get_state())


def run_both(model, ids, embeds=None, pad_mask=None, new=16, seed=None, stop_after=None, **kw):
    """The new and the old loop on the same inputs (stop_after: the stream says stop at that call):
    the same ids, the same stream calls in the same order, the generator left in the same state."""
    got = []
    for loop in (generate_tokens, old_generate_tokens):
        g = None if seed is None else torch.Generator(device=ids.device).manual_seed(seed)
        calls = []

        def stream(t):
            calls.append(t.tolist())
            return len(calls) == stop_after
        model.language_model.setup_caches(ids.shape[0], ids.shape[1] + new)
        try:
            out = loop(model, ids, embeds, max_new_tokens=new, pad_mask=pad_mask, generator=g, stream=stream, **kw)
        finally:
            model.language_model.reset_caches()
        got.append((out, calls, None if g is None else g.get_state()))
    (new_out, new_calls, new_g), (old_out, old_calls, old_g) = got
    assert new_out == old_out and new_calls == old_calls
    assert new_g is None or torch.equal(new_g, old_g)  # the same random stream consumed
    return new_out


def test_new_loop_gives_the_old_ids(ref, owl_model):
    model, tok = owl_model
    cases = load_cases(ref)
    ids, pad_mask, embeds = encode_batch(model, tok, [c["prompt"] for c in cases],
                                         [im for c in cases for im in case_images(ref, c)])
    one, one_mask, one_embeds = encode_batch(model, tok, [cases[3]["prompt"]], case_images(ref, cases[3]))
    # greedy, one prompt and the left-padded batch: the reference ids
    assert run_both(model, one, one_embeds, eos_id=-1) == [cases[3]["generated_ids"]]
    assert run_both(model, ids, embeds, pad_mask, eos_id=-1) == [c["generated_ids"] for c in cases]
    # sampled with a seed (top-k, top-p), batched: draw for draw the same
    for rule in (dict(temperature=1.0), dict(temperature=0.8, top_k=20, top_p=0.9)):
        sampled = run_both(model, ids, embeds, pad_mask, seed=3, eos_id=-1, **rule)
        assert sampled != [c["generated_ids"] for c in cases]  # it did sample
    # EOS in some rows only: those rows end there, the others go on; with sampling too
    eos = cases[1]["generated_ids"][5]
    out = run_both(model, ids, embeds, pad_mask, eos_id=eos)
    assert any(len(o) < 16 for o in out) and any(len(o) == 16 for o in out)
    run_both(model, ids, embeds, pad_mask, seed=4, eos_id=eos, temperature=1.0)
    # EOS in every row: the loop ends early (and drops the step it ran ahead)
    assert run_both(model, one, one_embeds, eos_id=cases[3]["generated_ids"][2]) == [cases[3]["generated_ids"][:3]]
    # a stream that stops at its 4th call, with sampling: the generator is left where the old loop left it
    out = run_both(model, ids, embeds, pad_mask, seed=5, eos_id=-1, temperature=1.0, stop_after=4)
    assert all(len(o) == 4 for o in out)


def test_generate_streams_ints_in_order(ref, owl_model):
    model, tok = owl_model
    case = load_cases(ref)[2]
    seen = []
    out = owl.generate(model, tok, case["prompt"], case_images(ref, case), max_new_tokens=16, stream=seen.append)
    assert out == seen == case["generated_ids"] and all(type(t) is int for t in seen)


def test_compiled_step_with_sampling_equals_eager(ref, owl_model):
    """The compiled step (sampling inside it, fused projections) gives the eager ids, greedy and
    sampled with a seed, and compiles once per sampling rule. (~1 min: inductor on the CPU.)"""
    model, tok = owl_model
    fused = fuse_projections(copy.deepcopy(model))
    case = load_cases(ref)[3]
    images = case_images(ref, case)
    torch._dynamo.reset()
    counters.clear()
    try:
        greedy = owl.generate(fused, tok, case["prompt"], images, max_new_tokens=16, compile=True)
        assert greedy == case["generated_ids"]
        rule = dict(temperature=1.0, top_k=50, seed=7)
        assert owl.generate(fused, tok, case["prompt"], images, max_new_tokens=16, compile=True, **rule) == \
            owl.generate(model, tok, case["prompt"], images, max_new_tokens=16, **rule)
        assert counters["stats"]["unique_graphs"] == 2
        assert compiled_decode_step("cpu") is compiled_decode_step("cpu")
    finally:
        torch._dynamo.reset()


def test_compiled_prefill_and_encoder_equal_eager(ref, owl_model):
    """compile_prefill=True: the compiled ViT + abstractor and the compiled prefill (dynamic shapes) give
    the reference ids for prompts of several lengths, with and without images, without recompiling
    per length. (~1-2 min: inductor on the CPU.)"""
    model, tok = owl_model
    cases = load_cases(ref)
    torch._dynamo.reset()
    counters.clear()
    try:
        for case in cases:
            got = owl.generate(model, tok, case["prompt"], case_images(ref, case), max_new_tokens=4,
                               compile_prefill=True)
            assert got == case["generated_ids"][:4], case["name"]
        assert counters["stats"]["unique_graphs"] == 3  # prefill: one graph for all 4 lengths; encoder: N = 1, 2
        # a later chat turn: the cache holds the first part, the prefill starts at slot 40 (one more graph)
        text = torch.tensor([next(c for c in cases if not c["images"])["input_ids"]])
        got = []
        for pf in (prefill, compiled_prefill("cpu")):
            with torch.inference_mode():
                model.language_model.setup_caches(1, 256)
                try:
                    got.append([generate_tokens(model, text[:, :40], max_new_tokens=3, prefill=pf, eos_id=-1),
                                generate_tokens(model, text[:, 40:], start_pos=40, max_new_tokens=5, prefill=pf,
                                                eos_id=-1)])
                finally:
                    model.language_model.reset_caches()
        assert got[0] == got[1]
        px = torch.randn(1, 3, 56, 56)
        with torch.no_grad():
            torch.testing.assert_close(compiled_encode("cpu")(model, px), model.encode_images(px), rtol=1e-4, atol=1e-4)
        assert callable(compiled_prefill("cpu"))
    finally:
        torch._dynamo.reset()


def test_caches_are_reused_between_calls(owl_model):
    """setup_caches hands out the last caches again when the shape, dtype, device and inference mode
    match (no allocation per call; a CUDA graph replays on the same buffers); anything else, or
    reset_caches(free=True), gets new ones. Generating on reused caches gives the same ids."""
    model, tok = owl_model
    llm = model.language_model
    with torch.inference_mode():
        first = llm.setup_caches(1, 100)
        llm.reset_caches()
        assert llm.setup_caches(1, 200) is first  # 100 and 200 positions: one 256-slot cache
        llm.reset_caches()
        assert llm.setup_caches(2, 200) is not first
        llm.reset_caches(free=True)
        assert llm.spare_caches is None
    outside = llm.setup_caches(2, 200)  # outside inference mode: tensors autograd may see, not inference ones
    assert not outside[0].k.is_inference()
    llm.reset_caches(free=True)
    prompt = owl.build_prompt([(0, "Say something.", None)])
    assert owl.generate(model, tok, prompt, max_new_tokens=12) == owl.generate(model, tok, prompt, max_new_tokens=12)
