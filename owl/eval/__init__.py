"""`python -m owl.eval` (__main__.py): the paper's OwlEval (owleval.py) and multiple-choice benchmarks
scored by log-likelihood (choices.py), on a model folder loaded as chat.py loads it (owl/chat/load.py)."""
