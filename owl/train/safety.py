"""What keeps a training run's output whole whatever happens to the run: one run at a time per OUT
(a lock), a fresh run only into a folder that is new or its own, SIGINT/SIGTERM turned into "save a
checkpoint after this step and stop", and metrics.jsonl rewritten atomically on resume (a torn last
line, what a kill during a write leaves, is dropped with a note). The checkpoint's own atomic save
and its recovery are in state.py.
"""
import contextlib
import fcntl
import functools
import json
import os
import signal
import socket
import threading

from ..fileio import check_destination, write_atomic
from .config import TrainError
from .state import recover_checkpoint


class Stopped(Exception):
    """Training stopped by SIGINT/SIGTERM after saving a checkpoint; train.py exits with 128 + the signal."""

    def __init__(self, sig, step, ckpt_dir):
        self.code = 128 + sig
        super().__init__(f"stopped by {signal.Signals(sig).name} at step {step}: the checkpoint {ckpt_dir} is "
                         f"saved; the same command with --resume continues exactly")


# ----------------------------------------------------------------------------- OUT

LOCK = ".train.lock"
# Every name train.py writes into OUT (owl.fileio.atomic_dir adds .tmp/.old to checkpoint and .export).
WRITES = ("metrics.jsonl", "metrics.jsonl.tmp", "checkpoint", "checkpoint.tmp", "checkpoint.old", LOCK, ".export",
          ".export.tmp", ".export.old", "config.json", "model.safetensors", "tokenizer.model", "preprocessor_config.json",
          "adapter.safetensors", "adapter.json", "adapter.safetensors.tmp", "adapter.json.tmp")


def check_out(out, sources, fresh):
    """OUT is never one of the run's model folders (--init X --out X would overwrite the base); a fresh
    run's OUT is new, empty, or an earlier run's output (metrics, a checkpoint or the lock, and only
    names train.py writes): a folder of anything else is refused before anything is written."""
    check_destination(out, WRITES if fresh else os.listdir(out) if os.path.isdir(out) else (), sources, TrainError)
    have = set(os.listdir(out)) if os.path.isdir(out) else set()
    links = sorted(n for n in have & set(WRITES) if os.path.islink(os.path.join(out, n)))
    if links:  # a link where the run writes would send the write outside OUT (redteam-2 6.1/6.2)
        raise TrainError(f"--out {out} holds a link where the run writes ({os.path.join(out, links[0])}): "
                         f"remove it, or choose another --out")
    if fresh and have and not have & {"metrics.jsonl", LOCK, "checkpoint", "checkpoint.tmp", "checkpoint.old"}:
        raise TrainError(f"--out {out} holds a model folder ({', '.join(sorted(have)[:3])}), not a training run's "
                         f"output: choose another --out")
    if fresh and have & {"model.safetensors", "adapter.safetensors"}:  # a finished run (redteam-2 3.17)
        raise TrainError(f"--out {out} holds a finished run's model: pass --resume to continue it, or choose "
                         f"another --out")


@contextlib.contextmanager
def hold_out(out, ckpt_dir, *, resume, sources, master):
    """A run's hold on OUT, for its duration: the master checks OUT (check_out), locks it (RunLock),
    puts back a checkpoint a kill left half-saved (state.recover_checkpoint) and only then decides
    between a fresh run and --resume. Yields the lock (None on the other ranks: they never write)."""
    if resume and not any(os.path.isdir(ckpt_dir + s) for s in ("", ".tmp", ".old")):
        raise TrainError(f"--resume: {ckpt_dir} does not exist")
    if not master:
        yield None
        return
    check_out(out, sources, fresh=not resume)
    log = functools.partial(print, flush=True)  # (a run killed later keeps its notes in its log)
    with RunLock(out, log) as lock:
        recover_checkpoint(ckpt_dir, log)
        if os.path.isdir(ckpt_dir) and not resume:
            raise TrainError(f"{ckpt_dir} exists: pass --resume to continue it, or choose another --out")
        if resume and not os.path.isdir(ckpt_dir):
            raise TrainError(f"--resume: {ckpt_dir} does not exist")
        yield lock


class RunLock:
    """OUT/.train.lock, flock()ed while a run writes into OUT: a second run into the same OUT stops at
    once. The kernel drops the lock of a process that dies (SIGKILL, a crash): the next run takes it
    over and says whose it was. Creating it is also the check that OUT can be written, before training.
    An OUT this lock created is removed again if the run leaves nothing in it (an error before training)."""

    def __init__(self, out, log=print):
        self.out, self.file, self.log, self.fd = out, os.path.join(out, LOCK), log, None
        self.made = not os.path.exists(out)

    def __enter__(self):
        try:
            os.makedirs(self.out, exist_ok=True)
            while self.fd is None:
                if os.path.islink(self.file):  # never follow a link planted in OUT (redteam-2 6.1)
                    raise TrainError(f"{self.file} is a link: remove it, or choose another --out")
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.read(fd, 200).decode(errors="replace") or "a process starting"
                    os.close(fd)
                    raise TrainError(f"--out {self.out} is in use by another run ({holder}; {self.file}): wait for "
                                     f"it to end, or choose another --out") from None
                try:  # the holder may have removed the file between our open and flock: then retry
                    same = os.path.samestat(os.fstat(fd), os.stat(self.file))
                except FileNotFoundError:
                    same = False
                if same:
                    self.fd = fd
                else:
                    os.close(fd)
            before = os.read(self.fd, 200).decode(errors="replace")
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        except OSError as e:
            raise TrainError(f"--out {self.out}: cannot write there ({e.strerror})") from None
        if before:
            self.log(f"note: took over {self.file} from {before}, which is no longer running")
        return self

    def __exit__(self, *exc):
        try:
            os.unlink(self.file)
            if self.made:
                os.rmdir(self.out)  # only if empty
        except OSError:
            pass
        os.close(self.fd)


def worker_init(lock):
    """A DataLoader worker_init_fn: a worker ignores SIGINT/SIGTERM (the main process stops the run,
    after a step, and still needs its data), and closes its copy of the lock (so that the lock goes
    with the run, not with the last worker)."""
    return functools.partial(_worker_init, None if lock is None else lock.fd)


def _worker_init(lock_fd, worker_id):
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    if lock_fd is not None:
        os.close(lock_fd)


# ----------------------------------------------------------------------------- signals

class StopSignals:
    """While the loop runs, SIGINT (Ctrl-C) and SIGTERM (what job schedulers send before a kill) set
    `signal`; the loop saves a checkpoint after the step in progress and stops. A second one stops at
    once (KeyboardInterrupt; the last saved checkpoint is intact). The handler only sets the flag:
    printing from a signal handler can break a print in progress."""

    def __init__(self):
        self.signal, self.old = None, {}

    def _handler(self, sig, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = sig

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self.old = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------- metrics.jsonl

def trim_metrics(file, step, log=print):
    """On resume, keep the lines of steps <= the checkpoint's (the later ones are about to be redone),
    rewritten atomically. A torn or unreadable line (a kill during a write) is dropped with a note."""
    if not os.path.isfile(file):
        return
    keep = []
    with open(file, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                s = json.loads(line)["step"]
                if not isinstance(s, int):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                log(f"note: {file}:{n}: dropped a torn or unreadable line")
                continue
            if s <= step:
                keep.append(line.rstrip("\n") + "\n")
    write_atomic(file, "".join(keep))
