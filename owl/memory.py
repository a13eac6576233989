"""How much GPU memory chat and each training stage need, from the config alone (no weight is read).

  python -m owl.memory owl-7b --task chat --dtype bf16 --context 2048      # a preset, or a model folder
  python -m owl.memory MODEL_DIR --task stage1 --batch 4 --context 256 --grad-checkpointing
  python -m owl.memory owl-7b --fits                                       # every task against 16-80 GB cards
  python -m owl.memory owl-7b --task chat --quantize int4                  # weight-only int8 / int4 (owl/quant.py)

The parameter counts come from the model built on the meta device (with LoRA in stage 2); the rest is
shape arithmetic that follows what this code keeps alive (read the formulas next to the modules):

  chat    weights (all in --dtype, or the LLM's linear layers in int8 / int4: quant_weight_bytes) + the static KV cache (owl/llama.py: the whole context, 2 x layers x
          kv heads x head dim) + the largest prefill temporary (a whole-context prompt at once).
  stage1  ViT + abstractor + queries train; the LLM is frozen in --dtype but backpropagated through
  stage2  LoRA on q/v + the abstractor train (train.py's default); ViT and LLM frozen
  full    the whole LLM + abstractor + queries train, ViT frozen (train.py --stage 2 --full-finetune);
          --shards N: per process of N under FSDP2 (owl/train/fsdp.py, fsdp_terms below)

Training matches train.py: frozen weights in the compute dtype, trainable ones fp32 with fp32
gradients and AdamW's two fp32 moments (owl/train/stages.py cast_frozen), bf16 through autocast,
one image per row (labels on the text after it), and the peak of a steady-state step:
  weights + optimizer state + max(activations + the loss's temporaries, gradients + AdamW's temporaries)
(activations are freed as the backward pass makes the gradients). "activations" are the tensors
autograd saves for backward, plus autocast's bf16 copies of the fp32 trainable weights.

GB here means 2^30 bytes (what torch.cuda.max_memory_allocated / 2**30 shows). Measured against
torch.profiler's allocation log on the CPU for a 57M-shaped model (tests/test_memory.py: chat and
both stages within 15%); the CUDA side is what bench/gpu_check.sh prints next to its measurement.
Not modelled: the CUDA context (~0.5 GB, outside PyTorch's allocator), allocator fragmentation,
DDP's gradient buckets (another copy of the trainable gradients). grad_checkpointing_rule turns the
training estimate into train.py's `--grad-checkpointing auto`.
"""
import argparse
import os
import sys

import torch
import torch.nn as nn

from .config import preset, PRESETS
from .llama import cache_length
from .lora import apply_lora
from .model import MplugOwl

TASKS = ("chat", "stage1", "stage2", "full")
CARDS_GB = (16, 24, 40, 80)
CARD_SLACK_GB = 1.0  # the CUDA context and the allocator's slack, for --fits
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def trains(name, task):
    """Whether parameter `name` trains in `task` (owl/train/stages.py set_trainable, stages 1 and 2)."""
    if task == "stage1":
        return not name.startswith("language_model.")
    if task == "stage2":
        return "lora_" in name or name.startswith("abstractor.") or name == "query_tokens"
    if task == "full":
        return not name.startswith("vision_model.")
    return False


def param_counts(cfg, task, lora_r=8, lora_targets=("q_proj", "v_proj")):
    """Counts of the model built on the meta device: frozen, trainable, the trainable weights that
    autocast copies (linear and conv), the largest AdamW group and the largest trainable tensor."""
    with torch.device("meta"):
        model = MplugOwl(cfg)
        if task == "stage2":
            apply_lora(model.language_model, lora_targets, lora_r, 2 * lora_r, 0.0)
    n = {"frozen": 0, "trainable": 0, "cast": 0, "decay": 0, "largest": 0}
    cast = {id(p) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
            for p in m.parameters(recurse=False)}
    for name, p in model.named_parameters():
        if trains(name, task):
            n["trainable"] += p.numel()
            n["cast"] += p.numel() if id(p) in cast else 0
            n["decay"] += p.numel() if p.dim() >= 2 else 0  # AdamW's decay group (stages.param_groups)
            n["largest"] = max(n["largest"], p.numel())
        else:
            n["frozen"] += p.numel()
    return n


