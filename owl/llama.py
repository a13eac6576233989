"""fL, the language foundation model: LLaMA (paper, "Model Settings": raw LLaMA-7B).

Matches HF `LlamaForCausalLM` (transformers 4.31) and uses its parameter names, so an HF checkpoint
loads by name. Read bottom-up: RMSNorm, RoPE (free functions next to the formula), the KV cache,
attention, the SwiGLU MLP, the block, the model. `num_key_value_heads` (grouped-query attention) and
`rope_theta` come from the config, so LLaMA-1, Llama-2 and Vicuna checkpoints all load.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import LlamaConfig


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # computed in fp32 and cast back, as HF does
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


# RoPE, "rotate half" form (HF's layout of the q/k weights):
#   theta_i = base^(-2i/d),  x' = x * cos(p theta) + rotate_half(x) * sin(p theta)
def rope_cos_sin(position_ids, head_dim, base, dtype):  # position_ids (B, T)
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, hs/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, hs)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # (B, 1, T, hs) each


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):  # x (B, nh, T, hs)
    return x * cos + rotate_half(x) * sin


class KVCache(nn.Module):
    """Preallocated keys and values (gpt-fast): `update` writes T new positions at `start` and
    returns the cache filled so far, so a decode step never concatenates or reallocates."""

    def __init__(self, batch_size, n_kv_head, max_seq_len, head_dim, dtype, device=None):
        super().__init__()
        shape = (batch_size, n_kv_head, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start, k, v):  # k, v (B, nkv, T, hs)
        B, T = k.shape[0], k.shape[2]
        if start + T > self.k.shape[2]:
            raise ValueError(f"KV cache overflow: {start + T} positions > cache length {self.k.shape[2]}")
        self.k[:B, :, start:start + T] = k
        self.v[:B, :, start:start + T] = v
        return self.k[:B, :, :start + T], self.v[:B, :, :start + T]  # (B, nkv, start+T, hs)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=False)
        self.kv_cache = None  # a KVCache while generating (Llama.setup_caches)

    def forward(self, x, cos, sin, mask, start_pos):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(start_pos, k, v)  # (B, nkv, S, hs), S = start_pos + T
        if self.n_kv_head != self.n_head:  # grouped-query attention: share each kv head
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # (B, nh, S, hs)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        if mask is None:  # plain causal over T == S, or one new token seeing everything before it
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # mask (B, 1, T, S), True = attend
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)


class MLP(nn.Module):  # SwiGLU
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, start_pos):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, start_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):  # HF LlamaModel: names read model.embed_tokens, model.layers.{i}, model.norm
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = Transformer(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.grad_checkpointing = False

    def setup_caches(self, batch_size, max_seq_len, dtype=None, device=None):
        """Allocate a KV cache of max_seq_len positions in every layer (call before generating).
        Its dtype defaults to the embedding's, which owl/quant.py never quantizes (lm_head may be int8).
        Returns the caches (a session that keeps them across calls checks them with has_caches)."""
        w = self.model.embed_tokens.weight
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(batch_size, self.config.num_key_value_heads, max_seq_len,
                                               self.config.head_dim, dtype or w.dtype, device or w.device)
        return [layer.self_attn.kv_cache for layer in self.model.layers]

    def has_caches(self, caches):
        """Whether `caches` (from setup_caches) are still the ones in place: any owl.generate call on
        this model sets up and resets its own, and then a chat session must start a fresh cache."""
        return caches is not None and all(layer.self_attn.kv_cache is c for layer, c in zip(self.model.layers, caches))

    def reset_caches(self):
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None

    def forward(self, input_ids=None, inputs_embeds=None, start_pos=0, pad_mask=None, position_ids=None,
                last_only=False):
        """Logits for input_ids (B, T) or inputs_embeds (B, T, C) placed at positions start_pos.. of the
        cache. pad_mask (B, start_pos + T), True for real tokens, is only needed with left padding."""
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        if position_ids is None:
            position_ids = torch.arange(start_pos, start_pos + T, device=x.device).expand(B, T)  # (B, T)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        mask = causal_mask(T, start_pos, pad_mask, x.device)
        for layer in self.model.layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, start_pos, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, start_pos)  # (B, T, C)
        if last_only:
            x = x[:, -1:]  # (B, 1, C): prefill needs only the next-token logits
        return self.lm_head(self.model.norm(x))  # (B, T, vocab)

    def init_weights(self, std=0.02):
        for name, p in self.named_parameters():
            nn.init.ones_(p) if p.dim() == 1 else nn.init.normal_(p, std=std)


def causal_mask(T, start_pos, pad_mask, device):
    """None where SDPA's own causal flag suffices; else a (B, 1, T, S) boolean mask, True = attend."""
    if pad_mask is None and (start_pos == 0 or T == 1):
        return None
    S = start_pos + T
    q_pos = torch.arange(start_pos, S, device=device)[:, None]  # (T, 1)
    mask = torch.arange(S, device=device)[None, :] <= q_pos  # (T, S)
    mask = mask[None, None]  # (1, 1, T, S)
    if pad_mask is not None:
        # A padding query would see no key at all (and SDPA would give NaN, which then leaks through
        # 0 * NaN); letting every position see itself keeps the padded rows finite and harmless.
        mask = (mask & pad_mask[:, None, None, :S]) | (torch.arange(S, device=device)[None, :] == q_pos)
    return mask
