"""chat.py and its engine owl/chat/session.py: one-shot answers equal the reference greedy ids, an
interactive session and the OwlEval runner (python -m owl.eval owleval) equal from-scratch generation,
the KV cache is reused
across turns (counted), streaming handles byte-fallback characters, Ctrl-C stops an answer, and bad
input gives one line and a non-zero exit."""
import copy
import json
import os
import re
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import owl
import owl.chat.session as cs
from owl.eval.owleval import conversations
from owl.chat.session import ChatSession, StreamDecoder, find_stop
from tests.conftest import REF, ROOT

pytestmark = pytest.mark.usefixtures("one_thread")
CK = os.path.join(REF, "mplug_owl")
IMG = [os.path.join(REF, "images", f) for f in ("public_0.jpg", "public_1.png", "public_2.jpg")]
MINI = os.path.join(ROOT, "tests", "fixtures", "owleval_mini")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")  # 1 thread: the CI box is shared


def run_chat(*args, stdin=None, checkpoint=CK):
    cmd = [sys.executable, os.path.join(ROOT, "chat.py"), "--model", checkpoint, *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, encoding="utf-8", env=ENV, timeout=300)


def run_main(capsys, *args, stdin=None, checkpoint=CK):
    """chat.main in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    import io
    import chat
    old = sys.stdin
    sys.stdin = io.StringIO(stdin or "")
    try:
        rc = chat.main(["--model", checkpoint, *args])
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    finally:
        sys.stdin = old
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=rc, stdout=out, stderr=err)


def run_eval(capsys, *args):
    """python -m owl.eval's main in this process: (exit code, stdout, stderr)."""
    from owl.eval.__main__ import main
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=rc, stdout=out, stderr=err)


def reference_answer(model, tok, turns, images, max_new):
    """From scratch: owl.generate on the whole prompt, cut where the next Human: turn starts."""
    ids = owl.generate(model, tok, owl.build_prompt(turns), images, max_new_tokens=max_new)
    text = tok.decode(ids)
    cut = find_stop(text)
    return text if cut is None else text[:cut], [i for i in ids if i != tok.eos_id]


# ----------------------------------------------------------------------------- one-shot

CASES = {c["name"]: c for c in json.load(open(os.path.join(REF, "cases.json")))}


@pytest.mark.parametrize("name", ["single_image", "two_images", "text_only", "multi_turn"])
def test_one_shot_equals_reference_greedy_ids(name, owl_model, capsys):
    tok = owl_model[1]
    case = CASES[name]
    images = [a for p in case["images"] for a in ("--image", os.path.join(REF, p))]
    want = tok.decode(case["generated_ids"]) + "\n"
    question = case["prompt"].rsplit("Human: ", 1)[1][:-len("\nAI: ")]
    if name == "multi_turn":  # the official demo's prompt verbatim, in a real process
        r = run_chat("--raw-prompt", case["prompt"], *images, "--max-new-tokens", "16")
    elif name == "single_image":  # the template chat.py builds is the case's prompt; in a real process
        assert owl.build_prompt([(1, question, None)]) == case["prompt"]
        r = run_chat("--prompt", question, *images, "--max-new-tokens", "16", "--stats")
        assert re.search(r"\[stats\] first token [\d.]+ s \| prefill \d+ tokens .* decode 15 tokens at", r.stderr)
    else:  # the same code in this process (saves an interpreter start); text_only reads stdin
        assert owl.build_prompt([(len(case["images"]), question, None)]) == case["prompt"]
        stdin = question if name == "text_only" else None
        r = run_main(capsys, "--prompt", "-" if stdin else question, *images, "--max-new-tokens", "16",
                     stdin=stdin)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want


# ----------------------------------------------------------------------------- interactive

def test_interactive_session_equals_from_scratch(owl_model):
    model, tok = owl_model
    q1, q2, q3 = "What is in this picture?", "How do the two pictures differ?", "Which one is brighter?"
    script = "\n".join([f"/image {IMG[0]}", q1, "/history", "/image missing.jpg", "/foo", "/reset",
                        f"/image {IMG[1]}", f"/image {IMG[2]}", q2, q3, "/quit", "never read"]) + "\n"
    r = run_chat("--max-new-tokens", "12", stdin=script)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    ims = [owl.load_image(p) for p in IMG]
    a1, _ = reference_answer(model, tok, [(1, q1, None)], ims[:1], 12)
    a2, _ = reference_answer(model, tok, [(2, q2, None)], ims[1:], 12)  # /reset forgot image 0 and q1
    a3, _ = reference_answer(model, tok, [(2, q2, a2), (0, q3, None)], ims[1:], 12)
    at = [r.stdout.index(f"AI: {a}\n") for a in (a1, a2, a3)]
    assert at == sorted(at)
    assert f"Human: [image: {IMG[0]}]\nHuman: {q1}\nAI: {a1}\n[1 turn(s); " in r.stdout
    assert "error: missing.jpg: no such image file" in r.stderr
    assert "unknown command /foo: /help lists the commands" in r.stderr
    assert "[new conversation]" in r.stdout


