"""The demo's stand-ins for the pretrained models the paper starts from, and the HF layouts that
train.py --stage 1 reads them in.

  LLaMA-7B -> a tiny LLaMA pretrained for ten minutes on a curriculum of the world's text (pretrain_llm),
              written as an HF LLaMA checkpoint (write_hf_llama: config.json + model.safetensors
              + tokenizer.model), what --llm-init reads;
  CLIP ViT-L/14 -> a tiny ViT pretrained contrastively for a minute on its own pool of the world's
              images with alt text (pretrain_vit), written as an HF CLIPModel (write_hf_clip: vision_config +
              vision_model.* keys, q/k/v unfused per head), what --vision-init reads.
"""
import json
import math
import os
import random

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from . import world
from ..config import LlamaConfig, VisionConfig
from ..image import load_image, preprocess_image
from ..llama import Llama
from ..model import lm_loss_sum
from ..tokenizer import IGNORE, IMAGE_SLOT, Tokenizer
from ..train.batches import collate
from ..train.data import tokenize_caption, tokenize_conversation
from ..vision import VisionTransformer
from ..weights import HF_CLIP, layer_template


# ----------------------------------------------------------------------------- HF layouts (the inputs of stage 1)

def write_hf_llama(llm: Llama, out_dir, tokenizer_file):
    """config.json + model.safetensors + tokenizer.model as an HF LLaMA release (what --llm-init reads)."""
    c = llm.config
    os.makedirs(out_dir, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
              "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
              "num_key_value_heads": c.num_key_value_heads, "max_position_embeddings": c.max_position_embeddings,
              "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta, "tie_word_embeddings": c.tie_word_embeddings,
              "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "torch_dtype": "float32"}
    sd = {k: v.detach().contiguous() for k, v in llm.state_dict().items()}
    save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(tokenizer_file, "rb") as src, open(os.path.join(out_dir, "tokenizer.model"), "wb") as dst:
        dst.write(src.read())


def unmap_hf_clip(sd, cfg: VisionConfig):
    """Our ViT state dict -> HF CLIP `vision_model.*` names: the inverse of owl.weights.map_hf_clip
    (only the demo writes HF CLIP). The fused per-head [q_h; k_h; v_h] rows are split again."""
    inverse = {ours: hf for hf, ours in HF_CLIP.items()}
    C, nh = cfg.hidden_size, cfg.num_attention_heads
    out = {}
    for k, v in sd.items():
        t, i = layer_template(k)
        if t.endswith("self_attn.query_key_value.weight") or t.endswith("self_attn.query_key_value.bias"):
            kind = k.rsplit(".", 1)[1]
            parts = v.reshape(nh, 3, C // nh, *v.shape[1:])  # (nh, 3, hs, ...)
            for j, p in enumerate("qkv"):
                out[f"vision_model.encoder.layers.{i}.self_attn.{p}_proj.{kind}"] = parts[:, j].reshape(C, *v.shape[1:])
        elif t not in inverse:
            raise KeyError(f"no HF CLIP name for {k}")
        else:
            out[inverse[t].format(i)] = v
    out["vision_model.embeddings.class_embedding"] = out["vision_model.embeddings.class_embedding"].reshape(-1)
    out["vision_model.embeddings.position_embedding.weight"] = out["vision_model.embeddings.position_embedding.weight"][0]
    return {k: v.detach().contiguous() for k, v in out.items()}


def write_hf_clip(vit: VisionTransformer, out_dir):
    """config.json (with vision_config) + model.safetensors (vision_model.*) as an HF CLIPModel."""
    c = vit.config
    os.makedirs(out_dir, exist_ok=True)
    vision = {"model_type": "clip_vision_model", "hidden_act": "quick_gelu", "hidden_size": c.hidden_size,
              "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
              "num_attention_heads": c.num_attention_heads, "image_size": c.image_size,
              "patch_size": c.patch_size, "layer_norm_eps": c.layer_norm_eps, "attention_dropout": c.dropout,
              "num_channels": 3}
    config = {"architectures": ["CLIPModel"], "model_type": "clip", "vision_config": vision,
              "note": "the demo's stand-in for a pretrained CLIP (owl/demo/stand_ins.py)"}
    save_file(unmap_hf_clip(vit.state_dict(), c), os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


# ----------------------------------------------------------------------------- the stand-in pretrained LLM

def notes_ids(tok: Tokenizer, note):
    """An image's notes as the ids the LLM reads in its image_tokens slots: one piece per word (20
    words), then a full stop."""
    ids = tok.sp.encode(note) + [tok.sp.piece_to_id(".")]
    if len(ids) != tok.image_tokens or tok.sp.unk_id() in ids:
        raise ValueError(f"the notes {note!r} are {len(ids)} tokens with the full stop, not {tok.image_tokens}: "
                         f"every notes word must be one piece of the tokenizer")
    return ids


def encode_doc(tok: Tokenizer, doc, i):
    """A corpus document {"text", "notes"} -> ids, each image slot holding the next image's notes.

    A caption is tokenised as train.py's stage 1 does (BOS, slots, caption, EOS). A conversation is
    tokenised half the time as train.py's stage 2 does (chunks split at "AI: " and "\nHuman: ", each
    answer followed by EOS) and half as a prompt reaches owl.generate (one chunk between images up to
    the last "AI: ", whose trailing space is a lone "▁" piece, then the answer and EOS): the two
    differ slightly, in the official code too, and the LLM should know both."""
    text = doc["text"]
    if "\nAI: " not in text:
        ids, labels = tokenize_caption(tok, text, 10 ** 6)[:2]
    elif i % 2 == 0:
        ids, labels = tokenize_conversation(tok, text, 10 ** 6)[:2]
    else:
        prompt, _, answer = text.rstrip("\n").rpartition("AI: ")
        ids = tok.encode_prompt(prompt + "AI: ")
        labels = [IGNORE] * len(ids) + tok.sp.encode(answer) + [tok.eos_id]
        ids += labels[len(ids):]
    notes, out, k = iter(doc["notes"]), [], 0
    while k < len(ids):  # each run of image_tokens slots becomes the next image's notes
        if ids[k] == IMAGE_SLOT:
            out += notes_ids(tok, next(notes))
            k += tok.image_tokens
        else:
            out.append(ids[k])
            k += 1
    return out, labels


def answers_right(llm, tok: Tokenizer, doc):
    """Per answer of a corpus document, was every token of it (and its EOS) the LLM's greedy choice,
    teacher-forced, the notes in the image slots (train.py's tokenisation of a conversation)."""
    ids, labels = encode_doc(tok, doc, 0)
    pred = llm(torch.tensor([ids]))[0].argmax(-1).tolist()
    out, ok = [], True
    for p in range(1, len(labels)):
        if labels[p] != IGNORE:
            ok &= pred[p - 1] == labels[p]
            if labels[p] == tok.eos_id:
                out.append(ok)
                ok = True
    return out


# The stand-in LLM's curriculum: (share of the steps, {document kind: weight}), each phase keeping the
# kinds of the ones before. A real LLaMA has read text about text of every kind; ours has a few minutes,
# and mixed from the start the keyed lookups ("What colour is the shape at the top right?") stay at the
# rate of answering from a random item of the scene while the rest is learned (bench/RESULTS.md: 83% of
# answers after 8000 steps, flat). One lookup at a time, the earlier ones kept: those keyed by a cell's
# name are learned (93-95%); those keyed by a colour or shape word of the question ("Where is the red
# circle?") stay at the random-item rate within these 12000 steps. Drilled alone, every pair of a scene
# asked in turn, they were learned in one data stream of five: the last answer is the cell not yet named,
# so the loss falls by elimination. One question per document is learned in 8 runs of 10, but the phases
# after it then learn the cell-keyed lookups poorly (4 or 8 heads: answer rate 56-73% against 80%), so it
# is not used (bench/RESULTS.md, 6 Dec, seventh to ninth sessions).
LISTS = {"list colours": 1, "list shapes": 1, "list words": 1}  # a value right after its cell, every cell
PAIRS = {**LISTS, "list sizes": 1, "list colours of shapes": 1, "list positions": 1}  # + by shape, by pair
CHECKS = {**PAIRS, "list check": 1}  # is it there?
CURRICULUM = (
    (0.10, LISTS),
    (0.10, PAIRS),
    (0.10, CHECKS),
    (0.10, {**CHECKS, "drill": 4}),  # one keyed question at a time
    (0.60, {**CHECKS, "drill": 3, "conversation": 3, "caption": 2, "describe": 1,
            "compare": 2}),  # what the stages ask
)


def phase(step, steps):
    """The {kind: weight} of CURRICULUM at step (of steps)."""
    edge = 0.0
    for share, kinds in CURRICULUM:
        edge += share
        if step < edge * steps:
            return kinds
    return CURRICULUM[-1][1]


def lm_batches(tok: Tokenizer, steps, batch_size, seed):
    """steps batches of fresh documents, right-padded: ids (B, T) and labels (B, T). Each batch is of
    one kind, drawn by the curriculum's weights at its step (documents of a kind are of a length, so
    padding is a few percent), about new scenes: nothing is read twice, nothing can be memorised."""
    rng = random.Random(seed)
    for step in range(steps):
        kinds = phase(step, steps)
        kind = rng.choices(list(kinds), weights=list(kinds.values()))[0]
        docs = []
        while len(docs) < batch_size:
            doc = world.lm_document(kind, world.random_scene(rng, p_word=0.8), rng)
            if doc:
                docs.append(encode_doc(tok, doc, rng.randrange(2)))
        batch = collate([{"ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": None}
                         for ids, labels in docs])  # train.py's right padding
        yield batch["input_ids"], batch["labels"]


def pretrain_llm(cfg: LlamaConfig, tok: Tokenizer, steps, batch_size, lr, seed, log=None, probe=None,
                 probe_every=2000):
    """A plain next-token loop (AdamW, warm-up then cosine) on the curriculum; returns the LLM. Every
    probe_every steps the log gets probe(llm), a probe curve (probe.probe_lookups: each lookup's answers)."""
    torch.manual_seed(seed)
    llm = Llama(cfg)
    llm.init_weights()
    opt = torch.optim.AdamW(llm.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 10)
    bar = tqdm(lm_batches(tok, steps, batch_size, seed), total=steps, desc="pretrain LLM", dynamic_ncols=True,
               leave=False)
    for step, (x, y) in enumerate(bar):
        # linear warm-up, then cosine decay to lr / 10
        f = (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        for g in opt.param_groups:
            g["lr"] = lr * f
        loss, n = lm_loss_sum(llm(x), y)
        loss = loss / n
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if log is not None:
            log.write(json.dumps({"step": step + 1, "loss": round(loss.item(), 5), "lr": lr * f}) + "\n")
            if probe is not None and ((step + 1) % probe_every == 0 or step + 1 == steps):
                curve = probe(llm.eval())
                llm.train()
                log.write(json.dumps({"step": step + 1, "probe": curve}) + "\n")
                log.flush()
                tqdm.write(f"[demo] LLM step {step + 1}: " + ", ".join(f"{k} {v:.0%}" for k, v in curve.items()))
    return llm.eval()


# ----------------------------------------------------------------------------- the stand-in CLIP

def cell_patches(cfg: VisionConfig):
    """For each of the world's 2 x 2 cells (reading order), the token indices of its patches (+1: class token)."""
    g = cfg.image_size // cfg.patch_size
    h = g // 2
    return [[1 + r * g + c for r in range(i * h, (i + 1) * h) for c in range(j * h, (j + 1) * h)]
            for i in range(2) for j in range(2)]


class TextTower(torch.nn.Module):
    """The stand-in CLIP's text encoder: the mean of the alt text's word embeddings, then a linear map.
    Order-free by construction; CLIP's own is nearly so (Yuksekgonul et al., 2023, "When and why
    vision-language models behave like bags-of-words")."""

    def __init__(self, words, dim):
        super().__init__()
        self.index = {w: i for i, w in enumerate(words)}
        self.embed = torch.nn.EmbeddingBag(len(words), dim, mode="mean")
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, texts):
        bags = [[self.index[w] for w in t.split()] for t in texts]
        offsets = torch.tensor([0] + [len(b) for b in bags[:-1]]).cumsum(0)
        return self.proj(self.embed(torch.tensor([i for b in bags for i in b]), offsets))


def read_images(rows, root, size):
    return torch.stack([preprocess_image(load_image(os.path.join(root, r["image"])), size) for r in rows])


def pretrain_vit(cfg: VisionConfig, alt_text_file, steps, batch_size, lr, seed, log=None):
    """CLIP's objective at the demo's size: the ViT's class token and the alt text's bag of words are
    pulled together within a batch (symmetric InfoNCE, a learned temperature) on the world's own pool of
    images (world.alt_text), none of which stage 1 or 2 sees. Like CLIP, the ViT learns what is in an
    image, not where, nor which colour goes with which shape, nor the small text: what stage 1 of the
    paper, which trains the ViT, can still teach it and a frozen ViT (LLaVA, MiniGPT-4) cannot learn."""
    torch.manual_seed(seed)
    vit = VisionTransformer(cfg)
    vit.init_weights()
    with open(alt_text_file) as f:
        rows = [json.loads(line) for line in f]
    pixels = read_images(rows, os.path.dirname(os.path.abspath(alt_text_file)), cfg.image_size)
    texts = [r["text"] for r in rows]
    tower = TextTower(sorted({w for t in texts for w in t.split()}), cfg.hidden_size)
    head = torch.nn.Linear(cfg.hidden_size, cfg.hidden_size)  # CLIP's visual projection
    log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    params = list(vit.parameters()) + list(tower.parameters()) + list(head.parameters()) + [log_scale]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    target = torch.arange(batch_size)
    bar = tqdm(range(steps), desc="pretrain ViT", dynamic_ncols=True, leave=False)
    for step in bar:
        warm = max(1, steps // 20)  # linear warm-up, then cosine to 0
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randperm(len(rows), generator=g)[:batch_size]
        image = torch.nn.functional.normalize(head(vit(pixels[idx])[:, 0]), dim=-1)
        text = torch.nn.functional.normalize(tower([texts[i] for i in idx.tolist()]), dim=-1)
        logits = log_scale.exp().clamp(max=100) * image @ text.T  # (B images, B texts)
        loss = (torch.nn.functional.cross_entropy(logits, target) +
                torch.nn.functional.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if log is not None:
            log.write(json.dumps({"step": step + 1, "loss": round(loss.item(), 5)}) + "\n")
    return vit.eval()


@torch.no_grad()
def probe_vit(vit: VisionTransformer, labels_file, steps=300):
    """Linear probes of a ViT's features, fit on the stage-2 images and scored on the held-out ones:
    per cell, what it holds (shape, word or nothing), the colour of its shape and its word, from the
    mean of the cell's patch tokens; and where a given colour-shape pair is (which of the 4 cells), from
    the class token, averaged over the 12 pairs. Held-out accuracies."""
    with open(labels_file) as f:
        rows = [json.loads(line) for line in f]
    pixels = read_images(rows, os.path.dirname(os.path.abspath(labels_file)), vit.config.image_size)
    feats = torch.cat([vit(pixels[i:i + 256]) for i in range(0, len(rows), 256)])  # (N, 1 + patches, C)
    y = torch.tensor([r["cells"] for r in rows])  # (N, 4, 3): thing, colour or word, size
    held = torch.tensor([os.path.basename(r["image"]).startswith("test_") for r in rows])  # (N,)
    cells = feats[:, torch.tensor(cell_patches(vit.config))].mean(2)  # (N, 4, C)

    def fit(x, target, keep, held):
        (xa, ya), (xb, yb) = [(x[keep & m], target[keep & m]) for m in (~held, held)]
        mu, sd = xa.mean(0), xa.std(0) + 1e-5
        lin = torch.nn.Linear(x.shape[-1], int(target.max()) + 1)
        opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-4)
        with torch.enable_grad():
            for _ in range(steps):
                loss = torch.nn.functional.cross_entropy(lin((xa - mu) / sd), ya)
                opt.zero_grad()
                loss.backward()
                opt.step()
        return (lin((xb - mu) / sd).argmax(-1) == yb).float().mean().item()

    thing, what = y[..., 0].flatten(), y[..., 1].flatten()
    per_cell, held_cell = cells.flatten(0, 1), held.repeat_interleave(4)
    shape, word = thing < len(world.SHAPES), thing == world.THINGS.index("word")
    out = {"cell thing": fit(per_cell, thing, torch.ones_like(shape), held_cell),
           "cell colour": fit(per_cell, what, shape, held_cell), "cell word": fit(per_cell, what, word, held_cell)}
    where = []
    for c in range(len(world.COLOURS)):
        for sh in range(len(world.SHAPES)):
            hit = (y[..., 0] == sh) & (y[..., 1] == c)  # (N, 4)
            where.append(fit(feats[:, 0], hit.float().argmax(1), hit.any(1), held))
    out["where a colour-shape pair is (class token)"] = sum(where) / len(where)
    return {k: round(v, 3) for k, v in out.items()}
