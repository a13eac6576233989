"""Multiple choice. owl.score_choices against a teacher-forced recomputation with MplugOwl.forward on the
reference checkpoint (choices that merge across the prompt's "AI: " boundary too), batched == one by
one. owl/eval/choices.py on small files the tests write: the JSONL and MMBench-TSV readers (options as
a list or an object, answers as keys or texts, base64 images, shared images, CircularEval copies, bad
input named), MMBench's prompt, and --circular's rule (every rotation right) against scorers whose
behaviour is known: one that reads the options, one that always picks the first."""
import base64
import csv
import io
import json
import re
import shutil

import pytest
import torch
from PIL import Image

import owl
from owl.generate import visual_tokens
from tests.conftest import REF
from owl.eval.choices import ChoicesError, accuracy, evaluate, load_images, prompt_and_choices, read_questions


pytestmark = pytest.mark.usefixtures("one_thread")
IMG = f"{REF}/images/public_0.jpg"


# ----------------------------------------------------------------------------- owl.score_choices

def teacher_forced(model, tok, prompt, choice, images, normalize="sum"):
    """The choice's log-likelihood from one MplugOwl.forward over prompt + choice (no cache)."""
    full, head = tok.encode_prompt(prompt + choice), tok.encode_prompt(prompt)
    k = next(i for i in range(len(full)) if i >= len(head) or full[i] != head[i])
    px = torch.stack([owl.preprocess_image(im, 56) for im in images]) if images else None
    with torch.no_grad():
        logp = model(torch.tensor([full]), px)[0].float().log_softmax(-1)  # (T, vocab)
    s = sum(logp[i - 1, full[i]].item() for i in range(k, len(full)))
    return s / (len(full) - k) if normalize == "mean" else s


CHOICES = ["It is a cat.", "cat", "A dog on a red sofa, sleeping", "  two spaces", "1234", "\nno"]


@pytest.mark.parametrize("images", [1, 0])
def test_score_choices_equals_teacher_forcing_and_batched_equals_one_by_one(owl_model, images):
    model, tok = owl_model
    ims = [owl.load_image(IMG)] * images
    prompt = owl.build_prompt([(images, "What is in the picture?", None)])
    head = tok.encode_prompt(prompt)
    merged = [c for c in CHOICES if tok.encode_prompt(prompt + c)[:len(head)] != head]
    assert len(merged) >= 3  # the template's trailing space merges into these: the last prompt token is rescored
    for normalize in ("sum", "mean"):
        got = owl.score_choices(model, tok, prompt, CHOICES, ims, normalize=normalize)
        want = [teacher_forced(model, tok, prompt, c, ims, normalize) for c in CHOICES]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=0)
        alone = [owl.score_choices(model, tok, prompt, [c], ims, normalize=normalize)[0] for c in CHOICES]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(alone), atol=1e-5, rtol=0)
    assert len(set(got)) == len(got)  # distinct scores: the rows were not mixed up
    if images:  # visual tokens computed beforehand give the same
        embeds = visual_tokens(model, ims)
        assert owl.score_choices(model, tok, prompt, CHOICES, image_embeds=embeds, normalize="mean") == got
    for bad, msg in [([""], "adds no token"), (["<image>"], "none with <image>"), ([], "at least one")]:
        with pytest.raises(ValueError, match=msg):
            owl.score_choices(model, tok, prompt, bad, ims)


def png_b64(colour):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_tsv(path, rows, columns=("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image")):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, columns, delimiter="\t")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in columns})
    return str(path)


# ----------------------------------------------------------------------------- readers

