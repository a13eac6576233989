"""The whole mPLUG-Owl method, end to end, on a CPU in minutes.

    python -m owl.demo OUT [--ablation] [--seeds N] [--seed S]     (__main__.py)

1. world.py makes a synthetic world and files.py writes it: images, captions, instructions, a text corpus, a
   tokenizer.
2. A tiny LLaMA is pretrained on the world's text (it stands in for the pretrained LLM, the paper's
   raw LLaMA-7B) and written in the HF LLaMA layout; a tiny ViT is pretrained contrastively on its own
   pool of images with web-like alt text and written in the HF CLIP layout (it stands in for CLIP
   ViT-L/14, which we cannot download). owl/demo/stand_ins.py.
3. Stage 1 (train.py --stage 1): ViT + abstractor + queries trained on captions, LLaMA frozen.
4. Stage 2 (train.py --stage 2): LoRA + abstractor trained on text-only and multimodal instructions.
   Each stage runs as `python train.py ...`, the command printed before it: the very command a run
   at scale uses, on the demo's files.
5. Greedy answers to held-out questions on held-out images are scored (exact match after
   normalisation), each model's visual tokens are read as words (readout.py: what stage 1 aligned),
   and OUT/report.json, OUT/report.md, OUT/loss.png and OUT/samples/ are written.
With --ablation it also trains the paper's Table 2 variants: stage 1 only (no instruction tuning),
stage 2 only (no multimodal pretraining: the ViT and abstractor are never aligned) and both, and the
control the paper argues against: both stages with the ViT frozen in stage 1 (LLaVA, MiniGPT-4).
Each arm's difference from "both" gets a 95% paired bootstrap interval over the held-out questions;
--seeds N trains every arm with N training seeds (the world, --seed, stays the same).

Candidly, where this departs from the paper: the stand-ins know only this world. The LLM's
pretraining text describes scenes in terse "notes" (20 words, one token each: "top left big red
circle top right none word cat ...") placed exactly where an image's 21 visual tokens will go, in
listings, captions and chat-template conversations about the scene (stand_ins.CURRICULUM): a real
LLaMA has read text about text of every kind, ours has ten minutes to learn to read one kind. It
never sees an image, so stage 1 must still teach the ViT and the abstractor to say in visual tokens
what the notes say in words, and stage 2 to answer from them. The report's ceiling row is that LLM
reading the notes themselves. LoRA covers every projection of the LLM (r 16), not only q/v: the
official r 8 on q_proj/v_proj adapts a 7B model, and a 2-layer model of width 128 needs the adapter
to reach its MLPs too.
"""
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from . import files
from .readout import read_run
from .report import git_commit, write_report
from . import shipped
from .stand_ins import notes_ids, probe_vit
from ..config import OwlConfig, VisionConfig, AbstractorConfig, LlamaConfig
from ..generate import generate
from ..image import load_image
from ..tokenizer import Tokenizer, build_prompt
from ..train.config import TrainConfig, to_argv
from ..weights import load_model, load_vision

# what a run writes in OUT (report.py: report.*, loss.png, arms.png, answers_ARM.jsonl, samples/)
DEMO_WRITES = {"world", "llm", "clip", "report.md", "report.json", "loss.png", "arms.png", "samples"} | {
    f"answers_{arm}.jsonl" for arm in ("both", "stage1_only", "stage2_only", "frozen_vit")}
TRAIN_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "train.py")


class DemoError(RuntimeError):
    """A demo that cannot start or go on: python -m owl.demo prints it as one line."""


