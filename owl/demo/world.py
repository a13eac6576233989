"""A synthetic world for the CPU demo: images of coloured shapes (some with a short word written on
them), their captions, visual questions and text-only instructions, all generated here (no downloads).

It stands in for the paper's data (section "Data and Training Details"): captions for stage 1 (LAION,
COYO, CC, COCO in the paper), multimodal instructions for stage 2 (LLaVA in the paper: here counting,
colours, shapes, positions, existence, reading the scene text, multi-turn and two-image comparisons),
text-only instructions for stage 2 (Alpaca/Vicuna/Baize in the paper: here questions about a scene
described in words), and a text corpus on which stand_ins.py pretrains the tiny LLaMA that stands in
for the pretrained LLM. Files are written in the formats train.py reads:

  captions.jsonl          {"image": "images/train_00000.png", "caption": "..."}        (stage 1)
  instructions.jsonl      official mPLUG-Owl SFT JSONL {"image": [...], "text": "<template>"}  (stage 2)
  text_instructions.json  Alpaca [{"instruction", "input", "output"}]                   (stage 2)
  test.json               held-out questions on held-out images (run.evaluate)
  corpus.jsonl            {"text": caption or template conversation, "notes": [...]}  (the LLM's
                          pretraining text; each <image> is read as that image's notes, in words)
  tokenizer.model         sentencepiece BPE trained on all of the above with LLaMA's settings

A scene is a 2 x 2 grid of cells (a 56-px image is 2 x 2 ViT patches per cell); each cell holds at
most one shape or one word, so every question has one short, unambiguous answer.
"""
import io
import json
import os
import random
from dataclasses import dataclass, field

import sentencepiece as spm
from PIL import Image, ImageDraw, ImageFont

from ..tokenizer import build_prompt, SYSTEM
from ..train.data import to_template

COLOURS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 230), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "big")
CELLS = ("top left", "top right", "bottom left", "bottom right")  # row-major: reading order
WORDS = ("cat", "dog", "sun", "owl", "box", "car", "hat", "cup")
NUMBERS = ("zero", "one", "two", "three", "four")
QUESTION_TYPES = ("count", "colour", "shape", "position", "existence", "text", "compare", "multiturn")
THINGS = SHAPES + ("word", "nothing")  # the per-cell vocabularies of cell_labels and notes
WHATS = tuple(COLOURS) + WORDS + ("nothing",)
SIZES_OR_NOTHING = SIZES + ("nothing",)


@dataclass
class Item:  # one shape in a cell
    shape: str
    colour: str
    size: str
    cell: str


@dataclass
class Scene:
    items: list = field(default_factory=list)  # shapes, in cell (reading) order
    word: str = None  # the scene text, if any
    word_cell: str = None

    def unique(self, **kw):
        """The one item matching all of kw (e.g. shape="circle"), or None if zero or several match."""
        hits = [it for it in self.items if all(getattr(it, k) == v for k, v in kw.items())]
        return hits[0] if len(hits) == 1 else None


def random_scene(rng, p_word=0.5):
    cells = rng.sample(CELLS, 4)
    with_word = rng.random() < p_word
    n = rng.randint(1, 3)
    items = [Item(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES), c) for c in cells[:n]]
    items.sort(key=lambda it: CELLS.index(it.cell))
    return Scene(items, rng.choice(WORDS) if with_word else None, cells[3] if with_word else None)


# ----------------------------------------------------------------------------- images

def font(size):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except (TypeError, AttributeError, ImportError, OSError):
        return ImageFont.load_default()  # the old fixed bitmap font


def render(scene, size=56, rng=None):
    """The scene as a size x size RGB image; rng jitters positions by a few pixels."""
    img = Image.new("RGB", (size, size), (245, 245, 240))
    draw = ImageDraw.Draw(img)
    half = size // 2
    jitter = lambda: rng.randint(-2, 2) if rng is not None else 0
    for it in scene.items:
        r = half * (0.40 if it.size == "big" else 0.22)  # radius in pixels
        row, col = divmod(CELLS.index(it.cell), 2)
        cx, cy = col * half + half / 2 + jitter(), row * half + half / 2 + jitter()
        box = [cx - r, cy - r, cx + r, cy + r]
        fill = COLOURS[it.colour]
        if it.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif it.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    if scene.word:
        f = font(max(8, int(size * 0.27)))
        row, col = divmod(CELLS.index(scene.word_cell), 2)
        left, top, right, bottom = draw.textbbox((0, 0), scene.word, font=f)
        x = col * half + (half - (right - left)) / 2 - left + jitter() / 2
        y = row * half + (half - (bottom - top)) / 2 - top + jitter() / 2
        draw.text((x, y), scene.word, fill=(0, 0, 0), font=f)
    return img


