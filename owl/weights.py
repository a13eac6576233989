"""Loading and saving model weights: one explicit, checked key map per source layout.

  1. HF CLIP (`openai/clip-vit-large-patch14`, a whole CLIPModel): the vision tower only, renamed to
     the official mPLUG-Owl vision names, with q/k/v fused per head into `query_key_value`.
  2. HF LLaMA (`config.json` + `model.safetensors`, or shards + `model.safetensors.index.json`).
  3. The official mPLUG-Owl layout (`vision_model.*`, `query_tokens`, `abstractor.*`,
     `language_model.*`); our own model folders are written in it, so the official code reads them.

Every load builds the model on the meta device and assigns the tensors it read (gpt-fast), so the
weights are never held twice; they stay in the files' dtype unless a dtype is asked for. A load
raises on missing, unexpected or mis-shaped keys and names them: there is no partial load. (A folder
of weights is a model folder; "checkpoint" means train.py's resumable state, owl/train/state.py.)
Stage 2's adapter files are adapter.py; converting the release's .bin files and merging an adapter
into a model folder are convert.py.
"""
import json
import os
import re
import shutil
import sys
from collections import Counter

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from .config import OwlConfig, VisionConfig, LlamaConfig, from_dict
from .fileio import atomic_dir, read_json, read_safetensors, safetensors_shapes
from .llama import Llama
from .model import MplugOwl
from .tokenizer import Tokenizer
from .vision import VisionTransformer


class WeightsError(ValueError):
    """A model folder (or adapter) that cannot be loaded: chat, eval and train print it as one line."""


# ----------------------------------------------------------------------------- reading files

def weight_files(path):
    """The safetensors files of a model folder (sharded or not)."""
    if not os.path.isdir(path):
        raise WeightsError(f"{path}: no such model folder")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        files = read_index(index)
        missing = [s for s in files if not os.path.isfile(os.path.join(path, s))]
        if missing:
            raise WeightsError(f"{index} names shards that are missing: {', '.join(missing[:3])}")
        return [os.path.join(path, s) for s in files]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors") and not f.startswith("adapter"))
    if files:
        return [os.path.join(path, f) for f in files]
    if any(f.endswith(".bin") for f in os.listdir(path)):
        raise WeightsError(f"{path} holds PyTorch .bin weights: convert them first with "
                           f"`python -m owl.convert {path} OUT_DIR`")
    raise WeightsError(f"{path}: no weights (*.safetensors) in this directory")


def read_weights(files, keep=None, dtype=None, device="cpu", progress=False):
    """{name: tensor} of the safetensors files for the kept names, converted tensor by tensor (floating
    ones only) so that at most one extra tensor is alive at any time. progress: a tqdm bar on stderr.
    A tensor held by two files (a stray model_backup.safetensors) and a non-finite weight (NaN gives
    silently empty answers) are refused, naming the file and the key (redteam-2 1.10, 1.7)."""
    out, source = {}, {}
    with tqdm(total=sum(os.path.getsize(f) for f in files), unit="B", unit_scale=True, desc="loading weights",
              file=sys.stderr, disable=not progress, leave=False) as bar:  # (closed, its line cleared, on an error too)
        for file in files:
            for k, t in read_safetensors(file, keep, WeightsError):
                bar.update(t.nbytes)
                if k in source:
                    raise WeightsError(f"{file}: {k} is also in {source[k]}: two files hold the same tensors; "
                                       f"remove the one that is not the model's")
                out[k], source[k] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).to(device), file
                if out[k].is_floating_point() and not torch.isfinite(out[k]).all():  # (on the device: fast on a GPU)
                    raise WeightsError(f"{file}: {k} holds NaN or infinite values")
    return out


def read_index(file):
    """The shard names of a *.index.json (HF's sharded layout), checked."""
    wm = read_json(file, WeightsError).get("weight_map")
    if isinstance(wm, dict) and all(isinstance(v, str) for v in wm.values()):
        return sorted(set(wm.values()))
    raise WeightsError(f"{file}: no weight_map of tensor name -> shard file")


def read_config(path):
    if not os.path.isdir(path):
        raise WeightsError(f"{path}: no such model folder")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise WeightsError(f"{path}: no config.json")
    return read_json(os.path.join(path, "config.json"), WeightsError, "a model config")


# ----------------------------------------------------------------------------- key maps

IGNORED = re.compile(r".*rotary_emb\.inv_freq$")  # a RoPE buffer some releases carry; not a weight

