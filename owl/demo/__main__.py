"""python -m owl.demo OUT: the whole method on a synthetic world, on a CPU in minutes (run.py).

    python -m owl.demo OUT                       # the stand-ins, stage 1, stage 2, the report
    python -m owl.demo OUT --ablation            # + the paper's Table 2 arms and the frozen-ViT control
    python -m owl.demo OUT --seed S --seeds N    # another world; N training seeds per arm
    python -m owl.demo --pretrain-stand-ins OUT  # make the shipped stand-ins again (shipped.py)
"""
import argparse
import sys

from .run import DemoError, run_demo, regenerate_stand_ins
from .shipped import StandInError


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m owl.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("out", metavar="OUT", help="the output folder: the world, the stand-ins, each stage's model, "
                   "report.md")
    p.add_argument("--ablation", action="store_true", help="also train the paper's ablation arms (stage 1 only, "
                   "stage 2 only) and the frozen-ViT control, with 95%% paired bootstrap intervals")
    p.add_argument("--seed", type=int, default=0, help="the world's seed (default: 0)")
    p.add_argument("--seeds", type=int, default=1, help="training seeds per arm, 0 .. N-1 (default: 1)")
    p.add_argument("--quick", action="store_true", help="a reduced run in a minute or two: it checks that "
                   "everything runs, its numbers mean nothing")
    p.add_argument("--pretrain-stand-ins", action="store_true", help="pretrain the stand-in LLM and CLIP from "
                   "scratch into OUT/llm and OUT/clip (the recipe of the shipped ones, deterministic for --seed)")
    p.add_argument("--stand-ins", metavar="DIR", default=None, help="read the stand-ins from DIR/llm and DIR/clip "
                   "(default: the shipped owl/demo/pretrained)")
    a = p.parse_args(argv)
    if a.seeds < 1 or not 0 <= a.seed < 2**31:
        p.error("need --seeds >= 1 and 0 <= --seed < 2**31")
    try:
        if a.pretrain_stand_ins:
            regenerate_stand_ins(a.out, quick=a.quick, seed=a.seed)
        else:
            run_demo(a.out, ablation=a.ablation, quick=a.quick, seed=a.seed, seeds=a.seeds, stand_ins=a.stand_ins)
    except (DemoError, StandInError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
