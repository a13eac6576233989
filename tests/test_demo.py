"""The CPU demo (owl/demo/, python -m owl.demo): the HF-layout writers invert the loaders, corpus
tokenisation matches train.py and owl.generate, and a reduced `run_demo` (with the ablation) runs end
to end, each stage as the `python train.py ...` command it prints."""
import json
import os
import random
import shlex
import subprocess
import sys

import pytest
import torch

import owl
from owl.config import LlamaConfig
from owl.demo import files, probe, shipped, world
from owl.demo import run as demo
from owl.demo import stand_ins
from owl.llama import Llama
from owl.tokenizer import IGNORE
from owl.train.config import parse
from owl.vision import VisionTransformer
from tests import test_readme as readme
from tests.conftest import ROOT


def test_hf_clip_writer_inverts_the_loader(tmp_path):
    cfg = demo.owl_config(demo.DemoConfig()).vision_config
    torch.manual_seed(0)
    vit = VisionTransformer(cfg)
    for p in vit.parameters():  # every tensor random (biases, norms too), so a swapped name shows
        torch.nn.init.normal_(p, std=0.2)
    stand_ins.write_hf_clip(vit, tmp_path)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["vision_config"]["hidden_size"] == cfg.hidden_size
    back = owl.load_vision(str(tmp_path), layer_norm_eps=cfg.layer_norm_eps)
    for k, v in vit.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    px = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        assert torch.equal(back(px), vit.eval()(px))


def test_hf_llama_writer_inverts_the_loader(tmp_path, ref):
    torch.manual_seed(0)
    llm = Llama(LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=64))
    llm.init_weights()
    stand_ins.write_hf_llama(llm, tmp_path, os.path.join(ref, "tokenizer.model"))
    back = owl.load_llama(str(tmp_path))
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        assert torch.equal(back(ids), llm.eval()(ids))
    assert owl.load_tokenizer(str(tmp_path)).vocab_size == 1000


def test_corpus_tokenisation_matches_train_and_generate(tmp_path):
    """A pretraining conversation reads as train.py tokenises it (i even) or as a prompt reaches
    owl.generate (i odd), with each image's notes in its slots; the loss falls on answers only."""
    from owl.train.data import tokenize_conversation
    paths = files.write_world(str(tmp_path), n_train=20, n_test=4, n_text=20, seed=0, questions_per_type=1,
                              n_corpus=50, n_pretrain=4, n_clip=4)
    tok = owl.Tokenizer(paths["tokenizer"], 21)
    rng = random.Random(1)
    scene = world.random_scene(rng)
    caption, chat, compare = (world.lm_document(kind, scene, rng) for kind in ("caption", "conversation", "compare"))
    assert compare and len(compare["notes"]) == 2  # a conversation about two images
    fill = lambda ids: [t for t in ids if t >= 0]  # the slots, dropped, to compare the text around them
    for doc in (chat, compare):
        notes = [stand_ins.notes_ids(tok, n) for n in doc["notes"]]
        ids, labels = stand_ins.encode_doc(tok, doc, 0)  # as train.py
        ref, ref_labels = tokenize_conversation(tok, doc["text"], 10 ** 6)[:2]
        assert labels == ref_labels and min(ids) >= 0 and len(ids) == len(ref)
        starts = [i for i, t in enumerate(ref) if t < 0][::tok.image_tokens]
        for s, n in zip(starts, notes):
            assert ids[s:s + tok.image_tokens] == n
        assert [t for i, t in enumerate(ids) if ref[i] >= 0] == fill(ref)
        ids, labels = stand_ins.encode_doc(tok, doc, 1)  # as a prompt reaches owl.generate
        prompt, _, answer = doc["text"].rstrip("\n").rpartition("AI: ")
        ref = tok.encode_prompt(prompt + "AI: ")
        tail = tok.sp.encode(answer) + [tok.eos_id]
        assert ids[len(ref):] == tail and labels == [IGNORE] * len(ref) + tail
        assert [t for i, t in enumerate(ids[:len(ref)]) if ref[i] >= 0] == fill(ref)
    ids, labels = stand_ins.encode_doc(tok, caption, 0)  # as stage 1: BOS, the notes, the caption, EOS
    assert ids == [tok.bos_id] + stand_ins.notes_ids(tok, caption["notes"][0]) + tok.encode(caption["text"], eos=True)
    assert labels == [IGNORE] * (1 + tok.image_tokens) + tok.encode(caption["text"], eos=True)
    with pytest.raises(ValueError, match="one piece"):
        stand_ins.notes_ids(tok, "top left big red circle")


