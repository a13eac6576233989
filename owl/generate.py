"""Generation as small named functions around an explicit KV cache (gpt-fast):
`sample` picks the next token, `prefill` runs the prompt (images spliced in) through the model,
`decode_one_token` runs one new token, `decode_step` runs it and samples the next, `generate_tokens`
loops until EOS, and `generate` is the public entry point that takes prompts in the official
template and PIL images. score_choices scores given continuations (multiple choice) with the same
prefill and KV cache.

Stopping follows the official model (HF generate): a row ends at EOS, which is returned with it.
Several prompts generate as one batch with left padding; each row keeps its own positions, so
greedy results equal the unbatched ones. Speed (bench/run.py, bench/gpu_check.py): the KV cache is
static (owl/llama.py: full length, masked); the decode step samples on the device and the loop reads
each new id one step behind, so the host never waits for the step it just launched (a GPU always has
the next step queued); generate(compile=True) runs the step through torch.compile, with CUDA graphs
on a GPU (gpt-fast's recipe), and compile_prefill=True also compiles the ViT + abstractor and the
prefill (the first token). For the LLM's fused projections and int8/int4 weights see
owl/llama.py fuse_projections and owl/quant.py.
"""
import functools

import torch

from .image import preprocess_image
from .tokenizer import IMAGE


# Below this temperature sampling is greedy: logits / T would overflow fp32 for a tiny T (1e-40 gives
# inf, then NaN probabilities), and already at 1e-5 softmax(logits / T) is the argmax's one-hot in
# fp32 unless two logits are within about 1e-3 of each other.
GREEDY_BELOW = 1e-5


def sample(logits, temperature=0.0, top_k=0, top_p=1.0, generator=None, noise=None):  # logits (B, vocab)
    """Greedy at temperature 0 (or below GREEDY_BELOW); else a draw from softmax(logits / T) restricted to the top-k and the
    top-p mass. The draw is argmax(probs / q) with q ~ Exp(1) per token (the exponential race), which
    is what torch.multinomial(probs, 1) computes itself (its one-sample path), so a seed gives the
    same ids as it did with multinomial; written out, the noise q can come in from outside: `noise`
    is q drawn by the caller (a compiled step cannot take a generator), else it is drawn here. (Some
    torch versions' multinomial also checks its input on the host: a sync per token, gone here.)"""
    if temperature < GREEDY_BELOW:
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
    probs = logits.softmax(-1)  # (B, vocab)
    if noise is None:
        noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)  # (B,)


@torch.inference_mode()
def prefill(model, input_ids, image_embeds=None, start_pos=0, pad_mask=None, position_ids=None):
    """Run the prompt (B, T) through the model's forward, filling the KV cache; next-token logits
    (B, vocab). `model` is an MplugOwl (image_embeds go into the image slots) or a bare Llama (text)."""
    images = {} if image_embeds is None else {"image_embeds": image_embeds}
    return model(input_ids, **images, start_pos=start_pos, pad_mask=pad_mask, position_ids=position_ids,
                 last_only=True)[:, -1]


def decode_one_token(model, token, pos, pad_mask=None, position_ids=None):  # token (B,), pos (1,) tensor or int
    """Next-token logits (B, vocab) after one new token at cache slot `pos`."""
    llm = getattr(model, "language_model", model)  # a new token is text: the LLM alone
    return llm(token[:, None], start_pos=pos, pad_mask=pad_mask, position_ids=position_ids)[:, -1]  # (B, vocab)


def decode_step(model, token, pos, pad_mask=None, pos_offset=None, noise=None, temperature=0.0, top_k=0, top_p=1.0):
    """The next ids (B,) after the ids `token` (B,) at cache slot pos (a (1,) tensor): decode_one_token,
    then sample, in one function so that a compiled step (and its CUDA graph) holds both. With left
    padding a row's position is its slot minus pos_offset (B, 1). With the static cache its shapes are
    the same at every position, so compiled_decode_step compiles it once."""
    position_ids = None if pos_offset is None else pos[None] - pos_offset  # (B, 1)
    logits = decode_one_token(model, token, pos, pad_mask, position_ids)
    return sample(logits, temperature, top_k, top_p, noise=noise)  # (B,)


