"""train.py --stage 2 --full-finetune: what trains (the LLM and the abstractor, not the ViT, no LoRA), and
FSDP2 under torchrun (gloo, CPU) against one process: two processes with batch 1 (gradient checkpointing
on, text-only micro-batches given a dummy image) equal one process with batch 2 after 2 steps (the
gathered checkpoint) and after a --resume to 3 (the exported model, which owl.load_model reads), to
5e-5; the held-out loss too; and one process resumes exactly."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import owl
import train
from owl.train.config import parse
from owl.train.state import read_state
from tests.test_train import OWL, assert_same, data, run_cli, stage2_args  # noqa: F401 (data: the fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
FULL = ("--full-finetune", "--grad-accum", "2", "--eval-every", "3", "--eval-examples", "3")


def full_args(data, out, *extra):
    return stage2_args(data, out, *FULL, *extra)


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    """3 steps straight, and 2 steps + --resume to 3, batch 2 x accumulation 2, in this process."""
    straight, split = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("split")
    train.main(full_args(data, straight, "--batch-size", "2"))
    train.main(full_args(data, split, "--batch-size", "2", "--save-every", "2", "--stop-at", "2"))
    step2 = {k: v.clone() for k, v in load_file(split / "checkpoint" / "trainable.safetensors").items()}
    train.main(full_args(data, split, "--batch-size", "2", "--save-every", "2", "--resume"))
    return straight, split, step2


def losses(out, key="loss"):
    return [r[key] for r in map(json.loads, open(out / "metrics.jsonl")) if key in r]


def test_full_finetune_trains_the_llm_and_the_abstractor_and_resumes_exactly(one_process):
    straight, split, step2 = one_process
    model, _ = owl.load_model(str(straight))
    base, _ = owl.load_model(OWL)
    after, before = model.state_dict(), base.state_dict()
    moved = {k.split(".")[0] for k in before if not torch.equal(after[k], before[k])}
    assert moved == {"language_model", "abstractor", "query_tokens"}  # the ViT bit for bit as it was
    assert sum(not torch.equal(after[k], before[k]) for k in before if k.startswith("language_model.")) \
        == len([k for k in before if k.startswith("language_model.")])  # every LLM tensor trained
    assert not (straight / "adapter.safetensors").exists() and not any("lora_" in k for k in after)
    trained = load_file(straight / "checkpoint" / "trainable.safetensors")
    assert set(trained) == {k for k in before if not k.startswith("vision_model.")}
    assert len(read_state(straight / "checkpoint")["optimizer"]["state"]) == len(trained)
    assert_same(straight / "model.safetensors", split / "model.safetensors", 1e-6)
    np.testing.assert_allclose(losses(straight), losses(split), atol=1e-6)
    assert len(losses(straight, "eval_loss")) == 1
    with pytest.raises(train.TrainError, match="--full-finetune with --stage 2"):
        parse(["--stage", "1", "--full-finetune"])


def test_two_processes_with_fsdp_equal_one_process(data, one_process, tmp_path):
    straight, split, step2 = one_process
    out = tmp_path / "fsdp"
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py"]
    common = ("--batch-size", "1", "--grad-checkpointing", "on", "--save-every", "2")
    r = run_cli([*launch, *full_args(data, out, *common, "--stop-at", "2")])
    assert r.returncode == 0, r.stderr[-3000:]
    gathered = load_file(out / "checkpoint" / "trainable.safetensors")  # the whole tensors, one file
    assert gathered.keys() == step2.keys()
    for k in step2:
        torch.testing.assert_close(gathered[k], step2[k], atol=5e-5, rtol=0, msg=k)
    assert len(read_state(out / "checkpoint")["rng"]) == 2
    r = run_cli([*launch, *full_args(data, out, *common, "--resume")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same(straight / "model.safetensors", out / "model.safetensors", 5e-5)
    np.testing.assert_allclose(losses(straight), losses(out), atol=5e-5)
    np.testing.assert_allclose(losses(straight, "eval_loss"), losses(out, "eval_loss"), atol=5e-5)  # 3 over 2 ranks
    model, tok = owl.load_model(str(out))  # the export, in the official layout
    prompt = owl.build_prompt([(0, "say 1", None)])
    assert owl.generate(model, tok, prompt, max_new_tokens=4) == owl.generate(
        owl.load_model(str(straight))[0], tok, prompt, max_new_tokens=4)
