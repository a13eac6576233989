"""Issue 23's paths on an accelerator: OWL_TEST_DEVICE=cuda (bench/gpu_check.py's suite section) runs
them on the GPU, where CUDA graphs, the non-blocking host copies and torch's CUDA int4 kernel only
exist; by default they run on the CPU. The tiny reference model, fp32:
  fused projections == unfused logits; the new loop (the host a step behind, sampling in the step)
  == the old loop's ids, greedy and sampled with a seed; int8 and int4 layers == their dequantized
  weights (a wrong int4 packing shows here as an error of order 1); compiled prefill + ViT == the
  reference ids; the compiled step with sampling == the eager one."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F

import owl
from owl.generate import encode_batch
from owl.llama import fuse_projections
from owl.quant import Int4Linear, Int8Linear, int4_dequantize, quantize_weight_int4
from tests.conftest import load_cases
from tests.test_decode_fast import run_both

DEVICE = torch.device(os.environ.get("OWL_TEST_DEVICE", "cpu"))
pytestmark = pytest.mark.usefixtures("one_thread")
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.skip("OWL_TEST_DEVICE=cuda but no CUDA GPU is visible", allow_module_level=True)


def case_images(ref, case):
    return [owl.load_image(os.path.join(ref, p)) for p in case["images"]]


@pytest.fixture(scope="module")
def model(owl_model):
    return copy.deepcopy(owl_model[0]).to(DEVICE).eval(), owl_model[1]


def test_fused_equals_unfused_and_the_new_loop_the_old(ref, model):
    model, tok = model
    fused = fuse_projections(copy.deepcopy(model))
    cases = load_cases(ref)
    ids, pad_mask, embeds = encode_batch(fused, tok, [c["prompt"] for c in cases],
                                         [im for c in cases for im in case_images(ref, c)])
    with torch.no_grad():
        torch.testing.assert_close(fused(ids, image_embeds=embeds), model(ids, image_embeds=embeds), rtol=1e-4, atol=1e-4)
    assert run_both(fused, ids, embeds, pad_mask, eos_id=-1) == [c["generated_ids"] for c in cases]
    run_both(fused, ids, embeds, pad_mask, seed=3, eos_id=-1, temperature=1.0, top_k=50)  # same draws as multinomial
    run_both(fused, ids, embeds, pad_mask, seed=5, eos_id=-1, temperature=1.0, stop_after=4)  # a stop: rng put back


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_and_int4_layers_multiply_by_their_dequantized_weights(dtype):
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96, bias=False).to(DEVICE, dtype)  # in: a multiple of 32, out: of 8 (CUDA's int4)
    x = torch.randn(3, 256, device=DEVICE, dtype=dtype)
    q8, q4 = Int8Linear.from_linear(lin), Int4Linear.from_linear(lin, 32)
    deq8 = q8.weight.float() * q8.scales.float()[:, None]
    deq4 = int4_dequantize(*quantize_weight_int4(lin.weight, 32))
    for q, deq in ((q8, deq8), (q4, deq4)):
        for rows in (x[:1], x):
            want = F.linear(rows.float(), deq)
            err = float((q(rows).float() - want).norm() / want.norm())
            assert err < 2e-2, (type(q).__name__, err)  # bf16 activations (int4 always, int8 on the CPU)


def test_compiled_prefill_and_step_equal_eager(ref, model):
    model, tok = model
    fused = fuse_projections(copy.deepcopy(model))
    torch._dynamo.reset()
    try:
        for case in load_cases(ref):
            assert owl.generate(fused, tok, case["prompt"], case_images(ref, case), max_new_tokens=8,
                                compile=True, compile_prefill=True) == case["generated_ids"][:8], case["name"]
        case = load_cases(ref)[3]
        rule = dict(temperature=1.0, top_k=50, seed=7, max_new_tokens=16)
        assert owl.generate(fused, tok, case["prompt"], case_images(ref, case), compile=True, **rule) == \
            owl.generate(fused, tok, case["prompt"], case_images(ref, case), **rule)
    finally:
        torch._dynamo.reset()
