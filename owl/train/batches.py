"""Examples -> what the loop consumes: a held-out split, the step-indexed sampler that makes batch,
accumulation and processes see the same examples per step, the dataset (images read here, in the
DataLoader's workers) and the collate function (right padding).
"""
import torch

from ..image import ImageError, load_image, preprocess_image
from ..tokenizer import IGNORE


def step_batches(examples, *, image_size, batch_size, grad_accum, max_steps, seed, rank, world, start_step, workers,
                 worker_init_fn=None):
    """(the dataset, this rank's endless micro-batches from start_step) through a DataLoader (StepBatches)."""
    sampler = StepBatches(len(examples), batch_size=batch_size, grad_accum=grad_accum, max_steps=max_steps, seed=seed,
                          rank=rank, world=world, start_step=start_step)
    dataset = OwlDataset(examples, image_size)
    return dataset, iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                                     num_workers=workers, generator=torch.Generator(),  # (global RNG kept)
                                                     worker_init_fn=worker_init_fn if workers else None))


class StepBatches(torch.utils.data.Sampler):
    """This rank's micro-batches, step by step from start_step: optimizer step s takes the global
    positions [s*G, (s+1)*G), G = world * grad_accum * batch_size, of an endless stream that
    reshuffles each epoch (seed + epoch). Micro-batch m of rank r is positions (m*world + r)*B ...
    The data position is thus the step alone, and batch 2 == accumulation 2 == 2 processes."""

    def __init__(self, n, batch_size, grad_accum, max_steps, seed, rank=0, world=1, start_step=0):
        self.n, self.batch_size, self.grad_accum, self.max_steps, self.seed = n, batch_size, grad_accum, max_steps, seed
        self.rank, self.world, self.start = rank, world, start_step
        self.perms = {}

    def index(self, pos):
        e = pos // self.n
        if e not in self.perms:
            self.perms = {e: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + e)).tolist()}
        return self.perms[e][pos % self.n]

    def __len__(self):
        return (self.max_steps - self.start) * self.grad_accum

    def __iter__(self):
        B, A, W = self.batch_size, self.grad_accum, self.world
        for s in range(self.start, self.max_steps):
            for m in range(A):
                first = s * W * A * B + (m * W + self.rank) * B
                yield [self.index(first + j) for j in range(B)]


class OwlDataset(torch.utils.data.Dataset):
    """Examples -> dicts of tensors; images are read here (so a DataLoader's workers do it). An example
    whose image fails to load is replaced by the next one in the list (i + 1, i + 2, ... up to `tries`),
    so a micro-batch keeps its size whatever its images: the choice depends on i alone, so batch,
    accumulation, processes and --resume all see the same replacement. "bad" holds the messages of
    the examples skipped; an item without "ids" found no readable example (the caller stops)."""

    def __init__(self, examples, image_size, tries=8):
        self.examples, self.image_size, self.tries = examples, image_size, tries

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        bad = []
        for k in range(min(self.tries, len(self.examples))):
            ex = self.examples[(i + k) % len(self.examples)]
            try:
                px = [preprocess_image(load_image(p), self.image_size) for p in ex.images]
            except ImageError as e:
                bad.append(str(e))
                continue
            return {"ids": torch.tensor(ex.ids), "labels": torch.tensor(ex.labels),
                    "pixel_values": torch.stack(px) if px else None, "bad": bad}
        return {"bad": bad}


def collate(items, pad_id=0):
    """Right-padded (B, T) ids and labels, all images of the batch in order (N, 3, H, W), and the
    messages of the examples skipped for a bad image. Right padding needs no attention mask (causal)."""
    bad = [m for it in items for m in it.get("bad", ())]
    items = [it for it in items if "ids" in it]
    T = max((len(it["ids"]) for it in items), default=1)
    ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    labels = torch.full((len(items), T), IGNORE, dtype=torch.long)
    for b, it in enumerate(items):
        ids[b, :len(it["ids"])], labels[b, :len(it["labels"])] = it["ids"], it["labels"]
    px = [it["pixel_values"] for it in items if it["pixel_values"] is not None]
    return {"input_ids": ids, "labels": labels, "pixel_values": torch.cat(px) if px else None, "bad": bad}

