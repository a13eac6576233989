"""Train mPLUG-Owl, both stages, in one plain loop (paper, "Training Scheme", "Data and Training Details").

  python train.py --stage 1 --vision-init CLIP_DIR --llm-init LLAMA_DIR --data caps.jsonl --out s1
  python train.py --stage 2 --init s1 --data llava.json,alpaca.json --out s2
  python train.py --stage 1 ... --data 'caps/{00000..00127}.tar'   # webdataset shards, streamed
  torchrun --nproc_per_node 8 train.py ...            # data parallel, NCCL on GPUs, gloo on CPUs
  torchrun --nproc_per_node 8 train.py --stage 2 --full-finetune ...   # the whole LLM, sharded (FSDP2)
  python train.py --check-data --init s1 --data ...   # validate the data, no training
  python train.py --help                              # every option (owl/train/config.py: TrainConfig)

The loss is the sum of cross-entropy over target tokens divided by the number of target tokens in
the whole optimizer step (all micro-batches, all processes), so batch B, accumulation and N processes
give the same update. The options are owl/train/config.py; what each stage trains is
owl/train/stages.py; the data formats are owl/train/data.py, shards owl/train/shards.py, batches
owl/train/batches.py; the saved model and the resumable checkpoint are owl/train/state.py; the lock
on OUT, Ctrl-C/SIGTERM (save, then stop) and the metrics rewrite are owl/train/safety.py; processes
are owl/train/parallel.py, full fine-tuning sharded over them owl/train/fsdp.py.
"""
import json
import math
import multiprocessing
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from owl.image import ImageError
from owl.lora import apply_lora
from owl.memory import grad_checkpointing_rule
from owl.model import compile_blocks, lm_loss_sum, target_count
from owl.train.batches import OwlDataset, collate, step_batches
from owl.train.config import TrainError, check_resumed, parse
from owl.train.data import DataError, check_data, training_data
from owl.train.fsdp import gathered_model, shard_model, with_dummy_image
from owl.train.parallel import all_sum, peak_mem_gb, precision, setup_processes
from owl.train.safety import StopSignals, Stopped, hold_out, trim_metrics, worker_init
from owl.train.shards import ShardCaptions, check_shards, shard_files
from owl.train.stages import (build_stage1, cast_frozen, count_by_module, param_groups, set_dropout, set_trainable,
                              train_mode)
from owl.train.state import CheckpointError, export, last_saved, read_meta, resume, save_training_state
from owl.weights import WeightsError, load_config, load_owl, load_tokenizer, read_config


def get_lr(step, cfg):  # nanoGPT's schedule (cfg: a TrainConfig)
    # 1) linear warm-up for warmup_steps steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    # 2) past max_steps (only when a run is extended): the floor
    if step > cfg.max_steps:
        return cfg.min_lr
    # 3) in between, cosine decay from lr down to min_lr
    ratio = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


# ----------------------------------------------------------------------------- data and model

def data_setup(cfg):
    """(tokenizer, max_length, the model's config or None) from the configs alone (no weights read): the
    run's one tokenizer, for --check-data and training. The model's config is --init's (stage 2)."""
    if cfg.stage == 2 or (cfg.stage is None and cfg.init):
        if not cfg.init:
            raise TrainError("--stage 2 needs --init OWL_DIR (a stage-1 output or a released model folder)")
        model_cfg = load_config(cfg.init)
        tok = load_tokenizer(cfg.init, model_cfg.image_tokens, model_cfg.text_config.vocab_size)
        ctx = model_cfg.text_config.max_position_embeddings
    else:
        if not cfg.llm_init:
            raise TrainError("--stage 1 needs --llm-init LLAMA_DIR")
        model_cfg, tok = None, load_tokenizer(cfg.llm_init, cfg.num_queries + 1, read_config(cfg.llm_init).get("vocab_size"))
        ctx = read_config(cfg.llm_init).get("max_position_embeddings", 2048)
    if not cfg.data:
        raise TrainError("--data FILE[,FILE...] is required")
    return tok, cfg.max_length or ctx, model_cfg


def grad_checkpointing(cfg, model, device, dtype, max_length, shards):
    """(on, why): --grad-checkpointing on/off as asked; auto asks owl.memory whether the step fits the
    device's free memory without it (its estimate is within a few percent of the measured peak)."""
    if cfg.grad_checkpointing != "auto":
        return cfg.grad_checkpointing == "on", f"gradient checkpointing {cfg.grad_checkpointing} (--grad-checkpointing)"
    if device.type != "cuda":
        return False, "gradient checkpointing off (auto, on the CPU)"
    return grad_checkpointing_rule(
        model.config, "full" if cfg.full_finetune else f"stage{cfg.stage}", cfg.batch_size, max_length,
        {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype], torch.cuda.mem_get_info(device)[0],
        lora_r=cfg.lora_r, lora_targets=tuple(cfg.lora_targets.split(",")), lora_dropout=cfg.lora_dropout, shards=shards)


