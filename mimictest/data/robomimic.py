"""Reader for robomimic hdf5 datasets (Mandlekar et al. 2021, ARISE-Initiative/robomimic).

The layout, as robomimic's ``dataset_states_to_obs.py`` writes it::

    data/                      attrs: env_args (JSON), total
      demo_0/                  attrs: num_samples, model_file
        actions   (T, 7)       xyz, axis-angle, gripper (delta, or absolute in *_abs.hdf5)
        states    (T, S)       flattened MuJoCo states
        rewards   (T,)   dones (T,)
        obs/<key> (T, ...)     low-dim (T, d) float, images (T, H, W, 3) uint8, upright
    mask/<filter>              names of the demos in a split, e.g. mask/train, mask/valid

Demos may be numbered from 0 or from 1; they are read in numeric order. Statistics of actions and
low-dim keys are computed once over the whole file and cached beside it (``mimictest.data.stats``).
"""

from __future__ import annotations

import json
import os
import re

import h5py
import numpy as np

from mimictest.data.stats import Stats, array_stats, cached_stats, concat_stats
from mimictest.data.windows import WindowDataset, nonfinite
from mimictest.preprocess import per_camera


def _demo_sort_key(name: str) -> int:
    match = re.fullmatch(r"demo_(\d+)", name)
    if match is None:
        raise ValueError(f"unexpected group data/{name}; robomimic demos are named demo_<N>")
    return int(match.group(1))


def _open(path: str) -> h5py.File:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"robomimic dataset not found: {path!r}; check DATASET_PATH in the script")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise OSError(f"{path!r} is not a readable hdf5 file ({err}); is the download complete?") from err


def demo_names(f: h5py.File, filter_key: str | None = None) -> list[str]:
    """Demo group names in numeric order, restricted to ``mask/<filter_key>`` when given."""
    if "data" not in f:
        raise KeyError(f"{f.filename!r} has no 'data' group; it is not a robomimic dataset")
    names = sorted(f["data"].keys(), key=_demo_sort_key)
    if filter_key is not None:
        if f"mask/{filter_key}" not in f:
            available = sorted(f["mask"].keys()) if "mask" in f else []
            raise KeyError(f"{f.filename!r} has no filter mask/{filter_key}; available filters: {available}")
        keep = {n.decode() if isinstance(n, bytes) else str(n) for n in f[f"mask/{filter_key}"][()]}
        names = [n for n in names if n in keep]
    if not names:
        raise ValueError(f"{f.filename!r} contains no demos" + (f" in filter {filter_key!r}" if filter_key else ""))
    return names


STATES_TO_OBS = (
    "python robomimic/scripts/dataset_states_to_obs.py --dataset {path} --output_name low_dim.hdf5 --done_mode 2 "
    "(add --camera_names agentview robot0_eye_in_hand --camera_height 84 --camera_width 84 for images)"
)


