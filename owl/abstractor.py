"""fK, the visual abstractor (paper, "Architecture Overview", Figure 2).

"We employ the visual abstractor module fK to summarize visual information within several learnable
tokens": `num_query_tokens` (64) learned queries cross-attend to the ViT's patch features through a
few layers, are projected to the LLM width (`visual_fc`), and a learned end-of-image vector
(`vit_eos`) is appended, so each image becomes 64 + 1 = 65 LLM tokens.

Matches the official `MplugOwlVisualAbstractorModel` and uses its parameter names. Two details the
paper does not state, both from the official code: keys and values come from the concatenation
[normed queries; normed image tokens], so the queries also attend to each other; and the SwiGLU MLP
has a LayerNorm (`ffn_ln`) between its gate and its output projection.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import AbstractorConfig


class AbstractorAttention(nn.Module):  # official ...VisualAbstractorMultiHeadAttention
    def __init__(self, cfg: AbstractorConfig):
        super().__init__()
        self.n_head = cfg.num_attention_heads
        self.dropout = cfg.attention_probs_dropout_prob
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.encoder_hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.encoder_hidden_size, cfg.hidden_size)
        self.keep_attention = False  # set True to keep the maps in .attention_map (tutorial 2 draws them)
        self.attention_map = None

    def forward(self, q_in, kv_in):  # q_in (B, Q, C), kv_in (B, Q+N, C)
        B, Q, C = q_in.shape
        split = lambda t: t.view(B, -1, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, L, hs)
        q, k, v = split(self.query(q_in)), split(self.key(kv_in)), split(self.value(kv_in))
        if self.keep_attention:  # the explicit form, to expose the maps
            att = torch.softmax(q @ k.transpose(-2, -1) / (k.shape[-1] ** 0.5), dim=-1)  # (B, nh, Q, Q+N)
            self.attention_map = att.detach()
            y = F.dropout(att, self.dropout, self.training) @ v  # (B, nh, Q, hs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return y.transpose(1, 2).reshape(B, Q, C)  # (B, Q, C)


class AbstractorMLP(nn.Module):  # SwiGLU with a LayerNorm before the output projection
    def __init__(self, cfg: AbstractorConfig):
        super().__init__()
        C, H = cfg.hidden_size, cfg.intermediate_size
        self.w1 = nn.Linear(C, H)
        self.w3 = nn.Linear(C, H)
        self.ffn_ln = nn.LayerNorm(H, eps=cfg.layer_norm_eps)
        self.w2 = nn.Linear(H, C)

    def forward(self, x):
        return self.w2(self.ffn_ln(F.silu(self.w1(x)) * self.w3(x)))


class AbstractorOutput(nn.Module):  # official ...VisualAbstractorCrossOutput
    def __init__(self, cfg: AbstractorConfig):
        super().__init__()
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm2 = nn.LayerNorm(cfg.hidden_size)  # default eps 1e-5, as in the official code
        self.mlp = AbstractorMLP(cfg)

    def forward(self, attn_out, residual):
        x = residual + self.out_proj(attn_out)  # the residual is the *normed* queries (official)
        return x + self.mlp(self.norm2(x))


class CrossAttention(nn.Module):  # official ...VisualAbstractorAttention
    def __init__(self, cfg: AbstractorConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size)  # queries (eps 1e-5)
        self.normk = nn.LayerNorm(cfg.encoder_hidden_size)  # image tokens (eps 1e-5)
        self.attention = AbstractorAttention(cfg)
        self.output = AbstractorOutput(cfg)

    def forward(self, queries, image):  # (B, Q, C), (B, N, Cv)
        q = self.norm1(queries)  # (B, Q, C)
        kv = torch.cat([q, self.normk(image)], dim=1)  # (B, Q+N, C)
        return self.output(self.attention(q, kv), q)  # (B, Q, C)


class AbstractorLayer(nn.Module):  # a pass-through kept for the key names: encoder.layers.{i}.crossattention.*
    def __init__(self, cfg: AbstractorConfig):
        super().__init__()
        self.crossattention = CrossAttention(cfg)

    def forward(self, queries, image):
        return self.crossattention(queries, image)


class AbstractorEncoder(nn.Module):  # holds `layers` so the names read encoder.layers.{i} (as the official ones)
    def __init__(self, cfg: AbstractorConfig):
        super().__init__()
        self.layers = nn.ModuleList(AbstractorLayer(cfg) for _ in range(cfg.num_hidden_layers))


class VisualAbstractor(nn.Module):
    def __init__(self, cfg: AbstractorConfig, llm_hidden_size: int):
        super().__init__()
        self.config = cfg
        self.encoder = AbstractorEncoder(cfg)
        self.visual_fc = nn.Linear(cfg.hidden_size, llm_hidden_size)
        self.vit_eos = nn.Parameter(torch.zeros(1, 1, llm_hidden_size))

    def forward(self, query_tokens, image_features):  # (B, 64, 1024), (B, 257, 1024)
        x = query_tokens
        for layer in self.encoder.layers:
            x = layer(x, image_features)  # (B, 64, 1024)
        x = self.visual_fc(x)  # (B, 64, 4096)
        eos = self.vit_eos.expand(x.shape[0], -1, -1)  # (B, 1, 4096)
        return torch.cat([x, eos], dim=1)  # (B, 65, 4096)

    def init_weights(self, std=0.02):
        for name, p in self.named_parameters():
            if "norm" in name or "ffn_ln" in name:
                nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=std)
