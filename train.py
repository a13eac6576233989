"""Train mPLUG-Owl, both stages, in one plain loop (paper, "Training Scheme", "Data and Training Details").

  python train.py --stage 1 --vision-init CLIP_DIR --llm-init LLAMA_DIR --data caps.jsonl --out s1
  python train.py --stage 2 --init s1 --data llava.json,alpaca.json --out s2
  python train.py --stage 1 ... --data 'caps/{00000..00127}.tar'   # webdataset shards, streamed
  torchrun --nproc_per_node 8 train.py ...            # data parallel, NCCL on GPUs, gloo on CPUs
  torchrun --nproc_per_node 8 train.py --stage 2 --full-finetune ...   # the whole LLM, sharded (FSDP2)
  python train.py --check-data --init s1 --data ...   # validate the data, no training
  python train.py --demo OUT [--ablation] [--seed S]  # the whole method on a CPU in minutes (owl/demo/)

The loss is the sum of cross-entropy over target tokens divided by the number of target tokens in
the whole optimizer step (all micro-batches, all processes), so batch B, accumulation and N processes
give the same update. What each stage trains is owl/train/stages.py; the data formats are
owl/train/data.py, shards owl/train/shards.py; the saved model and the resumable checkpoint are
owl/train/state.py; the lock on OUT, Ctrl-C/SIGTERM (save, then stop) and the metrics rewrite are
owl/train/safety.py; full fine-tuning sharded over the processes is owl/train/fsdp.py.
"""
import argparse
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from owl.demo.run import run_demo
from owl.image import ImageError
from owl.lora import apply_lora
from owl.model import lm_loss_sum
from owl.tokenizer import IGNORE
from owl.train.batches import eval_loss, step_batches
from owl.train.data import DataError, check_data
from owl.train.fsdp import gathered_model, shard_model, with_dummy_image
from owl.train.parallel import all_sum, peak_mem_gb, precision, setup_processes
from owl.train.safety import StopSignals, Stopped, TrainError, hold_out, trim_metrics, worker_init
from owl.train.shards import ShardCaptions, check_shards, shard_files, training_data
from owl.train.stages import (build_stage1, cast_frozen, count_by_module, param_groups, set_dropout, set_trainable,
                              train_mode)
from owl.train.state import check_resumed_args, export, last_saved, read_meta, resume, save_training_state
from owl.weights import CheckpointError, load_config, load_owl, load_tokenizer, read_config


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", type=int, choices=(1, 2), help="1: pretraining, 2: instruction tuning")
    p.add_argument("--vision-init", help="stage 1: HF CLIP checkpoint dir (the ViT)")
    p.add_argument("--llm-init", help="stage 1: HF LLaMA checkpoint dir (LLaMA + tokenizer.model)")
    p.add_argument("--init", help="stage 2: an mPLUG-Owl checkpoint dir (stage-1 output or released -pt)")
    p.add_argument("--data", help="data files, comma-separated (owl/train/data.py), or .tar shards (owl/train/shards.py)")
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
    p.add_argument("--seed", type=int, help="default 42; with --demo: the world's seed, default 0")
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
    p.add_argument("--shuffle-buffer", type=int, default=1000, help="shards: samples shuffled together")
    p.add_argument("--save-dtype", choices=("float32", "bfloat16", "float16"), help="default: compute dtype")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-targets", default="q_proj,v_proj")
    p.add_argument("--freeze-abstractor", action="store_true", help="stage 2: LoRA only (the released script)")
    p.add_argument("--freeze-vision", action="store_true", help="stage 1: the abstractor only (LLaVA, MiniGPT-4)")
    p.add_argument("--full-finetune", action="store_true", help="stage 2: LLM + abstractor, no LoRA (FSDP2 if torchrun)")
    p.add_argument("--num-queries", "--num-query-tokens", type=int, default=64, help="stage 1 abstractor")
    p.add_argument("--abstractor-layers", type=int, default=6)
    p.add_argument("--abstractor-hidden", type=int, help="default and only choice: the ViT width")
    p.add_argument("--abstractor-heads", type=int, default=16)
    p.add_argument("--abstractor-mlp", "--abstractor-intermediate", type=int, default=2816)
    p.add_argument("--check-data", action="store_true", help="validate --data and exit")
    p.add_argument("--demo", metavar="OUT", help="run the tiny two-stage demo (owl/demo/) into OUT")
    p.add_argument("--ablation", action="store_true", help="with --demo: the paper's ablation rows too")
    p.add_argument("--seeds", type=int, default=1, help="with --demo: train every arm with N training seeds")
    args = p.parse_args(argv)
    args.seed = args.seed if args.seed is not None else (0 if args.demo else 42)
    sizes = (args.num_queries, args.abstractor_layers, args.abstractor_heads, args.abstractor_mlp, args.lora_r)
    need = {"--batch-size >= 1": args.batch_size >= 1, "--grad-accum >= 1": args.grad_accum >= 1,
            "--max-steps, --save-every, --eval-every >= 0": min(args.max_steps, args.save_every, args.eval_every) >= 0,
            "0 <= --seed < 2**63": 0 <= args.seed < 2**63, "--num-queries, --abstractor-*, --lora-r >= 1": min(sizes) > 0,
            "--shuffle-buffer >= 1": args.shuffle_buffer >= 1, "--seeds >= 1": args.seeds >= 1,
            "--full-finetune with --stage 2 (not 1)": not (args.full_finetune and args.stage == 1),
            "--freeze-vision with --stage 1 (not 2)": not (args.freeze_vision and args.stage == 2)}
    if not all(need.values()):  # one line, before anything is read
        raise TrainError(f"need {'; '.join(k for k, ok in need.items() if not ok)} (train.py --help lists the options)")
    args.lr = args.lr if args.lr is not None else (1e-4 if args.stage == 1 else 2e-5)
    args.min_lr = args.min_lr if args.min_lr is not None else args.lr / 10
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else round(0.04 * args.max_steps)
    return args


