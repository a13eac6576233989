"""Stage-1 captions from webdataset tar shards (what img2dataset writes), read as a stream.

Paper, "Data and Training Details": stage 1 trains on LAION-400M, COYO-700M, CC and COCO, far more
pairs than fit in memory as token lists. `--data 'caps/{00000..00127}.tar'` (webdataset's brace ranges,
zero padding kept; `{a,b}` lists too) or a folder of .tar files names the shards.

A sample is the run of consecutive members that share a key, as in webdataset: the key is the member's
path up to the first dot of its file name, the rest is the extension (`000123.jpg`, `000123.txt`,
`000123.json`). It needs an image (jpg, jpeg, png or webp) and a caption: the .txt, else the .json's
"caption". Nothing is tokenised up front: samples are read, decoded and tokenised as the batches are
made, in the DataLoader's workers, so memory does not depend on the number of shards or samples.

Who reads what. The S = processes x workers streams split each epoch disjointly: the shards are put in a
seeded order (seed + epoch, the same in every process) and cut into units, a whole shard each, or with
fewer shards than streams G = ceil(S / shards) units per shard (samples j with j % G == g); stream s
reads units s, s + S, ... Together the streams read every sample of the epoch once; each runs on into
its next epoch by itself (a stream with fewer units simply starts it sooner).

The shuffle. A stream reads `buffer` samples (raw bytes), shuffles them with an RNG seeded by (seed,
epoch, stream, block), emits them, and reads the next block (a block shuffle: the bytes of one block in
memory, on top of the shard order). Its position is therefore five numbers: epoch, block, the unit and
sample where the block began, and how many of the block were emitted; every batch carries the position
after it, train.py keeps the latest of each stream and saves them in the checkpoint, and a resumed
stream re-reads at most one block to continue exactly. The DataLoader takes batches from its workers in
turn, starting at worker 0; after resuming, worker w plays the stream of worker (w + batches) % workers,
so the next batch comes from the stream whose turn it was.

Bad members (an image that does not decode, a sample without caption or image, a tar that ends early)
are skipped; their messages ride with the next batch as "bad", which train.py counts against
--max-bad-fraction as it does for JSON data.
"""
import json
import os
import random
import re
import tarfile
from itertools import islice

import torch

from ..image import ImageError, decode_image, preprocess_image
from ..tokenizer import IGNORE, Tokenizer
from .batches import collate
from .data import DataError, tokenize_caption

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # the first present is the sample's image
KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext: (key, extension)


# ----------------------------------------------------------------------------- which files

def split_data(data):
    """--data's comma-separated entries; commas inside braces ('{a,b}.tar') do not split."""
    out, depth, cur = [], 0, ""
    for ch in data:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [s for s in out + [cur] if s]


def expand_braces(spec):
    """'caps/{00000..00002}.tar' -> caps/00000.tar, caps/00001.tar, caps/00002.tar; '{a,b}' -> a, b.
    Several groups expand as a product, in order; nested braces are not supported."""
    m = re.search(r"\{([^{}]*)\}", spec)
    if m is None:
        if "{" in spec or "}" in spec:
            raise DataError(f"--data {spec}: unbalanced or nested braces")
        return [spec]
    body, head, tail = m.group(1), spec[:m.start()], spec[m.end():]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        a, b = int(rng.group(1)), int(rng.group(2))
        padded = any(re.match(r"-?0\d", g) for g in rng.groups())  # {00..10} pads, {0..10} does not
        width = max(len(g) for g in rng.groups()) if padded else 0
        step = 1 if b >= a else -1
        items = [str(i).zfill(width) for i in range(a, b + step, step)]
    elif "," in body:
        items = body.split(",")
    else:
        raise DataError(f"--data {spec}: '{{{body}}}' is neither a range {{N..M}} nor a list {{a,b}}")
    return [s for item in items for s in expand_braces(head + item + tail)]


