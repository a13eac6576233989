"""chat.py's library: the multi-turn session engine (session.py) and the OwlEval runner (owleval.py)."""
