"""Talk to mPLUG-Owl in the terminal (paper, "Qualitative Analysis": multi-turn dialogue, several
images, scene text), answer one prompt for a script, or run the OwlEval questions.

    python chat.py --checkpoint DIR                                  # interactive
    python chat.py --checkpoint DIR --image a.jpg --prompt "What is funny here?"
    python chat.py --checkpoint DIR --owleval OWLEVAL_DIR --out answers.jsonl [--html report.html]
    python chat.py --checkpoint DIR --multiple-choice mmbench.tsv --out preds.jsonl [--list-options --circular]

The conversation follows the official template; the KV cache is kept between turns, so a new turn
runs only its new tokens (owl/chat/session.py). Sampling is greedy unless --temperature > 0.
"""
import argparse
import contextlib
import math
import os
import signal
import sys

import torch
from tqdm import tqdm

import owl
from owl.chat import choices, owleval
from owl.chat.choices import ChoicesError
from owl.chat.owleval import OwlEvalError
from owl.chat.session import ChatError, ChatSession, format_stats
from owl.lora import adapter_files, check_adapter_base, read_adapter_meta
from owl.quant import quantize_int8
from owl.tokenizer import check_image_count, clean_text

HELP = """commands:
  /image PATH   attach an image to the next question (repeatable)
  /reset        start a new conversation
  /history      show the conversation and how much of the context window it uses
  /help         this help
  /quit         leave (Ctrl-D too); Ctrl-C while the model answers stops the answer"""


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, f"error: {message} (chat.py --help lists the options)\n")


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0], epilog="interactive " + HELP,
               formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="model folder in the official layout (config.json, "
                   "model.safetensors, tokenizer.model)")
    p.add_argument("--device", default="auto", help="cuda, mps or cpu (default: the first available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="default: bf16 on GPUs that support it, fp16 on other GPUs, fp32 on cpu")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k cut")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="makes sampling repeatable")
    p.add_argument("--adapter", metavar="FILE", help="a stage-2 adapter.safetensors written by train.py (adapter.json beside it)")
    p.add_argument("--ignore-adapter-base", action="store_true",
                   help="apply --adapter although adapter.json says it was trained on another base model")
    p.add_argument("--int8", action="store_true", help="int8 weights for the LLM's linear layers (owl/quant.py)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs on a GPU; "
                   "the first answer waits for it to compile)")
    p.add_argument("--stats", action="store_true", help="after each answer: time to first token, tokens/s")
    p.add_argument("--prompt", metavar="TEXT", help="one-shot: answer this question ('-' reads it from stdin) and exit")
    p.add_argument("--raw-prompt", metavar="TEXT", help="one-shot: a complete prompt in the official template, verbatim")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image for the prompt (repeatable; interactive: attached to the first question)")
    p.add_argument("--owleval", metavar="DIR", help="answer the OwlEval questions in DIR")
    p.add_argument("--multiple-choice", metavar="FILE", help="score the options of each question in a .jsonl or "
                   "MMBench .tsv (owl/chat/choices.py)")
    p.add_argument("--list-options", action="store_true", help="with --multiple-choice: MMBench's prompt, the "
                   "lettered options in it; the letters are scored")
    p.add_argument("--circular", action="store_true", help="with --list-options: MMBench's CircularEval (every "
                   "rotation of the options right)")
    p.add_argument("--normalize", choices=["sum", "mean"], default="sum", help="with --multiple-choice: a choice's "
                   "log-likelihood summed or per token")
    p.add_argument("--out", metavar="FILE", help="with --owleval or --multiple-choice: one JSON line per question")
    p.add_argument("--html", metavar="FILE", help="with --owleval: a rating page with our and the other models' answers")
    p.add_argument("--model-id", help="with --owleval: the model_id written (default: the checkpoint's name)")
    a = p.parse_args(argv)
    if a.prompt is not None and a.raw_prompt is not None:
        p.error("--prompt and --raw-prompt exclude each other")
    if a.owleval and (a.prompt is not None or a.raw_prompt is not None or a.image):
        p.error("--owleval takes no --prompt, --raw-prompt or --image")
    if a.owleval and not a.out:
        p.error("--owleval needs --out FILE")
    if a.multiple_choice and (a.owleval or a.prompt is not None or a.raw_prompt is not None or a.image or not a.out):
        p.error("--multiple-choice needs --out FILE and takes no --owleval, --prompt, --raw-prompt or --image")
    if (a.list_options or a.circular or a.normalize != "sum") and not a.multiple_choice:
        p.error("--list-options, --circular and --normalize go with --multiple-choice")
    if a.circular and not a.list_options:
        p.error("--circular needs --list-options: without the options in the prompt their order changes nothing")
    if (a.out and not (a.owleval or a.multiple_choice)) or ((a.html or a.model_id) and not a.owleval):
        p.error("--out goes with --owleval or --multiple-choice; --html and --model-id with --owleval")
    if a.max_new_tokens < 1 or not 0 <= a.temperature < math.inf or a.top_k < 0 or not 0 < a.top_p <= 1:
        p.error("need --max-new-tokens >= 1, a finite --temperature >= 0, --top-k >= 0, 0 < --top-p <= 1")
    if a.seed is not None and not 0 <= a.seed < 2**64:
        p.error("--seed must be in [0, 2**64): a 64-bit generator seed")
    a.prompt, a.raw_prompt = (None if t is None else clean_text(t) for t in (a.prompt, a.raw_prompt))  # undecodable bytes
    return a


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device (use cuda, mps or cpu)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available on this machine")
    return dev


