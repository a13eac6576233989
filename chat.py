"""Talk to mPLUG-Owl in the terminal (paper, "Qualitative Analysis": multi-turn dialogue, several
images, scene text), or answer one prompt for a script.

    python chat.py --model DIR                                       # interactive
    python chat.py --model DIR --image a.jpg --prompt "What is funny here?"

The conversation follows the official template; the KV cache is kept between turns, so a new turn
runs only its new tokens (owl/chat/session.py). Sampling is greedy unless --temperature > 0.
Benchmarks (OwlEval, multiple choice) are `python -m owl.eval` (owl/eval/).
"""
import argparse
import contextlib
import math
import os
import signal
import sys

import owl
from owl.chat.load import UsageError, add_model_options, check_adapter, load
from owl.chat.session import ChatError, ChatSession, format_stats
from owl.tokenizer import check_image_count, clean_text
from owl.weights import load_config

HELP = """commands:
  /image PATH   attach an image to the next question (repeatable)
  /reset        start a new conversation
  /history      show the conversation and how much of the context window it uses
  /help         this help
  /quit         leave (Ctrl-D too); Ctrl-C while the model answers stops the answer"""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, f"error: {message} (chat.py --help lists the options)\n")


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0], epilog="interactive " + HELP,
               formatter_class=argparse.RawTextHelpFormatter)
    add_model_options(p)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k cut")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="makes sampling repeatable")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs on a GPU; "
                   "the first answer waits for it to compile)")
    p.add_argument("--context", type=int, metavar="N", help="the context window (and KV cache) in tokens; default "
                   "the model's whole context (python -m owl.memory --context N sizes the same)")
    p.add_argument("--stats", action="store_true", help="after each answer: time to first token, tokens/s")
    p.add_argument("--prompt", metavar="TEXT", help="one-shot: answer this question ('-' reads it from stdin) and exit")
    p.add_argument("--raw-prompt", metavar="TEXT", help="one-shot: a complete prompt in the official template, verbatim")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image for the prompt (repeatable; interactive: attached to the first question)")
    a = p.parse_args(argv)
    if a.prompt is not None and a.raw_prompt is not None:
        p.error("--prompt and --raw-prompt exclude each other")
    if a.max_new_tokens < 1 or not 0 <= a.temperature < math.inf or a.top_k < 0 or not 0 < a.top_p <= 1:
        p.error("need --max-new-tokens >= 1, a finite --temperature >= 0, --top-k >= 0, 0 < --top-p <= 1")
    if a.context is not None and a.context < 2:
        p.error("need --context >= 2 (a prompt token and an answer token)")
    if a.seed is not None and not 0 <= a.seed < 2**64:
        p.error("--seed must be in [0, 2**64): a 64-bit generator seed")
    a.prompt, a.raw_prompt = (None if t is None else clean_text(t) for t in (a.prompt, a.raw_prompt))  # undecodable bytes
    return a


@contextlib.contextmanager
def ctrl_c_stops(session):
    """While the model answers, Ctrl-C ends the answer after the current token (a second one at once)."""
    def handler(sig, frame):
        if session.stop_requested:
            raise KeyboardInterrupt
        session.stop_requested = True
    session.stop_requested = False
    old = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def write(text):
    sys.stdout.write(text)
    sys.stdout.flush()


def answer(session, args, question=None, raw=None, images=(), prefix=""):
    """Stream one answer to stdout (after prefix); False if it could not start (the reason on stderr)."""
    started = []

    def on_text(text):
        if not started:
            started.append(write(prefix))
        write(text)
    try:
        with ctrl_c_stops(session):
            a = session.ask(question, on_text) if raw is None else session.complete(raw, images, on_text)
    except ChatError as e:
        print(f"error: {e}", file=sys.stderr)
        return False
    except KeyboardInterrupt:  # a second Ctrl-C: the answer is dropped
        write(" [stopped]\n")
        return True
    on_text("")
    write(" [stopped]\n" if a.stopped_by == "interrupt" else "\n")
    if a.stopped_by == "context":
        print("[the context window is full: /reset starts a new conversation]", file=sys.stderr)
    if args.stats:
        print(format_stats(a.stats), file=sys.stderr)
    return True


