"""The demo report's pictures (report.py), drawn with Pillow, a runtime package, so a fresh clone makes them:
the arms per question type on one 0-100% scale (the paper's Table 2 as grouped bars), the loss curves
with a legend and axis titles, and the sample images upscaled so a Markdown viewer shows them."""
import math
import os

from PIL import Image, ImageDraw, ImageFont

# one colour per arm, the same in every picture; the method is the dark one
ARM_COLOURS = {"both": (31, 78, 160), "frozen_vit": (120, 170, 220), "stage2_only": (230, 140, 40),
               "stage1_only": (150, 150, 150)}
ARM_LABELS = {"both": "both stages (the method)", "frozen_vit": "both, ViT frozen in stage 1",
              "stage2_only": "stage 2 only", "stage1_only": "stage 1 only"}
TRAIN, HELD_OUT = (40, 90, 200), (230, 120, 20)


def font(size):
    """Pillow's scalable default font (Pillow >= 10.1), else its bitmap one."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def draw_arms(path, ablation, types, w=900, h=420):
    """Grouped bars: for each question type (and "all"), one bar per arm, accuracy on one 0-100% axis,
    with a legend. ablation: arm -> {"accuracy", "per_type"} as in report.json. Returns the image."""
    arms = [a for a in ARM_COLOURS if a in ablation][::-1]  # stage 1 only ... both, the method last
    groups = ["all"] + list(types)
    img = Image.new("RGB", (w, h), "white")
    draw, f, small = ImageDraw.Draw(img), font(14), font(12)
    left, right, top, bottom = 60, 10, 50, 60
    y = lambda v: h - bottom - (h - bottom - top) * v  # noqa: E731  v in 0..1
    for tick in range(0, 101, 20):
        draw.line([left, y(tick / 100), w - right, y(tick / 100)], fill=(225, 225, 225))
        draw.text((left - 6, y(tick / 100)), f"{tick}%", fill="black", font=small, anchor="rm")
    draw.line([left, top, left, h - bottom, w - right, h - bottom], fill="black")
    gw = (w - left - right) / len(groups)
    bw = gw * 0.8 / len(arms)
    for g, name in enumerate(groups):
        x0 = left + g * gw + gw * 0.1
        for k, arm in enumerate(arms):
            r = ablation[arm]
            v = r["accuracy"] if name == "all" else r["per_type"].get(name, 0.0)
            draw.rectangle([x0 + k * bw, y(v), x0 + (k + 1) * bw - 2, h - bottom], fill=ARM_COLOURS[arm])
        draw.text((left + (g + 0.5) * gw, h - bottom + 6), name, fill="black", font=small, anchor="mt")
    draw.text((left + (w - left - right) / 2, h - 20), "question type", fill="black", font=f, anchor="mm")
    draw.text((8, top - 30), "held-out accuracy (%)", fill="black", font=f)
    lx = left + 170
    for arm in arms[::-1]:  # legend, the method first
        draw.rectangle([lx, 12, lx + 12, 24], fill=ARM_COLOURS[arm])
        draw.text((lx + 16, 18), ARM_LABELS[arm], fill="black", font=small, anchor="lm")
        lx += 24 + draw.textlength(ARM_LABELS[arm], font=small)
    img.save(path)
    return img


def plot_losses(path, curves, w=360, h=260):
    """One panel per run, each titled: the training loss per step and the held-out loss where logged,
    on one log scale shared by every panel (so runs compare at a glance), with a legend, axis titles
    ("step", "loss") and four ticks on each axis."""
    img = Image.new("RGB", (w * len(curves), h + 24), "white")
    draw, f, small = ImageDraw.Draw(img), font(13), font(11)
    left, right, top, bottom = 52, 12, 44, 44
    runs = [[[(r["step"], r["loss"]) for r in rows], [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]]
            for rows in curves.values()]
    every = [p[1] for series in runs for line in series for p in line if p[1] > 0]
    lo, hi = math.log10(min(every)), math.log10(max(every))
    hi = max(hi, lo + 1e-3)
    for k, (title, series) in enumerate(zip(curves, runs)):
        x0 = k * w
        last = max(p[0] for line in series for p in line) or 1

        def xy(step, loss):
            return (x0 + left + (w - left - right) * step / last,
                    h - bottom - (h - bottom - top) * (math.log10(loss) - lo) / (hi - lo))
        draw.rectangle([x0 + left, top, x0 + w - right, h - bottom], outline="grey")
        draw.text((x0 + left, 6), title[:48], fill="black", font=f)
        for i in range(4):  # ticks: evenly spaced in log(loss) and in steps
            yv = lo + (hi - lo) * i / 3
            _, yy = xy(0, 10 ** yv)
            draw.text((x0 + left - 4, yy), f"{10 ** yv:.2g}", fill="black", font=small, anchor="rm")
            xx, _ = xy(last * i / 3, 10 ** lo)
            draw.text((xx, h - bottom + 4), f"{round(last * i / 3)}", fill="black", font=small, anchor="mt")
        draw.text((x0 + (w + left) / 2, h - bottom + 20), "step", fill="black", font=small, anchor="mt")
        draw.text((x0 + 2, top - 20), "loss (log scale)", fill="black", font=small)
        for line, colour in zip(series, (TRAIN, HELD_OUT)):
            line = [xy(*p) for p in line if p[1] > 0]
            if len(line) > 1:
                draw.line(line, fill=colour, width=1 if colour == TRAIN else 3)
    for i, (label, colour) in enumerate((("training loss", TRAIN), ("held-out loss", HELD_OUT))):
        draw.line([12 + 150 * i, h + 12, 36 + 150 * i, h + 12], fill=colour, width=3)
        draw.text((42 + 150 * i, h + 12), label, fill="black", font=small, anchor="lm")
    img.save(path)
    return img


def upscale(src, dst, size=224):
    """A world image enlarged nearest-neighbour (its pixels stay sharp squares) for the report."""
    Image.open(src).convert("RGB").resize((size, size), Image.NEAREST).save(dst)
    return os.path.basename(dst)
