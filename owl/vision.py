"""fV, the vision foundation model: a CLIP ViT-L/14 (paper, "Model Settings").

Matches the official `MplugOwlVisionModel` and uses its parameter names, so the official checkpoint
loads with an identity key map (owl/weights.py maps HF CLIP's names onto these). Read bottom-up:
attention, MLP, block, then the transformer with a shape comment on every line, as in openai/CLIP.
Departures from HF CLIP, both from the official code: q/k/v are one fused `query_key_value`
projection, interleaved per head; the LayerNorm eps is the config's (1e-6, CLIP's is 1e-5); and the
final LayerNorm is applied to every token (mPLUG-Owl feeds all of them to the abstractor).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import VisionConfig


class QuickGELU(nn.Module):  # CLIP's activation: x * sigmoid(1.702 x)
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class VisionAttention(nn.Module):  # official MplugOwlVisionAttention
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_head = cfg.num_attention_heads
        self.dropout = cfg.dropout
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)  # per head: [q; k; v]
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x):
        B, T, C = x.shape
        qkv = self.query_key_value(x).view(B, T, self.n_head, 3, C // self.n_head)  # (B, T, nh, 3, hs)
        q, k, v = qkv.permute(3, 0, 2, 1, 4)  # each (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.dense(y)


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = QuickGELU()
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):  # pre-norm residual block
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        C = cfg.hidden_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.patch_embed = nn.Conv2d(3, C, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, C))
        self.pre_layernorm = nn.LayerNorm(C, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values):  # (B, 3, H, W)
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # (B, C, H/14, W/14)
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, C)
        x = torch.cat([cls, x], dim=1)  # (B, N+1, C)
        x = x + self.position_embedding  # (B, N+1, C)
        return self.pre_layernorm(x)


class Encoder(nn.Module):  # holds `layers` so the names read encoder.layers.{i}
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_hidden_layers))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.grad_checkpointing = False

    def forward(self, pixel_values):  # (B, 3, 224, 224)
        x = self.embeddings(pixel_values)  # (B, 257, 1024)
        for layer in self.encoder.layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)  # (B, 257, 1024)
        return self.post_layernorm(x)  # (B, 257, 1024): every token, class token first

    def init_weights(self, std=0.02):
        """Random init (CLIP-style normal); used only when no checkpoint provides the weights."""
        for name, p in self.named_parameters():
            if "layernorm" in name:
                nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=std)
