"""Command line for the scripted experts: ``python -m mimictest.demos <task> --episodes N --out PATH``."""

from __future__ import annotations

import argparse

from mimictest.demos.calvin import add_command as add_calvin_command
from mimictest.demos.metaworld import add_command as add_metaworld_command


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
    pusht = tasks.add_parser("pusht", help="PushT (gym-pusht), disc target-position actions (diffusion_policy zarr)")
    pusht.add_argument("--episodes", type=int, required=True, help="episodes to attempt")
    pusht.add_argument("--out", required=True, help="output .zarr folder")
    pusht.add_argument("--seed", type=int, default=0, help="episode i uses seed SEED + i")
    pusht.add_argument("--keep-failures", action="store_true", help="also save episodes that never reach 95%% coverage")
    pusht.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    for name, what in (("transfer-cube", "transfer cube (right arm hands the cube to the left)"),
                       ("insertion", "insertion (peg into socket)")):
        aloha = tasks.add_parser(f"aloha-{name}", help=f"ALOHA sim {what}, ACT's scripted expert (ACT hdf5 folder)")
        aloha.add_argument("--episodes", type=int, required=True, help="episodes to attempt; failures are dropped")
        aloha.add_argument("--out", required=True, help="output folder for episode_<i>.hdf5 files")
        aloha.add_argument("--seed", type=int, default=0, help="episode i places the objects with seed SEED + i")
        aloha.add_argument("--cams", nargs="*", default=["top"], help="cameras to record (none: low-dim only)")
        aloha.add_argument("--image-size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"), help="image size")
        aloha.add_argument("--overwrite", action="store_true", help="replace the episodes already in the folder")
    add_metaworld_command(tasks)
    add_calvin_command(tasks)
    args = parser.parse_args(argv)

    if args.task == "lift":
        from mimictest.demos.lift import generate_lift_demos

        generate_lift_demos(args.out, args.episodes, image=args.image, seed=args.seed, overwrite=args.overwrite)
    elif args.task.startswith("aloha-"):
        from mimictest.demos.aloha import generate_aloha_demos

        generate_aloha_demos(
            args.task[len("aloha-"):].replace("-", "_"), args.out, args.episodes, seed=args.seed,
            cams=tuple(args.cams), image_size=tuple(args.image_size), overwrite=args.overwrite,
        )
    elif args.task == "pusht":
        from mimictest.demos.pusht import generate_pusht_demos

        generate_pusht_demos(args.out, args.episodes, seed=args.seed, keep_failures=args.keep_failures,
                             overwrite=args.overwrite)
    elif args.task in ("metaworld", "calvin"):
        args.run(args)


if __name__ == "__main__":
    main()
