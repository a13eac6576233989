"""python -m owl.demo.tables [--check]: the demo's tables quoted in README.md and tutorial 5, written from
the stored report.json of named runs (one folder per run in bench/demo_runs/, one column per run), between the
marker comments below, so no number is typed by hand and none drifts unseen (tests/test_demo_report.py).

A run is stored by copying its OUT/report.json into a folder of bench/demo_runs/ named for it (bench/RESULTS.md). With
--check nothing is written: the exit status is 1 when a quoted table differs from what this would write.
"""
import argparse
import glob
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNS = os.path.join(ROOT, "bench", "demo_runs")
QUOTED = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "tutorials", "5_two_stage_training.ipynb")]
BEGIN, END = "<!-- demo-table: written by python -m owl.demo.tables -->", "<!-- /demo-table -->"
ROWS = (("both", "both stages (the method)"), ("stage2_only", "stage 2 only (no multimodal pretraining)"),
        ("frozen_vit", "both, ViT frozen in stage 1 (LLaVA, MiniGPT-4)"),
        ("stage1_only", "stage 1 only (no instruction tuning)"))


def load_runs(folder=RUNS):
    """NAME -> report.json of every stored run, in name order."""
    runs = {}
    for path in sorted(glob.glob(os.path.join(folder, "*", "report.json"))):
        with open(path) as f:
            runs[os.path.basename(os.path.dirname(path))] = json.load(f)
    return runs


def commit_of(report):
    c = report.get("commit", "unknown")
    return "unknown" if c == "unknown" else c["sha"][:7] + (" (uncommitted changes)" if c["dirty"] else "")


def table(runs):
    """The Markdown table: a row per arm, a column per run; in brackets the arm's paired 95% interval
    against both stages, in points; then the ceiling, the time and the commit that made each run."""
    names = list(runs)

    def cell(r, arm):
        a = r["ablation"].get(arm)
        if a is None:
            return "-"
        if arm == "both":
            return f"**{100 * a['accuracy']:.1f}%**"
        lo, hi = a["ci95_vs_both"]
        return f"{100 * a['accuracy']:.1f}% ({100 * lo:+.0f}, {100 * hi:+.0f})"
    head = [f"world seed {r['config']['seed']} (`{n}`)" for n, r in runs.items()]
    lines = ["| | " + " | ".join(head) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(cell(r, arm) for r in runs.values()) + " |" for arm, label in ROWS]
    lines += ["| the stand-in LLM reading the notes (the ceiling) | "
              + " | ".join(f"{100 * r['llm_reads_notes']['accuracy']:.1f}%" for r in runs.values()) + " |",
              "| held-out questions | " + " | ".join(str(r["n_questions"]) for r in runs.values()) + " |",
              "| demo time (its laps) | " + " | ".join(f"{r['times_s']['total'] / 60:.1f} min" for r in runs.values()) + " |",
              "| the commit that made it | " + " | ".join(commit_of(r) for r in runs.values()) + " |"]
    return "\n".join(lines)


def render(text, block):
    """text with what lies between the markers replaced by block; ValueError without the markers."""
    pattern = re.compile(re.escape(BEGIN) + r"\n.*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"no {BEGIN} ... {END} markers")
    return pattern.sub(lambda m: f"{BEGIN}\n{block}\n{END}", text)


def rewrite(path, block):
    """The file's new text: a notebook's markdown cells holding the markers, or the whole of a text file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not path.endswith(".ipynb"):
        return text, render(text, block)
    nb = json.loads(text)
    found = False
    for c in nb["cells"]:
        src = "".join(c["source"])
        if c["cell_type"] == "markdown" and BEGIN in src:
            c["source"] = render(src, block).splitlines(keepends=True)
            found = True
    if not found:
        raise ValueError(f"{path}: no {BEGIN} ... {END} markers")
    return text, json.dumps(nb, indent=1) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m owl.demo.tables", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a quoted table differs")
    a = p.parse_args(argv)
    runs = load_runs()
    if not runs:
        print(f"error: no stored runs in {RUNS}", file=sys.stderr)
        return 1
    block, stale = table(runs), []
    for path in QUOTED:
        old, new = rewrite(path, block)
        if old != new:
            stale.append(os.path.relpath(path, ROOT))
            if not a.check:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(new)
    verb = "differ" if a.check else "rewritten"
    print(f"{verb}: {', '.join(stale) or 'none'} (from {', '.join(runs)})")
    return 1 if a.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
