"""owl/train/data.py: every format -> the official template; ids and loss labels against hand-built
expectations (official xgpt3 tokenisation); truncation; bad input; the step-wise data order."""
import json
import os
import re

import pytest
import torch
from PIL import Image

import owl
from owl.train.batches import OwlDataset, StepBatches, collate
from owl.model import lm_loss_sum
from owl.train.data import (DataError, detect, load_examples, read_records, to_template, tokenize_caption,
                            tokenize_conversation)
from owl.tokenizer import IGNORE, IMAGE_SLOT
from tests.conftest import REF

S = owl.SYSTEM
X = IGNORE


@pytest.fixture(scope="module")
def tok(ref):
    return owl.load_tokenizer(os.path.join(ref, "mplug_owl"), 65)


def E(tok, s):
    return tok.sp.encode(s)


# ----------------------------------------------------------------------------- formats -> template

FORMATS = [
    ("caption", {"image": "a.png", "caption": " a red cube "}, "a red cube", ["a.png"]),
    ("official", {"image": ["a.png"], "text": S + "Human: <image>\nHuman: q\nAI: a"},
     S + "Human: <image>\nHuman: q\nAI: a", ["a.png"]),
    ("llava", {"image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cube."},
        {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Red."}]},
     S + "Human: <image>\nHuman: What is it?\nAI: A cube.\nHuman: Colour?\nAI: Red.\n", ["a.png"]),
    ("llava", {"image": "a.png", "conversations": [  # the tag after the question, and no tag at all
        {"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "A cube."}]},
     S + "Human: <image>\nHuman: What is it?\nAI: A cube.\n", ["a.png"]),
    ("sharegpt", {"conversations": [
        {"from": "gpt", "value": "(leading bot turn, dropped)"}, {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye."},
        {"from": "human", "value": "(trailing, unanswered)"}]},
     S + "Human: Hi\nAI: Hello!\nHuman: Bye\nAI: Bye.\n", []),
    ("alpaca", {"instruction": "Add.", "input": "1 and 2", "output": "3"}, S + "Human: Add.\n1 and 2\nAI: 3\n", []),
    ("alpaca", {"instruction": "Say hi.", "input": "", "output": "hi"}, S + "Human: Say hi.\nAI: hi\n", []),
    ("baize", {"topic": "x", "input": "The conversation between human and AI assistant.\n[|Human|] Hi there\n"
                                      "[|AI|] Hello.\n[|Human|] How?\n[|AI|] Well.\n[|Human|] "},
     S + "Human: Hi there\nAI: Hello.\nHuman: How?\nAI: Well.\n", []),
]


@pytest.mark.parametrize("fmt,rec,text,images", FORMATS)
def test_each_format_becomes_the_official_template(fmt, rec, text, images):
    assert detect(rec) == fmt
    assert to_template(fmt, rec) == (text, images)


def test_unknown_record_and_malformed_line_name_the_place(tmp_path, tok):
    f = tmp_path / "d.jsonl"
    f.write_text('{"caption": "x", "image": "a.png"}\n\n{"caption": "y", "image": \n')
    with pytest.raises(DataError, match=r"d\.jsonl:3: not valid JSON"):
        read_records(str(f))
    g = tmp_path / "e.json"
    g.write_text('[{"foo": 1}]')
    with pytest.raises(DataError, match=r"e\.json\[0\]: unknown record format \(keys: foo\)"):
        load_examples([str(g)], tok, 512)
    h = tmp_path / "f.json"
    h.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": }]')
    with pytest.raises(DataError, match=r"f\.json:2: not valid JSON"):
        read_records(str(h))


# ----------------------------------------------------------------------------- ids and labels

def test_multimodal_two_turn_ids_and_labels_match_the_official_chunking(tok):
    text = S + "Human: <image>\nHuman: What is it?\nAI: A red cube.\nHuman: Why?\nAI: Because.\n"
    ids, labels, n_img, cut = tokenize_conversation(tok, text, 2048)
    sys_line = S.rstrip("\n")  # the official split takes "\nHuman: " as a chunk of its own
    want = [  # (ids, carries loss)
        ([tok.bos_id], 0), (E(tok, sys_line), 0), (E(tok, "\nHuman: "), 0), ([IMAGE_SLOT] * 65, 0),
        (E(tok, "\nHuman: "), 0), (E(tok, "What is it?\n"), 0), (E(tok, "AI: "), 0),
        (E(tok, "A red cube.") + [tok.eos_id], 1),
        (E(tok, "\nHuman: "), 0), (E(tok, "Why?\n"), 0), (E(tok, "AI: "), 0),
        (E(tok, "Because.") + [tok.eos_id], 1)]
    assert ids == [i for p, _ in want for i in p]
    assert labels == [i if loss else X for p, loss in want for i in p]
    assert (n_img, cut) == (1, False)
    # what lm_loss_sum scores: exactly the two answers and their EOS
    logits = torch.zeros(1, len(ids), tok.vocab_size)
    _, n = lm_loss_sum(logits, torch.tensor([labels]))
    assert n == len(E(tok, "A red cube.")) + len(E(tok, "Because.")) + 2
    scored = [l for l in labels if l != X]
    k = scored.index(tok.eos_id)
    assert tok.decode(scored[:k]) == "A red cube." and tok.decode(scored[k + 1:]) == "Because."
    assert scored.count(tok.eos_id) == 2 and scored[-1] == tok.eos_id


def test_text_only_and_caption_labels(tok):
    ids, labels, n_img, _ = tokenize_conversation(tok, S + "Human: Add.\nAI: 3\n", 2048)
    head = [tok.bos_id] + E(tok, S.rstrip("\n")) + E(tok, "\nHuman: ") + E(tok, "Add.\n") + E(tok, "AI: ")
    assert ids == head + E(tok, "3") + [tok.eos_id] and n_img == 0
    assert labels == [X] * len(head) + E(tok, "3") + [tok.eos_id]
    ids, labels, n_img, _ = tokenize_caption(tok, "a red cube", 2048)
    assert ids == [tok.bos_id] + [IMAGE_SLOT] * 65 + E(tok, "a red cube") + [tok.eos_id]
    assert labels == [X] * 66 + E(tok, "a red cube") + [tok.eos_id] and n_img == 1


def test_truncation_never_cuts_an_image_and_keeps_the_answer_eos(tok):
    text = S + "Human: <image>\nHuman: <image>\nHuman: Compare.\nAI: The first is larger than the second.\n"
    full, _, n_img, _ = tokenize_conversation(tok, text, 2048)
    assert n_img == 2
    first_img_end = full.index(-1) + 65
    for L in range(first_img_end, first_img_end + 70):  # anywhere inside / around the second image
        ids, labels, n, cut = tokenize_conversation(tok, text, L)
        assert len(ids) <= L and cut and ids.count(IMAGE_SLOT) == 65 * n
        if n == 1:  # the second image did not fit: dropped whole, nothing after it
            assert ids.count(IMAGE_SLOT) == 65 and all(l == X for l in labels)
    # cut inside the answer: the answer is shortened and still ends with EOS, which carries the loss
    L = len(full) - 3
    ids, labels, n, cut = tokenize_conversation(tok, text, L)
    assert len(ids) == L and ids[-1] == tok.eos_id == labels[-1] and cut and n == 2
    assert ids[:-1] == full[:L - 1]


def test_load_examples_counts_missing_images_mismatches_and_too_long(tmp_path, tok):
    Image.new("RGB", (30, 20), "red").save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    recs = [{"image": "ok.png", "caption": "fine"}, {"image": "gone.png", "caption": "missing"},
            {"image": "broken.png", "caption": "corrupt"},
            {"image": ["ok.png"], "text": S + "Human: <image>\nHuman: <image>\nHuman: q\nAI: a"},
            {"instruction": "long " * 300, "output": "x"}, {"instruction": "short", "output": "y"}]
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in recs))
    ex, st = load_examples([str(f)], tok, 200, check_images=True)
    assert [e.fmt for e in ex] == ["caption", "alpaca"]
    assert ex[0].images == [str(tmp_path / "ok.png")]  # relative to the data file
    assert len(st.missing) == 2 and st.bad_examples == 2 and len(st.mismatch) == 1
    assert st.too_long == 1 and st.dropped_long == 1
    assert st.formats == {"caption": 3, "official": 1, "alpaca": 2}
    ex2, _ = load_examples([str(f)], tok, 200, image_root=str(tmp_path / "elsewhere"))
    assert [e.fmt for e in ex2] == ["alpaca"]  # --image-root: ok.png is not there


def test_collate_pads_right_and_keeps_image_order(tmp_path, tok):
    for i, c in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (20, 20), c).save(tmp_path / f"{i}.png")
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"image": ["0.png", "1.png"], "text": S + "Human: <image>\nHuman: <image>\nHuman: q\nAI: a"},
        {"image": "2.png", "caption": "blue"}, {"instruction": "hi", "output": "yo"}]))
    ex, _ = load_examples([str(f)], tok, 512)
    ds = OwlDataset(ex, 56)
    b = collate([ds[0], ds[1], ds[2]])
    assert b["input_ids"].shape[0] == 3 and b["pixel_values"].shape == (3, 3, 56, 56)
    assert b["pixel_values"][:, 0].mean((1, 2)).argmax() == 0  # red first
    assert b["pixel_values"][2, 2].mean() > b["pixel_values"][2, 0].mean()  # blue last
    n0 = len(ex[0].ids)
    assert b["input_ids"][0, :n0].tolist() == ex[0].ids
    assert (b["labels"][1, len(ex[1].ids):] == X).all() and (b["input_ids"] == IMAGE_SLOT).sum() == 3 * 65


