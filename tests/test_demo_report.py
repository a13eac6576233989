"""The demo report's lead and pictures (owl/demo/report.py, figures.py) and the quoted tables
(owl/demo/tables.py): the conclusion sentences say what the intervals say, every arm has its colour in
the picture, the tables in README.md and tutorial 5 are exactly what the script writes from the stored
runs, and report.json records the commit. No training here: the reduced run is tests/test_demo.py's."""
import json
import os
import random
import re

import numpy as np
import pytest
import torch

from owl.demo import figures, readout, report, shipped, tables
from owl.demo import world as w
from owl.demo.stand_ins import notes_ids
from owl.demo.world import QUESTION_TYPES
from owl.weights import load_llama, load_tokenizer


def arm(acc, ci, per_type=None):
    return {"accuracy": acc, "per_type": per_type or {t: acc for t in QUESTION_TYPES}, "ci95_vs_both": ci}


ABLATION = {"both": arm(0.734, [0.0, 0.0]), "stage2_only": arm(0.575, [-0.21, -0.11]),
            "stage1_only": arm(0.559, [-0.23, -0.12]), "frozen_vit": arm(0.70, [-0.09, 0.02])}


def test_conclusions_state_each_claim_with_its_interval():
    lines = report.conclusions(ABLATION)
    assert lines[0] == "Both stages beat stage 2 alone by 15.9 points (95% CI +11.0 to +21.0)."
    assert lines[1] == "Both stages beat stage 1 alone by 17.5 points (95% CI +12.0 to +23.0)."
    assert "+3.4 points (95% CI -2.0 to +9.0); the interval includes 0, so the claim is not shown" in lines[2]
    worse = dict(ABLATION, stage2_only=arm(0.80, [0.02, 0.11]))
    assert "trail stage 2 alone by 6.6 points" in report.conclusions(worse)[0]
    assert report.conclusions({"both": ABLATION["both"]}) == []
    same = report.conclusions(dict(ABLATION, frozen_vit=arm(0.734, [0.0, 0.0])))[2]
    assert "+0.0 points (95% CI +0.0 to +0.0); the interval includes 0" in same and "-0.0" not in same


def test_arms_picture_has_every_arm_in_its_colour(tmp_path):
    types = list(QUESTION_TYPES)
    img = figures.draw_arms(str(tmp_path / "arms.png"), ABLATION, types)
    assert img.size == (900, 420) and os.path.isfile(tmp_path / "arms.png")
    colours = {c for _, c in img.getcolors(1 << 16)}
    assert all(figures.ARM_COLOURS[a] in colours for a in ABLATION)
    # on one scale: a taller bar for a higher accuracy (the tallest column of each arm's colour)
    pixels = np.asarray(img)
    height = lambda colour: (pixels == colour).all(-1).sum(0).max()  # noqa: E731
    assert height(figures.ARM_COLOURS["both"]) > height(figures.ARM_COLOURS["stage2_only"])
    only = figures.draw_arms(str(tmp_path / "one.png"), {"both": ABLATION["both"]}, types)
    assert figures.ARM_COLOURS["stage2_only"] not in {c for _, c in only.getcolors(1 << 16)}


def test_loss_plot_has_a_panel_per_run_and_a_legend(tmp_path):
    rows = [{"step": s, "loss": 5 / (s + 1), **({"eval_loss": 6 / (s + 1)} if s % 5 == 0 else {})} for s in range(50)]
    img = figures.plot_losses(str(tmp_path / "loss.png"), {"a": rows, "b": rows[:20]}, w=360, h=260)
    assert img.size == (720, 284)
    colours = {c for _, c in img.getcolors(1 << 16)}
    assert figures.TRAIN in colours and figures.HELD_OUT in colours
    # the legend's two swatches sit below the panels
    assert img.getpixel((20, 272)) == figures.TRAIN and img.getpixel((170, 272)) == figures.HELD_OUT


def test_samples_are_upscaled_nearest_neighbour(tmp_path):
    from PIL import Image
    Image.new("RGB", (56, 56), (10, 200, 30)).save(tmp_path / "a.png")
    figures.upscale(str(tmp_path / "a.png"), str(tmp_path / "b.png"))
    big = Image.open(tmp_path / "b.png")
    assert big.size == (224, 224) and big.getcolors() == [(224 * 224, (10, 200, 30))]


def test_commit_is_recorded_or_unknown(tmp_path):
    c = report.git_commit()
    assert c == "unknown" or (re.fullmatch(r"[0-9a-f]{40}", c["sha"]) and isinstance(c["dirty"], bool))
    assert report.git_commit(str(tmp_path)) == "unknown"  # not a checkout: no crash
    assert report.git_commit(str(tmp_path / "missing")) == "unknown"


def fake_report(seed, both):
    return {"ablation": {"both": arm(both, [0, 0]), "stage2_only": arm(both - 0.1, [-0.15, -0.05])},
            "config": {"seed": seed}, "llm_reads_notes": {"accuracy": 0.77}, "n_questions": 320,
            "times_s": {"total": 600.0}, "commit": {"sha": "a" * 40, "dirty": False}}


def test_tables_round_trip(tmp_path):
    for name, seed, both in (("seed0", 0, 0.734), ("seed1", 1, 0.716)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(fake_report(seed, both)))
    runs = tables.load_runs(str(tmp_path))
    block = tables.table(runs)
    assert list(runs) == ["seed0", "seed1"] and "| both stages (the method) | **73.4%** | **71.6%** |" in block
    assert "| stage 2 only (no multimodal pretraining) | 63.4% (-15, -5) | 61.6% (-15, -5) |" in block
    assert "| stage 1 only (no instruction tuning) | - | - |" in block and "aaaaaaa" in block
    text = f"before\n{tables.BEGIN}\nold table\n{tables.END}\nafter\n"
    new = tables.render(text, block)
    assert new == f"before\n{tables.BEGIN}\n{block}\n{tables.END}\nafter\n" and tables.render(new, block) == new
    with pytest.raises(ValueError):
        tables.render("no markers", block)