MAX_SHARDS = 1_000_000
# A member's size by its tar header, read before its bytes: a 1 GiB (GNU sparse, 10 KB on disk) .txt took
# 3.4 GB to tokenise (redteam-2 2.3). 64 MiB is far above any image or caption img2dataset writes.
MAX_MEMBER = 64 << 20


def brace_count(spec):
    """How many names expand_braces(spec) gives, without building them (a {00000..9999999999} typo
    would fill the memory first: redteam-2 2.9)."""
    n = 1
    for body in re.findall(r"\{([^{}]*)\}", spec):
        rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
        n *= abs(int(rng.group(2)) - int(rng.group(1))) + 1 if rng else len(body.split(","))
    return n


def shard_files(data):
    """The .tar shards --data names (braces expanded, folders listed), or None if it names no shard.
    Missing shards and a mix of shards with JSON files stop here, naming the entry."""
    shards, others = [], []
    for spec in split_data(data):
        if brace_count(spec) > MAX_SHARDS:
            raise DataError(f"--data {spec}: names {brace_count(spec):,} shards (more than {MAX_SHARDS:,}): check the range")
        for path in expand_braces(spec):
            if os.path.isdir(path):
                found = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".tar"))
                if not found:
                    raise DataError(f"--data {path}: a folder without .tar shards")
                shards += found
            elif path.endswith((".tar.gz", ".tgz")):  # (webdataset reads them; read as JSON they gave wrong advice)
                raise DataError(f"{path}: gzipped shards are not supported: give plain .tar shards (gunzip them)")
            elif path.endswith(".tar"):
                if not os.path.isfile(path):
                    raise DataError(f"{path}: no such shard" + (f" (from {spec})" if spec != path else ""))
                shards.append(path)
            else:
                others.append(path)
    if shards and others:
        raise DataError(f"--data mixes .tar shards with other files ({others[0]}): give one kind per run")
    return shards or None


# ----------------------------------------------------------------------------- reading a shard

def unit_samples(path, part=0, parts=1, skip=0):
    """(key, {extension: bytes}) for samples j % parts == part of one shard, in order, after the first
    `skip` of them (whose bytes are never read: the reader seeks over them). A tar that cannot be read
    on ends with (None, message): one bad item, at a fixed place, so positions stay valid."""
    j, n, key, parts_of = -1, 0, None, {}
    try:
        with tarfile.open(path, "r:") as tf:
            while True:
                info = tf.next()
                tf.members = []  # tarfile keeps every member it has read; we never look back
                m = None if info is None or not info.isfile() else KEY.match(info.name)
                if info is not None and m is None:
                    continue
                if info is None or m.group(1) != key:  # a sample ends where the key changes
                    if key is not None and j % parts == part:
                        if n >= skip:
                            yield key, parts_of
                        n += 1
                    if info is None:
                        return
                    key, parts_of, j = m.group(1), {}, j + 1
                ext = m.group(2).lower()
                if j % parts == part and n >= skip and (ext in IMAGE_EXTS or ext in ("txt", "json")):
                    if info.size > MAX_MEMBER:  # never read: the sample is bad (decode says why)
                        parts_of["too_big"] = f"{path}: member {info.name} is {info.size:,} bytes (more than {MAX_MEMBER:,})"
                    else:
                        parts_of[ext] = tf.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        if n >= skip:
            yield None, f"{path}: ends early or is corrupt after {max(j, 0)} sample(s) ({e})"


def decode(where, parts):
    """A raw sample -> (caption, PIL image); raises ValueError with the reason."""
    if "too_big" in parts:
        raise ValueError(parts["too_big"])
    if "txt" in parts:
        caption = parts["txt"].decode("utf-8", errors="replace").strip()
    else:
        try:
            meta = json.loads(parts["json"]) if "json" in parts else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{where}.json: not valid JSON") from None
        if not isinstance(meta, dict) or "caption" not in meta:
            raise ValueError(f"{where}: no caption (.txt, or .json with \"caption\")")
        caption = str(meta["caption"] or "").strip()
    if not caption:
        raise ValueError(f"{where}: empty caption")
    ext = next((e for e in IMAGE_EXTS if e in parts), None)
    if ext is None:
        raise ValueError(f"{where}: no image ({', '.join(IMAGE_EXTS)})")
    try:
        image = decode_image(parts[ext], f"{where}.{ext}")
    except ImageError as e:
        raise ValueError(str(e)) from None
    return caption, image


