"""chat.py against the red-team report (shared/design/redteam.md): undecodable input bytes, sampling
flags out of range, an adapter of another base or a garbage one, and OwlEval's answers file (python -m
owl.eval owleval: checked first, appended to as answers are made, gone on from by a re-run)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import owl
from owl.chat.session import ChatSession
from tests.conftest import ROOT, one_line
from tests.test_chat import CK, ENV, IMG, MINI, reference_answer, run_eval, run_main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_undecodable_input_bytes_are_replaced_and_the_session_goes_on(owl_model, capsys):
    """Report 4.7: a non-UTF-8 byte typed after a good turn killed the session (sentencepiece, or
    UnicodeDecodeError under a strict encoding); --prompt - and --prompt with such bytes too."""
    env = dict(ENV, PYTHONIOENCODING="utf-8:strict")  # the strictest stdin
    cmd = [sys.executable, os.path.join(ROOT, "chat.py"), "--model", CK, "--max-new-tokens", "3"]
    script = f"/image {IMG[0]}\nfirst question\nhello \xff there\n/history\n".encode("latin-1")
    r = subprocess.run(cmd, input=script, capture_output=True, env=env, timeout=300)
    err, out = r.stderr.decode(), r.stdout.decode()
    assert r.returncode == 0 and "Traceback" not in err, err
    assert "Human: hello \ufffd there" in out and "[2 turn(s); " in out  # both turns answered and kept
    # --prompt with bytes that are not UTF-8 (argv arrives with lone surrogates), and --prompt - on stdin
    r1 = run_main(capsys, "--prompt", "caf\udce9?", "--max-new-tokens", "3")
    import io
    old = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9?"), encoding="utf-8")  # strict, as a UTF-8 terminal's
    try:
        import chat
        rc = chat.main(["--model", CK, "--prompt", "-", "--max-new-tokens", "3"])
    finally:
        sys.stdin = old
    r2 = capsys.readouterr()
    model, tok = owl_model
    want = tok.decode(owl.generate(model, tok, owl.build_prompt([(0, "caf\ufffd?", None)]), max_new_tokens=3)) + "\n"
    assert (r1.returncode, r1.stdout) == (0, want) and (rc, r2.out) == (0, want), (r1.stderr, r2.err)


def test_bad_sampling_flags_are_one_line(capsys):
    """Report 4.9 (--temperature nan passed the check, then a traceback), 4.10 (a huge --seed)."""
    for flags, words in ((["--temperature", "nan"], "a finite --temperature >= 0"),
                         (["--temperature", "inf"], "a finite --temperature >= 0"),
                         (["--seed", "99999999999999999999999"], "--seed must be in [0, 2**64)"),
                         (["--seed", "-1"], "--seed must be in [0, 2**64)")):
        r = run_main(capsys, "--prompt", "hi", *flags)
        assert r.returncode == 2 and "loaded" not in r.stderr
        one_line(r, *words)
    assert run_main(capsys, "--prompt", "hi", "--seed", str(2**64 - 1), "--temperature", "1", "--max-new-tokens",
                    "2").returncode == 0


def test_adapter_of_another_base_or_garbage_is_one_line(owl_model, tmp_path, capsys):
    """Report 4.13 (an adapter trained on another base of the same shapes was applied without a word:
    adapter.json's base_sha256 was never read), 4.14 (a garbage adapter file: a traceback)."""
    from safetensors.torch import save_file
    from owl.adapter import sha256_of
    from owl.lora import apply_lora, lora_state_dict
    model, tok = owl.load_model(CK)
    apply_lora(model.language_model, ("q_proj", "v_proj"), r=4, alpha=8, dropout=0.0)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    adapter, meta = tmp_path / "adapter.safetensors", {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}
    save_file({k: v.contiguous() for k, v in lora_state_dict(model).items()}, str(adapter))
    (tmp_path / "adapter.json").write_text(json.dumps({**meta, "base": "/elsewhere", "base_sha256": "0" * 64}))
    r = run_main(capsys, "--adapter", str(adapter), "--prompt", "hi")
    one_line(r, f"{adapter} was trained on another base model (/elsewhere", f"not {CK}", "--ignore-adapter-base")
    assert "loaded" not in r.stderr  # refused before the model was loaded
    prompt = owl.build_prompt([(0, "hi", None)])
    adapted = tok.decode(owl.generate(model.eval(), tok, prompt, max_new_tokens=4)) + "\n"
    r = run_main(capsys, "--adapter", str(adapter), "--ignore-adapter-base", "--prompt", "hi", "--max-new-tokens", "4")
    assert (r.returncode, r.stdout) == (0, adapted), r.stderr
    (tmp_path / "adapter.json").write_text(json.dumps({**meta, "base": CK, "base_sha256": sha256_of(CK)}))
    r = run_main(capsys, "--adapter", str(adapter), "--prompt", "hi", "--max-new-tokens", "4")
    assert (r.returncode, r.stdout) == (0, adapted), r.stderr  # its own base: applied
    adapter.write_bytes(np.random.default_rng(0).bytes(3000))
    one_line(run_main(capsys, "--adapter", str(adapter), "--prompt", "hi"), f"{adapter}: cannot read safetensors")


def test_owleval_checks_out_first_keeps_each_answer_and_goes_on(owl_model, tmp_path, capsys, monkeypatch):
    """Report 4.19: --out in a missing folder or a folder failed after every question was answered
    (all answers lost); Ctrl-C at question 24/60 kept nothing. Now --out is checked before the model
    loads, each answer is appended as it is made, and a re-run answers only the rest: the result
    equals an uninterrupted run (the multi-turn follow-up included)."""
    for out, words in ((tmp_path / "nodir" / "a.jsonl", "no such folder"), (tmp_path, "is a folder"),
                       ("/proc/owl_answers.jsonl", "cannot write there")):  # (as root too)
        r = run_eval(capsys, "owleval", MINI, "--model", CK, "--out", str(out), "--max-new-tokens", "10")
        one_line(r, f"--out {out}", words)
        assert "loaded" not in r.stderr and "OwlEval" not in r.stderr  # before the model and the first question
    model, tok = owl_model
    qs = [json.loads(line) for line in open(os.path.join(MINI, "questions.jsonl"))]
    im3, im4 = (owl.load_image(os.path.join(MINI, "cases", n)) for n in ("3.jpg", "4.jpg"))
    a3, _ = reference_answer(model, tok, [(1, qs[0]["question"], None)], [im3], 10)
    a4, _ = reference_answer(model, tok, [(1, qs[1]["question"], None)], [im4], 10)
    a5, _ = reference_answer(model, tok, [(1, qs[1]["question"], a4), (0, qs[2]["question"], None)], [im4], 10)
    out = tmp_path / "answers.jsonl"
    real_ask, asked = ChatSession.ask, []

    def ctrl_c_at_the_third(self, question, on_text=None):
        asked.append(question)
        if len(asked) == 3:
            raise KeyboardInterrupt
        return real_ask(self, question, on_text)
    monkeypatch.setattr(ChatSession, "ask", ctrl_c_at_the_third)
    r = run_eval(capsys, "owleval", MINI, "--model", CK, "--out", str(out), "--max-new-tokens", "10", "--model-id", "m")
    assert r.returncode == 130 and "the answers so far are in" in r.stderr, r.stderr
    assert [json.loads(l)["answer"] for l in open(out, encoding="utf-8")] == [a3, a4]  # kept as they were made
    with open(out, "a", encoding="utf-8") as f:
        f.write('{"image": "4.jpg", "question_id": 5, "quest')  # a torn last line (a kill mid-write)
    monkeypatch.setattr(ChatSession, "ask", lambda self, q, on_text=None: asked.append(q) or real_ask(self, q, on_text))
    r = run_eval(capsys, "owleval", MINI, "--model", CK, "--out", str(out), "--max-new-tokens", "10", "--model-id", "m")
    assert r.returncode == 0 and "2 of 3 questions are answered" in r.stderr and "dropped a torn last line" in r.stderr
    assert asked[3:] == [qs[2]["question"]]  # only the follow-up was asked again, after its first turn put back
    rows = [json.loads(l) for l in open(out, encoding="utf-8")]
    assert [(x["question_id"], x["answer"], x["model_id"]) for x in rows] == [(3, a3, "m"), (4, a4, "m"), (5, a5, "m")]
    one_line(run_eval(capsys, "owleval", MINI, "--model", CK, "--out", str(out), "--model-id", "other"),
             "not an answers file of model 'other'")


def test_the_chat_rows_that_were_one_line_stay_so(tmp_path, capsys):
    """Report 4.1 (a prompt longer than the context), 4.11 (--device banana, or cuda without one),
    4.12 (an adapter of another abstractor shape), 4.15 (adapter.json {} or invalid; a whole model
    file as the adapter): one line each, as before this branch (a guard against regressions)."""
    r = run_main(capsys, "--prompt", "word " * 600)  # (after the "loaded" line)
    assert r.returncode == 1 and r.stderr.splitlines()[-1].endswith("the context window holds 512: /reset starts a new one")
    one_line(run_main(capsys, "--prompt", "hi", "--device", "banana"), "--device banana: not a device")
    if not torch.cuda.is_available():
        one_line(run_main(capsys, "--prompt", "hi", "--device", "cuda"), "CUDA is not available")
    from safetensors.torch import load_file, save_file
    for name, meta, tensors, words in (
            ("empty_meta", "{}", {"x": torch.zeros(1)}, "missing or invalid r, alpha, targets"),
            ("bad_meta", "{not json", {"x": torch.zeros(1)}, "adapter.json: not valid JSON"),
            ("whole_model", '{"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}',
             load_file(os.path.join(CK, "model.safetensors")), "the weights do not match the model"),
            ("other_shape", '{"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}',
             {"query_tokens": torch.zeros(1, 32, 64)}, "mis-shaped 1: query_tokens (1, 32, 64) != (1, 64, 64)")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter.json").write_text(meta)
        save_file(tensors, str(tmp_path / name / "adapter.safetensors"))
        r = run_main(capsys, "--adapter", str(tmp_path / name / "adapter.safetensors"), "--prompt", "hi")
        assert r.returncode == 1 and "Traceback" not in r.stderr and words in r.stderr, (name, r.stderr)


def test_chat_context_flag_is_checked_in_one_line(capsys):
    """chat.py --context N (the window owl.memory --context N sizes, report 5.8): outside 2..the model's."""
    from tests.test_chat import one_line_error, run_main
    one_line_error(run_main(capsys, "--context", "1", "--prompt", "hi"), "--context >= 2")
    one_line_error(run_main(capsys, "--context", "100000", "--prompt", "hi"), "--context 100000", "512 positions")
    r = run_main(capsys, "--context", "128", "--prompt", "hi", "--max-new-tokens", "2", "--stats")
    assert r.returncode == 0 and "/128" in r.stderr + r.stdout, r.stderr
