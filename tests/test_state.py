"""The training state's files (owl/train/state.py): safetensors + JSON give back exactly what
torch.save held (tuples, integer keys, dtypes, every RNG state), with no pickle anywhere."""
import json
import os
import random

import numpy as np
import torch
from safetensors.torch import save_file

from owl.train.state import read_state, rng_state, set_rng_state, write_state


def same(a, b, where="state"):
    """Equal values of equal types, all the way down (a list is not a tuple, int64 is not float32)."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    else:
        assert a == b, (where, a, b)


def test_training_state_round_trips_exactly(tmp_path):
    p = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    opt = torch.optim.AdamW([{"params": [p[0]], "lr_scale": 0.5}, {"params": [p[1]], "weight_decay": 0.0, "lr_scale": 1.0}],
                            lr=1e-3, betas=(0.9, 0.98), eps=1e-8)
    (p[0].square().sum() + p[1].sum()).backward()
    opt.step()
    random.random(), np.random.rand(), np.random.randn(), torch.rand(1)  # every generator mid-stream
    gpu = {**rng_state(), "cuda": [torch.randint(0, 255, (16,), dtype=torch.uint8)] * 2}  # as a 2-GPU machine has it
    state = {"optimizer": opt.state_dict(),  # as save_checkpoint builds it
             "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                        "_growth_tracker": 3},
             "step": 7, "rng": [rng_state(), gpu], "args": {"lr": 1e-3, "batch_size": 2, "grad_accum": 1, "data": "a.jsonl", "max_length": None}}
    write_state(str(tmp_path), state)
    save_file({"w": torch.zeros(1)}, str(tmp_path / "trainable.safetensors"))
    assert sorted(os.listdir(tmp_path)) == ["state.json", "state.safetensors", "trainable.safetensors"]
    assert json.loads((tmp_path / "state.json").read_text())["step"] == 7  # plain JSON
    back = read_state(str(tmp_path))
    same(state, back)
    # and the restored generators continue the same streams
    set_rng_state(back["rng"][0])
    draws = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state["rng"][0])
    same(draws, (random.random(), np.random.rand(), torch.rand(3)))
    opt2 = torch.optim.AdamW([{"params": [p[0]], "lr_scale": 0.5}, {"params": [p[1]], "weight_decay": 0.0,
                                                                     "lr_scale": 1.0}], lr=1e-3)
    opt2.load_state_dict(back["optimizer"])
    same(opt.state_dict(), opt2.state_dict())
