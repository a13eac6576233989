"""Training at the hardware's rate (issue 23), as library functions train.py calls: regional
compilation of the blocks (owl.model.compile_blocks) gives eager's loss and gradients, with and
without gradient checkpointing, in stage 1 and stage 2 (LoRA); and the --grad-checkpointing auto
rule (owl.memory.grad_checkpointing_rule) turns checkpointing on only when the estimate does not fit.
The compiled runs use inductor on the CPU (about a minute each)."""
import copy

import pytest
import torch
from torch._dynamo.utils import counters

import owl
from owl.lora import apply_lora
from owl.memory import estimate, grad_checkpointing_rule
from owl.model import compile_blocks, lm_loss_sum
from owl.tokenizer import IGNORE
from owl.train.stages import set_trainable, train_mode
from tests.conftest import tiny_batch, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def stage_model(stage, ckpt):
    model = tiny_model()
    for layer in model.abstractor.encoder.layers:  # compiled dropout draws other numbers than eager
        layer.crossattention.attention.dropout = 0.0
    if stage == 2:
        apply_lora(model.language_model, ("q_proj", "v_proj"), r=4, alpha=8, dropout=0.0)
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                torch.nn.init.normal_(p, std=0.1)
    set_trainable(model, stage)
    model.vision_model.grad_checkpointing = model.language_model.grad_checkpointing = ckpt
    train_mode(model, stage)
    return model


def loss_and_grads(model, ids, px, labels):
    loss, n = lm_loss_sum(model(ids, px), labels)
    (loss / n).backward()
    return (loss / n).item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("stage, ckpt", [(1, False), (1, True), (2, False)])
def test_compiled_blocks_give_eager_loss_and_gradients(stage, ckpt):
    ids, px = tiny_batch()
    labels = ids.clone()
    labels[:, :70] = IGNORE  # the loss on the text after the image
    eager = stage_model(stage, ckpt)
    compiled = compile_blocks(copy.deepcopy(eager))
    torch._dynamo.reset()
    counters.clear()
    try:
        want_loss, want = loss_and_grads(eager, ids, px, labels)
        for _ in range(2):  # the second step runs the compiled blocks without compiling
            for p in compiled.parameters():
                p.grad = None
            got_loss, got = loss_and_grads(compiled, ids, px, labels)
        assert counters["stats"]["unique_graphs"] >= 3  # the compiled blocks ran: ViT, abstractor, LLaMA
    finally:
        torch._dynamo.reset()
    assert abs(got_loss - want_loss) < 1e-5 * abs(want_loss)
    assert sorted(got) == sorted(want) and len(want) > 0
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6 * float(want[k].abs().max()) + 1e-9, msg=k)


def test_grad_checkpointing_rule():
    cfg = owl.preset("owl-7b")
    off = estimate(cfg, "stage1", "bf16", 128, 16)["total"]
    on = estimate(cfg, "stage1", "bf16", 128, 16, grad_checkpointing=True)["total"]
    assert on < off
    need, why = grad_checkpointing_rule(cfg, "stage1", 16, 128, "bf16", free_bytes=139 * 2 ** 30)
    assert not need and why.startswith("gradient checkpointing off") and "139.0 GB free" in why
    need, why = grad_checkpointing_rule(cfg, "stage1", 16, 128, "bf16", free_bytes=int(off * 1.05))  # < the 10% margin
    assert need and why.startswith("gradient checkpointing on") and "may not fit" not in why
    need, why = grad_checkpointing_rule(cfg, "stage1", 16, 128, "bf16", free_bytes=int(on * 0.9))
    assert need and "lower the batch size" in why
    need, _ = grad_checkpointing_rule(cfg, "stage2", 4, 2048, "bf16", free_bytes=80 * 2 ** 30, lora_dropout=0.0)
    assert not need  # stage 2 at 4 x 2048 fits an 80 GB card without recomputing
    assert "\n" not in why


def test_train_py_compile_and_checkpointing_flags_give_the_eager_losses(tmp_path, capsys):
    """train.py --compile (regional compilation) and --grad-checkpointing on: the losses of an eager
    run, step for step (stage 2, dropout 0); the run says which checkpointing it chose."""
    import json
    import train
    from tests.test_train import stage2_args
    from tests.conftest import noise_images
    d = tmp_path / "d"
    d.mkdir()
    noise_images(d, 2)
    (d / "sft.jsonl").write_text(json.dumps({"image": ["0.png"], "text": "Human: <image>\nHuman: hi\nAI: a b c"}) + "\n")
    (d / "alpaca.json").write_text(json.dumps([{"instruction": "x", "input": "", "output": "y z"}] * 3))
    runs = {}
    for name, extra in (("eager", ()), ("compiled", ("--compile", "--grad-checkpointing", "on"))):
        train.main(stage2_args(d, tmp_path / name, "--batch-size", "2", "--max-steps", "2", *extra))
        runs[name] = [json.loads(l)["loss"] for l in open(tmp_path / name / "metrics.jsonl")]
    out = capsys.readouterr().out
    assert "gradient checkpointing off (auto, on the CPU)" in out
    assert "gradient checkpointing on (--grad-checkpointing)" in out
    assert runs["compiled"] == pytest.approx(runs["eager"], abs=1e-5)
