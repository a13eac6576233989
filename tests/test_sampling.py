"""Sampling (owl.generate.sample, behind chat.py --temperature/--top-k/--top-p/--seed): the empirical
distribution of many seeded draws against the one each rule defines."""
import pytest
import torch

import owl
from owl.generate import sample

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
N = 40000  # draws: the frequency of a probability-p token is within 0.01 of p with ~5 sigma to spare


def frequencies(logits, **kw):
    draws = sample(logits.repeat(N, 1), generator=torch.Generator().manual_seed(0), **kw)  # (N,)
    return torch.bincount(draws, minlength=logits.shape[-1]).float() / N


def test_greedy_is_the_argmax():
    logits = torch.randn(5, 11)
    assert torch.equal(sample(logits), logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_samples_softmax_of_logits_over_t(temperature):
    logits = PROBS.log()[None]
    want = torch.softmax(logits[0] / temperature, -1)
    torch.testing.assert_close(frequencies(logits, temperature=temperature), want, atol=0.01, rtol=0)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_keeps_exactly_the_k_most_likely(k):
    logits = PROBS.log()[None]
    f = frequencies(logits, temperature=1.0, top_k=k)
    want = torch.zeros(4)
    want[:k] = PROBS[:k] / PROBS[:k].sum()  # renormalised over the k kept
    torch.testing.assert_close(f, want, atol=0.01, rtol=0)
    assert (f[:k] > 0).all() and (f[k:] == 0).all()


@pytest.mark.parametrize("top_p, kept", [(1e-6, 1), (0.4, 1), (0.6, 2), (0.9, 3), (0.99, 4)])
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, kept):
    logits = PROBS.log()[None]  # cumulative mass in order: 0.5, 0.8, 0.95, 1.0
    f = frequencies(logits, temperature=1.0, top_p=top_p)
    want = torch.zeros(4)
    want[:kept] = PROBS[:kept] / PROBS[:kept].sum()
    torch.testing.assert_close(f, want, atol=0.01, rtol=0)
    assert (f[kept:] == 0).all()  # at least one token always stays (top_p -> 0 is greedy)


def test_a_seed_repeats_and_another_seed_differs():
    logits = torch.zeros(64, 50)  # uniform: every draw is a coin flip
    draw = lambda seed: sample(logits, temperature=1.0, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(7), draw(7)) and not torch.equal(draw(7), draw(8))


def test_generate_with_a_seed_repeats(owl_model):
    model, tok = owl_model
    prompt = owl.build_prompt([(0, "Say something.", None)])
    run = lambda seed: owl.generate(model, tok, prompt, max_new_tokens=12, temperature=1.5, top_k=50, seed=seed)
    assert run(3) == run(3)
    assert len({tuple(run(s)) for s in range(4)}) > 1  # sampling, not greedy


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 1e-6])
def test_report_5_2_a_tiny_temperature_is_greedy_not_nan(temperature):
    """redteam-2 5.2: logits / 1e-40 overflowed fp32 and the draw raised on NaN probabilities."""
    logits = torch.tensor([[-5.0, 29.0, 30.0, 12.0]] * 3)  # (NaN probabilities made the draw token 0)
    assert sample(logits, temperature=temperature, generator=torch.Generator().manual_seed(0)).tolist() == [2, 2, 2]
