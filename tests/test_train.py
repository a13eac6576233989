"""train.py: batch == accumulation == two processes (gloo), exact resume, stage freezing, the adapter
merged later == the merged output, outputs that load and generate, and bad input. All on the tiny
fixtures (stage 1 from tests/fixtures/reference/hf_clip + hf_llama, stage 2 from .../mplug_owl)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import owl
import train
from owl.convert import main as convert_main
from owl.model import lm_loss_sum
from owl.train.batches import OwlDataset, collate
from owl.train.data import DataError, load_examples
from owl.train.config import TrainError, parse
from owl.train.state import read_state, write_state
from tests.conftest import REF, ROOT, noise_images, one_line, run_script

OWL, CLIP, LLAMA = (os.path.join(REF, d) for d in ("mplug_owl", "hf_clip", "hf_llama"))
S = owl.SYSTEM
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Small images; captions; official SFT (multi-turn, 1-2 images); Alpaca (text only)."""
    d = tmp_path_factory.mktemp("data")
    noise_images(d)
    with open(d / "caps.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"image": f"{i % 6}.png", "caption": f"picture {i} of noise"}) + "\n")
    with open(d / "sft.jsonl", "w") as f:
        for i in range(4):
            imgs = [f"{i}.png"] + ([f"{i + 1}.png"] if i % 2 else [])
            text = S + "Human: <image>\n" * len(imgs) + f"Human: what is {i}?\nAI: it is {i}.\nHuman: why?\nAI: because.\n"
            f.write(json.dumps({"image": imgs, "text": text}) + "\n")
    json.dump([{"instruction": f"say {i}", "input": "", "output": f"{i} said"} for i in range(4)],
              open(d / "alpaca.json", "w"))
    return d


def stage2_args(data, out, *extra):
    return ["--stage", "2", "--init", OWL, "--data", f"{data}/sft.jsonl,{data}/alpaca.json", "--out", str(out),
            "--max-steps", "3", "--eval-every", "0", "--save-every", "0", "--dropout", "0", "--lr", "1e-3",
            "--warmup-steps", "1", *extra]


def stage1_args(data, out, *extra):
    return ["--stage", "1", "--vision-init", CLIP, "--llm-init", LLAMA, "--data", f"{data}/caps.jsonl",
            "--out", str(out), "--num-queries", "8", "--abstractor-layers", "1", "--abstractor-heads", "2",
            "--abstractor-mlp", "64", "--max-steps", "3", "--eval-every", "0", "--save-every", "0",
            "--dropout", "0", "--lr", "1e-3", "--warmup-steps", "1", *extra]


def assert_same(a, b, atol):
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        # The abstractor's key bias adds the same q.b to every attention logit of a query, and softmax
        # ignores that: its true gradient is 0, what it gets is rounding noise, and Adam scales noise up
        # to lr-sized steps. So it can only agree to about the lr (1e-3 here); everything else to atol.
        tol = 2e-3 if k.endswith("attention.key.bias") else atol
        torch.testing.assert_close(ta[k], tb[k], atol=tol, rtol=0, msg=k)


def run_cli(args, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def s2_batch2(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("s2b2")
    assert train.main(stage2_args(data, out, "--batch-size", "2")) == str(out)
    return out


# ----------------------------------------------------------------------------- equivalences

def test_stage2_batch_equals_accumulation_equals_two_processes(data, s2_batch2, tmp_path):
    acc = tmp_path / "acc"
    train.main(stage2_args(data, acc, "--batch-size", "1", "--grad-accum", "2"))
    ddp = tmp_path / "ddp"
    r = run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
                 *stage2_args(data, ddp, "--batch-size", "1")])
    assert r.returncode == 0, r.stderr[-3000:]
    ref = load_file(s2_batch2 / "adapter.safetensors")
    assert any(k.endswith("lora_B") and v.abs().max() > 1e-4 for k, v in ref.items())  # it trained
    assert_same(s2_batch2 / "adapter.safetensors", acc / "adapter.safetensors", 1e-5)
    assert_same(s2_batch2 / "adapter.safetensors", ddp / "adapter.safetensors", 1e-5)
    losses = lambda d: [json.loads(l)["loss"] for l in open(d / "metrics.jsonl")]
    np.testing.assert_allclose(losses(s2_batch2), losses(acc), atol=1e-5)
    np.testing.assert_allclose(losses(s2_batch2), losses(ddp), atol=1e-5)


def test_stage1_batch_equals_accumulation_and_llama_stays_frozen(data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train.main(stage1_args(data, a, "--batch-size", "2"))
    train.main(stage1_args(data, b, "--batch-size", "1", "--grad-accum", "2"))
    assert_same(a / "model.safetensors", b / "model.safetensors", 1e-5)
    m, _ = owl.load_model(str(a))  # the official layout, loadable
    assert m.config.num_query_tokens == 8 and m.config.vision_config.layer_norm_eps == 1e-6
    llama, clip = owl.load_llama(LLAMA), owl.load_vision(CLIP)
    for k, v in llama.state_dict().items():  # frozen: bit for bit
        assert torch.equal(m.language_model.state_dict()[k], v), k
    moved = [k for k, v in clip.state_dict().items() if not torch.equal(m.vision_model.state_dict()[k], v)]
    assert len(moved) > len(clip.state_dict()) // 2  # the ViT trained


def test_resume_is_exact(data, tmp_path):
    """4 steps straight == 2 steps, stop, --resume to 4 (with dropout on, so RNG state matters)."""
    common = ["--batch-size", "1", "--max-steps", "4", "--dropout", "0.1", "--save-every", "2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train.main(stage2_args(data, straight, *common))
    train.main(stage2_args(data, split, *common, "--stop-at", "2"))
    assert not (split / "model.safetensors").exists()
    train.main(stage2_args(data, split, *common, "--resume"))
    assert_same(straight / "adapter.safetensors", split / "adapter.safetensors", 1e-6)
    assert_same(straight / "checkpoint" / "trainable.safetensors", split / "checkpoint" / "trainable.safetensors", 1e-6)
    la = [json.loads(l) for l in open(straight / "metrics.jsonl")]
    lb = [json.loads(l) for l in open(split / "metrics.jsonl")]
    assert [r["step"] for r in lb] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in la], [r["loss"] for r in lb], atol=1e-6)
    # and without restoring the RNG the dropout masks would differ: the test can tell
    no_rng = tmp_path / "no_rng"
    train.main(stage2_args(data, no_rng, *common, "--stop-at", "2"))
    st = read_state(no_rng / "checkpoint")
    st["rng"] = [_other_rng()]
    write_state(no_rng / "checkpoint", st)
    train.main(stage2_args(data, no_rng, *common, "--resume"))
    assert not np.allclose([r["loss"] for r in la][2:], [json.loads(l)["loss"] for l in open(no_rng / "metrics.jsonl")][2:],
                           atol=1e-6, rtol=0)


def _other_rng():
    from owl.train.state import rng_state
    state = torch.get_rng_state()
    torch.manual_seed(12345)
    s = rng_state()
    torch.set_rng_state(state)
    return s


# ----------------------------------------------------------------------------- what trains

def test_stage_freezing_and_optimizer_state(data, s2_batch2, tmp_path):
    m1 = train.build_model(parse(stage1_args(data, tmp_path)))
    for n, p in m1.named_parameters():
        assert p.requires_grad == (not n.startswith("language_model.")), n
    m2 = train.build_model(parse(stage2_args(data, tmp_path)))
    for n, p in m2.named_parameters():
        assert p.requires_grad == ("lora_" in n or n.startswith("abstractor.") or n == "query_tokens"), n
    m3 = train.build_model(parse(stage2_args(data, tmp_path, "--freeze-abstractor")))
    assert {n for n, p in m3.named_parameters() if p.requires_grad} == {n for n, _ in m3.named_parameters() if "lora_" in n}
    # the checkpoint holds the trained tensors only, and Adam state for them only
    st = read_state(s2_batch2 / "checkpoint")
    trained = load_file(s2_batch2 / "checkpoint" / "trainable.safetensors")
    assert set(trained) == {n for n, p in m2.named_parameters() if p.requires_grad}
    assert len(st["optimizer"]["state"]) == len(trained) and st["step"] == 3


def test_vision_lr_applies_to_the_vit_only(data, tmp_path):
    from owl.train.stages import param_groups
    model = train.build_model(parse(stage1_args(data, tmp_path)))
    groups = param_groups(model, 0.1, vision_lr_scale=0.25)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert scale[id(p)] == (0.25 if n.startswith("vision_model.") else 1.0), n
    out = tmp_path / "still"  # --vision-lr 0: the ViT keeps its pretrained weights bit for bit
    train.main(stage1_args(data, out, "--batch-size", "2", "--vision-lr", "0"))
    m, _ = owl.load_model(str(out))
    for k, v in owl.load_vision(CLIP).state_dict().items():
        assert torch.equal(m.vision_model.state_dict()[k], v), k


def test_freeze_vision_trains_the_abstractor_only_and_keeps_the_vit_bit_for_bit(data, tmp_path):
    """train.py --freeze-vision (the demo's frozen_vit arm: LLaVA / MiniGPT-4): stage 1 trains the
    abstractor and queries; the ViT and the LLaMA come out as they went in, and the optimizer holds
    no state for them. Stage 2 refuses the flag (it freezes the ViT anyway)."""
    model = train.build_model(parse(stage1_args(data, tmp_path, "--freeze-vision")))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if n.startswith("abstractor.") or n == "query_tokens"}
    out = tmp_path / "frozen"
    train.main(stage1_args(data, out, "--batch-size", "2", "--freeze-vision", "--save-every", "3"))
    m, _ = owl.load_model(str(out))
    for k, v in owl.load_vision(CLIP).state_dict().items():
        assert torch.equal(m.vision_model.state_dict()[k], v), k
    init = train.build_model(parse(stage1_args(data, tmp_path)))  # the same seed: the same fresh abstractor
    moved = [k for k, v in init.abstractor.state_dict().items() if not torch.equal(m.abstractor.state_dict()[k], v)]
    assert len(moved) > len(init.abstractor.state_dict()) // 2  # the abstractor trained
    assert set(load_file(out / "checkpoint" / "trainable.safetensors")) == {
        n for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(TrainError, match="--freeze-vision with --stage 1"):
        train.main(stage2_args(data, tmp_path / "s2", "--freeze-vision"))


def test_stage1_gradient_flows_through_the_frozen_llama(data, tmp_path):
    args = parse(stage1_args(data, tmp_path))
    tok, _, _ = train.data_setup(args)
    model = train.build_model(args)
    ex, _ = load_examples([f"{data}/caps.jsonl"], tok, 512)
    b = collate([OwlDataset(ex, 56)[i] for i in range(2)])
    loss, n = lm_loss_sum(model.train()(b["input_ids"], b["pixel_values"]), b["labels"])
    (loss / n).backward()
    for name, p in model.named_parameters():
        if name.startswith("language_model."):
            assert p.grad is None, name
    g = model.vision_model.embeddings.patch_embed.weight.grad
    assert g is not None and g.abs().sum() > 0 and model.query_tokens.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- outputs

def test_adapter_merged_later_equals_merged_output_and_generates_the_same(s2_batch2, tmp_path):
    out = tmp_path / "merged"
    convert_main(["merge", OWL, str(s2_batch2 / "adapter.safetensors"), str(out)])
    assert_same(s2_batch2 / "model.safetensors", out / "model.safetensors", 1e-6)
    meta = json.load(open(s2_batch2 / "adapter.json"))
    assert meta["r"] == 8 and meta["targets"] == ["q_proj", "v_proj"] and len(meta["base_sha256"]) == 64
    trained, _ = owl.load_model(str(s2_batch2))
    base, tok = owl.load_model(OWL)
    owl.apply_adapter(base, str(s2_batch2 / "adapter.safetensors"))  # unmerged LoRA, in memory
    base.eval()
    img = Image.open(os.path.join(REF, "images", "public_0.jpg"))
    prompt = owl.build_prompt([(1, "What is funny about this image?", None)])
    want = owl.generate(base, tok, prompt, [img], max_new_tokens=12)
    assert owl.generate(trained, tok, prompt, [img], max_new_tokens=12) == want
    untrained, _ = owl.load_model(OWL)
    with torch.no_grad():
        ids = torch.tensor([tok.encode_prompt(prompt)])
        px = owl.preprocess_image(img, 56)[None]
        assert not torch.allclose(untrained(ids, px), trained(ids, px), atol=1e-4)  # training changed it


# ----------------------------------------------------------------------------- bad input

def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(data, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = train.lm_loss_sum

    def flaky(logits, labels):
        calls["n"] += 1
        loss, n = real(logits, labels)
        return (loss * float("nan") if calls["n"] == 3 else loss), n
    monkeypatch.setattr(train, "lm_loss_sum", flaky)
    out = tmp_path / "nan"
    with pytest.raises(train.TrainError, match="step 3: the loss is nan"):
        train.main(stage2_args(data, out, "--batch-size", "1", "--max-steps", "4", "--save-every", "2"))
    st = read_state(out / "checkpoint")
    assert st["step"] == 2 and len(load_file(out / "checkpoint" / "trainable.safetensors")) > 0
    assert not (out / "model.safetensors").exists()


def test_cli_bad_input_is_one_line(data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "0.png", "caption": "ok"}\n{"image": "0.png", "caption": \n')
    r = run_cli(["train.py", *stage2_args(data, tmp_path / "o1")[:4], "--data", str(bad), "--out", str(tmp_path / "o1")])
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {bad}:2: not valid JSON (Expecting value)"]
    assert not (tmp_path / "o1").exists()  # nothing half-written
    r = run_cli(["train.py", "--stage", "2", "--init", LLAMA, "--data", f"{data}/alpaca.json", "--out", str(tmp_path / "o2")])
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "is not an mPLUG-Owl model folder" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(["train.py", "--check-data", "--init", OWL, "--data", f"{data}/sft.jsonl,{data}/alpaca.json,{data}/caps.jsonl",
                 "--max-length", "100"])
    assert r.returncode == 0, r.stderr
    assert "examples: 16 (alpaca 4, caption 8, official 4)" in r.stdout and "multimodal 12, text-only 4" in r.stdout
    assert "longer than max_length: 4" in r.stdout  # the SFT examples


def test_missing_and_corrupt_images_are_skipped_counted_or_stop(data, tmp_path, capsys):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")
    recs = [{"image": f"{data}/{i % 6}.png", "caption": f"c {i}"} for i in range(8)]
    recs += [{"image": "gone.png", "caption": "missing"}, {"image": "corrupt.png", "caption": "corrupt"}]
    f = tmp_path / "caps.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in recs))
    args = stage1_args(data, tmp_path / "o", "--batch-size", "5", "--max-steps", "2")
    args[args.index("--data") + 1] = str(f)
    with pytest.raises(DataError, match=r"1 of 10 examples have missing images.*gone\.png"):
        train.main(args)  # 10% > the default 5%
    assert not (tmp_path / "o").exists()
    train.main(args + ["--max-bad-fraction", "0.5"])  # goes on: the missing one skipped up front,
    out = capsys.readouterr().out  # the corrupt one when its batch is read
    assert "missing/unreadable images: 1 in 1 example(s) (first: " in out and "gone.png" in out
    assert "skipped (bad image): " in out and "corrupt.png: cannot read image" in out
    assert [json.loads(l)["step"] for l in open(tmp_path / "o" / "metrics.jsonl")] == [1, 2]


# ----------------------------------------------------------------------------- the red-team cases (shared/design/redteam.md)

def test_stage1_skips_text_only_examples_and_says_so(data, tmp_path, capsys):
    """Report 5.12 (stage 1 on text-only data: a traceback after loading both models), 5.13 / B5
    (captions + Alpaca at batch 1: a crash at step 2): text-only examples are skipped and counted
    (in the start-up report and --check-data)."""
    args = stage1_args(data, tmp_path / "mixed", "--batch-size", "1", "--max-steps", "6")
    args[args.index("--data") + 1] = f"{data}/caps.jsonl,{data}/alpaca.json"
    assert train.main(args) == str(tmp_path / "mixed")
    assert "multimodal 8, text-only 4 (4 skipped: stage 1 trains on images)" in capsys.readouterr().out
    assert [json.loads(l)["step"] for l in open(tmp_path / "mixed" / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    r = run_script(capsys, os.path.join(ROOT, "train.py"), "--check-data", "--llm-init", LLAMA, "--data",
                   f"{data}/caps.jsonl,{data}/alpaca.json")
    assert r.returncode == 0 and "(4 skipped: stage 1 trains on images)" in r.stdout and "usable: 8 examples" in r.stdout
    args[args.index("--data") + 1] = f"{data}/alpaca.json"
    args[args.index("--out") + 1] = str(tmp_path / "text")
    one_line(run_script(capsys, os.path.join(ROOT, "train.py"), *args), "no usable training example")


def test_unreadable_images_at_batch_size_1_are_replaced(data, tmp_path, capsys):
    """Report 3.9 / B6: --batch-size 1 with an unreadable image (stage 1 and 2): `cannot reshape a
    tensor of 0 elements` mid-run. The example is replaced by the next one (the same one whatever the
    batch split or a resume); a run of unreadable ones stops with one line."""
    (tmp_path / "zero.png").write_bytes(b"")
    recs = [{"image": f"{data}/{i % 6}.png", "caption": f"c {i}"} for i in range(6)]
    recs.insert(2, {"image": str(tmp_path / "zero.png"), "caption": "z"})
    caps = tmp_path / "caps.jsonl"
    caps.write_text("".join(json.dumps(r) + "\n" for r in recs))
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"image": [r["image"]], "text": S + f"Human: <image>\nHuman: q\nAI: {r['caption']}"})
                           + "\n" for r in recs))
    for stage, f in ((stage1_args, caps), (stage2_args, sft)):
        args = stage(data, tmp_path / f.stem, "--batch-size", "1", "--max-steps", "7", "--max-bad-fraction", "0.5")
        args[args.index("--data") + 1] = str(f)
        assert train.main(args) == str(tmp_path / f.stem)
        assert "zero.png: cannot read image" in capsys.readouterr().out
        assert len(open(tmp_path / f.stem / "metrics.jsonl").readlines()) == 7
    ds = OwlDataset(load_examples([str(caps)], owl.load_tokenizer(LLAMA, 9), 512)[0], 56)
    assert torch.equal(ds[2]["ids"], ds[3]["ids"]) and len(ds[2]["bad"]) == 1  # the next example stands in
    (tmp_path / "all_bad").mkdir()
    for i in range(9):
        (tmp_path / "all_bad" / f"{i}.png").write_bytes(b"")
    (tmp_path / "all_bad" / "caps.jsonl").write_text("".join(json.dumps({"image": f"{i}.png", "caption": "c"}) + "\n"
                                                             for i in range(9)))
    args = stage1_args(data, tmp_path / "o", "--batch-size", "1", "--max-bad-fraction", "1")
    args[args.index("--data") + 1] = str(tmp_path / "all_bad" / "caps.jsonl")
    one_line(run_script(capsys, os.path.join(ROOT, "train.py"), *args), "step 1: 8 examples in a row have unreadable images")


def test_bad_flags_are_one_line(data, tmp_path, capsys):
    """Report 5.16 (--batch-size 0: a traceback), 5.17 (--grad-accum 0: an untrained model, exit 0),
    and --seed beyond a 64-bit generator."""
    for flags, words in ((["--batch-size", "0"], "--batch-size >= 1"), (["--grad-accum", "0"], "--grad-accum >= 1"),
                         (["--seed", str(2**64)], "0 <= --seed < 2**63"), (["--num-queries", "0"], "--num-queries")):
        r = run_script(capsys, os.path.join(ROOT, "train.py"), *stage1_args(data, tmp_path / "o"), *flags)
        one_line(r, "need ", words)
        assert r.stdout == "" and not (tmp_path / "o").exists()
