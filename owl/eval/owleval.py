"""OwlEval, the paper's evaluation set (paper, "Quantitative Analysis"): 82 open-ended questions on 50
images, answered by each model and rated A-D by people (the Self-Instruct scale).

Folder layout (the official release): questions.jsonl (`image`, `question_id`, `question`, `ability`,
`category`), cases/ with the images, answer/*.jsonl with the other models' answers (`image`,
`question_id`, `question`, `answer`, `model_id`). A multi-turn conversation is marked by `category`:
its first question has ["single_turn", "multi_turn"], the follow-ups ["multi_turn"], all on the same
image. We answer each conversation in one chat session (the image attached to the first turn) and
every single-turn question in a fresh one, greedy unless asked otherwise, and write our answers in the
answer/ format. `write_html` makes a self-contained rating page (images embedded).

`python -m owl.eval owleval DIR --model M --out answers.jsonl [--html page.html]` runs it (__main__.py).
An image is read from inside cases/ only (an absolute or ../ path is refused, naming the line), and the
page escapes everything it shows that it did not write (ids, questions, answers, model ids, names).
The answers file is checked before the first question (its folder exists, it is not a folder, it can
be written, it is not an input, and if it exists it is this model's answers file), each answer is
appended as soon as it is made, and a re-run answers only the questions not in it yet (an answered
turn of a conversation is put back into the session, not regenerated); answers to another folder's
questions stay in it, and one to the same id but another question or image is refused.
"""
import base64
import glob
import html
import io
import json
import os

from ..chat.session import ContextFull
from ..fileio import check_writable, read_jsonl, write_atomic
from ..image import ImageError, image_inside, load_image

# The Self-Instruct rating scale the paper uses.
GRADES = {"A": "correct and satisfying", "B": "acceptable, with minor errors or imperfections",
          "C": "relevant to the instruction, but with significant errors", "D": "irrelevant or invalid"}


class OwlEvalError(ValueError):
    pass


def _read_jsonl(file, need):
    """The objects of a JSONL file, each checked to have the fields `need`."""
    rows = []
    try:
        lines = read_jsonl(file, OwlEvalError)
    except RecursionError:
        raise OwlEvalError(f"{file}: JSON nested too deeply") from None
    for where, row in lines:
        missing = [k for k in need if not isinstance(row, dict) or k not in row]
        if missing:
            raise OwlEvalError(f"{where}: missing field(s) {', '.join(missing)}")
        rows.append(row)
    return rows


def read_questions(folder):
    """The questions, checked: fields present, ids unique, every image file there."""
    file = os.path.join(folder, "questions.jsonl")
    if not os.path.isfile(file):
        raise OwlEvalError(f"{folder}: no questions.jsonl (is this an OwlEval folder?)")
    qs = _read_jsonl(file, ("image", "question_id", "question"))
    for n, q in enumerate(qs, 1):
        if not isinstance(q["question"], str) or not isinstance(q["question_id"], (int, str)) \
                or isinstance(q["question_id"], bool):
            raise OwlEvalError(f"{file}:{n}: \"question\" must be a string and \"question_id\" a number or string")
        try:
            image_inside(os.path.join(folder, "cases"), q["image"], f"{file}:{n}")
        except ImageError as e:
            raise OwlEvalError(str(e)) from None
        if not os.path.isfile(image_path(folder, q)):
            raise OwlEvalError(f"{image_path(folder, q)}: no such image (question {q['question_id']})")
    ids = [q["question_id"] for q in qs]
    if len(set(ids)) != len(ids):
        raise OwlEvalError(f"{file}: duplicate question_id(s)")
    return qs


def image_path(folder, q):
    """The question's image: inside cases/ (read_questions refuses one that leads out)."""
    return image_inside(os.path.join(folder, "cases"), q["image"], f"question {q['question_id']}")


def read_answers(folder):
    """{model_id: {question_id: answer}} from answer/*.jsonl (an absent folder gives {})."""
    out = {}
    for file in sorted(glob.glob(os.path.join(folder, "answer", "*.jsonl"))):
        for row in _read_jsonl(file, ("question_id", "answer")):
            name = str(row.get("model_id") or "") or os.path.basename(file).replace("_answer.jsonl", "")
            out.setdefault(name, {})[row["question_id"]] = row["answer"]
    return out


FIELDS = ("image", "question_id", "question", "answer", "model_id")