# ----------------------------------------------------------------------------- KV reuse

def test_kv_cache_is_reused_across_turns(owl_model, monkeypatch):
    model, tok = owl_model
    positions, encoded = [], []
    lm_forward, encode = model.language_model.forward, model.encode_images

    def counting_forward(input_ids=None, inputs_embeds=None, **kw):
        positions.append((input_ids if inputs_embeds is None else inputs_embeds).shape[1])
        return lm_forward(input_ids=input_ids, inputs_embeds=inputs_embeds, **kw)

    monkeypatch.setattr(model.language_model, "forward", counting_forward)
    monkeypatch.setattr(model, "encode_images", lambda px: encoded.append(px.shape[0]) or encode(px))
    s = ChatSession(model, tok, max_new_tokens=10)
    qs, imgs = ["Describe the picture.", "And this one?", "Which is larger?"], [[IMG[0]], [IMG[1]], []]
    turns, prompts, got, cost = [], [], [], []
    try:
        for q, paths in zip(qs, imgs):
            for p in paths:
                s.add_image(p)
            prompts.append(tok.encode_prompt(s.prompt(q)))
            positions.clear()
            a = s.ask(q)
            got.append(a)
            cost.append((positions[0], sum(positions[1:])))  # (prefill, decode) positions of this turn
            turns.append((len(paths), q, a.text))
    finally:
        s.close()
    assert encoded == [1, 1]  # each image encoded once, in its own turn
    for k, a in enumerate(got):
        assert cost[k] == (a.stats["prefill_tokens"], a.stats["decode_tokens"])
        if k == 0:
            assert cost[0][0] == len(prompts[0])  # the first turn runs its whole prompt
        else:
            # Later turns run the new turn's tokens and the previous answer once more (the seam: the
            # prompt's "AI: " ends in a lone "▁" that merges with the answer's first piece), never the
            # images or earlier turns; and no less than what was not in the cache.
            cached = len(prompts[k - 1]) + cost[k - 1][1]
            assert len(prompts[k]) - cached <= cost[k][0] <= len(prompts[k]) - len(prompts[k - 1]) + 2, cost
    ims = [owl.load_image(p) for p in (IMG[0], IMG[1])]
    for k, a in enumerate(got):  # exact: each answer equals a from-scratch run on the full prompt
        text, ids = reference_answer(model, tok, turns[:k] + [(len(imgs[k]), qs[k], None)],
                                     ims[:1 + (k >= 1)], 10)
        assert (a.text, a.ids) == (text, ids)


# ----------------------------------------------------------------------------- streaming

def test_stream_decoder_byte_fallback_and_stop(owl_model):
    tok = owl_model[1]
    ids = tok.encode("Héllo € 溯 owl, ok")
    pieces = [tok.sp.id_to_piece(i) for i in ids]
    assert "<0xE2>" in pieces  # the euro sign is three byte-fallback pieces
    d, out = StreamDecoder(tok), []
    for i in ids:
        out.append(d.push(i))
        assert "\ufffd" not in out[-1]  # a half character is held back, never printed
    rest, text = d.finish()
    assert "".join(out) + rest == text == tok.decode(ids) == "Héllo € 溯 owl, ok"
    # the next turn starts: "\nHum" is held back, then cut; nothing of it is printed
    d, out = StreamDecoder(tok), []
    for i in tok.encode("Yes.\nHuman: more"):
        out.append(d.push(i))
        if d.stopped:
            break
    assert "".join(out) + d.finish()[0] == "Yes." and d.finish()[1] == "Yes."
    # an answer that ends with an unfinished character or "\nHu": shown at the end, as decode gives it
    for tail in ([tok.sp.piece_to_id("<0xE2>")], tok.encode("a\nHu")):
        d = StreamDecoder(tok)
        out = "".join(d.push(i) for i in tok.encode("ok") + tail)
        assert out + d.finish()[0] == tok.decode(tok.encode("ok") + tail)


def test_session_streams_a_scripted_answer(owl_model, monkeypatch):
    """Through the session's own generation loop: a fake model stream with multi-byte characters."""
    model, tok = owl_model
    script = tok.encode("Ça coûte 5 € — 溯.\nHuman: next")
    seen = []

    def fake_generate_tokens(model, ids, image_embeds=None, *, stream, **sampling):
        for i in script:
            seen.append(i)
            if stream(torch.tensor([i])):
                return [seen]
        return [seen]

    monkeypatch.setattr(cs, "generate_tokens", fake_generate_tokens)
    s, chunks = ChatSession(model, tok, max_new_tokens=64), []
    try:
        a = s.ask("Price?", on_text=chunks.append)
    finally:
        s.close()
    assert a.stopped_by == "turn" and len(seen) < len(script)  # stopped as the next turn began
    want = "Ça coûte 5 € — 溯."
    assert "".join(chunks) == a.text == want == tok.decode(tok.encode(want))
    assert all("\ufffd" not in c for c in chunks)


