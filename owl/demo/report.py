"""The demo's report (run.py): OUT/report.json, OUT/report.md, OUT/loss.png and OUT/samples/.

report.json: {"accuracy", "per_type", "n_questions", "llm_reads_notes", "ablation": {arm: {"accuracy",
"per_type", "n", "ci95_vs_both", "ci95_vs_both_per_type"}}, "vit_probes", "describe", "times_s", "config",
"checkpoints", "samples", "commit"}; arm is both, stage1_only, stage2_only or frozen_vit. With several training
seeds an arm's accuracies are the means over its seeds. "commit" is the code that made the run, taken as it
starts ({"sha", "dirty"}, or "unknown" outside a git checkout). report.md opens with the paper's point, one
sentence per claim with its interval, and the arms' picture (figures.py).
"""
import json
import math
import os
import subprocess
from dataclasses import asdict

import torch

from .figures import draw_arms, plot_losses, upscale
from .readout import MODELS
from .world import QUESTION_TYPES

ROWS = (("stage1_only", "stage 1 only (no instruction tuning)"),
        ("stage2_only", "stage 2 only (no multimodal pretraining)"),
        ("frozen_vit", "both, the ViT frozen in stage 1 (LLaVA, MiniGPT-4)"),
        ("both", "both stages (the method)"))


def correct_matrix(runs):
    """(seeds, questions) 0/1 of one arm's runs, the questions in test.json's order."""
    return torch.tensor([[float(a["correct"]) for a in r["answers"]] for r in runs], dtype=torch.float64)


def paired_ci(arm, both, n_boot=4000, seed=0):
    """95% paired bootstrap interval of accuracy(arm) - accuracy(both), both (seeds, questions): the
    questions are resampled, the same resample for the two arms, and each question's difference is
    averaged over the training seeds (seed i of the arm against seed i of both)."""
    diff = (arm - both).mean(0)  # (questions,)
    idx = torch.randint(0, len(diff), (n_boot, len(diff)), generator=torch.Generator().manual_seed(seed))
    boot = diff[idx].mean(1)
    return [round(torch.quantile(boot, q).item(), 4) for q in (0.025, 0.975)]


def summarise(runs, both_runs):
    """An arm's mean accuracy overall and per question type, and its intervals against both."""
    types = [a["type"] for a in runs[0]["answers"]]
    m, b = correct_matrix(runs), correct_matrix(both_runs)
    per_type, ci_type = {}, {}
    for t in dict.fromkeys(types):
        keep = torch.tensor([x == t for x in types])
        per_type[t] = m[:, keep].mean().item()
        ci_type[t] = paired_ci(m[:, keep], b[:, keep])
    return {"accuracy": m.mean().item(), "per_type": per_type, "n": len(types), "seeds": len(runs),
            "ci95_vs_both": paired_ci(m, b), "ci95_vs_both_per_type": ci_type}


def read_metrics(path):
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def loss_curves(out, runs):
    curves = {"LLM pretraining (stand-in LLaMA)": read_metrics(os.path.join(out, "llm", "metrics.jsonl")),
              "ViT pretraining (stand-in CLIP)": read_metrics(os.path.join(out, "clip", "metrics.jsonl")),
              "stage 1: ViT + abstractor": read_metrics(os.path.join(out, "stage1", "metrics.jsonl")),
              "stage 2: LoRA + abstractor": read_metrics(os.path.join(out, "stage2", "metrics.jsonl"))}
    for arm, title in (("stage2_only", "stage 2 only (unaligned start)"), ("frozen_vit", "stage 1, ViT frozen")):
        if arm in runs:
            sub = "stage1" if arm == "frozen_vit" else ""
            curves[title] = read_metrics(os.path.join(out, arm, sub, "metrics.jsonl"))
    return {k: v for k, v in curves.items() if v}


# the paper's claims: both stages against each arm, in the words of report.md's first lines
CLAIMS = (("stage2_only", "stage 2 alone"), ("stage1_only", "stage 1 alone"),
          ("frozen_vit", "the recipe that freezes the ViT in stage 1 (LLaVA, MiniGPT-4)"))


def conclusions(ablation):
    """One sentence per claim: both stages minus the arm, in points, with its paired 95% interval
    (the interval of arm - both, negated); an interval that includes 0 shows nothing."""
    lines = []
    for arm, name in CLAIMS:
        if arm not in ablation:
            continue
        r = ablation[arm]
        gap = 100 * (ablation["both"]["accuracy"] - r["accuracy"]) + 0.0  # + 0.0: no "-0.0"
        lo, hi = -100 * r["ci95_vs_both"][1] + 0.0, -100 * r["ci95_vs_both"][0] + 0.0
        ci = f"(95% CI {lo:+.1f} to {hi:+.1f})"
        if lo > 0:
            lines.append(f"Both stages beat {name} by {gap:.1f} points {ci}.")
        elif hi < 0:
            lines.append(f"Both stages trail {name} by {-gap:.1f} points {ci}: the claim is contradicted here.")
        else:
            lines.append(f"Both stages against {name}: {gap:+.1f} points {ci}; the interval includes 0, "
                         "so the claim is not shown.")
    return lines


