"""Training data: the formats users have -> the official template -> token ids and loss labels.

Paper, "Joint Instruction Tuning": every record becomes "a snippet of conversation following Vicuna"
and "we compute the loss on the response". Formats, detected per record:

  caption   JSONL {"image": "a.jpg", "caption": "..."}                          (stage 1)
  official  mPLUG-Owl SFT JSONL {"image": [...], "text": "<SYSTEM>Human: <image>\\nHuman: q\\nAI: a"}
  llava     LLaVA-Instruct JSON [{"image": ..., "conversations": [{"from": "human", "value": "<image>\\nq"},
                                  {"from": "gpt", "value": "a"}, ...]}]
  sharegpt  ShareGPT / Vicuna JSON: "conversations" of human|gpt without an image
  alpaca    Alpaca JSON {"instruction", "input", "output"}
  baize     Baize JSON {"input": "...[|Human|] q\\n[|AI|] a\\n[|Human|] ..."}

Image paths are relative to the data file's folder unless absolute or an image_root is given.
A record whose fields have the wrong type (a null caption, a number for an instruction, a
conversation of strings, "image": 5) is skipped and counted with its file:record, never trained as
the text "None"; lone surrogates ("\\ud83d" in JSON) become U+FFFD, counted. Stage 1 trains on
images: its text-only examples are skipped and counted (images_required).

Tokenisation and labels follow the official `_extract_text_token_from_conversation`
(pipeline/data_utils/xgpt3_dataset.py): BOS, then the text split around `<image>`, "AI: " and
"\\nHuman: "; every chunk is sentencepiece-encoded on its own; the chunk after each "AI: " (the answer)
gets EOS appended, and the answer tokens and that EOS are the only ones with a loss. (At inference
owl.Tokenizer.encode_prompt splits only around <image>, as the official inference code does: the two
tokenisations of the same text differ slightly, in the official code too.)
Truncation to max_length: text is cut, an answer is cut and keeps its EOS; an image's 65 slots are
never cut: an image that does not fit is dropped with everything after it (as official). An example
left with no answer token is skipped and counted as too long. A newline after the last answer
(owl.build_prompt writes one) is dropped, so it never carries a loss.
Stage-1 captions: the official pretraining code was never released. We use the plainest choice,
BOS <image> caption EOS, with the loss on the caption and its EOS (no template, no prompt).
"""
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import torch

from ..fileio import read_jsonl, read_text
from ..image import load_image, ImageError
from ..tokenizer import IGNORE, IMAGE, IMAGE_SLOT, build_prompt, clean_text

SPLIT = re.compile(f"({re.escape(IMAGE)}|AI: |\nHuman: )")
DELIMS = (IMAGE, "AI: ", "\nHuman: ")


class DataError(ValueError):
    pass


class BadRecord(ValueError):
    """A record of a known format whose fields have the wrong type: skipped and counted."""


@dataclass
class Example:
    ids: list  # BOS, text ids, IMAGE_SLOT at image slots
    labels: list  # = ids on answer tokens (and their EOS), IGNORE elsewhere
    images: list  # image paths, in slot order
    fmt: str
    where: str  # "file:line" (JSONL) or "file[i]" (JSON), for messages


