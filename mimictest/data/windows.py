"""Windows of past observations and future actions over flat, concatenated episodes.

Every dataset format (robomimic hdf5, diffusion-policy zarr, ACT hdf5, ...) reduces to flat
arrays with one row per timestep plus ``episode_ends`` (exclusive end index of each episode, as in
diffusion_policy's replay buffer). ``WindowIndex`` turns that into samples; ``WindowDataset``
gathers them.

Sample ``i`` is timestep ``t`` of some episode (every timestep, or all but an episode's last few;
see ``pad_after`` below):
- observations at ``t - obs_horizon + 1 .. t``;
- actions at ``t - obs_horizon + 1 .. t - obs_horizon + chunk_size`` (the chunk starts at the
  first observation step, Diffusion Policy's convention; with ``obs_horizon=1`` it starts at
  ``t``, ACT's convention).
Indices outside the episode are clamped to its first / last step (edge padding) and flagged in
``is_pad``, so a policy can mask padded actions out of its loss.

How many padded actions a window may hold after the episode's end is ``pad_after``:

- ``pad_after=None``: every timestep is a sample, so the last window of an episode has
  ``chunk_size - obs_horizon`` padded actions (14 of 16 with Diffusion Policy's horizons). With
  ``obs_horizon=1`` this is ACT's rule: ACT's ``EpisodicDataset`` (tonyzhaozh/act, ``utils.py``)
  draws an episode, then a start step uniformly from all of its steps, and pads the action
  sequence with zeros to the episode's length, marked in ``is_pad`` (its loss masks them); the
  policy keeps the first ``chunk_size``, so up to ``chunk_size - 1`` of them are padding.
  (ACT draws episodes uniformly, here every timestep is equally likely; the two agree for the
  equal-length simulated ALOHA episodes.)
- ``pad_after=k``: only windows with at most ``k`` actions past the end are samples, so the last
  ``chunk_size - obs_horizon - k`` steps of each episode are not sample steps. Diffusion Policy's
  ``SequenceSampler`` (real-stanford/diffusion_policy, ``common/sampler.py``) takes sequences of
  ``horizon`` steps starting from ``-pad_before`` to ``episode_length - horizon + pad_after``,
  with ``pad_before = n_obs_steps - 1`` and ``pad_after = n_action_steps - 1`` in every one of its
  datasets (7 with 8 executed steps), edge-padding both ends; that is this window with
  ``pad_after = n_action_steps - 1`` (its loss does not mask the padding: ``mask_padding=False``).

The history is always padded by at most ``obs_horizon - 1`` steps before the episode's start,
Diffusion Policy's ``pad_before``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from torch.utils.data import Dataset


def check_episode_ends(episode_ends: np.ndarray, num_steps: int) -> np.ndarray:
    """Validate ``episode_ends`` against the flat arrays' length; returns it as int64."""
    ends = np.asarray(episode_ends, dtype=np.int64)
    if ends.ndim != 1 or len(ends) == 0:
        raise ValueError(f"episode_ends must be a non-empty 1-D array, got shape {ends.shape}")
    if np.any(np.diff(np.concatenate(([0], ends))) <= 0):
        raise ValueError("episode_ends must be strictly increasing and every episode non-empty")
    if ends[-1] != num_steps:
        raise ValueError(
            f"episode_ends ends at {ends[-1]} but the data has {num_steps} steps; the arrays and episode_ends "
            "disagree (a truncated or corrupt file?)"
        )
    return ends


def nonfinite(array: np.ndarray) -> tuple[int, int, int] | None:
    """``(count, row, dim)`` of the NaN / inf values of ``(N, ...)`` data (the first one's row and flattened
    dim), or ``None`` when every value is finite."""
    bad = ~np.isfinite(np.asarray(array).reshape(len(array), -1))  # (N, d)
    if not bad.any():
        return None
    row, dim = np.argwhere(bad)[0]
    return int(bad.sum()), int(row), int(dim)