def _check_layout(f: h5py.File, names: list[str], keys: list[str]) -> None:
    """Every demo has ``actions`` and the observation keys; a raw robosuite ``demo.hdf5`` is named as such."""
    path = f.filename
    if "env_args" not in f["data"].attrs and "env" in f["data"].attrs:
        raise ValueError(
            f"{path!r} is a raw robosuite demo.hdf5 (data.attrs has 'env' but no 'env_args', and the demos hold states "
            "but no obs/): convert it with robomimic, `python robomimic/scripts/conversion/convert_robosuite.py "
            f"--dataset {path}`, then `{STATES_TO_OBS.format(path=path)}`, and set DATASET_PATH to the output"
        )
    no_actions = [n for n in names if "actions" not in f[f"data/{n}"]]
    if no_actions:
        raise KeyError(
            f"{path!r}: {len(no_actions)} of {len(names)} demos have no 'actions' dataset (first: data/{no_actions[0]}, "
            f"which holds {sorted(f[f'data/{no_actions[0]}'].keys())}); a robomimic demo stores actions (T, A) beside "
            "obs/ and states: re-export the file, or drop those demos with a filter key (mask/<name>)"
        )
    no_obs = [n for n in names if "obs" not in f[f"data/{n}"]]
    if no_obs:
        raise KeyError(
            f"{path!r}: data/{no_obs[0]} ({len(no_obs)} of {len(names)} demos) has no obs/ group, only "
            f"{sorted(f[f'data/{no_obs[0]}'].keys())}: robomimic's observation extraction was not run; run "
            f"`{STATES_TO_OBS.format(path=path)}` and set DATASET_PATH to the output"
        )
    for demo in names:
        available = sorted(f[f"data/{demo}/obs"].keys())
        missing = [k for k in keys if k not in available]
        if missing:
            raise KeyError(
                f"{path!r} has no observation key(s) {missing} (in data/{demo}/obs); available keys: {available}. "
                "Set RGB_KEYS / LOW_DIM_KEYS in the script to keys the file has, or regenerate it with images "
                "(robomimic's dataset_states_to_obs.py, or `python -m mimictest.demos lift --image`)"
            )


def _key_stats(f: h5py.File, names: list[str], dataset: str) -> Stats:
    arrays = [f[f"data/{n}/{dataset}"][()] for n in names]
    for name, arr in zip(names, arrays):
        found = nonfinite(arr)
        if found is not None:
            count, step, dim = found
            raise ValueError(f"{f.filename!r}: data/{name}/{dataset} contains {count} NaN/inf value(s), the first at "
                             f"step {step}, dim {dim}; remove or repair that demo")
    return array_stats(np.concatenate([a.reshape(len(a), -1) for a in arrays]))


def _file_stats(path: str, datasets: list[str]) -> dict[str, Stats]:
    """Statistics of ``actions`` / ``obs/<key>`` over every demo in the file, cached beside it."""
    with _open(path) as f:
        names = demo_names(f)
        _check_layout(f, names, [d[len("obs/"):] for d in datasets if d.startswith("obs/")])
        return cached_stats(path, datasets, lambda d: _key_stats(f, names, d))


class _LazyImages:
    """Reads one camera's image rows from the hdf5 on demand (one file handle per DataLoader worker)."""

    def __init__(self, path: str, names: list[str], key: str, episode_ends: np.ndarray) -> None:
        self.path, self.names, self.key = path, names, key
        self.starts = np.concatenate(([0], episode_ends[:-1]))
        self._file: h5py.File | None = None
        self._pid = -1

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        demo = np.searchsorted(self.starts, rows[0], side="right") - 1  # a window never spans two demos
        group = self._file[f"data/{self.names[demo]}/obs"]
        local = rows - self.starts[demo]
        lo, hi = int(local.min()), int(local.max()) + 1
        return group[self.key][lo:hi][local - lo]  # (T_obs, H, W, 3): the contiguous span once, then the (padded) rows

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None, "_pid": -1}


