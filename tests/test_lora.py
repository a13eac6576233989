"""LoRA (owl/lora.py): B = 0 equals the base model, merged equals unmerged, only LoRA trains, and
the adapter files round-trip."""
import json

import torch
from safetensors.torch import save_file

import owl
from owl.lora import LoRALinear, apply_lora, merge_lora, lora_state_dict, mark_only_lora_as_trainable
from tests.conftest import tiny_batch, tiny_model


def test_lora_zero_B_equals_base_and_merge_equals_unmerged():
    m = tiny_model()
    ids, px = tiny_batch()
    with torch.no_grad():
        base = m(ids, px)
    names = apply_lora(m.language_model, ("q_proj", "v_proj"), r=4, alpha=16, dropout=0.0)
    assert len(names) == 2 * m.config.text_config.num_hidden_layers
    with torch.no_grad():
        assert torch.equal(m(ids, px), base)  # B = 0: step 0 is the base model
        for layer in m.modules():
            if isinstance(layer, LoRALinear):
                layer.lora_B.normal_(std=0.5)
        unmerged = m(ids, px)
        assert (unmerged - base).abs().max() > 1e-3  # the adapter now matters
        for layer in m.modules():
            if isinstance(layer, LoRALinear):
                layer.merge()
        merged = m(ids, px)
        assert torch.allclose(merged, unmerged, atol=1e-5)
        for layer in m.modules():
            if isinstance(layer, LoRALinear):
                layer.unmerge()
        assert torch.allclose(m(ids, px), unmerged, atol=1e-5)
        merge_lora(m)  # fold and put plain nn.Linear back
        assert not any(isinstance(x, LoRALinear) for x in m.modules())
        assert torch.allclose(m(ids, px), unmerged, atol=1e-5)


def test_lora_trainable_and_adapter_state_dict():
    m = tiny_model()
    apply_lora(m.language_model, ("q_proj", "v_proj"), r=2, alpha=4, dropout=0.1)
    mark_only_lora_as_trainable(m)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    sd = lora_state_dict(m)
    L = m.config.text_config.num_hidden_layers
    assert len(sd) == 2 * 2 * L and all(k.endswith(("lora_A", "lora_B")) for k in sd)
    q = m.language_model.model.layers[0].self_attn.q_proj
    assert q.lora_A.shape == (2, 96) and q.lora_B.shape == (96, 2) and q.scaling == 2.0
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in m.state_dict()  # base name kept


def test_apply_adapter_round_trip(tmp_path):
    m = tiny_model()
    apply_lora(m.language_model, ("q_proj", "v_proj"), r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for layer in m.modules():
            if isinstance(layer, LoRALinear):
                layer.lora_B.normal_()
        m.abstractor.vit_eos.add_(1.0)  # a trained non-LoRA tensor travels in the adapter too
    sd = {k: v.contiguous() for k, v in m.state_dict().items() if "lora_" in k or k.startswith("abstractor.")}
    save_file(sd, tmp_path / "adapter.safetensors")
    (tmp_path / "adapter.json").write_text(json.dumps({"r": 4, "alpha": 8, "dropout": 0.0,
                                                       "targets": ["q_proj", "v_proj"]}))
    m2 = tiny_model()
    owl.apply_adapter(m2, str(tmp_path / "adapter.safetensors"))
    ids, px = tiny_batch()
    with torch.no_grad():
        assert torch.equal(m2(ids, px), m(ids, px))
