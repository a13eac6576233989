"""A synthetic world for the CPU demo: images of coloured shapes (some with a short word written on
them), their captions, visual questions and text-only instructions, all generated here (no downloads).

It stands in for the paper's data (section "Data and Training Details"): captions for stage 1 (LAION,
COYO, CC, COCO in the paper), multimodal instructions for stage 2 (LLaVA in the paper: here counting,
colours, shapes, positions, existence, reading the scene text, multi-turn and two-image comparisons),
text-only instructions for stage 2 (Alpaca/Vicuna/Baize in the paper: here questions about a scene
described in words), and the text on which stand_ins.py pretrains the tiny LLaMA that stands in
for the pretrained LLM. files.py writes them in the formats train.py reads:

  alt_text.jsonl          {"image": "images/clip_00000.png", "text": "red circle blue square"}  (the
                          stand-in CLIP's own pretraining pool: web-like alt text, never a position)
  captions.jsonl          {"image": "images/pretrain_00000.png", "caption": "..."}     (stage 1)
  instructions.jsonl      official mPLUG-Owl SFT JSONL {"image": [...], "text": "<template>"}  (stage 2)
  text_instructions.json  Alpaca [{"instruction", "input", "output"}]                   (stage 2)
  test.json               held-out questions on held-out images, each with its images' reference captions
  labels.jsonl            per cell what it holds, for the stage-2 and test images (linear probes only)
  corpus.jsonl            {"text": listing, caption or template conversation, "notes": [...]}  (a sample
                          of the LLM's pretraining text; each <image> is read as that image's notes, in words)
  tokenizer.model         sentencepiece BPE trained on all of the above with LLaMA's settings

A scene is a 2 x 2 grid of cells (a 56-px image is 2 x 2 ViT patches per cell); each cell holds at
most one shape or one word, so every question has one short, unambiguous answer.
"""
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

from ..tokenizer import build_prompt

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


def alt_text(scene, rng):
    """Alt text as the web writes it, the stand-in CLIP's text: some of the "colour shape" phrases in
    random order, sometimes a size, never a position; "writing" half of the time there is scene text,
    the word itself rarely. CLIP's text tower reads such text much as a bag of words (Yuksekgonul et
    al., 2023), and ours is one (stand_ins.TextTower): what it can teach the ViT is what is present,
    not where, nor which colour goes with which shape, nor what the small text says."""
    words = []
    for it in rng.sample(scene.items, rng.randint(1, len(scene.items))):
        words += ([it.size] if rng.random() < 0.3 else []) + [it.colour, it.shape]
    if scene.word and rng.random() < 0.5:
        words += ["writing"] + ([scene.word] if rng.random() < 0.15 else [])
    return " ".join(words)


DESCRIBE = ("Describe this image.", "What is in the image?", "Describe the image.")


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


# ----------------------------------------------------------------------------- the stand-in LLM's curriculum

# Listings: one lookup over every cell at once, each value right after its key ("top left red, bottom
# right blue"): the form a tiny LLM learns to look things up in its notes by a key (bench/RESULTS.md, the
# lab's j and k runs: the colour listing alone is learned in 1000 steps; the keyed questions, mixed as
# they come, stay at the rate of answering from a random item of the scene).
LISTINGS = {"colours": "List the colours.", "shapes": "List the shapes.", "sizes": "List the sizes.",
            "colours of shapes": "What colour is each shape?", "positions": "Where is each shape?",
            "check": "Check the shapes.", "words": "Where is the writing?"}


