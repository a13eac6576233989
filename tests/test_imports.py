"""The house rules of the layout (STYLE.md), read from the source with ast: no import circle; no
module of the package imports the scripts train.py or chat.py; the files directly in owl/ import
nothing from the wings owl/train, owl/chat, owl/eval, owl/demo; owl/train and owl/chat import no other
wing, owl/eval only owl/chat (the session engine and the loader), owl/demo only owl/train (the data
formats and TrainConfig)."""
import ast
import os

from tests.conftest import ROOT

WINGS = ("owl.train", "owl.chat", "owl.eval", "owl.demo")
MAY_IMPORT = {"owl.train": (), "owl.chat": (), "owl.eval": ("owl.chat",), "owl.demo": ("owl.train",)}
SCRIPTS = ("train", "chat")


def module_files():
    """{module name: path} for every module of the package and the two scripts."""
    out = {name: os.path.join(ROOT, f"{name}.py") for name in SCRIPTS}
    for folder, _, files in os.walk(os.path.join(ROOT, "owl")):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, f)
    return out


def imports_of(name, path, known):
    """The known modules that `name` imports anywhere in its file (function-level imports too)."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: climb from the importing module's package
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            for a in node.names:  # `from owl.demo import world` imports the module owl.demo.world
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in found if m in known and m != name}


def graph():
    files = module_files()
    return {name: imports_of(name, path, files) for name, path in files.items()}


def find_cycle(g):
    """One import circle as a list of modules, or None (depth-first search)."""
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        state[n] = "done"
        stack.pop()
        return None
    for n in sorted(g):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def broken_rules(g):
    def inside(m, pkg):
        return m == pkg or m.startswith(pkg + ".")
    bad = []
    for name, deps in g.items():
        if name in SCRIPTS:
            continue
        bad += [f"{name} imports the script {d}" for d in deps if d in SCRIPTS]
        if (name == "owl" or name.count(".") == 1) and name not in WINGS:  # owl/__init__.py, owl/*.py
            bad += [f"{name} (a file of owl/) imports the wing {d}" for d in deps if any(inside(d, w) for w in WINGS)]
        for wing, allowed in MAY_IMPORT.items():
            if inside(name, wing):
                bad += [f"{name} imports another wing, {d}" for d in deps
                        if any(inside(d, w) for w in WINGS if w != wing and w not in allowed)]
    return bad


def test_the_checker_can_fail():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert broken_rules({"owl.model": {"owl.train.data"}, "owl.demo.run": {"train", "owl.train.config"},
                         "owl.chat.session": {"owl.demo.world"}, "owl.eval.owleval": {"owl.chat.session"},
                         "owl.eval.choices": {"owl.train.data"}}) == [
        "owl.model (a file of owl/) imports the wing owl.train.data", "owl.demo.run imports the script train",
        "owl.chat.session imports another wing, owl.demo.world", "owl.eval.choices imports another wing, owl.train.data"]
    files = module_files()  # relative imports resolve to the right modules
    assert imports_of("owl.chat.session", files["owl.chat.session"], files) >= {"owl.generate", "owl.tokenizer"}
    assert "owl.demo.files" in imports_of("owl.demo.run", files["owl.demo.run"], files)  # `from . import files`
    assert "owl.demo.world" in imports_of("owl.demo.files", files["owl.demo.files"], files)  # `from .world import (...)`


def test_no_import_circle():
    assert find_cycle(graph()) is None


def test_the_layout_rules_hold():
    g = graph()
    assert {"owl.model", "owl.weights", "owl.train.data", "owl.chat.session", "owl.demo.world"} <= set(g)
    assert broken_rules(g) == []


def test_owl_holds_at_most_16_files():
    """The model's boxes and what they need, each found by `ls owl/` (the README's map names them)."""
    assert len([f for f in os.listdir(os.path.join(ROOT, "owl")) if f.endswith(".py")]) <= 16
