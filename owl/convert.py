"""Convert a released mPLUG-Owl checkpoint (PyTorch .bin shards) to safetensors.

    python -m owl.convert SRC_DIR DST_DIR

The release (MAGAer13/mplug-owl-llama-7b, -pt, -ft) ships `pytorch_model*.bin` pickles. They are read
with torch.load(weights_only=True, mmap=True): tensors only, never arbitrary code, and one shard at
a time without reading it all into memory. Each shard becomes a safetensors shard (plus
model.safetensors.index.json when there are several); the RoPE `inv_freq` buffers are dropped (they
are not weights); config, tokenizer and other files are copied. The result is checked against the
model the config describes and read back tensor by tensor, and only then moved into place.
DST must not exist, or hold only what this conversion writes (an earlier run of it); DST == SRC and
a DST holding anything else are refused before anything is read.
"""
import json
import os
import shutil
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .weights import CheckpointError, IGNORED, atomic_dir, check_destination, check_keys, load_config, read_index
from .model import MplugOwl


def bin_shards(src):
    index = os.path.join(src, "pytorch_model.bin.index.json")
    if os.path.isfile(index):
        return read_index(index)
    shards = sorted(f for f in os.listdir(src) if f.startswith("pytorch_model") and f.endswith(".bin"))
    if not shards:
        raise CheckpointError(f"{src}: no pytorch_model*.bin weights to convert")
    return shards


def read_bin(path):
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a pickle with code in it, or a corrupt file
        raise CheckpointError(f"{path}: cannot load as plain tensors ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return {k: v for k, v in sd.items() if not IGNORED.match(k)}


def convert(src, dst):
    if not os.path.isdir(src):
        raise CheckpointError(f"{src}: no such directory")
    cfg = load_config(src)  # fails early on a directory that is not an mPLUG-Owl checkpoint
    shards = bin_shards(src)
    names = ([f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
             if len(shards) > 1 else ["model.safetensors"])
    copied = [f for f in os.listdir(src) if not (f.endswith(".bin") or f == "pytorch_model.bin.index.json")
              and os.path.isfile(os.path.join(src, f))]  # config, tokenizer, preprocessor config, ...
    check_destination(dst, copied + names + ["model.safetensors.index.json"], sources=(src,))

    def write(tmp):
        for f in copied:
            shutil.copy(os.path.join(src, f), os.path.join(tmp, f))
        weight_map, shapes = {}, {}
        for shard, name in zip(shards, names):
            sd = read_bin(os.path.join(src, shard))
            seen, out = set(), {}
            for k, v in sd.items():  # safetensors refuses shared storage (e.g. tied weights): copy those
                ptr = v.untyped_storage().data_ptr()
                out[k] = v.clone() if ptr in seen else v.contiguous()
                seen.add(ptr)
            save_file(out, os.path.join(tmp, name), metadata={"format": "pt"})
            with safe_open(os.path.join(tmp, name), framework="pt") as f:  # read back, tensor by tensor
                for k in f.keys():
                    if not torch.equal(f.get_tensor(k), sd[k]):
                        raise CheckpointError(f"{name}: {k} differs after conversion")
                    weight_map[k], shapes[k] = name, sd[k].shape
            del sd, out
        if len(names) > 1:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
        with torch.device("meta"):
            model = MplugOwl(cfg)
        check_keys({k: v.shape for k, v in model.state_dict().items()}, shapes, src)
    atomic_dir(dst, write)
    return names


def main(argv):
    if len(argv) != 2:
        sys.exit("usage: python -m owl.convert SRC_DIR DST_DIR")
    try:
        names = convert(*argv)
    except (CheckpointError, OSError) as e:  # OSError: e.g. the disk filled up while writing DST.tmp
        sys.exit(f"error: {e}")
    print(f"wrote {len(names)} safetensors file(s) to {argv[1]}; verified against the config's model")


if __name__ == "__main__":
    main(sys.argv[1:])
