"""Bad input gets one clear error naming the file, key or count involved; nothing loads partially."""
import json
import os
import shutil
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import owl
from owl import WeightsError
from owl.tokenizer import IMAGE_SLOT
from tests.conftest import ROOT, one_line, run_script

CHAT, TRAIN = os.path.join(ROOT, "chat.py"), os.path.join(ROOT, "train.py")


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
    with pytest.raises(WeightsError) as e:
        owl.load_model(str(d))
    msg = str(e.value)
    assert "missing 1: abstractor.vit_eos" in msg and "unexpected 1: extra.w" in msg


def test_ddp_prefix_gets_a_hint(ref, tmp_path):
    d = copy_ck(ref, tmp_path)
    rewrite(d, lambda sd: {"module." + k: v for k, v in sd.items()})
    with pytest.raises(WeightsError, match="strip 'module.'"):
        owl.load_model(str(d))


def test_mis_shaped_key_is_named(ref, tmp_path):
    d = copy_ck(ref, tmp_path)
    rewrite(d, lambda sd: {**sd, "query_tokens": sd["query_tokens"][:, :32]})
    with pytest.raises(WeightsError, match=r"mis-shaped 1: query_tokens \(1, 32, 64\) != \(1, 64, 64\)"):
        owl.load_model(str(d))


@pytest.mark.parametrize("remove,message", [("model.safetensors", "no weights"), ("config.json", "no config.json"),
                                            ("tokenizer.model", "no tokenizer.model")])
def test_incomplete_directory(ref, tmp_path, remove, message):
    d = copy_ck(ref, tmp_path)
    os.remove(d / remove)
    with pytest.raises(WeightsError, match=message):
        owl.load_model(str(d))


def test_not_an_owl_model_folder(ref):
    with pytest.raises(WeightsError, match="not an mPLUG-Owl model folder"):
        owl.load_model(os.path.join(ref, "hf_llama"))
    with pytest.raises(WeightsError, match="no such model folder"):
        owl.load_model(os.path.join(ref, "nope"))


def test_bin_weights_point_to_the_converter(ref, tmp_path):
    d = copy_ck(ref, tmp_path)
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    os.remove(d / "model.safetensors")
    with pytest.raises(WeightsError, match="owl.convert"):
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


# ----------------------------------------------------------------------------- the red-team cases (shared/design/redteam.md)

def folder(ref, tmp_path, name, src="mplug_owl"):
    d = tmp_path / name
    shutil.copytree(os.path.join(ref, src), d)
    return d


def edit_config(d, fn):
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(fn(cfg)))


@pytest.fixture
def caps(tmp_path):
    """A one-record caption file (with its image), for train.py runs that fail before training."""
    Image.new("RGB", (20, 20), "red").save(tmp_path / "0.png")
    (tmp_path / "caps.jsonl").write_text(json.dumps({"image": "0.png", "caption": "red"}) + "\n")
    return tmp_path / "caps.jsonl"


def stage1(clip, llama, caps, out, *extra):
    return ["--stage", "1", "--vision-init", clip, "--llm-init", llama, "--data", caps, "--out", out, "--max-steps", "1",
            "--num-queries", "4", "--abstractor-layers", "1", "--abstractor-heads", "2", "--abstractor-mlp", "32", *extra]