def test_jsonl_reader(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    f = write_jsonl(tmp_path / "q.jsonl", [
        {"id": "q1", "image": "a.png", "question": "Colour?", "options": ["red", "blue"], "answer": "A"},
        {"id": "q2", "image": ["a.png", "a.png"], "question": "Same?", "options": {"Y": "yes", "N": "no"},
         "answer": "yes", "hint": "Look twice."},
        {"question": "No image, no answer?", "options": ["x", "y", "z"]}])
    (q1, q2, q3), notes = read_questions(f)
    assert notes == [] and q1.options == {"A": "red", "B": "blue"} and q1.answer == "A"
    assert q1.images == [("path", str(tmp_path / "a.png"))] and len(load_images(q1)) == 1
    assert q2.options == {"Y": "yes", "N": "no"} and q2.answer == "Y" and q2.hint == "Look twice."
    assert len(load_images(q2)) == 2
    assert q3.id == 3 and q3.answer is None and q3.images == [] and list(q3.options) == ["A", "B", "C"]
    for rows, msg in [([{"question": "q", "options": ["x"]}], r"q\.jsonl:1: \"options\" must be .* at least 2"),
                      ([{"question": "q"}], r"q\.jsonl:1: a question needs \"question\" and \"options\""),
                      ([{"question": "q", "options": ["x", "y"], "answer": "C"}], r":1: answer 'C' is neither"),
                      ([{"question": "q", "options": ["x", "y"], "image": "gone.png"}], r":1: no such image .*gone\.png"),
                      ([{"id": 1, "question": "q", "options": ["x", "y"]}] * 2, "duplicate question ids")]:
        with pytest.raises(ChoicesError, match=msg):
            read_questions(write_jsonl(tmp_path / "q.jsonl", rows))
    (tmp_path / "q.jsonl").write_text('{"question": "q", "options": ["x", "y"]}\n{"question": \n')
    with pytest.raises(ChoicesError, match=r"q\.jsonl:2: not valid JSON"):
        read_questions(str(tmp_path / "q.jsonl"))


def test_mmbench_tsv_reader(tmp_path):
    f = write_tsv(tmp_path / "mmb.tsv", [
        {"index": 0, "question": "Colour?", "hint": "nan", "A": "red", "B": "blue", "C": "green", "D": "",
         "answer": "A", "image": png_b64("red")},
        {"index": 1, "question": "Yes?", "hint": "It is a test.", "A": "yes", "B": "no", "answer": "B", "image": "0"},
        {"index": 1000000, "question": "Colour?", "A": "blue", "B": "green", "C": "red", "answer": "C", "image": "0"}])
    (q0, q1), notes = read_questions(f)
    assert notes == [f"{f}: skipped 1 CircularEval copies (rows index + k * 1,000,000)"]
    assert q0.id == 0 and q0.options == {"A": "red", "B": "blue", "C": "green"} and q0.hint == "" and q0.answer == "A"
    assert q1.options == {"A": "yes", "B": "no"} and q1.hint == "It is a test." and q1.answer == "B"
    assert load_images(q1)[0].getpixel((0, 0)) == (255, 0, 0)  # row 0's image, by reference
    broken = write_tsv(tmp_path / "broken.tsv", [{"index": 2, "question": "Broken", "A": "x", "B": "y",
                                                  "image": "%%% not base64"}])
    with pytest.raises(owl.ImageError, match=r"broken\.tsv: index 2: the image field is not valid base64"):
        read_questions(broken)  # report 2.17: found when the file is read, before the model loads
    bad = write_tsv(tmp_path / "bad.tsv", [{"index": 0, "question": "q", "A": "x"}], columns=("index", "question", "A"))
    with pytest.raises(ChoicesError, match=r"bad\.tsv: an MMBench-style TSV needs .* \(missing: B\)"):
        read_questions(bad)
    one = write_tsv(tmp_path / "one.tsv", [{"index": 5, "question": "q", "A": "x", "B": "nan"}])
    with pytest.raises(ChoicesError, match=r"one\.tsv: index 5: fewer than 2 options"):
        read_questions(one)
    with pytest.raises(ChoicesError, match=r"q\.csv: expected a \.jsonl or an MMBench-style \.tsv"):
        (tmp_path / "q.csv").write_text("x")
        read_questions(str(tmp_path / "q.csv"))


def test_the_prompts():
    from owl.eval.choices import Question
    q = Question(7, "Which colour?", {"A": "red", "B": "blue"}, "A", hint="A hint.")
    prompt, choices = prompt_and_choices(q, q.options, 1, list_options=True)
    assert prompt == owl.SYSTEM + ("Human: <image>\nHuman: Hint: A hint.\nQuestion: Which colour?\nOptions:\n"
                                   "A. red\nB. blue\nPlease select the correct answer from the options above.\nAI: ")
    assert choices == ["A", "B"]
    prompt, choices = prompt_and_choices(q, q.options, 0, list_options=False)
    assert prompt == owl.SYSTEM + "Human: A hint.\nWhich colour?\nAI: " and choices == ["red", "blue"]


# ----------------------------------------------------------------------------- CircularEval

def reads_the_options(prompt, choices, images):
    """Picks the letter the prompt shows next to 'cat' (a model that understood the question)."""
    shown = dict(re.findall(r"^([A-Z])\. (.*)$", prompt, flags=re.M))
    return [1.0 if shown[c] == "cat" else 0.0 for c in choices]


def first_option(prompt, choices, images):
    """Always the first option (a model with only a position bias)."""
    return [1.0] + [0.0] * (len(choices) - 1)


def test_circular_counts_a_question_right_only_if_every_rotation_is(tmp_path):
    f = write_jsonl(tmp_path / "q.jsonl", [
        {"id": "a", "question": "Which is a cat?", "options": ["cat", "dog", "cow"], "answer": "A"},
        {"id": "b", "question": "Which is a cat?", "options": ["dog", "cat"], "answer": "B"},
        {"id": "c", "question": "Which is a cat?", "options": ["cow", "cat", "dog", "pig"]}])
    qs, _ = read_questions(f)
    calls = []

    def counting(prompt, choices, images):
        calls.append(prompt)
        return reads_the_options(prompt, choices, images)
    plain = evaluate(qs, counting, list_options=True)
    assert len(calls) == 3 and accuracy(plain) == (2, 2) and [r["prediction"] for r in plain] == ["A", "B", "B"]
    circ = evaluate(qs, counting, list_options=True, circular=True)
    assert len(calls) == 3 + 3 + 2 + 4 and accuracy(circ) == (2, 2)  # one call per rotation
    assert [r["rotations"] for r in circ] == [["A"] * 3, ["B"] * 2, ["B"] * 4]  # always the cat, in file letters
    assert circ[2]["correct"] is None and circ[0]["scores"] == {"A": 1.0, "B": 0.0, "C": 0.0}
    # a position bias passes the plain evaluation where the answer happens to be A, and never CircularEval
    assert accuracy(evaluate(qs, first_option, list_options=True)) == (1, 2)
    biased = evaluate(qs, first_option, list_options=True, circular=True)
    assert accuracy(biased) == (0, 2) and biased[0]["rotations"] == ["A", "B", "C"]
    with pytest.raises(ChoicesError, match="--circular needs --list-options"):
        evaluate(qs, first_option, circular=True)


# ----------------------------------------------------------------------------- python -m owl.eval choices

def test_eval_choices_writes_predictions_and_accuracy(owl_model, tmp_path, capsys):
    from tests.test_chat import CK, one_line_error, run_eval
    model, tok = owl_model
    shutil.copy(IMG, tmp_path / "p0.jpg")  # an image path stays inside the file's folder (report 6.6)
    f = write_jsonl(tmp_path / "q.jsonl", [
        {"id": "q1", "image": "p0.jpg", "question": "What is it?", "options": ["a cat", "a dog", "a car"], "answer": "A"},
        {"id": "q2", "image": "p0.jpg", "question": "Is it red?", "options": {"Y": "yes", "N": "no"}, "answer": "no"},
        {"id": "q3", "question": "Two plus two?", "options": ["4", "5"], "hint": "Count."}])
    out = tmp_path / "preds.jsonl"
    r = run_eval(capsys, "choices", f, "--model", CK, "--out", str(out), "--list-options", "--circular")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(l) for l in open(out)]
    assert [x["id"] for x in recs] == ["q1", "q2", "q3"] and [x["answer"] for x in recs] == ["A", "N", None]
    qs, _ = read_questions(f)
    for q, rec in zip(qs, recs):  # the file holds what owl.score_choices gives for the first ordering
        prompt, letters = prompt_and_choices(q, q.options, len(q.images), list_options=True)
        want = owl.score_choices(model, tok, prompt, letters, load_images(q))
        assert list(rec["scores"]) == list(q.options) and list(rec["scores"].values()) == pytest.approx(want, abs=1e-5)
        assert rec["prediction"] == rec["rotations"][0] == max(rec["scores"], key=rec["scores"].get)
        assert len(rec["rotations"]) == len(q.options)
        assert rec["correct"] == (None if q.answer is None else all(p == q.answer for p in rec["rotations"]))
    right = sum(bool(x["correct"]) for x in recs)
    assert r.stdout.strip().splitlines()[-1] == f"CircularEval accuracy: {50 * right:.2f}% ({right} of 2)"
    # an MMBench TSV, the options' texts scored per token
    tsv = write_tsv(tmp_path / "mmb.tsv", [{"index": i, "question": "Colour?", "A": "red", "B": "blue", "answer": "B",
                                             "image": png_b64("blue")} for i in range(2)])
    r = run_eval(capsys, "choices", tsv, "--model", CK, "--out", str(out), "--normalize", "mean")
    assert r.returncode == 0 and "accuracy: " in r.stdout and len(open(out).readlines()) == 2
    one_line_error(run_eval(capsys, "choices", f, "--model", CK, "--out", str(out), "--circular"),
                   "--circular needs --list-options")
    one_line_error(run_eval(capsys, "choices", str(tmp_path / "gone.jsonl"), "--model", CK, "--out", str(out)),
                   "no such file")
    one_line_error(run_eval(capsys, "choices", f, "--model", CK), "the following arguments are required: --out")
