"""Full fine-tuning sharded with FSDP2 (train.py --full-finetune under torchrun): the released `-ft`
model trained the whole LLM, which for 7B with AdamW (16 bytes a parameter) does not fit one GPU.

torch.distributed.fsdp.fully_shard shards every parameter over the processes (dim 0, one slice each):
one unit per LLaMA block, one for the (frozen) ViT, and the root for the rest (embeddings, final norm,
lm_head, the abstractor and its queries). A unit's parameters are all-gathered just before its forward
(and again for its backward) and freed after; gradients are reduce-scattered, so each process keeps
and steps only its slice of the weights, the gradients and Adam's moments (the ZeRO-3 that LLaVA gets
from DeepSpeed). On GPUs the MixedPrecisionPolicy gathers bf16 copies for compute and reduces
gradients in fp32; the sharded weights and the optimizer stay fp32.

Every process must run the same collectives in the same order: each micro-batch and each eval batch
runs every unit, so a batch without an image gets a dummy one (with_dummy_image), and evaluation
gives every process the same number of batches. The training state is gathered (full_state) into the
layout one process writes, so a checkpoint resumes on any number of processes.
"""
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from ..model import MplugOwl
from ..tokenizer import IGNORE, IMAGE_SLOT

GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0's CPU
# Loading: rank 0 reads the files and sends each tensor's slices to the others, one tensor at a time
# (no process but rank 0 ever holds a whole optimizer state).
FROM_RANK0 = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)


def shard_model(model, *, world, device, param_dtype=None):
    """fully_shard per LLaMA block, the ViT, then the root (in place; returns the model).
    param_dtype (bf16 on GPUs): the dtype of the gathered copies that compute; None keeps fp32."""
    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for block in model.language_model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model.vision_model, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def with_dummy_image(batch, image_tokens, image_size):
    """A text-only batch with one black image appended after row 0's last position (labels IGNORE, the
    other rows padded to match), so that every process runs the ViT and the abstractor, as FSDP's
    collectives need. Causal attention keeps it out of every earlier position and no loss reads it:
    the abstractor's gradient from it is exactly zero, as one process gets for the batch."""
    if batch["pixel_values"] is not None:
        return batch
    ids, labels = batch["input_ids"], batch["labels"]
    extra = torch.zeros(ids.shape[0], image_tokens, dtype=ids.dtype)
    extra[0] = IMAGE_SLOT
    return {**batch, "input_ids": torch.cat([ids, extra], dim=1),
            "labels": torch.cat([labels, torch.full_like(extra, IGNORE)], dim=1),
            "pixel_values": torch.zeros(1, 3, image_size, image_size)}


def local(p):
    """This process's slice of a sharded parameter (the tensor itself when not sharded)."""
    return p.to_local() if hasattr(p, "to_local") else p


def full_state(model, names=None):
    """{name: whole tensor} on rank 0's CPU (other ranks get {}); every rank must call it.
    names: keep only these (the trainable ones, for the checkpoint)."""
    sd = get_model_state_dict(model, options=GATHERED)
    return {k: v for k, v in sd.items() if names is None or k in names}


def optimizer_names(model, optimizer):
    """The model names of the optimizer's parameters, in its order (optimizer.state_dict's indices)."""
    name = {id(p): n for n, p in model.named_parameters()}
    return [name[id(p)] for g in optimizer.param_groups for p in g["params"]]


def full_optimizer_state(model, optimizer):
    """The optimizer's state gathered, in optimizer.state_dict()'s layout (state and param_groups by
    parameter index): what one process saves, so the checkpoint is the same whatever the processes.
    On rank 0's CPU; other ranks get {}; every rank must call it."""
    osd = get_optimizer_state_dict(model, optimizer, options=GATHERED)
    if not osd:
        return {}
    index = {n: i for i, n in enumerate(optimizer_names(model, optimizer))}
    return {"state": {index[n]: st for n, st in osd["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]}


def load_full_state(model, optimizer, weights, optimizer_state):
    """The inverse of full_state + full_optimizer_state: rank 0 passes what it read, the others {}.
    Every rank must call it."""
    if optimizer_state:  # indices -> names, as set_optimizer_state_dict takes them
        names = optimizer_names(model, optimizer)
        optimizer_state = {"state": {names[i]: st for i, st in optimizer_state["state"].items()},
                           "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                            for g in optimizer_state["param_groups"]]}
    set_model_state_dict(model, weights, options=FROM_RANK0)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=FROM_RANK0)
    for g in optimizer.param_groups:  # the broadcast sends tuples (AdamW's betas) as lists: put them back
        g.update({k: tuple(v) for k, v in g.items() if k != "params" and isinstance(v, list)})


def gathered_model(model):
    """The whole model, unsharded, on rank 0's CPU (None on the others), for the export in the official
    layout. Built on the meta device and assigned the gathered tensors: one copy of the weights."""
    sd = get_model_state_dict(model, options=GATHERED)
    if not sd:
        return None
    with torch.device("meta"):
        plain = MplugOwl(model.config)
    plain.load_state_dict(sd, strict=True, assign=True)
    return plain.eval()