@dataclass
class Stats:
    formats: Counter = field(default_factory=Counter)
    text_only: int = 0
    multimodal: int = 0
    missing: list = field(default_factory=list)  # image paths that do not exist / cannot be read
    bad_examples: int = 0  # skipped for a missing or unreadable image
    mismatch: list = field(default_factory=list)  # "where: 2 <image> but 1 image"
    too_long: int = 0  # longer than max_length (truncated)
    dropped_long: int = 0  # skipped: no answer token left after truncation
    empty: list = field(default_factory=list)  # no usable turn
    bad_records: list = field(default_factory=list)  # "where: caption is null, not a string" (skipped)
    replaced: list = field(default_factory=list)  # where text held lone surrogates (now U+FFFD)
    text_only_skipped: int = 0  # stage 1 (images_required)

    def report(self):
        n = sum(self.formats.values())
        first = lambda xs: f" (first: {'; '.join(xs[:3])})" if xs else ""
        lines = [f"examples: {n} ({', '.join(f'{k} {v}' for k, v in sorted(self.formats.items()))})",
                 f"  multimodal {self.multimodal}, text-only {self.text_only}"
                 + (f" ({self.text_only_skipped} skipped: stage 1 trains on images)" if self.text_only_skipped else ""),
                 f"  records with fields of the wrong type (skipped): {len(self.bad_records)}{first(self.bad_records)}",
                 f"  missing/unreadable images: {len(self.missing)} in {self.bad_examples} example(s)"
                 + (f" (first: {', '.join(self.missing[:3])})" if self.missing else ""),
                 f"  <image> count != image count: {len(self.mismatch)}"
                 + (f" (first: {'; '.join(self.mismatch[:3])})" if self.mismatch else ""),
                 f"  longer than max_length: {self.too_long} (truncated; {self.dropped_long} skipped, "
                 f"no answer left)",
                 f"  no usable turn: {len(self.empty)}" + (f" (first: {', '.join(self.empty[:3])})" if self.empty else "")]
        if self.replaced:
            lines.append(f"  text with invalid characters (replaced by U+FFFD): {len(self.replaced)}{first(self.replaced)}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- reading files

def read_records(file):
    """[(where, record)] from a JSON array file or a JSONL file; a malformed line stops here."""
    if not os.path.isfile(file):
        raise DataError(f"{file}: no such data file")
    text = read_text(file, DataError)
    if text.lstrip().startswith("["):  # a JSON array (LLaVA, Alpaca, ShareGPT, Baize)
        try:
            out = [(f"{file}[{i}]", r) for i, r in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise DataError(f"{file}:{e.lineno}: not valid JSON ({e.msg})") from None
    else:  # JSONL: one record a line
        out = read_jsonl(file, DataError, text)
    for where, r in out:
        if not isinstance(r, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(r).__name__}")
    return out


# ----------------------------------------------------------------------------- formats -> template

def detect(rec):
    if "caption" in rec and "image" in rec:
        return "caption"
    if isinstance(rec.get("text"), str) and "AI: " in rec["text"]:
        return "official"
    if isinstance(rec.get("conversations"), list):
        return "llava" if rec.get("image") else "sharegpt"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    if isinstance(rec.get("input"), str) and "[|Human|]" in rec["input"]:
        return "baize"
    return None


def pair_turns(messages):
    """[(is_human, text)] -> [(question, answer)]: consecutive same-role messages are joined,
    a leading AI message and a trailing human one are dropped."""
    merged = []
    for human, text in messages:
        if merged and merged[-1][0] == human:
            merged[-1] = (human, merged[-1][1] + "\n" + text)
        else:
            merged.append((human, text))
    while merged and not merged[0][0]:
        merged.pop(0)
    return [(merged[i][1], merged[i + 1][1]) for i in range(0, len(merged) - 1, 2)]


def conversation_text(pairs):
    """[(question, answer)] -> the official template, <image> lines moved before their turn."""
    turns = []
    for q, a in pairs:
        n = q.count(IMAGE)
        q = q.replace(IMAGE, "").strip()
        turns.append((n, q, a.strip()))
    return build_prompt(turns)


def _string(rec, key, optional=False):
    v = rec.get(key, "" if optional else None)
    if not isinstance(v, str):
        raise BadRecord(f"{key} is {json.dumps(v)[:40]}, not a string")
    return v


def to_template(fmt, rec):
    """A record -> (text in the official template (or the caption), [image paths as written]).
    Raises BadRecord for fields of the wrong type."""
    images = rec.get("image") or []
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise BadRecord(f"image is {json.dumps(rec.get('image'))[:40]}, not a path or a list of paths")
    if fmt == "caption":
        return _string(rec, "caption").strip(), images
    if fmt == "official":
        return rec["text"], images
    if fmt in ("llava", "sharegpt"):
        if not all(isinstance(m, dict) and isinstance(m.get("from"), str) for m in rec["conversations"]):
            raise BadRecord("conversations holds a message that is not {\"from\": ..., \"value\": ...}")
        msgs = [(m["from"] in ("human", "user"), _string(m, "value")) for m in rec["conversations"]
                if m["from"] in ("human", "user", "gpt", "assistant", "chatgpt", "bard")]
        pairs = pair_turns(msgs)
        if fmt == "llava" and pairs and not any(IMAGE in q for q, _ in pairs):
            pairs[0] = (IMAGE * len(images) + pairs[0][0], pairs[0][1])  # an image without a tag: first turn
        return (conversation_text(pairs) if pairs else ""), images
    if fmt == "alpaca":
        q, extra = _string(rec, "instruction").strip(), _string(rec, "input", optional=True).strip()
        return conversation_text([(q + ("\n" + extra if extra else ""), _string(rec, "output"))]), []
    if fmt == "baize":
        parts = re.split(r"(\[\|Human\|\]|\[\|AI\|\])", rec["input"])
        msgs = [(parts[i] == "[|Human|]", parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]
        pairs = pair_turns([m for m in msgs if m[1]])
        return (conversation_text(pairs) if pairs else ""), []
    raise AssertionError(fmt)


# ----------------------------------------------------------------------------- text -> ids, labels

def tokenize_conversation(tok, text, max_length):
    """Official-template text -> (ids, labels, images kept, truncated); see the module docstring."""
    ids, labels, n_images, truncated = [tok.bos_id], [IGNORE], 0, False
    prev, chunks = None, [c for c in SPLIT.split(text.rstrip("\n")) if c]
    for i, chunk in enumerate(chunks):
        room = max_length - len(ids)
        if chunk == IMAGE:
            if tok.image_tokens > room:  # never cut an image's slots: drop it and what follows
                truncated = True
                break
            piece, lab = [IMAGE_SLOT] * tok.image_tokens, [IGNORE] * tok.image_tokens
            n_images += 1
        elif prev == "AI: " and chunk not in DELIMS:  # an answer: its tokens and EOS carry the loss
            body = tok.sp.encode(chunk)
            if len(body) + 1 > room:
                body, truncated = body[:max(room - 1, 0)], True
            piece = lab = body + [tok.eos_id]
        else:  # system line, human turns, the "AI: " and "\nHuman: " markers: no loss
            piece = tok.sp.encode(chunk)
            if len(piece) > room:
                piece, truncated = piece[:room], True
            lab = [IGNORE] * len(piece)
        ids, labels, prev = ids + piece, labels + lab, chunk
        if len(ids) >= max_length:
            truncated = truncated or i < len(chunks) - 1
            break
    return ids, labels, n_images, truncated


def tokenize_caption(tok, caption, max_length):
    """BOS <image> caption EOS; the loss on the caption and EOS (our choice, see the docstring)."""
    room = max_length - 1 - tok.image_tokens - 1
    if room < 1:
        raise DataError(f"--max-length {max_length} leaves no room for a caption after the image slots")
    body = tok.sp.encode(caption)
    truncated = len(body) > room
    body = body[:room] + [tok.eos_id]
    ids = [tok.bos_id] + [IMAGE_SLOT] * tok.image_tokens + body
    return ids, [IGNORE] * (1 + tok.image_tokens) + body, 1, truncated


# ----------------------------------------------------------------------------- files -> examples

def resolve(path, data_file, image_root):
    if os.path.isabs(path):
        return path
    return os.path.join(image_root or os.path.dirname(os.path.abspath(data_file)), path)


def load_examples(files, tok, max_length, image_root=None, check_images=False, images_required=False):
    """All examples of the data files, tokenised, and the Stats. Examples whose image is missing
    (or unreadable, with check_images, which opens every image), whose <image> count differs from
    their image count, whose fields have the wrong type, or (images_required: stage 1) that have no
    image are skipped and counted; a record of no known format stops here."""
    examples, st = [], Stats()
    for file in files:
        for where, rec in read_records(file):
            fmt = detect(rec)
            if fmt is None:
                raise DataError(f"{where}: unknown record format (keys: {', '.join(sorted(rec)) or 'none'}); "
                                f"expected caption, official (text), llava/sharegpt (conversations), "
                                f"alpaca (instruction/output) or baize (input with [|Human|])")
            st.formats[fmt] += 1
            try:
                text, images = to_template(fmt, rec)
            except BadRecord as e:
                st.bad_records.append(f"{where}: {e}")
                continue
            if clean_text(text) != text:
                text = clean_text(text)
                st.replaced.append(where)
            images = [resolve(p, file, image_root) for p in images]
            n_tags = 1 if fmt == "caption" else text.count(IMAGE)
            if not text or (fmt != "caption" and "AI: " not in text):
                st.empty.append(where)
                continue
            if n_tags != len(images):
                st.mismatch.append(f"{where}: {n_tags} <image> but {len(images)} image(s)")
                continue
            st.multimodal += bool(images)
            st.text_only += not images
            if images_required and not images:
                st.text_only_skipped += 1
                continue
            bad = [p for p in images if not os.path.isfile(p)]
            if check_images and not bad:
                bad = [p for p in images if not readable(p)]
            if bad:
                st.missing += bad
                st.bad_examples += 1
                continue
            if fmt == "caption":
                ids, labels, n_img, truncated = tokenize_caption(tok, text, max_length)
            else:
                ids, labels, n_img, truncated = tokenize_conversation(tok, text, max_length)
            st.too_long += truncated
            if not any(l != IGNORE for l in labels):
                st.dropped_long += 1
                continue
            examples.append(Example(ids, labels, images[:n_img], fmt, where))
    return examples, st


def training_data(files, tok, max_length, *, image_root, max_bad_fraction, images_required, eval_examples, seed,
                  log=print):
    """(training examples, held-out examples) of the data files, read whole (shards are streamed:
    shards.py): the Stats logged, too many missing images stop here, and eval_examples are held out
    by a fixed shuffle (None: 2%, at most 200; 0 without --eval-every)."""
    examples, st = load_examples(files, tok, max_length, image_root, images_required=images_required)
    log(st.report())
    n_all = sum(st.formats.values())
    if n_all and st.bad_examples / n_all > max_bad_fraction:
        raise DataError(f"{st.bad_examples} of {n_all} examples have missing images, more than --max-bad-fraction "
                        f"{max_bad_fraction} (first: {', '.join(st.missing[:3])})")
    n_eval = eval_examples if eval_examples is not None else min(200, len(examples) // 50)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + 1)).tolist()
    train, held_out = [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]
    if not train:
        raise DataError(f"no usable training example in {', '.join(files)}")
    return train, held_out


def readable(path):
    try:
        load_image(path)
        return True
    except ImageError:
        return False


def check_data(files, tok, max_length, image_root=None, images_required=False):
    """--check-data: read and tokenise everything, open every image, and print the Stats."""
    examples, st = load_examples(files, tok, max_length, image_root, check_images=True,
                                 images_required=images_required)
    print(st.report())
    n_tok = sum(len(e.ids) for e in examples)
    print(f"  usable: {len(examples)} examples, {n_tok} tokens (image slots included), "
          f"{sum(sum(l != IGNORE for l in e.labels) for e in examples)} target tokens")
    return st
