"""Train mPLUG-Owl, both stages, in one plain loop (paper, "Training Scheme", "Data and Training Details").

  python train.py --stage 1 --vision-init CLIP_DIR --llm-init LLAMA_DIR --data caps.jsonl --out s1
  python train.py --stage 2 --init s1 --data llava.json,alpaca.json --out s2
  torchrun --nproc_per_node 8 train.py ...            # data parallel, NCCL on GPUs, gloo on CPUs
  python train.py --check-data --init s1 --data ...   # validate the data, no training

The loss is the sum of cross-entropy over target tokens divided by the number of target tokens in
the whole optimizer step (all micro-batches, all processes), so batch B, accumulation and N processes
give the same update. What each stage trains is owl/train_utils.py; the data formats are owl/data.py.
"""
import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import owl
from owl import train_utils as U
from owl.abstractor import VisualAbstractor
from owl.checkpoint import CheckpointError, load_config
from owl.config import AbstractorConfig, OwlConfig
from owl.data import DataError, OwlDataset, StepBatches, check_data, collate, load_examples, split_examples
from owl.lora import apply_lora
from owl.model import IGNORE, MplugOwl, lm_loss_sum


class TrainError(ValueError):
    pass


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", type=int, choices=(1, 2), help="1: pretraining, 2: instruction tuning")
    p.add_argument("--vision-init", help="stage 1: HF CLIP checkpoint dir (the ViT)")
    p.add_argument("--llm-init", help="stage 1: HF LLaMA checkpoint dir (LLaMA + tokenizer.model)")
    p.add_argument("--init", help="stage 2: an mPLUG-Owl checkpoint dir (stage-1 output or released -pt)")
    p.add_argument("--data", help="data files, comma-separated (formats: owl/data.py)")
    p.add_argument("--out", help="output dir: final model, checkpoint/, metrics.jsonl")
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=4, help="per process, per micro-step")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, help="peak lr (default: 1e-4 stage 1, 2e-5 stage 2, the paper's)")
    p.add_argument("--min-lr", type=float, help="cosine floor (default lr/10; the paper gives none)")
    p.add_argument("--vision-lr", type=float, help="stage 1: peak lr of the ViT (default: --lr)")
    p.add_argument("--warmup-steps", type=int, help="default 4%% of max-steps (paper: 2k of 50k)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm, 0 = off")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--dropout", type=float, help="set every dropout (ViT, abstractor, LoRA); 0 = all off")
    p.add_argument("--max-length", type=int, help="tokens per example (default: the LLM's context)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps; 0 = at the end only")
    p.add_argument("--eval-every", type=int, default=200, help="0 = no eval")
    p.add_argument("--eval-examples", type=int, help="held-out examples (default 2%%, at most 200)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint exactly")
    p.add_argument("--stop-at", type=int, help="save a checkpoint at this step and exit (e.g. a job time limit)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--image-root", help="resolve relative image paths here, not beside the data file")
    p.add_argument("--max-bad-fraction", type=float, default=0.05)
    p.add_argument("--workers", type=int, help="DataLoader workers (default 0 on CPU, 4 on CUDA)")
    p.add_argument("--save-dtype", choices=("float32", "bfloat16", "float16"), help="default: compute dtype")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-targets", default="q_proj,v_proj")
    p.add_argument("--freeze-abstractor", action="store_true", help="stage 2: LoRA only (the released script)")
    p.add_argument("--num-queries", "--num-query-tokens", type=int, default=64, help="stage 1 abstractor")
    p.add_argument("--abstractor-layers", type=int, default=6)
    p.add_argument("--abstractor-hidden", type=int, help="default and only choice: the ViT width")
    p.add_argument("--abstractor-heads", type=int, default=16)
    p.add_argument("--abstractor-mlp", "--abstractor-intermediate", type=int, default=2816)
    p.add_argument("--check-data", action="store_true", help="validate --data and exit")
    p.add_argument("--demo", metavar="OUT", help="run the tiny two-stage demo (owl/demo.py) into OUT")
    p.add_argument("--ablation", action="store_true", help="with --demo: the paper's ablation rows too")
    a = p.parse_args(argv)
    a.lr = a.lr if a.lr is not None else (1e-4 if a.stage == 1 else 2e-5)
    a.min_lr = a.min_lr if a.min_lr is not None else a.lr / 10
    a.warmup_steps = a.warmup_steps if a.warmup_steps is not None else round(0.04 * a.max_steps)
    return a