def pick_dtype(name, device):
    if name != "auto":
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if device.type == "mps" else torch.float32


def load(args):
    """(model, tokenizer), with a progress bar over the weights on stderr."""
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    model, tok = owl.load_model(args.checkpoint, device=device, dtype=dtype, progress=True)
    if args.adapter:
        try:
            owl.apply_adapter(model, args.adapter)
        except (KeyError, ValueError, OSError) as e:
            if isinstance(e, owl.CheckpointError):
                raise
            raise owl.CheckpointError(f"{args.adapter}: cannot apply the adapter ({e!r})") from None
    if args.int8:
        quantize_int8(model)
    print(f"loaded {args.checkpoint} on {device} ({str(dtype).replace('torch.', '')})", file=sys.stderr)
    return model.eval(), tok


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
    print(f"mPLUG-Owl chat: {args.checkpoint}. Type a question; /help for commands.")
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


def owleval_plan(args):
    """(questions, model_id, the answers --out holds already): the folder, --out and --html are
    checked here, before the model is loaded and before the first question."""
    questions = owleval.read_questions(args.owleval)
    model_id = args.model_id or os.path.basename(os.path.normpath(args.checkpoint))
    if args.html:
        owleval.check_writable(args.html, "--html")
    return questions, model_id, owleval.answered(args.out, model_id, questions, warn=lambda m: print(m, file=sys.stderr))


def run_owleval(session, args, plan):
    questions, model_id, done = plan
    others = owleval.read_answers(args.owleval)
    if done:
        print(f"{len(done)} of {len(questions)} questions are answered in {args.out} already: answering the rest",
              file=sys.stderr)
    try:
        with tqdm(total=len(questions), desc="OwlEval", unit="question", file=sys.stderr) as bar:
            records = owleval.run(session, args.owleval, questions, model_id, done=done,
                                  on_answer=lambda r: owleval.append_jsonl(r, args.out), progress=bar.update,
                                  warn=lambda m: bar.write(m, file=sys.stderr))
    except KeyboardInterrupt:
        print(f"\ninterrupted: the answers so far are in {args.out}; the same command answers the rest", file=sys.stderr)
        return 130
    owleval.write_jsonl(records, args.out)  # the same answers, in question order
    print(f"wrote {len(records)} answers to {args.out}", file=sys.stderr)
    if args.html:
        owleval.write_html(records, questions, others, args.owleval, args.html, model_id)
        print(f"wrote the rating page {args.html}", file=sys.stderr)
    return 0


def run_choices(model, tok, args, plan):
    questions, notes = plan
    print("".join(n + "\n" for n in notes), end="", file=sys.stderr)  # (CircularEval copies skipped)
    with tqdm(total=len(questions), desc="multiple choice", unit="question", file=sys.stderr) as bar:
        records = choices.run(model, tok, questions, args.out, circular=args.circular, list_options=args.list_options,
                              normalize=args.normalize, progress=bar.update)
    print(f"wrote {len(records)} predictions to {args.out}", file=sys.stderr)
    print(choices.summary(records, circular=args.circular, source=args.multiple_choice))
    return 0


def main(argv=None):
    args = parse_args(argv)
    if (sys.stdout.encoding or "").lower().replace("-", "") != "utf8":
        sys.stdout.reconfigure(errors="replace")  # never crash printing a character the terminal lacks
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")  # never crash reading a byte that is not UTF-8: it becomes U+FFFD
    try:
        if not os.path.isdir(args.checkpoint):  # (owl.load_model checks the rest before reading weights)
            raise UsageError(f"--checkpoint {args.checkpoint}: no such directory")
        plan = owleval_plan(args) if args.owleval else None  # checked before spending time on loading
        if args.multiple_choice:
            plan = choices.read_questions(args.multiple_choice)
            owleval.check_writable(args.out)
        if args.adapter:  # fail before loading the model, too
            adapter_files(args.adapter)
            read_adapter_meta(args.adapter) if args.ignore_adapter_base else check_adapter_base(args.adapter, args.checkpoint)
        images = [owl.load_image(p) for p in args.image]  # raises owl.ImageError naming the file
        if args.raw_prompt is not None:
            try:
                check_image_count(args.raw_prompt.count(owl.IMAGE), len(images))
            except ValueError as e:
                raise UsageError(f"--raw-prompt: {e} (one --image per {owl.IMAGE})") from None
        model, tok = load(args)
        session = ChatSession(model, tok, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed, compile=args.compile)
        if args.owleval:
            return run_owleval(session, args, plan)
        if args.multiple_choice:
            return run_choices(model, tok, args, plan)
        if args.prompt is not None or args.raw_prompt is not None:
            return one_shot(session, args, images)
        return interactive(session, args, images)
    except (owl.CheckpointError, owl.ImageError, OwlEvalError, ChoicesError, ChatError, UsageError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
