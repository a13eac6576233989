"""owl: mPLUG-Owl (Ye et al., 2023) by hand in PyTorch. One file per box of the paper's Figure 2:

  vision.py      fV, the CLIP ViT-L/14            (official MplugOwlVisionModel)
  abstractor.py  fK, the visual abstractor        (official MplugOwlVisualAbstractorModel)
  llama.py       fL, LLaMA with a KV cache        (HF LlamaForCausalLM)
  lora.py        LoRA for stage 2, adapter files  (peft / loralib)
  model.py       fV -> fK -> fL, image tokens spliced into the text (MplugOwlForConditionalGeneration)
and what they need: config.py, tokenizer.py (the prompt template), image.py, generate.py, quant.py
(int8), weights.py (checked key maps, loading, saving) and convert.py (.bin -> safetensors).
The wings serve one script each: owl/train/ (train.py), owl/chat/ (chat.py), owl/demo/ (the demo).
"""
from .config import OwlConfig, VisionConfig, AbstractorConfig, LlamaConfig, PRESETS, preset
from .model import MplugOwl
from .tokenizer import Tokenizer, build_prompt, SYSTEM, IMAGE
from .image import preprocess_image, load_image, ImageError
from .generate import generate, score_choices
from .weights import load_model, load_vision, load_llama, load_tokenizer, save_model, CheckpointError

__all__ = ["OwlConfig", "VisionConfig", "AbstractorConfig", "LlamaConfig", "PRESETS", "preset", "MplugOwl",
           "Tokenizer", "build_prompt", "SYSTEM", "IMAGE", "preprocess_image", "load_image", "ImageError",
           "generate", "score_choices", "load_model", "load_vision", "load_llama", "load_tokenizer", "save_model",
           "apply_adapter", "CheckpointError", "LoRALinear", "apply_lora", "merge_lora"]


def __getattr__(name):
    """owl.LoRALinear, owl.apply_lora, ... import owl.lora on first use: so `python -m owl.lora` runs that
    file once, as __main__, and not also as an owl.lora imported before it (runpy's RuntimeWarning)."""
    if name in ("LoRALinear", "apply_lora", "merge_lora", "apply_adapter"):
        from . import lora
        return getattr(lora, name)
    raise AttributeError(f"module 'owl' has no attribute {name!r}")
