"""Multiple-choice benchmarks by log-likelihood (MMBench, SEED-Bench, ScienceQA, MME's yes/no): `python
-m owl.eval choices FILE --model M --out preds.jsonl`. Each option is scored by the log-likelihood the model gives its tokens after the
question's prompt (owl.score_choices, the way lmms-eval scores choices), and the best one is the
prediction: no generation, no answer parsing.

Files:
  JSONL  {"id": ..., "image": "a.jpg" or ["a.jpg", ...], "question": "...", "options": ["x", "y"] or
         {"A": "x", "B": "y"}, "answer": "B" (or the option's text; optional), "hint": "..." (optional)};
         image paths are relative to the file's folder (or --image-root) and must stay inside it; a
         list of options is lettered A, B, C, ...
  TSV    MMBench's: columns index, question, hint, A, B, C, D (empty past the last option), answer,
         image (base64). As in VLMEvalKit, an image field holding another row's index shares that row's
         image, and the CircularEval copies some releases carry (index + k * 1e6, the options rotated)
         are skipped: --circular makes the rotations itself.

The prompt is the official template around one question: a `Human: <image>` line per image, then the
question (after its hint). --list-options writes MMBench's prompt instead:
  "Hint: ...\\nQuestion: ...\\nOptions:\\nA. x\\nB. y\\nPlease select the correct answer from the options above."
and the choices scored are then the letters (one token each, so sum and mean agree); without it they
are the options' texts (normalize="mean" removes the advantage short options have under "sum").
--circular is MMBench's CircularEval: with N options the question is asked N times, the options
rotated by one each time, and it counts as right only if every rotation is. Without the options in the
prompt their order changes nothing, so --circular needs --list-options.
"""
import base64
import binascii
import csv
import math
import os
import string
from dataclasses import dataclass, field

from ..fileio import check_writable, read_jsonl as read_lines
from ..generate import score_choices, visual_tokens
from ..image import ImageError, check_image_bytes, decode_image, image_inside, load_image
from ..tokenizer import build_prompt
from .owleval import write_jsonl

CIRCULAR_COPY = 1_000_000  # VLMEvalKit's circular TSVs: the k-th rotation of row i has index i + k * 1e6
MMBENCH_ASK = "Please select the correct answer from the options above."


class ChoicesError(ValueError):
    pass


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during evaluate: the records of the questions done so far (run writes them)."""
    def __init__(self, records):
        super().__init__()
        self.records = records


@dataclass
class Question:
    id: object
    question: str
    options: dict  # {"A": text, ...}, in order
    answer: str = None  # a key of options, or None
    hint: str = ""
    images: list = field(default_factory=list)  # [("path", file) or ("base64", text)]
    where: str = ""  # "file:line" or "file: index N", for messages


# ----------------------------------------------------------------------------- reading

def read_questions(file, image_root=None):
    """The questions of a .jsonl or .tsv file, checked (see the module docstring); (questions, notes).
    A JSONL file's image paths resolve inside image_root (default: the file's folder)."""
    if not os.path.isfile(file):
        raise ChoicesError(f"{file}: no such file")
    ext = os.path.splitext(file)[1].lower()
    if ext in (".jsonl", ".json"):
        questions, notes = read_jsonl(file, image_root), []
    elif ext == ".tsv":
        questions, notes = read_tsv(file)
    else:
        raise ChoicesError(f"{file}: expected a .jsonl or an MMBench-style .tsv file")
    if not questions:
        raise ChoicesError(f"{file}: no questions")
    ids = [q.id for q in questions]
    if len(set(map(str, ids))) != len(ids):
        raise ChoicesError(f"{file}: duplicate question ids")
    return questions, notes


def _answer_key(answer, options, where):
    """An answer given as a key ("B") or as an option's text -> the key; None stays None."""
    if answer is None or str(answer).strip() == "":
        return None
    a = str(answer).strip()
    if a in options:
        return a
    keys = [k for k, v in options.items() if v == a]
    if len(keys) == 1:
        return keys[0]
    raise ChoicesError(f"{where}: answer {a!r} is neither an option key ({', '.join(options)}) nor an option's text")


def _rows(file):
    try:
        return read_lines(file, ChoicesError)
    except RecursionError:
        raise ChoicesError(f"{file}: JSON nested too deeply") from None