def test_malformed_configs_are_one_line(ref, tmp_path, caps, capsys):
    """Report 1.7, 1.8: config.json a list; 0 heads; patch_size 0; an HF CLIP config.json of [] (and
    the rows that were already one line stay so: 1.4 no text_config / visual_abstractor_config, 1.5 no
    hidden_size, 1.6 text_config null, now naming the key)."""
    cases = {"list": (lambda c: [1, 2], "not a model config"),
             "no_text": (lambda c: {k: v for k, v in c.items() if k != "text_config"}, "is not an mPLUG-Owl model folder"),
             "no_abs": (lambda c: {k: v for k, v in c.items() if k != "visual_abstractor_config"},
                        "not an mPLUG-Owl config: it has no visual_abstractor_config"),
             "null": (lambda c: {**c, "text_config": None}, "text_config: expected a JSON object, got NoneType"),
             "heads": (lambda c: {**c, "text_config": {**c["text_config"], "num_attention_heads": 0}},
                       "text_config: num_attention_heads must be a positive integer, got 0"),
             "patch": (lambda c: {**c, "vision_config": {**c["vision_config"], "patch_size": 0}},
                       "vision_config: patch_size must be a positive integer, got 0"),
             "size": (lambda c: {**c, "text_config": {**c["text_config"], "hidden_size": "96"}},
                      "hidden_size must be a positive integer, got '96'")}
    for name, (fn, words) in cases.items():
        d = folder(ref, tmp_path, name)
        edit_config(d, fn)
        line = one_line(run_script(capsys, CHAT, "--model", d, "--prompt", "hi"), words)
        assert str(d) in line, line
    d = folder(ref, tmp_path, "no_hidden")  # the 7B default 4096 is used: the weights' headers contradict it
    edit_config(d, lambda c: {**c, "text_config": {k: v for k, v in c["text_config"].items() if k != "hidden_size"}})
    one_line(run_script(capsys, CHAT, "--model", d, "--prompt", "hi"),
             f"{d}/config.json: text_config.hidden_size is 4,096 but the weights hold 96")
    d = folder(ref, tmp_path, "invalid")
    (d / "config.json").write_text('{"vision_config": {\n')  # 1.3
    one_line(run_script(capsys, CHAT, "--model", d, "--prompt", "hi"), f"{d}/config.json: not valid JSON")
    clip = folder(ref, tmp_path, "clip", "hf_clip")
    (clip / "config.json").write_text("[]")
    r = run_script(capsys, TRAIN, *stage1(clip, os.path.join(ref, "hf_llama"), caps, tmp_path / "o"))
    one_line(r, f"{clip}/config.json", "not a model config (it holds a JSON list)")
    assert not (tmp_path / "o").exists()  # nothing written


def test_malformed_weights_and_tokenizers_are_one_line(ref, tmp_path, caps, capsys):
    """Report 1.12 (an int32 tensor), 1.13 (a garbage tokenizer.model: chat, train, --check-data),
    1.14 (an empty one), 1.17 (an invalid shard index, one without weight_map); and the rows that were
    one line already: 1.1/1.2 (a truncated model.safetensors), 1.15 (--model a file), 1.16 (a
    folder where a file is due), 1.18 (an index naming a missing shard)."""
    for size, words in ((None, "incomplete metadata"), (5, "header too small")):
        d = folder(ref, tmp_path, f"trunc{size}")
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: size or len(data) // 2])
        one_line(run_script(capsys, CHAT, "--model", d, "--prompt", "hi"), "model.safetensors: cannot read safetensors",
                 words)
    (tmp_path / "afile").write_text("x")
    one_line(run_script(capsys, CHAT, "--model", tmp_path / "afile", "--prompt", "hi"), "no such folder")
    for name, words in (("config.json", "no config.json"), ("model.safetensors", "cannot read safetensors"),
                        ("tokenizer.model", "no tokenizer.model")):
        d = folder(ref, tmp_path, f"dir_{name}")
        os.remove(d / name)
        os.mkdir(d / name)
        one_line(run_script(capsys, CHAT, "--model", d, "--prompt", "hi"), words)
    d = folder(ref, tmp_path, "int32")
    rewrite(d, lambda sd: {**sd, "language_model.model.norm.weight": sd["language_model.model.norm.weight"].int()})
    one_line(run_script(capsys, CHAT, "--model", d, "--prompt", "hi"), "1 tensor(s) are not floating point",
             "language_model.model.norm.weight (int32)")
    for name, data in (("garbage", np.random.default_rng(0).bytes(14300)), ("empty", b"")):
        d = folder(ref, tmp_path, f"tok_{name}")
        (d / "tokenizer.model").write_bytes(data)
        r = run_script(capsys, CHAT, "--model", d, "--prompt", "hi")
        one_line(r, f"{d}/tokenizer.model: not a sentencepiece model")
        assert "loading weights" not in r.stderr  # refused before any weight is read
    llama = folder(ref, tmp_path, "llama_tok", "hf_llama")
    (llama / "tokenizer.model").write_bytes(np.random.default_rng(0).bytes(14300))
    clip = os.path.join(ref, "hf_clip")
    one_line(run_script(capsys, TRAIN, *stage1(clip, llama, caps, tmp_path / "o1")), "not a sentencepiece model")
    one_line(run_script(capsys, TRAIN, "--check-data", "--llm-init", llama, "--data", caps), "not a sentencepiece model")
    for name, index in (("bad_index", "{\n"), ("no_map", '{"metadata": {}}'), ("gone", None)):
        llama = folder(ref, tmp_path, name, "hf_llama")
        if index is None:
            os.remove(llama / "model-00002-of-00003.safetensors")
        else:
            (llama / "model.safetensors.index.json").write_text(index)
        words = {"bad_index": ": not valid JSON", "no_map": ": no weight_map",
                 "gone": " names shards that are missing: model-00002-of-00003.safetensors"}[name]
        one_line(run_script(capsys, TRAIN, *stage1(clip, llama, caps, tmp_path / name / "o")),
                 f"{llama}/model.safetensors.index.json{words}")