# HF CLIP vision tower -> official mPLUG-Owl vision names ({} is the layer index). q/k/v are fused below.
HF_CLIP = {
    "vision_model.embeddings.class_embedding": "embeddings.cls_token",
    "vision_model.embeddings.patch_embedding.weight": "embeddings.patch_embed.weight",
    "vision_model.embeddings.position_embedding.weight": "embeddings.position_embedding",
    "vision_model.pre_layrnorm.weight": "embeddings.pre_layernorm.weight",  # sic: HF's spelling
    "vision_model.pre_layrnorm.bias": "embeddings.pre_layernorm.bias",
    "vision_model.encoder.layers.{}.layer_norm1.weight": "encoder.layers.{}.input_layernorm.weight",
    "vision_model.encoder.layers.{}.layer_norm1.bias": "encoder.layers.{}.input_layernorm.bias",
    "vision_model.encoder.layers.{}.self_attn.out_proj.weight": "encoder.layers.{}.self_attn.dense.weight",
    "vision_model.encoder.layers.{}.self_attn.out_proj.bias": "encoder.layers.{}.self_attn.dense.bias",
    "vision_model.encoder.layers.{}.layer_norm2.weight": "encoder.layers.{}.post_attention_layernorm.weight",
    "vision_model.encoder.layers.{}.layer_norm2.bias": "encoder.layers.{}.post_attention_layernorm.bias",
    "vision_model.encoder.layers.{}.mlp.fc1.weight": "encoder.layers.{}.mlp.fc1.weight",
    "vision_model.encoder.layers.{}.mlp.fc1.bias": "encoder.layers.{}.mlp.fc1.bias",
    "vision_model.encoder.layers.{}.mlp.fc2.weight": "encoder.layers.{}.mlp.fc2.weight",
    "vision_model.encoder.layers.{}.mlp.fc2.bias": "encoder.layers.{}.mlp.fc2.bias",
    "vision_model.post_layernorm.weight": "post_layernorm.weight",
    "vision_model.post_layernorm.bias": "post_layernorm.bias",
}


def layer_template(key):
    """'a.layers.3.b' -> ('a.layers.{}.b', '3'); keys without a layer index -> (key, None)."""
    m = re.search(r"\.(\d+)\.", key)
    return (key[:m.start()] + ".{}." + key[m.end():], m.group(1)) if m else (key, None)


