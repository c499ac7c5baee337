"""Reader for PushT demonstrations in diffusion_policy's replay-buffer zarr (``pusht_cchi_v7_replay.zarr``).

The layout (Chi et al., RSS 2023, github.com/real-stanford/diffusion_policy; written here by
``mimictest.data.pusht_writer``)::

    data/img          (N, 96, 96, 3)  float32 in [0, 255] in the release, or uint8
    data/state        (N, 5)          agent x, y, block x, y, block angle
    data/keypoint     (N, 9, 2)       block keypoints in pixels
    data/action       (N, 2)          the disc's target position in pixels
    meta/episode_ends (E,)            exclusive end row of each episode

Observations follow diffusion_policy's PushT datasets: ``obs_mode="image"`` gives
``rgb`` ``{"image": (T_obs, 96, 96, 3)}`` uint8 and ``low_dim`` = agent_pos ``state[:, :2]``
(``PushTImageDataset``); ``obs_mode="keypoint"`` gives ``low_dim`` = keypoints flattened (18) then
agent_pos (2) (``PushTLowdimDataset``, 20-d). Statistics are cached beside the zarr folder.
"""

from __future__ import annotations

import os

import numcodecs
import numpy as np
import zarr

from mimictest.data.stats import array_stats, cached_stats, concat_stats
from mimictest.data.windows import WindowDataset, check_episode_ends

OBS_MODES = ("image", "keypoint")
CAMERA = "image"  # the camera's name in batches and env observations (diffusion_policy's obs key)
HOW_TO_GET = (
    "generate demos with `python -m mimictest.demos pusht --episodes 200 --out PATH`, or download "
    "diffusion_policy's https://diffusion-policy.cs.columbia.edu/data/training/pusht.zip and use "
    "pusht/pusht_cchi_v7_replay.zarr"
)
EXPECTED = {"img": "(N, H, W, 3)", "state": "(N, 5)", "keypoint": "(N, K, 2)", "action": "(N, 2)"}
IMAGE_READ_ROWS = 1024  # rows converted to uint8 at a time when caching float images


def open_replay_buffer(path: str) -> zarr.Group:
    """Open a replay-buffer zarr read-only, with clear errors for a missing or foreign folder."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"PushT dataset not found: {path!r}; {HOW_TO_GET}")
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} is a file, but a zarr replay buffer is a folder "
                         "(such as pusht_cchi_v7_replay.zarr)")
    try:
        root = zarr.open_group(path, mode="r")
    except ValueError as err:  # zarr's GroupNotFoundError and ContainsArrayError are ValueErrors
        raise ValueError(f"{path!r} is not a zarr group ({err}); expected a replay-buffer folder such as "
                         "pusht_cchi_v7_replay.zarr") from err
    if "meta" not in root or "episode_ends" not in root["meta"]:
        raise KeyError(
            f"{path!r} has no meta/episode_ends; a diffusion_policy replay buffer stores the exclusive end row "
            f"of each episode there. Is this an incomplete copy? Otherwise {HOW_TO_GET}"
        )
    return root


def _data_array(root: zarr.Group, path: str, name: str) -> zarr.Array:
    """``data/<name>`` checked against its expected shape."""
    available = sorted(root["data"].array_keys()) if "data" in root else []
    if name not in available:
        raise KeyError(f"{path!r} has no data/{name} {EXPECTED[name]}; data/ holds {available}. "
                       f"For a complete dataset, {HOW_TO_GET}")
    array = root["data"][name]
    shape = array.shape
    good = {
        "img": len(shape) == 4 and shape[-1] == 3,
        "state": len(shape) == 2 and shape[1] >= 2,
        "keypoint": len(shape) == 3 and shape[2] == 2,
        "action": len(shape) == 2 and shape[1] == 2,
    }[name]
    if not good:
        raise ValueError(f"{path!r}: data/{name} has shape {shape}, expected {EXPECTED[name]}")
    return array


def _to_uint8(images: np.ndarray, where: str) -> np.ndarray:
    """``(n, H, W, 3)`` uint8 or float in [0, 255] -> uint8."""
    if images.dtype == np.uint8:
        return images
    if images.size and images.max() <= 1.0:
        raise ValueError(f"{where}: float images must hold values in [0, 255] (diffusion_policy's layout), "
                         f"but these are in [{images.min()}, {images.max()}]; multiply them by 255")
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


class _LazyImages:
    """Reads image rows from the zarr on demand (opened once per DataLoader worker)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._array: zarr.Array | None = None
        self._pid = -1

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        if self._array is None or self._pid != os.getpid():
            numcodecs.blosc.use_threads = False  # Blosc's threads are not fork-safe
            self._array, self._pid = zarr.open_group(self.path, mode="r")["data"]["img"], os.getpid()
        lo, hi = int(rows.min()), int(rows.max()) + 1
        return _to_uint8(self._array[lo:hi], f"{self.path!r} data/img")[rows - lo]  # (T_obs, H, W, 3)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None, "_pid": -1}


