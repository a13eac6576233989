"""fL, the language foundation model: LLaMA (paper, "Model Settings": raw LLaMA-7B).

Matches HF `LlamaForCausalLM` (transformers 4.31) and uses its parameter names, so an HF checkpoint
loads by name. Read bottom-up: RMSNorm, RoPE (free functions next to the formula), the KV cache,
attention, the SwiGLU MLP, the block, the model. `num_key_value_heads` (grouped-query attention) and
`rope_theta` come from the config, so LLaMA-1, Llama-2 and Vicuna checkpoints all load.

For inference, fuse_projections (at the end) turns q/k/v into one matmul and gate/up into another
(gpt-fast's `wqkv` and `w13`): decoding at batch 1 reads every weight once per token, and three
GEMVs of one input cost three launches and three partial waves where one wide GEMV streams at full
bandwidth. The fused model still reads and writes the checkpoint's names (q_proj, k_proj, ...).
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


def cache_length(n, context, bucket=256):
    """The KV cache length for n positions: n rounded up to a multiple of `bucket`, but no longer
    than the model's context (and never shorter than n). Prompts of different lengths then share one
    cache shape, hence one compiled decode step (gpt-fast fixes it per model; a bucket wastes less)."""
    return max(n, min(-(-n // bucket) * bucket, context))


class KVCache(nn.Module):
    """Preallocated keys and values, read at their full length (gpt-fast's static cache): `update`
    writes T new positions at the cache slots `slots` and returns the whole cache; the attention mask
    hides the slots not written yet. A decode step thus has the same shapes at every position and for
    every prompt that fits, which torch.compile and CUDA graphs need. The slots never written hold
    zeros or an earlier turn's keys, always finite, so masking them out is exact."""

    def __init__(self, batch_size, n_kv_head, max_seq_len, head_dim, dtype, device=None):
        super().__init__()
        shape = (batch_size, n_kv_head, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots, k, v):  # slots (T,) long; k, v (B, nkv, T, hs)
        B = k.shape[0]
        self.k[:B].index_copy_(2, slots, k)
        self.v[:B].index_copy_(2, slots, v)
        return self.k[:B], self.v[:B]  # (B, nkv, L, hs), L = the cache length


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=False)
        self.qkv_proj = None  # fuse_projections: [q; k; v] as one (nh + 2 nkv) hs x C matmul
        self.kv_cache = None  # a KVCache while generating (Llama.setup_caches)

    def forward(self, x, cos, sin, mask, slots):
        B, T, _ = x.shape
        if self.qkv_proj is not None:
            hs = self.head_dim
            q, k, v = self.qkv_proj(x).split([self.n_head * hs, self.n_kv_head * hs, self.n_kv_head * hs], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None:
            k_all, v_all = self.kv_cache.update(slots, k, v)  # (B, nkv, L, hs): the whole cache
            if mask is not None:  # decoding, a later chat turn, padding: read it all, the mask hides the rest
                k, v = k_all, v_all
        if self.n_kv_head != self.n_head:  # grouped-query attention: share each kv head
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # (B, nh, L, hs)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        if mask is None:  # no padding, nothing cached before: plain causal over the T new tokens
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # mask (B or 1, 1, T, L), True = attend
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)


class MLP(nn.Module):  # SwiGLU
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_proj = None  # fuse_projections: [gate; up] as one 2I x C matmul

    def forward(self, x):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, T, I) each
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, slots):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, slots)
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
        self.spare_caches = None  # the last setup_caches' KVCaches, for the next one (a plain list: no state)

    def setup_caches(self, batch_size, max_seq_len, dtype=None, device=None):
        """Allocate a KV cache in every layer (call before generating) for max_seq_len positions,
        rounded up by cache_length so that other prompt lengths reuse one compiled decode step.
        Its dtype defaults to the embedding's, which owl/quant.py never quantizes (lm_head may be int8).
        Returns the caches (a session that keeps them across calls checks them with has_caches).

        The caches of the last call are kept by reset_caches and handed out again when the shape,
        dtype, device and inference mode match: no allocation and zero-fill per generate call, and a
        compiled step's CUDA graph replays on the same buffers instead of re-recording (its inputs'
        addresses are part of the graph). The slots an earlier use wrote are masked until overwritten,
        as the static cache's are anyway. reset_caches(free=True) gives the memory back."""
        w = self.model.embed_tokens.weight
        L = cache_length(max_seq_len, self.config.max_position_embeddings)
        shape = (batch_size, self.config.num_key_value_heads, L, self.config.head_dim)
        dtype, device = dtype or w.dtype, torch.device(device or w.device)
        spare = self.spare_caches
        if not (spare and spare[0].k.shape == shape and spare[0].k.dtype == dtype and spare[0].k.device == device
                and spare[0].k.is_inference() == torch.is_inference_mode_enabled()):
            self.spare_caches = spare = None  # the old ones go before the new ones are allocated
            spare = [KVCache(batch_size, shape[1], L, shape[3], dtype, device) for _ in self.model.layers]
        self.spare_caches = spare
        for layer, cache in zip(self.model.layers, spare):
            layer.self_attn.kv_cache = cache
        return spare

    def cache_len(self):
        """The length of the KV caches in place (None without)."""
        cache = self.model.layers[0].self_attn.kv_cache
        return None if cache is None else cache.k.shape[2]

    def has_caches(self, caches):
        """Whether `caches` (from setup_caches) are still the ones in place: any owl.generate call on
        this model sets up and resets its own, and then a chat session must start a fresh cache."""
        return caches is not None and all(layer.self_attn.kv_cache is c for layer, c in zip(self.model.layers, caches))

    def reset_caches(self, free=False):
        """Take the caches out of the layers; kept for the next setup_caches unless free=True."""
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None
        if free:
            self.spare_caches = None

    def forward(self, input_ids=None, inputs_embeds=None, start_pos=0, pad_mask=None, position_ids=None,
                last_only=False):
        """Logits for input_ids (B, T) or inputs_embeds (B, T, C) placed at the cache slots start_pos..
        start_pos + T - 1. start_pos is an int, or a (1,) long tensor (the decode step: a tensor, so a
        compiled step serves every position). pad_mask, True for real tokens, is only needed with left
        padding: (B, cache length) with caches (slots not written yet may hold anything), (B, T) without."""
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        slots = start_pos + torch.arange(T, device=x.device)  # (T,) cache slots of the new tokens
        if position_ids is None:
            position_ids = slots.expand(B, T)  # (B, T): no padding, so a token's position is its slot
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        L = self.cache_len()
        if L is not None and isinstance(start_pos, int) and start_pos + T > L:
            raise ValueError(f"KV cache overflow: {start_pos + T} positions > cache length {L}")
        if L is None or (pad_mask is None and isinstance(start_pos, int) and start_pos == 0):
            # Training, a forward without cache, or a prefill from slot 0: the new tokens attend among
            # themselves, causally (SDPA's is_causal: on a GPU flash attention's causal kernel, and no
            # (T, L) mask; on the CPU no measurable difference). The decode step always reads the whole cache.
            mask = None if pad_mask is None else attention_mask(slots, T, pad_mask)
        else:
            mask = attention_mask(slots, L, pad_mask)  # (B or 1, 1, T, L)
        for layer in self.model.layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, slots, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, slots)  # (B, T, C)
        if last_only:
            x = x[:, -1:]  # (B, 1, C): prefill needs only the next-token logits
        return self.lm_head(self.model.norm(x))  # (B, T, vocab)

    def init_weights(self, std=0.02):
        for name, p in self.named_parameters():
            nn.init.ones_(p) if p.dim() == 1 else nn.init.normal_(p, std=std)