# ----------------------------------------------------------------------------- language

def describe(it):
    return f"a {it.size} {it.colour} {it.shape} at the {it.cell}"


def caption(scene):
    n = len(scene.items)
    parts = [describe(it) for it in scene.items]
    listed = parts[0] if n == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    s = f"There {'is' if n == 1 else 'are'} {NUMBERS[n]} shape{'s' * (n != 1)}: {listed}."
    if scene.word:
        s += f" The word {scene.word} is written at the {scene.word_cell}."
    return s


def question(scene, kind, rng):
    """(question, answer) about one image, of the given kind, or None if the scene cannot give one."""
    items = scene.items
    if kind == "count":
        q = rng.choice(["How many shapes are there?", "How many shapes can you see?", "Count the shapes."])
        return q, NUMBERS[len(items)]
    if kind == "colour":
        it = rng.choice(items)
        if rng.random() < 0.5 and scene.unique(shape=it.shape):
            return f"What colour is the {it.shape}?", it.colour
        return f"What colour is the shape at the {it.cell}?", it.colour
    if kind == "shape":
        it = rng.choice(items)
        return rng.choice([f"What shape is at the {it.cell}?", f"Which shape is at the {it.cell}?"]), it.shape
    if kind == "position":
        it = rng.choice(items)
        if scene.unique(shape=it.shape, colour=it.colour):
            return f"Where is the {it.colour} {it.shape}?", it.cell
        return None
    if kind == "existence":
        if rng.random() < 0.2:
            return "Is there any text in the image?", "yes" if scene.word else "no"
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        if rng.random() < 0.5:  # half the time ask about something that is there
            it = rng.choice(items)
            shape, colour = it.shape, it.colour
        present = any(it.shape == shape and it.colour == colour for it in items)
        return f"Is there a {colour} {shape}?", "yes" if present else "no"
    if kind == "text":
        if not scene.word:
            return None
        return rng.choice(["What word is written in the image?", "What does the text say?"]), scene.word
    raise ValueError(f"unknown question kind {kind!r}")


SINGLE = ("count", "colour", "shape", "position", "existence", "text")


def any_question(scene, rng, kinds=SINGLE):
    while True:
        kind = rng.choice(kinds)
        qa = question(scene, kind, rng)
        if qa:
            return kind, qa


def compare(a, b, rng):
    """A question about two images: (question, answer) naming the first or the second."""
    which = lambda first: "the first image" if first else "the second image"
    if len(a.items) != len(b.items) and rng.random() < 0.5:
        return "Which image has more shapes?", which(len(a.items) > len(b.items))
    if bool(a.word) != bool(b.word):
        return "Which image has a word written in it?", which(bool(a.word))
    only_a = {(it.colour, it.shape) for it in a.items} - {(it.colour, it.shape) for it in b.items}
    only_b = {(it.colour, it.shape) for it in b.items} - {(it.colour, it.shape) for it in a.items}
    if only_a or only_b:
        first = bool(only_a) and (not only_b or rng.random() < 0.5)
        colour, shape = sorted(only_a if first else only_b)[0]
        return f"Which image has a {colour} {shape}?", which(first)
    return None


def text_instruction(scene, rng):
    """An Alpaca-style text-only instruction: a question about a scene described in words."""
    kind, (q, a) = any_question(scene, rng)
    return {"instruction": q, "input": f"The picture: {caption(scene)}", "output": a}


def notes(scene):
    """Terse scene notes, 5 words per cell in reading order, the cell first ("top left big red circle",
    "top right none word cat", "bottom left none none none", ...): one sentencepiece token each, 20 in
    all, always in the same places. Naming the cell lets a tiny LLM find a cell by its name, as it
    finds a shape by its colour, instead of counting positions; the scene text follows the word
    "word", as in the captions ("The word cat is written ..."), so copying it is copying what follows."""
    out = []
    for cell, (thing, what, size) in zip(CELLS, cell_labels(scene)):
        if THINGS[thing] == "word":
            out += cell.split() + ["none", "word", WHATS[what]]
        else:
            out += cell.split() + [SIZES_OR_NOTHING[size], WHATS[what], THINGS[thing]]
    return " ".join("none" if w == "nothing" else w for w in out)


