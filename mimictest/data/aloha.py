"""Reader for ACT's simulated ALOHA episodes (Zhao et al., RSS 2023, https://github.com/tonyzhaozh/act).

The layout, as ACT's ``record_sim_episodes.py`` (and ``mimictest.demos.aloha``) write it: a folder
of ``episode_<i>.hdf5`` files, ``i = 0 .. N-1``, each with::

    /observations/qpos          (T, 14)   [left arm (6), left gripper, right arm (6), right gripper]
    /observations/qvel          (T, 14)
    /observations/images/<cam>  (T, H, W, 3) uint8, upright
    /action                     (T, 14)   joint-position targets, grippers normalised 0 (closed) .. 1 (open)
    attrs: sim = True

Observations are ``qpos`` (``low_dim``) and the chosen cameras (``rgb``); actions are the 14-d
joint targets, used as they are (``ActionSpace(None, "absolute", env_dim=14)``). Statistics are
computed once over the folder and cached beside it (``<folder>.mimictest-stats.json``).
"""

from __future__ import annotations

import os
import re

import h5py
import numpy as np

from mimictest.data.stats import array_stats, cached_stats
from mimictest.data.windows import WindowDataset

_EPISODE = re.compile(r"episode_(\d+)\.hdf5")
_HOW_TO_GET = "generate it with `python -m mimictest.demos aloha-transfer-cube --episodes 50 --out FOLDER`"


def episode_paths(folder: str) -> list[str]:
    """The folder's ``episode_<i>.hdf5`` files in numeric order; ``i`` must run over ``0 .. N-1``."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"ALOHA dataset folder not found: {folder!r}; {_HOW_TO_GET}")
    numbers = sorted(int(m.group(1)) for m in map(_EPISODE.fullmatch, os.listdir(folder)) if m)
    if not numbers:
        raise FileNotFoundError(
            f"{folder!r} contains no episode_<i>.hdf5 files; expected an ACT-format ALOHA dataset ({_HOW_TO_GET})"
        )
    if numbers != list(range(len(numbers))):
        missing = sorted(set(range(numbers[-1] + 1)) - set(numbers))
        raise ValueError(
            f"{folder!r}: episodes must be numbered 0..N-1 without gaps, but episode(s) {missing[:10]} are "
            "missing; was the copy interrupted?"
        )
    return [os.path.join(folder, f"episode_{i}.hdf5") for i in numbers]


def _open(path: str) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise OSError(f"{path!r} is not a readable hdf5 file ({err}); regenerate or re-download it") from err


def _read_episode(path: str, cams: list[str], image_size: tuple[int, int] | None) -> dict:
    """Check one episode's keys and shapes; returns its ``action``, ``qpos`` and image ``size`` ``(H, W)``."""
    with _open(path) as f:
        missing = [k for k in ("action", "observations/qpos") if k not in f]
        if missing:
            raise KeyError(f"{path!r} has no {missing}; expected ACT's layout (/action, /observations/qpos, ...)")
        available = sorted(f["observations/images"].keys()) if "observations/images" in f else []
        absent = [cam for cam in cams if cam not in available]
        if absent:
            raise KeyError(
                f"{path!r} has no camera(s) {absent} under /observations/images; it has {available}. Set CAMS in the "
                "script to cameras the dataset has, or regenerate it with `--cams`"
            )
        action, qpos = f["action"][()], f["observations/qpos"][()]
        if action.ndim != 2 or qpos.ndim != 2 or len(action) != len(qpos) or len(action) == 0:
            raise ValueError(
                f"{path!r}: /action {action.shape} and /observations/qpos {qpos.shape} must be (T, A) and (T, D) "
                "with the same T > 0"
            )
        shapes = {cam: f[f"observations/images/{cam}"].shape for cam in cams}
        dtypes = {cam: f[f"observations/images/{cam}"].dtype for cam in cams}
    for cam in cams:
        shape = shapes[cam]
        if len(shape) != 4 or shape[0] != len(action) or shape[3] != 3 or dtypes[cam] != np.uint8:
            raise ValueError(
                f"{path!r}: /observations/images/{cam} is {shape} {dtypes[cam]}, "
                f"expected ({len(action)}, H, W, 3) uint8"
            )
        if image_size is not None and tuple(shape[1:3]) != tuple(image_size):
            raise ValueError(
                f"{path!r}: camera {cam!r} has {shape[1]}x{shape[2]} images but {image_size[0]}x{image_size[1]} are "
                f"expected; set IMAGE_SIZE = {tuple(shape[1:3])} in the script or regenerate the data at that size"
            )
    for name, arr in (("action", action), ("observations/qpos", qpos)):
        if not np.isfinite(arr).all():
            raise ValueError(f"{path!r}: /{name} contains NaN or inf; remove or regenerate that episode")
    sizes = {tuple(shapes[cam][1:3]) for cam in cams}
    if len(sizes) > 1:
        per_cam = {cam: shapes[cam][1:3] for cam in cams}
        raise ValueError(f"{path!r}: the cameras must share one image size, got {per_cam}")
    size = sizes.pop() if sizes else None
    return {"action": action.astype(np.float32), "qpos": qpos.astype(np.float32), "size": size}