def git_commit(root=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))):
    """The checkout's HEAD and whether tracked files differ from it; "unknown" without git or a checkout."""
    try:
        git = lambda *a: subprocess.run(["git", "-C", root, *a], capture_output=True, text=True,  # noqa: E731
                                        timeout=10, check=True).stdout.strip()
        return {"sha": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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
            name = f"samples/{i}_{j}.png"  # enlarged to 224 px, nearest neighbour
            upscale(os.path.join(out, "world", img), os.path.join(out, name))
            names.append(name)
        samples.append({"type": a["type"], "images": names, "turns": a["turns"], "answer": a["answer"],
                        "prediction": a["prediction"], "correct": a["correct"]})
    return samples


def pct(x):
    return f"{100 * x:.1f}%"


def readout_md(readout, pictures):
    """report.md's section on what the visual tokens say: agreement per model, then the first images'
    tokens, word by word under the notes (pictures: those images, enlarged)."""
    have = [(k, label) for k, label, _ in MODELS if k in readout]
    kinds = list(next(iter(readout.values()))["per_kind"])
    md = ["## What the visual tokens say (each read as its nearest word in the LLM's embedding table)", "",
          "The stand-in LLM was pretrained with each image's notes in words where the visual tokens go; "
          "aligned visual tokens read as those words. Share of slots whose token reads as the notes' word "
          "(held-out images; content = size, colour, shape of each cell):", "",
          "| model | content | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 2) + "|"]
    md += [f"| {label} | {pct(readout[k]['content'])} | " + " | ".join(pct(readout[k]["per_kind"][x]) for x in kinds)
           + " |" for k, label in have]
    shown = [(k, label) for k, label in (("unaligned", "before stage 1"), ("stage1", "after stage 1"),
                                         ("both", "after stage 2")) if k in readout]
    for i, picture in enumerate(pictures):
        row = readout[shown[0][0]]["rows"][i]
        lines = [("the notes", row["notes"].split())] + [(label, readout[k]["rows"][i]["read"].split())
                                                        for k, label in shown]
        width = [max(len(w) for w in column) for column in zip(*(ws for _, ws in lines))]  # one word per slot
        pad = max(len(name) for name, _ in lines)
        md += ["", f"![{row['image']}]({picture})", "", "```"]
        md += [f"{name:<{pad}}  " + " ".join(w.ljust(n) for w, n in zip(ws, width)).rstrip() for name, ws in lines]
        md += ["```"]
    return md + [""]


def write_report(out, d, results, ceiling, probes, captions, runs, times, readout=None, commit=None):
    """results: arm -> one evaluate() per training seed; ceiling: the stand-in LLM reading the notes;
    probes: ViT -> linear-probe accuracies; captions: run.describe of both; runs: arm -> checkpoint per seed."""
    both = results["both"][0]  # seed 0: its answers are the samples and answers_*.jsonl
    samples = copy_samples(out, both["answers"])
    png = "loss.png"
    plot_losses(os.path.join(out, png), loss_curves(out, runs))
    ablation = {k: summarise(r, results["both"]) for k, r in results.items()}
    report = {"accuracy": ablation["both"]["accuracy"], "per_type": ablation["both"]["per_type"],
              "n_questions": both["n"], "ablation": ablation, "vit_probes": probes, "describe": captions,
              "times_s": dict(times, total=round(sum(times.values()), 1)), "config": asdict(d),
              "llm_reads_notes": {k: ceiling[k] for k in ("accuracy", "per_type", "n")},
              "readout": {k: {**{x: r[x] for x in ("content", "per_kind", "n")}, "rows": r["rows"][:3]}
                          for k, r in (readout or {}).items()},
              "checkpoints": {k: v[0] for k, v in runs.items()}, "checkpoints_per_seed": runs, "samples": samples,
              "commit": commit or git_commit()}
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    for name, r in results.items():  # every answer of seed 0, for whoever wants to look closer
        with open(os.path.join(out, f"answers_{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(a) + "\n" for a in r[0]["answers"])

    types = [t for t in QUESTION_TYPES if t in both["per_type"]]
    acc = ablation["both"]
    md = ["# mPLUG-Owl demo: a tiny model trained end to end on a synthetic world", ""]
    if len(results) > 1:
        draw_arms(os.path.join(out, "arms.png"), ablation, types)
        md += conclusions(ablation)
        md += ["", "![held-out accuracy per question type, each arm on one 0-100% scale](arms.png)", ""]
    else:
        extra = times.get("stage1", 0) + 2 * times.get("stage2", 0)  # one more stage 1, two more stage 2s
        md += [f"The paper's point (two stages beat either alone) needs `--ablation`: it also trains stage 1 "
               f"only, stage 2 only and the frozen-ViT control, with paired 95% intervals and a picture of "
               f"the arms, about {extra / 60:.0f} minutes more here (from this run's stage times).", ""]
    md += [
          f"Held-out accuracy of the two-stage model: **{pct(acc['accuracy'])}** "
          f"({both['n']} questions on {d.n_test} held-out images, world seed {d.seed}, "
          f"{d.seeds} training seed{'s' * (d.seeds > 1)}; greedy decoding, exact match after "
          f"lower-casing and stripping a final full stop).", "",
          "| question type | " + " | ".join(types) + " |", "|---" * (len(types) + 1) + "|",
          "| accuracy | " + " | ".join(pct(acc["per_type"][t]) for t in types) + " |",
          "| the stand-in LLM reading the notes in words (no image) | "
          + " | ".join(pct(ceiling["per_type"].get(t, 0.0)) for t in types) + " |", "",
          f"The second row is a ceiling: the pretrained stand-in LLM alone ({pct(ceiling['accuracy'])}), "
          "given each image's notes as text where the visual tokens go.", ""]
    if len(results) > 1:
        def cell(k, t=None):  # an arm's accuracy, and but for both its interval against both
            r = ablation[k]
            v = r["accuracy"] if t is None else r["per_type"][t]
            lo, hi = r["ci95_vs_both"] if t is None else r["ci95_vs_both_per_type"][t]
            return pct(v) if k == "both" else f"{pct(v)} ({100 * lo:+.0f}, {100 * hi:+.0f})"
        md += ["## Ablation (the paper's Table 2, on this world)", "",
               "In brackets: the 95% paired bootstrap interval of the arm minus both stages, in points.", "",
               "| variant | all | " + " | ".join(types) + " |", "|---" * (len(types) + 2) + "|"]
        md += [f"| {label} | {cell(k)} | " + " | ".join(cell(k, t) for t in types) + " |"
               for k, label in ROWS if k in ablation]
        md += ["", "Stage 1 only is the aligned ViT and abstractor with the stand-in LLM as pretrained (it knows "
               "the chat template from its text about scenes), never instruction-tuned on images; stage 2 only "
               "starts from the stand-in CLIP ViT and a fresh abstractor that never saw a caption (stage 2 "
               "freezes the ViT, so only the abstractor and LoRA learn); the frozen-ViT arm runs both stages "
               "but trains only the abstractor in stage 1, as LLaVA and MiniGPT-4 do.", ""]
    names = list(next(iter(probes.values())))
    md += ["## What the ViT's features hold (linear probes, held-out images)", "",
           "| ViT | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    md += [f"| {name} | " + " | ".join(pct(v) for v in p.values()) + " |" for name, p in probes.items()]
    if readout:
        pictures = [f"samples/readout_{i}.png" for i in range(min(3, len(next(iter(readout.values()))["rows"])))]
        for row, picture in zip(next(iter(readout.values()))["rows"], pictures):  # enlarged, as the samples
            upscale(os.path.join(out, "world", row["image"]), os.path.join(out, picture))
        md += readout_md(readout, pictures)
    md += ["", "## \"Describe this image.\" (chat's first question, held-out images)", "",
           f"{pct(captions['exact'])} of {captions['n']} answers are exactly the reference caption.", "",
           "| image | reference caption | answer |", "|---|---|---|"]
    md += [f"| {r['image']} | {r['caption']} | {r['answer']} |" for r in captions["answers"][:4]]
    md += ["", "## Loss curves", "", f"![loss curves]({png})", ""]
    md += ["## Samples", "", "| image(s) | question | expected | answer |", "|---|---|---|---|"]
    for s in samples:
        imgs = " ".join(f"![]({p})" for p in s["images"])
        q = " / ".join(t[1] for t in s["turns"])
        md.append(f"| {imgs} | {q} | {s['answer']} | {s['prediction'].strip()} {'✓' if s['correct'] else '✗'} |")
    md += ["", "## Time (seconds)", "", "| " + " | ".join(report["times_s"]) + " |",
           "|---" * len(report["times_s"]) + "|", "| " + " | ".join(str(v) for v in report["times_s"].values()) + " |",
           "", f"Chat with the model: `python chat.py --model {os.path.join(out, 'stage2')}`", ""]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(md))
    print("\n".join(md[:8]), flush=True)