def get_lr(step, a):  # nanoGPT's schedule
    # 1) linear warm-up for warmup_steps steps
    if step < a.warmup_steps:
        return a.lr * (step + 1) / (a.warmup_steps + 1)
    # 2) past max_steps (only when a run is extended): the floor
    if step > a.max_steps:
        return a.min_lr
    # 3) in between, cosine decay from lr down to min_lr
    ratio = (step - a.warmup_steps) / max(1, a.max_steps - a.warmup_steps)
    return a.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (a.lr - a.min_lr)


# ----------------------------------------------------------------------------- model

def build_stage1(a):
    """ViT from HF CLIP, LLaMA from HF LLaMA, a fresh abstractor and query tokens."""
    if not (a.vision_init and a.llm_init):
        raise TrainError("--stage 1 needs --vision-init CLIP_DIR and --llm-init LLAMA_DIR")
    # The official model runs its ViT with LayerNorm eps 1e-6 although CLIP was trained with 1e-5; it
    # was initialised from CLIP and trained with 1e-6, so we do the same (the outputs at init differ
    # by ~1e-6 relative; the saved config then matches the released one).
    vit = owl.load_vision(a.vision_init, layer_norm_eps=1e-6)
    llm = owl.load_llama(a.llm_init)
    width = vit.config.hidden_size  # keys/values concatenate the queries with the ViT tokens: same width
    if a.abstractor_hidden not in (None, width):
        raise TrainError(f"--abstractor-hidden {a.abstractor_hidden} must equal the ViT width {width}")
    a.abstractor_hidden = width
    if width % a.abstractor_heads:
        raise TrainError(f"--abstractor-heads {a.abstractor_heads} does not divide the width {width}")
    acfg = AbstractorConfig(hidden_size=a.abstractor_hidden, intermediate_size=a.abstractor_mlp,
                            num_hidden_layers=a.abstractor_layers, num_attention_heads=a.abstractor_heads,
                            encoder_hidden_size=vit.config.hidden_size)
    cfg = OwlConfig(vit.config, acfg, llm.config, num_query_tokens=a.num_queries)
    with torch.device("meta"):
        model = MplugOwl(cfg)
    model.vision_model, model.language_model = vit, llm
    torch.manual_seed(a.seed)  # the same fresh abstractor on every rank
    model.abstractor = VisualAbstractor(acfg, llm.config.hidden_size)
    model.abstractor.init_weights()
    model.query_tokens = nn.Parameter(torch.empty(1, a.num_queries, a.abstractor_hidden).normal_(std=0.02))
    return model, owl.load_tokenizer(a.llm_init, cfg.image_tokens).model_file


def build_model(a):
    if a.stage == 1:
        model, tok_file = build_stage1(a)
    else:
        if not a.init:
            raise TrainError("--stage 2 needs --init OWL_DIR (a stage-1 output or a released checkpoint)")
        model, tok = owl.load_model(a.init)
        tok_file = tok.model_file
        torch.manual_seed(a.seed)  # the same LoRA init on every rank
        apply_lora(model.language_model, tuple(a.lora_targets.split(",")), a.lora_r, a.lora_alpha, a.lora_dropout)
    if a.dropout is not None:
        U.set_dropout(model, a.dropout)
    model.vision_model.grad_checkpointing = model.language_model.grad_checkpointing = a.grad_checkpointing
    U.set_trainable(model, a.stage, train_abstractor=not a.freeze_abstractor)
    return model, owl.Tokenizer(tok_file, model.config.image_tokens)