class HostCopy:
    """A (B,) tensor's values on the host, copied without waiting for what the device runs after it
    (CUDA: a non-blocking copy into pinned memory and an event; elsewhere the copy is immediate)."""

    def __init__(self, t):
        self.event = None
        if t.device.type == "cuda":
            self.host = t.to("cpu", non_blocking=True)  # pinned: the copy is queued behind t's kernel
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = t.cpu()

    def get(self):
        if self.event is not None:
            self.event.synchronize()  # waits for this copy only, not for the step queued after it
        return self.host


@torch.inference_mode()
def generate_tokens(model, input_ids, image_embeds=None, *, max_new_tokens=64, start_pos=0, pad_mask=None,
                    temperature=0.0, top_k=0, top_p=1.0, generator=None, eos_id=2, stream=None,
                    decode=decode_step, prefill=prefill):
    """Generate after input_ids (B, T) with the caches already set up (positions < start_pos cached).
    stream(ids) is called with the (B,) new ids (a CPU tensor) at each step; returning True stops early.
    Returns the new ids of each row, up to and including its EOS. `decode` may be
    compiled_decode_step(device type), `prefill` compiled_prefill(device type).

    The device runs one step ahead of the host: step i + 1 is launched before the ids of step i are
    read (HostCopy), so neither waits for the other. When the host then stops (EOS in every row, the
    stream says stop), that step's result is dropped and the generator's state put back, so the ids
    and the random stream are the ones a step-by-step loop gives; the step wrote one more position
    of the KV cache, past the ones a caller counts as cached (the mask hides it, the next use overwrites it)."""
    if decode is decode_one_token:  # the older calling convention (logits, sampled outside): same ids
        decode = decode_step
    B, T = input_ids.shape
    llm = getattr(model, "language_model", model)
    L = llm.cache_len()
    if L is None or start_pos + T + max_new_tokens - 1 > L:  # the last new token is never run
        raise ValueError(f"the KV cache holds {L} positions; this needs {start_pos + T + max_new_tokens - 1}")
    position_ids = pos_offset = None
    if pad_mask is not None:  # left padding: each row counts positions from its first real token
        position_ids = (pad_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        pos_offset = start_pos + T - pad_mask.long().sum(-1, keepdim=True)  # (B, 1): slot - position
        full = pad_mask.new_ones(B, L)  # (B, L): the slots after the prompt are real tokens to come
        full[:, start_pos:start_pos + T] = pad_mask
        pad_mask = full
    rule = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    V = llm.config.vocab_size

    def noise():  # one step's sampling noise, drawn outside the (compiled) step, in the order of the steps
        return None if temperature <= 0 else torch.empty(B, V, device=input_ids.device).exponential_(generator=generator)

    logits = prefill(model, input_ids, image_embeds, start_pos, pad_mask, position_ids)
    token = sample(logits, **rule, noise=noise())  # (B,), on the device
    pending = HostCopy(token)
    # The decode step's position is a tensor on the device, advanced in place: no host value changes
    # between steps, so a compiled step (and its CUDA graph) serves every position.
    pos = torch.tensor([start_pos + T], device=input_ids.device)  # (1,)
    out, done = [[] for _ in range(B)], [False] * B
    for step in range(max_new_tokens):
        ahead = None
        if step < max_new_tokens - 1:  # launch step + 1 before reading step's ids
            state = None if generator is None or temperature <= 0 else generator.get_state()
            nxt = decode(model, token, pos, pad_mask, pos_offset, noise(), **rule).clone()  # (B,); a CUDA
            pos += 1  # graph's output is overwritten by its next replay: clone it
            ahead = (nxt, HostCopy(nxt), state)
        ids = pending.get()  # (B,) on the host
        for b, t in enumerate(ids.tolist()):
            if not done[b]:
                out[b].append(t)
                done[b] = t == eos_id
        if (stream is not None and stream(ids)) or all(done) or ahead is None:
            if ahead is not None and ahead[2] is not None:
                generator.set_state(ahead[2])  # the step run ahead is dropped: so is its draw
            break
        token, pending = ahead[0], ahead[1]
    return out


def compile_options(device_type):
    """torch.compile settings of the decode step. On CUDA, CUDA graphs (mode="reduce-overhead": one
    launch per token instead of several hundred kernels, what takes gpt-fast past the launch-bound
    25-45 tok/s of eager decoding) and gpt-fast's `coordinate_descent_tuning`: with it inductor turns
    a one-row matmul into a reduction kernel that it fuses with what feeds the weight, so an int8
    weight is read as int8 and scaled in the same kernel (without it the matmul goes to cuBLAS and
    the int8 -> bf16 copy of every weight is written out and read again: owl/quant.py). Elsewhere
    plain torch.compile, which fuses the elementwise work."""
    if device_type != "cuda":
        return {}
    return {"options": {"triton.cudagraphs": True, "coordinate_descent_tuning": True}}


@functools.lru_cache(maxsize=None)
def compiled_decode_step(device_type="cuda"):
    """decode_step through torch.compile, fullgraph=True (a graph break is an error, not a silent
    slowdown), with compile_options(device_type).

    The static KV cache and the tensor position make the step's shapes and guards the same at every
    position and for every prompt whose cache length (llama.cache_length) is the same, so it compiles
    once per (model, batch, cache length, padding or not, sampling rule); the first call takes a
    minute on a GPU, 20-60 s on a small CPU."""
    return torch.compile(decode_step, fullgraph=True, **compile_options(device_type))



def prefill_llm(llm, x, start_pos, pad_mask, position_ids):  # x (B, T, C): the embeddings, images spliced in
    return llm(inputs_embeds=x, start_pos=start_pos, pad_mask=pad_mask, position_ids=position_ids,
               last_only=True)[:, -1]  # (B, vocab)


@functools.lru_cache(maxsize=None)
def compiled_prefill(device_type="cuda"):
    """prefill with the LLM compiled: the first token's main cost after the ViT. dynamic=True: one
    graph serves every prompt length (a later chat turn, start_pos > 0, is one more). The splice of the
    visual tokens (MplugOwl.embed: a data-dependent index and the image-count check) stays eager. In
    eager mode a 7B prefill launches ~800 kernels one by one from Python; compiled, inductor's wrapper
    launches about a third as many, fused, and the GPU rather than the host sets the pace."""
    run = torch.compile(prefill_llm, dynamic=True, fullgraph=True)

    @torch.inference_mode()
    def compiled(model, input_ids, image_embeds=None, start_pos=0, pad_mask=None, position_ids=None):
        llm = getattr(model, "language_model", model)
        x = model.embed(input_ids, image_embeds) if llm is not model else llm.model.embed_tokens(input_ids)
        return run(llm, x, start_pos, pad_mask, position_ids)
    return compiled


def encode_images(model, pixels):  # (N, 3, H, W) -> (N, image_tokens, C)
    return model.encode_images(pixels)


@functools.lru_cache(maxsize=None)
def compiled_encode(device_type="cuda"):
    """MplugOwl.encode_images (ViT + abstractor) through torch.compile, fullgraph. At batch 1 the ViT
    is launch-bound in eager mode (24 blocks of ~13 kernels, each a few microseconds of GPU work)."""
    return torch.compile(encode_images, fullgraph=True)


def visual_tokens(model, images, encode=encode_images):
    """The visual tokens (N, image_tokens, C) of N PIL images: preprocessing, then MplugOwl.encode_images
    (encode: or compiled_encode(device type))."""
    size = model.config.vision_config.image_size
    pixels = torch.stack([preprocess_image(im, size) for im in images])  # (N, 3, H, W)
    return encode(model, pixels.to(model.query_tokens.device, non_blocking=True))  # the ViT casts to its dtype


def encode_batch(model, tokenizer, prompts, images, image_embeds=None, encode=encode_images):
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
    return ids, pad_mask, (visual_tokens(model, images, encode) if images else image_embeds)


@torch.inference_mode()
def generate(model, tokenizer, prompt, images=(), max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0,
             seed=None, stream=None, compile=False, image_embeds=None, compile_prefill=False):
    """New token ids for a prompt in the official template with one <image> per PIL image.

    `prompt` may be a list of prompts (then `images` are all their images in order, and a list of
    id lists is returned). temperature 0 is greedy; `seed` makes sampling repeatable; stream is called
    with each new id (an int; a (B,) tensor for a list of prompts) and may return True to stop.
    compile=True runs the decode step through torch.compile (worth it on a GPU, for long outputs; the
    first call compiles, later prompts of a similar length reuse it); compile_prefill=True also
    compiles the ViT + abstractor and the prefill, for the first token (compiled_encode, compiled_prefill).
    image_embeds (N, image_tokens, C) may replace the images: visual tokens computed beforehand."""
    single = isinstance(prompt, str)
    prompts = [prompt] if single else list(prompt)
    kind = model.query_tokens.device.type
    ids, pad_mask, embeds = encode_batch(model, tokenizer, prompts, list(images), image_embeds,
                                         compiled_encode(kind) if compile_prefill else encode_images)
    B, T = ids.shape
    max_new_tokens = min(max_new_tokens, model.config.text_config.max_position_embeddings - T)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=ids.device).manual_seed(seed)
    if single and stream is not None:
        user_stream = stream
        stream = lambda t: user_stream(int(t[0]))  # one prompt: the callback gets plain ints
    llm = model.language_model
    llm.setup_caches(B, T + max_new_tokens)  # rounded up to a multiple of 256 (llama.cache_length)
    try:
        out = generate_tokens(model, ids, embeds, max_new_tokens=max_new_tokens, pad_mask=pad_mask,
                              temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                              eos_id=tokenizer.eos_id, stream=stream,
                              decode=compiled_decode_step(kind) if compile else decode_step,
                              prefill=compiled_prefill(kind) if compile_prefill else prefill)
    finally:
        llm.reset_caches()
    return out[0] if single else out


