"""The synthetic world of the demo (owl/demo/world.py): determinism, images that show what the captions
say, questions whose answers follow from the scene, files train.py reads, a LLaMA-style tokenizer."""
import filecmp
import json
import random

import pytest

from owl import build_prompt
from owl.demo import files, world
from owl.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    paths = files.write_world(str(out), n_train=60, n_test=12, n_text=60, seed=3, questions_per_type=3, n_corpus=200,
                              n_pretrain=90, n_clip=30)
    return out, paths


def test_same_seed_same_world(small_world, tmp_path):
    out, paths = small_world
    again = files.write_world(str(tmp_path), n_train=60, n_test=12, n_text=60, seed=3, questions_per_type=3,
                            n_corpus=200, n_pretrain=90, n_clip=30)
    for key in ("alt_text", "captions", "labels", "instructions", "text_instructions", "test", "corpus", "tokenizer"):
        assert filecmp.cmp(paths[key], again[key], shallow=False), key
    for name in ("clip_00000.png", "pretrain_00000.png", "train_00000.png", "train_00059.png", "test_00011.png"):
        assert filecmp.cmp(out / "images" / name, tmp_path / "images" / name, shallow=False)
    other = files.write_world(str(tmp_path / "other"), n_train=60, n_test=12, n_text=60, seed=4, questions_per_type=3,
                            n_corpus=200, n_pretrain=90, n_clip=30)
    assert not filecmp.cmp(paths["captions"], other["captions"], shallow=False)


def test_images_show_the_captioned_scene():
    """The pixel at each shape's centre has the shape's colour; empty cells are background."""
    rng = random.Random(0)
    for _ in range(30):
        s = world.random_scene(rng)
        img = world.render(s, 56)  # no jitter: centres are exact
        for i, cell in enumerate(world.CELLS):
            row, col = divmod(i, 2)
            centre = img.getpixel((col * 28 + 14, row * 28 + 16))  # a little low: inside triangles too
            item = next((it for it in s.items if it.cell == cell), None)
            if item is not None:
                assert centre == world.COLOURS[item.colour], (world.caption(s), cell)
            elif s.word_cell != cell:
                assert centre == (245, 245, 240)


def test_questions_follow_from_the_scene():
    s = world.Scene([world.Item("circle", "red", "big", "top left"), world.Item("square", "blue", "small", "bottom right")],
                    word="cat", word_cell="top right")
    rng = random.Random(0)
    answers = {}
    for _ in range(200):
        for kind in world.SINGLE:
            qa = world.question(s, kind, rng)
            if qa:
                answers[qa[0]] = qa[1]
    expected = {"How many shapes are there?": "two", "What colour is the circle?": "red",
                "What colour is the shape at the bottom right?": "blue", "What shape is at the top left?": "circle",
                "Where is the blue square?": "bottom right", "Is there a red circle?": "yes",
                "Is there a red square?": "no", "Is there any text in the image?": "yes",
                "What does the text say?": "cat"}
    for q, a in expected.items():
        assert answers[q] == a, q
    one = world.Scene([world.Item("triangle", "green", "big", "bottom left")])
    assert world.question(one, "text", rng) is None
    for _ in range(20):
        q, a = world.compare(s, one, rng)
        if q == "Which image has more shapes?" or q == "Which image has a word written in it?":
            assert a == "the first image"
        elif q == "Which image has a green triangle?":
            assert a == "the second image"
    assert world.notes(s) == ("top left big red circle top right none word cat bottom left none none none "
                              "bottom right small blue square")
    assert world.caption(s) == ("There are two shapes: a big red circle at the top left and a small blue square "
                                "at the bottom right. The word cat is written at the top right.")