def check_finite(array: np.ndarray, name: str, episode_ends: np.ndarray) -> None:
    """Refuse NaN / inf in flat ``(N, ...)`` data, naming the first bad episode, step and dim."""
    found = nonfinite(array)
    if found is not None:
        count, row, dim = found
        episode = int(np.searchsorted(episode_ends, row, side="right"))
        step = row - (int(episode_ends[episode - 1]) if episode else 0)
        raise ValueError(f"{name} holds {count} NaN/inf value(s), the first at episode {episode}, step {step}, "
                         f"dim {dim} (flat row {row}); remove or repair that episode")


class WindowIndex:
    """Maps a sample index to the flat row indices of its observation and action windows.

    ``pad_after``: at most this many actions of a window lie past its episode's end, in
    ``0 .. chunk_size - obs_horizon``; ``None`` makes every timestep a sample (see the module
    docstring). Episodes too short for one window give no samples.
    """

    def __init__(self, episode_ends: np.ndarray, obs_horizon: int, chunk_size: int, pad_after: int | None = None) -> None:
        if obs_horizon < 1 or chunk_size < 1:
            raise ValueError(f"obs_horizon and chunk_size must be >= 1, got {obs_horizon} and {chunk_size}")
        most = max(chunk_size - obs_horizon, 0)  # padded actions of an episode's last timestep
        if pad_after is not None and not 0 <= pad_after <= most:
            raise ValueError(
                f"pad_after must be in 0..{most} (chunk_size - obs_horizon = {chunk_size} - {obs_horizon}), got "
                f"{pad_after}; Diffusion Policy pads at most n_action_steps - 1, ACT chunk_size - 1 (None)"
            )
        self.episode_ends = np.asarray(episode_ends, dtype=np.int64)
        self.obs_horizon, self.chunk_size = obs_horizon, chunk_size
        self.pad_after = most if pad_after is None else pad_after
        starts = np.concatenate(([0], self.episode_ends[:-1]))
        lengths = self.episode_ends - starts
        counts = np.maximum(lengths - (most - self.pad_after), 0)  # (E,) sample steps of each episode
        if counts.sum() == 0:
            raise ValueError(
                f"no episode is long enough for one window (the longest has {lengths.max()} steps; chunk_size "
                f"{chunk_size}, obs_horizon {obs_horizon}, pad_after {self.pad_after}); raise pad_after or "
                "shorten the chunk"
            )
        self.episode = np.repeat(np.arange(len(lengths)), counts)  # (M,) episode of each sample
        first = np.cumsum(counts) - counts  # (E,) index of each episode's first sample
        self.rows = starts[self.episode] + np.arange(counts.sum()) - first[self.episode]  # (M,) flat row of timestep t
        self.step_start = starts[self.episode]  # (M,) first row of the sample's episode
        self.step_end = self.episode_ends[self.episode]  # (M,) exclusive end of that episode
        self._obs_offsets = np.arange(1 - obs_horizon, 1)  # (T_obs,)
        self._act_offsets = np.arange(1 - obs_horizon, 1 - obs_horizon + chunk_size)  # (chunk,)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> obs rows ``(T_obs,)``, action rows ``(chunk,)``, ``is_pad`` ``(chunk,)``."""
        row, lo, hi = self.rows[i], self.step_start[i], self.step_end[i] - 1
        obs_rows = np.clip(row + self._obs_offsets, lo, hi)
        raw = row + self._act_offsets
        act_rows = np.clip(raw, lo, hi)
        return obs_rows, act_rows, raw != act_rows