def common_prefix(a, b):
    """The length of the longest common prefix of two id lists."""
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


@torch.inference_mode()
def score_choices(model, tokenizer, prompt, choices, images=(), normalize="sum", image_embeds=None):
    """The log-likelihood of each choice after the prompt (multiple choice scored as lmms-eval does):
    with full = encode_prompt(prompt + choice) and head = encode_prompt(prompt), the scored tokens are
    full[k:], k the length of their common prefix. (The template's "AI: " ends in a lone "▁" that
    merges with the choice's first word, "▁It": the last prompt token is then part of the choice.)
    normalize="mean" divides each sum by its number of tokens. The images are encoded once (or their
    image_embeds given), the prefix the choices share runs once in row 0 of the KV cache and is copied
    to the others, and the rest of every choice runs as one right-padded batch. [float] per choice."""
    if normalize not in ("sum", "mean"):
        raise ValueError(f"normalize must be 'sum' or 'mean', not {normalize!r}")
    if images and image_embeds is not None:
        raise ValueError("give the images or their image_embeds, not both")
    if not choices or any(IMAGE in c for c in choices):
        raise ValueError(f"give at least one choice, none with {IMAGE}")
    head = tokenizer.encode_prompt(prompt)
    fulls = [tokenizer.encode_prompt(prompt + c) for c in choices]
    starts = [common_prefix(head, f) for f in fulls]  # the first scored position of each choice
    for c, f, k in zip(choices, fulls, starts):
        if k == len(f):
            raise ValueError(f"the choice {c!r} adds no token to the prompt")
    n, P = len(fulls), min(starts)  # P >= 1: BOS is always shared
    T, ctx = max(map(len, fulls)) - P, model.config.text_config.max_position_embeddings
    if P + T > ctx:
        raise ValueError(f"prompt and choice are {P + T} tokens long; the model's context is {ctx} tokens")
    device = model.query_tokens.device
    embeds = visual_tokens(model, list(images)) if images else image_embeds
    llm = model.language_model
    caches = llm.setup_caches(n, P + T)
    try:
        last = prefill(model, torch.tensor([fulls[0][:P]], device=device), embeds)  # (1, vocab): predicts slot P
        for cache in caches:  # the shared prefix, from row 0 into every row
            cache.k[1:n, :, :P] = cache.k[:1, :, :P]
            cache.v[1:n, :, :P] = cache.v[:1, :, :P]
        tails = torch.tensor([f[P:] + [0] * (P + T - len(f)) for f in fulls], device=device)  # (n, T)
        logits = llm(tails, start_pos=P)  # (n, T, vocab): slot P + t predicts slot P + t + 1
    finally:
        llm.reset_caches()
    logp = torch.cat([last[:, None].expand(n, 1, -1), logits[:, :-1]], dim=1).float().log_softmax(-1)  # (n, T, V)
    scores = []  # row t of logp predicts the token at slot P + t
    for i, (f, k) in enumerate(zip(fulls, starts)):
        target = torch.tensor(f[k:], device=device)[:, None]  # (len(f) - k, 1)
        s = logp[i, k - P:len(f) - P].gather(-1, target).sum().item()
        scores.append(s / (len(f) - k) if normalize == "mean" else s)
    return scores