def history(session):
    lines = []
    for t in session.turns:
        lines += [f"Human: [image: {p}]" for _, p in t.images] + [f"Human: {t.question}", f"AI: {t.answer}"]
    lines += [f"(attached for the next question: {p})" for p in session.pending_paths()]
    used, ctx = session.context_used()
    lines.append(f"[{len(session.turns)} turn(s); {used} of {ctx} context tokens ({100 * used / ctx:.0f}%)]")
    return "\n".join(lines)


def interactive(session, args, images):
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    for path, im in zip(args.image, images):
        session.add_image(path, im)
    print(f"mPLUG-Owl chat: {args.model}. Type a question; /help for commands.")
    while True:
        try:
            line = input(">>> ").strip()
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n(/quit or Ctrl-D to leave)")
            continue
        line = clean_text(line)  # (an undecodable byte arrives as U+FFFD or a lone surrogate)
        if not line:
            continue
        if not line.startswith("/"):
            answer(session, args, question=line, prefix="AI: ")
            continue
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        if cmd in ("/quit", "/exit"):
            return 0
        elif cmd == "/help":
            print(HELP)
        elif cmd == "/image":
            if not arg:
                print("usage: /image PATH", file=sys.stderr)
                continue
            arg = os.path.expanduser(arg.strip("'\""))  # a path dropped into a terminal comes quoted
            try:
                im = session.add_image(arg)
                print(f"[image attached: {arg} ({im.width}x{im.height})]")
            except owl.ImageError as e:
                print(f"error: {e}", file=sys.stderr)
        elif cmd == "/reset":
            session.reset()
            print("[new conversation]")
        elif cmd == "/history":
            print(history(session))
        else:
            print(f"unknown command {cmd}: /help lists the commands", file=sys.stderr)


def one_shot(session, args, images):
    if args.raw_prompt is not None:
        ok = answer(session, args, raw=args.raw_prompt, images=images)
    else:
        question = clean_text(sys.stdin.read()).strip() if args.prompt == "-" else args.prompt
        if not question:
            raise UsageError("--prompt: the question is empty")
        for path, im in zip(args.image, images):
            session.add_image(path, im)
        ok = answer(session, args, question=question)
    return 0 if ok else 1


def main(argv=None):
    args = parse_args(argv)
    if (sys.stdout.encoding or "").lower().replace("-", "") != "utf8":
        sys.stdout.reconfigure(errors="replace")  # never crash printing a character the terminal lacks
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")  # never crash reading a byte that is not UTF-8: it becomes U+FFFD
    try:
        if not os.path.isdir(args.model):  # (owl.load_model checks the rest before reading weights)
            raise UsageError(f"--model {args.model}: no such folder")
        if args.adapter:  # fail before loading the model, too
            check_adapter(args.adapter, args.model, args.ignore_adapter_base)
        if args.context is not None:  # fail before loading the model, too
            whole = load_config(args.model).text_config.max_position_embeddings
            if args.context > whole:
                raise UsageError(f"--context {args.context}: the model has {whole} positions")
        images = [owl.load_image(p) for p in args.image]  # raises owl.ImageError naming the file
        if args.raw_prompt is not None:
            try:
                check_image_count(args.raw_prompt.count(owl.IMAGE), len(images))
            except ValueError as e:
                raise UsageError(f"--raw-prompt: {e} (one --image per {owl.IMAGE})") from None
        model, tok = load(args.model, device=args.device, dtype=args.dtype, adapter=args.adapter,
                          ignore_adapter_base=args.ignore_adapter_base, quantize_to=args.quantize)
        session = ChatSession(model, tok, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed, compile=args.compile,
                              context=args.context)
        if args.prompt is not None or args.raw_prompt is not None:
            return one_shot(session, args, images)
        return interactive(session, args, images)
    except (owl.WeightsError, owl.ImageError, ChatError, UsageError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
