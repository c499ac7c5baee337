"""Dataset playback: one episode's cameras side by side, its actions and state plotted under them, as an mp4.

    python -m mimictest.viz DATASET --episode 3 --out ep3.mp4 [--fps N] [--height PX]

The format is detected from the path, and the episode is read through that format's reader
(``mimictest.data.*``, images read lazily where the reader can), so playback shows exactly what
training sees:

======================  ====================================================  ==========================
format                  path                                                  state plotted
======================  ====================================================  ==========================
robomimic hdf5          ``*.hdf5`` file with ``data/demo_*``                  every low-dim obs key
PushT zarr              diffusion_policy replay-buffer ``*.zarr`` folder       agent position
ACT / ALOHA hdf5        folder of ``episode_<i>.hdf5``                        qpos (14)
Meta-World zarr         folder of ``metaworld_<task>_expert.zarr`` (or one)   hand xyz + gripper
LeRobotDataset          folder with ``meta/info.json``                        ``observation.state``
CALVIN                  GR-1 LMDB (``data.mdb``) or raw split folder          ``robot_obs`` (15)
======================  ====================================================  ==========================

Each frame is the cameras at that step (scaled to one height), a header naming the dataset, the
episode and its instruction, and the action and state curves of the whole episode (matplotlib,
drawn once) with a cursor at the step. Videos play at the data's control rate unless ``--fps``.
"""

from __future__ import annotations

import argparse
import glob
import os
from dataclasses import dataclass

import numpy as np

from mimictest.atomic import atomic_path
from mimictest.data.windows import WindowDataset

FORMATS = ("robomimic", "pusht", "aloha", "metaworld", "lerobot", "calvin")
FPS = {"robomimic": 20, "pusht": 10, "aloha": 50,  # robosuite's default control_freq; diffusion_policy's PushT; ACT's DT
       "metaworld": 80, "calvin": 30}  # Meta-World: 5 MuJoCo steps of 2.5 ms; CALVIN's control rate
PLOT_HEIGHT, HEADER_HEIGHT, MIN_WIDTH = 180, 34, 640  # pixels
MIN_CAMERA_HEIGHT, MAX_CAMERA_HEIGHT = 160, 360  # 84x84 robomimic images are shown at 168, ALOHA's 480 at 360
LEGEND_DIMS = 16  # curves with a legend entry each; more are drawn unlabelled
CURSOR = np.array([0, 0, 0], dtype=np.uint8)  # the step cursor, black: no curve is black


@dataclass
class Episode:
    """One episode as the viewer draws it.

    ``cameras`` ``{name: (T, H, W, 3) uint8}``, ``action`` ``(T, A)``, ``state`` ``(T, D)`` or
    ``None``; ``state_label`` says what the state is; ``title`` names the dataset and episode.
    """

    cameras: dict[str, np.ndarray]
    action: np.ndarray
    state: np.ndarray | None
    state_label: str
    title: str
    fps: float

    def __len__(self) -> int:
        return len(self.action)