def check_shards(shards, tok, max_length, log=print):
    """--check-data on shards: every sample of every shard in order, every image opened, every caption
    tokenised; prints the counts and returns them."""
    counts = {"shards": len(shards), "samples": 0, "usable": 0, "bad": 0, "too_long": 0, "tokens": 0, "targets": 0}
    first_bad = []
    for path in shards:
        for key, parts in unit_samples(path):
            counts["samples"] += 1
            try:
                if key is None:
                    raise ValueError(parts)
                caption, _ = decode(f"{os.path.basename(path)}/{key}", parts)
            except ValueError as e:
                counts["bad"] += 1
                first_bad = (first_bad + [str(e)])[:3]
                continue
            ids, labels, _, truncated = tokenize_caption(tok, caption, max_length)
            counts["usable"] += 1
            counts["too_long"] += truncated
            counts["tokens"] += len(ids)
            counts["targets"] += sum(l != IGNORE for l in labels)
    c = counts
    log(f"shards: {c['shards']}, samples: {c['samples']} (image + caption)\n"
        f"  bad (skipped in training): {c['bad']}" + (f" (first: {'; '.join(first_bad)})" if first_bad else "") + "\n"
        f"  longer than max_length: {c['too_long']} (truncated)\n"
        f"  usable: {c['usable']} samples, {c['tokens']} tokens (image slots included), {c['targets']} target tokens")
    return counts


# ----------------------------------------------------------------------------- the streams

