"""The CPU demo, `python train.py --demo OUT`: the whole method on a synthetic world in minutes.

  world.py      the synthetic world: images, captions, instructions, the stand-ins' text, a tokenizer
  stand_ins.py  stand-ins for the pretrained LLaMA and CLIP, written in the HF layouts stage 1 reads
  run.py        run_demo: world, stand-ins, both stages through train.py, evaluation
  report.py     report.json, report.md, loss.png, samples
  probe.py      does the stand-in LLM look things up by the question's words (a research probe)
"""