class RobomimicDataset(WindowDataset):
    """Windows over a robomimic hdf5 file.

    Args:
        path: the ``.hdf5`` file.
        rgb_keys: image observation keys, e.g. ``["agentview_image", "robot0_eye_in_hand_image"]``.
        low_dim_keys: low-dim keys, concatenated in this order, e.g.
            ``["object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"]``.
        obs_horizon, chunk_size: window sizes (see ``mimictest.data.windows``).
        filter_key: a ``mask/<filter_key>`` split such as ``"train"``, or ``None`` for every demo.
        cache_images: load every image into RAM as uint8 (fast; about
            ``steps * cams * H * W * 3`` bytes), or read them from the file per sample.
        image_size: ``(H, W)`` the configuration expects (or ``{key: (H, W)}``); a file with other
            sizes is refused.
        pad_after: the most padded actions after an episode's end (``mimictest.data.windows``;
            Diffusion Policy: ``n_action_steps - 1``; ``None``: every timestep is a sample, ACT's rule).

    Attributes: ``env_meta`` (the parsed ``env_args``), ``stats`` (for ``Preprocessor``),
    ``image_size`` (``{key: (H, W)}``), ``absolute_actions`` (from the env's controller config).
    """

    def __init__(
        self,
        path: str,
        rgb_keys: list[str],
        low_dim_keys: list[str],
        obs_horizon: int,
        chunk_size: int,
        filter_key: str | None = None,
        cache_images: bool = True,
        image_size: tuple[int, int] | None = None,
        pad_after: int | None = None,
    ) -> None:
        if not rgb_keys and not low_dim_keys:
            raise ValueError("choose at least one observation key (RGB_KEYS or LOW_DIM_KEYS)")
        self.path = path
        with _open(path) as f:
            names = demo_names(f, filter_key)
            _check_layout(f, names, list(rgb_keys) + list(low_dim_keys))
            if "env_args" not in f["data"].attrs:
                raise KeyError(f"{path!r} has no data.attrs['env_args'], so evaluation cannot rebuild its environment; "
                               "robomimic's conversion/convert_robosuite.py writes it")
            self.env_meta = json.loads(f["data"].attrs["env_args"])
            lengths = np.array([f[f"data/{n}/actions"].shape[0] for n in names])
            episode_ends = np.cumsum(lengths)
            action = np.concatenate([f[f"data/{n}/actions"][()] for n in names]).astype(np.float32)
            low_dim = None
            if low_dim_keys:
                low_dim = np.concatenate(
                    [np.concatenate([f[f"data/{n}/obs/{k}"][()].reshape(len_, -1) for k in low_dim_keys], axis=1)
                     for n, len_ in zip(names, lengths)]
                ).astype(np.float32)  # (N, D)
            rgb = {}
            self.image_size = {}
            for key in rgb_keys:
                shape = f[f"data/{names[0]}/obs/{key}"].shape[1:]
                if len(shape) != 3 or shape[2] != 3:
                    raise ValueError(f"{path!r}: image key {key!r} must be (H, W, 3) per step, got {shape}")
                self.image_size[key] = tuple(shape[:2])
                expected = per_camera(image_size, list(rgb_keys), "IMAGE_SIZE")[key]
                if expected is not None and expected != self.image_size[key]:
                    raise ValueError(
                        f"{path!r} has {shape[0]}x{shape[1]} {key} images but the script expects "
                        f"{expected[0]}x{expected[1]}; set IMAGE_SIZE = {tuple(shape[:2])} in the script"
                    )
                if cache_images:
                    rgb[key] = np.concatenate([f[f"data/{n}/obs/{key}"][()] for n in names])  # (N, H, W, 3) uint8
                else:
                    rgb[key] = _LazyImages(path, names, key, episode_ends)
        raw = _file_stats(path, ["actions"] + [f"obs/{k}" for k in low_dim_keys])  # rejects NaN / inf, naming the demo
        super().__init__(episode_ends, obs_horizon, chunk_size, action, low_dim, rgb, pad_after=pad_after, source=path)
        self.demo_names = names
        controller = self.env_meta.get("env_kwargs", {}).get("controller_configs", {})
        self.absolute_actions = controller_is_absolute(controller)
        self.stats = {"action": raw["actions"]}
        if low_dim_keys:
            self.stats["low_dim"] = concat_stats([raw[f"obs/{k}"] for k in low_dim_keys])


def controller_is_absolute(config: dict) -> bool:
    """Whether a legacy (robosuite <= 1.4) or composite (1.5) controller config commands absolute poses.

    Composite configs keep their arms either directly under ``body_parts`` or under ``body_parts["arms"]``.
    """
    if "body_parts" not in config:
        return config.get("control_delta", True) is False
    parts = config["body_parts"]
    arms = parts.get("arms", parts)
    return any(arms[arm].get("input_type") == "absolute" for arm in ("right", "left") if arm in arms)
