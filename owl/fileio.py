"""Reading and writing files safely, said once for the whole package: JSON, JSONL and safetensors
readers whose errors name the file (and line), and writers that never leave a half-written file or
folder behind (a temporary beside the target, renamed over it).

A reader takes `error`, the exception class its caller reports (WeightsError for a model folder,
DataError for training data, ...), so every mistake is one line naming the file. A writer that cannot
write raises OSError with a message naming the path.
"""
import json
import os
import shutil

from safetensors import safe_open


# ----------------------------------------------------------------------------- reading

def read_text(file, error=ValueError):
    """A UTF-8 text file; a byte that is not UTF-8 stops here, naming the line."""
    with open(file, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise error(f"{file}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); re-save it as UTF-8") from None


def read_json(file, error=ValueError, what="a JSON object"):
    """A JSON object from file; anything else (invalid JSON, a list, binary bytes) stops here, naming the file."""
    try:
        d = json.loads(read_text(file, error))
    except json.JSONDecodeError as e:
        raise error(f"{file}: not valid JSON ({e})") from None
    except RecursionError:  # [[[[... thousands deep (redteam-2 2.5/2.12)
        raise error(f"{file}: malformed JSON (nested too deeply)") from None
    if not isinstance(d, dict):
        raise error(f"{file}: not {what} (it holds a JSON {type(d).__name__})")
    return d


def read_jsonl(file, error=ValueError, text=None):
    """[(where, record)] of a JSONL file, one per non-blank line, where = "file:line"; a line that is
    not valid JSON stops here, naming it. text: the file's text, if already read."""
    out = []
    for n, line in enumerate((read_text(file, error) if text is None else text).splitlines(), 1):
        if line.strip():
            try:
                out.append((f"{file}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise error(f"{file}:{n}: not valid JSON ({e.msg})") from None
            except RecursionError:  # [[[[... thousands deep (redteam-2 2.5/2.12)
                raise error(f"{file}:{n}: malformed JSON (nested too deeply)") from None
    return out


def read_safetensors(file, keep=None, error=ValueError):
    """Yield (name, tensor) of a safetensors file, the names keep(name) holds, one tensor at a time; a
    truncated or garbage file stops here, naming it."""
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            for k in f.keys():
                if keep is None or keep(k):
                    yield k, f.get_tensor(k)
    except Exception as e:  # (an error of the caller's, between two tensors, is raised in its own frame)
        raise error(f"{file}: cannot read safetensors ({e})") from None


def safetensors_shapes(file, error=ValueError):
    """{name: shape} from a safetensors file's header, no tensor read."""
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise error(f"{file}: cannot read safetensors ({e})") from None


# ----------------------------------------------------------------------------- writing

def write_atomic(path, text):
    """The whole file or the old one, never a part: written beside it, synced, renamed over it."""
    tmp = path + ".tmp"
    if os.path.lexists(tmp):  # a leftover (or a planted link, redteam-2 6.2): unlink it, never write through it
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with open(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_writable(out, flag="--out", error=ValueError):
    """A file that can be written: its folder exists, it is not a folder itself, opening it to append
    works (a file this creates is removed again: nothing is left behind by a check)."""
    folder, existed = os.path.dirname(os.path.abspath(out)), os.path.exists(out)
    if os.path.isdir(out):
        raise error(f"{flag} {out} is a folder: give a file name")
    if not os.path.isdir(folder):
        raise error(f"{flag} {out}: no such folder {folder}")
    try:
        open(out, "a").close()
        if not existed:
            os.remove(out)
    except OSError as e:
        raise error(f"{flag} {out}: cannot write there ({e.strerror})") from None


def check_destination(dst, writes, sources=(), error=ValueError):
    """Refuse a dst that is a source folder, or that exists holding anything but `writes` (the names a
    writer writes: its own earlier output is replaced, nothing else ever is)."""
    if os.path.exists(dst) and any(src and os.path.exists(src) and os.path.samefile(src, dst) for src in sources):
        raise error(f"{dst} is the source folder: write to another one")
    foreign = (sorted(set(os.listdir(dst)) - set(writes)) if os.path.isdir(dst) else
               [os.path.basename(dst)] if os.path.exists(dst) else [])
    if foreign:
        raise error(f"{dst} exists and is not this command's own output ({', '.join(foreign[:3])}"
                    f"{', ...' if len(foreign) > 3 else ''}): choose another destination")


def atomic_dir(out_dir, write):
    """Call write(tmp_dir), then move tmp_dir into place: a crash never leaves a half-written out_dir
    (a kill between the two renames leaves out_dir.old and out_dir.tmp, complete: see owl/train/state.py)."""
    out_dir = os.path.abspath(out_dir)
    tmp, old = out_dir + ".tmp", out_dir + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
    except OSError as e:
        raise OSError(f"{out_dir}: cannot write there ({e.strerror})") from None
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(out_dir):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