def test_a_second_run_into_the_same_out_stops_at_once(tmp_path):
    (tmp_path / "stage1").mkdir()
    with pytest.raises(demo.DemoError, match="stage1 exists"):
        demo.run_demo(str(tmp_path), quick=True)
    assert sorted(os.listdir(tmp_path)) == ["stage1"]  # nothing written, nothing removed
    r = subprocess.run([sys.executable, "-m", "owl.demo", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [f"error: {tmp_path / 'stage1'} exists "
                                                                   "(an earlier demo run): choose another OUT or remove it"]


def test_normalise():
    assert demo.normalise("  The First image. ") == "the first image"
    assert demo.normalise("two\n") == "two" and demo.normalise("two") != demo.normalise("three")


def test_reduced_demo_end_to_end(tmp_path, capfd):
    out = str(tmp_path / "demo")
    assert demo.run_demo(out, ablation=True, quick=True) == out
    # each stage ran as the command it printed: the same options parse back from it
    commands = [l.split("[demo] python train.py ", 1)[1] for l in capfd.readouterr().out.splitlines()
                if l.startswith("[demo] python train.py ")]
    assert [parse(shlex.split(c)).out for c in commands] == [os.path.join(out, d) for d in (
        "unaligned", "stage1", "stage2", "stage2_only", "frozen_vit/stage1", "frozen_vit/stage2")]
    assert "--freeze-vision" in commands[4] and parse(shlex.split(commands[2])).init == os.path.join(out, "stage1")
    assert parse(shlex.split(commands[3])).init == os.path.join(out, "unaligned")
    cmds = readme.commands()  # what the README's commands after the demo read, the demo wrote
    assert all(os.path.exists(os.path.join(out, p)) for p in readme.paths_read_from(readme.demo_out(cmds), cmds))
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    assert set(report["ablation"]) == {"both", "stage1_only", "stage2_only", "frozen_vit"}
    for name, r in report["ablation"].items():
        assert set(r["per_type"]) == set(r["ci95_vs_both_per_type"]) == set(world.QUESTION_TYPES), name
        lo, hi = r["ci95_vs_both"]
        assert lo <= r["accuracy"] - report["accuracy"] + 1e-9 and r["accuracy"] - report["accuracy"] <= hi + 1e-9
    assert report["ablation"]["both"]["ci95_vs_both"] == [0.0, 0.0]
    assert report["config"]["seed"] == 0 and report["times_s"]["total"] > 0 and report["n_questions"] == 40
    assert set(report["llm_reads_notes"]) == {"accuracy", "per_type", "n"}
    for probes in report["vit_probes"].values():
        assert all(0 <= v <= 1 for v in probes.values()) and len(probes) == 4
    # the frozen arm's stage 1 kept the stand-in CLIP bit for bit; the method's trained it
    clip = owl.load_vision(os.path.join(out, "clip")).state_dict()
    for arm, same in (("frozen_vit/stage1", True), ("stage1", False)):
        vit = owl.load_model(os.path.join(out, arm))[0].vision_model.state_dict()
        assert all(torch.equal(vit[k], v) for k, v in clip.items()) == same, arm
    with open(os.path.join(out, "world", "test.json")) as f:
        tests = json.load(f)
    assert all(len(t["captions"]) == len(t["images"]) and t["captions"][0].startswith("There ") for t in tests)
    refs = {p: c for t in tests for p, c in zip(t["images"], t["captions"])}
    assert 0 < report["describe"]["n"] <= 40 and 0 <= report["describe"]["exact"] <= 1
    assert all(refs[r["image"]] == r["caption"] for r in report["describe"]["answers"])
    # something was learned: every training loss falls (its first fifth of steps against its last; the
    # reduced run's stage 1 has 40 steps and falls by ~9%, the others by 20-75%)
    for run in ("llm", "clip", "stage1", "stage2", "stage2_only", "frozen_vit/stage1", "frozen_vit/stage2"):
        with open(os.path.join(out, run, "metrics.jsonl")) as f:
            losses = [json.loads(line)["loss"] for line in f]
        k = max(1, len(losses) // 5)
        assert sum(losses[-k:]) / k < 0.95 * sum(losses[:k]) / k, (run, losses[:k], losses[-k:])
    assert report["accuracy"] == report["ablation"]["both"]["accuracy"]
    # every model's visual tokens were read; the one before stage 1 reads as no word of the notes' content
    # (a fresh abstractor), and the readout of the saved stage-1 model is reproduced from its checkpoint
    from owl.demo import readout
    assert set(report["readout"]) == {"unaligned", "stage1", "both", "stage2_only", "frozen_vit_stage1", "frozen_vit"}
    assert report["readout"]["unaligned"]["content"] < 0.1
    again = readout.read_images(*owl.load_model(os.path.join(out, "stage1")), os.path.join(out, "world", "test.json"))
    assert again["per_kind"] == report["readout"]["stage1"]["per_kind"] and again["rows"][:3] == report["readout"]["stage1"]["rows"]
    # report.md leads with the conclusions, from report.json's numbers, then the arms' picture
    from owl.demo.report import conclusions
    with open(os.path.join(out, "report.md")) as f:
        lead = f.read().split("\n")[2:7]
    assert lead == conclusions(report["ablation"]) + ["", "![held-out accuracy per question type, each arm on "
                                                        "one 0-100% scale](arms.png)"]
    assert report["commit"] == "unknown" or len(report["commit"]["sha"]) == 40
    for f in ("report.md", "loss.png", "llm/config.json", "clip/config.json", "stage1/model.safetensors",
              "stage2/adapter.safetensors", "stage2_only/model.safetensors", "samples/0_0.png", "arms.png"):
        assert os.path.isfile(os.path.join(out, f)), f
    with open(os.path.join(out, "stage1", "metrics.jsonl")) as f:
        assert len(f.readlines()) == demo.QUICK["stage1_steps"]
    # the report's accuracy is what the saved model gives: evaluate the checkpoint again
    model, tok = owl.load_model(os.path.join(out, "stage2"))
    again = demo.evaluate(model, tok, os.path.join(out, "world", "test.json"))
    assert again["accuracy"] == report["accuracy"] and again["per_type"] == report["per_type"]
    # the samples in report.md are rows of the evaluation
    assert all(s["answer"] in {a["answer"] for a in again["answers"]} for s in report["samples"])
    # python -m owl.demo.probe reads this OUT (owl/demo/probe.py): every answer of the corpus's conversations is scored once
    rows = probe.probe(owl.load_llama(os.path.join(out, "llm")), tok, os.path.join(out, "world", "corpus.jsonl"))
    with open(os.path.join(out, "world", "corpus.jsonl")) as f:
        docs = [json.loads(line) for line in f][:3000]
    assert sum(r[1] for r in rows.values()) == sum(d["text"].count("\nAI: ") for d in docs if "\nAI: " in d["text"])


def test_lm_batches_follow_the_curriculum_one_kind_per_batch_fresh_and_deterministic():
    """The stand-in LLM's batches: each of one document kind, of the kinds of the curriculum's phase at
    its step (the first tenth: colour, shape and writing listings only), padded after each document's
    end, new documents every step, and the same batches for the same seed."""
    tok = owl.load_tokenizer(os.path.join(shipped.PRETRAINED, "llm"), image_tokens=21)
    steps, B = 40, 8
    run = list(stand_ins.lm_batches(tok, steps, B, seed=0))
    again = list(stand_ins.lm_batches(tok, steps, B, seed=0))
    assert len(run) == steps and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(run, again))
    other = next(stand_ins.lm_batches(tok, steps, B, seed=1))
    assert not torch.equal(other[0], run[0][0])
    questions = {q: k for k, q in world.LISTINGS.items()} | {"There ": "caption or describe"}
    rows = set()
    for step, (ids, labels) in enumerate(run):
        lengths = (ids != 0).sum(1)  # token 0 (<unk>) is the padding: no document holds it
        kinds = set()
        for x, y, n in zip(ids.tolist(), labels.tolist(), lengths.tolist()):
            assert set(y[n:]) <= {IGNORE} and 0 not in x[:n]
            rows.add(tuple(x[:n]))
            text = tok.sp.decode(x[:n])
            kinds.add(next((k for q, k in questions.items() if q in text), "other"))
        assert len(kinds) == 1, (step, kinds)  # one kind per batch
        if step < steps // 10:
            assert kinds <= {"colours", "shapes", "words"}, (step, kinds)
    assert len(rows) > 0.9 * steps * B  # fresh scenes: hardly a document twice


def test_lookup_probe_random_item_chance():
    s = world.Scene([world.Item("circle", "red", "big", "top left"), world.Item("square", "red", "small", "top right"),
                     world.Item("circle", "blue", "big", "bottom right")], "cat", "bottom left")
    note = world.notes(s)
    assert probe.items_in(note) == [("red", "circle", "top left"), ("red", "square", "top right"),
                                    ("blue", "circle", "bottom right")]
    assert probe.random_item(note, "red") == pytest.approx(2 / 3)
    assert probe.random_item(note, "square") == pytest.approx(1 / 3)
    assert probe.random_item(note, "bottom right") == pytest.approx(1 / 3)
    assert probe.random_item(note, "bottom left") == 0.0  # the word's cell holds no shape
    assert probe.random_item(note, "cat") is None and probe.random_item(note, "yes") is None
    assert probe.template("Where is the red circle?", "top left") == "Where is the <colour> <shape>?"
    assert probe.template("Is there a blue square?", "no") == "Is there a <colour> <shape>? (no)"


def test_paired_bootstrap_interval():
    """The interval of a difference between two arms scored on the same questions: none when they answer
    alike, the exact difference when one is always right, and around the difference otherwise (paired:
    far narrower than the arms' own spread when they mostly agree)."""
    from owl.demo.report import paired_ci
    g = torch.Generator().manual_seed(0)
    both = (torch.rand(1, 400, generator=g) < 0.7).double()
    assert paired_ci(both, both) == [0.0, 0.0]
    assert paired_ci(torch.ones(1, 400, dtype=torch.float64), torch.zeros(1, 400, dtype=torch.float64)) == [1.0, 1.0]
    arm = both.clone()
    arm[0, :40] = 1 - arm[0, :40]  # disagrees on 40 of 400 questions
    diff = (arm - both).mean().item()
    lo, hi = paired_ci(arm, both)
    assert lo < diff < hi and hi - lo < 0.08
    worse = both.clone()
    worse[0, both[0] == 1] = torch.where(torch.rand(int(both.sum()), generator=g) < 0.2, 0.0, 1.0).double()
    assert paired_ci(worse, both)[1] < 0  # 20% of the right answers lost: the interval excludes 0
    two_seeds = torch.cat([both, both])  # seed-averaged: the same as one seed when the seeds agree
    assert paired_ci(torch.cat([arm, arm]), two_seeds) == [lo, hi]


def test_stand_in_clip_reads_alt_text_as_a_bag_that_never_says_where():
    rng = random.Random(0)
    texts = [world.alt_text(world.random_scene(rng), rng) for _ in range(500)]
    words = {w for t in texts for w in t.split()}
    assert not words & {"top", "bottom", "left", "right"}  # never a position
    assert words <= set(world.SIZES) | set(world.COLOURS) | set(world.SHAPES) | {"writing"} | set(world.WORDS)
    assert 0 < sum(any(w in world.WORDS for w in t.split()) for t in texts) < 0.15 * len(texts)  # the word rarely
    tower = stand_ins.TextTower(sorted(words), 16)
    a, b = tower(["red circle blue square", "blue circle red square"])
    assert torch.allclose(a, b)  # a bag: which colour goes with which shape is lost, as in CLIP's text tower
    assert not torch.allclose(*tower(["red circle", "blue circle"]))


def test_vit_probes_read_what_the_features_hold(tmp_path):
    """probe_vit scores held-out cells: a ViT whose features carry the pixels reads each cell's colour;
    one whose features are constant scores no better than always guessing the commonest answer."""
    paths = files.write_world(str(tmp_path), n_train=80, n_test=40, n_text=4, seed=0, questions_per_type=1,
                              n_corpus=20, n_pretrain=4, n_clip=4)
    cfg = demo.owl_config(demo.DemoConfig()).vision_config
    torch.manual_seed(0)
    vit = VisionTransformer(cfg)
    vit.init_weights()
    seeing = stand_ins.probe_vit(vit.eval(), paths["labels"])
    assert seeing["cell colour"] > 0.9 and seeing["cell thing"] > 0.8
    for p in vit.parameters():
        torch.nn.init.zeros_(p)
    blind = stand_ins.probe_vit(vit, paths["labels"])
    with open(paths["labels"]) as f:
        held = [json.loads(line) for line in f if "test_" in line]
    things = [c[0] for r in held for c in r["cells"]]
    assert blind["cell thing"] <= max(things.count(t) for t in set(things)) / len(things) + 1e-3
    assert blind["cell colour"] < 0.5 and blind["cell word"] < 0.5