def build_model(cfg, model_cfg=None):
    """The model of the run, what it trains marked (stages.set_trainable). model_cfg: --init's, if read."""
    if cfg.stage == 1:
        if not (cfg.vision_init and cfg.llm_init):
            raise TrainError("--stage 1 needs --vision-init CLIP_DIR and --llm-init LLAMA_DIR")
        model = build_stage1(cfg.vision_init, cfg.llm_init, num_queries=cfg.num_queries, layers=cfg.abstractor_layers,
                             heads=cfg.abstractor_heads, mlp=cfg.abstractor_mlp, hidden=cfg.abstractor_hidden,
                             seed=cfg.seed)
    else:
        model = load_owl(cfg.init, model_cfg)
        if not cfg.full_finetune:
            torch.manual_seed(cfg.seed)  # the same LoRA init on every rank
            apply_lora(model.language_model, tuple(cfg.lora_targets.split(",")), cfg.lora_r, cfg.lora_alpha,
                       cfg.lora_dropout)
    if cfg.dropout is not None:
        set_dropout(model, cfg.dropout)
    set_trainable(model, cfg.stage, train_abstractor=not cfg.freeze_abstractor, full=cfg.full_finetune,
                  train_vision=not cfg.freeze_vision)
    return model


# ----------------------------------------------------------------------------- main