def map_hf_clip(sd, cfg: VisionConfig):
    """HF CLIPModel state dict -> our vision names. The text tower and projections are ignored."""
    out, qkv = {}, {}
    for k, v in sd.items():
        if not k.startswith("vision_model.") or k.endswith("position_ids"):
            continue
        t, i = layer_template(k)
        m = re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", k)
        if m:
            qkv[(int(m[1]), m[2], m[3])] = v
        elif t in HF_CLIP:
            out[HF_CLIP[t].format(i)] = v
        else:
            out[k] = v  # unknown: reported as unexpected by the check
    C, nh = cfg.hidden_size, cfg.num_attention_heads
    if "embeddings.cls_token" in out:
        out["embeddings.cls_token"] = out["embeddings.cls_token"].reshape(1, 1, -1)
    if "embeddings.position_embedding" in out:
        out["embeddings.position_embedding"] = out["embeddings.position_embedding"][None]
    for layer in sorted({l for l, _, _ in qkv}):
        for kind in ("weight", "bias"):
            parts = [qkv.get((layer, p, kind)) for p in "qkv"]
            if any(p is None for p in parts):
                raise WeightsError(f"HF CLIP layer {layer}: q/k/v {kind} incomplete, cannot fuse")
            # official layout: rows grouped per head as [q_h; k_h; v_h]
            fused = torch.stack([p.reshape(nh, C // nh, *p.shape[1:]) for p in parts], dim=1)  # (nh, 3, hs, ...)
            out[f"encoder.layers.{layer}.self_attn.query_key_value.{kind}"] = fused.reshape(3 * C, *parts[0].shape[1:])
    return out


def drop_rope_buffers(sd):
    """Official mPLUG-Owl or HF LLaMA state dict -> ours: both layouts use our names already (the
    classes are named after them), so there is no key map; only the RoPE buffers some carry go."""
    return {k: v for k, v in sd.items() if not IGNORED.match(k)}


HINTS = {"module.": "saved from DistributedDataParallel: strip 'module.'",
         "_orig_mod.": "saved from torch.compile: strip '_orig_mod.'",
         "base_model.model.": "a peft model: merge the adapter first and save the base model"}


def _summary(keys, n=4):
    groups = Counter(k.split(".")[0] for k in keys)
    return (", ".join(sorted(keys)[:n]) + (", ..." if len(keys) > n else "")
            + " [by prefix: " + ", ".join(f"{p}.* x{c}" for p, c in groups.most_common()) + "]")


def check_keys(want, got, source):
    """Raise, naming them, if the {name: shape} dicts differ in any key or shape."""
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    shapes = [f"{k} {tuple(got[k])} != {tuple(want[k])}" for k in want if k in got and tuple(got[k]) != tuple(want[k])]
    if missing or unexpected or shapes:
        lines = [f"{source}: the weights do not match the model"]
        if missing:
            lines.append(f"  missing {len(missing)}: {_summary(missing)}")
        if unexpected:
            lines.append(f"  unexpected {len(unexpected)}: {_summary(unexpected)}")
        if shapes:
            lines.append(f"  mis-shaped {len(shapes)}: {'; '.join(shapes[:4])}")
        hints = {h for p, h in HINTS.items() for k in unexpected if k.startswith(p)}
        lines += [f"  hint: {h}" for h in sorted(hints)]
        raise WeightsError("\n".join(lines))


def load_checked(module, sd, source):
    """load_state_dict(strict, assign) after naming every missing, unexpected, mis-shaped or integer key."""
    want = module.state_dict()
    check_keys({k: v.shape for k, v in want.items()}, {k: v.shape for k, v in sd.items()}, source)
    ints = [f"{k} ({str(v.dtype).replace('torch.', '')})" for k, v in sd.items()
            if want[k].is_floating_point() and not v.is_floating_point()]
    if ints:
        raise WeightsError(f"{source}: {len(ints)} tensor(s) are not floating point: {', '.join(ints[:4])}")
    module.load_state_dict(sd, strict=True, assign=True)
    return module


# ----------------------------------------------------------------------------- a config against its weights

def llama_pins(c: LlamaConfig, p="", section=""):
    """{config key: (its value, where the weights show it: (key, dim), or the prefix of the layers to count)}."""
    return {section + "num_hidden_layers": (c.num_hidden_layers, p + "model.layers."),
            section + "hidden_size": (c.hidden_size, (p + "model.embed_tokens.weight", 1)),
            section + "intermediate_size": (c.intermediate_size, (p + "model.layers.0.mlp.gate_proj.weight", 0))}


def vision_pins(c: VisionConfig, hf=False, section="vision_config."):
    e = "vision_model.embeddings."
    cls, patch, pos = ("class_embedding", "patch_embedding.weight", "position_embedding.weight") if hf else (
        "cls_token", "patch_embed.weight", "position_embedding")  # (C,) / (1, 1, C); (N + 1, C) / (1, N + 1, C)
    return {section + "num_hidden_layers": (c.num_hidden_layers, "vision_model.encoder.layers."),
            section + "hidden_size": (c.hidden_size, (e + cls, -1)), section + "patch_size": (c.patch_size, (e + patch, 2)),
            section + "intermediate_size": (c.intermediate_size, ("vision_model.encoder.layers.0.mlp.fc1.weight", 0)),
            section + "image_size (in positions)": (c.num_patches + 1, (e + pos, -2))}


def owl_pins(cfg: OwlConfig):
    fk, a = cfg.visual_abstractor_config, "visual_abstractor_config."
    return {**vision_pins(cfg.vision_config), a + "num_hidden_layers": (fk.num_hidden_layers, "abstractor.encoder.layers."),
            a + "hidden_size": (fk.hidden_size, ("query_tokens", -1)),
            a + "intermediate_size": (fk.intermediate_size, ("abstractor.encoder.layers.0.crossattention.output.mlp.w1.weight", 0)),
            **llama_pins(cfg.text_config, "language_model.", "text_config.")}


def check_fits(path, pins, files):
    """Refuse a config.json size that the weight files' headers contradict, before the model is built on the meta
    device (a num_hidden_layers of 1e6 took minutes there, a hidden_size of 1e9 overflowed: redteam-2 1.2, 1.3)."""
    shapes = {k: s for f in files for k, s in safetensors_shapes(f, WeightsError).items()}
    for key, (want, where) in pins.items():
        if isinstance(where, str):  # the layers under a prefix
            got = len({k[len(where):].split(".", 1)[0] for k in shapes if k.startswith(where)}) or None
        else:
            s = shapes.get(where[0])
            got = s[where[1]] if s is not None and -len(s) <= where[1] < len(s) else None
        if got is not None and want != got:
            raise WeightsError(f"{path}/config.json: {key} is {want:,} but the weights hold {got:,}")


# ----------------------------------------------------------------------------- public loaders

def _tokenizer_file(path):
    file = os.path.join(path, "tokenizer.model")
    if not os.path.isfile(file):
        raise WeightsError(f"{path}: no tokenizer.model")
    return file


def load_tokenizer(path, image_tokens=65, vocab_size=None):
    try:  # vocab_size: the model's, which the tokenizer must fit (Tokenizer)
        return Tokenizer(_tokenizer_file(path), image_tokens, vocab_size)
    except ValueError as e:
        raise WeightsError(str(e)) from None


def load_config(path):
    d = read_config(path)
    if "vision_config" not in d or "text_config" not in d:
        kind = d.get("model_type", "unknown")
        raise WeightsError(f"{path} is not an mPLUG-Owl model folder (config.json model_type={kind!r}; "
                           f"it needs vision_config, visual_abstractor_config and text_config)")
    cfg = _parsed(path, OwlConfig.from_official_dict, d)
    if any(f.endswith(".safetensors") for f in os.listdir(path)):  # (python -m owl.memory may read a config alone)
        check_fits(path, owl_pins(cfg), weight_files(path))
    return cfg


def _parsed(path, make, *a):
    try:
        return make(*a)
    except ValueError as e:
        raise WeightsError(f"{path}/config.json: {e}") from None


def load_model(path, device="cpu", dtype=torch.float32, progress=False):
    """(model, tokenizer) from a folder in the official mPLUG-Owl layout (or written by train.py).
    dtype=None keeps the files' dtype; progress shows a bar on stderr. Every file the load
    needs is checked before any weight is read."""
    cfg = load_config(path)
    tok = load_tokenizer(path, cfg.image_tokens, cfg.text_config.vocab_size)
    return load_owl(path, cfg, device, dtype, progress), tok


def load_owl(path, cfg=None, device="cpu", dtype=torch.float32, progress=False):
    """The MplugOwl of a model folder (cfg: its load_config, if already read), without a tokenizer."""
    cfg, files = load_config(path) if cfg is None else cfg, weight_files(path)
    with torch.device("meta"):
        model = MplugOwl(cfg)
    load_checked(model, drop_rope_buffers(read_weights(files, dtype=dtype, device=device, progress=progress)), path)
    return model.eval()


def load_vision(clip_dir, device="cpu", dtype=torch.float32, layer_norm_eps=None):
    """The vision tower of an HF CLIP model folder as our ViT. By default it keeps CLIP's LayerNorm eps
    (1e-5), so its outputs equal CLIP's; mPLUG-Owl itself uses 1e-6 (pass layer_norm_eps=1e-6)."""
    d = read_config(clip_dir)
    vd = d.get("vision_config", d if d.get("model_type") == "clip_vision_model" else None)
    if vd is None:
        raise WeightsError(f"{clip_dir}/config.json: no vision_config (is this an HF CLIP model folder?)")
    cfg = _parsed(clip_dir, from_dict, VisionConfig, vd, "vision_config")
    if layer_norm_eps is not None:
        cfg.layer_norm_eps = layer_norm_eps
    files = weight_files(clip_dir)
    check_fits(clip_dir, vision_pins(cfg, hf=True), files)
    with torch.device("meta"):
        vit = VisionTransformer(cfg)
    sd = read_weights(files, keep=lambda k: k.startswith("vision_model."), dtype=dtype,
                      device=device)  # the text tower is never read
    return load_checked(vit, map_hf_clip(sd, cfg), clip_dir).eval()


def load_llama(llama_dir, device="cpu", dtype=torch.float32):
    """An HF LLaMA model folder (one file or shards) as our Llama."""
    d = read_config(llama_dir)
    if d.get("model_type", "llama") != "llama":
        raise WeightsError(f"{llama_dir}/config.json: model_type {d.get('model_type')!r} is not llama")
    cfg, files = _parsed(llama_dir, from_dict, LlamaConfig, d), weight_files(llama_dir)
    check_fits(llama_dir, llama_pins(cfg), files)
    with torch.device("meta"):
        llm = Llama(cfg)
    sd = drop_rope_buffers(read_weights(files, dtype=dtype, device=device))
    return load_checked(llm, sd, llama_dir).eval()


# ----------------------------------------------------------------------------- saving

def save_model(model: MplugOwl, out_dir, tokenizer_dir=None, tokenizer_file=None, dtype=None):
    """config.json + model.safetensors (official key layout) + tokenizer.model, atomically.
    The model must have no LoRA layers (fold them in first: owl.lora.merge_lora)."""
    sd = model.state_dict()
    if any("lora_" in k for k in sd):
        raise WeightsError("the model still has LoRA layers: merge them (owl.lora.merge_lora) before saving")
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
          for k, v in sd.items()}
    tok = tokenizer_file or (_tokenizer_file(tokenizer_dir) if tokenizer_dir else None)

    def write(tmp):
        save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(model.config.to_official_dict(), f, indent=2)
        if tok:
            shutil.copy(tok, os.path.join(tmp, "tokenizer.model"))
    atomic_dir(out_dir, write)