def test_step_batches_partition_the_same_examples_per_step():
    """Optimizer step s sees the same examples for batch 4, accumulation 2 x 2 and 2 ranks x 2."""
    def step_sets(B, A, W, steps=5):
        per_rank = [list(StepBatches(7, B, A, steps, seed=3, rank=r, world=W, start_step=0)) for r in range(W)]
        return [sorted(sum((per_rank[r][s * A + m] for r in range(W) for m in range(A)), []))
                for s in range(steps)]
    ref = step_sets(4, 1, 1)
    assert step_sets(2, 2, 1) == ref == step_sets(2, 1, 2) == step_sets(1, 2, 2)
    assert len({i for s in ref[:2] for i in s}) == 7  # epoch 1 covers all 7 before repeating
    at = lambda start: list(StepBatches(7, 2, 1, 5, seed=3, rank=0, world=1, start_step=start))
    assert at(2) == at(0)[2:]  # resume = the step


# ----------------------------------------------------------------------------- the red-team cases (shared/design/redteam.md)

def test_records_with_fields_of_the_wrong_type_are_skipped_and_counted(tmp_path, tok, capsys):
    """Report 5.9 (null/number fields, conversations of strings, "image": 5: tracebacks naming no
    record), 5.10 ("caption": null trained the text "None", a list its repr, a null value the
    question "None")."""
    Image.new("RGB", (20, 20), "red").save(tmp_path / "ok.png")
    conv = lambda *v: [{"from": "human", "value": v[0]}, {"from": "gpt", "value": v[1]}]
    bad = [{"image": "ok.png", "caption": None}, {"image": "ok.png", "caption": ["a", "b"]},
           {"image": "ok.png", "conversations": conv(None, "x")}, {"image": "ok.png", "conversations": ["hi", "there"]},
           {"image": 5, "conversations": conv("q", "a")}, {"image": {"path": "ok.png"}, "caption": "c"},
           {"instruction": "q", "input": None, "output": "a"}, {"instruction": "q", "output": None},
           {"instruction": 123, "output": "a"}]
    good = [{"image": "ok.png", "caption": "a red square"}, {"instruction": "q", "output": "a"}]
    f = tmp_path / "d.json"
    f.write_text(json.dumps(bad + good))
    ex, st = load_examples([str(f)], tok, 512)
    assert [e.where for e in ex] == [f"{f}[9]", f"{f}[10]"]
    assert [w.split(": ", 1)[0] for w in st.bad_records] == [f"{f}[{i}]" for i in range(9)]
    assert st.bad_records[0] == f"{f}[0]: caption is null, not a string"
    assert st.bad_records[4] == f"{f}[4]: image is 5, not a path or a list of paths"
    assert "records with fields of the wrong type (skipped): 9 (first: " in st.report()
    assert not any("None" in tok.decode([i for i in e.ids if i >= 0]) for e in ex)
    from tests.conftest import ROOT, run_script
    r = run_script(capsys, os.path.join(ROOT, "train.py"), "--check-data", "--init", os.path.join(REF, "mplug_owl"),
                   "--data", f)  # the command: no traceback, the count and the first records named
    assert r.returncode == 0 and f"wrong type (skipped): 9 (first: {f}[0]: caption is null" in r.stdout, r.stderr

