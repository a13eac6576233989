"""The LLaMA tokenizer (sentencepiece, read from `tokenizer.model` directly) and the prompt template.

Prompt tokenisation follows the official `_tokenize_prompt`: BOS, then the prompt split around each
`<image>`; every text chunk is encoded on its own (so each gets sentencepiece's dummy-prefix space,
as HF's LlamaTokenizer with legacy=True does), and every `<image>` becomes num_query_tokens + 1 slots
holding IMAGE_SLOT, which the model fills with that image's visual tokens.
"""
import os
import re

import sentencepiece as spm

IMAGE = "<image>"
IMAGE_SLOT = -1  # the id of a position the model fills with a visual token (never a vocabulary id)
IGNORE = -100  # the label of a position that carries no loss (F.cross_entropy's ignore_index)
# The official conversation template (paper, "Joint Instruction Tuning": Vicuna-style snippets).
SYSTEM = ("The following is a conversation between a curious human and AI assistant. The assistant gives "
          "helpful, detailed, and polite answers to the user's questions.\n")


def build_prompt(turns):
    """turns: [(num_images, question, answer or None), ...] -> a prompt in the official template.

    Each turn is one `Human: <image>` line per image, then `Human: {question}\\nAI: `, then the answer
    (if given) and a newline; a prompt for generation ends with the last turn's `AI: `."""
    s = SYSTEM
    for n_images, question, answer in turns:
        s += f"Human: {IMAGE}\n" * n_images + f"Human: {question}\nAI: "
        if answer is not None:
            s += f"{answer}\n"
    return s


_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text):
    """Lone surrogates (what undecodable input bytes become, "\\ud83d" in JSON) -> U+FFFD, so that
    every string the tokenizer sees is valid Unicode (sentencepiece refuses the others)."""
    return _SURROGATE.sub("\ufffd", text)


class Tokenizer:
    def __init__(self, model_file, image_tokens=65, vocab_size=None):
        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"{model_file}: no such tokenizer file")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=model_file)
        except (RuntimeError, OSError) as e:  # a garbage or empty file
            raise ValueError(f"{model_file}: not a sentencepiece model ({str(e).splitlines()[0]})") from None
        self.model_file = model_file
        self.image_tokens = image_tokens  # slots per <image>: num_query_tokens + 1
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.vocab_size = self.sp.vocab_size()
        # The model's config.json vocab_size (redteam-2 1.12): more pieces than it has rows would index past
        # the embedding; fewer is legal (padding rows: the demo's tokenizer), and decode skips those ids.
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{model_file} has no BOS or EOS piece (bos_id {self.bos_id}, eos_id {self.eos_id}): "
                             f"not a LLaMA tokenizer")
        if isinstance(vocab_size, int) and self.vocab_size > vocab_size:
            raise ValueError(f"{model_file} has {self.vocab_size} pieces, more than config.json's vocab_size "
                             f"{vocab_size}: the tokenizer is not the model's")
        # ids decode skips, as HF's decode(skip_special_tokens=True) does
        self.special = {i for i in (self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id(), self.sp.pad_id()) if i >= 0}

    def encode(self, text, bos=False, eos=False):
        return [self.bos_id] * bos + self.sp.encode(clean_text(text)) + [self.eos_id] * eos

    def encode_prompt(self, prompt, bos=True):
        """Ids of a prompt in the official template: BOS, text chunks, IMAGE_SLOT x image_tokens per <image>."""
        ids = [self.bos_id] if bos else []
        for chunk in re.split(f"({re.escape(IMAGE)})", clean_text(prompt)):
            if chunk == IMAGE:
                ids += [IMAGE_SLOT] * self.image_tokens
            elif chunk:
                ids += self.sp.encode(chunk)
        return ids

    def decode(self, ids):
        # vocabulary ids only: not IMAGE_SLOT, nor a padding row's id past the pieces (sampled from the logits)
        return self.sp.decode([i for i in ids if 0 <= i < self.vocab_size and i not in self.special])


def check_image_count(n_slots, n_images, per_image=1):
    """The one check that a prompt's images (n_slots positions, per_image of them per <image>; or
    n_slots <image> tags) and the images given agree. MplugOwl.embed runs it on every forward; chat
    runs it on a raw prompt before it loads a model."""
    if n_slots != n_images * per_image:
        n = n_slots // per_image
        slots = f" ({n} image slot(s) of {per_image} positions)" if per_image > 1 else ""
        raise ValueError(f"the prompt(s) have {n} {IMAGE} but {n_images} image(s) were given{slots}")