def main(argv=None):
    """Parse argv into a TrainConfig, run, and return the output folder (None with --check-data)."""
    cfg = parse(argv)
    if cfg.check_data:
        tok, max_length, model_cfg = data_setup(cfg)
        if shards := shard_files(cfg.data):
            check_shards(shards, tok, max_length)
        else:
            check_data(cfg.data.split(","), tok, max_length, cfg.image_root, images_required=model_cfg is None)
        return None
    if cfg.stage is None or not cfg.out:
        raise TrainError("--stage 1|2 and --out DIR are required")
    ckpt_dir = os.path.join(cfg.out, "checkpoint")
    with hold_out(cfg.out, ckpt_dir, resume=cfg.resume, sources=(cfg.init, cfg.vision_init, cfg.llm_init),
                  master=int(os.environ.get("RANK", 0)) == 0) as lock:  # checks OUT, locks it, recovers a save
        try:
            return train(cfg, ckpt_dir, lock)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def train(cfg, ckpt_dir, lock=None):
    """The run cfg (a TrainConfig) describes, from its start or (cfg.resume) from ckpt_dir."""
    rank, world, device = setup_processes(cfg.device)
    master = rank == 0
    log = (lambda *x: print(*x, flush=True)) if master else (lambda *x: None)
    if cfg.resume:  # the options that would not continue the first run stop here, before any work
        check_resumed(read_meta(ckpt_dir)["args"], cfg, f"{ckpt_dir}/state.json", log)
    tok, max_length, model_cfg = data_setup(cfg)  # data first: its errors come before any weight is read
    shards, train_ex, eval_ex = shard_files(cfg.data), None, []  # shards: streamed, nothing held out
    if shards:
        log(f"data: {len(shards)} shards, read as a stream")
    else:
        train_ex, eval_ex = training_data(
            cfg.data.split(","), tok, max_length, image_root=cfg.image_root, max_bad_fraction=cfg.max_bad_fraction,
            images_required=model_cfg is None, eval_examples=cfg.eval_examples if cfg.eval_every else 0,
            seed=cfg.seed, log=log)

    # model: frozen parts in the compute dtype, trainable ones fp32
    model = build_model(cfg, model_cfg)
    dtype, autocast, scaler = precision(cfg.precision, device)
    sharded = cfg.full_finetune and world > 1
    if sharded and scaler:
        raise TrainError("--full-finetune across processes needs --precision bf16 or fp32 (no fp16 grad scaler)")
    if sharded and cfg.compile:
        raise TrainError("--compile with --full-finetune across processes (FSDP) is not supported yet")
    cast_frozen(model, dtype)
    model.to(device)
    train_mode(model, cfg.stage)
    for name, (t, n) in count_by_module(model).items():
        log(f"{name:16s} trainable {t:>13,d} of {n:>13,d}")
    on, why = grad_checkpointing(cfg, model, device, dtype, max_length, world if sharded else 1)
    model.vision_model.grad_checkpointing = model.language_model.grad_checkpointing = on
    log(why)
    if cfg.compile:  # regional: each block, so a tower compiles once (owl.model.compile_blocks)
        compile_blocks(model)
    if sharded:  # each process keeps a slice of every weight, gradient and Adam moment (fsdp.py)
        shard_model(model, world=world, device=device, param_dtype=None if dtype == torch.float32 else dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    vision_scale = cfg.vision_lr / cfg.lr if cfg.vision_lr is not None else 1.0
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay, vision_scale), lr=cfg.lr, betas=(0.9, 0.98),
                            eps=1e-8, fused=device.type == "cuda" and not sharded)  # fused: one kernel per step
    # what the step calls: across processes DDP's wrapper (it all-reduces the gradients), else the model
    step_model = model if world == 1 or sharded else DDP(model, device_ids=[device.index] if device.type == "cuda"
                                                         else None, find_unused_parameters=True)  # text-only: no ViT
    workers = cfg.workers if cfg.workers is not None else (4 if device.type == "cuda" else 0)
    image_size = model.config.vision_config.image_size
    data = None if not shards else ShardCaptions(  # a stream per process and worker; its position is resumed
        shards, tokenizer_file=tok.model_file, image_tokens=tok.image_tokens, max_length=max_length, image_size=image_size,
        batch_size=cfg.batch_size, seed=cfg.seed, rank=rank, world=world, workers=workers, buffer=cfg.shuffle_buffer)

    torch.manual_seed(cfg.seed + rank)  # dropout differs per rank
    start = resume(ckpt_dir, model, opt, scaler, rank=rank, world=world, batch_size=cfg.batch_size,
                   grad_accum=cfg.grad_accum, data=data, sharded=sharded, log=log) if cfg.resume else 0
    if master:
        trim_metrics(os.path.join(cfg.out, "metrics.jsonl"), start)
    if start > cfg.max_steps:  # (a longer run, or a hand-edited step: redteam-2 4.7) nothing to train
        log(f"note: the checkpoint is at step {start}, past --max-steps {cfg.max_steps}: exporting it as is")

    dataset, batches = (data, data.batches(worker_init_fn=worker_init(lock))) if shards else step_batches(
        train_ex, image_size=image_size, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, max_steps=cfg.max_steps,
        seed=cfg.seed, rank=rank, world=world, start_step=start, workers=workers, worker_init_fn=worker_init(lock))
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, disable=not master, dynamic_ncols=True)
    bad_seen, seen = 0, 0
    with StopSignals() as stop:  # Ctrl-C / SIGTERM: save after the step in progress, then stop
        for step in bar:
            t0 = time.time()
            lr = get_lr(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            micro = [next(batches) for _ in range(cfg.grad_accum)]
            for mb in micro:
                bad_seen, seen = bad_seen + len(mb["bad"]), seen + len(mb["bad"]) + len(mb["input_ids"])
                for msg in mb["bad"]:
                    log(f"skipped (bad image): {msg}")
            if bad_seen / max(seen, 1) > cfg.max_bad_fraction and seen >= 20:
                raise DataError(f"{bad_seen} of {seen} examples had unreadable images (> --max-bad-fraction)")
            if any(len(mb["input_ids"]) == 0 for mb in micro):
                raise DataError(f"step {step + 1}: {dataset.tries} examples in a row have unreadable images "
                                f"(skipped above; --check-data lists them all)")
            if sharded:  # FSDP: every process runs the ViT and the abstractor on every micro-batch
                micro = [with_dummy_image(mb, tok.image_tokens, image_size) for mb in micro]
            loss = train_step(step_model, opt, scaler, micro, params, world=world, device=device, autocast=autocast,
                              grad_clip=cfg.grad_clip, sharded=sharded)
            if not math.isfinite(loss):
                raise TrainError(f"step {step + 1}: the loss is {loss}; stopped before saving anything "
                                 f"({last_saved(ckpt_dir)})")
            done = step + 1
            tokens = sum(mb["input_ids"].numel() for mb in micro) * world
            tps = tokens / max(time.time() - t0, 1e-9)  # padded tokens, image slots included
            record = {"step": done, "loss": loss, "lr": lr, "tokens": tokens, "tok_per_s": round(tps, 1),
                      "peak_mem_gb": round(peak_mem_gb(device), 3)}
            if cfg.eval_every and eval_ex and (done % cfg.eval_every == 0 or done == cfg.max_steps):
                record["eval_loss"] = eval_loss(model, eval_ex, batch_size=cfg.batch_size, stage=cfg.stage,
                                                rank=rank, world=world, device=device, autocast=autocast,
                                                sharded=sharded)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}", mem=f"{record['peak_mem_gb']:.2f}G")
            if master:
                with open(os.path.join(cfg.out, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(record) + "\n")
            stopping = all_sum(stop.signal is not None, world, device) > 0  # every rank stops at the same step
            if stopping or (cfg.save_every and done % cfg.save_every == 0) or done in (cfg.max_steps, cfg.stop_at):
                save_training_state(ckpt_dir, model, opt, scaler, step=done, args=asdict(cfg), world=world,
                                    master=master, data=data, sharded=sharded)  # (refuses non-finite weights)
            if stopping:
                raise Stopped(stop.signal or signal.SIGTERM, done, ckpt_dir)
            if done == cfg.stop_at:
                break
        bar.close()
        if cfg.stop_at and cfg.stop_at < cfg.max_steps:
            return cfg.out  # no export: --resume continues
        whole = gathered_model(model) if sharded else model  # FSDP: every rank sends, rank 0 gets it all
        if master:  # (a signal now lets the export finish)
            lora = None if cfg.stage == 1 or cfg.full_finetune else dict(
                r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets.split(","))
            export(whole, cfg.out, tokenizer_file=tok.model_file, lora=lora, base=cfg.init,
                   save_dtype=getattr(torch, cfg.save_dtype) if cfg.save_dtype else dtype)
    if world > 1:
        dist.barrier()
    return cfg.out


def train_step(model, opt, scaler, micro, params, *, world, device, autocast, grad_clip, sharded=False):
    """One optimizer step over the micro-batches; returns the loss per target token of the step. A
    non-finite loss returns before the update, the weights untouched (the caller stops)."""
    # the loss is normalised by the target tokens of the whole step, over micro-batches and processes
    n_tgt = all_sum(sum(target_count(mb["labels"]) for mb in micro), world, device)
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


def eval_loss(model, examples, *, batch_size, stage, rank, world, device, autocast, sharded=False):
    """Mean target-token loss over the held-out examples (sharded over the ranks). sharded (FSDP): every
    rank runs as many batches as the busiest, each with an image (fsdp.py); the spare ones count nothing."""
    ds, total, count = OwlDataset(examples, model.config.vision_config.image_size), 0.0, 0
    mine = list(range(rank, len(ds), world))
    most = -(-len(ds) // world) if sharded else len(mine)  # sharded: the busiest rank's count, on every rank
    model.eval()
    with torch.no_grad(), autocast:
        for i in range(0, -(-most // batch_size) * batch_size, batch_size):
            mine_now = mine[i:i + batch_size]
            b = collate([ds[j] for j in mine_now or [0]])  # (a spare round, sharded: example 0, not counted)
            if sharded:  # FSDP: this forward must run, with an image
                if not len(b["input_ids"]):
                    raise DataError(f"held-out example {(mine_now or [0])[0]} and the next: no readable image")
                b = with_dummy_image(b, model.config.image_tokens, model.config.vision_config.image_size)
            if len(b["input_ids"]):  # (a batch whose every image is unreadable adds nothing)
                px = None if b["pixel_values"] is None else b["pixel_values"].to(device)
                ls, n = lm_loss_sum(model(b["input_ids"].to(device), px), b["labels"].to(device))
                if mine_now:
                    total, count = total + ls.item(), count + n
    train_mode(model, stage)
    return all_sum(total, world, device) / max(all_sum(count, world, device), 1)


def one_line(e):
    """An error a DataLoader worker raised reaches us as "Caught DataError in DataLoader worker process 0.
    Original Traceback ...": its own message is the last line."""
    text = str(e).strip()
    return text.splitlines()[-1].split(": ", 1)[-1] if text.startswith("Caught ") else text


if __name__ == "__main__":
    try:
        main()
    except (TrainError, DataError, CheckpointError, WeightsError, ImageError, OSError) as e:  # OSError: e.g. OUT turned read-only
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(1)
    except Stopped as e:  # SIGINT / SIGTERM, after saving a checkpoint
        print(e, file=sys.stderr)
        sys.exit(e.code)
    except KeyboardInterrupt:  # a second Ctrl-C
        print("interrupted: the last saved checkpoint is intact; --resume continues from it", file=sys.stderr)
        sys.exit(130)
    finally:  # workers ignore SIGTERM (safety.worker_init): one still alive after an error would keep the
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # interpreter's exit waiting forever (redteam-2 2.7);
        for p in multiprocessing.active_children():  # (the DataLoader's SIGCHLD handler would call this a crash)
            p.kill()
            p.join()