# ----------------------------------------------------------------------------- saved for backward
# Bytes per token (per image for the abstractor), read off each module's forward: what autograd keeps
# for the backward pass. D is the compute dtype's size; `amp` = autocast (D < 4): a linear then saves a
# D-byte copy of its input, and norms compute in fp32 (LayerNorm under autocast, RMSNorm by hand).

def llm_layer_saved(c, D, task, lora_targets, lora_dropout):
    """One LLaMA block (owl/llama.py). Frozen weights save no input; the block's input needs a
    gradient all the same (the visual tokens train), so the nonlinearities keep theirs."""
    C, I, Ckv, nh = c.hidden_size, c.intermediate_size, c.num_key_value_heads * c.head_dim, c.num_attention_heads
    amp = D < 4
    b = 2 * 4 * C  # two RMSNorms: their fp32 input x32 (B, T, C)
    b += D * (C + 2 * Ckv) + D * C + 4 * nh  # SDPA: q, k, v after RoPE, its output, the logsumexp
    b += 3 * D * I  # SwiGLU: gate (silu's input), silu(gate) and up (the product's inputs)
    if task == "stage2":  # LoRALinear: dropout's mask, A's input (a D copy under autocast) and B's
        b += len(lora_targets) * ((C if lora_dropout > 0 else 0) + (D if amp else 4) * C + D * 8)
    if task == "full":  # trained weights: every linear saves its input, RMSNorm its normed x
        b += 2 * 4 * C  # x32 * rsqrt, for the norm weights' gradient
        b += (3 * D * C if amp else 4 * C) + D * C + (2 * D * C if amp else 4 * C) + D * I  # qkv, o, gate/up, down
    return b


def vit_layer_saved(v, D):
    """One ViT block (owl/vision.py), trained: fp32 residual stream, LayerNorm inputs, linear inputs."""
    C, I, nh = v.hidden_size, v.intermediate_size, v.num_attention_heads
    return (2 * 4 * C  # the two LayerNorms' fp32 inputs
            + 3 * D * C  # query_key_value's and fc1's inputs (the LayerNorm outputs), dense's input
            + 3 * D * C + D * C + 4 * nh  # SDPA: q, k, v (views of the fused projection), output, lse
            + 3 * D * I)  # fc1's output, its sigmoid, QuickGELU's output (fc2's input)


def abstractor_saved_per_image(cfg, D):
    """The visual abstractor (owl/abstractor.py), trained, per image: Q queries over Q + N keys."""
    a, Q, N = cfg.visual_abstractor_config, cfg.num_query_tokens, cfg.vision_config.num_patches + 1
    C, I, amp = a.hidden_size, a.intermediate_size, D < 4
    per_layer = (4 * Q * C  # norm1's input (the fp32 query stream)
                 + D * Q * C + (2 * D if amp else 4) * (Q + N) * C  # query's input; key's and value's (kv)
                 + D * (2 * Q + 2 * (Q + N)) * C + 4 * a.num_attention_heads * Q  # SDPA q, k, v, out, lse
                 + D * Q * C + 4 * Q * C  # out_proj's input; norm2's input
                 + (2 * D if amp else 4) * Q * C  # w1's and w3's input
                 + 3 * D * Q * I + 4 * Q * I + D * Q * I)  # silu/product inputs, ffn_ln's input, w2's
    return a.num_hidden_layers * per_layer + 4 * N * C + D * Q * C  # + the image features, visual_fc's input


