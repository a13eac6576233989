"""Does the demo's stand-in LLM look things up by the question's words? A research probe, not a test.

  python -m owl.demo runs/demo && python -m owl.demo.probe runs/demo

It reads the pretrained stand-in LLM (OUT/llm) and its training text (OUT/world/corpus.jsonl) and,
per question template, sets its teacher-forced answer accuracy on its own training conversations
(the notes in the image slots, as in pretraining) beside what an LLM that ignores the question's key
words would score: the answer taken from an item of the scene drawn at random (`random_item`).
Measured on the shipped stand-in LLM (the curriculum, 12000 steps; a development world's training
conversations, 5 Dec 2026): "Where is the <colour> <shape>?" 63% against 63% for a random item, "What
colour is the <shape>?" 76% against 79%, "Is there a <colour> <shape>?" 0% when the answer is no, while
the questions keyed by a cell ("What colour is the shape at the top right?") are at 93-95% against 66-75%
and those on the text and the count at 100%: the curriculum taught it to look a value up after a cell's
name, not by a colour or shape word of the question (bench/RESULTS.md).

probe_lookups is the same question on fresh one-question conversations, per lookup: the probe curve that
`--pretrain-stand-ins` writes into OUT/llm/metrics.jsonl every 2000 steps.
"""
import argparse
import collections
import json
import os
import random
import re
import sys

import torch

from . import world
from .stand_ins import answers_right
from ..tokenizer import Tokenizer, build_prompt
from ..weights import load_llama, load_tokenizer


def items_in(note):
    """world.notes(scene) -> the scene's shapes as (colour, shape, cell): 5 words per cell."""
    w = note.split()
    cells = [w[i:i + 5] for i in range(0, len(w), 5)]
    return [(what, thing, f"{row} {col}") for row, col, _, what, thing in cells if thing in world.SHAPES]


def random_item(note, answer):
    """The chance that one item of the scene, drawn at random, has the answer as its colour, shape or
    cell; None when the answer is none of these (counts, words, yes/no, which image)."""
    items = items_in(note)
    k = 0 if answer in world.COLOURS else 1 if answer in world.SHAPES else 2 if answer in world.CELLS else None
    if k is None or not items:
        return None
    return sum(it[k] == answer for it in items) / len(items)


def template(question, answer):
    t = question
    for words, name in ((world.CELLS, "<cell>"), (world.COLOURS, "<colour>"), (world.SHAPES, "<shape>")):
        t = re.sub(r"\b(%s)\b" % "|".join(words), name, t)  # the world's own vocabularies
    return t + (f" ({answer})" if answer in ("yes", "no") else "")


def lookup(kind, question):
    """The lookup a question of world.question's kind asks for: colour questions keyed by a cell or by a
    shape word, existence of a colour-shape pair or of any text, as themselves otherwise."""
    if kind == "colour":
        return "colour by cell" if "shape at the" in question else "colour by shape"
    if kind == "existence":
        return "any text" if "text" in question else "existence"
    return kind


LOOKUPS = ("position", "colour by shape", "existence", "colour by cell", "shape", "text", "any text", "count")


def lookup_docs(n=50, seed=4321):
    """n fresh one-question conversations per lookup (LOOKUPS), as corpus documents."""
    rng, docs = random.Random(seed), {k: [] for k in LOOKUPS}
    while any(len(v) < n for v in docs.values()):
        scene = world.random_scene(rng, p_word=0.8)
        kind, (q, a) = world.any_question(scene, rng)
        if len(docs[lookup(kind, q)]) < n:
            docs[lookup(kind, q)].append({"text": build_prompt([(1, q, a)]), "notes": [world.notes(scene)]})
    return docs


@torch.inference_mode()
def probe_lookups(llm, tok: Tokenizer, docs):
    """{lookup: share of its questions answered exactly} (teacher-forced): the probe curve of pretraining."""
    return {k: round(sum(answers_right(llm, tok, d)[0] for d in v) / len(v), 3) for k, v in docs.items()}


@torch.inference_mode()
def probe(llm, tok, corpus_file, n_docs=3000):
    """{template: [answers right, answers, sum of random-item chances, answers with a chance]}."""
    rows = collections.defaultdict(lambda: [0, 0, 0.0, 0])
    with open(corpus_file) as f:
        docs = [json.loads(line) for line, _ in zip(f, range(n_docs))]
    for doc in docs:
        if "\nAI: " not in doc["text"]:
            continue  # a caption
        spans = answers_right(llm, tok, doc)  # train.py's tokenisation, every answer teacher-forced
        qas = [qa for qa in re.findall(r"Human: (.*?)\nAI: (.*?)\n", doc["text"]) if qa[0] != "<image>"]
        assert len(qas) == len(spans), doc["text"]
        for (q, a), right in zip(qas, spans):
            r = rows[template(q, a)]
            r[0] += right
            r[1] += 1
            chance = random_item(doc["notes"][0], a) if len(doc["notes"]) == 1 else None
            if chance is not None:
                r[2] += chance
                r[3] += 1
    return dict(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="the OUT of a finished `python -m owl.demo OUT`")
    ap.add_argument("--docs", type=int, default=3000, help="corpus documents to read")
    args = ap.parse_args(argv)
    llm_dir, corpus = os.path.join(args.out, "llm"), os.path.join(args.out, "world", "corpus.jsonl")
    for p in (llm_dir, corpus):
        if not os.path.exists(p):
            sys.exit(f"error: {p} not found: run `python -m owl.demo {args.out}` first")
    llm = load_llama(llm_dir)
    tok = load_tokenizer(llm_dir)
    with open(corpus) as f:  # an image slot holds the notes' words and a full stop
        tok.image_tokens = len(tok.sp.encode(json.loads(f.readline())["notes"][0])) + 1
    rows = probe(llm, tok, corpus, args.docs)
    print("| question (teacher-forced, training conversations) | answers | stand-in LLM | a random item of the scene |")
    print("|---|---|---|---|")
    for t, (right, n, chance, m) in sorted(rows.items(), key=lambda kv: -kv[1][1]):
        print(f"| {t} | {n} | {right / n:.0%} | {f'{chance / m:.0%}' if m else '-'} |")


if __name__ == "__main__":
    main()