def get_lr(step, args):  # nanoGPT's schedule
    # 1) linear warm-up for warmup_steps steps
    if step < args.warmup_steps:
        return args.lr * (step + 1) / (args.warmup_steps + 1)
    # 2) past max_steps (only when a run is extended): the floor
    if step > args.max_steps:
        return args.min_lr
    # 3) in between, cosine decay from lr down to min_lr
    ratio = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (args.lr - args.min_lr)


# ----------------------------------------------------------------------------- data and model

def data_setup(args):
    """(tokenizer, max_length, config or None) from the configs alone (no weights read): the run's one
    tokenizer, for --check-data and training. The config is --init's (stage 2)."""
    if args.stage == 2 or (args.stage is None and args.init):
        if not args.init:
            raise TrainError("--stage 2 needs --init OWL_DIR (a stage-1 output or a released checkpoint)")
        cfg = load_config(args.init)
        tok, ctx = load_tokenizer(args.init, cfg.image_tokens), cfg.text_config.max_position_embeddings
    else:
        if not args.llm_init:
            raise TrainError("--stage 1 needs --llm-init LLAMA_DIR")
        cfg, tok = None, load_tokenizer(args.llm_init, args.num_queries + 1)
        ctx = read_config(args.llm_init).get("max_position_embeddings", 2048)
    if not args.data:
        raise TrainError("--data FILE[,FILE...] is required")
    return tok, args.max_length or ctx, cfg


def build_model(args, cfg=None):
    if args.stage == 1:
        if not (args.vision_init and args.llm_init):
            raise TrainError("--stage 1 needs --vision-init CLIP_DIR and --llm-init LLAMA_DIR")
        model = build_stage1(args.vision_init, args.llm_init, num_queries=args.num_queries, layers=args.abstractor_layers,
                             heads=args.abstractor_heads, mlp=args.abstractor_mlp, hidden=args.abstractor_hidden,
                             seed=args.seed)
    else:
        model = load_owl(args.init, cfg)
        if not args.full_finetune:
            torch.manual_seed(args.seed)  # the same LoRA init on every rank
            apply_lora(model.language_model, tuple(args.lora_targets.split(",")), args.lora_r, args.lora_alpha,
                       args.lora_dropout)
    if args.dropout is not None:
        set_dropout(model, args.dropout)
    model.vision_model.grad_checkpointing = model.language_model.grad_checkpointing = args.grad_checkpointing
    set_trainable(model, args.stage, train_abstractor=not args.freeze_abstractor, full=args.full_finetune,
                  train_vision=not args.freeze_vision)
    return model


# ----------------------------------------------------------------------------- main

