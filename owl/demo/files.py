"""The demo's world written to files (world.py makes the scenes, images and sentences): the formats
train.py reads, the stand-ins' pretraining data and the held-out test, listed in world.py's docstring."""
import io
import json
import os
import random

import sentencepiece as spm

from .world import (QUESTION_TYPES, DESCRIBE, alt_text, any_question, caption, cell_labels, compare, notes,
                    question, random_scene, render, stand_in_documents, text_instruction)
from ..tokenizer import build_prompt, SYSTEM
from ..train.data import to_template


def write_world(out_dir, n_train=1500, n_test=120, n_text=1500, image_size=56, seed=0, questions_per_type=40,
                vocab_size=1024, n_corpus=4000, n_pretrain=6000, n_clip=3000, p_describe=0.2, tokenizer=None):
    """Write the whole world under out_dir; returns {name: path}. Deterministic for a seed. Three pools
    of training images: n_clip for the stand-in CLIP, n_pretrain captioned for stage 1 and n_train
    with instructions for stage 2 (the paper's regime: stage 1 sees far more images than stage 2).
    tokenizer: a tokenizer.model to copy (the stand-in LLM's) instead of training one on this world."""
    rng = random.Random(seed)
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)

    def make(split, n):
        scenes = []
        for i in range(n):
            s = random_scene(rng)
            name = f"images/{split}_{i:05d}.png"
            render(s, image_size, rng).save(os.path.join(out_dir, name))
            scenes.append((name, s))
        return scenes

    clip, pretrain = make("clip", n_clip), make("pretrain", n_pretrain)
    train, test = make("train", n_train), make("test", n_test)
    captions = [{"image": name, "caption": caption(s)} for name, s in pretrain]

    # stage-2 multimodal instructions: a conversation of 1 to 5 questions per training image (as
    # LLaVA's are multi-turn; every answer is a target, so a conversation teaches more per token than
    # a single question), "describe the image" answered with the caption, and two-image comparisons
    sft = []
    for name, s in train:
        if rng.random() < p_describe:
            sft.append({"image": [name], "text": build_prompt([(1, rng.choice(DESCRIBE), caption(s))]),
                        "task_type": "describe"})
            continue
        turns = [any_question(s, rng)[1] for _ in range(rng.randint(1, 6))]
        sft.append({"image": [name], "text": build_prompt([(1 if i == 0 else 0, q, a) for i, (q, a) in enumerate(turns)]),
                    "task_type": "multiturn" if len(turns) > 1 else "single"})
    for _ in range(n_train // 4):
        (na, a), (nb, b) = rng.sample(train, 2)
        qa = compare(a, b, rng)
        if qa:
            sft.append({"image": [na, nb], "text": build_prompt([(2, *qa)]), "task_type": "compare"})
    rng.shuffle(sft)
    text_only = [text_instruction(random_scene(rng), rng) for _ in range(n_text)]

    tests = held_out_questions(test, rng, questions_per_type)
    captions_of = {name: caption(s) for name, s in test}
    for ex in tests:
        ex["captions"] = [captions_of[name] for name in ex["images"]]
    # A sample of the LLM's pretraining text (stand_ins.lm_batches draws its own, fresh, as it trains):
    # one document of each kind about each of other scenes, their notes in the image slots. (A real LLaMA
    # knows language, not this world; ours must learn the world's words somewhere.) Scene text is
    # written in 80% of these scenes (50% of the images): each of the eight words is then frequent
    # enough for a tiny LLM to learn to copy it (at 50% it barely learns to).
    corpus = [d for _ in range(n_corpus) for d in stand_in_documents(random_scene(rng, p_word=0.8), rng)]
    rng.shuffle(corpus)

    paths = {k: os.path.join(out_dir, f) for k, f in
             (("alt_text", "alt_text.jsonl"), ("captions", "captions.jsonl"), ("labels", "labels.jsonl"), ("instructions", "instructions.jsonl"),
              ("text_instructions", "text_instructions.json"), ("test", "test.json"),
              ("corpus", "corpus.jsonl"), ("tokenizer", "tokenizer.model"))}
    write_jsonl(paths["captions"], captions)
    write_jsonl(paths["alt_text"], [{"image": name, "text": alt_text(s, rng)} for name, s in clip])
    write_jsonl(paths["labels"], [{"image": name, "cells": cell_labels(s)} for name, s in train + test])
    write_jsonl(paths["instructions"], sft)
    with open(paths["text_instructions"], "w") as f:
        json.dump(text_only, f, indent=0)
    with open(paths["test"], "w") as f:
        json.dump(tests, f, indent=1)
    write_jsonl(paths["corpus"], corpus)
    tok_text = [c["caption"] for c in captions] + [e["text"] for e in sft] + [d["text"] for d in corpus]
    tok_text += [n for d in corpus for n in d["notes"]]
    tok_text += [to_template("alpaca", e)[0] for e in text_only] + [SYSTEM]  # as train.py reads them
    if tokenizer:
        with open(tokenizer, "rb") as src, open(paths["tokenizer"], "wb") as dst:
            dst.write(src.read())
    else:
        train_tokenizer(tok_text, paths["tokenizer"], vocab_size)
    return paths


def held_out_questions(test, rng, per_type):
    """Balanced held-out questions: per_type of each kind; prompts as build_prompt turns."""
    out = []
    for kind in QUESTION_TYPES:
        n, tries = 0, 0
        while n < per_type and tries < 100 * per_type:  # a tiny test set may have no word at all
            tries += 1
            if kind == "compare":
                (na, a), (nb, b) = rng.sample(test, 2)
                qa = compare(a, b, rng)
                if qa:
                    out.append({"type": kind, "images": [na, nb], "turns": [[2, qa[0], None]], "answer": qa[1],
                                "notes": [notes(a), notes(b)]})
                    n += 1
                continue
            name, s = rng.choice(test)
            if kind == "multiturn":  # the answer of the last turn is scored; earlier answers are given
                (q1, a1), (q2, a2) = any_question(s, rng)[1], any_question(s, rng)[1]
                out.append({"type": kind, "images": [name], "turns": [[1, q1, a1], [0, q2, None]], "answer": a2,
                            "notes": [notes(s)]})
                n += 1
                continue
            qa = question(s, kind, rng)
            if qa:
                out.append({"type": kind, "images": [name], "turns": [[1, qa[0], None]], "answer": qa[1],
                            "notes": [notes(s)]})
                n += 1
    return out


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def train_tokenizer(texts, model_file, vocab_size=512):
    """A sentencepiece BPE model with LLaMA's settings: byte fallback (256 byte pieces), digits split,
    unk=0 bos=1 eos=2 and no pad. The vocabulary is small because the world's language is."""
    lines = [t for t in texts if t.strip()]  # whole documents: "\nHuman:" is learned as it appears
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=0.99995, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, add_dummy_prefix=True, hard_vocab_limit=False,
        num_threads=1, minloglevel=2, max_sentence_length=4096)
    tmp = model_file + ".tmp"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, model_file)
