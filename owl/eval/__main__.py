"""Evaluate a model folder on the paper's OwlEval or on a multiple-choice benchmark.

    python -m owl.eval owleval OWLEVAL_DIR --model DIR --out answers.jsonl [--html page.html]
    python -m owl.eval choices mmbench.tsv --model DIR --out preds.jsonl [--list-options --circular]

OwlEval (owleval.py) answers the 82 questions greedily with chat's session engine and writes the
official answer format and a rating page; multiple choice (choices.py) scores each option's
log-likelihood with owl.score_choices. Everything the run reads or writes is checked before the
model loads.
"""
import argparse
import os
import sys

from tqdm import tqdm

from ..chat.load import UsageError, add_model_options, check_adapter, load
from ..chat.session import ChatError, ChatSession
from ..fileio import check_writable
from ..image import ImageError
from ..weights import WeightsError
from . import choices, owleval
from .choices import ChoicesError
from .owleval import OwlEvalError


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, f"error: {message} (python -m owl.eval --help lists the options)\n")


def parse_args(argv=None):
    p = Parser(prog="python -m owl.eval", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="benchmark", required=True, parser_class=Parser)
    o = sub.add_parser("owleval", help="the paper's OwlEval: open-ended answers and a rating page")
    o.add_argument("questions", metavar="OWLEVAL_DIR", help="questions.jsonl, cases/ (the images), answer/ (others')")
    o.add_argument("--out", required=True, metavar="FILE", help="our answers, one JSON line per question")
    o.add_argument("--html", metavar="FILE", help="a rating page with our and the other models' answers")
    o.add_argument("--model-id", help="the model_id written (default: the model folder's name)")
    o.add_argument("--max-new-tokens", type=int, default=512)
    o.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs on a GPU)")
    c = sub.add_parser("choices", help="multiple choice by log-likelihood (MMBench, SEED-Bench, ScienceQA, MME)")
    c.add_argument("questions", metavar="FILE", help="a .jsonl of questions or an MMBench .tsv (owl/eval/choices.py)")
    c.add_argument("--out", required=True, metavar="FILE", help="the predictions, one JSON line per question")
    c.add_argument("--image-root", metavar="DIR", help="where a JSONL file's image paths resolve (default: its "
                   "folder); an image outside it is refused")
    c.add_argument("--list-options", action="store_true", help="MMBench's prompt, the lettered options in it; "
                   "the letters are scored")
    c.add_argument("--circular", action="store_true", help="with --list-options: MMBench's CircularEval (every "
                   "rotation of the options right)")
    c.add_argument("--normalize", choices=["sum", "mean"], default="sum", help="a choice's log-likelihood summed "
                   "or per token")
    for q in (o, c):
        add_model_options(q)
    a = p.parse_args(argv)
    if a.benchmark == "choices" and a.circular and not a.list_options:
        p.error("--circular needs --list-options: without the options in the prompt their order changes nothing")
    if a.benchmark == "owleval" and a.max_new_tokens < 1:
        p.error("need --max-new-tokens >= 1")
    return a


def run_owleval(args, model, tok, plan, warn):
    questions, model_id, (done, kept), others = plan
    session = ChatSession(model, tok, max_new_tokens=args.max_new_tokens, compile=args.compile)  # greedy
    if done:
        warn(f"{len(done)} of {len(questions)} questions are answered in {args.out} already: answering the rest")
    try:
        with tqdm(total=len(questions), desc="OwlEval", unit="question", file=sys.stderr) as bar:
            records = owleval.run(session, args.questions, questions, model_id, done=done,
                                  on_answer=lambda r: owleval.append_jsonl(r, args.out), progress=bar.update,
                                  warn=lambda m: bar.write(m, file=sys.stderr))
    except KeyboardInterrupt:
        warn(f"\ninterrupted: the answers so far are in {args.out}; the same command answers the rest")
        return 130
    owleval.write_jsonl(kept + records, args.out)  # the same answers, in question order, after other folders' ones
    warn(f"wrote {len(records)} answers to {args.out}")
    if args.html:
        owleval.write_html(records, questions, others, args.questions, args.html, model_id)
        warn(f"wrote the rating page {args.html}")
    return 0


def run_choices(args, model, tok, plan, warn):
    questions, notes = plan
    for n in notes:  # (CircularEval copies skipped)
        warn(n)
    with tqdm(total=len(questions), desc="multiple choice", unit="question", file=sys.stderr) as bar:
        skipped = []
        try:
            records = choices.run(model, tok, questions, args.out, circular=args.circular,
                                  list_options=args.list_options,
                                  normalize=args.normalize, progress=bar.update,
                                  on_skip=lambda m: (skipped.append(m), bar.write(m, file=sys.stderr)))
        except choices.Interrupted as e:
            warn(f"\ninterrupted: the {len(e.records)} predictions so far are in {args.out}")
            return 130
    warn(f"wrote {len(records)} predictions to {args.out}"
         + (f" ({len(skipped)} question(s) skipped, named above)" if skipped else ""))
    print(choices.summary(records, circular=args.circular, source=args.questions))
    return 0


def check_outputs(args):
    """No output may replace an input or another output (compared by real path), before any work."""
    error = ChoicesError if args.benchmark == "choices" else OwlEvalError
    inputs = {"the questions file": args.questions}
    if args.benchmark == "owleval":
        inputs = {"OWLEVAL_DIR": args.questions, "its questions.jsonl": os.path.join(args.questions, "questions.jsonl")}
    outputs = {"--out": args.out, **({"--html": args.html} if getattr(args, "html", None) else {})}
    seen = {os.path.realpath(p): what for what, p in inputs.items()}
    for flag, path in outputs.items():
        real = os.path.realpath(path)
        if real in seen:
            raise error(f"{flag} {path}: is {seen[real]}, which this run reads or writes: choose another file")
        cases = os.path.realpath(os.path.join(args.questions, "cases"))
        if args.benchmark == "owleval" and os.path.commonpath([real, cases]) == cases:
            raise error(f"{flag} {path}: is inside OWLEVAL_DIR/cases, the images this run reads: choose another file")
        seen[real] = flag


def plan_of(args, warn):
    """What the run needs from its files, read and checked before the model loads."""
    check_outputs(args)
    if args.benchmark == "choices":
        plan = choices.read_questions(args.questions, args.image_root)
        choices.check_out(args.out)
        return plan
    questions = owleval.read_questions(args.questions)
    model_id = args.model_id or os.path.basename(os.path.normpath(args.model))
    if args.html:
        check_writable(args.html, "--html", OwlEvalError)
        if os.path.isfile(args.html) and not owleval.is_our_page(args.html):
            raise OwlEvalError(f"--html {args.html}: exists and is not an OwlEval page of ours: choose another file")
    done = owleval.answered(args.out, model_id, questions, warn=warn)
    return questions, model_id, done, owleval.read_answers(args.questions)


def main(argv=None):
    args = parse_args(argv)
    warn = lambda m: print(m, file=sys.stderr)  # noqa: E731
    try:
        if not os.path.isdir(args.model):
            raise UsageError(f"--model {args.model}: no such folder")
        plan = plan_of(args, warn)
        if args.adapter:
            check_adapter(args.adapter, args.model, args.ignore_adapter_base)
        model, tok = load(args.model, device=args.device, dtype=args.dtype, adapter=args.adapter,
                          ignore_adapter_base=args.ignore_adapter_base, quantize_to=args.quantize)
        run = run_owleval if args.benchmark == "owleval" else run_choices
        return run(args, model, tok, plan, warn)
    except (WeightsError, ImageError, OwlEvalError, ChoicesError, ChatError, UsageError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
