"""The CPU demo, `python -m owl.demo OUT` (__main__.py): the whole method on a synthetic world in minutes.

  world.py      the synthetic world: scenes, images, captions, questions, the stand-ins' text
  files.py      the world's files: images, data files in train.py's formats, a tokenizer
  stand_ins.py  stand-ins for the pretrained LLaMA and CLIP, written in the HF layouts stage 1 reads
  shipped.py    the shipped stand-ins (pretrained/llm, pretrained/clip): their check, their regeneration
  run.py        run_demo: world, stand-ins, both stages as `python train.py ...`, evaluation
  report.py     report.json, report.md, loss.png, samples
  probe.py      does the stand-in LLM look things up by the question's words (a research probe)
"""
