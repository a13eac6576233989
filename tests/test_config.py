"""TrainConfig (owl/train/config.py): every training option is one field, and argparse, the resume
check and the demo's command lines all come from the fields. An option added to the dataclass is
parsed, printed and checked on --resume with no other edit."""
import dataclasses
import subprocess
import sys

import pytest

from owl.train.config import TrainConfig, TrainError, check_resumed, opt, parse, parser, resolved, to_argv
from tests.conftest import ROOT


def test_every_option_says_what_it_does_and_what_resume_does():
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata["help"] and f.metadata["resume"] in ("exact", "warn", "free"), f.name
    text = parser().format_help()
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text
    assert "(default: 1000)" in text and "(default: q_proj,v_proj)" in text  # defaults shown
    r = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--grad-accum N" in r.stdout and "--demo" not in r.stdout


def test_the_printed_command_gives_the_same_config():
    cfg = TrainConfig(stage=2, init="/m", data="a.json,b.jsonl", out="o", lr=3e-4, dropout=0, freeze_abstractor=True,
                      lora_targets="q_proj,k_proj", max_steps=7, precision="bf16", num_queries=20)
    argv = to_argv(cfg)
    assert "--freeze-abstractor" in argv and "--num-queries" in argv and "--batch-size" not in argv  # defaults left out
    assert parse(argv) == resolved(cfg)
    assert parse(["--num-query-tokens", "20"]).num_queries == 20  # the other name of the option
    assert resolved(TrainConfig(stage=1, max_steps=100)).lr == 1e-4 and resolved(TrainConfig(stage=2)).lr == 2e-5
    with pytest.raises(TrainError, match="--batch-size >= 1; --grad-accum >= 1"):
        parse(["--batch-size", "0", "--grad-accum", "0"])


def test_an_added_option_is_checked_on_resume_without_another_edit():
    @dataclasses.dataclass
    class More(TrainConfig):  # a new option, written once
        mixup: float = opt(0.0, "a new option that changes the run", "exact")
        note: str = opt("x", "a new option that only warns", "warn")

    was = dataclasses.asdict(resolved(More(stage=1, data="d.json", out="o")))
    check_resumed(was, resolved(More(stage=1, data="d.json", out="o", save_every=7)), "s.json")  # free: nothing
    with pytest.raises(TrainError, match=r"--resume: --mixup 0.5 \(was 0.0\): not the run saved in s.json"):
        check_resumed(was, resolved(More(stage=1, data="d.json", out="o", mixup=0.5)), "s.json")
    said = []
    check_resumed(was, resolved(More(stage=1, data="d.json", out="o", note="y")), "s.json", said.append)
    assert said and "--note y (was x)" in said[0]
    old = {k: v for k, v in was.items() if k != "mixup"}  # a checkpoint older than the option: it had the default
    check_resumed(old, resolved(More(stage=1, data="d.json", out="o")), "s.json")
    with pytest.raises(TrainError, match="--mixup"):
        check_resumed(old, resolved(More(stage=1, data="d.json", out="o", mixup=0.5)), "s.json")
    assert to_argv(More(mixup=0.5)) == ["--mixup", "0.5"]  # the demo's command lines carry it, and it parses
    assert parse(["--stage", "1", "--mixup", "0.5"], More).mixup == 0.5 and "--mixup" in parser(More).format_help()