class WindowDataset(Dataset):
    """Windows over flat arrays: the shared ``__getitem__`` of every reader.

    Args:
        episode_ends: exclusive end row of each episode.
        action: ``(N, A)`` float32.
        low_dim: ``(N, D)`` float32 or ``None``.
        rgb: ``{camera: images}``, each ``(N, H_c, W_c, 3)`` uint8, or a callable
            ``rows -> (len(rows), H_c, W_c, 3)`` for readers that load images lazily; cameras may
            differ in size. ``None`` (or empty) for no images.
        episode_task: ``(E,)`` int task id of each episode (an index into ``task_names``), for
            multi-task data; ``None`` for single-task data.
        task_names: the name of each task id.
        episode_lang: ``E`` instruction strings, one per episode, or ``None``.
        pad_after: the most actions of a window past its episode's end (``WindowIndex``);
            ``None``: every timestep is a sample.
        source: the dataset's path, named in error messages.

    NaN or inf in ``action`` or ``low_dim`` is refused with its episode, step and dim.

    Items: ``{"action": (chunk, A), "is_pad": (chunk,), "low_dim": (T_obs, D),
    "rgb": {camera: (T_obs, H_c, W_c, 3)}, "task": int64, "lang": str}``, each key only when the
    data has it.
    """

    def __init__(
        self,
        episode_ends: np.ndarray,
        obs_horizon: int,
        chunk_size: int,
        action: np.ndarray,
        low_dim: np.ndarray | None = None,
        rgb: dict[str, np.ndarray | Callable[[np.ndarray], np.ndarray]] | None = None,
        episode_task: np.ndarray | None = None,
        task_names: list[str] | None = None,
        episode_lang: list[str] | None = None,
        pad_after: int | None = None,
        source: str | None = None,
    ) -> None:
        self.episode_ends = check_episode_ends(episode_ends, len(action))
        rgb = dict(rgb or {})
        for name, arr in (("low_dim", low_dim), *((f"rgb[{cam!r}]", a) for cam, a in rgb.items())):
            if isinstance(arr, np.ndarray) and len(arr) != len(action):
                raise ValueError(f"{name} has {len(arr)} rows but action has {len(action)}; the file is inconsistent")
        where = f"{source!r}: " if source else ""
        check_finite(action, f"{where}action", self.episode_ends)  # every load, even with cached statistics
        if low_dim is not None:
            check_finite(low_dim, f"{where}low_dim", self.episode_ends)
        num_episodes = len(self.episode_ends)
        if episode_task is not None:
            episode_task = np.asarray(episode_task, dtype=np.int64)
            if episode_task.shape != (num_episodes,) or task_names is None:
                raise ValueError(f"episode_task must be ({num_episodes},) task ids with task_names, got shape "
                                 f"{episode_task.shape} and task_names={task_names}")
            if episode_task.min() < 0 or episode_task.max() >= len(task_names):
                raise ValueError(f"episode_task has ids outside 0..{len(task_names) - 1} (task_names={task_names})")
        if episode_lang is not None and len(episode_lang) != num_episodes:
            raise ValueError(f"episode_lang has {len(episode_lang)} instructions for {num_episodes} episodes")
        self.index = WindowIndex(self.episode_ends, obs_horizon, chunk_size, pad_after)
        self.action, self.low_dim, self.rgb = action, low_dim, rgb
        self.episode_task, self.episode_lang = episode_task, episode_lang
        self.task_names = list(task_names) if task_names is not None else None

    @property
    def num_episodes(self) -> int:
        return len(self.episode_ends)

    @property
    def low_dim_dim(self) -> int:
        """``D`` of the low-dim observations (0 without them)."""
        return 0 if self.low_dim is None else self.low_dim.shape[1]

    @property
    def cams(self) -> list[str]:
        """The cameras of ``rgb``, in order."""
        return list(self.rgb)

    @property
    def instructions(self) -> list[str]:
        """The distinct instructions, in order of first appearance (empty without instructions)."""
        return list(dict.fromkeys(self.episode_lang or []))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        obs_rows, act_rows, is_pad = self.index[i]
        item = {"action": self.action[act_rows], "is_pad": is_pad}  # (chunk, A), (chunk,)
        if self.low_dim is not None:
            item["low_dim"] = self.low_dim[obs_rows]  # (T_obs, D)
        if self.rgb:
            item["rgb"] = {cam: images(obs_rows) if callable(images) else images[obs_rows]
                           for cam, images in self.rgb.items()}  # {cam: (T_obs, H_c, W_c, 3) uint8}
        episode = self.index.episode[i]
        if self.episode_task is not None:
            item["task"] = self.episode_task[episode]  # int64
        if self.episode_lang is not None:
            item["lang"] = self.episode_lang[episode]
        return item
