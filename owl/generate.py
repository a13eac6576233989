"""Generation as small named functions around an explicit KV cache (gpt-fast):
`sample` picks the next token, `prefill` runs the prompt (images spliced in) through the model,
`decode_one_token` runs one new token, `generate_tokens` loops until EOS, and `generate` is the
public entry point that takes prompts in the official template and PIL images.

Stopping follows the official model (HF generate): a row ends at EOS, which is returned with it.
Several prompts generate as one batch with left padding; each row keeps its own positions, so
greedy results equal the unbatched ones. Speed (bench/run.py): prefill and generation run under
torch.inference_mode, the loop copies each step's ids to the host once, and generate(compile=True)
runs the decode step through torch.compile.
"""
import functools

import torch

from .image import preprocess_image


def sample(logits, temperature=0.0, top_k=0, top_p=1.0, generator=None):  # logits (B, vocab)
    """Greedy at temperature 0; else softmax(logits / T) restricted to the top-k and the top-p mass."""
    if temperature <= 0:
        return logits.argmax(dim=-1)  # (B,)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # tokens after the mass reaches top_p (keeps >= 1)
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


@torch.inference_mode()
def prefill(model, input_ids, image_embeds=None, start_pos=0, pad_mask=None, position_ids=None):
    """Run the prompt (B, T) through the model's forward, filling the KV cache; next-token logits
    (B, vocab). `model` is an MplugOwl (image_embeds go into the image slots) or a bare Llama (text)."""
    images = {} if image_embeds is None else {"image_embeds": image_embeds}
    return model(input_ids, **images, start_pos=start_pos, pad_mask=pad_mask, position_ids=position_ids,
                 last_only=True)[:, -1]


def decode_one_token(model, token, pos, pad_mask=None, position_ids=None):  # token (B,)
    llm = getattr(model, "language_model", model)  # a new token is text: the LLM alone
    return llm(token[:, None], start_pos=pos, pad_mask=pad_mask, position_ids=position_ids)[:, -1]  # (B, vocab)


@torch.inference_mode()
def generate_tokens(model, input_ids, image_embeds=None, *, max_new_tokens=64, start_pos=0, pad_mask=None,
                    temperature=0.0, top_k=0, top_p=1.0, generator=None, eos_id=2, stream=None,
                    decode=decode_one_token):
    """Generate after input_ids (B, T) with the caches already set up (positions < start_pos cached).
    stream(ids) is called with the (B,) new ids at each step; returning True stops early.
    Returns the new ids of each row, up to and including its EOS. `decode` may be
    compiled_decode_one_token() (GPU)."""
    B, T = input_ids.shape
    position_ids = None
    if pad_mask is not None:  # left padding: each row counts positions from its first real token
        pad_mask = torch.cat([pad_mask, pad_mask.new_ones(B, max_new_tokens)], dim=1)  # (B, T + new)
        position_ids = (pad_mask[:, :T].long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
    logits = prefill(model, input_ids, image_embeds, start_pos, pad_mask, position_ids)
    out, done = [[] for _ in range(B)], [False] * B
    for step in range(max_new_tokens):
        token = sample(logits, temperature, top_k, top_p, generator)  # (B,)
        for b, t in enumerate(token.tolist()):  # one device->host copy per step, not one per row
            if not done[b]:
                out[b].append(t)
                done[b] = t == eos_id
        if (stream is not None and stream(token)) or all(done) or step == max_new_tokens - 1:
            break
        pos = start_pos + T + step
        if position_ids is not None:
            position_ids = position_ids[:, -1:] + 1  # (B, 1)
        logits = decode(model, token, pos, pad_mask, position_ids)
    return out


@functools.lru_cache(maxsize=None)
def compiled_decode_one_token():
    """decode_one_token through torch.compile (for GPUs; the first steps compile for a minute).

    The position `pos` grows by one each step and the KV cache is read up to it, so shapes are dynamic
    (`dynamic=True` compiles once instead of once per position); that rules out CUDA graphs
    ("reduce-overhead"), which need the static shapes of gpt-fast's full-length masked cache. What it
    buys is fused elementwise work (RMSNorm, RoPE, SwiGLU; with int8, the dequantization): 1.15x eager
    on a 2-core CPU (bench/RESULTS.md). A new cache length (another prompt length) recompiles."""
    return torch.compile(decode_one_token, dynamic=True)


def visual_tokens(model, images):
    """The visual tokens (N, image_tokens, C) of N PIL images: preprocessing, then MplugOwl.encode_images."""
    size = model.config.vision_config.image_size
    pixels = torch.stack([preprocess_image(im, size) for im in images])  # (N, 3, H, W)
    return model.encode_images(pixels.to(model.query_tokens.device))  # the ViT casts to its own dtype


def encode_batch(model, tokenizer, prompts, images, image_embeds=None):
    """Token ids (left-padded), the padding mask (or None) and the visual tokens of all images
    (image_embeds (N, image_tokens, C), when given, stand for the images' visual tokens). Whether
    the prompts' <image> tags and the images agree is checked where they meet, in MplugOwl.embed."""
    if images and image_embeds is not None:
        raise ValueError("give the images or their image_embeds, not both")
    rows = [tokenizer.encode_prompt(p) for p in prompts]
    ctx = model.config.text_config.max_position_embeddings
    T = max(len(r) for r in rows)
    if T >= ctx:
        raise ValueError(f"the prompt is {T} tokens long; the model's context is {ctx} tokens")
    device = model.query_tokens.device
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows], device=device)  # (B, T)
    pad_mask = None
    if any(len(r) < T for r in rows):
        pad_mask = torch.tensor([[False] * (T - len(r)) + [True] * len(r) for r in rows], device=device)
    return ids, pad_mask, (visual_tokens(model, images) if images else image_embeds)


@torch.inference_mode()
def generate(model, tokenizer, prompt, images=(), max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0,
             seed=None, stream=None, compile=False, image_embeds=None):
    """New token ids for a prompt in the official template with one <image> per PIL image.

    `prompt` may be a list of prompts (then `images` are all their images in order, and a list of
    id lists is returned). temperature 0 is greedy; `seed` makes sampling repeatable; stream is called
    with each new id (an int; a (B,) tensor for a list of prompts) and may return True to stop.
    compile=True runs the decode step through torch.compile (worth it on a GPU, for long outputs).
    image_embeds (N, image_tokens, C) may replace the images: visual tokens computed beforehand."""
    single = isinstance(prompt, str)
    prompts = [prompt] if single else list(prompt)
    ids, pad_mask, embeds = encode_batch(model, tokenizer, prompts, list(images), image_embeds)
    B, T = ids.shape
    max_new_tokens = min(max_new_tokens, model.config.text_config.max_position_embeddings - T)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=ids.device).manual_seed(seed)
    if single and stream is not None:
        user_stream = stream
        stream = lambda t: user_stream(int(t[0]))  # one prompt: the callback gets plain ints
    llm = model.language_model
    llm.setup_caches(B, T + max_new_tokens)
    try:
        out = generate_tokens(model, ids, embeds, max_new_tokens=max_new_tokens, pad_mask=pad_mask,
                              temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                              eos_id=tokenizer.eos_id, stream=stream,
                              decode=compiled_decode_one_token() if compile else decode_one_token)
    finally:
        llm.reset_caches()
    return out[0] if single else out