def read_jsonl(file, image_root=None):
    out, root = [], image_root or os.path.dirname(os.path.abspath(file))
    for where, r in _rows(file):
        if not isinstance(r, dict) or "question" not in r or "options" not in r:
            raise ChoicesError(f"{where}: a question needs \"question\" and \"options\"")
        if not isinstance(r["question"], str):
            raise ChoicesError(f"{where}: \"question\" must be a string, not {r['question']!r}")
        opts = r["options"]
        if isinstance(opts, list):
            if len(opts) > 26:
                raise ChoicesError(f"{where}: more than 26 options")
            opts = dict(zip(string.ascii_uppercase, opts))
        if not isinstance(opts, dict) or len(opts) < 2:
            raise ChoicesError(f"{where}: \"options\" must be a list or an object of at least 2 options")
        if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in opts.values()):
            raise ChoicesError(f"{where}: every option must be a string (or a number)")
        opts = {str(k): str(v) for k, v in opts.items()}
        images = r.get("image") or []
        images = [images] if isinstance(images, str) else images
        if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
            raise ChoicesError(f"{where}: \"image\" must be a path or a list of paths")
        try:
            paths = [image_inside(root, p, where) for p in images]
        except ImageError as e:
            raise ChoicesError(str(e)) from None
        for p in paths:
            if not os.path.isfile(p):
                raise ChoicesError(f"{where}: no such image {p}")
        line = int(where.rsplit(":", 1)[1])  # the id of a question without one
        out.append(Question(r.get("id", line), str(r["question"]), opts, _answer_key(r.get("answer"), opts, where),
                            str(r.get("hint") or ""), [("path", p) for p in paths], where))
    return out


def _missing(value):  # pandas (which writes these files) writes NaN as an empty field, and reads "nan" as NaN
    return value is None or value.strip() == "" or value.strip().lower() == "nan"


def read_tsv(file):
    csv.field_size_limit(2**31 - 1)  # a base64 image is far longer than csv's default field limit
    with open(file, encoding="utf-8-sig", newline="") as f:  # -sig: Excel's "UTF-8 CSV" starts with a BOM
        rows = list(csv.DictReader(f, delimiter="\t", restval=""))  # a short row's missing fields are empty
    need = [c for c in ("index", "question", "A", "B") if rows and c not in rows[0]]
    if not rows or need:
        raise ChoicesError(f"{file}: an MMBench-style TSV needs the columns index, question, A, B "
                           f"(missing: {', '.join(need) or 'every row'})")
    by_index = {r["index"]: r for r in rows}
    out, copies = [], 0
    for n, r in enumerate(rows, 2):  # line 1 is the header
        where = f"{file}: index {r['index']}"
        try:
            index = int(float(r["index"]))
        except (ValueError, OverflowError):
            raise ChoicesError(f"{file}:{n}: index {r['index']!r} is not a number") from None
        if index >= CIRCULAR_COPY and str(index % CIRCULAR_COPY) in by_index:
            copies += 1
            continue
        opts = {}
        for letter in string.ascii_uppercase:
            if letter not in r or _missing(r[letter]):
                break
            opts[letter] = r[letter].strip()
        if len(opts) < 2:
            raise ChoicesError(f"{where}: fewer than 2 options (columns A, B, ...)")
        image = r.get("image") or ""
        if image.strip().isdigit() and len(image.strip()) < 64 and image.strip() in by_index:
            image = by_index[image.strip()].get("image") or ""  # the image of another row
        if image.strip():
            check_image_bytes(_b64(image, where), where)  # a bad image is found before the model loads
        hint = "" if _missing(r.get("hint")) else r["hint"].strip()
        out.append(Question(index, r["question"].strip(), opts, _answer_key(r.get("answer"), opts, where), hint,
                            [("base64", image)] if image.strip() else [], where))
    notes = [f"{file}: skipped {copies} CircularEval copies (rows index + k * {CIRCULAR_COPY:,})"] if copies else []
    return out, notes


def load_images(q):
    """The question's PIL images; a bad one raises ImageError naming the question."""
    images = []
    for kind, src in q.images:
        if kind == "path":
            images.append(load_image(src))
            continue
        images.append(decode_image(_b64(src, q.where), q.where))
    return images


def _b64(text, where):
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{where}: the image field is not valid base64") from None


# ----------------------------------------------------------------------------- prompts and scoring

def prompt_and_choices(q, options, n_images, list_options):
    """(prompt in the official template, choices to score) for one ordering of the options."""
    if list_options:
        text = (f"Hint: {q.hint}\n" if q.hint else "") + f"Question: {q.question}\nOptions:\n"
        text += "".join(f"{k}. {v}\n" for k, v in options.items()) + MMBENCH_ASK
        choices = list(options)
    else:
        text = (f"{q.hint}\n" if q.hint else "") + q.question
        choices = list(options.values())
    return build_prompt([(n_images, text, None)]), choices


def model_scorer(model, tokenizer, normalize="sum"):
    """score(prompt, choices, images) for evaluate: owl.score_choices, the visual tokens of a question's
    images computed once for all its rotations (evaluate passes the same list each time)."""
    last = {}

    def score(prompt, choices, images):
        if images and last.get("images") is not images:
            last.update(images=images, embeds=visual_tokens(model, images))
        return score_choices(model, tokenizer, prompt, choices, normalize=normalize,
                             image_embeds=last["embeds"] if images else None)
    return score