def main(argv=None):
    """Parse argv, run, and return the output directory (stage 1/2, --demo) or None (--check-data)."""
    args = parse_args(argv)
    if args.demo:
        return run_demo(args.demo, main, ablation=args.ablation, seed=args.seed, seeds=args.seeds)  # through this main
    if args.check_data:
        tok, max_length, cfg = data_setup(args)
        if shards := shard_files(args.data):
            check_shards(shards, tok, max_length)
        else:
            check_data(args.data.split(","), tok, max_length, args.image_root, images_required=cfg is None)
        return None
    if args.stage is None or not args.out:
        raise TrainError("--stage 1|2 and --out DIR are required")
    ckpt_dir = os.path.join(args.out, "checkpoint")
    with hold_out(args.out, ckpt_dir, resume=args.resume, sources=(args.init, args.vision_init, args.llm_init),
                  master=int(os.environ.get("RANK", 0)) == 0) as lock:  # checks OUT, locks it, recovers a save
        try:
            return train(args, ckpt_dir, lock)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def train(args, ckpt_dir, lock=None):
    rank, world, device = setup_processes(args.device)
    master = rank == 0
    log = (lambda *x: print(*x, flush=True)) if master else (lambda *x: None)
    if args.resume:  # the arguments that would not continue the first run stop here, before any work
        check_resumed_args(read_meta(ckpt_dir)["args"], vars(args), f"{ckpt_dir}/state.json", log)
    tok, max_length, cfg = data_setup(args)  # data first: its errors come before any weight is read
    shards, train_ex, eval_ex = training_data(  # shards: streamed, nothing held out
        args.data, tok, max_length, image_root=args.image_root, max_bad_fraction=args.max_bad_fraction,
        images_required=cfg is None, eval_examples=args.eval_examples if args.eval_every else 0, seed=args.seed, log=log)

    # model: frozen parts in the compute dtype, trainable ones fp32
    model = build_model(args, cfg)
    dtype, autocast, scaler = precision(args.precision, device)
    sharded = args.full_finetune and world > 1
    if sharded and scaler:
        raise TrainError("--full-finetune across processes needs --precision bf16 or fp32 (no fp16 grad scaler)")
    cast_frozen(model, dtype)
    model.to(device)
    train_mode(model, args.stage)
    for name, (t, n) in count_by_module(model).items():
        log(f"{name:16s} trainable {t:>13,d} of {n:>13,d}")
    if sharded:  # each process keeps a slice of every weight, gradient and Adam moment (fsdp.py)
        shard_model(model, world=world, device=device, param_dtype=None if dtype == torch.float32 else dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    vision_scale = args.vision_lr / args.lr if args.vision_lr is not None else 1.0
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay, vision_scale), lr=args.lr, betas=(0.9, 0.98),
                            eps=1e-8)
    ddp = model if world == 1 or sharded else DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  find_unused_parameters=True)  # text-only: no ViT gradient
    workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)
    image_size = model.config.vision_config.image_size
    data = None if not shards else ShardCaptions(  # a stream per process and worker; its position is resumed
        shards, tokenizer_file=tok.model_file, image_tokens=tok.image_tokens, max_length=max_length, image_size=image_size,
        batch_size=args.batch_size, seed=args.seed, rank=rank, world=world, workers=workers, buffer=args.shuffle_buffer)

    torch.manual_seed(args.seed + rank)  # dropout differs per rank
    start = resume(ckpt_dir, model, opt, scaler, rank=rank, world=world, batch_size=args.batch_size,
                   grad_accum=args.grad_accum, data=data, sharded=sharded, log=log) if args.resume else 0
    if master:
        trim_metrics(os.path.join(args.out, "metrics.jsonl"), start)

    dataset, batches = (data, data.batches(worker_init_fn=worker_init(lock))) if shards else step_batches(
        train_ex, image_size=image_size, batch_size=args.batch_size, grad_accum=args.grad_accum, max_steps=args.max_steps,
        seed=args.seed, rank=rank, world=world, start_step=start, workers=workers, worker_init_fn=worker_init(lock))
    bar = tqdm(range(start, args.max_steps), initial=start, total=args.max_steps, disable=not master, dynamic_ncols=True)
    bad_seen, seen = 0, 0
    with StopSignals() as stop:  # Ctrl-C / SIGTERM: save after the step in progress, then stop
        for step in bar:
            t0 = time.time()
            lr = get_lr(step, args)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            micro = [next(batches) for _ in range(args.grad_accum)]
            for mb in micro:
                bad_seen, seen = bad_seen + len(mb["bad"]), seen + len(mb["bad"]) + len(mb["input_ids"])
                for msg in mb["bad"]:
                    log(f"skipped (bad image): {msg}")
            if bad_seen / max(seen, 1) > args.max_bad_fraction and seen >= 20:
                raise DataError(f"{bad_seen} of {seen} examples had unreadable images (> --max-bad-fraction)")
            if any(len(mb["input_ids"]) == 0 for mb in micro):
                raise DataError(f"step {step + 1}: {dataset.tries} examples in a row have unreadable images "
                                f"(skipped above; --check-data lists them all)")
            if sharded:  # FSDP: every process runs the ViT and the abstractor on every micro-batch
                micro = [with_dummy_image(mb, tok.image_tokens, image_size) for mb in micro]
            loss = train_step(ddp, opt, scaler, micro, params, world=world, device=device, autocast=autocast,
                              grad_clip=args.grad_clip, sharded=sharded)
            if not math.isfinite(loss):
                raise TrainError(f"step {step + 1}: the loss is {loss}; stopped before saving anything "
                                 f"({last_saved(ckpt_dir)})")
            done = step + 1
            tokens = sum(mb["input_ids"].numel() for mb in micro) * world
            tps = tokens / max(time.time() - t0, 1e-9)  # padded tokens, image slots included
            record = {"step": done, "loss": loss, "lr": lr, "tokens": tokens, "tok_per_s": round(tps, 1),
                      "peak_mem_gb": round(peak_mem_gb(device), 3)}
            if args.eval_every and eval_ex and (done % args.eval_every == 0 or done == args.max_steps):
                record["eval_loss"] = eval_loss(model, eval_ex, batch_size=args.batch_size, stage=args.stage,
                                                rank=rank, world=world, device=device, autocast=autocast,
                                                sharded=sharded)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}", mem=f"{record['peak_mem_gb']:.2f}G")
            if master:
                with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(record) + "\n")
            stopping = all_sum(stop.signal is not None, world, device) > 0  # every rank stops at the same step
            if stopping or (args.save_every and done % args.save_every == 0) or done in (args.max_steps, args.stop_at):
                save_training_state(ckpt_dir, model, opt, scaler, step=done, args=vars(args), world=world,
                                    master=master, data=data, sharded=sharded)  # (refuses non-finite weights)
            if stopping:
                raise Stopped(stop.signal or signal.SIGTERM, done, ckpt_dir)
            if done == args.stop_at:
                break
        bar.close()
        if args.stop_at and args.stop_at < args.max_steps:
            return args.out  # no export: --resume continues
        whole = gathered_model(model) if sharded else model  # FSDP: every rank sends, rank 0 gets it all
        if master:  # (a signal now lets the export finish)
            lora = (dict(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=args.lora_targets
                         .split(",")) if args.stage == 2 and not args.full_finetune else None)
            export(whole, args.out, tokenizer_file=tok.model_file, lora=lora, base=args.init,
                   save_dtype=getattr(torch, args.save_dtype) if args.save_dtype else dtype)
    if world > 1:
        dist.barrier()
    return args.out


