"""What the visual tokens say: each one read as its nearest word in the LLM's input embedding table.

The stand-in LLM was pretrained with each image's notes, in words, where the image's visual tokens go
("top left big red circle top right none word cat ... ."; world.notes), so "aligning vision to a frozen
LLM" has a picture here: after stage 1 the 21 visual tokens of an image should read, token by token, as
the notes of that image. A visual token is read as the word whose input embedding has the largest
cosine with it (the readout of a soft prompt as words, as in Lester et al., 2021, section 7).

    python -m owl.demo.readout OUT            # the demo's arms, on the first held-out images

Agreement is counted per slot of the notes (5 per cell: the cell's name in two words, then size,
colour or "word", shape or the scene word; the last slot is the full stop); "content" is the 12 slots
that depend on the image (size, colour, shape per cell), the number the report gives per arm. The
cell-name slots are the same in every image: a model can get them right without looking.

Candidly, a visual token need not be near any word for the LLM to read it: the frozen LLM reads
directions, not nearest neighbours, so agreement is a lower bound on what the tokens carry (the
accuracy of the arms is the measure; this is the picture of it).
"""
import argparse
import json
import os
import re
import sys

import torch
import torch.nn.functional as F

from .stand_ins import notes_ids
from ..generate import visual_tokens
from ..image import load_image
from ..weights import load_model

# the models of a demo run whose tokens are read, in the order of the method: key, label, folder in OUT
MODELS = (("unaligned", "before stage 1 (stand-in CLIP, fresh abstractor)", "unaligned"),
          ("stage1", "after stage 1", "stage1"),
          ("both", "after stage 2 (both stages)", "stage2"),
          ("stage2_only", "stage 2 only", "stage2_only"),
          ("frozen_vit_stage1", "ViT frozen, after stage 1", os.path.join("frozen_vit", "stage1")),
          ("frozen_vit", "ViT frozen, after stage 2", os.path.join("frozen_vit", "stage2")))
KINDS = ("cell name", "cell name", "size", "colour", "shape")  # the 5 slots of a cell, in the notes' order


def slot_kind(i, slots):
    return "end" if i == slots - 1 else KINDS[i % 5]


@torch.inference_mode()
def nearest_words(model, tok, images):
    """(N, slots) token ids: each visual token of each image's nearest input embedding (cosine)."""
    v = visual_tokens(model, images).float()  # (N, slots, C)
    # the tokenizer's pieces only: the table has rows past them (vocab_size rounded up, never a word)
    table = model.language_model.model.embed_tokens.weight[:tok.sp.get_piece_size()].float()  # (pieces, C)
    sim = F.normalize(v, dim=-1) @ F.normalize(table, dim=-1).T  # (N, slots, vocab)
    return sim.argmax(-1)


def score(tok, got, want, names):
    """Agreement of the read token ids got (N, slots) with the notes' ids want (N, slots): overall on the
    content slots and per slot kind, and per image its notes and its reading in words."""
    hit = (got == want).float()  # (N, slots)
    kinds = [slot_kind(i, want.shape[1]) for i in range(want.shape[1])]
    per_kind = {k: hit[:, [i for i, x in enumerate(kinds) if x == k]].mean().item() for k in dict.fromkeys(kinds)}
    content = [i for i, k in enumerate(kinds) if k in ("size", "colour", "shape")]
    # one printable word per slot (a piece may be empty or hold whitespace once the "▁" is dropped)
    word = lambda i: re.sub(r"\s", "_", tok.sp.id_to_piece(int(i)).replace("\u2581", "")) or "_"  # noqa: E731
    rows = [{"image": p, "notes": " ".join(word(i) for i in w), "read": " ".join(word(i) for i in g)}
            for p, w, g in zip(names, want, got)]
    return {"content": hit[:, content].mean().item(), "per_kind": per_kind, "n": len(names), "rows": rows}


def read_images(model, tok, test_file, n=None):
    """The readout of the held-out images of test.json (each image once, in order): score()."""
    root = os.path.dirname(os.path.abspath(test_file))
    with open(test_file) as f:
        pairs = dict((p, nt) for ex in json.load(f) for p, nt in zip(ex["images"], ex["notes"]))
    names = list(pairs)[:n]
    want = torch.tensor([notes_ids(tok, pairs[p]) for p in names])  # (N, slots)
    got = torch.cat([nearest_words(model, tok, [load_image(os.path.join(root, p)) for p in names[i:i + 32]])
                     for i in range(0, len(names), 32)])
    return score(tok, got, want, names)


def read_run(out, n=None):
    """key -> read_images of each of MODELS that OUT holds, on OUT's held-out images."""
    test = os.path.join(out, "world", "test.json")
    return {key: read_images(*load_model(os.path.join(out, sub)), test, n)
            for key, _, sub in MODELS if os.path.isfile(os.path.join(out, sub, "model.safetensors"))}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m owl.demo.readout", description=__doc__.split("\n\n")[0])
    p.add_argument("out", metavar="OUT", help="a finished demo run (python -m owl.demo OUT)")
    p.add_argument("--images", type=int, default=3, help="held-out images to show (default: 3)")
    a = p.parse_args(argv)
    test = os.path.join(a.out, "world", "test.json")
    if not os.path.isfile(test):
        print(f"error: {test}: not found (is {a.out} a finished demo run?)", file=sys.stderr)
        return 1
    labels = {key: label for key, label, _ in MODELS}
    for key, r in read_run(a.out).items():
        print(f"{labels[key]}: {100 * r['content']:.1f}% of content slots read as the notes' word "
              + ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["per_kind"].items()))
        for row in r["rows"][:a.images]:
            print(f"  {row['image']}\n    notes {row['notes']}\n    read  {row['read']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