def test_files_are_in_the_formats_train_py_reads(small_world):
    from owl.train.data import load_examples
    out, paths = small_world
    tok = Tokenizer(paths["tokenizer"], 17)
    ex, st = load_examples([paths["captions"]], tok, 512)
    assert st.formats == {"caption": 90} and len(ex) == 90 and not st.missing  # stage 1 sees more images
    assert all("/images/pretrain_" in e.images[0] for e in ex)
    ex, st = load_examples([paths["instructions"], paths["text_instructions"]], tok, 512)
    assert st.formats["alpaca"] == 60 and st.formats["official"] > 60
    assert not st.missing and not st.mismatch and st.text_only == 60
    assert any(len(e.images) == 2 for e in ex)  # two-image comparisons
    with open(paths["instructions"]) as f:
        rows = [json.loads(line) for line in f]
    assert any(r["text"].count("AI: ") >= 2 for r in rows)  # multi-turn
    for r in rows:
        assert r["text"].count("<image>") == len(r["image"])
        assert all(p.startswith("images/train_") for p in r["image"])  # stage 2's own images
    describe = [r for r in rows if r.get("task_type") == "describe"]  # chat's first question, answered
    assert describe and all(r["text"].rstrip("\n").rpartition("AI: ")[2].startswith("There ") for r in describe)
    with open(paths["test"]) as f:
        tests = json.load(f)
    assert {t["type"] for t in tests} == set(world.QUESTION_TYPES)
    for t in tests:
        assert all(p.startswith("images/test_") for p in t["images"])  # held-out images only
        assert [c.startswith("There ") for c in t["captions"]] == [True] * len(t["images"])
        n_img = sum(turn[0] for turn in t["turns"])
        assert build_prompt([tuple(x) for x in t["turns"]]).count("<image>") == n_img == len(t["images"])


def test_tokenizer_has_llama_settings(small_world):
    _, paths = small_world
    tok = Tokenizer(paths["tokenizer"], 17)
    sp = tok.sp
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert sp.id_to_piece(3) == "<0x00>"  # byte fallback: 256 byte pieces after the specials
    text = "Résumé 2048 owls"  # characters and digits the world never uses
    ids = sp.encode(text)
    assert sp.decode(ids) == text
    assert [sp.id_to_piece(i) for i in sp.encode("2048")][-4:] == ["<0x32>", "<0x30>", "<0x34>", "<0x38>"]
    # the world's notes are one token per word, so their positions never move (the eight scene-text
    # words become single pieces only with the full world's amount of text: shapes only here)
    s = world.Scene([world.Item("triangle", "yellow", "small", "top right"), world.Item("circle", "green", "big", "bottom left")])
    assert len(sp.encode(world.notes(s))) == 20


def test_listings_read_each_value_after_its_key_in_the_notes():
    """Every listing's "key value" parts agree with the scene's notes (5 words per cell, the cell first):
    the lookups the stand-in LLM's curriculum teaches are the ones the notes answer."""
    rng = random.Random(0)
    for _ in range(300):
        scene = world.random_scene(rng, p_word=0.8)
        cells = world.notes(scene).split()
        cell = {" ".join(cells[i:i + 2]): cells[i + 2:i + 5] for i in range(0, 20, 5)}  # name -> size, what, thing
        pair = {(w[1], w[2]): name for name, w in cell.items() if w[2] in world.SHAPES}
        for kind in world.LISTINGS:
            qa = world.listing(scene, kind, rng)
            if qa is None:
                assert kind in ("colours of shapes", "positions")  # no shape there once
                continue
            assert qa[0] == world.LISTINGS[kind]
            for part in qa[1].split(", "):
                w = part.split()
                if kind in ("colours", "shapes", "sizes"):
                    size, colour, shape = cell[" ".join(w[:2])]
                    assert w[2] == {"colours": colour, "shapes": shape, "sizes": size}[kind]
                elif kind == "colours of shapes":
                    assert [c for (c, s) in pair if s == w[0]] == [w[1]]
                elif kind == "positions":
                    assert pair[(w[0], w[1])] == " ".join(w[2:])
                elif kind == "words":
                    assert w == ["none"] if not scene.word else cell[" ".join(w[:2])][1:] == ["word", w[2]]
                else:  # check
                    assert w[2] == ("yes" if (w[0], w[1]) in pair else "no")


def test_every_curriculum_phase_keeps_the_kinds_before_it():
    from owl.demo.stand_ins import CURRICULUM, phase
    assert sum(share for share, _ in CURRICULUM) == pytest.approx(1.0)
    for (_, before), (_, after) in zip(CURRICULUM, CURRICULUM[1:]):
        assert before.keys() <= after.keys()
    assert set(CURRICULUM[-1][1]) == set(world.DOCUMENT_KINDS)  # the last phase: every kind the corpus samples
    assert phase(0, 1000) is CURRICULUM[0][1] and phase(999, 1000) is CURRICULUM[-1][1]
    rng = random.Random(1)
    for kind in world.DOCUMENT_KINDS:  # conversations in the template, one note per <image>; captions bare
        doc = None
        while not doc:  # "colours of shapes" and "positions" need a shape that is there once
            doc = world.lm_document(kind, world.random_scene(rng, p_word=1.0), rng)
        images = 1 if kind == "caption" else doc["text"].count("<image>")  # train.py puts a caption's image first
        assert images == len(doc["notes"]) >= 1 and ("AI: " in doc["text"]) == (kind != "caption")