def _camera_names(path: str) -> list[str]:
    with _open(path) as f:
        return sorted(f["observations/images"].keys()) if "observations/images" in f else []


def _load_images(paths: list[str], cams: list[str], episode_ends: np.ndarray, size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Every image of every episode, filled into one preallocated ``(N, H, W, 3)`` uint8 array per camera."""
    rgb = {cam: np.empty((episode_ends[-1], *size, 3), dtype=np.uint8) for cam in cams}
    for path, lo, hi in zip(paths, np.concatenate(([0], episode_ends[:-1])), episode_ends):
        with _open(path) as f:
            for cam in cams:
                rgb[cam][lo:hi] = f[f"observations/images/{cam}"][()]
    return rgb


class _LazyImages:
    """Reads one camera's image rows from the episode files on demand (file handles opened per DataLoader worker)."""

    def __init__(self, paths: list[str], cam: str, episode_ends: np.ndarray) -> None:
        self.paths, self.cam = paths, cam
        self.starts = np.concatenate(([0], episode_ends[:-1]))
        self._files: dict[int, h5py.File] = {}
        self._pid = -1

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        episode = int(np.searchsorted(self.starts, rows[0], side="right") - 1)  # a window never spans two episodes
        if episode not in self._files:
            self._files[episode] = h5py.File(self.paths[episode], "r")
        images = self._files[episode]["observations/images"]
        local = rows - self.starts[episode]
        lo, hi = int(local.min()), int(local.max()) + 1
        return images[self.cam][lo:hi][local - lo]  # (T_obs, H, W, 3): the contiguous span once, then the (padded) rows

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}, "_pid": -1}


class AlohaDataset(WindowDataset):
    """Windows over a folder of ACT-format ALOHA episodes.

    Args:
        folder: the folder of ``episode_<i>.hdf5`` files.
        cams: cameras to read, e.g. ``["top"]`` (may be empty for a low-dim policy).
        obs_horizon, chunk_size: window sizes (see ``mimictest.data.windows``; ACT uses 1 and 100).
        cache_images: load every image into RAM as uint8 (about ``steps * cams * H * W * 3`` bytes:
            50 episodes of 400 steps at 480x640 are 18 GB per camera), or read them per sample.
        image_size: ``(H, W)`` the configuration expects; episodes of another size are refused.
        pad_after: the most padded actions after an episode's end (``mimictest.data.windows``);
            ACT pads up to ``chunk_size - 1``, which is ``None`` (every timestep is a sample).

    Attributes: ``stats`` (for ``Preprocessor``), ``image_size``, ``low_dim_dim`` (14), ``paths``.
    """

    def __init__(
        self,
        folder: str,
        cams: list[str] | tuple[str, ...],
        obs_horizon: int,
        chunk_size: int,
        cache_images: bool = True,
        image_size: tuple[int, int] | None = None,
        pad_after: int | None = None,
    ) -> None:
        cams = list(cams)
        if len(set(cams)) != len(cams):
            raise ValueError(f"cams lists a camera twice: {cams}")
        self.folder = folder
        self.paths = episode_paths(folder)
        reference = _camera_names(self.paths[0])
        for path in self.paths[1:]:
            names = _camera_names(path)
            if names != reference:
                raise ValueError(
                    f"episodes record different cameras: {self.paths[0]!r} has {reference} but {path!r} has {names}; "
                    "a dataset folder must hold episodes of one recording setup"
                )
        episodes = [_read_episode(path, cams, image_size) for path in self.paths]
        dims = {(e["action"].shape[1], e["qpos"].shape[1]) for e in episodes}
        if len(dims) != 1:
            raise ValueError(f"{folder!r}: episodes disagree on the action / qpos dimensions: {sorted(dims)}")
        lengths = np.array([len(e["action"]) for e in episodes])
        episode_ends = np.cumsum(lengths)
        action = np.concatenate([e["action"] for e in episodes])  # (N, 14)
        low_dim = np.concatenate([e["qpos"] for e in episodes])  # (N, 14)
        sizes = {e["size"] for e in episodes}
        if len(sizes) != 1:
            raise ValueError(
                f"{folder!r}: episodes have different image sizes {sorted(sizes)}; regenerate them at one size"
            )
        self.image_size: tuple[int, int] | None = sizes.pop()
        if cache_images:
            rgb = _load_images(self.paths, cams, episode_ends, self.image_size)  # {cam: (N, H, W, 3)}
        else:
            rgb = {cam: _LazyImages(self.paths, cam, episode_ends) for cam in cams}
        super().__init__(episode_ends, obs_horizon, chunk_size, action, low_dim, rgb, pad_after=pad_after, source=folder)
        arrays = {"action": action, "qpos": low_dim}
        stats = cached_stats(folder, list(arrays), lambda key: array_stats(arrays[key]))
        self.stats = {"action": stats["action"], "low_dim": stats["qpos"]}
