"""mPLUG-Owl: fV -> fK -> fL (paper, Figure 2; official `MplugOwlForConditionalGeneration`).

The ViT encodes each image into patch features, the abstractor summarises them into
num_query_tokens + 1 visual tokens at the LLM width, and those are spliced into the text embeddings
at the image slots of the prompt (tokenizer.encode_prompt marks them with IMAGE_SLOT), in image order.
Parameter names follow the official checkpoint: vision_model.*, query_tokens, abstractor.*,
language_model.*.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import OwlConfig
from .vision import VisionTransformer
from .abstractor import VisualAbstractor
from .llama import Llama
from .tokenizer import IGNORE, IMAGE_SLOT, check_image_count


class MplugOwl(nn.Module):
    def __init__(self, cfg: OwlConfig, vision_model=None, language_model=None):
        """Pretrained towers may be passed in (stage 1 starts from CLIP's ViT and LLaMA); the
        abstractor and the query tokens are always built here."""
        super().__init__()
        self.config = cfg
        fk = cfg.visual_abstractor_config
        self.vision_model = VisionTransformer(cfg.vision_config) if vision_model is None else vision_model
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, fk.hidden_size))
        self.abstractor = VisualAbstractor(fk, cfg.text_config.hidden_size)
        self.language_model = Llama(cfg.text_config) if language_model is None else language_model

    def init_weights(self, std=0.02):
        self.vision_model.init_weights(std)
        self.init_abstractor(std)
        self.language_model.init_weights(std)

    def init_abstractor(self, std=0.02):
        """A fresh fK: what stage 1 starts from (the paper trains it from scratch)."""
        self.abstractor.init_weights(std)
        nn.init.normal_(self.query_tokens, std=std)

    def encode_images(self, pixel_values):  # (N, 3, H, W)
        """The visual tokens the LLM receives: (N, num_query_tokens + 1, llm_hidden)."""
        feats = self.vision_model(pixel_values)  # (N, 257, 1024)
        q = self.query_tokens.expand(feats.shape[0], -1, -1)  # (N, 64, 1024)
        return self.abstractor(q, feats.to(q.dtype))  # (N, 65, 4096)

    def embed(self, input_ids, image_embeds=None):
        """Text embeddings with the image slots filled, row by row, image by image."""
        slots = input_ids == IMAGE_SLOT  # (B, T)
        x = self.language_model.model.embed_tokens(input_ids.clamp(min=0))  # (B, T, C)
        n_slots = int(slots.sum())
        check_image_count(n_slots, 0 if image_embeds is None else image_embeds.shape[0],
                          self.config.image_tokens if image_embeds is None else image_embeds.shape[1])
        if n_slots:
            x = x.clone()
            x[slots] = image_embeds.reshape(-1, x.shape[-1]).to(x.dtype)  # (n_slots, C)
        return x

    def forward(self, input_ids, pixel_values=None, image_embeds=None, start_pos=0, pad_mask=None,
                position_ids=None, last_only=False):
        """Logits (B, T, vocab). input_ids (B, T) holds IMAGE_SLOT at image slots; pixel_values
        (N, 3, H, W) are the N images of the batch in order (or pass their image_embeds)."""
        if image_embeds is None and pixel_values is not None and len(pixel_values):
            image_embeds = self.encode_images(pixel_values)
        x = self.embed(input_ids, image_embeds)
        return self.language_model(inputs_embeds=x, start_pos=start_pos, pad_mask=pad_mask,
                                   position_ids=position_ids, last_only=last_only)


def compile_blocks(model, **compile_kwargs):
    """Regional compilation for training: torch.compile each block of the ViT, the abstractor and the
    LLM in place (nn.Module.compile; compile_kwargs go to torch.compile). The blocks of a tower share
    their code, so a tower compiles once (and once more for a first block whose input needs no
    gradient), not once per layer as a whole-model compile would trace it; inductor fuses the norms,
    RoPE, activations and residuals of each block, forward and backward. Gradient checkpointing still
    wraps each (now compiled) block. The loss and gradients equal eager's up to rounding
    (tests/test_train_fast.py); dropout draws other random numbers than eager. Returns the model."""
    for tower in (model.vision_model.encoder.layers, model.abstractor.encoder.layers, model.language_model.model.layers):
        for block in tower:
            block.compile(**compile_kwargs)
    return model


def lm_loss_sum(logits, labels):
    """Sum of next-token cross-entropy over the positions whose label is not IGNORE, and their count.

    Training divides the sum by the target count of the whole optimizer step (all micro-batches,
    all processes), so batch, accumulation and data parallelism give the same gradient."""
    logits, labels = logits[:, :-1], labels[:, 1:]  # predict token t+1 from positions <= t
    keep = labels != IGNORE  # (B, T-1)
    loss = F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum")
    return loss, int(keep.sum())


def target_count(labels):
    """The positions lm_loss_sum counts (its shift: a label at t is predicted from t-1), known before
    any forward: what train.py divides a step's loss sum by."""
    return int((labels[:, 1:] != IGNORE).sum())
