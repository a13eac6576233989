"""Bad input gets one clear error naming the file, key or count involved; nothing loads partially."""
import os
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import owl
from owl import CheckpointError
from owl.tokenizer import IMAGE_SLOT


def copy_ck(ref, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(os.path.join(ref, "mplug_owl"), d)
    return d


def rewrite(d, fn):
    sd = load_file(d / "model.safetensors")
    save_file(fn(sd), d / "model.safetensors")


def test_missing_and_unexpected_keys_are_named(ref, tmp_path):
    d = copy_ck(ref, tmp_path)
    rewrite(d, lambda sd: {("extra.w" if k == "abstractor.vit_eos" else k): v for k, v in sd.items()})
    with pytest.raises(CheckpointError) as e:
        owl.load_model(str(d))
    msg = str(e.value)
    assert "missing 1: abstractor.vit_eos" in msg and "unexpected 1: extra.w" in msg


def test_ddp_prefix_gets_a_hint(ref, tmp_path):
    d = copy_ck(ref, tmp_path)
    rewrite(d, lambda sd: {"module." + k: v for k, v in sd.items()})
    with pytest.raises(CheckpointError, match="strip 'module.'"):
        owl.load_model(str(d))


def test_mis_shaped_key_is_named(ref, tmp_path):
    d = copy_ck(ref, tmp_path)
    rewrite(d, lambda sd: {**sd, "query_tokens": sd["query_tokens"][:, :32]})
    with pytest.raises(CheckpointError, match=r"mis-shaped 1: query_tokens \(1, 32, 64\) != \(1, 64, 64\)"):
        owl.load_model(str(d))


@pytest.mark.parametrize("remove,message", [("model.safetensors", "no weights"), ("config.json", "no config.json"),
                                            ("tokenizer.model", "no tokenizer.model")])
def test_incomplete_directory(ref, tmp_path, remove, message):
    d = copy_ck(ref, tmp_path)
    os.remove(d / remove)
    with pytest.raises(CheckpointError, match=message):
        owl.load_model(str(d))


def test_not_an_owl_checkpoint(ref):
    with pytest.raises(CheckpointError, match="not an mPLUG-Owl checkpoint"):
        owl.load_model(os.path.join(ref, "hf_llama"))
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        owl.load_model(os.path.join(ref, "nope"))


def test_bin_weights_point_to_the_converter(ref, tmp_path):
    d = copy_ck(ref, tmp_path)
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    os.remove(d / "model.safetensors")
    with pytest.raises(CheckpointError, match="owl.convert"):
        owl.load_model(str(d))


def test_bad_images_name_the_file(tmp_path):
    with pytest.raises(owl.ImageError, match="missing.png: no such image file"):
        owl.load_image(str(tmp_path / "missing.png"))
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(owl.ImageError, match="junk.jpg: cannot read image"):
        owl.load_image(str(tmp_path / "junk.jpg"))
    Image.new("RGB", (64, 64), "red").save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(owl.ImageError, match="cut.jpg"):
        owl.load_image(str(tmp_path / "cut.jpg"))
    assert Image.MAX_IMAGE_PIXELS is not None  # the decompression-bomb guard stays on


def test_image_count_mismatch_and_long_prompt(owl_model):
    model, tok = owl_model
    img = Image.new("RGB", (56, 56), "blue")
    with pytest.raises(ValueError, match="1 <image> but 2 image"):
        owl.generate(model, tok, owl.build_prompt([(1, "hi", None)]), [img, img], max_new_tokens=2)
    with pytest.raises(ValueError, match="0 <image> but 1 image"):
        owl.generate(model, tok, owl.build_prompt([(0, "hi", None)]), [img], max_new_tokens=2)
    with pytest.raises(ValueError, match="context is 512 tokens"):
        owl.generate(model, tok, "word " * 600, [], max_new_tokens=2)
    ids = torch.tensor([[1] + [IMAGE_SLOT] * 65 + [5]])
    with pytest.raises(ValueError, match="1 image slot"):
        model(ids)