def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path):
    """Report 3.4 (a 16-bit PNG became 99.6% white), 3.5 (32-bit int and float TIFFs: all 255, all 0);
    3.3 (every 8-bit mode, animated GIFs, 1x1, 5000x1) and 3.6 (a 30000^2 header) stay as they were."""
    ramp = np.arange(4096, dtype=np.uint16).reshape(64, 64) * 16  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    a = np.asarray(owl.load_image(str(tmp_path / "g16.png")), dtype=np.float64)
    np.testing.assert_allclose(a[..., 0], np.round(ramp / 65535 * 255), atol=1)  # the same picture, in 8 bits
    assert abs(a.mean() - 127.5) < 1 and (a == 255).mean() < 0.01
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(tmp_path / "f.tif")
    Image.fromarray((np.arange(64, dtype=np.int32).reshape(8, 8) * 1000)).save(tmp_path / "i32.tif")
    assert {Image.open(tmp_path / f).mode for f in ("f.tif", "i32.tif")} == {"F", "I"}
    assert (np.asarray(owl.load_image(str(tmp_path / "f.tif"))) == 128).all()  # a float image in [0, 1]
    i32 = np.asarray(owl.load_image(str(tmp_path / "i32.tif")))[..., 0]
    assert i32.min() == 0 and i32.max() == round(63000 / 65535 * 255) and len(np.unique(i32)) == 64
    # an image handed in directly (owl.generate, the demo) goes through the same scaling
    px = owl.preprocess_image(Image.open(tmp_path / "g16.png"), 56)
    assert torch.allclose(px, owl.preprocess_image(owl.load_image(str(tmp_path / "g16.png")), 56))
    rgb = Image.new("RGB", (40, 30), (200, 30, 90))
    for mode, ext in (("RGBA", "png"), ("L", "png"), ("LA", "png"), ("1", "png"), ("CMYK", "jpg"), ("P", "gif")):
        rgb.convert(mode).save(tmp_path / f"m.{ext}")
        im = owl.load_image(str(tmp_path / f"m.{ext}"))
        assert im.mode == "RGB" and im.size == (40, 30), mode
    frames = [Image.new("RGB", (20, 20), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert owl.load_image(str(tmp_path / "anim.gif")).getpixel((5, 5))[0] > 200  # frame 0
    for size in ((1, 1), (5000, 1)):
        Image.new("RGB", size, "white").save(tmp_path / "s.png")
        assert owl.preprocess_image(owl.load_image(str(tmp_path / "s.png")), 56).shape == (3, 56, 56)
    Image.new("RGB", (1, 1), "white").save(tmp_path / "s.png")
    header = bytearray((tmp_path / "s.png").read_bytes())  # its IHDR made to claim 30000 x 30000 (69 bytes)
    header[16:24] = (30000).to_bytes(4, "big") * 2
    header[29:33] = zlib.crc32(bytes(header[12:29])).to_bytes(4, "big")
    (tmp_path / "bomb.png").write_bytes(bytes(header))
    with pytest.raises(owl.ImageError, match="refused, too many pixels"):
        owl.load_image(str(tmp_path / "bomb.png"))