@dataclass
class DemoConfig:
    """Sizes and steps of the demo; `quick` (tests, notebooks) shrinks everything."""
    seed: int = 0  # the world's (and the stand-ins') seed
    seeds: int = 1  # training seeds of the stages: 0 .. seeds-1
    # Torch threads; 0 keeps torch's default (one per core): 1.4-1.6x faster than one thread on an idle
    # 2-core machine, but much slower than one when another process shares the cores (then pass 1).
    threads: int = 0
    image_size: int = 56  # 4 x 4 patches of 14 px: each of the world's 2 x 2 cells is 2 x 2 patches
    n_clip: int = 3000  # the stand-in CLIP's own images (alt text)
    n_pretrain: int = 6000  # stage-1 images (captions): more than stage 2's, as in the paper
    n_train: int = 1500  # stage-2 images (instructions)
    n_test: int = 120  # held-out images
    n_text: int = 1500  # text-only instructions
    n_corpus: int = 2000  # scenes of corpus.jsonl, a sample of the LLM's pretraining text (12 documents each)
    questions_per_type: int = 40  # held-out questions per question type
    vocab_size: int = 1024  # 259 of them are <unk>, <s>, </s> and the 256 byte-fallback pieces
    lm_steps: int = 12000  # LLM pretraining (the curriculum: stand_ins.CURRICULUM)
    vit_steps: int = 600  # ViT pretraining
    vit_batch_size: int = 128  # contrastive: the other 127 alt texts of the batch are the negatives
    vit_lr: float = 1e-3
    # 3000: the minutes the shipped stand-ins freed (the paper's stage 1 is by far its largest); on the
    # development world (seed 100) 1500 -> 3000 took position questions from 35% to 52% (bench/RESULTS.md)
    stage1_steps: int = 3000
    stage2_steps: int = 800
    batch_size: int = 16
    vit_hidden: int = 96
    vit_layers: int = 3
    abstractor_layers: int = 2
    num_query_tokens: int = 20  # + 1 end-of-image token = 21 LLM positions, as many as the notes and the full stop
    llm_hidden: int = 128
    llm_layers: int = 2
    lm_lr: float = 1e-3
    stage1_lr: float = 5e-4  # the paper: 1e-4 for 50k steps (one lr for the ViT and the abstractor); ours has 3000
    stage1_vision_lr: float = 5e-4
    stage2_lr: float = 1e-3  # the paper: 2e-5 for 2k steps
    # LoRA on every projection of the LLM, r 16 (see the module docstring)
    lora_r: int = 16
    lora_alpha: float = 32
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


QUICK = dict(n_clip=300, n_pretrain=300, n_train=300, n_text=300, n_corpus=200, n_test=30, questions_per_type=5,
             lm_steps=150, vit_steps=100, vit_batch_size=64, stage1_steps=40, stage2_steps=150)