def attention_mask(slots, L, pad_mask=None):
    """(B or 1, 1, T, L) boolean, True = attend: the query at cache slot p sees the keys at slots <= p
    (later slots are not written yet, or hold an earlier turn's), and with left padding only real tokens."""
    keys = torch.arange(L, device=slots.device)  # (L,)
    mask = keys <= slots[:, None]  # (T, L)
    if pad_mask is None:
        return mask[None, None]  # (1, 1, T, L)
    # A padding query would see no key at all (and SDPA would give NaN, which then leaks through
    # 0 * NaN); letting every position see itself keeps the padded rows finite and harmless.
    mask = (mask & pad_mask[:, None, :]) | (keys == slots[:, None])  # (B, T, L)
    return mask[:, None]  # (B, 1, T, L)


# ----------------------------------------------------------------------------- fused projections
FUSED = {Attention: ("qkv_proj", ("q_proj", "k_proj", "v_proj")), MLP: ("gate_up_proj", ("gate_proj", "up_proj"))}


@torch.no_grad()
def fuse_projections(model):
    """Inference only: in every block, q/k/v become one nn.Linear `qkv_proj` (rows [q; k; v]) and
    gate/up one `gate_up_proj`, in place (model: an MplugOwl or a Llama); returns the model. Same
    logits up to the matmul's summation order (tests/test_decode_fast.py). Fuse after merging LoRA
    (owl.lora.merge_lora: an adapter is one per projection) and before quantizing (owl.quant: a
    per-row or per-group scale does not care which rows share a matrix). state_dict() and
    load_state_dict() still speak the separate names, so a fused model saves and loads the
    checkpoint's layout (the fused weight is split into views on the way out, concatenated on the way in)."""
    llm = getattr(model, "language_model", model)
    for module in llm.modules():
        if type(module) not in FUSED or getattr(module, FUSED[type(module)][0]) is not None:
            continue  # not a block's attention or MLP, or fused already
        fused_name, names = FUSED[type(module)]
        parts = [getattr(module, n) for n in names]
        if any(type(p) is not nn.Linear for p in parts):
            raise ValueError(f"fuse_projections needs plain nn.Linear {'/'.join(names)} (got "
                             f"{type(parts[0]).__name__}): merge LoRA first, quantize after fusing")
        w = torch.cat([p.weight for p in parts])  # (sum of outs, C)
        fused = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        fused.weight = nn.Parameter(w, requires_grad=parts[0].weight.requires_grad)
        setattr(module, fused_name, fused)
        for n in names:
            setattr(module, n, None)
        module.split_sizes = [p.out_features for p in parts]
        module.register_state_dict_post_hook(_split_fused)
        module.register_load_state_dict_pre_hook(_cat_fused)
    return model


def _split_fused(module, state_dict, prefix, local_metadata):
    """state_dict() of a fused module: the fused weight as the checkpoint's separate weights (views)."""
    fused_name, names = FUSED[type(module)]
    if prefix + fused_name + ".weight" in state_dict:
        w = state_dict.pop(prefix + fused_name + ".weight")
        for n, part in zip(names, w.split(module.split_sizes)):
            state_dict[prefix + n + ".weight"] = part


def _cat_fused(module, state_dict, prefix, *args):
    """load_state_dict() into a fused module: the checkpoint's separate weights, concatenated."""
    fused_name, names = FUSED[type(module)]
    keys = [prefix + n + ".weight" for n in names]
    if all(k in state_dict for k in keys):
        state_dict[prefix + fused_name + ".weight"] = torch.cat([state_dict.pop(k) for k in keys])