def evaluate(questions, score, *, circular=False, list_options=False, progress=None, on_skip=None):
    """One record per question: id, scores ({key: log-likelihood}, the file's order), prediction (a
    key), answer, correct (None without an answer); with circular also "rotations", the prediction of
    each rotation as a key of the file's order. score(prompt, choices, images) -> [float]
    (model_scorer); it gets the same images list for every rotation of a question. A question the
    model cannot score (longer than its context) stops the run, or with on_skip is skipped:
    on_skip(message) is called and it gets no record. Ctrl-C raises Interrupted with the records so far."""
    if circular and not list_options:
        raise ChoicesError("--circular needs --list-options: without the options in the prompt their order "
                           "changes nothing")
    records = []
    try:
        for q in questions:
            _evaluate_one(q, score, circular, list_options, on_skip, records)
            if progress is not None:
                progress(1)
    except KeyboardInterrupt:
        raise Interrupted(records) from None
    return records


def _evaluate_one(q, score, circular, list_options, on_skip, records):
    """One question's record appended to records (none if on_skip skipped it)."""
    images, keys, texts = load_images(q), list(q.options), list(q.options.values())
    predictions, first = [], None
    for r in range(len(keys) if circular else 1):
        order = [(i + r) % len(keys) for i in range(len(keys))]  # position i shows option order[i]
        prompt, choices = prompt_and_choices(q, dict(zip(keys, (texts[j] for j in order))), len(images),
                                             list_options)
        try:
            s = [float(x) for x in score(prompt, choices, images)]
        except ValueError as e:  # e.g. longer than the model's context
            if on_skip is None:
                raise ChoicesError(f"{q.where}: {e}") from None
            on_skip(f"skipped {q.where}: {e}")
            predictions = None
            break
        if not all(map(math.isfinite, s)):  # NaN weights: every max() would pick the first option
            raise ChoicesError(f"{q.where}: the model's scores are not finite ({s}): are its weights sound?")
        best = max(range(len(s)), key=s.__getitem__)
        predictions.append(keys[order[best]])
        first = s if first is None else first
    if predictions is None:  # skipped
        return
    rec = {"id": q.id, "scores": dict(zip(keys, first)), "prediction": predictions[0], "answer": q.answer,
           "correct": None if q.answer is None else all(p == q.answer for p in predictions)}
    if circular:
        rec["rotations"] = predictions
    records.append(rec)


def accuracy(records):
    """(right, answered): over the questions that have an answer."""
    answered = [r for r in records if r["correct"] is not None]
    return sum(r["correct"] for r in answered), len(answered)


def summary(records, circular=False, source="the file"):
    """The line the command prints: the accuracy, or that there are no answers."""
    right, answered = accuracy(records)
    if not answered:
        return f"{source} has no answers: predictions only"
    return f"{'CircularEval accuracy' if circular else 'accuracy'}: {100 * right / answered:.2f}% ({right} of {answered})"


def run(model, tokenizer, questions, out, *, circular=False, list_options=False, normalize="sum", progress=None,
        on_skip=None):
    """python -m owl.eval choices: evaluate every question with the model, the records written to `out`
    (JSONL, whole or not at all; after Ctrl-C, Interrupted, the questions done so far)."""
    try:
        records = evaluate(questions, model_scorer(model, tokenizer, normalize), circular=circular,
                           list_options=list_options, progress=progress, on_skip=on_skip)
    except Interrupted as e:  # Ctrl-C: the predictions so far are kept
        write_jsonl(e.records, out)
        raise
    try:
        write_jsonl(records, out)
    except OSError:  # e.g. a full disk: no half-written temporary left beside `out`
        if os.path.isfile(out + ".tmp"):
            os.remove(out + ".tmp")
        raise
    return records


RECORD = {"id", "scores", "prediction", "answer", "correct"}  # (and "rotations" with --circular)


def check_out(out):
    """An existing --out must be predictions written by this command (it is replaced): anything else
    (a questions file, notes, another tool's output) is refused, naming the line."""
    check_writable(out, error=ChoicesError)
    if not os.path.isfile(out):
        return
    try:
        rows = _rows(out)
    except ChoicesError as e:
        raise ChoicesError(f"--out exists and is not predictions of ours ({e}): choose another --out") from None
    for where, r in rows:
        if not isinstance(r, dict) or not RECORD <= set(r) <= RECORD | {"rotations"}:
            raise ChoicesError(f"{where}: --out exists and is not predictions of ours: choose another --out")