def listing(scene, kind, rng):
    """(question, answer) listing one attribute per key, in reading order or, half the time, shuffled;
    None if the scene has no key for it."""
    items = list(scene.items)
    if rng.random() < 0.5:
        rng.shuffle(items)
    if kind == "colours":
        parts = [f"{it.cell} {it.colour}" for it in items]
    elif kind == "shapes":
        parts = [f"{it.cell} {it.shape}" for it in items]
    elif kind == "sizes":
        parts = [f"{it.cell} {it.size}" for it in items]
    elif kind == "colours of shapes":  # key: a shape that is there once
        parts = [f"{it.shape} {it.colour}" for it in items if scene.unique(shape=it.shape)]
    elif kind == "positions":  # key: a colour-shape pair that is there once
        parts = [f"{it.colour} {it.shape} {it.cell}" for it in items if scene.unique(shape=it.shape, colour=it.colour)]
    elif kind == "words":  # the scene text, after the cell it is in (none in 20% of these scenes)
        parts = [f"{scene.word_cell} {scene.word}"] if scene.word else ["none"]
    elif kind == "check":  # pairs that are there and near misses (one word changed), each with yes or no
        pairs = []
        for it in items:
            pairs.append((it.colour, it.shape))
            pairs.append((rng.choice(list(COLOURS)), it.shape) if rng.random() < 0.5 else (it.colour, rng.choice(SHAPES)))
        pairs = list(dict.fromkeys(pairs))  # each pair once
        rng.shuffle(pairs)
        there = {(it.colour, it.shape) for it in scene.items}
        parts = [f"{c} {sh} {'yes' if (c, sh) in there else 'no'}" for c, sh in pairs]
    else:
        raise ValueError(f"unknown listing {kind!r}")
    return (LISTINGS[kind], ", ".join(parts)) if parts else None


DOCUMENT_KINDS = tuple(f"list {k}" for k in LISTINGS) + ("drill", "conversation", "caption", "describe", "compare")
KEYED = ("colour", "shape", "position", "existence", "text")  # the questions answered by looking a key up


def lm_document(kind, scene, rng):
    """One LLM pretraining document about scene, of a kind of stand_ins.CURRICULUM: a listing
    ("list colours", ...), a "drill" of keyed questions, a "conversation" of any questions, a "caption",
    "describe" (answered with the caption) or "compare" (one to four questions about two images). As
    {"text", "notes"}, the notes read where each <image> is (stand_in_documents)."""
    note = notes(scene)
    if kind.startswith("list "):
        qa = listing(scene, kind[5:], rng)
        return qa and {"text": build_prompt([(1, *qa)]), "notes": [note]}
    if kind in ("drill", "conversation"):
        kinds = KEYED if kind == "drill" else SINGLE
        turns = [any_question(scene, rng, kinds)[1] for _ in range(rng.randint(4, 8))]  # many questions per read
        return {"text": build_prompt([(1 if i == 0 else 0, q, a) for i, (q, a) in enumerate(turns)]), "notes": [note]}
    if kind == "caption":
        return {"text": caption(scene), "notes": [note]}
    if kind == "describe":
        return {"text": build_prompt([(1, rng.choice(DESCRIBE), caption(scene))]), "notes": [note]}
    if kind == "compare":
        other = random_scene(rng, p_word=0.8)
        turns = [qa for qa in (compare(scene, other, rng) for _ in range(rng.randint(1, 4))) if qa]
        return turns and {"text": build_prompt([(2 if i == 0 else 0, *qa) for i, qa in enumerate(turns)]),
                          "notes": [note, notes(other)]}
    raise ValueError(f"unknown document kind {kind!r}")


def stand_in_documents(scene, rng, kinds=None):
    """LLM pretraining documents about one scene, as {"text", "notes"}, one of each kind (lm_document;
    by default every kind of stand_ins.CURRICULUM): `text` is in the format train.py reads (a caption, or
    a conversation in the official template) and every <image> in it is read by the stand-in LLM as the
    next of `notes`, written in words (20 words and a full stop: as many tokens as an image's visual
    tokens).

    A real LLaMA has read text about text of every kind; ours, trained for a few minutes, is shown what
    the two stages will ask of it, with a description in words where the image will be: a caption
    written from the description (what stage 1 asks of the frozen LLM) and questions answered from it
    (what stage 2 asks), after listings that teach it to look a thing up in the description. It never
    sees an image: stage 1 must teach the ViT and the abstractor to say in visual tokens what the
    notes say in words."""
    docs = (lm_document(k, scene, rng) for k in (kinds or DOCUMENT_KINDS))
    return [d for d in docs if d]


def cell_labels(scene):
    """Per cell (reading order): [thing, colour or word, size] as class indices into THINGS, WHATS,
    SIZES_OR_NOTHING (the notes' words; the linear probes' targets)."""
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
