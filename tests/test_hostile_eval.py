"""The evaluation side of ../shared/design/redteam-2.md (issue 22), one test per row, named by its row:
what a hostile questions file, image or output path does to `python -m owl.eval` and chat. Each was
a traceback, a silent wrong result or a lost file before; now it is one line naming the file/row."""
import base64
import html
import json
import math
import os
import shutil

import pytest
from PIL import Image
import PIL.EpsImagePlugin

import owl
from owl.eval import choices, owleval
from owl.eval.choices import ChoicesError, read_questions
from tests.conftest import REF
from tests.test_chat import CK, MINI, one_line_error, run_eval, run_main

pytestmark = pytest.mark.usefixtures("one_thread")
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto 10 10 lineto stroke\nshowpage\n"


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def owleval_dir(tmp_path, name="ow", questions=None):
    d = tmp_path / name
    shutil.copytree(MINI, d)
    if questions is not None:
        jsonl(d / "questions.jsonl", questions)
    return d


def mc_file(tmp_path, rows, name="q.jsonl"):
    shutil.copy(f"{REF}/images/public_0.jpg", tmp_path / "p0.jpg")
    return jsonl(tmp_path / name, rows)


# ----------------------------------------------------------------------------- 6.5 one decoder policy

@pytest.fixture
def no_ghostscript(monkeypatch):
    def reached(*a, **k):
        raise AssertionError("Ghostscript was reached")
    monkeypatch.setattr(PIL.EpsImagePlugin, "Ghostscript", reached)


def test_6_5_eps_named_jpg_never_reaches_ghostscript(tmp_path, capsys, no_ghostscript):
    (tmp_path / "eps.jpg").write_bytes(EPS)
    with pytest.raises(owl.ImageError, match=r"eps\.jpg: cannot read image"):
        owl.load_image(str(tmp_path / "eps.jpg"))
    with pytest.raises(owl.ImageError, match=r"shard/e0001\.jpg: cannot read image"):
        owl.image.decode_image(EPS, "shard/e0001.jpg")  # a tar member, a base64 field
    r = run_main(capsys, "--image", str(tmp_path / "eps.jpg"), "--prompt", "hi")  # chat --image
    one_line_error(r, "eps.jpg", "cannot read image")
    tsv = tmp_path / "eps.tsv"
    tsv.write_text("index\tquestion\tA\tB\timage\n0\tq\tx\ty\t" + base64.b64encode(EPS).decode() + "\n")
    with pytest.raises(owl.ImageError, match=r"eps\.tsv: index 0: cannot read image"):
        read_questions(str(tsv))  # MMBench base64, found before the model loads (2.17 too)
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"):  # the formats a model needs still open
        Image.new("RGB", (4, 4), "red").save(tmp_path / f"ok.{fmt}", format=fmt)
        assert owl.load_image(str(tmp_path / f"ok.{fmt}")).size == (4, 4)


# ----------------------------------------------------------------------------- 6.6 images stay inside

@pytest.mark.parametrize("image", ["../../outside.png", "ABS"])
def test_6_6_owleval_image_outside_cases_is_refused(tmp_path, capsys, image):
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    image = str(tmp_path / "outside.png") if image == "ABS" else image
    d = owleval_dir(tmp_path, questions=[{"image": image, "question_id": 1, "question": "q"}])
    r = run_eval(capsys, "owleval", d, "--model", CK, "--out", tmp_path / "a.jsonl")
    one_line_error(r, "questions.jsonl:1", "outside")


