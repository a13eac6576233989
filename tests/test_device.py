"""The reference cases on an accelerator: OWL_TEST_DEVICE=cuda (bench/gpu_check.sh sets it) runs them
on the GPU; by default they run on the CPU, so CI keeps them working where no GPU is.

  fp32 on the device gives the reference greedy ids; bf16 stays within tolerance of fp32 (logits
  teacher-forced on the reference continuations); a left-padded batch equals the cases one by one;
  the compiled decode step (CUDA graphs on a GPU) gives the eager ids."""
import copy
import os

import pytest
import torch

import owl
from tests.conftest import load_cases

DEVICE = torch.device(os.environ.get("OWL_TEST_DEVICE", "cpu"))
pytestmark = pytest.mark.usefixtures("one_thread")
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.skip("OWL_TEST_DEVICE=cuda but no CUDA GPU is visible", allow_module_level=True)


def case_images(ref, case):
    return [owl.load_image(os.path.join(ref, p)) for p in case["images"]]


@pytest.fixture(scope="module")
def models(owl_model):
    """The tiny reference model on DEVICE in fp32 and in bf16."""
    model, tok = owl_model
    fp32 = copy.deepcopy(model).to(DEVICE).eval()
    return fp32, copy.deepcopy(model).to(DEVICE, torch.bfloat16).eval(), tok


def teacher_forced(model, case, images):
    full = torch.tensor([case["input_ids"] + case["generated_ids"][:-1]], device=DEVICE)
    size = model.config.vision_config.image_size
    px = torch.stack([owl.preprocess_image(im, size) for im in images]).to(DEVICE) if images else None
    with torch.no_grad():
        return model(full, pixel_values=px)[0, len(case["input_ids"]) - 1:].float()  # (16, vocab)


def test_fp32_ids_and_bf16_within_tolerance(ref, models):
    fp32, bf16, tok = models
    for case in load_cases(ref):
        images = case_images(ref, case)
        assert owl.generate(fp32, tok, case["prompt"], images, max_new_tokens=16) == case["generated_ids"]
        a, b = teacher_forced(fp32, case, images), teacher_forced(bf16, case, images)
        # bf16 keeps 8 bits of mantissa: a relative error of a few 1e-3 per op, ~1e-2 at the logits
        err = float((a - b).abs().max()) / float(a.abs().max())
        assert err < 0.05, (case["name"], err)
        top2 = a.topk(2, dim=-1).values  # a greedy step may flip only where fp32's top two nearly tie
        flipped = a.argmax(-1) != b.argmax(-1)
        assert bool((top2[flipped, 0] - top2[flipped, 1] < 0.1).all()), case["name"]


def test_batched_equals_unbatched(ref, models):
    """fp32 (in bf16 a padded batch runs other kernel shapes, and near-ties may flip)."""
    fp32, _, tok = models
    cases = load_cases(ref)
    images = [im for c in cases for im in case_images(ref, c)]
    assert owl.generate(fp32, tok, [c["prompt"] for c in cases], images, max_new_tokens=16) == \
        [c["generated_ids"] for c in cases]


def test_compiled_equals_eager(ref, models):
    fp32, _, tok = models
    cases = load_cases(ref)
    for case in cases[:2]:
        assert owl.generate(fp32, tok, case["prompt"], case_images(ref, case), max_new_tokens=16,
                            compile=True) == case["generated_ids"]
    assert owl.generate(fp32, tok, [c["prompt"] for c in cases], [im for c in cases for im in case_images(ref, c)],
                        max_new_tokens=16, compile=True) == [c["generated_ids"] for c in cases]
