"""The CPU demo (owl/demo.py): the HF-layout writers invert the loaders, corpus tokenisation matches
train.py and owl.generate, and a reduced `run_demo` (with the ablation) runs end to end through train.py."""
import json
import os
import random

import pytest
import torch

import owl
from owl import demo, demo_pretrain, world
from owl.config import LlamaConfig
from owl.llama import Llama
from owl.vision import VisionTransformer


def test_hf_clip_writer_inverts_the_loader(tmp_path):
    cfg = demo.owl_config(demo.DemoConfig()).vision_config
    torch.manual_seed(0)
    vit = VisionTransformer(cfg)
    for p in vit.parameters():  # every tensor random (biases, norms too), so a swapped name shows
        torch.nn.init.normal_(p, std=0.2)
    demo_pretrain.write_hf_clip(vit, tmp_path)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["vision_config"]["hidden_size"] == cfg.hidden_size
    back = owl.load_vision(str(tmp_path), layer_norm_eps=cfg.layer_norm_eps)
    for k, v in vit.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    px = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        assert torch.equal(back(px), vit.eval()(px))


def test_hf_llama_writer_inverts_the_loader(tmp_path, ref):
    torch.manual_seed(0)
    llm = Llama(LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=64))
    llm.init_weights()
    demo_pretrain.write_hf_llama(llm, tmp_path, os.path.join(ref, "tokenizer.model"))
    back = owl.load_llama(str(tmp_path))
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        assert torch.equal(back(ids), llm.eval()(ids))
    assert owl.load_tokenizer(str(tmp_path)).vocab_size == 1000


def test_corpus_tokenisation_matches_train_and_generate(tmp_path):
    from owl.data import tokenize_conversation
    paths = world.write_world(str(tmp_path), n_train=20, n_test=4, n_text=20, seed=0, questions_per_type=1)
    tok = owl.Tokenizer(paths["tokenizer"], 17)
    doc = world.text_conversation(world.random_scene(random.Random(0)), random.Random(1))
    assert demo_pretrain.encode_doc(tok, doc, 0) == tokenize_conversation(tok, doc, 10 ** 6)[0]  # as train.py
    ids = demo_pretrain.encode_doc(tok, doc, 1)  # as a prompt reaches owl.generate, then the answer and EOS
    first, _, rest = doc.partition("AI: ")
    answer = rest.split("\n")[0]
    prompt = tok.encode_prompt(first + "AI: ")
    assert ids[:len(prompt)] == prompt
    assert ids[len(prompt):len(prompt) + len(tok.sp.encode(answer)) + 1] == tok.sp.encode(answer) + [tok.eos_id]


def test_normalise():
    assert demo.normalise("  The First image. ") == "the first image"
    assert demo.normalise("two\n") == "two" and demo.normalise("two") != demo.normalise("three")


def test_reduced_demo_end_to_end(tmp_path):
    out = str(tmp_path / "demo")
    assert demo.run_demo(out, ablation=True, quick=True) == out
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    assert set(report["ablation"]) == {"both", "stage1_only", "stage2_only"}
    for name, r in report["ablation"].items():
        assert 0.0 <= r["accuracy"] <= 1.0 and set(r["per_type"]) == set(world.QUESTION_TYPES), name
    assert report["accuracy"] == report["ablation"]["both"]["accuracy"]
    for f in ("report.md", "llm/config.json", "clip/config.json", "stage1/model.safetensors",
              "stage2/adapter.safetensors", "stage2_only/model.safetensors", "samples/0_0.png"):
        assert os.path.isfile(os.path.join(out, f)), f
    with open(os.path.join(out, "stage1", "metrics.jsonl")) as f:
        assert len(f.readlines()) == demo.QUICK["stage1_steps"]
    # the report's accuracy is what the saved model gives: evaluate the checkpoint again
    model, tok = owl.load_model(os.path.join(out, "stage2"))
    again = demo.evaluate(model, tok, os.path.join(out, "world", "test.json"))
    assert again["accuracy"] == report["accuracy"] and again["per_type"] == report["per_type"]
    # the samples in report.md are rows of the evaluation
    assert all(s["answer"] in {a["answer"] for a in again["answers"]} for s in report["samples"])