# ----------------------------------------------------------------------------- Ctrl-C

def test_ctrl_c_stops_the_answer_and_the_session_goes_on(owl_model):
    import chat
    model, tok = owl_model
    s = ChatSession(model, tok, max_new_tokens=40)

    def ctrl_c(times):  # press Ctrl-C `times` times as the first text appears
        sent = []

        def on_text(text):
            while len(sent) < times:
                sent.append(1)
                os.kill(os.getpid(), signal.SIGINT)
        return on_text
    # the handler ctrl_c_stops must put back: Python's own, or SIG_IGN when this process was started in
    # the background with Ctrl-C ignored (`cmd &` in a non-interactive shell)
    before = signal.getsignal(signal.SIGINT)
    try:
        s.add_image(IMG[0])
        with chat.ctrl_c_stops(s):
            a1 = s.ask("Describe it.", on_text=ctrl_c(1))  # once: the answer stops after this token
        assert a1.stopped_by == "interrupt" and 1 <= len(a1.ids) < 40
        with pytest.raises(KeyboardInterrupt), chat.ctrl_c_stops(s):
            s.ask("Tell me more.", on_text=ctrl_c(2))  # twice: the answer is dropped at once
        assert len(s.turns) == 1 and signal.getsignal(signal.SIGINT) is before
        a3 = s.ask("Why?")  # the cache is still consistent: equals a from-scratch run
    finally:
        s.close()
    want, _ = reference_answer(model, tok, [(1, "Describe it.", a1.text), (0, "Why?", None)],
                               [owl.load_image(IMG[0])], 40)
    assert a3.text == want


# ----------------------------------------------------------------------------- OwlEval

def test_owleval_conversations_follow_the_categories():
    qs = [json.loads(line) for line in open(os.path.join(MINI, "questions.jsonl"))]
    assert [[q["question_id"] for q in c] for c in conversations(qs)] == [[3], [4, 5]]
    two_heads = [{"image": "a", "question_id": i, "category": c} for i, c in
                 enumerate([["single_turn", "multi_turn"], ["multi_turn"], ["single_turn", "multi_turn"],
                            ["single_turn"], ["multi_turn"]])]
    assert [[q["question_id"] for q in c] for c in conversations(two_heads)] == [[0, 1], [2, 4], [3]]


def test_owleval_runner_and_report(owl_model, tmp_path):
    model, tok = owl_model
    out, page = tmp_path / "answers.jsonl", tmp_path / "report.html"
    r = subprocess.run([sys.executable, "-m", "owl.eval", "owleval", MINI, "--model", CK, "--out", str(out), "--html",
                        str(page), "--max-new-tokens", "10", "--model-id", "owl-tiny"], cwd=ROOT, capture_output=True,
                       encoding="utf-8", env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in open(out, encoding="utf-8")]
    qs = [json.loads(line) for line in open(os.path.join(MINI, "questions.jsonl"))]
    assert [list(x) for x in rows] == [["image", "question_id", "question", "answer", "model_id"]] * 3
    assert [(x["image"], x["question_id"], x["question"], x["model_id"]) for x in rows] == \
        [(q["image"], q["question_id"], q["question"], "owl-tiny") for q in qs]
    im3, im4 = (owl.load_image(os.path.join(MINI, "cases", n)) for n in ("3.jpg", "4.jpg"))
    a3, _ = reference_answer(model, tok, [(1, qs[0]["question"], None)], [im3], 10)
    a4, _ = reference_answer(model, tok, [(1, qs[1]["question"], None)], [im4], 10)
    a5, _ = reference_answer(model, tok, [(1, qs[1]["question"], a4), (0, qs[2]["question"], None)], [im4], 10)
    assert [x["answer"] for x in rows] == [a3, a4, a5]
    html_text = page.read_text(encoding="utf-8")
    import html
    others = [json.loads(line) for f in sorted(os.listdir(os.path.join(MINI, "answer")))
              for line in open(os.path.join(MINI, "answer", f), encoding="utf-8")]
    for text in [q["question"] for q in qs] + [x["answer"] for x in rows] + [o["answer"] for o in others]:
        assert html.escape(text) in html_text
    assert html_text.count("src='data:image/jpeg;base64,") == 3  # the page carries its images
    assert html_text.count("<button title=") == 3 * 3 * 4  # A-D for our and 2 other models' answers
    assert "localStorage.setItem" in html_text and "turn 2 of 2" in html_text


