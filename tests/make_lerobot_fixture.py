"""Write a LeRobotDataset (v3.0) with LeRobot's own writer, from PushT expert demos or an ACT-format ALOHA folder.

This made ``tests/data/lerobot_pusht`` (3 PushT expert episodes, seeds 0..2, shaped like the hub's
``lerobot/pusht``: one 96x96 video camera ``observation.image``, ``observation.state`` = the agent's
position (2), ``action`` (2), 10 fps, one task string) and ``tests/data/lerobot_pusht_expected.npz``
(what LeRobot's own reader returns for some rows, and the source images before encoding)::

    python tests/make_lerobot_fixture.py --out tests/data/lerobot_pusht --episodes 3
    python tests/make_lerobot_fixture.py --out Datasets/lerobot_pusht_expert --episodes 100     # bench set
    python tests/make_lerobot_fixture.py --out Datasets/lerobot_aloha --from-aloha Datasets/aloha_transfer_cube_120x160

It runs in two interpreters: this one (mimictest's) makes or reads the demos and saves them as one
npz; LeRobot 0.6.1's venv (Python >= 3.12, made by ``shared/peers/lerobot/setup.sh``, plus
``pip install "lerobot[dataset]==0.6.1"`` there) reruns this file with ``--write`` to record them with
``LeRobotDataset.create`` / ``add_frame`` / ``save_episode`` / ``finalize`` and read them back.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

PUSHT_TASK = "Push the T-shaped block onto the T-shaped target."  # lerobot/pusht's task string
ALOHA_TASK = "Pick up the cube with the right arm and transfer it to the left arm."
CHECK_ROWS = 8  # rows whose LeRobot-decoded frames are saved for the test


def export_pusht(episodes: int, npz: str) -> None:
    """Run the PushT expert (seeds 0 .. episodes - 1) and save its episodes as flat arrays."""
    from mimictest.data.pusht import PushTDataset
    from mimictest.demos.pusht import generate_pusht_demos

    with tempfile.TemporaryDirectory() as tmp:
        zarr_path = os.path.join(tmp, "pusht.zarr")
        generate_pusht_demos(zarr_path, episodes=episodes)
        data = PushTDataset(zarr_path, obs_mode="image", obs_horizon=1, chunk_size=1)
        np.savez(npz, episode_ends=data.episode_ends, action=data.action, state=data.low_dim,
                 **{f"image.{cam}": images for cam, images in data.rgb.items()}, fps=10, task=PUSHT_TASK,
                 robot_type="pusht")


def export_aloha(folder: str, npz: str) -> None:
    """Save an ACT-format ALOHA folder's episodes (every camera) as flat arrays."""
    import h5py

    from mimictest.data.aloha import AlohaDataset, episode_paths

    with h5py.File(episode_paths(folder)[0], "r") as f:
        cams = sorted(f["observations/images"].keys())
    data = AlohaDataset(folder, cams, obs_horizon=1, chunk_size=1)
    np.savez(npz, episode_ends=data.episode_ends, action=data.action, state=data.low_dim,
             **{f"image.{cam}": images for cam, images in data.rgb.items()}, fps=50, task=ALOHA_TASK,
             robot_type="aloha")


def write_with_lerobot(npz: str, out: str) -> None:
    """(LeRobot's venv) Record the npz's episodes with LeRobot's writer, then read some rows back with its reader."""
    import torch
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    src = np.load(npz)
    cams = sorted(k.split(".", 1)[1] for k in src.files if k.startswith("image."))
    key = {cam: "observation.image" if len(cams) == 1 and cam == "image" else f"observation.images.{cam}"
           for cam in cams}
    action, state, ends = src["action"], src["state"], src["episode_ends"]
    features = {
        "observation.state": {"dtype": "float32", "shape": (state.shape[1],), "names": None},
        "action": {"dtype": "float32", "shape": (action.shape[1],), "names": None},
        **{key[cam]: {"dtype": "video", "shape": src[f"image.{cam}"].shape[1:], "names": ["height", "width", "channels"]}
           for cam in cams},
    }
    dataset = LeRobotDataset.create(repo_id=f"mimictest/{os.path.basename(out)}", fps=int(src["fps"]),
                                    features=features, root=out, robot_type=str(src["robot_type"]), use_videos=True)
    for lo, hi in zip(np.concatenate(([0], ends[:-1])), ends):
        for t in range(lo, hi):
            dataset.add_frame({"observation.state": state[t], "action": action[t], "task": str(src["task"]),
                               **{key[cam]: src[f"image.{cam}"][t] for cam in cams}})
        dataset.save_episode()
    dataset.finalize()

    reader = LeRobotDataset(f"mimictest/{os.path.basename(out)}", root=out)
    rows = np.unique(np.linspace(0, len(action) - 1, CHECK_ROWS).round().astype(int))
    items = [reader[int(i)] for i in rows]
    expected = {"rows": rows, "state": np.stack([it["observation.state"].numpy() for it in items]),
                "action": np.stack([it["action"].numpy() for it in items]),
                "task": np.array([it["task"] for it in items])}
    for cam in cams:
        frames = torch.stack([it[key[cam]] for it in items])  # (n, 3, H, W) float in [0, 1]
        expected[f"lerobot.{cam}"] = (frames.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
        expected[f"source.{cam}"] = src[f"image.{cam}"][rows]
    np.savez_compressed(f"{os.path.normpath(out)}_expected.npz", **expected)
    print(f"LeRobot wrote {reader.num_episodes} episodes, {reader.num_frames} frames to {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the LeRobot dataset folder to write (must not exist)")
    parser.add_argument("--episodes", type=int, default=3, help="PushT expert episodes")
    parser.add_argument("--from-aloha", help="an ACT-format ALOHA folder to convert instead of PushT demos")
    parser.add_argument("--write", help=argparse.SUPPRESS)  # (LeRobot's venv) the npz to record
    parser.add_argument("--lerobot-python", default=os.environ.get("LEROBOT_PYTHON"),
                        help="LeRobot's venv python (default: what shared/peers/lerobot/setup.sh prints)")
    args = parser.parse_args()
    if args.write:
        write_with_lerobot(args.write, args.out)
        return
    if os.path.exists(args.out):
        raise SystemExit(f"{args.out!r} exists; remove it or choose another --out (datasets are never overwritten)")
    python = args.lerobot_python
    if python is None:
        setup = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "peers", "lerobot",
                             "setup.sh")
        python = subprocess.run(["bash", setup], check=True, capture_output=True, text=True).stdout.split()[-1]
    with tempfile.TemporaryDirectory() as tmp:
        npz = os.path.join(tmp, "episodes.npz")
        if args.from_aloha:
            export_aloha(args.from_aloha, npz)
        else:
            export_pusht(args.episodes, npz)
        partial = os.path.join(tmp, "dataset")
        subprocess.run([python, os.path.abspath(__file__), "--out", partial, "--write", npz], check=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})  # a local folder: never ask the hub
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        shutil.move(partial, args.out)  # only a finished dataset appears at --out
        shutil.move(f"{partial}_expected.npz", f"{os.path.normpath(args.out)}_expected.npz")


if __name__ == "__main__":
    sys.exit(main())
