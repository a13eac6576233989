"""The demo's stand-ins for the pretrained models the paper starts from, and the HF layouts that
train.py --stage 1 reads them in.

  LLaMA-7B -> a tiny LLaMA pretrained for a minute or two on the world's text (pretrain_llm),
              written as an HF LLaMA checkpoint (write_hf_llama: config.json + model.safetensors
              + tokenizer.model), what --llm-init reads;
  CLIP ViT-L/14 -> a tiny ViT pretrained for seconds to name what is in each cell of the world's
              images (pretrain_vit), written as an HF CLIPModel (write_hf_clip: vision_config +
              vision_model.* keys, q/k/v unfused per head), what --vision-init reads.
"""
import json
import math
import os

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


def lm_batches(tok: Tokenizer, corpus_file, batch_size, seed):
    """Endless batches of whole documents, right-padded: ids (B, T) and labels (B, T). Whole documents,
    not windows of a packed stream: a window that cuts a conversation after its notes would teach the
    LLM to answer without reading them. Each epoch the documents are shuffled, sorted by length and
    cut into batches of neighbours, which are then shuffled: captions (about 50 tokens) and
    conversations (about 150) no longer share a batch, and padding falls from about 45% of the
    tokens to a few percent."""
    with open(corpus_file) as f:
        docs = [encode_doc(tok, json.loads(line), i) for i, line in enumerate(f) if line.strip()]
    g = torch.Generator().manual_seed(seed)
    while True:
        order = sorted(torch.randperm(len(docs), generator=g).tolist(), key=lambda i: len(docs[i][0]))
        batches = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
        for j in torch.randperm(len(batches), generator=g).tolist():
            batch = collate([{"ids": torch.tensor(docs[i][0]), "labels": torch.tensor(docs[i][1]),
                              "pixel_values": None} for i in batches[j]])  # train.py's right padding
            yield batch["input_ids"], batch["labels"]


def pretrain_llm(cfg: LlamaConfig, tok: Tokenizer, corpus_file, steps, batch_size, lr, seed, log=None):
    """A plain next-token loop (AdamW, warm-up then cosine) on the world's text; returns the LLM."""
    torch.manual_seed(seed)
    llm = Llama(cfg)
    llm.init_weights()
    opt = torch.optim.AdamW(llm.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 10)
    data = lm_batches(tok, corpus_file, batch_size, seed)
    bar = tqdm(range(steps), desc="pretrain LLM", dynamic_ncols=True, leave=False)
    for step in bar:
        # linear warm-up, then cosine decay to lr / 10
        f = (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        for g in opt.param_groups:
            g["lr"] = lr * f
        x, y = next(data)
        loss, n = lm_loss_sum(llm(x), y)
        loss = loss / n
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if log is not None:
            log.write(json.dumps({"step": step + 1, "loss": round(loss.item(), 5), "lr": lr * f}) + "\n")
    return llm.eval()


# ----------------------------------------------------------------------------- the stand-in CLIP

def cell_patches(cfg: VisionConfig):
    """For each of the world's 2 x 2 cells (reading order), the token indices of its patches (+1: class token)."""
    g = cfg.image_size // cfg.patch_size
    h = g // 2
    return [[1 + r * g + c for r in range(i * h, (i + 1) * h) for c in range(j * h, (j + 1) * h)]
            for i in range(2) for j in range(2)]


def pretrain_vit(cfg: VisionConfig, labels_file, steps, batch_size, lr, seed, log=None):
    """A few hundred steps of supervised pretraining (per cell: which thing, which colour or word, which
    size) from linear heads on the mean of each cell's patch tokens. It stands in for CLIP's
    contrastive pretraining: stage 1 starts from a ViT that already sees, as in the paper."""
    torch.manual_seed(seed)
    vit = VisionTransformer(cfg)
    vit.init_weights()
    heads = torch.nn.ModuleList(torch.nn.Linear(cfg.hidden_size, n) for n in
                                (len(world.THINGS), len(world.WHATS), len(world.SIZES_OR_NOTHING)))
    root = os.path.dirname(os.path.abspath(labels_file))
    with open(labels_file) as f:
        rows = [json.loads(line) for line in f]
    pixels = torch.stack([preprocess_image(load_image(os.path.join(root, r["image"])), cfg.image_size) for r in rows])
    y = torch.tensor([r["cells"] for r in rows])  # (N, 4 cells, 3 attributes)
    cells = torch.tensor(cell_patches(cfg))  # (4, patches per cell)
    params = list(vit.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="pretrain ViT", dynamic_ncols=True, leave=False)
    for step in bar:
        warm = max(1, steps // 20)  # linear warm-up, then cosine to 0
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(0, len(rows), (batch_size,), generator=g)
        feats = vit(pixels[idx])  # (B, 1 + patches, C)
        per_cell = feats[:, cells].mean(2)  # (B, 4, C)
        loss = sum(torch.nn.functional.cross_entropy(h(per_cell).flatten(0, 1), y[idx][..., k].flatten())
                   for k, h in enumerate(heads))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if log is not None:
            log.write(json.dumps({"step": step + 1, "loss": round(loss.item(), 5)}) + "\n")
    return vit.eval()
