"""Configs for the three boxes of the paper's Figure 2 and the whole model.

Paper, "Model Settings": ViT-L/14 (24 layers, width 1024, patch 14) initialised from CLIP, a visual
abstractor, and raw LLaMA-7B. The field names follow the official `config.json`
(`vision_config`, `visual_abstractor_config`, `text_config`, `num_query_tokens`) so a released
checkpoint's config fills these dataclasses directly, and `to_official_dict` writes one back.
"""
import copy
from dataclasses import dataclass, field, asdict, fields


def check_sizes(cfg, *names, heads=None):
    """Every named field a positive integer, and (heads) hidden_size a multiple of that head count:
    a config.json with 0 heads or patch_size 0 stops here, naming the key, not in a division."""
    for n in names:
        v = getattr(cfg, n)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{n} must be a positive integer, got {v!r}")
    if heads and cfg.hidden_size % getattr(cfg, heads):
        raise ValueError(f"hidden_size {cfg.hidden_size} is not a multiple of {heads} {getattr(cfg, heads)}")


@dataclass
class VisionConfig:  # fV: official MplugOwlVisionModel (CLIP ViT-L/14)
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-6  # the official model uses 1e-6; HF CLIP uses 1e-5
    dropout: float = 0.0  # attention-probability dropout (the official config has 0.0)

    def __post_init__(self):
        check_sizes(self, "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "image_size", "patch_size", heads="num_attention_heads")

    @property
    def num_patches(self):
        return (self.image_size // self.patch_size) ** 2


@dataclass
class AbstractorConfig:  # fK: official MplugOwlVisualAbstractorModel
    hidden_size: int = 1024
    # The SwiGLU width. The paper's block is 4 x 1024 = 4096 wide; like LLaMA, the official code
    # shrinks it by 2/3 and rounds up to a multiple of 256, and the released config stores the
    # result, 2816. We read the stored width directly (it is what the weights have).
    intermediate_size: int = 2816
    num_hidden_layers: int = 6
    num_attention_heads: int = 16
    encoder_hidden_size: int = 1024  # width of the ViT features it attends to
    layer_norm_eps: float = 1e-6  # used by ffn_ln only; norm1/normk/norm2 keep LayerNorm's 1e-5
    attention_probs_dropout_prob: float = 0.1

    def __post_init__(self):
        check_sizes(self, "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "encoder_hidden_size", heads="num_attention_heads")


MAX_POSITIONS = 1 << 20  # a generous bound on a context: the longest LLaMA-family contexts are 2^17 - 2^20


@dataclass
class LlamaConfig:  # fL: HF LlamaForCausalLM (LLaMA-1, Llama-2, Vicuna)
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = None  # grouped-query attention (Llama-2 70B); None = num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        check_sizes(self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings", heads="num_attention_heads")
        if self.max_position_embeddings > MAX_POSITIONS:  # 1e9: chat's KV cache asked for 384 GB (redteam-2 1.4)
            raise ValueError(f"max_position_embeddings {self.max_position_embeddings} is more than {MAX_POSITIONS:,}: "
                             f"no model this code reads has such a context (is the config right?)")
        for n in ("rms_norm_eps", "rope_theta"):  # 0 or NaN gave silently empty answers (redteam-2 1.7)
            v = getattr(self, n)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
                raise ValueError(f"{n} must be a positive finite number, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads


@dataclass
class OwlConfig:
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    visual_abstractor_config: AbstractorConfig = field(default_factory=AbstractorConfig)
    text_config: LlamaConfig = field(default_factory=LlamaConfig)
    num_query_tokens: int = 64  # learnable queries; each image gives num_query_tokens + 1 LLM tokens

    def __post_init__(self):
        for name, cls in (("vision_config", VisionConfig), ("visual_abstractor_config", AbstractorConfig),
                          ("text_config", LlamaConfig)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, from_dict(cls, getattr(self, name)))
        fk, fv = self.visual_abstractor_config, self.vision_config
        check_sizes(self, "num_query_tokens")
        if fk.encoder_hidden_size != fv.hidden_size:
            raise ValueError(f"visual_abstractor_config.encoder_hidden_size {fk.encoder_hidden_size} must equal "
                             f"the ViT width, vision_config.hidden_size {fv.hidden_size}")

    @property
    def image_tokens(self):  # positions one <image> takes in the LLM input: queries + the end token
        return self.num_query_tokens + 1

    def to_official_dict(self):
        d = asdict(self)
        d["model_type"] = "mplug-owl"
        d["text_config"]["model_type"] = "llama"
        d["text_config"]["architectures"] = ["LlamaForCausalLM"]
        d["vision_config"]["hidden_act"] = "quick_gelu"
        d["vision_config"]["model_type"] = "mplug_owl_vision_model"
        d["visual_abstractor_config"]["model_type"] = "mplug_owl_visual_abstract"
        return d

    @classmethod
    def from_official_dict(cls, d):
        missing = [k for k in ("vision_config", "visual_abstractor_config", "text_config") if k not in d]
        if missing:
            raise ValueError(f"not an mPLUG-Owl config: it has no {', '.join(missing)}")
        parts = {k: from_dict(c, d[k], k) for k, c in (("vision_config", VisionConfig), ("text_config", LlamaConfig),
                                                        ("visual_abstractor_config", AbstractorConfig))}
        return cls(**parts, num_query_tokens=d.get("num_query_tokens", 64))


def from_dict(cls, d, section=None):
    """Build a config from a (HF-style) dict, keeping only the fields we model. An error names the
    section (e.g. text_config) and the key."""
    try:
        return _from_dict(cls, d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{section}: {e}" if section else str(e)) from None


def _from_dict(cls, d):
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object, got {type(d).__name__}")
    d = dict(d)
    if cls is VisionConfig and d.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise ValueError(f"vision hidden_act {d['hidden_act']!r} is not supported (only quick_gelu)")
    if cls is VisionConfig and "attention_dropout" in d:
        d["dropout"] = d["attention_dropout"]
    if cls is LlamaConfig and d.get("rope_scaling"):
        raise ValueError(f"rope_scaling {d['rope_scaling']} is not supported")
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names and v is not None})


PRESETS = {
    # The released mPLUG-Owl (MAGAer13/mplug-owl-llama-7b): ViT-L/14 @ 224, 6-layer abstractor, LLaMA-7B.
    "owl-7b": OwlConfig(),
    # A tiny model for tests and the CPU demo; same structure, small widths.
    "tiny": OwlConfig(
        vision_config=VisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, image_size=56, patch_size=14),
        visual_abstractor_config=AbstractorConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                                  num_attention_heads=4, encoder_hidden_size=64),
        text_config=LlamaConfig(vocab_size=1000, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=512),
        num_query_tokens=64),
    # 57M parameters with LLaMA-7B's vocabulary: bench/run.py's CPU decode rows and the memory tests.
    "57m": OwlConfig(
        vision_config=VisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
        visual_abstractor_config=AbstractorConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                                                  num_attention_heads=4, encoder_hidden_size=256),
        text_config=LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                                num_attention_heads=8, max_position_embeddings=2048)),
}


def preset(name):
    """A fresh copy of a preset config (the dict holds shared instances)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