def answered(out, model_id, questions, warn=print):
    """(done, kept): {question_id: answer} already in the answers file (an earlier run stopped partway)
    for these questions, and the file's rows for other questions (kept in the file). The file is checked
    to be this model's answers file; a torn last line (a kill during a write: no newline at its end, the
    start of one of our lines) is dropped with a note. An answer to the same id but another question
    text or image (another OwlEval folder) is refused, never reused."""
    check_writable(out, error=OwlEvalError)
    if not os.path.isfile(out):
        return {}, []
    with open(out, encoding="utf-8", errors="replace") as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    rows = []
    for k, (n, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if k == len(lines) - 1 and k > 0 and not line.endswith("\n") and line.startswith('{"image": '):
                warn(f"note: {out}:{n}: dropped a torn last line")
                continue
            raise OwlEvalError(f"{out}:{n}: not an answers file of ours (not valid JSON): choose another --out") from None
        if not isinstance(row, dict) or set(row) != set(FIELDS) or row["model_id"] != model_id:
            raise OwlEvalError(f"{out}:{n}: not an answers file of model {model_id!r} (fields {', '.join(FIELDS)}): "
                               f"choose another --out or --model-id")
        rows.append(row)
    by_id = {q["question_id"]: q for q in questions}
    for n, r in enumerate(rows, 1):
        q = by_id.get(r["question_id"])
        if q is not None and (r["question"], r["image"]) != (q["question"], q["image"]):
            raise OwlEvalError(f"{out}: the answer to question {r['question_id']!r} is for another question or "
                               f"image than this folder's (another OwlEval folder?): choose another --out")
    write_jsonl(rows, out)  # whole lines only (no torn one to append to)
    return ({r["question_id"]: r["answer"] for r in rows if r["question_id"] in by_id},
            [r for r in rows if r["question_id"] not in by_id])


def conversations(questions):
    """Group the questions into chat sessions, in question order: a multi-turn head
    (["single_turn", "multi_turn"]) opens a conversation on its image, a follow-up (["multi_turn"])
    joins the open one on that image, anything else is a conversation of its own."""
    convs, open_on = [], {}
    for q in questions:
        cat = q.get("category", ["single_turn"])
        cat = cat if isinstance(cat, list) else [cat]
        if "multi_turn" in cat and "single_turn" not in cat and q["image"] in open_on:
            open_on[q["image"]].append(q)
            continue
        convs.append([q])
        if "multi_turn" in cat:
            open_on[q["image"]] = convs[-1]
    return convs


def _fresh(session, folder, q):
    session.reset()
    try:
        session.add_image(image_path(folder, q))
    except ImageError as e:
        raise OwlEvalError(str(e)) from None


def record(q, answer, model_id):
    return {"image": q["image"], "question_id": q["question_id"], "question": q["question"], "answer": answer,
            "model_id": model_id}


def run(session, folder, questions, model_id, done=None, on_answer=None, progress=None, warn=print):
    """Answer every question not in `done` ({question_id: answer}, see answered); the answer/ records
    of all of them in question order. on_answer(record) is called as each new answer is made (the
    command appends it to the file), progress(1) per question.

    A conversation that outgrows the context window (the tiny test model has 512 positions; the 8-turn
    one on 10.jpg needs more) goes on from a fresh start with the image and the question alone."""
    answers, done = {}, done or {}
    for conv in conversations(questions):
        _fresh(session, folder, conv[0])
        for q in conv:
            qid = q["question_id"]
            turn = ((lambda: session.remember(q["question"], done[qid])) if qid in done
                    else (lambda: session.ask(q["question"]).text))
            try:
                answers[qid] = turn()
            except ContextFull:
                warn(f"question {qid}: the conversation no longer fits the context window; answering it in a fresh one")
                _fresh(session, folder, q)
                answers[qid] = turn()
            if on_answer is not None and qid not in done:
                on_answer(record(q, answers[qid], model_id))
            if progress is not None:
                progress(1)
    return [record(q, answers[q["question_id"]], model_id) for q in questions]


def write_jsonl(records, out):
    write_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def append_jsonl(record, out):
    """One answer, appended as a whole line (kept if the run stops at the next question)."""
    with open(out, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _thumbnail(path, side=512):
    """The image as a data: URL (JPEG, at most side x side), so the page works on its own."""
    try:
        im = load_image(path)
    except ImageError:
        return ""
    im.thumbnail((side, side))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;background:#f6f6f4;color:#222}
h1{margin:0 0 .3em}.scale{margin:.3em 0 1em;color:#444}table.sum{border-collapse:collapse;margin-bottom:1.5em}
table.sum td,table.sum th{border:1px solid #ccc;padding:.2em .6em;text-align:center;background:#fff}
.q{display:flex;gap:1.2em;background:#fff;border:1px solid #ddd;border-radius:8px;padding:1em;margin-bottom:1.2em}
.q>div{flex:1;min-width:0}
.q img{max-width:320px;max-height:320px;object-fit:contain;border:1px solid #eee}
.meta{color:#777;font-size:.85em}.question{font-weight:600;margin:.3em 0 .8em}
.answers{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:.8em;flex:1}
.ans{border:1px solid #ddd;border-radius:6px;padding:.6em;display:flex;flex-direction:column}
.ans.ours{border-color:#3a7;background:#f3fbf6}.model{font-weight:600;margin-bottom:.3em}
.text{white-space:pre-wrap;flex:1;font-size:.92em;max-height:18em;overflow:auto}
.rate{margin-top:.5em}.rate button{margin-right:.3em;min-width:2.2em;cursor:pointer;border:1px solid #999;
background:#fafafa;border-radius:4px}.rate button.on{background:#246;color:#fff}"""

_JS = """const KEY = 'owleval:' + document.body.dataset.run + ':';
function paint() {
  const counts = {};
  document.querySelectorAll('.rate').forEach(r => {
    const g = localStorage.getItem(KEY + r.dataset.q + ':' + r.dataset.m);
    r.querySelectorAll('button').forEach(b => b.classList.toggle('on', b.textContent === g));
    counts[r.dataset.m] = counts[r.dataset.m] || {A: 0, B: 0, C: 0, D: 0};
    if (g) counts[r.dataset.m][g] += 1;
  });
  document.querySelectorAll('table.sum td[data-m]').forEach(td => {
    td.textContent = (counts[td.dataset.m] || {})[td.dataset.g] || 0;
  });
}
document.querySelectorAll('.rate button').forEach(b => b.onclick = () => {
  const r = b.parentElement, k = KEY + r.dataset.q + ':' + r.dataset.m;
  if (localStorage.getItem(k) === b.textContent) localStorage.removeItem(k);
  else localStorage.setItem(k, b.textContent);
  paint();
});
document.getElementById('export').onclick = () => {
  const out = {};
  for (let i = 0; i < localStorage.length; i++) {
    const k = localStorage.key(i);
    if (k.startsWith(KEY)) out[k.slice(KEY.length)] = localStorage.getItem(k);
  }
  const a = document.createElement('a');
  a.href = URL.createObjectURL(new Blob([JSON.stringify(out, null, 1)], {type: 'application/json'}));
  a.download = 'owleval_ratings.json'; a.click();
};
paint();"""


_PAGE_START = "<!doctype html><html><head><meta charset='utf-8'><title>OwlEval: "


def is_our_page(file):
    """Whether file is a rating page write_html wrote (the only kind --html may replace)."""
    with open(file, "rb") as f:
        return f.read(len(_PAGE_START)) == _PAGE_START.encode()


def write_html(records, questions, others, folder, out, model_id):
    """A page showing, per question, the image, our answer and the other models' answers side by
    side, with A/B/C/D buttons whose choices live in the browser's localStorage."""
    e = html.escape
    models = [model_id] + [m for m in others if m != model_id]
    ours = {r["question_id"]: r["answer"] for r in records}
    turn_of = {q["question_id"]: (i + 1, len(c)) for c in conversations(questions) for i, q in enumerate(c)}
    thumbs = {}
    head = "".join(f"<th>{g}</th>" for g in GRADES)
    rows = "".join(f"<tr><th>{e(m)}</th>" + "".join(f'<td data-m="{e(m)}" data-g="{g}">0</td>' for g in GRADES)
                   + "</tr>" for m in models)
    parts = [f"{_PAGE_START}{e(model_id)}</title>"
             f"<style>{_CSS}</style></head><body data-run='{e(model_id)}'>",
             f"<h1>OwlEval: {e(model_id)}</h1><div class='scale'>Rate each answer: "
             + "; ".join(f"<b>{g}</b> {e(d)}" for g, d in GRADES.items())
             + ". Ratings are kept in this browser's local storage. <button id='export'>export ratings</button></div>",
             f"<table class='sum'><tr><th>model</th>{head}</tr>{rows}</table>"]
    for q in questions:
        qid = q["question_id"]
        if q["image"] not in thumbs:
            thumbs[q["image"]] = _thumbnail(image_path(folder, q))
        turn, n = turn_of[qid]
        kind = f"turn {turn} of {n}" if n > 1 else "single turn"
        cards = []
        for m in models:
            text = ours.get(qid) if m == model_id else others[m].get(qid)
            text = text if text is None or isinstance(text, str) else json.dumps(text)
            if text is None:
                continue
            buttons = "".join(f"<button title='{e(d)}'>{g}</button>" for g, d in GRADES.items())
            cards.append(f"<div class='ans{' ours' if m == model_id else ''}'><div class='model'>{e(m)}</div>"
                         f"<div class='text'>{e(text)}</div><div class='rate' data-q='{e(str(qid))}' data-m='{e(m)}'>"
                         f"{buttons}</div></div>")
        parts.append(f"<div class='q' id='q{e(str(qid))}'><img src='{thumbs[q['image']]}' alt='{e(q['image'])}'><div>"
                     f"<div class='meta'>question {e(str(qid))} &middot; {e(q['image'])} &middot; {kind} &middot; "
                     f"abilities {e(str(q.get('ability', '-')))}</div><div class='question'>{e(q['question'])}</div>"
                     f"<div class='answers'>{''.join(cards)}</div></div></div>")
    parts.append(f"<script>{_JS}</script></body></html>")
    write_atomic(out, "\n".join(parts))