def owl_config(d: DemoConfig):
    """The demo model: the tiny preset's structure at the demo's sizes."""
    v, c = d.vit_hidden, d.llm_hidden
    return OwlConfig(
        vision_config=VisionConfig(hidden_size=v, intermediate_size=4 * v, num_hidden_layers=d.vit_layers,
                                   num_attention_heads=4, image_size=d.image_size, patch_size=14),
        visual_abstractor_config=AbstractorConfig(hidden_size=v, intermediate_size=256,
                                                  num_hidden_layers=d.abstractor_layers,
                                                  num_attention_heads=4, encoder_hidden_size=v),
        text_config=LlamaConfig(vocab_size=d.vocab_size, hidden_size=c, intermediate_size=int(c * 8 / 3 // 32 * 32),
                                num_hidden_layers=d.llm_layers, num_attention_heads=4, max_position_embeddings=256),
        num_query_tokens=d.num_query_tokens)


# ----------------------------------------------------------------------------- evaluation

def normalise(s):
    return " ".join(s.lower().strip().rstrip(".!").split())


@torch.inference_mode()
def evaluate(model, tok, test_file, batch_size=32, max_new_tokens=8, notes=False):
    """Greedy answers to the held-out questions; accuracy overall and per question type.

    notes=True is the ceiling: the LLM reads each image's notes in words (as in its pretraining) in
    place of the visual tokens, so only the LLM is tested, not the ViT and the abstractor."""
    root = os.path.dirname(os.path.abspath(test_file))
    with open(test_file) as f:
        tests = json.load(f)
    rows = []
    for i in range(0, len(tests), batch_size):
        chunk = tests[i:i + batch_size]
        prompts = [build_prompt([tuple(t) for t in ex["turns"]]) for ex in chunk]
        if notes:  # the notes' word embeddings in the image slots
            words = torch.tensor([notes_ids(tok, n) for ex in chunk for n in ex["notes"]])  # (N, slots)
            images, embeds = [], model.language_model.model.embed_tokens(words)  # (N, slots, C)
        else:
            images, embeds = [load_image(os.path.join(root, p)) for ex in chunk for p in ex["images"]], None
        outs = generate(model, tok, prompts, images, max_new_tokens=max_new_tokens, image_embeds=embeds)
        for ex, ids in zip(chunk, outs):
            pred = tok.decode(ids)
            rows.append({**ex, "prediction": pred, "correct": normalise(pred) == normalise(ex["answer"])})
    per_type = {}
    for r in rows:
        per_type.setdefault(r["type"], []).append(r["correct"])
    return {"accuracy": sum(r["correct"] for r in rows) / len(rows),
            "per_type": {k: sum(v) / len(v) for k, v in per_type.items()}, "n": len(rows), "answers": rows}


@torch.inference_mode()
def describe(model, tok, test_file, n=40, batch_size=20):
    """"Describe this image." on the first n held-out images, greedy, as chat.py's first question:
    the share of answers that are exactly the reference caption, and each answer with its reference."""
    root = os.path.dirname(os.path.abspath(test_file))
    with open(test_file) as f:
        refs = {p: c for ex in json.load(f) for p, c in zip(ex["images"], ex["captions"])}
    names = sorted(refs)[:n]
    rows = []
    for i in range(0, len(names), batch_size):
        chunk = names[i:i + batch_size]
        prompts = [build_prompt([(1, "Describe this image.", None)])] * len(chunk)
        outs = generate(model, tok, prompts, [load_image(os.path.join(root, p)) for p in chunk], max_new_tokens=64)
        rows += [{"image": p, "caption": refs[p], "answer": tok.decode(o).strip()} for p, o in zip(chunk, outs)]
    return {"exact": sum(r["answer"] == r["caption"] for r in rows) / len(rows), "n": len(rows), "answers": rows}


# ----------------------------------------------------------------------------- the stages, through train.py

def train_stage(cfg: TrainConfig, threads=0):
    """Run `python train.py` with the options of cfg, printing that command first; returns cfg.out."""
    argv = to_argv(cfg)
    print("[demo] python train.py " + shlex.join(argv), flush=True)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    r = subprocess.run([sys.executable, TRAIN_PY, *argv], env=env)
    if r.returncode:
        raise DemoError(f"the stage above stopped (train.py exited with {r.returncode}); {cfg.out} has what it wrote")
    return cfg.out


def stage_config(d: DemoConfig, stage, out, data, steps, lr, seed, **more):
    return TrainConfig(stage=stage, data=",".join(data), out=out, max_steps=steps, batch_size=d.batch_size, lr=lr,
                       warmup_steps=max(1, steps // 10), seed=seed, dropout=0, save_every=0,
                       eval_every=max(steps // 4, 1), eval_examples=64, device="cpu", **more)


def stage1(d, out, world_paths, clip_dir, llm_dir, steps, seed, freeze_vision=False):
    """Stage 1: ViT + abstractor + queries on captions, LLaMA frozen (train.py --stage 1); with
    freeze_vision the abstractor and queries only (--freeze-vision)."""
    return train_stage(stage_config(
        d, 1, out, [world_paths["captions"]], steps, d.stage1_lr, seed, vision_init=clip_dir, llm_init=llm_dir,
        num_queries=d.num_query_tokens, vision_lr=d.stage1_vision_lr, abstractor_layers=d.abstractor_layers,
        abstractor_heads=4, abstractor_mlp=256, freeze_vision=freeze_vision), d.threads)


def stage2(d, out, world_paths, init, steps, seed):
    """Stage 2: LoRA + abstractor on multimodal and text-only instructions, ViT frozen (--stage 2)."""
    data = [world_paths["instructions"], world_paths["text_instructions"]]
    return train_stage(stage_config(d, 2, out, data, steps, d.stage2_lr, seed, init=init, lora_r=d.lora_r,
                                    lora_alpha=d.lora_alpha, lora_targets=d.lora_targets), d.threads)


# ----------------------------------------------------------------------------- the whole demo

def regenerate_stand_ins(out, quick=False, **overrides):
    """python -m owl.demo --pretrain-stand-ins OUT: the shipped stand-ins' recipe, from scratch."""
    d = DemoConfig(**{**(QUICK if quick else {}), **overrides})
    if os.path.exists(os.path.join(out, "llm")):
        raise DemoError(f"{os.path.join(out, 'llm')} exists: choose another OUT or remove it")
    t = time.time()
    shipped.pretrain_stand_ins(out, d, owl_config(d))
    print(f"[demo] pretrained the stand-ins in {time.time() - t:.0f} s", flush=True)
    return out


def run_demo(out, ablation=False, quick=False, stand_ins=None, **overrides):
    """Generate the world, read the shipped stand-ins (or those in stand_ins/llm and stand_ins/clip), run
    both stages (each as `python train.py ...`), evaluate, write the report; returns out."""
    d = DemoConfig(**{**(QUICK if quick else {}), **overrides})
    # train.py refuses to overwrite a stage's output, so a second run into the same OUT would stop after
    # minutes of pretraining: refuse at once instead, and never delete an earlier run
    earlier = [n for n in ("stage1", "stage2", "unaligned", "stage2_only", "frozen_vit", "seed1")
               if os.path.exists(os.path.join(out, n))]
    if earlier:
        raise DemoError(f"{os.path.join(out, earlier[0])} exists (an earlier demo run): choose another OUT "
                        f"or remove it")
    # and never write world/, llm/, report.md, ... into a folder of other things (/, a home: redteam-2 3.18)
    if os.path.exists(out) and (not os.path.isdir(out) or (foreign := sorted(set(os.listdir(out)) - DEMO_WRITES))):
        what = f"holds {foreign[0]}, which the demo does not write" if os.path.isdir(out) else "is not a folder"
        raise DemoError(f"{out} {what}: choose a new or empty OUT")
    if not os.path.isfile(TRAIN_PY):
        raise DemoError(f"{TRAIN_PY}: not found (the demo runs each stage as `python train.py`, beside owl/)")
    d.stand_ins = stand_ins or shipped.PRETRAINED
    for sub in ("llm", "clip"):
        if not os.path.isfile(os.path.join(d.stand_ins, sub, "model.safetensors")):
            if stand_ins:
                raise DemoError(f"{os.path.join(d.stand_ins, sub)}: no stand-in there; make them with "
                                f"`python -m owl.demo --pretrain-stand-ins {stand_ins}`")
            print(f"[demo] {d.stand_ins}: no shipped stand-ins; pretraining them in this run", flush=True)
            d.stand_ins = None
            break
        shipped.check(os.path.join(d.stand_ins, sub))
    threads = torch.get_num_threads()
    torch.set_num_threads(d.threads or threads)
    try:
        return _run_demo(out, d, ablation)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out, d: DemoConfig, ablation):
    cfg = owl_config(d)
    os.makedirs(out, exist_ok=True)
    commit = git_commit()  # the code that made the run, taken before it starts (the checkout may change)
    times, t = {}, time.time()

    def lap(name):
        nonlocal t
        times[name] = round(time.time() - t, 1)
        t = time.time()
        print(f"[demo] {name}: {times[name]} s", flush=True)

    llm_dir, clip_dir = os.path.join(out, "llm"), os.path.join(out, "clip")
    if d.stand_ins is None:  # none shipped: the recipe in this run, into OUT/llm and OUT/clip
        shipped.pretrain_stand_ins(out, d, cfg)
        lap("pretrain_stand_ins")
    else:
        for sub, to in (("llm", llm_dir), ("clip", clip_dir)):  # a copy beside the run (report.py reads their logs)
            shutil.copytree(os.path.join(d.stand_ins, sub), to)
    # the world is written with the stand-in LLM's own tokenizer (the world seed changes the scenes, not
    # the words: every notes word is one piece of it, which stand_ins.notes_ids checks)
    paths = files.write_world(os.path.join(out, "world"), d.n_train, d.n_test, d.n_text, image_size=d.image_size,
                              seed=d.seed, questions_per_type=d.questions_per_type, vocab_size=d.vocab_size,
                              n_corpus=d.n_corpus, n_pretrain=d.n_pretrain, n_clip=d.n_clip,
                              tokenizer=os.path.join(llm_dir, "tokenizer.model"))
    tok = Tokenizer(paths["tokenizer"], cfg.image_tokens)
    vit = load_vision(clip_dir)
    lap("world")

    runs = {}  # arm -> one checkpoint per training seed
    for seed in range(d.seeds):
        at, tag = (out, "") if seed == 0 else (os.path.join(out, f"seed{seed}"), f"_seed{seed}")
        # Stage 1 for 0 steps exports the unaligned model (the stand-in CLIP ViT, a fresh abstractor, the
        # LLM) by the same code path: what stage 1 starts from, and stage 2 only's start in the ablation.
        s0 = stage1(d, os.path.join(at, "unaligned"), paths, clip_dir, llm_dir, 0, seed)
        s1 = stage1(d, os.path.join(at, "stage1"), paths, clip_dir, llm_dir, d.stage1_steps, seed)
        lap(f"stage1{tag}")
        runs.setdefault("both", []).append(
            stage2(d, os.path.join(at, "stage2"), paths, s1, d.stage2_steps, seed))
        lap(f"stage2{tag}")
        if ablation:
            runs.setdefault("stage1_only", []).append(s1)  # multimodal pretraining, no instruction tuning
            # No multimodal pretraining: stage 2 starts from the unaligned model.
            runs.setdefault("stage2_only", []).append(
                stage2(d, os.path.join(at, "stage2_only"), paths, s0, d.stage2_steps, seed))
            # The frozen-encoder recipe (LLaVA, MiniGPT-4): stage 1 trains the abstractor only.
            f1 = stage1(d, os.path.join(at, "frozen_vit", "stage1"), paths, clip_dir, llm_dir,
                        d.stage1_steps, seed, freeze_vision=True)
            runs.setdefault("frozen_vit", []).append(
                stage2(d, os.path.join(at, "frozen_vit", "stage2"), paths, f1, d.stage2_steps, seed))
            lap(f"ablation{tag}")
    results = {name: [evaluate(*load_model(path), paths["test"]) for path in paths_] for name, paths_ in runs.items()}
    captions = describe(*load_model(runs["both"][0]), paths["test"])
    s1_model = load_model(os.path.join(out, "stage1"))[0]
    # the ceiling: the stand-in LLM (frozen in stage 1) reading each image's notes in words
    ceiling = evaluate(s1_model, tok, paths["test"], notes=True)
    # what the ViT's features hold, before stage 1 (the stand-in CLIP; also the frozen arm's ViT) and after
    probes = {"stand-in CLIP (before stage 1; the frozen_vit arm)": probe_vit(vit, paths["labels"]),
              "after stage 1": probe_vit(s1_model.vision_model, paths["labels"])}
    readout = read_run(out)  # each model's visual tokens read as words (seed 0)
    lap("evaluate")
    write_report(out, d, results, ceiling, probes, captions, runs, times, readout, commit)
    image = os.path.join(out, "world", "images", sorted(os.listdir(os.path.join(out, "world", "images")))[0])
    print(f"[demo] the report: {os.path.join(out, 'report.md')}; the model: {runs['both'][0]}\n"
          f"[demo] chat with it: python chat.py --model {shlex.quote(runs['both'][0])} --image {shlex.quote(image)}",
          flush=True)
    return out