def detect_format(path: str) -> str:
    """One of ``FORMATS`` from what is at ``path``; a one-line ``ValueError`` for anything else."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset not found: {path!r}")
    if os.path.isfile(path):
        if path.endswith((".hdf5", ".h5")):
            return "robomimic"
    else:
        names = os.listdir(path)
        if os.path.isfile(os.path.join(path, "meta", "info.json")):
            return "lerobot"
        if "data.mdb" in names or "lang_annotations" in names or any(n.endswith(".npz") for n in names):
            return "calvin"
        if any(n.startswith("episode_") and n.endswith(".hdf5") for n in names):
            return "aloha"
        if any(n.startswith("metaworld_") and n.endswith("_expert.zarr") for n in names) or (
                os.path.basename(os.path.normpath(path)).startswith("metaworld_") and ".zgroup" in names):
            return "metaworld"
        if ".zgroup" in names:
            return "pusht"
    raise ValueError(
        f"{path!r} is not a dataset mimictest reads: expected a robomimic .hdf5 file, a PushT replay-buffer .zarr "
        "folder, a folder of ACT episode_<i>.hdf5 files, a folder of Meta-World metaworld_<task>_expert.zarr, a "
        "LeRobotDataset folder (meta/info.json) or a CALVIN LMDB / raw split folder")


def load_episode(path: str, episode: int) -> Episode:
    """Episode ``episode`` (0-based, in the reader's order) of the dataset at ``path``."""
    kind = detect_format(path)
    loaders = {"robomimic": _robomimic, "pusht": _pusht, "aloha": _aloha, "metaworld": _metaworld,
               "lerobot": _lerobot, "calvin": _calvin}
    return loaders[kind](path, episode)


def _check_episode(episode: int, count: int, path: str) -> None:
    if not 0 <= episode < count:
        raise ValueError(f"episode {episode} is out of range: {path!r} has {count} episodes (0..{count - 1})")


def _rows(data: WindowDataset, episode: int, path: str) -> np.ndarray:
    """The flat rows of ``episode`` in a reader's arrays."""
    _check_episode(episode, data.num_episodes, path)
    start = int(data.episode_ends[episode - 1]) if episode else 0
    return np.arange(start, int(data.episode_ends[episode]))


def _from_reader(data: WindowDataset, episode: int, path: str, kind: str, state_label: str, fps: float,
                 title: str = "") -> Episode:
    """An episode of any reader: its rows of ``action``, ``low_dim`` and every camera (lazy ones read now)."""
    rows = _rows(data, episode, path)
    cameras = {cam: np.asarray(images(rows) if callable(images) else images[rows]) for cam, images in data.rgb.items()}
    if data.episode_lang is not None:
        title = f"{title}  \"{data.episode_lang[episode]}\"" if title else f"\"{data.episode_lang[episode]}\""
    name = os.path.basename(os.path.normpath(path))
    return Episode(cameras, data.action[rows], None if data.low_dim is None else data.low_dim[rows], state_label,
                   f"{kind} {name}, episode {episode} ({len(rows)} steps)" + (f"  {title}" if title else ""), fps)


def _robomimic(path: str, episode: int) -> Episode:
    import h5py

    from mimictest.data.robomimic import RobomimicDataset, demo_names

    with h5py.File(path, "r") as f:
        obs = f[f"data/{demo_names(f)[0]}/obs"]
        images = [k for k in obs if obs[k].ndim == 4 and obs[k].shape[-1] == 3 and obs[k].dtype == np.uint8]
        low_dim = [k for k in obs if k not in images]
    data = RobomimicDataset(path, images, low_dim, obs_horizon=1, chunk_size=1, cache_images=False)
    fps = data.env_meta.get("env_kwargs", {}).get("control_freq", FPS["robomimic"])
    return _from_reader(data, episode, path, "robomimic", ", ".join(low_dim), fps,
                        data.demo_names[episode] if 0 <= episode < data.num_episodes else "")


def _pusht(path: str, episode: int) -> Episode:
    from mimictest.data.pusht import PushTDataset, open_replay_buffer

    mode = "image" if "img" in open_replay_buffer(path)["data"] else "keypoint"
    data = PushTDataset(path, mode, obs_horizon=1, chunk_size=1, cache_images=False)
    return _from_reader(data, episode, path, "PushT", "agent x, y" if mode == "image" else "keypoints, agent x, y",
                        FPS["pusht"])


def _aloha(path: str, episode: int) -> Episode:
    import h5py

    from mimictest.data.aloha import AlohaDataset, episode_paths

    with h5py.File(episode_paths(path)[0], "r") as f:
        cams = sorted(f["observations/images"]) if "observations/images" in f else []
    data = AlohaDataset(path, cams, obs_horizon=1, chunk_size=1, cache_images=False)
    return _from_reader(data, episode, path, "ALOHA", "qpos", FPS["aloha"])


def _metaworld(path: str, episode: int) -> Episode:
    import zarr

    from mimictest.data.metaworld import MetaWorldDataset

    folder = os.path.normpath(path)
    files = [folder] if os.path.basename(folder).startswith("metaworld_") and os.path.isfile(
        os.path.join(folder, ".zgroup")) else sorted(glob.glob(os.path.join(folder, "metaworld_*_expert.zarr")))
    tasks, cams = [], None
    for file in files:
        attrs = zarr.open_group(file, mode="r").attrs
        name = os.path.basename(file)[len("metaworld_"):-len("_expert.zarr")]
        tasks.append(attrs.get("task", f"{name}-v3"))  # DP3's own files name no task: its tasks are v3's
        recorded = list(attrs.get("cams", ["corner2"]))
        cams = recorded if cams is None else [c for c in cams if c in recorded]  # cameras every task has
    root = os.path.dirname(folder) if files == [folder] else folder
    data = MetaWorldDataset(root, tasks, cams or [], obs_horizon=1, chunk_size=1, cache_images=False)
    task = data.task_names[data.episode_task[episode]] if 0 <= episode < data.num_episodes else ""
    return _from_reader(data, episode, path, "Meta-World", "hand xyz, gripper", FPS["metaworld"], task)


def _lerobot(path: str, episode: int) -> Episode:
    """LeRobot's own ``episodes=`` selection reads (and decodes) only that episode; ``episode`` is its episode_index."""
    from mimictest.data.lerobot import LeRobotDataset

    data = LeRobotDataset(path, obs_horizon=1, chunk_size=1, episodes=[episode])
    shown = _from_reader(data, 0, path, "LeRobot", "observation.state", data.fps)
    shown.title = shown.title.replace("episode 0 ", f"episode {episode} ", 1)
    return shown


def _calvin(path: str, episode: int) -> Episode:
    from mimictest.data.calvin import CalvinDataset

    data = CalvinDataset(path, obs_horizon=1, chunk_size=1, action_mode="relative")
    return _from_reader(data, episode, path, "CALVIN", "robot_obs", FPS["calvin"])


def _figure(width: int, height: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # imported here: matplotlib takes a second to import
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _pixels(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()  # (H, W, 3)


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(H, W, 3)`` -> ``(height, width, 3)`` for ``size = (height, width)``, bilinear."""
    from PIL import Image

    if image.shape[:2] == size:
        return image
    return np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR))


def _header(width: int, title: str, names: list[str], centres: list[float]) -> np.ndarray:
    """The title line and each camera's name over its centre, drawn once."""
    fig = _figure(width, HEADER_HEIGHT)
    fig.text(0.005, 0.95, title, fontsize=9, va="top", ha="left")
    for name, x in zip(names, centres):
        fig.text(x / width, 0.05, name, fontsize=8, va="bottom", ha="center", color="#444")
    return _pixels(fig)


def _plots(episode: Episode, width: int) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """The action (and state) curves, drawn once; returns the image, each step's cursor column and
    each axes' pixel rows ``(top, bottom)``."""
    panels = [("action", episode.action)] + ([(f"state: {episode.state_label}", episode.state)]
                                             if episode.state is not None else [])
    from matplotlib import cm

    fig = _figure(width, PLOT_HEIGHT * len(panels))
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    steps = np.arange(len(episode))
    most = max(v.reshape(len(v), -1).shape[1] for _, v in panels)
    legend_cols = -(-most // 8) if most <= LEGEND_DIMS else 0
    for ax, (label, values) in zip(axes, panels):
        values = values.reshape(len(values), -1)  # (T, dims)
        colours = cm.tab10.colors if values.shape[1] <= 10 else cm.tab20.colors
        for d in range(values.shape[1]):
            ax.plot(steps, values[:, d], lw=1, label=str(d), color=colours[d % len(colours)])
        ax.set_xlim(-0.5, len(episode) - 0.5)  # the cursor never lies on a spine
        ax.set_title(f"{label} ({values.shape[1]} dims)", fontsize=8, loc="left")
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if legend_cols:
            ax.legend(fontsize=6, ncol=legend_cols, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False,
                      handlelength=1, columnspacing=0.8)
    axes[-1].set_xlabel("step", fontsize=8)
    right = 1 - (legend_cols * 34 + 12) / width if legend_cols else 0.97
    fig.subplots_adjust(left=0.07, right=right, top=0.93, bottom=0.12 if len(panels) > 1 else 0.2, hspace=0.45)
    image = _pixels(fig)
    height = image.shape[0]
    columns = np.rint(axes[0].transData.transform(np.stack([steps, np.zeros(len(steps))], 1))[:, 0]).astype(int)
    spans = [(height - int(ax.bbox.y1), height - int(ax.bbox.y0)) for ax in axes]  # display y is bottom-up
    return image, np.clip(columns, 0, width - 1), spans


def render(episode: Episode, out: str, height: int | None = None, fps: float | None = None) -> int:
    """Write ``episode`` to the mp4 ``out`` (atomically); returns the number of frames.

    ``height``: the cameras' height in pixels (default: the tallest camera's, magnified by a whole
    factor to at least ``MIN_CAMERA_HEIGHT`` and cut to ``MAX_CAMERA_HEIGHT``).
    """
    import imageio

    if not out.endswith(".mp4"):
        raise ValueError(f"--out must name an .mp4 file, got {out!r}")
    if height is not None and height < 8:
        raise ValueError(f"--height must be at least 8 pixels, got {height}")
    cams = episode.cameras
    tallest = max([images.shape[1] for images in cams.values()] or [0])
    if height is None:
        height = min(tallest * -(-MIN_CAMERA_HEIGHT // tallest), MAX_CAMERA_HEIGHT) if tallest else 0
    height = height if cams else 0
    sizes = {name: (height, max(1, round(images.shape[2] * height / images.shape[1]))) for name, images in cams.items()}
    gap = 4
    strip_width = sum(w for _, w in sizes.values()) + gap * max(len(sizes) - 1, 0)
    width = max(strip_width, MIN_WIDTH)
    width += width % 2  # H.264 in yuv420p needs even sizes
    lefts, x = {}, (width - strip_width) // 2
    for name, (_, w) in sizes.items():
        lefts[name], x = x, x + w + gap
    header = _header(width, episode.title, list(sizes), [lefts[n] + sizes[n][1] / 2 for n in sizes])
    plots, columns, spans = _plots(episode, width)
    total = HEADER_HEIGHT + height + plots.shape[0]
    frame = np.full((total + total % 2, width, 3), 255, dtype=np.uint8)  # (H, W, 3)
    frame[:HEADER_HEIGHT] = header
    below = frame[HEADER_HEIGHT + height:HEADER_HEIGHT + height + plots.shape[0]]
    with atomic_path(out, suffix=".mp4") as tmp, \
            imageio.get_writer(tmp, format="FFMPEG", fps=fps or episode.fps, macro_block_size=1) as writer:
        for t in range(len(episode)):
            for name, (h, w) in sizes.items():
                frame[HEADER_HEIGHT:HEADER_HEIGHT + h, lefts[name]:lefts[name] + w] = _resize(cams[name][t], (h, w))
            below[:] = plots
            for top, bottom in spans:
                below[top:bottom, max(columns[t] - 1, 0):columns[t] + 1] = CURSOR
            writer.append_data(frame)
    return len(episode)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mimictest.viz", description="Play back one episode of a dataset "
                                     "as an mp4: the cameras side by side, the actions and state plotted under them.")
    parser.add_argument("dataset", help="a dataset path in any format mimictest reads (detected)")
    parser.add_argument("--episode", type=int, default=0, help="the episode, from 0 in the reader's order (default 0)")
    parser.add_argument("--out", required=True, help="the .mp4 to write")
    parser.add_argument("--fps", type=float, default=None, help="playback rate (default: the data's control rate)")
    parser.add_argument("--height", type=int, default=None, help="camera height in pixels (default: the tallest camera's, magnified to >= 160, at most 360)")
    args = parser.parse_args(argv)
    try:
        episode = load_episode(args.dataset, args.episode)
        frames = render(episode, args.out, args.height, args.fps)
    except (FileNotFoundError, ValueError, KeyError, OSError, ImportError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {frames} frames ({', '.join(episode.cameras) or 'no cameras'}) to {args.out}")


if __name__ == "__main__":
    main()
