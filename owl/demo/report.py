"""The demo's report (run.py): OUT/report.json, OUT/report.md, OUT/loss.png and OUT/samples/.

report.json: {"accuracy", "per_type", "ablation": {"both" | "stage1_only" | "stage2_only": {"accuracy",
"per_type", "n"}}, "times_s", "config", "samples"}. matplotlib is a tutorial/dev dependency, not a
runtime one: without it the PNG is skipped and report.md says so.
"""
import json
import os
import shutil
from dataclasses import asdict

from .world import QUESTION_TYPES

ROWS = (("stage1_only", "stage 1 only (no instruction tuning)"),
        ("stage2_only", "stage 2 only (no multimodal pretraining)"),
        ("both", "both stages (the method)"))


def read_metrics(path):
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(out, curves, file="loss.png"):
    """One panel per run: training loss per step (and the held-out eval loss where logged).
    Returns the PNG's name, or None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.2), squeeze=False)
    for ax, (title, rows) in zip(axes[0], curves.items()):
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1, label="train")
        ev = [r for r in rows if "eval_loss" in r]
        if ev:
            ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", ms=3, label="held-out")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("loss per target token")
    fig.tight_layout()
    fig.savefig(os.path.join(out, file), dpi=90)
    plt.close(fig)
    return file


def loss_curves(out, runs):
    curves = {"LLM pretraining (stand-in LLaMA)": read_metrics(os.path.join(out, "llm", "metrics.jsonl")),
              "ViT pretraining (stand-in CLIP)": read_metrics(os.path.join(out, "clip", "metrics.jsonl")),
              "stage 1: ViT + abstractor": read_metrics(os.path.join(out, "stage1", "metrics.jsonl")),
              "stage 2: LoRA + abstractor": read_metrics(os.path.join(out, "stage2", "metrics.jsonl"))}
    if "stage2_only" in runs:
        curves["stage 2 only (unaligned start)"] = read_metrics(os.path.join(out, "stage2_only", "metrics.jsonl"))
    return {k: v for k, v in curves.items() if v}


def copy_samples(out, answers, n=8):
    """A few held-out questions with their images copied to OUT/samples/, one per question type first."""
    os.makedirs(os.path.join(out, "samples"), exist_ok=True)
    picked, seen = [], set()
    for a in answers:
        if a["type"] not in seen:
            picked.append(a)
            seen.add(a["type"])
    samples = []
    for i, a in enumerate(picked[:n]):
        names = []
        for j, img in enumerate(a["images"]):
            name = f"samples/{i}_{j}.png"
            shutil.copy(os.path.join(out, "world", img), os.path.join(out, name))
            names.append(name)
        samples.append({"type": a["type"], "images": names, "turns": a["turns"], "answer": a["answer"],
                        "prediction": a["prediction"], "correct": a["correct"]})
    return samples


def pct(x):
    return f"{100 * x:.1f}%"


def write_report(out, d, results, runs, times):
    results = dict(results)
    ceiling = results.pop("llm_reads_notes", None)  # the stand-in LLM given the notes in words
    both = results["both"]
    samples = copy_samples(out, both["answers"])
    png = plot_losses(out, loss_curves(out, runs))
    report = {"accuracy": both["accuracy"], "per_type": both["per_type"], "n_questions": both["n"],
              "ablation": {k: {"accuracy": r["accuracy"], "per_type": r["per_type"], "n": r["n"]}
                           for k, r in results.items()},
              "times_s": dict(times, total=round(sum(times.values()), 1)), "config": asdict(d),
              "llm_reads_notes": ceiling and {k: ceiling[k] for k in ("accuracy", "per_type", "n")},
              "checkpoints": runs, "samples": samples}
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    for name, r in results.items():  # every answer, for whoever wants to look closer
        with open(os.path.join(out, f"answers_{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(a) + "\n" for a in r["answers"])

    types = [t for t in QUESTION_TYPES if t in both["per_type"]]
    md = ["# mPLUG-Owl demo: a tiny model trained end to end on a synthetic world", "",
          f"Held-out accuracy of the two-stage model: **{pct(both['accuracy'])}** "
          f"({both['n']} questions on {d.n_test} held-out images; greedy decoding, exact match after "
          f"lower-casing and stripping a final full stop).", "",
          "| question type | " + " | ".join(types) + " |", "|---" * (len(types) + 1) + "|",
          "| accuracy | " + " | ".join(pct(both["per_type"][t]) for t in types) + " |"]
    if ceiling:
        md += ["| the stand-in LLM reading the notes in words (no image) | "
               + " | ".join(pct(ceiling["per_type"].get(t, 0.0)) for t in types) + " |", "",
               f"The second row is a ceiling: the pretrained stand-in LLM alone ({pct(ceiling['accuracy'])}), "
               "given each image's notes as text where the visual tokens go."]
    md += [""]
    if len(results) > 1:
        md += ["## Ablation (the paper's Table 2, on this world)", "",
               "| variant | all | " + " | ".join(types) + " |", "|---" * (len(types) + 2) + "|"]
        md += [f"| {label} | {pct(results[k]['accuracy'])} | "
               + " | ".join(pct(results[k]["per_type"].get(t, 0.0)) for t in types) + " |"
               for k, label in ROWS if k in results]
        md += ["", "Stage 1 only is the aligned ViT and abstractor with the stand-in LLM as pretrained (it knows "
               "the chat template from its text about scenes), never instruction-tuned on images; stage 2 only "
               "starts from the stand-in CLIP ViT and a fresh abstractor that never saw a caption (stage 2 "
               "freezes the ViT, so only the abstractor and LoRA learn).", ""]
    md += ["## Loss curves", ""]
    md += [f"![loss curves]({png})", ""] if png else ["(matplotlib is not installed: no loss plot; the curves "
                                                       "are in */metrics.jsonl)", ""]
    md += ["## Samples", "", "| image(s) | question | expected | answer |", "|---|---|---|---|"]
    for s in samples:
        imgs = " ".join(f"![]({p})" for p in s["images"])
        q = " / ".join(t[1] for t in s["turns"])
        md.append(f"| {imgs} | {q} | {s['answer']} | {s['prediction'].strip()} {'✓' if s['correct'] else '✗'} |")
    md += ["", "## Time (seconds)", "", "| " + " | ".join(report["times_s"]) + " |",
           "|---" * len(report["times_s"]) + "|", "| " + " | ".join(str(v) for v in report["times_s"].values()) + " |",
           "", f"Chat with the model: `python chat.py --checkpoint {os.path.join(out, 'stage2')}`", ""]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(md))
    print("\n".join(md[:8]), flush=True)
