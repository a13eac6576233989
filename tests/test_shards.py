"""owl/train/shards.py on shards the tests write: brace ranges and folders; members grouped into samples
by key; the streams of two processes x two DataLoader workers split an epoch disjointly and cover it;
a resumed stream continues exactly; bad members are skipped and counted; memory does not grow with the
number of shards (measured in a subprocess)."""
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import owl

from owl.train.data import DataError
from owl.train.shards import (ShardCaptions, check_shards, epoch_units, expand_braces, identity, shard_files, split_data,
                              unit_samples)
from tests.conftest import REF, ROOT

pytestmark = pytest.mark.usefixtures("one_thread")
TOK = os.path.join(REF, "mplug_owl", "tokenizer.model")


def png(seed, side=20):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_tar(path, members):
    """members: [(name, bytes)] in order (None bytes: a directory entry)."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def caption_shards(folder, n_shards, per_shard, side=20):
    """n_shards shards of per_shard samples KEY.png + KEY.txt; keys are globally unique."""
    os.makedirs(folder, exist_ok=True)
    for s in range(n_shards):
        members = []
        for i in range(per_shard):
            key = f"{s:02d}{i:04d}"
            members += [(f"{key}.png", png(s * 1000 + i, side)), (f"{key}.txt", f"shard {s} sample {i}".encode())]
        write_tar(os.path.join(folder, f"{s:05d}.tar"), members)
    return f"{folder}/{{00000..{n_shards - 1:05d}}}.tar"


def dataset(spec, **kw):
    kw = {"tokenizer_file": TOK, "image_tokens": 65, "max_length": 512, "image_size": 56, "batch_size": 2,
          "seed": 0, **kw}
    return ShardCaptions(shard_files(spec), **kw)


def batches(ds, n):
    """The first n batches through the dataset's own DataLoader (its workers), without advance()."""
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=ds.workers, collate_fn=identity)
    out = []
    for b in loader:
        out.append(b)
        if len(out) == n:
            return out


# ----------------------------------------------------------------------------- which files

