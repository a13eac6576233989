"""python -m owl.demo OUT: the whole method on a synthetic world, on a CPU in minutes (run.py).

    python -m owl.demo OUT                       # the stand-ins, stage 1, stage 2, the report
    python -m owl.demo OUT --ablation            # + the paper's Table 2 arms and the frozen-ViT control
    python -m owl.demo OUT --seed S --seeds N    # another world; N training seeds per arm
"""
import argparse
import sys

from .run import DemoError, run_demo


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
    a = p.parse_args(argv)
    if a.seeds < 1 or not 0 <= a.seed < 2**31:
        p.error("need --seeds >= 1 and 0 <= --seed < 2**31")
    try:
        run_demo(a.out, ablation=a.ablation, quick=a.quick, seed=a.seed, seeds=a.seeds)
    except (DemoError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
