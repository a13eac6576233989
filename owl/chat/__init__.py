"""chat.py's library: the multi-turn session engine (session.py) and a model folder made ready to
answer (load.py), both shared with `python -m owl.eval`."""
