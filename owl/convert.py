"""Model folders in other forms: the release's PyTorch .bin shards to safetensors, and a stage-2
adapter folded into its base model.

    python -m owl.convert SRC_DIR DST_DIR                                       # .bin -> safetensors
    python -m owl.convert merge BASE_DIR ADAPTER_FILE OUT_DIR [--ignore-adapter-base]

The release (MAGAer13/mplug-owl-llama-7b, -pt, -ft) ships `pytorch_model*.bin` pickles. They are read
with torch.load(weights_only=True, mmap=True): tensors only, never arbitrary code, and one shard at
a time without reading it all into memory. Each shard becomes a safetensors shard (plus
model.safetensors.index.json when there are several); the RoPE `inv_freq` buffers are dropped (they
are not weights); config, tokenizer and other files are copied. The result is checked against the
model the config describes and read back tensor by tensor, and only then moved into place.
DST (and merge's OUT) must be new or empty: DST == SRC and a DST holding anything (another model, an
earlier conversion) are refused before anything is read. A file of SRC that is a link is read only
when it stays inside SRC or the Hugging Face cache SRC is a snapshot of. merge checks the adapter against
its base (adapter.json's sha256) and writes a plain model folder (owl.save_model): chat it without
--adapter, or continue training from it.
"""
import json
import os
import shutil
import sys

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .adapter import apply_adapter, check_adapter_base, read_adapter_meta
from .fileio import atomic_dir, check_destination, read_safetensors
from .lora import merge_lora
from .model import MplugOwl
from .weights import IGNORED, WeightsError, check_keys, load_config, load_model, read_index, save_model


def bin_shards(src):
    index = os.path.join(src, "pytorch_model.bin.index.json")
    if os.path.isfile(index):
        return read_index(index)
    shards = sorted(f for f in os.listdir(src) if f.startswith("pytorch_model") and f.endswith(".bin"))
    if not shards:
        raise WeightsError(f"{src}: no pytorch_model*.bin weights to convert")
    return shards


def read_bin(path):
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a pickle with code in it, or a corrupt file
        raise WeightsError(f"{path}: cannot load as plain tensors ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    return {k: v for k, v in sd.items() if not IGNORED.match(k)}


def convert(src, dst):
    if not os.path.isdir(src):
        raise WeightsError(f"{src}: no such directory")
    cfg = load_config(src)  # fails early on a directory that is not an mPLUG-Owl checkpoint
    shards = bin_shards(src)
    names = ([f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
             if len(shards) > 1 else ["model.safetensors"])
    copied = [f for f in os.listdir(src) if not (f.endswith(".bin") or f == "pytorch_model.bin.index.json")
              and os.path.isfile(os.path.join(src, f))]  # config, tokenizer, preprocessor config, ...
    for f in copied + shards:
        check_link(src, f)
    check_new(dst, sources=(src,))

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
            for k, t in read_safetensors(os.path.join(tmp, name), error=WeightsError):  # read back, one by one
                if not torch.equal(t, sd[k]):
                    raise WeightsError(f"{name}: {k} differs after conversion")
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


def check_link(src, name):
    """A file of SRC that is a link is read only where it stays inside SRC, or inside the blobs/ of the
    Hugging Face cache SRC is a snapshot of (models--X/snapshots/REV/f -> ../../blobs/HASH): a link
    pointing anywhere else (README.md -> ~/.ssh/id_rsa) would be copied into DST (redteam-2 6.4)."""
    path = os.path.join(src, name)
    if not os.path.islink(path):
        return
    real, root = os.path.realpath(path), os.path.realpath(src)
    blobs = os.path.join(os.path.dirname(os.path.dirname(root)), "blobs")
    if not (os.path.isfile(real) and any(real.startswith(d + os.sep) for d in (root, blobs))):
        raise WeightsError(f"{path} is a link to {real}, outside the model folder: copy the file in, or remove it")


def check_new(dst, sources):
    """DST is new or empty: a folder holding anything (another model, an earlier conversion) is never
    replaced (redteam-2 1.17), and it is never a source folder."""
    have = sorted(os.listdir(dst)) if os.path.isdir(dst) else [os.path.basename(dst)] if os.path.lexists(dst) else []
    if os.path.isdir(dst):
        check_destination(dst, have, sources=sources, error=WeightsError)  # (only its "is the source folder" check)
    if have:
        raise WeightsError(f"{dst} exists and is not empty ({', '.join(have[:3])}{', ...' if len(have) > 3 else ''}): "
                           f"give a new or empty folder")




def merge(base, adapter, out, ignore_base=False):
    """BASE + ADAPTER -> OUT, a plain model folder; everything is checked before the model is read,
    and OUT is never the base or the adapter's folder."""
    check_new(out, sources=(base, os.path.dirname(os.path.abspath(adapter))))
    read_adapter_meta(adapter) if ignore_base else check_adapter_base(adapter, base)
    model, _ = load_model(base, dtype=None)
    apply_adapter(model, adapter)
    merge_lora(model)
    save_model(model, out, tokenizer_dir=base)


def main(argv):
    try:  # OSError: e.g. the disk filled up while writing DST.tmp
        if argv[:1] == ["merge"]:
            args = [a for a in argv[1:] if a != "--ignore-adapter-base"]
            if len(args) != 3:
                sys.exit("usage: python -m owl.convert merge BASE_DIR ADAPTER_FILE OUT_DIR [--ignore-adapter-base]")
            merge(*args, ignore_base="--ignore-adapter-base" in argv)
            print(f"merged {args[1]} into {args[0]} -> {args[2]}")
            return
        if len(argv) != 2:
            sys.exit("usage: python -m owl.convert SRC_DIR DST_DIR\n"
                     "       python -m owl.convert merge BASE_DIR ADAPTER_FILE OUT_DIR [--ignore-adapter-base]")
        names = convert(*argv)
    except (WeightsError, OSError, SafetensorError) as e:  # SafetensorError: e.g. the disk filled (3.15)
        sys.exit(f"error: {e}")
    print(f"wrote {len(names)} safetensors file(s) to {argv[1]}; verified against the config's model")


if __name__ == "__main__":
    main(sys.argv[1:])