def test_quoted_tables_are_what_the_script_writes():
    """README.md's and tutorial 5's demo tables come from bench/demo_runs/*/report.json, unedited:
    after a change, `python -m owl.demo.tables` rewrites them."""
    runs = tables.load_runs()
    assert runs, "no stored runs in bench/demo_runs"
    block = tables.table(runs)
    for path in tables.QUOTED:
        old, new = tables.rewrite(path, block)
        assert old == new, f"{path}: run python -m owl.demo.tables"
    assert all(r.get("commit", "unknown") != "unknown" for r in runs.values())


def test_plain_report_says_what_ablation_adds(tmp_path):
    """Without --ablation there is no claim to state: report.md's first line says what --ablation adds
    and how long it takes here (one more stage 1 and two more stage 2s, from this run's laps)."""
    from PIL import Image
    from owl.demo.run import DemoConfig
    (tmp_path / "world" / "images").mkdir(parents=True)
    Image.new("RGB", (56, 56), "red").save(tmp_path / "world" / "images" / "a.png")
    (tmp_path / "stage1").mkdir()
    (tmp_path / "stage1" / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3 - s / 10}) + "\n"
                                                               for s in range(10)))
    answers = [{"type": t, "images": ["images/a.png"], "turns": [["human", "q?"]], "answer": "a",
                "prediction": "a", "correct": i % 2 == 0} for i, t in enumerate(QUESTION_TYPES)]
    both = {"answers": answers, "n": len(answers), "per_type": {t: 1.0 for t in QUESTION_TYPES}}
    report.write_report(str(tmp_path), DemoConfig(), {"both": [both]},
                        {"accuracy": 0.7, "per_type": {}, "n": len(answers)}, {"ViT": {"p": 0.5}},
                        {"exact": 0.0, "n": 0, "answers": []}, {"both": ["x"]},
                        {"stage1": 60.0, "stage2": 90.0})
    lines = (tmp_path / "report.md").read_text().splitlines()
    assert lines[2].startswith("The paper's point (two stages beat either alone) needs `--ablation`")
    assert "about 4 minutes more here" in lines[2] and not (tmp_path / "arms.png").exists()
    assert Image.open(tmp_path / "samples" / "0_0.png").size == (224, 224)


def test_readout_reads_the_notes_own_embeddings_as_the_notes(monkeypatch):
    """Visual tokens that are the notes' input embeddings (scaled and slightly perturbed: the readout is
    by cosine) read back as the notes, word for word; a token moved to another word's embedding is read
    as that word and costs exactly its slot."""
    llm = os.path.join(shipped.PRETRAINED, "llm")
    lm, tok = load_llama(llm), load_tokenizer(llm, 21)
    rng = random.Random(0)
    notes = [w.notes(w.random_scene(rng)) for _ in range(4)]
    want = torch.tensor([notes_ids(tok, n) for n in notes])  # (4, 21)
    table = lm.model.embed_tokens.weight.detach()
    noise = torch.randn(4, 21, table.shape[1], generator=torch.Generator().manual_seed(0))
    tokens = 3.0 * table[want] + 1e-3 * noise  # (4, 21, C)
    other = "yellow" if notes[1].split()[3] != "yellow" else "red"  # slot 3: the top left cell's colour
    tokens[1, 3] = table[tok.sp.piece_to_id("\u2581" + other)]
    model = type("M", (), {})()
    model.language_model = lm
    monkeypatch.setattr(readout, "visual_tokens", lambda m, images: tokens)
    got = readout.nearest_words(model, tok, [None] * 4)
    r = readout.score(tok, got, want, [f"{i}.png" for i in range(4)])
    assert [row["read"] for row in r["rows"]][0] == notes[0] + " ."
    assert r["rows"][1]["read"] != notes[1] + " ."
    assert r["content"] == pytest.approx(1 - 1 / 48) and r["per_kind"]["colour"] == pytest.approx(1 - 1 / 16)
    assert r["per_kind"]["cell name"] == r["per_kind"]["size"] == r["per_kind"]["shape"] == r["per_kind"]["end"] == 1.0


def test_readout_words_are_one_printable_word_per_slot():
    """Pieces that are empty without their "▁" or hold a newline ("?\\n", "\\n" in the shipped tokenizer) are
    still one word each, so the notes and every model's reading line up slot by slot in report.md (a
    seed-0 report once crashed on a "\\n" piece)."""
    llm = os.path.join(shipped.PRETRAINED, "llm")
    tok = load_tokenizer(llm, 21)
    odd = [tok.sp.piece_to_id(p) for p in ("?\n", ".\n", "\n", "\u2581")]
    assert tok.sp.unk_id() not in odd
    want = torch.tensor([notes_ids(tok, w.notes(w.random_scene(random.Random(1))))])  # (1, 21)
    got = want.clone()
    got[0, :4] = torch.tensor(odd)
    r = readout.score(tok, got, want, ["0.png"])
    read = r["rows"][0]["read"].split(" ")
    assert len(read) == 21 and all(x and not any(c.isspace() for c in x) for x in read)
    assert read[:4] == ["?_", "._", "_", "_"]