def test_brace_ranges_lists_and_folders(tmp_path):
    assert expand_braces("caps/{00000..00002}.tar") == ["caps/00000.tar", "caps/00001.tar", "caps/00002.tar"]
    assert expand_braces("{8..10}.tar") == ["8.tar", "9.tar", "10.tar"]  # no leading zero: no padding
    assert expand_braces("{a,b}/{0..1}.tar") == ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
    assert split_data("x/{a,b}.tar,y.jsonl") == ["x/{a,b}.tar", "y.jsonl"]
    for bad in ("caps/{0..2.tar", "caps/{x}.tar"):
        with pytest.raises(DataError, match=r"--data caps/"):
            expand_braces(bad)
    spec = caption_shards(str(tmp_path / "caps"), 3, 1)
    assert shard_files(spec) == shard_files(str(tmp_path / "caps")) == [str(tmp_path / "caps" / f"0000{i}.tar")
                                                                         for i in range(3)]
    assert shard_files(str(tmp_path / "a.jsonl")) is None  # not shards: train.py reads JSON as before
    with pytest.raises(DataError, match=r"00003\.tar: no such shard \(from .*\{00000\.\.00003\}\.tar\)"):
        shard_files(f"{tmp_path}/caps/{{00000..00003}}.tar")
    with pytest.raises(DataError, match="mixes .tar shards with other files"):
        shard_files(f"{spec},{tmp_path}/a.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="a folder without .tar shards"):
        shard_files(str(tmp_path / "empty"))


def test_members_sharing_a_key_make_a_sample(tmp_path):
    f = tmp_path / "s.tar"
    write_tar(f, [("d", None), ("a/001.jpg", b"J1"), ("a/001.txt", b"one"), ("README", b"no extension, skipped"),
                  ("a/002.PNG", b"P2"), ("a/002.json", b'{"caption": "two"}'), ("a/002.npy", b"ignored"),
                  ("a/003.txt", b"three"), ("a/003.tar.gz.txt", b"key a/003, extension tar.gz.txt")])
    got = list(unit_samples(str(f)))
    assert [k for k, _ in got] == ["a/001", "a/002", "a/003"]
    assert got[0][1] == {"jpg": b"J1", "txt": b"one"} and got[1][1] == {"png": b"P2", "json": b'{"caption": "two"}'}
    assert got[2][1] == {"txt": b"three"}  # 'tar.gz.txt' is not a caption extension
    assert [k for k, _ in unit_samples(str(f), part=1, parts=2)] == ["a/002"]
    assert [k for k, _ in unit_samples(str(f), skip=2)] == ["a/003"]


# ----------------------------------------------------------------------------- processes and workers

@pytest.mark.parametrize("n_shards,workers", [(3, 2), (5, 0)])  # fewer shards than streams; whole shards
def test_two_processes_split_each_epoch_disjointly_and_cover_it(tmp_path, n_shards, workers):
    spec = caption_shards(str(tmp_path), n_shards, 5)
    every = {f"{s:05d}.tar/{s:02d}{i:04d}" for s in range(n_shards) for i in range(5)}
    seen = []
    for rank in (0, 1):
        got = [x for b in batches(dataset(spec, rank=rank, world=2, workers=workers, buffer=3), 30)
               for x in b["samples"]]
        epoch0 = [w for e, w in got if e == 0]
        assert len(epoch0) == len(set(epoch0)) and {e for e, _ in got} >= {0, 1}  # once each, then on
        seen.append(set(epoch0))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == every
    streams = 2 * max(1, workers)
    units = [u for s in range(streams) for u in epoch_units(n_shards, s, streams, seed=0, epoch=0)]
    assert len(units) == len(set(units)) == n_shards * max(1, -(-streams // n_shards))


def test_the_shuffle_is_seeded_and_shuffles(tmp_path):
    spec = caption_shards(str(tmp_path), 2, 6)
    order = lambda seed: [w for b in batches(dataset(spec, seed=seed, buffer=4), 6) for _, w in b["samples"]]
    assert order(0) == order(0) and order(0) != order(1)
    assert order(0)[:6] != sorted(order(0)[:6])  # not the file order


def test_a_resumed_stream_continues_exactly(tmp_path):
    spec = caption_shards(str(tmp_path), 3, 5)
    make = lambda: dataset(spec, workers=2, buffer=4, batch_size=3)
    straight = batches(make(), 9)
    first = make()
    for _, b in zip(range(5), first.batches()):  # 5 batches: an odd number, so the next turn is worker 1's
        assert b["samples"] == straight[first.taken - 1]["samples"]
    state = json.loads(json.dumps(first.state_dict()))  # what the checkpoint's JSON holds
    resumed = make()
    assert resumed.load_state_dict(state)
    rest = batches(resumed, 4)
    for a, b in zip(straight[5:], rest):
        assert a["samples"] == b["samples"] and a["position"] == b["position"]
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    assert not make().load_state_dict({**state, "workers": 3})  # another layout: starts over


# ----------------------------------------------------------------------------- bad input

def test_bad_members_are_skipped_and_counted(tmp_path):
    good = lambda k: [(f"{k}.png", png(len(k))), (f"{k}.txt", f"caption {k}".encode())]
    write_tar(tmp_path / "0.tar", good("a") + [("b.jpg", b"not a jpeg"), ("b.txt", b"x")]
              + [("c.png", png(3))] + [("d.txt", b"no image")] + [("e.png", png(4)), ("e.json", b'{"caption": "e"}')]
              + [("f.png", png(5)), ("f.json", b'{"url": "no caption"}')])
    write_tar(tmp_path / "1.tar", good("g") + good("h") + good("i"))
    with tarfile.open(tmp_path / "1.tar") as tf:
        cut = tf.getmember("h.png").offset_data + 10
    with open(tmp_path / "1.tar", "r+b") as f:  # cut inside h.png: a tar that ends early (a partial download)
        f.truncate(cut)
    # batch 1 and an epoch in: the 4th batch (epoch 1's first) carries the last bad ones of epoch 0
    got = batches(dataset(str(tmp_path), batch_size=1, buffer=100), 4)
    assert sorted(w for b in got for e, w in b["samples"] if e == 0) == ["0.tar/a", "0.tar/e", "1.tar/g"]
    bad = {m for b in got for m in b["bad"]}
    assert len(bad) == 5, bad
    assert any(m.startswith("0.tar/b.jpg: cannot read image") for m in bad)
    assert {"0.tar/c: no caption (.txt, or .json with \"caption\")", "0.tar/d: no image (jpg, jpeg, png, webp)",
            "0.tar/f: no caption (.txt, or .json with \"caption\")"} < bad
    assert any(m.startswith(f"{tmp_path}/1.tar: ends early or is corrupt after 1 sample(s)") for m in bad)


def test_check_data_counts_every_sample(tmp_path, capsys):
    caption_shards(str(tmp_path), 2, 3)
    write_tar(tmp_path / "00002.tar", [("x.png", png(1)), ("x.txt", b"fine"), ("y.png", b"broken"), ("y.txt", b"no")])
    tok = owl.Tokenizer(TOK, 65)
    c = check_shards(shard_files(str(tmp_path)), tok, 512)
    out = capsys.readouterr().out
    assert c["shards"] == 3 and c["samples"] == 8 and c["usable"] == 7 and c["bad"] == 1, c
    assert "shards: 3, samples: 8" in out and "bad (skipped in training): 1 (first: 00002.tar/y.png: " in out
    assert c["targets"] == sum(len(tok.encode(f"shard {s} sample {i}")) + 1 for s in range(2) for i in range(3)) \
        + len(tok.encode("fine")) + 1  # each caption and its EOS
    captions = [f"shard {s} sample {i}" for s in range(2) for i in range(3)] + ["fine"]
    long = sum(len(tok.encode(c)) > 3 for c in captions)  # max_length 70: BOS, 65 image slots, 3 tokens, EOS
    assert 0 < long < 7 and check_shards(shard_files(str(tmp_path)), tok, 70, log=lambda m: None)["too_long"] == long


def test_an_epoch_without_a_usable_sample_stops(tmp_path):
    write_tar(tmp_path / "0.tar", [("a.txt", b"no image"), ("b.txt", b"none either")])
    with pytest.raises(DataError, match="a whole epoch of its shards without a usable sample"):
        batches(dataset(str(tmp_path)), 1)


# ----------------------------------------------------------------------------- memory

READ = """
import resource, sys, torch
sys.path.insert(0, {root!r})
from tests.test_shards import dataset, identity
n, names = int(sys.argv[1]), set()
loader = torch.utils.data.DataLoader(dataset(sys.argv[2], batch_size=8, buffer=50), batch_size=None, collate_fn=identity)
for b in loader:  # one epoch, the batches dropped as a training loop drops them
    names |= {{w for _, w in b["samples"]}}
    if len(names) == n:
        break
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_memory_does_not_grow_with_the_number_of_shards(tmp_path):
    one = tmp_path / "one.tar"  # 40 samples of 48 KiB noise each: ~2 MB a shard
    write_tar(one, [m for i in range(40) for m in ((f"{i:03d}.png", png(i, side=128)), (f"{i:03d}.txt", b"noise"))])
    for n in (2, 20):
        (tmp_path / str(n)).mkdir()
        for s in range(n):
            os.link(one, tmp_path / str(n) / f"{s:05d}.tar")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rss = {}
    for n in (2, 20):
        r = subprocess.run([sys.executable, "-c", READ.format(root=ROOT), str(40 * n), str(tmp_path / str(n))],
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        rss[n] = int(r.stdout.split()[-1]) / 1024  # KiB -> MiB
    print(f"peak RSS reading 2 shards (4 MB): {rss[2]:.1f} MiB, 20 shards (39 MB): {rss[20]:.1f} MiB")
    assert rss[20] - rss[2] < 8, rss  # 35 MB more data; held in memory it would show


# ----------------------------------------------------------------------------- train.py on shards

def shard_run(spec, out, *extra):
    from tests.test_train import stage1_args
    args = stage1_args(out, out, "--batch-size", "2", "--max-steps", "4", "--save-every", "2", "--workers", "2",
                       "--shuffle-buffer", "5", *extra)
    args[args.index("--data") + 1] = spec
    return args


def test_stage1_on_shards_resumes_exactly_and_skips_bad_members(tmp_path, capsys):
    import train
    from tests.test_train import assert_same
    caption_shards(str(tmp_path / "caps"), 3, 2)
    write_tar(tmp_path / "caps" / "00003.tar", [("x.png", png(7)), ("x.txt", b"fine"), ("y.png", b"corrupt"),
                                                ("y.txt", b"bad image")])
    spec = f"{tmp_path}/caps/{{00000..00003}}.tar"  # 8 samples; 2 worker streams of 2 shards each
    straight, split, restart = tmp_path / "straight", tmp_path / "split", tmp_path / "restart"
    train.main(shard_run(spec, straight))
    out = capsys.readouterr().out
    assert "data: 4 shards, read as a stream" in out
    # each stream takes 2 batches of 2 in 4 steps, more than its epoch holds: the corrupt image is met
    assert "skipped (bad image): 00003.tar/y.png: cannot read image (cannot identify image file)" in out, out[-2000:]
    losses = lambda d: [json.loads(l)["loss"] for l in open(d / "metrics.jsonl")]
    for d in (split, restart):
        train.main(shard_run(spec, d, "--stop-at", "2"))
    state = json.load(open(split / "checkpoint" / "state.json"))
    assert state["step"] == 2 and state["data"][0]["batches"] == 2 and len(state["data"][0]["positions"]) == 2
    train.main(shard_run(spec, split, "--resume"))
    assert_same(straight / "model.safetensors", split / "model.safetensors", 1e-6)
    assert len(losses(straight)) == 4 and np.allclose(losses(straight), losses(split), atol=1e-6, rtol=0)
    # the saved position is what makes it exact: resumed with the streams started over, it differs
    state["data"][0]["positions"] = {}
    (restart / "checkpoint" / "state.json").write_text(json.dumps(state))
    train.main(shard_run(spec, restart, "--resume"))
    assert not np.allclose(losses(straight)[2:], losses(restart)[2:], atol=1e-6, rtol=0)


def test_check_data_and_the_bad_fraction_on_shards(tmp_path, capsys):
    import train
    from tests.test_train import LLAMA
    caption_shards(str(tmp_path / "caps"), 2, 3)
    assert train.main(["--check-data", "--llm-init", LLAMA, "--data", str(tmp_path / "caps")]) is None
    assert "shards: 2, samples: 6 (image + caption)" in capsys.readouterr().out
    (tmp_path / "bad").mkdir()  # every other image corrupt: past 20 samples seen, 50% > --max-bad-fraction 5%
    write_tar(tmp_path / "bad" / "0.tar", [m for i in range(30) for m in (
        (f"{i:02d}.png", png(i) if i % 2 else b"corrupt"), (f"{i:02d}.txt", b"a caption"))])
    with pytest.raises(DataError, match=r"of \d+ examples had unreadable images \(> --max-bad-fraction\)"):
        train.main(shard_run(str(tmp_path / "bad"), tmp_path / "out", "--max-steps", "8", "--workers", "0"))