def training(cfg, task, D, T, B, ckpt, device, lora_targets, lora_dropout, n):
    c, v = cfg.text_config, cfg.vision_config
    amp, V = D < 4, c.vocab_size
    targets = B * max(T - 1 - cfg.image_tokens, 1)  # labels on the text after one image per row
    layer = llm_layer_saved(c, D, task, lora_targets, lora_dropout)
    resid = 4 if (task == "full" or not amp) else D  # the LLM's residual stream: fp32 when its embedding trains
    if ckpt:  # checkpoint() keeps each block's input; one block is recomputed at a time in backward
        llm = B * T * (c.num_hidden_layers * resid * c.hidden_size + layer)
    else:
        llm = B * T * c.num_hidden_layers * layer
    llm += B * T * 4 * c.hidden_size + 4 * targets * V  # the final norm's input; log_softmax's output
    if task == "full":
        llm += B * T * (D if amp else 4) * c.hidden_size  # lm_head's input
    vis = 0
    if task == "stage1":  # the ViT trains: its blocks, the embeddings' norm and the pixels
        Np = v.num_patches + 1
        per = vit_layer_saved(v, D)
        vis = B * (Np * (v.num_hidden_layers * 4 * v.hidden_size + per) if ckpt else Np * v.num_hidden_layers * per)
        vis += B * (2 * 4 * Np * v.hidden_size + D * 3 * v.image_size ** 2)
    vis += B * abstractor_saved_per_image(cfg, D)  # the abstractor trains in every task
    copies = D * n["cast"] if amp else 0  # autocast's bf16 copy of each trained linear/conv weight
    # The loss (owl/model.py lm_loss_sum): forward holds the logits, the selected rows, their fp32
    # copy and log_softmax's output at once; backward's first step holds its gradient in and out.
    loss_fwd = V * (B * T * D + targets * D + (4 * targets if amp else 0))
    loss_bwd = 8 * targets * V
    # AdamW's foreach path (CUDA) makes one fp32 temporary of a group's parameters (sqrt of exp_avg_sq);
    # the per-tensor path (CPU) one of a tensor's.
    opt_tmp = 4 * (n["decay"] if device == "cuda" else n["largest"])
    return {"activations": llm + vis + copies, "loss_temporaries": max(loss_fwd, loss_bwd),
            "adamw_temporaries": opt_tmp, "copies": copies}