class PushTDataset(WindowDataset):
    """Windows over a PushT replay-buffer zarr.

    Args:
        path: the ``.zarr`` folder.
        obs_mode: ``"image"`` (one camera + agent_pos) or ``"keypoint"`` (keypoints + agent_pos).
        obs_horizon, chunk_size: window sizes (see ``mimictest.data.windows``).
        cache_images: load every image into RAM as uint8 (``N * 27.6`` kB), or read them per sample.
        pad_after: the most padded actions after an episode's end (``mimictest.data.windows``;
            Diffusion Policy: ``n_action_steps - 1``; ``None``: every timestep is a sample).

    Attributes: ``stats`` (for ``Preprocessor``), ``image_size`` (``None`` in keypoint mode),
    ``low_dim_dim``, ``num_episodes``.
    """

    def __init__(
        self,
        path: str,
        obs_mode: str,
        obs_horizon: int,
        chunk_size: int,
        cache_images: bool = True,
        pad_after: int | None = None,
    ) -> None:
        if obs_mode not in OBS_MODES:
            raise ValueError(f"obs_mode must be one of {OBS_MODES}, got {obs_mode!r}")
        self.path, self.obs_mode = path, obs_mode
        root = open_replay_buffer(path)
        episode_ends = root["meta"]["episode_ends"][:]
        names = ["action", "state"] + (["img"] if obs_mode == "image" else ["keypoint"])
        arrays = {name: _data_array(root, path, name) for name in names}
        for name, array in arrays.items():
            try:
                check_episode_ends(episode_ends, len(array))
            except ValueError as err:
                raise ValueError(f"{path!r}: meta/episode_ends does not match data/{name} ({err}); re-copy the "
                                 f"dataset, or {HOW_TO_GET}") from err
        action = arrays["action"][:].astype(np.float32)  # (N, 2)
        agent_pos = arrays["state"][:, :2].astype(np.float32)  # (N, 2)
        rgb = None
        self.image_size: tuple[int, int] | None = None
        if obs_mode == "image":
            images = arrays["img"]
            self.image_size = tuple(images.shape[1:3])
            _to_uint8(images[: int(episode_ends[0])], f"{path!r} data/img")  # rejects [0, 1] floats early
            if cache_images:
                cached = np.empty(images.shape, dtype=np.uint8)  # (N, H, W, 3)
                for lo in range(0, len(images), IMAGE_READ_ROWS):
                    rows = slice(lo, lo + IMAGE_READ_ROWS)
                    cached[rows] = _to_uint8(images[rows], f"{path!r} data/img")
                rgb = {CAMERA: cached}
            else:
                rgb = {CAMERA: _LazyImages(path)}
            low_dim = agent_pos
        else:
            keypoints = arrays["keypoint"][:].astype(np.float32)
            low_dim = np.concatenate([keypoints.reshape(len(keypoints), -1), agent_pos], axis=1)  # (N, 2K + 2)
        super().__init__(episode_ends, obs_horizon, chunk_size, action, low_dim, rgb, pad_after=pad_after, source=path)
        columns = {"action": action, "agent_pos": agent_pos}
        if obs_mode == "keypoint":
            columns["keypoint"] = low_dim[:, :-2]

        raw = cached_stats(path, list(columns), lambda key: array_stats(columns[key]))  # NaN / inf refused above
        self.stats = {"action": raw["action"]}
        parts = [raw["keypoint"], raw["agent_pos"]] if obs_mode == "keypoint" else [raw["agent_pos"]]
        self.stats["low_dim"] = concat_stats(parts)
