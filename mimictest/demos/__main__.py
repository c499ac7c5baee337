"""Command line for the scripted experts: ``python -m mimictest.demos <task> --episodes N --out PATH``."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    """Parse the sub-command and generate demos for that task."""
    parser = argparse.ArgumentParser(prog="python -m mimictest.demos", description="Generate scripted-expert demos.")
    tasks = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    lift = tasks.add_parser("lift", help="robosuite Lift with a Panda, absolute OSC_POSE actions (robomimic hdf5)")
    lift.add_argument("--episodes", type=int, required=True, help="episodes to attempt; failures are dropped")
    lift.add_argument("--out", required=True, help="output hdf5 path")
    lift.add_argument("--image", action="store_true", help="also record 84x84 agentview and eye-in-hand images")
    lift.add_argument("--seed", type=int, default=0, help="episode i uses seed SEED + i")
    lift.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)

    if args.task == "lift":
        from mimictest.demos.lift import generate_lift_demos

        generate_lift_demos(args.out, args.episodes, image=args.image, seed=args.seed, overwrite=args.overwrite)


if __name__ == "__main__":
    main()