def fsdp_terms(cfg, D, n, shards):
    """Per process, full fine-tuning under FSDP2 with `shards` processes (owl/train/fsdp.py): a slice of
    every weight, gradient and Adam moment, plus what is whole for a moment. Units: the root (embeddings,
    lm_head, final norm, abstractor, queries: gathered for the whole step), each LLaMA block and the ViT
    (gathered in D for their forward and backward; two blocks at once, the next one prefetched); a
    unit's unsharded gradients in D, and in fp32 for the reduce-scatter when D < 4 (the root's live
    through the backward). The gathered weights are already in D, so autocast copies none."""
    with torch.device("meta"):
        model = MplugOwl(cfg)
    size = lambda m: sum(p.numel() for p in m.parameters())
    block, vit = size(model.language_model.model.layers[0]), size(model.vision_model)
    root = size(model) - vit - block * cfg.text_config.num_hidden_layers
    grad = D + (4 if D < 4 else 0)
    return {"weights": (D * n["frozen"] + 4 * n["trainable"]) // shards + D * (root + max(vit, 2 * block)),
            "gradients": 4 * n["trainable"] // shards + grad * (root + block), "root_gradients": D * root,
            "optimizer_state": 8 * n["trainable"] // shards}


def quant_weight_bytes(cfg, quantize, D, group_size=128, lm_head=False):
    """Bytes the LLM's linear layers (lm_head only with lm_head=True) take in owl/quant.py's layouts,
    and the largest one's weight count. int8: 1 byte a weight + a scale a row in the model's dtype;
    int4: half a byte a weight + a bf16 scale and zero per group of a row. Fusing (qkv, gate/up) changes neither: the scales are per row, the groups within a row."""
    c = cfg.text_config
    kv = c.num_key_value_heads * c.head_dim
    shapes = [(c.hidden_size, c.hidden_size), (kv, c.hidden_size), (kv, c.hidden_size), (c.hidden_size, c.hidden_size),
              (c.intermediate_size, c.hidden_size), (c.intermediate_size, c.hidden_size),
              (c.hidden_size, c.intermediate_size)] * c.num_hidden_layers  # (out, in) of q, k, v, o, gate, up, down
    shapes += [(c.vocab_size, c.hidden_size)] * lm_head
    per = {"int8": lambda o, i: o * i + o * D, "int4": lambda o, i: o * i // 2 + (i // group_size) * o * 2 * 2}
    return sum(per[quantize](o, i) for o, i in shapes), sum(o * i for o, i in shapes), max(o * i for o, i in shapes)


def chat_activations(cfg, D, T, L, B):
    """The largest inference temporary, in a prefill of T tokens (torch.inference_mode keeps nothing):
    inside a block's MLP, the input embeddings (held by MplugOwl.forward), the residual stream, the
    normed input and gate/silu, up and their product alive at once; plus RoPE's cos/sin, the mask and the
    visual tokens of one image."""
    c = cfg.text_config
    mlp = B * T * D * (3 * c.hidden_size + 3 * c.intermediate_size)
    return mlp + B * T * 2 * D * c.head_dim + T * L + B * cfg.image_tokens * D * c.hidden_size


def estimate(cfg, task="chat", dtype="bf16", context=None, batch=1, grad_checkpointing=False, device="cuda",
             lora_r=8, lora_targets=("q_proj", "v_proj"), lora_dropout=0.05, shards=1, quantize=None, group_size=128):
    """{term: bytes} for one task, and "total": the peak (see the module docstring). shards > 1: the
    full task per process under FSDP2 (fsdp_terms). quantize: "int8" or "int4" (chat only). context:
    chat's window (default the model's whole context, which chat allocates unless given --context) or
    training's tokens per row (default 2048)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    context = context or (cfg.text_config.max_position_embeddings if task == "chat" else 2048)
    if context < 1 or batch < 1:
        raise ValueError(f"need a context and a batch of at least 1 (got {context} and {batch})")
    D, n = BYTES[dtype], param_counts(cfg, task, lora_r, lora_targets)
    c = cfg.text_config
    out = {"weights": 0, "kv_cache": 0, "activations": 0, "gradients": 0, "optimizer_state": 0}
    if task == "chat":
        L = cache_length(context, c.max_position_embeddings)
        out["weights"] = D * n["frozen"]
        out["kv_cache"] = 2 * c.num_hidden_layers * batch * c.num_key_value_heads * L * c.head_dim * D
        out["activations"] = chat_activations(cfg, D, context, L, batch)
        if quantize:
            q, n_lin, largest = quant_weight_bytes(cfg, quantize, D, group_size)
            out["weights"] += q - D * n_lin
            if quantize == "int8":  # eager prefill dequantizes one weight at a time: F.linear(x, W_q.to(D))
                out["activations"] += D * largest
        out["total"] = sum(out.values())
        return out
    t = training(cfg, task, D, context, batch, grad_checkpointing, device, lora_targets, lora_dropout, n)
    out["weights"] = D * n["frozen"] + 4 * n["trainable"]
    out["activations"] = t["activations"]
    out["gradients"] = 4 * n["trainable"]
    out["optimizer_state"] = 2 * 4 * n["trainable"]  # exp_avg, exp_avg_sq
    out["loss_temporaries"], out["adamw_temporaries"] = t["loss_temporaries"], t["adamw_temporaries"]
    held = 0  # what the backward holds beside the activations (FSDP: the root's unsharded gradients)
    if task == "full" and shards > 1:
        f = fsdp_terms(cfg, D, n, shards)
        out.update(weights=f["weights"], gradients=f["gradients"], optimizer_state=f["optimizer_state"],
                   activations=t["activations"] - t["copies"], adamw_temporaries=t["adamw_temporaries"] // shards)
        held = f["root_gradients"]
    out["total"] = (out["weights"] + out["optimizer_state"] + max(out["activations"] + out["loss_temporaries"] + held,
                                                                  out["gradients"] + out["adamw_temporaries"]))
    out["trainable_params"], out["frozen_params"] = n["trainable"], n["frozen"]
    return out


def grad_checkpointing_rule(cfg, task, batch, context, dtype, free_bytes, headroom=0.10, **kw):
    """train.py's --grad-checkpointing auto: (on, why in one line). Off when the estimated peak
    without checkpointing, plus `headroom` (allocator fragmentation, the estimate's few percent),
    fits `free_bytes` (torch.cuda.mem_get_info's free bytes on the training device, per process);
    on otherwise. Recomputing every block costs a third more arithmetic (issue 23: stage 1 on an H200
    ran at 15% MFU with it, 32% without), so it is worth it only where the step would not fit.
    kw: estimate's (device, lora_r, lora_targets, lora_dropout, shards)."""
    off = estimate(cfg, task, dtype, context, batch, grad_checkpointing=False, **kw)["total"]
    if off * (1 + headroom) <= free_bytes:
        return False, (f"gradient checkpointing off: the estimated peak without it, {gb(off):.1f} GB "
                       f"(+{headroom:.0%}), fits the {gb(free_bytes):.1f} GB free")
    on = estimate(cfg, task, dtype, context, batch, grad_checkpointing=True, **kw)["total"]
    worse = "" if on * (1 + headroom) <= free_bytes else "; even so it may not fit: lower the batch size"
    return True, (f"gradient checkpointing on: the estimated peak without it, {gb(off):.1f} GB (+{headroom:.0%}), "
                  f"exceeds the {gb(free_bytes):.1f} GB free (with it {gb(on):.1f} GB){worse}")


def load_cfg(name_or_dir):
    if name_or_dir in PRESETS:
        return preset(name_or_dir)
    if os.path.isfile(os.path.join(name_or_dir, "config.json")):
        from .weights import load_config
        return load_config(name_or_dir)
    raise ValueError(f"{name_or_dir}: neither a preset ({', '.join(PRESETS)}) nor a folder with config.json")


def gb(x):
    return x / 2 ** 30


def report(est, task):
    lines = [f"{k + ':':<17}{v:>16,d} bytes  {gb(v):8.2f} GB" for k, v in est.items()
             if k not in ("total", "trainable_params", "frozen_params")]
    if task != "chat":
        lines.append(f"peak = weights + optimizer_state + max(activations + loss_temporaries, gradients + "
                     f"adamw_temporaries); {est['trainable_params']:,} trainable, {est['frozen_params']:,} frozen "
                     f"parameters")
    lines.append(f"total_gb: {gb(est['total']):.2f}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", metavar="PRESET_OR_DIR", help=f"a preset ({', '.join(PRESETS)}) or a model folder")
    p.add_argument("--task", default="chat", choices=TASKS)
    p.add_argument("--dtype", default="bf16", choices=list(BYTES))
    p.add_argument("--context", type=int, help="chat: the window, as chat.py --context (default the model's whole "
                   "context, which chat allocates); training: tokens per row (default 2048)")
    p.add_argument("--batch", type=int, default=1, help="rows (training: per process, per micro-step)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="AdamW's temporaries differ (foreach)")
    p.add_argument("--fits", action="store_true", help="every task: which 16/24/40/80 GB cards hold it")
    p.add_argument("--shards", type=int, default=1, help="--task full: per process of N under FSDP2")
    p.add_argument("--quantize", choices=["int8", "int4"], help="--task chat: the LLM's linear layers (owl/quant.py)")
    a = p.parse_args(argv)
    if (a.context is not None and a.context < 1) or a.batch < 1:
        p.error("need --context >= 1 and --batch >= 1")
    if a.shards < 1 or (a.shards > 1 and a.task != "full"):
        p.error("--shards N >= 1 goes with --task full")
    try:
        cfg = load_cfg(a.model)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if a.quantize and a.task != "chat":
        p.error("--quantize goes with --task chat")
    kw = dict(dtype=a.dtype, context=a.context, batch=a.batch, grad_checkpointing=a.grad_checkpointing,
              device=a.device)
    whole = cfg.text_config.max_position_embeddings
    context = a.context or (f"{whole} (chat), 2048 (training)" if a.fits else whole if a.task == "chat" else 2048)
    print(f"{a.model}: {a.dtype}, context {context}, batch {a.batch}"
          f"{', gradient checkpointing' if a.grad_checkpointing else ''}"
          f"{f', FSDP over {a.shards} processes (per process)' if a.shards > 1 else ''}")
    if a.fits:
        print(f"{'task':<8} {'total GB':>9}  " + "  ".join(f"{g:>3} GB" for g in CARDS_GB))
        for task in TASKS:
            tot = gb(estimate(cfg, task, **kw)["total"])
            print(f"{task:<8} {tot:9.2f}  " + "  ".join(f"{'yes' if tot + CARD_SLACK_GB <= g else 'no':>6}"
                                                       for g in CARDS_GB))
        print(f"(a card holds a task when the total plus {CARD_SLACK_GB:.0f} GB for the CUDA context fits)")
        return 0
    print(f"task: {a.task}")
    print(report(estimate(cfg, a.task, shards=a.shards, quantize=a.quantize, **kw), a.task))
    return 0


if __name__ == "__main__":
    sys.exit(main())