# ----------------------------------------------------------------------------- bad input

def one_line_error(r, *words):
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and all(w in lines[0] for w in words), r.stderr


def test_bad_input(tmp_path, capsys):
    # in a real process: exit code 1, one line, no traceback
    one_line_error(run_chat("--prompt", "hi", checkpoint=str(tmp_path / "nope")), "nope", "no such folder")
    # the rest in this process (chat.main returns the exit code)
    (tmp_path / "ck").mkdir()
    for f in ("config.json", "tokenizer.model"):
        (tmp_path / "ck" / f).write_bytes(open(os.path.join(CK, f), "rb").read())
    one_line_error(run_main(capsys, "--prompt", "hi", checkpoint=str(tmp_path / "ck")), "ck", "no weights")
    one_line_error(run_main(capsys, "--prompt", "hi", "--image", str(tmp_path / "gone.png")), "gone.png",
                   "no such image")
    one_line_error(run_main(capsys, "--raw-prompt", "Human: <image>\nHuman: hi\nAI: "), "--raw-prompt",
                   "1 <image>")
    out = tmp_path / "a.jsonl"
    one_line_error(run_eval(capsys, "owleval", str(tmp_path), "--model", CK, "--out", str(out)), "no questions.jsonl")
    assert not out.exists()
    one_line_error(run_main(capsys, "--prompt", "hi", "--max-new-tokens", "0"), "--max-new-tokens")


def test_quantize_flags(capsys):
    """--quantize int8|int4 (and --int8) answer as the model quantized here does (owl.quant.quantize:
    the projections fused, then every linear layer of the LLM but its head)."""
    from owl.quant import quantize
    model, tok = owl.load_model(CK)
    for flags, kind in ((["--int8"], "int8"), (["--quantize", "int4"], "int4")):
        r = run_main(capsys, *flags, "--prompt", "hi", "--max-new-tokens", "4")
        q = quantize(copy.deepcopy(model), kind)  # (int4: groups of 32, what divides the tiny model's 96)
        want = tok.decode(owl.generate(q, tok, owl.build_prompt([(0, "hi", None)]), max_new_tokens=4))
        assert r.returncode == 0 and r.stdout == want + "\n", (kind, r.stderr)


def test_context_overflow_is_reported_not_fatal(owl_model, capsys):
    import chat
    model, tok = owl_model
    s = ChatSession(model, tok, max_new_tokens=8)
    try:
        for _ in range(8):  # 8 x 65 image slots > the 512-position context
            s.add_image(IMG[0])
        assert chat.answer(s, SimpleNamespace(stats=False), question="Too many?") is False
        assert "context window holds 512: /reset starts a new one" in capsys.readouterr().err
        assert s.turns == [] and len(s.pending) == 8  # nothing changed
        s.reset()
        s.add_image(IMG[0])
        assert chat.answer(s, SimpleNamespace(stats=False), question="One?", prefix="AI: ") is True
    finally:
        s.close()
    want, _ = reference_answer(model, tok, [(1, "One?", None)], [owl.load_image(IMG[0])], 8)
    assert capsys.readouterr().out == f"AI: {want}\n"


def test_adapter_is_applied_at_load(owl_model, tmp_path, capsys):
    """--adapter FILE (train.py's format) gives the adapted model's answer, not the base model's."""
    from safetensors.torch import save_file
    from owl.lora import apply_lora, lora_state_dict
    model, tok = owl.load_model(CK)  # a copy of its own: LoRA goes on in place
    apply_lora(model.language_model, ("q_proj", "v_proj"), r=4, alpha=8, dropout=0.0)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # B = 0 would be the base model
    save_file({k: v.contiguous() for k, v in lora_state_dict(model).items()}, str(tmp_path / "adapter.safetensors"))
    (tmp_path / "adapter.json").write_text(json.dumps({"r": 4, "alpha": 8, "dropout": 0.0,
                                                       "targets": ["q_proj", "v_proj"]}))
    q, im = "What is in this picture?", owl.load_image(IMG[0])
    prompt = owl.build_prompt([(1, q, None)])
    adapted = tok.decode(owl.generate(model.eval(), tok, prompt, [im], max_new_tokens=8))
    base = tok.decode(owl.generate(owl_model[0], tok, prompt, [im], max_new_tokens=8))
    assert adapted != base
    r = run_main(capsys, "--adapter", str(tmp_path / "adapter.safetensors"), "--prompt", q, "--image", IMG[0],
                 "--max-new-tokens", "8")
    assert r.returncode == 0 and r.stdout == adapted + "\n", r.stderr
    one_line_error(run_main(capsys, "--adapter", str(tmp_path / "nope.safetensors"), "--prompt", q), "nope")
