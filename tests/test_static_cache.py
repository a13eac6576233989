"""The static KV cache (owl/llama.py: full length, masked) and the compiled decode step
(owl/generate.py: torch.compile, fullgraph): compiled ids == eager ids == the reference greedy ids,
for single prompts and a left-padded batch; the step compiles once for a whole generation and
serves prompts of other lengths without recompiling; slots not written yet never leak in; the
chat session's one compiled step serves every turn. Compilation runs inductor on the CPU
(20-30 s per graph here), so the model is the tiny reference one and generations are short."""
import os

import pytest
import torch
from torch._dynamo.utils import counters

import owl
from owl.chat.session import ChatSession
from owl.generate import compiled_decode_step, encode_batch, generate_tokens
from owl.llama import cache_length
from tests.conftest import load_cases

pytestmark = pytest.mark.usefixtures("one_thread")


def case_images(ref, case):
    return [owl.load_image(os.path.join(ref, p)) for p in case["images"]]


def graphs():
    """Graphs dynamo has compiled since the last reset (a recompile is one more)."""
    return counters["stats"]["unique_graphs"]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_cache_length_buckets():
    assert cache_length(84 + 16, 512) == cache_length(233 + 16, 512) == 256  # one shape for both prompts
    assert cache_length(257, 512) == 512 and cache_length(256, 512) == 256
    assert cache_length(2000, 2048) == 2048  # capped at the context ...
    assert cache_length(600, 512) == 600  # ... but never shorter than asked


def test_compiled_equals_eager_and_compiles_once(ref, owl_model, fresh_dynamo):
    """The four reference cases (84..233 prompt tokens, 0-2 images) one by one, then as one batch,
    through generate(compile=True): the reference ids (which eager generation gives: test_parity),
    one graph for all four single prompts, and one more for the padded batch. fullgraph=True makes a
    graph break an error."""
    model, tok = owl_model
    cases = load_cases(ref)
    assert len({len(c["input_ids"]) for c in cases}) == 4  # four prompt lengths, one cache length
    for i, case in enumerate(cases):
        got = owl.generate(model, tok, case["prompt"], case_images(ref, case), max_new_tokens=16, compile=True)
        assert got == case["generated_ids"], case["name"]
        assert graphs() == 1, f"case {i} recompiled the decode step"
    assert counters["stats"]["calls_captured"] > 0  # the counter does count this compiler's graphs
    batched = owl.generate(model, tok, [c["prompt"] for c in cases],
                           [im for c in cases for im in case_images(ref, c)], max_new_tokens=16, compile=True)
    assert batched == [c["generated_ids"] for c in cases]
    assert graphs() == 2  # padding (a (B, L) mask input) is a second graph, compiled once


def test_unwritten_slots_never_leak(ref, owl_model):
    """Large random values in every cache slot before generating: the prompt, the images and the
    decoded tokens overwrite the slots they use, the mask hides the rest, and a left-padded batch of
    the reference cases still gives the reference greedy ids."""
    model, tok = owl_model
    cases = load_cases(ref)
    ids, pad_mask, embeds = encode_batch(model, tok, [c["prompt"] for c in cases],
                                         [im for c in cases for im in case_images(ref, c)])
    caches = model.language_model.setup_caches(len(cases), ids.shape[1] + 16)
    try:
        g = torch.Generator().manual_seed(0)
        for c in caches:
            c.k.copy_(10 * torch.randn(c.k.shape, generator=g))
            c.v.copy_(10 * torch.randn(c.v.shape, generator=g))
        out = generate_tokens(model, ids, embeds, max_new_tokens=16, pad_mask=pad_mask, eos_id=-1)
    finally:
        model.language_model.reset_caches()
    assert out == [c["generated_ids"] for c in cases]


def test_masked_slots_do_not_count_and_visible_ones_do(owl_model):
    """One decode step after a 39-token prefill, at the level of the logits: garbage in the slots
    after it changes nothing; the same garbage in a slot it may see (slot 10) changes the logits."""
    llm = owl_model[0].language_model
    ids = torch.randint(3, 1000, (2, 40), generator=torch.Generator().manual_seed(1))

    def step_logits(fill_slots):
        caches = llm.setup_caches(2, 64)
        try:
            with torch.inference_mode():
                llm(ids[:, :39])  # prefill: slots 0..38
                for c in caches:
                    c.k[:, :, fill_slots] = 10.0
                    c.v[:, :, fill_slots] = -10.0
                return llm(ids[:, 39:], start_pos=torch.tensor([39]))[:, -1]  # (2, vocab), at slot 39
        finally:
            llm.reset_caches()
    clean = step_logits(slice(0, 0))
    torch.testing.assert_close(step_logits(slice(40, None)), clean, rtol=0, atol=1e-5)
    assert float((step_logits(slice(10, 11)) - clean).abs().max()) > 0.1


def test_overflow_is_an_error(owl_model):
    model, _ = owl_model
    llm = model.language_model
    llm.setup_caches(1, 256)
    try:
        with pytest.raises(ValueError, match="holds 256 positions"):
            generate_tokens(model, torch.tensor([[1] * 250]), max_new_tokens=8)
        with pytest.raises(ValueError, match="cache overflow"):
            llm(torch.tensor([[1] * 10]), start_pos=250)
    finally:
        llm.reset_caches()


def test_chat_session_compiles_once_for_every_turn(owl_model, fresh_dynamo):
    """ChatSession(compile=True) keeps one static cache of the whole context: its answers equal the
    eager session's, turn after turn (the cache reused), and nothing recompiles after the second turn:
    4 graphs in all (the decode step 1, the ViT + abstractor 1, the prefill 2: from position 0 at the
    first turn, from a tensor start at every later one)."""
    model, tok = owl_model
    ref_dir = os.path.dirname(os.path.dirname(__file__))
    img = os.path.join(ref_dir, "tests", "fixtures", "reference", "images", "public_0.jpg")
    answers = {}
    for compile in (False, True):
        s = ChatSession(model, tok, max_new_tokens=8, compile=compile)
        try:
            s.add_image(img)
            a1 = s.ask("What is in this picture?")
            a2 = s.ask("And the colours?")
            a3 = s.ask("Anything else?")
        finally:
            s.close()
        assert a2.stats["reused_tokens"] > 0  # the second turn ran on the cache of the first
        answers[compile] = (a1.ids, a2.ids, a3.ids)
    assert answers[True] == answers[False]
    assert graphs() == 4
    assert compiled_decode_step("cpu") is compiled_decode_step("cpu")  # one compiled function
