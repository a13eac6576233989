"""A multi-turn conversation with the model, keeping the KV cache between turns: chat.py's engine
(paper, "Qualitative Analysis": multi-turn dialogue, several images in one conversation).

Each turn rebuilds the whole prompt in the official template (tokenizer.build_prompt), tokenises it,
and finds the longest prefix it shares with the positions already in the KV cache; only the rest is
run through the model, starting at that position, and images are encoded once. The answer is exactly
the one a from-scratch run on the full prompt gives: the cached keys and values of position p depend
only on the tokens at positions <= p.

What a turn runs: its own tokens, plus the previous answer once more, in the same batched prefill.
The prompt ends in "AI: ", whose space is a lone "▁" piece; in the next turn's prompt the answer
follows that space and sentencepiece merges them ("▁It"), so from there on the official tokenisation
differs from the generated ids and every later position shifts by one. Reusing the generated ids
instead would save that prefill but give a prompt the official model never sees. The images and the
earlier turns are never recomputed.

An answer ends at EOS, or when the model starts the next `Human:` turn (the official demo cuts the
text there too); that text is never shown. Streaming decodes all answer ids so far and prints only
what is new, holding back a trailing U+FFFD (an unfinished multi-byte character from byte-fallback
pieces) and a trailing "\\nHum" that may still become the stop; at the end what was printed equals
the answer text.
"""
import re
import time
from dataclasses import dataclass, field

import torch

from ..generate import (compiled_decode_step, compiled_encode, compiled_prefill, decode_step, encode_images,
                        generate_tokens, prefill, visual_tokens)
from ..image import load_image
from ..tokenizer import IMAGE, IMAGE_SLOT, build_prompt, check_image_count

STOP = "Human:"  # the start of the next turn in the official template
_STOP_RE = re.compile(r"(?:^|\n)[ \t]*" + re.escape(STOP))


class ChatError(ValueError):
    """A user-level problem with a turn (the session is unchanged)."""


class ContextFull(ChatError):
    pass


def find_stop(text):
    """Where the answer text starts the next `Human:` turn, or None."""
    m = _STOP_RE.search(text)
    return None if m is None else m.start()


def _ready(text):
    """The part of the (stop-free) text that can be shown now."""
    end = len(text.rstrip("\ufffd"))  # a trailing U+FFFD may be the first bytes of a character to come
    line = text.rfind("\n", 0, end) + 1
    if STOP.startswith(text[line:end].lstrip(" \t")) and end > 0:  # "...\nHum" may still become the stop
        end = max(line - 1, 0)
    return text[:end]


