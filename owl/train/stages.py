"""What each stage trains (paper, "Training Scheme"), and the optimizer's view of it.

  stage 1, multimodal pretraining: fV (ViT) + fK (abstractor, query tokens) train; fL (LLaMA) frozen,
           but the gradient still flows through it back to the visual tokens.
  stage 2, joint instruction tuning: LoRA on fL + fK (the abstractor and its query tokens) train;
           fV and fL's base weights frozen.
           The paper trains the abstractor in stage 2; the released script (peft, LoRA on q_proj and
           v_proj) trained LoRA only: `train_abstractor=False` (train.py --freeze-abstractor) does that.
  stage 2, full fine-tuning (`full=True`, train.py --full-finetune; the released `-ft` model): the
           whole of fL and fK train, no LoRA; fV frozen. Sharded over the processes: fsdp.py.
  stage 1 with `train_vision=False` (train.py --freeze-vision): fK only, fV frozen as well: the
           LLaVA / MiniGPT-4 recipe, the control the demo's ablation compares the paper's against.

Frozen weights get requires_grad False, hence no gradient and no optimizer state. Also here: what
stage 1 starts from, the precision of frozen weights, AdamW parameter groups and the --dropout switch.
"""
import torch

from ..abstractor import AbstractorAttention
from ..config import AbstractorConfig, OwlConfig
from ..lora import LoRALinear, mark_only_lora_as_trainable
from ..model import MplugOwl
from ..vision import VisionAttention
from ..weights import load_llama, load_vision
from .config import TrainError

# Tensors we treat like embeddings: no weight decay (as the 1-D norms and biases).
NO_DECAY = ("query_tokens", "abstractor.vit_eos", "vision_model.embeddings.cls_token",
            "vision_model.embeddings.position_embedding")


def set_trainable(model, stage, train_abstractor=True, full=False, train_vision=True):
    """requires_grad per stage; returns the names of the trainable parameters."""
    if stage == 1:
        for name, p in model.named_parameters():
            frozen = ("language_model.",) if train_vision else ("language_model.", "vision_model.")
            p.requires_grad_(not name.startswith(frozen))
    elif full:
        for name, p in model.named_parameters():
            llm, vit = name.startswith("language_model."), name.startswith("vision_model.")
            p.requires_grad_(llm or (train_abstractor and not vit))
    else:
        mark_only_lora_as_trainable(model)
        if train_abstractor:
            for name, p in model.named_parameters():
                if name.startswith("abstractor.") or name == "query_tokens":
                    p.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def build_stage1(vision_init, llm_init, *, num_queries, layers, heads, mlp, hidden=None, seed=0):
    """ViT from HF CLIP, LLaMA from HF LLaMA, a fresh abstractor (layers, heads, SwiGLU width mlp) and
    num_queries query tokens, the same on every rank (seed)."""
    # The official model runs its ViT with LayerNorm eps 1e-6 although CLIP was trained with 1e-5; it
    # was initialised from CLIP and trained with 1e-6, so we do the same (the outputs at init differ
    # by ~1e-6 relative; the saved config then matches the released one).
    vit = load_vision(vision_init, layer_norm_eps=1e-6)
    llm = load_llama(llm_init)
    width = vit.config.hidden_size  # keys/values concatenate the queries with the ViT tokens: same width
    if hidden not in (None, width):
        raise TrainError(f"--abstractor-hidden {hidden} must equal the ViT width {width}")
    if width % heads:
        raise TrainError(f"--abstractor-heads {heads} does not divide the width {width}")
    abstractor = AbstractorConfig(hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
                                  num_attention_heads=heads, encoder_hidden_size=width)
    cfg = OwlConfig(vit.config, abstractor, llm.config, num_query_tokens=num_queries)
    torch.manual_seed(seed)  # the same fresh abstractor on every rank
    model = MplugOwl(cfg, vision_model=vit, language_model=llm)
    model.init_abstractor()
    return model


def train_mode(model, stage):
    """model.train(), except the ViT in stage 2: frozen, so no dropout either."""
    model.train()
    if stage == 2:
        model.vision_model.eval()


def count_by_module(model):
    """{top-level module: (trainable, total)} parameter counts, for the log at start."""
    out = {}
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        t, n = out.get(top, (0, 0))
        out[top] = (t + p.numel() * p.requires_grad, n + p.numel())
    return out


def cast_frozen(model, dtype):
    """Frozen weights to the compute dtype (halves their memory on a GPU); trainable ones stay fp32."""
    for p in model.parameters():
        p.data = p.data.to(dtype if not p.requires_grad else torch.float32)


def param_groups(model, weight_decay, vision_lr_scale=1.0):
    """AdamW groups: decay on matrices (LoRA A/B included), none on norms, biases and the
    embedding-like tensors in NO_DECAY (the usual convention; the paper does not say). The ViT's
    parameters get lr x vision_lr_scale (train.py --vision-lr): a pretrained tower next to a fresh
    abstractor often wants a smaller lr (the paper uses one lr for both)."""
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay = not (p.dim() < 2 or name in NO_DECAY)
            scale = vision_lr_scale if name.startswith("vision_model.") else 1.0
            g = groups.setdefault((decay, scale), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                   "lr_scale": scale})
            g["params"].append(p)
    return list(groups.values())


def set_dropout(model, p):
    """One number for every dropout: ViT attention, abstractor attention, LoRA (0 = all off)."""
    for m in model.modules():
        if isinstance(m, (VisionAttention, AbstractorAttention)):
            m.dropout = p
        elif isinstance(m, LoRALinear):
            m.lora_dropout.p = p
