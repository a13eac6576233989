"""Prose that cannot go stale unseen: every repository path named in the code, the README and the
notebooks (owl/..., tests/..., bench/..., tutorials/..., .ci/...) exists."""
import json
import os
import re

from tests.conftest import ROOT

PATH = re.compile(r"(?<![\w./-])(?:owl|tests|bench|tutorials|\.ci)/[a-z0-9_][\w./*{}-]*")  # ("owl/HF" is a ratio)


def named_paths(text):
    """Repository paths a text names (a trailing '.' or '/' is punctuation or a folder's; a pattern with
    * or braces names no one path)."""
    return {p.rstrip("./") for p in PATH.findall(text) if not set("*{}") & set(p)}


def documents():
    """{file: its text}: the package, the scripts, tests, bench code, README and notebook sources."""
    out = {}
    for folder in ("owl", "tests", "bench"):
        for d, _, files in os.walk(os.path.join(ROOT, folder)):
            out.update({os.path.join(d, f): open(os.path.join(d, f), encoding="utf-8").read()
                        for f in files if f.endswith((".py", ".sh"))})
    for f in ("train.py", "chat.py", "README.md", ".ci/run"):
        out[os.path.join(ROOT, f)] = open(os.path.join(ROOT, f), encoding="utf-8").read()
    for f in sorted(os.listdir(os.path.join(ROOT, "tutorials"))):
        if f.endswith(".ipynb"):
            cells = json.load(open(os.path.join(ROOT, "tutorials", f), encoding="utf-8"))["cells"]
            out[os.path.join(ROOT, "tutorials", f)] = "\n".join("".join(c["source"]) for c in cells)
    return out


def test_the_checker_finds_paths():
    assert named_paths("see owl/chat_session.py, (tests/fixtures/reference/) and `bench/run.py`.") == {
        "owl/chat_session.py", "tests/fixtures/reference", "bench/run.py"}
    assert named_paths("shared/design/x.md, myowl/x.py, tests/test_device*.py and the owl/HF ratio") == set()


def test_every_path_named_in_prose_exists():
    missing = sorted(f"{os.path.relpath(f, ROOT)}: {p}" for f, text in documents().items() for p in named_paths(text)
                     if not os.path.exists(os.path.join(ROOT, p)) and f != __file__)
    assert missing == []
