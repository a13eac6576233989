"""The measuring tools of bench/run.py: building the models, racing contenders, bandwidth, the table."""
import os
import statistics
import time

import torch

import owl

try:
    import transformers
    transformers.logging.set_verbosity_error()
except ImportError:  # an optional bench dependency (bench/requirements.txt): no HF rows then
    transformers = None


def build(cfg, device, dtype):
    """An MplugOwl with random weights, allocated once on `device` in `dtype` (no fp32 copy first)."""
    with torch.device("meta"):
        model = owl.MplugOwl(cfg).to(dtype)
    model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    return model.eval()


def hf_twin(llm, device):
    """HF LlamaForCausalLM holding the very tensors of our Llama."""
    c = llm.config
    hcfg = transformers.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                    intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
                                    num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                                    max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                                    rope_theta=c.rope_theta, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                                    pad_token_id=0)
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hcfg)
    hf.load_state_dict(llm.state_dict(), assign=True, strict=True)
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hcfg).to(device)  # its buffers are not in the state dict
    hf.generation_config.eos_token_id = None  # no EOS: generate gives exactly max_new_tokens, like owl
    return hf.eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def race(fns, repeats, device):
    """Run each fn once to warm up, then `repeats` rounds in rotating order: median seconds of each,
    and each fn's results. The times of every round go to race.rounds (for paired ratios)."""
    names = list(fns)
    results = {n: fns[n]() for n in names}
    times = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            sync(device)
            t = time.perf_counter()
            fns[n]()
            sync(device)
            times[n].append(time.perf_counter() - t)
    race.rounds = times
    return {n: statistics.median(times[n]) for n in names}, results


def paired(a, b):
    """Median over the rounds of the last race of time(b) / time(a): a's speed-up, robust to load drift."""
    return statistics.median(tb / ta for ta, tb in zip(race.rounds[a], race.rounds[b]))


def bandwidth_gbs(device, repeats=10):
    """Read bandwidth: sum a 256 MiB tensor (the weights are read, not written, when decoding).
    The best round, not the median: it is a capacity, and other processes only ever lower it."""
    x = torch.ones(64 * 2 ** 20, device=device)
    race({"sum": lambda: x.sum().item()}, repeats, device)
    return x.numel() * 4 / min(race.rounds["sum"]) / 1e9


def cores_busy(seconds=1.0):
    """How many cores other processes keep busy (from /proc/stat, while this one sleeps)."""
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]  # user nice system idle iowait ...
        return sum(v), v[3] + v[4]
    try:
        t0, idle0 = read()
        time.sleep(seconds)
        t1, idle1 = read()
    except OSError:  # not Linux
        return 0.0
    return (1 - (idle1 - idle0) / max(1, t1 - t0)) * os.cpu_count()


def set_threads(requested):
    """requested threads, or (0) 2 when other processes leave the cores free and 1 when they do not:
    OpenMP threads meet at a barrier after every op, so when another process holds one of two cores
    each barrier waits for a time slice, and 2 threads run many times slower than 1."""
    n = requested or (2 if cores_busy() < 0.3 else 1)
    torch.set_num_threads(n)
    return n


def print_table(rows, train):
    print(f"\n| {'what':<52} | {'owl':>8} | {'HF':>8} | {'owl/HF':>6} | notes")
    print(f"|{'-' * 54}|{'-' * 10}|{'-' * 10}|{'-' * 8}|------")
    for what, ours, theirs, note in rows:
        ratio = ""
        if theirs is not None:
            ratio = f"{theirs / ours:.2f}x" if "(ms" in what else f"{ours / theirs:.2f}x"
        hf = f"{theirs:8.{1 if theirs >= 10 else 2}f}" if theirs is not None else f"{'':8}"
        print(f"| {what:<52} | {ours:8.{1 if ours >= 10 else 2}f} | {hf} | {ratio:>6} | {note.lstrip('; ')}")
    for what, note in train:
        print(f"| {what:<52} | {'':8} | {'':8} | {'':>6} | {note}")