class StreamDecoder:
    """Answer ids in, newly printable text out (see the module docstring)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.printed, self.stopped = tokenizer, [], "", False

    def _emit(self, text):
        if text.startswith(self.printed) and len(text) > len(self.printed):
            new, self.printed = text[len(self.printed):], text
            return new
        return ""

    def push(self, token_id):
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        cut = find_stop(text)
        if cut is not None:
            self.stopped = True
            return self._emit(text[:cut])
        return self._emit(_ready(text))

    def finish(self):
        """(the rest to print, the whole answer text)."""
        text = self.tokenizer.decode(self.ids)
        cut = find_stop(text)
        text = text if cut is None else text[:cut]
        return self._emit(text), text


@dataclass
class Answer:
    text: str  # what was shown: the decoded ids, cut before a `Human:` turn
    ids: list  # the generated ids, without EOS (with a stop, they include the stop's tokens)
    stopped_by: str  # "eos", "turn" (started the next Human: turn), "length", "context", "interrupt"
    stats: dict = field(default_factory=dict)


@dataclass
class Turn:
    images: list  # [(uid, path)] attached before the question
    question: str
    answer: str


class ChatSession:
    def __init__(self, model, tokenizer, max_new_tokens=512, temperature=0.0, top_k=0, top_p=1.0, seed=None,
                 compile=False, context=None):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature, self.top_k, self.top_p = max_new_tokens, temperature, top_k, top_p
        self.device = model.query_tokens.device
        self.generator = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        whole = model.config.text_config.max_position_embeddings
        if context is not None and not 2 <= context <= whole:
            raise ChatError(f"--context {context}: need 2 <= context <= the model's {whole} positions")
        self.context = context or whole  # the window (chat.py --context; default the model's, as owl.memory sizes it)
        # The cache spans the whole window (static), so one compiled decode step serves every turn;
        # compile also compiles the ViT + abstractor and the prefill (the first token of every turn).
        kind = self.device.type
        self.decode = compiled_decode_step(kind) if compile else decode_step
        self.prefill = compiled_prefill(kind) if compile else prefill
        self.encode = compiled_encode(kind) if compile else encode_images
        self.stop_requested = False  # set (e.g. by a Ctrl-C handler) to end the answer after this token
        self._caches = None  # the KV caches set up for this session (Llama.has_caches tells if still in place)
        self._cached = []  # key of every position whose K/V are in the cache: token id or ("img", uid, j)
        self._embeds = {}  # uid -> visual tokens (image_tokens, C) of images already encoded
        self._images = {}  # uid -> (path, PIL image)
        self._next_uid = 0
        self.reset()

    # ------------------------------------------------------------------ conversation state
    def reset(self):
        """A new conversation. The cache is kept: the system line is the same and stays reused."""
        self.turns, self.pending = [], []
        self._images.clear()
        self._embeds.clear()

    def add_image(self, path, image=None):
        """Attach an image to the next question (raises owl.ImageError naming the file)."""
        image = load_image(path) if image is None else image
        uid, self._next_uid = self._next_uid, self._next_uid + 1
        self._images[uid] = (path, image)
        self.pending.append(uid)
        return image

    def pending_paths(self):
        return [self._images[u][0] for u in self.pending]

    def prompt(self, question=None):
        """The conversation in the official template, ending with `AI: ` for a new question."""
        turns = [(len(t.images), t.question, t.answer) for t in self.turns]
        if question is not None:
            turns.append((len(self.pending), question, None))
        return build_prompt(turns)

    def context_used(self):
        return len(self.tokenizer.encode_prompt(self.prompt())), self.context

    def close(self):
        self.model.language_model.reset_caches()
        self._caches, self._cached = None, []

    # ------------------------------------------------------------------ answering
    def ask(self, question, on_text=None):
        """Answer a question about the images attached so far; the turn joins the conversation."""
        if IMAGE in question:
            raise ChatError(f"the question contains {IMAGE}: attach images with /image (or --image) instead")
        uids = [u for t in self.turns for u, _ in t.images] + self.pending
        answer = self._run(self.prompt(question), uids, on_text)
        self._add_turn(question, answer.text)
        return answer

    def remember(self, question, answer):
        """Add a turn answered before (by an earlier run: OwlEval goes on after a stop) without running
        the model: later prompts are the ones that turn gave. Raises ContextFull where ask would."""
        n = len(self.tokenizer.encode_prompt(self.prompt(question)))
        if n >= self.context:
            raise ContextFull(f"the conversation needs {n} tokens but the context window holds {self.context}")
        self._add_turn(question, answer)
        return answer

    def _add_turn(self, question, answer):
        # An answer that spells "<image>" would turn into image slots in the next prompt: break it up.
        kept = answer.replace(IMAGE, "<image >")
        self.turns.append(Turn([(u, self._images[u][0]) for u in self.pending], question, kept))
        self.pending = []

    def complete(self, prompt, images=(), on_text=None):
        """Answer a complete prompt in the official template (one <image> per PIL image), verbatim."""
        try:
            check_image_count(prompt.count(IMAGE), len(images))
        except ValueError as e:
            raise ChatError(str(e)) from None
        self.reset()
        for im in images:
            self.add_image(None, im)
        uids, self.pending = self.pending, []
        return self._run(prompt, uids, on_text)

    def _keys(self, ids, uids):
        """Cache keys: the token id, or ("img", uid, j) at the j-th slot of an image, so that image
        slots match only for the same image at the same place."""
        per, keys, s = self.tokenizer.image_tokens, [], 0
        for t in ids:
            if t != IMAGE_SLOT:
                keys.append(t)
            else:
                keys.append(("img", uids[s // per], s % per))
                s += 1
        return keys

    def _reusable_prefix(self, keys):
        """The longest prefix already in the cache, leaving at least one position to run, and never
        ending inside an image."""
        p = 0
        while p < min(len(self._cached), len(keys) - 1) and self._cached[p] == keys[p]:
            p += 1
        if not isinstance(keys[p], int):
            p -= keys[p][2]
        return p

    def _ensure_cache(self):
        llm = self.model.language_model
        if not llm.has_caches(self._caches):
            try:
                self._caches, self._cached = llm.setup_caches(1, self.context), []
            except RuntimeError as e:  # torch.OutOfMemoryError too; the whole context's cache (redteam-2 1.4)
                if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
                    raise
                raise ChatError(f"the KV cache for a context of {self.context:,} positions does not fit in memory: "
                                f"pass --context N (fewer positions)") from None

    def _image_embeds(self, uids):
        """Visual tokens (N, image_tokens, C) of these images, encoding only those not seen before."""
        new = [u for u in dict.fromkeys(uids) if u not in self._embeds]
        if new:
            self._embeds.update(zip(new, visual_tokens(self.model, [self._images[u][1] for u in new], self.encode)))
        return torch.stack([self._embeds[u] for u in uids]) if uids else None

    @torch.inference_mode()
    def _run(self, prompt, uids, on_text=None):
        ids = self.tokenizer.encode_prompt(prompt)
        if len(ids) >= self.context:
            raise ContextFull(f"the conversation needs {len(ids)} tokens but the context window holds "
                              f"{self.context}: /reset starts a new one")
        keys = self._keys(ids, uids)
        self._ensure_cache()
        p = self._reusable_prefix(keys)
        images_before = sum(1 for k in keys[:p] if not isinstance(k, int) and k[2] == 0)
        max_new = min(self.max_new_tokens, self.context - len(ids))
        self._cached = self._cached[:p]
        decoder, gen, times = StreamDecoder(self.tokenizer), [], []

        def stream(token):  # token (1,)
            gen.append(int(token[0]))
            times.append(time.perf_counter())
            new = decoder.push(gen[-1])
            if new and on_text is not None:
                on_text(new)
            return decoder.stopped or self.stop_requested

        t0 = time.perf_counter()
        try:
            generate_tokens(self.model, torch.tensor([ids[p:]], device=self.device),  # (1, T - p)
                            self._image_embeds(uids[images_before:]), max_new_tokens=max_new, start_pos=p,
                            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                            generator=self.generator, eos_id=self.tokenizer.eos_id, stream=stream,
                            decode=self.decode, prefill=self.prefill)
        finally:  # also on KeyboardInterrupt: keep only the positions that were fully computed
            if gen:
                self._cached = keys + gen[:-1]  # the last sampled token was never run through the model
            interrupted, self.stop_requested = self.stop_requested, False
        rest, text = decoder.finish()
        if rest and on_text is not None:
            on_text(rest)
        ended_eos = bool(gen) and gen[-1] == self.tokenizer.eos_id
        stats = {"prefill_tokens": len(ids) - p, "reused_tokens": p, "decode_tokens": max(len(gen) - 1, 0),
                 "first_token_s": times[0] - t0 if times else 0.0,
                 "decode_s": times[-1] - times[0] if times else 0.0,
                 "context_used": len(keys) + len(gen), "context": self.context}
        return Answer(text, gen[:-1] if ended_eos else gen,
                      self._stop_reason(interrupted, decoder.stopped, ended_eos, max_new), stats)

    def _stop_reason(self, interrupted, started_next_turn, ended_eos, max_new):
        if interrupted:
            return "interrupt"
        if started_next_turn:
            return "turn"
        if ended_eos:
            return "eos"
        return "context" if max_new < self.max_new_tokens else "length"


def format_stats(s):
    """The --stats line: time to first token, prefill and decode speed, context use."""
    prefill = s["prefill_tokens"] / s["first_token_s"] if s["first_token_s"] > 0 else float("inf")
    decode = s["decode_tokens"] / s["decode_s"] if s["decode_s"] > 0 else float("inf")
    return (f"[stats] first token {s['first_token_s']:.3f} s | prefill {s['prefill_tokens']} tokens "
            f"({s['reused_tokens']} reused from the cache) at {prefill:.0f} tok/s | decode {s['decode_tokens']} "
            f"tokens at {decode:.0f} tok/s | context {s['context_used']}/{s['context']}")
