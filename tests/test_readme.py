"""The README's commands chain: run top to bottom from a fresh clone, each reads what an earlier one
wrote. One demo output folder throughout (the demo command's OUT; the chat command and the notebooks
read it), and the files they read under it are ones the demo writes (checked against a reduced run in
tests/test_demo.py)."""
import json
import os
import re
import shlex

from tests.conftest import ROOT


def commands(text=None):
    """Every shell command of the README's ```bash blocks: continuations joined, comments dropped,
    `a && b` split, each as its argv."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read() if text is None else text
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            while argv:
                cut = argv.index("&&") if "&&" in argv else len(argv)
                out.append(argv[:cut])
                argv = argv[cut + 1:]
    return out


def demo_out(cmds):
    """The OUT of the README's demo command(s): the one folder every later command reads."""
    outs = {c[c.index("owl.demo") + 1] for c in cmds if c[:3] == ["python", "-m", "owl.demo"]}
    assert len(outs) == 1, f"the README's demo commands write {sorted(outs) or 'nothing'}: one folder throughout"
    return outs.pop()


def paths_read_from(root, cmds):
    """The paths under the demo's OUT that the other commands read, relative to it."""
    return sorted({os.path.relpath(a, root) for c in cmds if c[:3] != ["python", "-m", "owl.demo"]
                   for a in c if a.startswith(root + "/")})


def notebook_runs_folders():
    """The runs/NAME folders the notebooks read or write (os.path.join(ROOT, "runs", "NAME"))."""
    found = set()
    for f in sorted(os.listdir(os.path.join(ROOT, "tutorials"))):
        if f.endswith(".ipynb"):
            for c in json.load(open(os.path.join(ROOT, "tutorials", f), encoding="utf-8"))["cells"]:
                found |= {f"runs/{m}" for m in re.findall(r'"runs", "(\w+)"', "".join(c["source"]))}
    return found


def test_the_checker_sees_a_broken_chain():
    cmds = commands("```bash\npip install x && python -m owl.demo out/demo  # the demo\n```\n"
                    "```bash\npython chat.py --model runs/demo/stage2 \\\n  --image runs/demo/a.png\n```\n")
    assert cmds == [["pip", "install", "x"], ["python", "-m", "owl.demo", "out/demo"],
                    ["python", "chat.py", "--model", "runs/demo/stage2", "--image", "runs/demo/a.png"]]
    assert paths_read_from(demo_out(cmds), cmds) == []  # chat reads runs/demo, which nothing wrote


def test_the_readme_commands_chain():
    cmds = commands()
    root = demo_out(cmds)
    assert root == "runs/demo"
    read = paths_read_from(root, cmds)
    assert "stage2" in read and any(p.startswith("world/images/") for p in read), read
    # nothing reads another demo folder, and the notebooks look where the README's demo writes
    others = {a.split("/")[0] + "/" + a.split("/")[1] for c in cmds for a in c
              if re.match(r"(runs|out)/\w", a) and not a.startswith(root)}
    assert others == set(), others
    assert notebook_runs_folders() == {root, "runs/tutorial5"}  # (notebook 5 writes its own reduced run)