class StepModel(nn.Module):
    """One forward for DDP: (sum of target-token CE, count). Frozen boxes run under no_grad."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, pixel_values, labels):
        m, embeds = self.model, None
        if pixel_values is not None:
            vit_frozen = not any(p.requires_grad for p in m.vision_model.parameters())
            fk_frozen = not m.query_tokens.requires_grad and not any(p.requires_grad for p in m.abstractor.parameters())
            with torch.no_grad() if vit_frozen else nullcontext():
                feats = m.vision_model(pixel_values)  # (N, 257, 1024)
            with torch.no_grad() if vit_frozen and fk_frozen else nullcontext():
                embeds = m.abstractor(m.query_tokens.expand(feats.shape[0], -1, -1), feats)  # (N, 65, 4096)
        return lm_loss_sum(m(input_ids, image_embeds=embeds), labels)


# ----------------------------------------------------------------------------- data

def data_setup(a):
    """(tokenizer, max_length) from the configs alone (no weights read): for --check-data and training."""
    if a.stage == 2 or (a.stage is None and a.init):
        if not a.init:
            raise TrainError("--stage 2 needs --init OWL_DIR")
        cfg = load_config(a.init)
        tok, ctx = owl.load_tokenizer(a.init, cfg.image_tokens), cfg.text_config.max_position_embeddings
    else:
        if not a.llm_init:
            raise TrainError("--stage 1 needs --llm-init LLAMA_DIR")
        tok = owl.load_tokenizer(a.llm_init, a.num_queries + 1)
        ctx = owl.checkpoint.read_config(a.llm_init).get("max_position_embeddings", 2048)
    if not a.data:
        raise TrainError("--data FILE[,FILE...] is required")
    return tok, a.max_length or ctx


# ----------------------------------------------------------------------------- main

def main(argv=None):
    """Parse argv, run, and return the output directory (stage 1/2) or None (--check-data)."""
    a = parse_args(argv)
    if a.demo:
        from owl.demo import run_demo
        return run_demo(a.demo, ablation=a.ablation)
    if a.check_data:
        tok, max_length = data_setup(a)
        check_data(a.data.split(","), tok, max_length, a.image_root)
        return None
    if a.stage is None or not a.out:
        raise TrainError("--stage 1|2 and --out DIR are required")
    ckpt_dir = os.path.join(a.out, "checkpoint")
    if os.path.isdir(ckpt_dir) and not a.resume:
        raise TrainError(f"{ckpt_dir} exists: pass --resume to continue it, or choose another --out")
    if a.resume and not os.path.isdir(ckpt_dir):
        raise TrainError(f"--resume: {ckpt_dir} does not exist")
    try:
        return train(a, ckpt_dir)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(a, ckpt_dir):
    rank, world, device = U.setup(a)
    master = rank == 0
    log = (lambda *x: print(*x, flush=True)) if master else (lambda *x: None)

    # data: every example tokenised up front; bad ones skipped and counted
    tok, max_length = data_setup(a)
    examples, st = load_examples(a.data.split(","), tok, max_length, a.image_root)
    log(st.report())
    n_all = sum(st.formats.values())
    if n_all and st.bad_examples / n_all > a.max_bad_fraction:
        raise DataError(f"{st.bad_examples} of {n_all} examples have missing images, more than --max-bad-fraction "
                        f"{a.max_bad_fraction} (first: {', '.join(st.missing[:3])})")
    train_ex, eval_ex = split_examples(examples, a)
    if not train_ex:
        raise DataError(f"no usable training example in {a.data}")

    # model: frozen parts in the compute dtype, trainable ones fp32
    model, tok = build_model(a)
    dtype, autocast, scaler = U.precision(a, device)
    U.cast_frozen(model, dtype)
    model.to(device).train()
    if a.stage == 2:
        model.vision_model.eval()  # frozen: no dropout
    for name, (t, n) in U.count_by_module(model).items():
        log(f"{name:16s} trainable {t:>13,d} of {n:>13,d}")
    params = [p for p in model.parameters() if p.requires_grad]
    vision_scale = a.vision_lr / a.lr if a.vision_lr is not None else 1.0
    opt = torch.optim.AdamW(U.param_groups(model, a.weight_decay, vision_scale), lr=a.lr, betas=(0.9, 0.98), eps=1e-8)
    step_model = StepModel(model)
    if world > 1:  # find_unused: a text-only micro-batch leaves the ViT/abstractor without gradient
        step_model = DDP(step_model, device_ids=[device.index] if device.type == "cuda" else None,
                         find_unused_parameters=True)

    start = 0
    torch.manual_seed(a.seed + rank)  # dropout differs per rank
    if a.resume:
        state = U.load_checkpoint(ckpt_dir, model)
        opt.load_state_dict(state["optimizer"])
        if scaler and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        start = state["step"]
        was = (len(state["rng"]), state["args"]["batch_size"], state["args"]["grad_accum"])
        if was == (world, a.batch_size, a.grad_accum):
            U.set_rng_state(state["rng"][rank])
        else:  # it continues, but not exactly as the first run would have
            log(f"warning: (processes, batch, accumulation) were {was}, now {(world, a.batch_size, a.grad_accum)}: "
                f"the data order and RNG streams differ from an uninterrupted run")
        log(f"resumed from {ckpt_dir} at step {start}")
    if master:
        os.makedirs(a.out, exist_ok=True)
        U.trim_metrics(os.path.join(a.out, "metrics.jsonl"), start)

    dataset = OwlDataset(train_ex, model.config.vision_config.image_size)
    workers = a.workers if a.workers is not None else (4 if device.type == "cuda" else 0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=StepBatches(len(dataset), a, rank, world, start),
                                         collate_fn=collate, num_workers=workers,
                                         generator=torch.Generator())  # leaves the global RNG alone
    batches = iter(loader)
    bar = tqdm(range(start, a.max_steps), initial=start, total=a.max_steps, disable=not master, dynamic_ncols=True)
    bad_seen, seen = 0, 0
    for step in bar:
        t0 = time.time()
        lr = get_lr(step, a)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        micro = [next(batches) for _ in range(a.grad_accum)]
        for mb in micro:
            bad_seen, seen = bad_seen + len(mb["bad"]), seen + len(mb["bad"]) + len(mb["input_ids"])
            for msg in mb["bad"]:
                log(f"skipped (bad image): {msg}")
        if bad_seen / max(seen, 1) > a.max_bad_fraction and seen >= 20:
            raise DataError(f"{bad_seen} of {seen} examples had unreadable images (> --max-bad-fraction)")
        # the loss is normalised by the target tokens of the whole step, over micro-batches and processes
        n_tgt = U.all_sum(sum(int((mb["labels"][:, 1:] != IGNORE).sum()) for mb in micro), world, device)
        loss_sum = 0.0
        for m, mb in enumerate(micro):
            # DDP all-reduces gradients in backward; only the last micro-step needs it (nanoGPT)
            sync = world == 1 or m == len(micro) - 1
            with nullcontext() if sync else step_model.no_sync():
                with autocast:
                    ls, _ = step_model(mb["input_ids"].to(device), None if mb["pixel_values"] is None
                                       else mb["pixel_values"].to(device), mb["labels"].to(device))
                loss = ls * world / max(n_tgt, 1)  # DDP averages over the world: undo it
                (scaler.scale(loss) if scaler else loss).backward()
            loss_sum += ls.item()
        loss = U.all_sum(loss_sum, world, device) / max(n_tgt, 1)
        if not math.isfinite(loss):
            raise TrainError(f"step {step + 1}: the loss is {loss}; stopped (the last saved checkpoint, "
                             f"if any, is intact in {ckpt_dir})")
        for p in params:  # parameters no micro-batch used (e.g. the abstractor on text-only data)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if scaler:
            scaler.unscale_(opt)
        if a.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, a.grad_clip)
        if scaler:
            scaler.step(opt)  # skipped by the scaler when fp16 gradients overflowed
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)

        done = step + 1
        tokens = sum(mb["input_ids"].numel() for mb in micro) * world
        tps = tokens / max(time.time() - t0, 1e-9)  # padded tokens, image slots included
        record = {"step": done, "loss": loss, "lr": lr, "tokens": tokens, "tok_per_s": round(tps, 1),
                  "peak_mem_gb": round(U.peak_mem_gb(device), 3)}
        if a.eval_every and eval_ex and (done % a.eval_every == 0 or done == a.max_steps):
            record["eval_loss"] = evaluate(model, eval_ex, a, rank, world, device, autocast)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}", mem=f"{record['peak_mem_gb']:.2f}G")
        if master:
            with open(os.path.join(a.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
        if (a.save_every and done % a.save_every == 0) or done in (a.max_steps, a.stop_at):
            U.save_training_state(ckpt_dir, model, opt, scaler, done, a, world, master)
        if done == a.stop_at:
            break
    bar.close()
    if a.stop_at and a.stop_at < a.max_steps:
        return a.out  # no export: --resume continues
    if master:
        U.export(model, tok, a, dtype)
    if world > 1:
        dist.barrier()
    return a.out


def evaluate(model, examples, a, rank, world, device, autocast):
    """Mean target-token loss over the held-out examples (sharded over the ranks)."""
    ds, total, count = OwlDataset(examples, model.config.vision_config.image_size), 0.0, 0
    mine = list(range(rank, len(ds), world))
    model.eval()
    with torch.no_grad(), autocast:
        for i in range(0, len(mine), a.batch_size):
            b = collate([ds[j] for j in mine[i:i + a.batch_size]])
            px = None if b["pixel_values"] is None else b["pixel_values"].to(device)
            ls, n = lm_loss_sum(model(b["input_ids"].to(device), px), b["labels"].to(device))
            total, count = total + ls.item(), count + n
    model.train()
    if a.stage == 2:
        model.vision_model.eval()
    return U.all_sum(total, world, device) / max(U.all_sum(count, world, device), 1)


if __name__ == "__main__":
    try:
        main()
    except (TrainError, DataError, CheckpointError, owl.ImageError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
