"""The stand-ins shipped with the demo, as a user downloads LLaMA and CLIP (owl/demo/pretrained/llm in
the HF LLaMA layout with its tokenizer, owl/demo/pretrained/clip in the HF CLIP layout), and the one
command that makes them again from scratch, deterministically for a seed:

  python -m owl.demo --pretrain-stand-ins OUT [--seed 0]

Each model.safetensors records in its metadata the recipe (DemoConfig's pretraining fields), a hash
of the world's vocabulary and templates (world_hash) and, for the LLM, its answer rate on fresh
conversations (answer_rate). The demo reads them with owl.weights' checked loaders and refuses, in one
line, stand-ins made for a world whose vocabulary or templates differ. The world seed changes the
scenes, not the vocabulary: the shipped pair serves every seed.
"""
import hashlib
import json
import os
import random

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import files, probe, world
from .stand_ins import answers_right, pretrain_llm, pretrain_vit, write_hf_clip, write_hf_llama
from ..tokenizer import Tokenizer

ASKED = ("conversation", "describe", "compare")  # the documents answer_rate reads
PRETRAINED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")
RECIPE = ("seed", "n_clip", "n_pretrain", "n_train", "n_test", "n_text", "n_corpus", "vocab_size", "lm_steps",
          "vit_steps", "vit_batch_size", "vit_lr", "batch_size", "vit_hidden", "vit_layers", "llm_hidden",
          "llm_layers", "lm_lr", "image_size")


class StandInError(RuntimeError):
    """Stand-ins that do not fit this world: python -m owl.demo prints it as one line."""


def world_hash():
    """sha256 (16 hex) of the world's vocabularies and of the text its templates write for 50 fixed
    scenes (captions, notes, questions, conversations): independent of the world seed, changed by any
    new word or reworded template."""
    rng = random.Random(1234)
    text = [json.dumps([world.COLOURS, world.SHAPES, world.SIZES, world.CELLS, world.WORDS, world.NUMBERS,
                        world.QUESTION_TYPES, world.DESCRIBE])]
    for _ in range(50):
        s = world.random_scene(rng)
        text += [world.caption(s), world.notes(s), world.alt_text(s, rng), json.dumps(world.text_instruction(s, rng))]
        text += [d["text"] for d in world.stand_in_documents(s, rng)]
    return hashlib.sha256("\n".join(text).encode()).hexdigest()[:16]


@torch.inference_mode()
def answer_rate(llm, tok, n_scenes=100, seed=999):
    """The share of answers the LLM gets exactly right (teacher-forced greedy, every token) in fresh
    conversations about n_scenes scenes none of its training saw, the notes in the image slots, as in
    pretraining: how well it reads its notes. The conversations are those the stages ask for (any
    question, "Describe this image.", two-image comparisons), not the curriculum's listings and drills."""
    rng, right = random.Random(seed), []
    for _ in range(n_scenes):
        for doc in world.stand_in_documents(world.random_scene(rng, p_word=0.8), rng, ASKED):
            right += answers_right(llm, tok, doc)
    return sum(right) / len(right)


def stamp(model_dir, meta):
    """Rewrite model_dir/model.safetensors with meta (str -> str) in its metadata; the tensors unchanged."""
    path = os.path.join(model_dir, "model.safetensors")
    save_file(load_file(path), path, metadata={"format": "pt", **meta})


def metadata(model_dir):
    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
        return f.metadata() or {}


def check(model_dir):
    """Refuse, in one line, stand-ins made for another world's vocabulary or templates; returns their metadata."""
    meta = metadata(model_dir)
    if meta.get("world_hash") != world_hash():
        raise StandInError(
            f"{model_dir} was pretrained for a world whose vocabulary or templates differ (hash "
            f"{meta.get('world_hash')}, this world's {world_hash()}): make new ones with "
            f"`python -m owl.demo --pretrain-stand-ins OUT` and pass --stand-ins OUT")
    return meta


def pretrain_stand_ins(out, d, cfg):
    """Write the world of d, pretrain both stand-ins as the demo did (stand_ins.py), write them in the HF
    layouts with their logs (metrics.jsonl), stamp the recipe, the world hash and the LLM's answer rate."""
    paths = files.write_world(os.path.join(out, "world"), d.n_train, d.n_test, d.n_text, image_size=d.image_size,
                              seed=d.seed, questions_per_type=d.questions_per_type, vocab_size=d.vocab_size,
                              n_corpus=d.n_corpus, n_pretrain=d.n_pretrain, n_clip=d.n_clip)
    tok = Tokenizer(paths["tokenizer"], cfg.image_tokens)
    llm_dir, clip_dir = os.path.join(out, "llm"), os.path.join(out, "clip")
    os.makedirs(llm_dir, exist_ok=True)
    with open(os.path.join(llm_dir, "metrics.jsonl"), "w") as log:
        docs = probe.lookup_docs()  # the probe curve: the same fresh questions every probe_every steps
        llm = pretrain_llm(cfg.text_config, tok, d.lm_steps, d.batch_size, d.lm_lr, d.seed, log,
                           lambda m: probe.probe_lookups(m, tok, docs))
    write_hf_llama(llm, llm_dir, paths["tokenizer"])
    os.makedirs(clip_dir, exist_ok=True)
    with open(os.path.join(clip_dir, "metrics.jsonl"), "w") as log:
        vit = pretrain_vit(cfg.vision_config, paths["alt_text"], d.vit_steps, d.vit_batch_size, d.vit_lr, d.seed, log)
    write_hf_clip(vit, clip_dir)
    seal(out, d, llm, tok)
    return llm_dir, clip_dir


def seal(out, d, llm, tok):
    """Stamp OUT/llm and OUT/clip with the recipe, the world hash and the LLM's answer rate."""
    recipe = json.dumps({k: getattr(d, k) for k in RECIPE})
    rate = answer_rate(llm.eval(), tok)
    stamp(os.path.join(out, "llm"), {"recipe": recipe, "world_hash": world_hash(), "answer_rate": f"{rate:.4f}"})
    stamp(os.path.join(out, "clip"), {"recipe": recipe, "world_hash": world_hash()})
    print(f"[demo] stand-ins in {out}/llm and {out}/clip; the LLM answers {rate:.1%} of fresh conversations' "
          f"answers reading the notes", flush=True)
