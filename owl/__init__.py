"""owl: mPLUG-Owl (Ye et al., 2023) by hand in PyTorch. One file per box of the paper's Figure 2:

  vision.py      fV, the CLIP ViT-L/14            (official MplugOwlVisionModel)
  abstractor.py  fK, the visual abstractor        (official MplugOwlVisualAbstractorModel)
  llama.py       fL, LLaMA with a KV cache        (HF LlamaForCausalLM)
  lora.py        LoRA on fL for stage 2           (peft / loralib)
  model.py       fV -> fK -> fL, image tokens spliced into the text (MplugOwlForConditionalGeneration)
and what they need: config.py, tokenizer.py (the prompt template), image.py, generate.py, quant.py
(int8), weights.py (checked key maps, loading and saving model folders), adapter.py (stage 2's
adapter files), convert.py (.bin -> safetensors, merging an adapter), memory.py (what fits where)
and fileio.py (safe reads and writes).
The wings serve one entry point each: owl/train/ (train.py), owl/chat/ (chat.py), owl/eval/
(python -m owl.eval: OwlEval, multiple choice), owl/demo/ (python -m owl.demo).
"""
from .config import OwlConfig, VisionConfig, AbstractorConfig, LlamaConfig, PRESETS, preset
from .model import MplugOwl
from .tokenizer import Tokenizer, build_prompt, SYSTEM, IMAGE
from .image import preprocess_image, load_image, ImageError
from .generate import generate, score_choices
from .lora import LoRALinear, apply_lora, merge_lora
from .weights import load_model, load_vision, load_llama, load_tokenizer, save_model, WeightsError
from .adapter import apply_adapter

__all__ = ["OwlConfig", "VisionConfig", "AbstractorConfig", "LlamaConfig", "PRESETS", "preset", "MplugOwl",
           "Tokenizer", "build_prompt", "SYSTEM", "IMAGE", "preprocess_image", "load_image", "ImageError",
           "generate", "score_choices", "load_model", "load_vision", "load_llama", "load_tokenizer", "save_model",
           "apply_adapter", "WeightsError", "LoRALinear", "apply_lora", "merge_lora"]
