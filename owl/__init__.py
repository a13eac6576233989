"""owl: mPLUG-Owl (Ye et al., 2023) by hand in PyTorch. One file per box of the paper's Figure 2:

  vision.py      fV, the CLIP ViT-L/14            (official MplugOwlVisionModel)
  abstractor.py  fK, the visual abstractor        (official MplugOwlVisualAbstractorModel)
  llama.py       fL, LLaMA with a KV cache        (HF LlamaForCausalLM)
  lora.py        LoRA for stage 2                 (peft / loralib)
  model.py       fV -> fK -> fL, image tokens spliced into the text (MplugOwlForConditionalGeneration)
and around them: config.py, tokenizer.py (prompt template), image.py, generate.py, checkpoint.py,
convert.py (.bin -> safetensors), quant.py (int8); chat_session.py and owleval.py (chat.py's engine);
data.py and train_utils.py (train.py's); world.py, demo_pretrain.py, demo.py, demo_report.py (the demo).
"""
from .config import OwlConfig, VisionConfig, AbstractorConfig, LlamaConfig, PRESETS, preset
from .model import MplugOwl
from .tokenizer import Tokenizer, build_prompt, SYSTEM, IMAGE
from .image import preprocess_image, load_image, ImageError
from .generate import generate
from .checkpoint import (load_model, load_vision, load_llama, load_tokenizer, save_model, apply_adapter,
                         CheckpointError)
from .lora import LoRALinear, apply_lora, merge_lora

__all__ = ["OwlConfig", "VisionConfig", "AbstractorConfig", "LlamaConfig", "PRESETS", "preset", "MplugOwl",
           "Tokenizer", "build_prompt", "SYSTEM", "IMAGE", "preprocess_image", "load_image", "ImageError",
           "generate", "load_model", "load_vision", "load_llama", "load_tokenizer", "save_model",
           "apply_adapter", "CheckpointError", "LoRALinear", "apply_lora", "merge_lora"]