def epoch_units(n_shards, stream, streams, seed, epoch):
    """This stream's units of the epoch: [(shard index, part, parts)] (see the module docstring)."""
    order = list(range(n_shards))
    random.Random(f"{seed}/{epoch}").shuffle(order)  # str seeds are stable across runs and processes
    parts = max(1, -(-streams // n_shards))
    return [(order[u // parts], u % parts, parts) for u in range(stream, n_shards * parts, streams)]


def stream_samples(shards, stream, streams, *, seed, buffer, position=None):
    """Endless ((epoch, block, unit, sample, emitted), (where, parts)) of one stream, from `position`
    (the first tuple of an earlier item; None = the start). See the module docstring."""
    epoch, block, u, k, emitted = position or (0, 0, 0, 0, 0)
    empty = 0  # epochs in a row in which this stream read nothing
    while True:
        units = epoch_units(len(shards), stream, streams, seed, epoch)

        def read(u, k):  # ((unit, sample) after it, item) from unit u, sample k on
            for ui in range(u, len(units)):
                index, part, parts = units[ui]
                name = os.path.basename(shards[index])
                for n, (key, item) in enumerate(unit_samples(shards[index], part, parts, k if ui == u else 0)):
                    yield (ui, (k if ui == u else 0) + n + 1), ((f"{name}/{key}", item) if key else (None, item))
        reader, any_read = read(u, k), False
        while True:
            items = list(islice(reader, buffer))
            if not items:
                break
            any_read = True
            order = list(range(len(items)))
            random.Random(f"{seed}/{epoch}/{stream}/{block}").shuffle(order)
            for m in range(emitted, len(items)):
                yield (epoch, block, u, k, m + 1), items[order[m]][1]
            (u, k), block, emitted = items[-1][0], block + 1, 0
        empty = 0 if any_read else empty + 1
        if empty > len(shards):  # (one empty epoch can be an empty shard's turn; this many, no data)
            raise DataError(f"stream {stream} of {streams}: its shards hold no sample")
        epoch, block, u, k = epoch + 1, 0, 0, 0


class ShardCaptions(torch.utils.data.IterableDataset):
    """Caption batches from shards for one process, through its DataLoader with `workers` workers
    (batches()). Each batch is collate()'s dict plus "bad" (messages of the samples skipped while making
    it), "samples" ([(epoch, "shard/key")]) and "position" ((stream, its position after this batch)).
    The process keeps track with advance(batch); state_dict()/load_state_dict() save and restore it."""

    def __init__(self, shards, *, tokenizer_file, image_tokens, max_length, image_size, batch_size, seed,
                 rank=0, world=1, workers=0, buffer=1000):
        self.shards, self.tokenizer_file, self.image_tokens = list(shards), tokenizer_file, image_tokens
        self.max_length, self.image_size, self.batch_size, self.seed = max_length, image_size, batch_size, seed
        self.rank, self.world, self.workers, self.buffer = rank, world, workers, buffer
        self.positions, self.taken = {}, 0  # {stream: position}, batches this process has consumed

    def batches(self, worker_init_fn=None):
        """Endless batches through a DataLoader, each recorded (advance) as the loop takes it."""
        loader = torch.utils.data.DataLoader(self, batch_size=None, collate_fn=identity, num_workers=self.workers,
                                             worker_init_fn=worker_init_fn if self.workers else None)
        for batch in loader:
            self.advance(batch)
            yield batch

    def advance(self, batch):
        stream, position = batch["position"]
        self.positions[stream] = position
        self.taken += 1

    def state_dict(self):
        return {"world": self.world, "workers": self.workers, "batches": self.taken, "seed": self.seed,
                "buffer": self.buffer, "shards": len(self.shards),
                "positions": {str(s): list(p) for s, p in self.positions.items()}}

    def load_state_dict(self, state):
        """Continue from a saved state; False (starting over) if it was saved for another layout."""
        same = all(state.get(k) == v for k, v in (("world", self.world), ("workers", self.workers),
                                                    ("seed", self.seed), ("buffer", self.buffer),
                                                    ("shards", len(self.shards))))
        if same:
            self.taken = state["batches"]
            self.positions = {int(s): tuple(p) for s, p in state["positions"].items()}
        return same

    def __iter__(self):
        info, n = torch.utils.data.get_worker_info(), max(1, self.workers)
        w = 0 if info is None else info.id
        if (0 if info is None else info.num_workers) != self.workers:
            raise DataError(f"ShardCaptions was made for {self.workers} workers, the DataLoader has "
                            f"{0 if info is None else info.num_workers}")
        stream = self.rank * n + (w + self.taken) % n
        tok = Tokenizer(self.tokenizer_file, self.image_tokens)  # made here: each worker its own
        samples = stream_samples(self.shards, stream, self.world * n, seed=self.seed,
                                 buffer=self.buffer, position=self.positions.get(stream))
        items, bad, names = [], [], []
        last_good = (self.positions.get(stream) or (0,))[0]  # the epoch of the last usable sample
        for position, (where, parts) in samples:
            try:
                if where is None:  # a shard that could not be read on: parts is the message
                    raise ValueError(parts)
                caption, image = decode(where, parts)
            except ValueError as e:
                bad.append(str(e))
            else:
                ids, labels, _, _ = tokenize_caption(tok, caption, self.max_length)
                items.append({"ids": torch.tensor(ids), "labels": torch.tensor(labels),
                              "pixel_values": preprocess_image(image, self.image_size)[None]})
                names.append((position[0], where))
                last_good = position[0]
            if position[0] > last_good + 1:
                raise DataError(f"stream {stream}: a whole epoch of its shards without a usable sample "
                                f"(first: {bad[0] if bad else '?'})")
            if len(items) == self.batch_size:
                batch = collate(items)
                batch.update(bad=bad, samples=names, position=(stream, position))
                yield batch
                items, bad, names = [], [], []


def identity(batch):  # DataLoader(collate_fn=...): the batches are made in ShardCaptions already
    return batch