def test_6_6_choices_image_outside_the_file_folder_is_refused(tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    for image in ["../secret.png", str(tmp_path / "secret.png"), ["ok.png", "../secret.png"]]:
        q = jsonl(tmp_path / "sub" / "q.jsonl", [{"question": "q", "options": ["a", "b"], "image": image}])
        r = run_eval(capsys, "choices", q, "--model", CK, "--out", tmp_path / "p.jsonl")
        one_line_error(r, "q.jsonl:1", "outside")
    q = jsonl(tmp_path / "sub" / "q.jsonl", [{"question": "q", "options": ["a", "b"], "image": "secret.png"}])
    (qs, _) = read_questions(str(q), image_root=str(tmp_path))  # an explicit --image-root is the root
    assert qs[0].images == [("path", os.path.realpath(tmp_path / "secret.png"))]


# ----------------------------------------------------------------------------- 6.3 the rating page

def test_6_3_rating_page_escapes_what_it_did_not_write(tmp_path):
    evil = "3'><script>alert('xss')</script><b x='"
    qs = [{"image": "3.jpg", "question_id": evil, "question": "<img src=x onerror=alert(1)>"}]
    recs = [owleval.record(qs[0], "</div><script>a()</script>", "m'><script>")]
    page = tmp_path / "p.html"
    owleval.write_html(recs, qs, {"other\"'><script>": {evil: "<script>b()</script>"}}, str(MINI), str(page),
                       "m'><script>")
    text = page.read_text()
    assert "<script>" not in text.replace("<script>const KEY", "", 1) and text.count("<script") == 1
    assert html.escape(evil, quote=True) in text


# ----------------------------------------------------------------------------- 3.5-3.9 outputs

def test_3_5_choices_out_equal_to_the_questions_is_refused(tmp_path, capsys):
    q = mc_file(tmp_path, [{"question": "q", "options": ["a", "b"]}])
    before = q.read_text()
    one_line_error(run_eval(capsys, "choices", q, "--model", CK, "--out", q), "--out", "questions file")
    notes = tmp_path / "notes.txt"
    notes.write_text("My thesis notes\n")
    one_line_error(run_eval(capsys, "choices", q, "--model", CK, "--out", notes), "notes.txt", "not predictions")
    assert q.read_text() == before and notes.read_text() == "My thesis notes\n"


def test_3_6_html_equal_to_out_or_to_an_input_is_refused(tmp_path, capsys):
    d, out = owleval_dir(tmp_path), tmp_path / "a.jsonl"
    one_line_error(run_eval(capsys, "owleval", d, "--model", CK, "--out", out, "--html", out), "--html", "--out")
    one_line_error(run_eval(capsys, "owleval", d, "--model", CK, "--out", out, "--html", d / "questions.jsonl"),
                   "--html", "questions.jsonl")
    one_line_error(run_eval(capsys, "owleval", d, "--model", CK, "--out", d / "cases" / "3.jpg"), "--out", "cases")
    page = tmp_path / "mine.html"
    page.write_text("<html>my own page</html>")
    one_line_error(run_eval(capsys, "owleval", d, "--model", CK, "--out", out, "--html", page), "not an OwlEval page")
    assert (d / "questions.jsonl").read_text() == open(f"{MINI}/questions.jsonl").read()


def test_3_7_a_one_line_text_file_is_not_taken_for_a_torn_answers_file(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    for text in ["My thesis notes\n", "My thesis notes"]:
        notes.write_text(text)
        one_line_error(run_eval(capsys, "owleval", MINI, "--model", CK, "--out", notes), "notes.txt", "not an answers")
        assert notes.read_text() == text


def test_3_8_an_answer_to_another_question_is_never_reused(tmp_path, capsys):
    other = owleval_dir(tmp_path, "other", [{"image": "3.jpg", "question_id": 3, "question": "Another question?"}])
    out = jsonl(tmp_path / "a.jsonl", [owleval.record({"image": "3.jpg", "question_id": 3, "question": "What?"},
                                                      "an answer", "m")])
    before = out.read_text()
    r = run_eval(capsys, "owleval", other, "--model", CK, "--out", out, "--model-id", "m")
    one_line_error(r, "a.jsonl", "question 3", "another question")
    assert out.read_text() == before


def test_3_9_a_reused_out_keeps_the_answers_of_other_questions(tmp_path, capsys):
    earlier = [owleval.record({"image": "x.jpg", "question_id": i, "question": f"q{i}"}, f"a{i}", "m")
               for i in (100, 101)]
    out = jsonl(tmp_path / "a.jsonl", earlier)
    r = run_eval(capsys, "owleval", MINI, "--model", CK, "--out", out, "--model-id", "m", "--max-new-tokens", "2")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in open(out)]
    assert rows[:2] == earlier and [x["question_id"] for x in rows[2:]] == [3, 4, 5]


def test_3_16_choices_leaves_no_tmp_on_a_full_disk(owl_model, tmp_path, monkeypatch):
    model, tok = owl_model
    (qs, _) = read_questions(str(mc_file(tmp_path, [{"question": "q", "options": ["a", "b"]}])))

    def full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        choices.run(model, tok, qs, str(tmp_path / "p.jsonl"))
    assert sorted(os.listdir(tmp_path)) == ["p0.jpg", "q.jsonl"]


# ----------------------------------------------------------------------------- 1.7 non-finite scores

def test_1_7_nan_scores_are_refused_not_100_percent(tmp_path):
    (qs, _) = read_questions(str(mc_file(tmp_path, [{"question": "q", "options": ["a", "b"], "answer": "A"}])))
    with pytest.raises(ChoicesError, match=r"q\.jsonl:1: the model's scores are not finite"):
        choices.evaluate(qs, lambda prompt, cs, images: [math.nan] * len(cs))


# ----------------------------------------------------------------------------- 2.x hostile fields

def tsv(tmp_path, text, name="t.tsv"):
    (tmp_path / name).write_text(text, encoding="utf-8")
    return str(tmp_path / name)


def test_2_16_2_20_2_21_tsv_bom_infinite_index_short_row(tmp_path):
    (qs, _) = read_questions(tsv(tmp_path, "\ufeffindex\tquestion\tA\tB\n0\tq\tx\ty\n"))  # 2.16: Excel's BOM
    assert qs[0].id == 0 and qs[0].options == {"A": "x", "B": "y"}
    for index in ("inf", "1e400"):  # 2.20
        with pytest.raises(ChoicesError, match=f"index '{index}' is not a number"):
            read_questions(tsv(tmp_path, f"index\tquestion\tA\tB\n{index}\tq\tx\ty\n"))
    with pytest.raises(ChoicesError, match=r"index 0: fewer than 2 options"):  # 2.21: a short row
        read_questions(tsv(tmp_path, "index\tA\tB\tquestion\timage\n0\tred\n"))


@pytest.mark.parametrize("row, msg", [
    ({"question": "q", "options": ["a", "b"], "image": 5}, "must be a path or a list of paths"),  # 2.24
    ({"question": "q", "options": ["a", "b"], "image": [5]}, "must be a path or a list of paths"),
    ({"question": None, "options": ["a", "b"]}, "\"question\" must be a string"),  # 2.25
    ({"question": "q", "options": ["a", None]}, "every option must be a string"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply|not valid JSON"),  # 2.26
])
def test_2_24_2_25_2_26_choices_bad_fields_are_one_line(tmp_path, capsys, row, msg):
    q = jsonl(tmp_path / "q.jsonl", [row])
    with pytest.raises(ChoicesError, match=msg):
        read_questions(str(q))
    one_line_error(run_eval(capsys, "choices", q, "--model", CK, "--out", tmp_path / "p.jsonl"), "q.jsonl")


@pytest.mark.parametrize("row", [{"image": "3.jpg", "question_id": [1, 2], "question": "q"},
                                 {"image": 7, "question_id": 1, "question": "q"},
                                 {"image": "3.jpg", "question_id": 1, "question": None}])
def test_2_28_owleval_bad_field_types_are_one_line(tmp_path, capsys, row):
    d = owleval_dir(tmp_path, questions=[row])
    one_line_error(run_eval(capsys, "owleval", d, "--model", CK, "--out", tmp_path / "a.jsonl"), "questions.jsonl")


def test_2_27_a_question_longer_than_the_context_is_skipped_and_counted(tmp_path, capsys):
    rows = [{"id": i, "question": "Which?" if i != 2 else "word " * 1500, "options": ["a", "b"]} for i in range(3)]
    q, out = mc_file(tmp_path, rows), tmp_path / "p.jsonl"
    r = run_eval(capsys, "choices", q, "--model", CK, "--out", out)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "skipped" in r.stderr and "q.jsonl:3" in r.stderr and "1 question(s) skipped" in r.stderr
    assert [json.loads(line)["id"] for line in open(out)] == [0, 1]


def test_3_13_ctrl_c_keeps_the_predictions_so_far(owl_model, tmp_path, monkeypatch):
    model, tok = owl_model
    (qs, _) = read_questions(str(mc_file(tmp_path, [{"question": f"q{i}", "options": ["a", "b"]} for i in range(4)])))
    calls = []

    def scorer(model, tok, normalize):
        def score(prompt, cs, images):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return [0.0, 1.0]
        return score
    monkeypatch.setattr(choices, "model_scorer", scorer)
    with pytest.raises(KeyboardInterrupt):
        choices.run(model, tok, qs, str(tmp_path / "p.jsonl"))
    assert [json.loads(line)["prediction"] for line in open(tmp_path / "p.jsonl")] == ["B", "B"]