def test_bad_text_is_replaced_or_one_line(tmp_path, tok, capsys):
    """Report 5.6 (a JSON-escaped lone surrogate: a sentencepiece traceback), 5.7 (a latin-1 byte:
    UnicodeDecodeError naming no file)."""
    Image.new("RGB", (20, 20), "red").save(tmp_path / "ok.png")
    f = tmp_path / "s.jsonl"
    f.write_text('{"image": "ok.png", "caption": "bad \\ud83d here"}\n{"image": "ok.png", "caption": "fine"}\n')
    ex, st = load_examples([str(f)], tok, 512)
    assert len(ex) == 2 and st.replaced == [f"{f}:1"] and "replaced by U+FFFD): 1" in st.report()
    assert tok.decode([i for i in ex[0].ids if i >= 0]) == "bad \ufffd here"
    g = tmp_path / "latin1.jsonl"
    g.write_bytes(b'{"image": "ok.png", "caption": "fine"}\n{"image": "ok.png", "caption": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(g))}:2: not UTF-8 text \(byte 0xe9\); re-save it as UTF-8$"):
        read_records(str(g))
    from tests.conftest import ROOT, one_line, run_script
    r = run_script(capsys, os.path.join(ROOT, "train.py"), "--check-data", "--init", os.path.join(REF, "mplug_owl"),
                   "--data", g)
    one_line(r, f"{g}:2: not UTF-8 text")


def test_the_data_rows_that_were_clear_stay_so(tmp_path, tok, capsys):
    """Report 5.2 (an empty file, [], blank lines), 5.3 (no answer; an Alpaca record without output),
    5.5 (CJK, Arabic, emoji, NUL, ZWSP captions), 5.8 (a UTF-8 BOM), 5.15 (--max-length too short for a
    caption): as before this branch, one line or a count (a guard against regressions)."""
    from tests.conftest import ROOT, one_line, run_script
    Image.new("RGB", (20, 20), "red").save(tmp_path / "ok.png")
    s1 = lambda data, *extra: ["--stage", "1", "--vision-init", os.path.join(REF, "hf_clip"), "--llm-init",
                               os.path.join(REF, "hf_llama"), "--data", data, "--out", tmp_path / "o", *extra]
    for name, text in (("empty.jsonl", ""), ("list.json", "[]"), ("blank.jsonl", "\n\n  \n")):
        (tmp_path / name).write_text(text)
        one_line(run_script(capsys, os.path.join(ROOT, "train.py"), *s1(tmp_path / name)),
                 f"no usable training example in {tmp_path / name}")
    (tmp_path / "c.jsonl").write_text(json.dumps({"image": "ok.png", "caption": "a red square"}) + "\n")
    one_line(run_script(capsys, os.path.join(ROOT, "train.py"), *s1(tmp_path / "c.jsonl", "--max-length", "10")),
             "--max-length 10 leaves no room for a caption")
    f = tmp_path / "noans.json"
    f.write_text(json.dumps([{"image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nq"}]}]))
    assert load_examples([str(f)], tok, 512)[1].empty == [f"{f}[0]"]
    f.write_text(json.dumps([{"instruction": "q", "input": ""}]))
    with pytest.raises(DataError, match=r"noans\.json\[0\]: unknown record format \(keys: input, instruction\)"):
        load_examples([str(f)], tok, 512)
    caps = ["猫が座っている", "قطة جالسة", "🐱" * 100, "nul \0 here", "zero\u200bwidth", "кошка"]
    f = tmp_path / "u.jsonl"
    f.write_text("".join(json.dumps({"image": "ok.png", "caption": c}) + "\n" for c in caps), encoding="utf-8")
    ex, _ = load_examples([str(f)], tok, 512)
    assert len(ex) == len(caps) and all(e.labels[-1] == tok.eos_id for e in ex)
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps({"image": "ok.png", "caption": "x"}).encode() + b"\n")
    with pytest.raises(DataError, match=r"bom\.jsonl:1: not valid JSON \(Unexpected UTF-8 BOM"):
        read_records(str(f))