def train_step(model, opt, scaler, micro, params, *, world, device, autocast, grad_clip, sharded=False):
    """One optimizer step over the micro-batches; returns the loss per target token of the step. A
    non-finite loss returns before the update, the weights untouched (the caller stops)."""
    # the loss is normalised by the target tokens of the whole step, over micro-batches and processes
    n_tgt = all_sum(sum(int((mb["labels"][:, 1:] != IGNORE).sum()) for mb in micro), world, device)
    loss_sum = 0.0
    for m, mb in enumerate(micro):
        # DDP all-reduces gradients in backward; only the last micro-step needs it (nanoGPT). FSDP
        # reduce-scatters at every one: skipping it would keep whole unsharded gradients, FSDP's saving gone.
        sync = world == 1 or sharded or m == len(micro) - 1
        with nullcontext() if sync else model.no_sync():
            with autocast:
                pixels = None if mb["pixel_values"] is None else mb["pixel_values"].to(device)
                ls, _ = lm_loss_sum(model(mb["input_ids"].to(device), pixels), mb["labels"].to(device))
            loss = ls * world / max(n_tgt, 1)  # DDP and FSDP average over the world: undo it
            (scaler.scale(loss) if scaler else loss).backward()
        loss_sum += ls.item()
    loss = all_sum(loss_sum, world, device) / max(n_tgt, 1)
    if not math.isfinite(loss):
        opt.zero_grad(set_to_none=True)
        return loss
    # A parameter no micro-batch used (the abstractor on text-only data) has no gradient; a zero one
    # makes this process step it exactly as DDP does after all-reducing zeros (weight decay, Adam's
    # moments), so one process and several stay identical.
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if scaler:
        scaler.unscale_(opt)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if scaler:
        scaler.step(opt)  # skipped by the scaler when fp16 gradients overflowed
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


if __name__ == "__main__":
    try:
        main()
    except (TrainError, DataError, CheckpointError, ImageError, OSError) as e:  # OSError: e.g. OUT turned read-only
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Stopped as e:  # SIGINT / SIGTERM, after saving a checkpoint
        print(e, file=sys.stderr)
        sys.exit(e.code)
    except KeyboardInterrupt:  # a second Ctrl-C
        print("interrupted: the last saved checkpoint is intact; --resume continues from it", file=sys.stderr)
        sys.exit(130)