def stand_in_documents(scene, rng):
    """LLM pretraining documents about one scene, as {"text", "notes"}: `text` is in the format
    train.py reads (a caption, or a conversation in the official template) and every <image> in it
    is read by the stand-in LLM as the next of `notes`, written in words (20 words and a full stop:
    as many tokens as an image's visual tokens).

    A real LLaMA has read text about text of every kind; ours, trained for a couple of minutes, is
    shown the two things the stages will ask of it, with a description in words where the image will
    be: a caption written from the description (what stage 1 asks of the frozen LLM) and questions
    answered from it (what stage 2 asks). It never sees an image: stage 1 must teach the ViT and the
    abstractor to say in visual tokens what the notes say in words."""
    note = notes(scene)
    turns = [any_question(scene, rng)[1] for _ in range(rng.randint(4, 8))]  # many questions per read
    docs = [{"text": caption(scene), "notes": [note]},
            {"text": build_prompt([(1 if i == 0 else 0, q, a) for i, (q, a) in enumerate(turns)]), "notes": [note]}]
    other = random_scene(rng, p_word=0.8)
    qa = compare(scene, other, rng)
    if qa and rng.random() < 0.5:
        docs.append({"text": build_prompt([(2, *qa)]), "notes": [note, notes(other)]})
    return docs


# ----------------------------------------------------------------------------- the files

def write_world(out_dir, n_train=3000, n_test=120, n_text=1500, image_size=56, seed=0, questions_per_type=40,
                vocab_size=1024, n_corpus=4000):
    """Write the whole world under out_dir; returns {name: path}. Deterministic for a seed."""
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

    train, test = make("train", n_train), make("test", n_test)
    captions = [{"image": name, "caption": caption(s)} for name, s in train]

    # stage-2 multimodal instructions: a conversation of 1 to 5 questions per training image (as
    # LLaVA's are multi-turn; every answer is a target, so a conversation teaches more per token than
    # a single question), and two-image comparisons
    sft = []
    for name, s in train:
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
    # The LLM's pretraining text: captions of and conversations about other scenes, their notes in the
    # image slots. (A real LLaMA knows language, not this world; ours must learn the world's words somewhere.)
    # Scene text is written in 80% of these scenes (50% of the images): each of the eight words is
    # then frequent enough for a tiny LLM to learn to copy it (at 50% it barely learns to).
    corpus = [d for _ in range(n_corpus) for d in stand_in_documents(random_scene(rng, p_word=0.8), rng)]
    rng.shuffle(corpus)

    paths = {k: os.path.join(out_dir, f) for k, f in
             (("captions", "captions.jsonl"), ("labels", "labels.jsonl"), ("instructions", "instructions.jsonl"),
              ("text_instructions", "text_instructions.json"), ("test", "test.json"),
              ("corpus", "corpus.jsonl"), ("tokenizer", "tokenizer.model"))}
    write_jsonl(paths["captions"], captions)
    write_jsonl(paths["labels"], [{"image": name, "cells": cell_labels(s)} for name, s in train])
    write_jsonl(paths["instructions"], sft)
    with open(paths["text_instructions"], "w") as f:
        json.dump(text_only, f, indent=0)
    with open(paths["test"], "w") as f:
        json.dump(tests, f, indent=1)
    write_jsonl(paths["corpus"], corpus)
    tok_text = [c["caption"] for c in captions] + [e["text"] for e in sft] + [d["text"] for d in corpus]
    tok_text += [n for d in corpus for n in d["notes"]]
    tok_text += [to_template("alpaca", e)[0] for e in text_only] + [SYSTEM]  # as train.py reads them
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


def cell_labels(scene):
    """Per cell (reading order): [thing, colour or word, size] as class indices into THINGS, WHATS,
    SIZES_OR_NOTHING: the labels stand_ins.py pretrains its stand-in for CLIP on."""
    out = []
    for cell in CELLS:
        it = next((it for it in scene.items if it.cell == cell), None)
        if it is not None:
            out.append([THINGS.index(it.shape), WHATS.index(it.colour), SIZES_OR_NOTHING.index(it.size)])
        elif scene.word_cell == cell:
            out.append([THINGS.index("word"), WHATS.index(scene.word), SIZES_OR_NOTHING.index("nothing")])
        else:
            out.append([THINGS.index("nothing"), WHATS.index("nothing"), SIZES_OR_NOTHING.index("nothing")])
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
