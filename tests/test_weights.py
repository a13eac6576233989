"""Model folders (owl/weights.py): save -> load is bitwise, dtypes are kept or converted, the official
key map covers every parameter of the tiny and 7B configs, and LLaMA config variants (grouped-query
attention, rope_theta) load and compute as they should."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import owl
from owl.llama import Llama
from owl.weights import drop_rope_buffers
from tests.conftest import tiny_model


# ----------------------------------------------------------------------------- save / load

def test_save_load_round_trip_bitwise(tmp_path, ref):
    m = tiny_model()
    owl.save_model(m, tmp_path / "ck", tokenizer_dir=os.path.join(ref, "mplug_owl"))
    m2, tok = owl.load_model(str(tmp_path / "ck"))
    a, b = m.state_dict(), m2.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert m2.config == m.config and tok.image_tokens == 65
    assert not os.path.exists(str(tmp_path / "ck") + ".tmp")


def test_load_keeps_or_converts_dtype(tmp_path, ref):
    m, _ = owl.load_model(os.path.join(ref, "mplug_owl"), dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    owl.save_model(m, tmp_path / "bf16", tokenizer_dir=os.path.join(ref, "mplug_owl"))
    m2, _ = owl.load_model(str(tmp_path / "bf16"), dtype=None)  # keeps the checkpoint's dtype
    assert {p.dtype for p in m2.parameters()} == {torch.bfloat16}


def official_keys(cfg):
    """The official MplugOwlForConditionalGeneration parameter names and shapes, written out from the
    official module structure (independently of our modules)."""
    v, a, t = cfg.vision_config, cfg.visual_abstractor_config, cfg.text_config
    C, A, H, kv = v.hidden_size, a.hidden_size, t.hidden_size, t.num_key_value_heads * t.head_dim
    keys = {"query_tokens": (1, cfg.num_query_tokens, A),
            "vision_model.embeddings.cls_token": (1, 1, C),
            "vision_model.embeddings.patch_embed.weight": (C, 3, v.patch_size, v.patch_size),
            "vision_model.embeddings.position_embedding": (1, v.num_patches + 1, C),
            "vision_model.embeddings.pre_layernorm.weight": (C,), "vision_model.embeddings.pre_layernorm.bias": (C,),
            "vision_model.post_layernorm.weight": (C,), "vision_model.post_layernorm.bias": (C,),
            "abstractor.visual_fc.weight": (H, A), "abstractor.visual_fc.bias": (H,), "abstractor.vit_eos": (1, 1, H),
            "language_model.model.embed_tokens.weight": (t.vocab_size, H),
            "language_model.model.norm.weight": (H,), "language_model.lm_head.weight": (t.vocab_size, H)}
    for i in range(v.num_hidden_layers):
        p = f"vision_model.encoder.layers.{i}."
        for n, s in {"self_attn.query_key_value": (3 * C, C), "self_attn.dense": (C, C),
                     "mlp.fc1": (v.intermediate_size, C), "mlp.fc2": (C, v.intermediate_size)}.items():
            keys[p + n + ".weight"], keys[p + n + ".bias"] = s, s[:1]
        for n in ("input_layernorm", "post_attention_layernorm"):
            keys[p + n + ".weight"] = keys[p + n + ".bias"] = (C,)
    for i in range(a.num_hidden_layers):
        p = f"abstractor.encoder.layers.{i}.crossattention."
        for n, s in {"attention.query": (A, A), "attention.key": (A, C), "attention.value": (A, C),
                     "output.out_proj": (A, A), "output.mlp.w1": (a.intermediate_size, A),
                     "output.mlp.w3": (a.intermediate_size, A), "output.mlp.w2": (A, a.intermediate_size)}.items():
            keys[p + n + ".weight"], keys[p + n + ".bias"] = s, s[:1]
        for n, w in (("norm1", A), ("normk", C), ("output.norm2", A), ("output.mlp.ffn_ln", a.intermediate_size)):
            keys[p + n + ".weight"] = keys[p + n + ".bias"] = (w,)
    for i in range(t.num_hidden_layers):
        p = f"language_model.model.layers.{i}."
        for n, s in {"self_attn.q_proj": (H, H), "self_attn.k_proj": (kv, H), "self_attn.v_proj": (kv, H),
                     "self_attn.o_proj": (H, H), "mlp.gate_proj": (t.intermediate_size, H),
                     "mlp.up_proj": (t.intermediate_size, H), "mlp.down_proj": (H, t.intermediate_size)}.items():
            keys[p + n + ".weight"] = s
        for n in ("input_layernorm", "post_attention_layernorm"):
            keys[p + n + ".weight"] = (H,)
    return keys


@pytest.mark.parametrize("name", ["tiny", "owl-7b"])
def test_official_key_map_covers_every_parameter(name, ref):
    cfg = owl.preset(name)
    with torch.device("meta"):
        model = owl.MplugOwl(cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official = official_keys(cfg)
    official_with_buffers = dict(official, **{
        f"language_model.model.layers.{i}.self_attn.rotary_emb.inv_freq": (64,)
        for i in range(cfg.text_config.num_hidden_layers)})
    mapped = drop_rope_buffers(official_with_buffers)
    assert mapped.keys() == ours.keys()
    assert all(mapped[k] == ours[k] for k in ours)
    if name == "owl-7b":
        n = sum(p.numel() for p in model.parameters())
        assert 7.0e9 < n < 7.3e9  # "about 7.2B" (paper)
    else:  # the tiny preset is exactly the reference checkpoint's shape
        ck = load_file(os.path.join(ref, "mplug_owl", "model.safetensors"))
        assert {k: tuple(v.shape) for k, v in drop_rope_buffers(ck).items()} == ours


# ----------------------------------------------------------------------------- LLaMA config variants

def test_grouped_query_attention_equals_repeated_heads():
    cfg = owl.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    gqa = Llama(cfg)
    gqa.init_weights()
    mha = Llama(owl.LlamaConfig(**{**cfg.__dict__, "num_key_value_heads": 4}))
    sd = gqa.state_dict()
    for k in list(sd):
        if k.endswith(("k_proj.weight", "v_proj.weight")):  # each kv head serves two query heads
            sd[k] = sd[k].view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(sd)
    ids = torch.randint(0, 50, (2, 20))
    with torch.no_grad():
        assert torch.allclose(gqa(ids), mha(ids), atol=1e-5)


def test_rope_theta_is_read_from_config(tmp_path, ref):
    d = tmp_path / "llama"
    shutil.copytree(os.path.join(ref, "hf_llama"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_theta"] = 500000.0
    (d / "config.json").write_text(json.dumps(cfg))
    a, b = owl.load_llama(os.path.join(ref, "hf_llama")), owl.load_llama(str(d))
    assert b.config.rope_theta == 500000.0
    ids = torch.arange(3, 30)[None]
    with torch.no_grad():
        assert not torch.allclose(a(ids), b(ids))
