"""Writer for PushT demonstrations in diffusion_policy's replay-buffer zarr layout.

The layout of ``pusht_cchi_v7_replay.zarr`` (Chi et al., RSS 2023,
github.com/real-stanford/diffusion_policy, ``ReplayBuffer`` and ``demo_pusht.py``), in zarr v2::

    data/img         (N, 96, 96, 3)  float32 in [0, 255] (or uint8)   96x96 render before each action
    data/state       (N, 5)          float32   agent x, y, block x, y, block angle
    data/keypoint    (N, 9, 2)       float32   block keypoints in pixels
    data/action      (N, 2)          float32   the disc's target position in pixels
    meta/episode_ends (E,)           int64     exclusive end row of each episode

Arrays are chunked along time into about 2 MB chunks of whole rows and compressed with Blosc
zstd level 5 with bit shuffling, as diffusion_policy's ``get_optimal_chunks`` and its "disk"
compressor do.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile

import numcodecs
import numpy as np
import zarr

from mimictest.data.writer import AtomicWriter

TARGET_CHUNK_BYTES = 2_000_000
IMAGE_DTYPES = ("float32", "uint8")


def _compressor() -> numcodecs.Blosc:
    return numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE)


def _row_chunks(row_shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, ...]:
    """Chunks of whole rows, about ``TARGET_CHUNK_BYTES`` each."""
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return (max(1, math.ceil(TARGET_CHUNK_BYTES / row_bytes)), *row_shape)


class PushTZarrWriter(AtomicWriter):
    """Context manager that appends episodes and atomically publishes a replay-buffer zarr folder.

    Everything is written to a temporary folder next to ``path`` and renamed at close, so an
    interrupted run never leaves a partial dataset under the final name.

    Args:
        path: the ``.zarr`` folder to create.
        overwrite: replace an existing ``path`` (only once the new one is complete).
        image_dtype: ``"float32"`` (values 0..255, as in ``pusht_cchi_v7_replay.zarr``) or
            ``"uint8"`` (4x smaller).
    """

    def __init__(self, path: str, overwrite: bool = False, image_dtype: str = "float32") -> None:
        if image_dtype not in IMAGE_DTYPES:
            raise ValueError(f"image_dtype must be one of {IMAGE_DTYPES}, got {image_dtype!r}")
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path!r} already exists; pass overwrite=True (--overwrite) or choose another path")
        self.path = os.path.normpath(path)
        self.overwrite = overwrite
        self.image_dtype = np.dtype(image_dtype)
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        prefix = f".{os.path.basename(self.path)}."
        self._tmp_path: str | None = tempfile.mkdtemp(dir=directory, prefix=prefix, suffix=".tmp")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self._tmp_path, 0o777 & ~umask)  # mkdtemp creates 0700; publish with normal permissions
        self._root = zarr.open_group(self._tmp_path, mode="w")
        self._root.create_group("data")
        self._root.create_group("meta")
        self._episode_ends: list[int] = []

    @property
    def num_episodes(self) -> int:
        """Episodes added so far."""
        return len(self._episode_ends)

    @property
    def num_steps(self) -> int:
        """Rows (timesteps) added so far."""
        return self._episode_ends[-1] if self._episode_ends else 0

    def add_episode(self, img: np.ndarray, state: np.ndarray, keypoint: np.ndarray, action: np.ndarray) -> int:
        """Append one episode; returns its index.

        img ``(T, H, W, 3)`` uint8 (or float in [0, 255]), state ``(T, 5)``, keypoint ``(T, K, 2)``,
        action ``(T, 2)``, all rows recorded before the action of the same row.
        """
        if self._tmp_path is None:
            raise RuntimeError("the writer is closed; open a new PushTZarrWriter to add episodes")
        arrays = {
            "img": np.asarray(img),
            "state": np.asarray(state, dtype=np.float32),
            "keypoint": np.asarray(keypoint, dtype=np.float32),
            "action": np.asarray(action, dtype=np.float32),
        }
        expected = {"img": "(T, H, W, 3)", "state": "(T, 5)", "keypoint": "(T, K, 2)", "action": "(T, 2)"}
        ok = {
            "img": arrays["img"].ndim == 4 and arrays["img"].shape[-1] == 3,
            "state": arrays["state"].ndim == 2 and arrays["state"].shape[1] == 5,
            "keypoint": arrays["keypoint"].ndim == 3 and arrays["keypoint"].shape[2] == 2,
            "action": arrays["action"].ndim == 2 and arrays["action"].shape[1] == 2,
        }
        wrong = {name: arrays[name].shape for name, good in ok.items() if not good}
        if wrong:
            raise ValueError(f"expected {expected}, got shapes {wrong}")
        steps = len(arrays["action"])
        lengths = {name: len(value) for name, value in arrays.items()}
        if steps == 0 or len(set(lengths.values())) != 1:
            raise ValueError(f"every array needs the same number T >= 1 of rows, got {lengths}")
        image = arrays["img"]
        if image.dtype != np.uint8 and (image.min() < 0 or image.max() > 255 or image.max() <= 1.0):
            raise ValueError(f"img must be uint8 or float in [0, 255], got {image.dtype} "
                             f"in [{image.min()}, {image.max()}]")
        arrays["img"] = image.astype(self.image_dtype)
        data = self._root["data"]
        for name, value in arrays.items():
            if name not in data:
                data.create_dataset(name, shape=(0, *value.shape[1:]), chunks=_row_chunks(value.shape[1:], value.dtype),
                                    dtype=value.dtype, compressor=_compressor())
            elif data[name].shape[1:] != value.shape[1:]:
                raise ValueError(f"{name} rows are {value.shape[1:]} but earlier episodes had {data[name].shape[1:]}")
            data[name].append(value)
        self._episode_ends.append(self.num_steps + steps)
        return self.num_episodes - 1

    def close(self) -> None:
        """Write ``meta/episode_ends`` and move the folder to its final path."""
        if self._tmp_path is None:
            return
        if not self._episode_ends:
            self.abort()
            raise ValueError(f"no episodes were added, so {self.path!r} was not written")
        ends = np.asarray(self._episode_ends, dtype=np.int64)
        self._root["meta"].create_dataset("episode_ends", data=ends, chunks=_row_chunks((), ends.dtype),
                                          compressor=None)
        tmp, self._tmp_path = self._tmp_path, None
        if os.path.exists(self.path):
            if not self.overwrite:
                shutil.rmtree(tmp)
                raise FileExistsError(f"{self.path!r} appeared while writing; pass overwrite=True to replace it")
            old = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(self.path)), prefix=".replaced.")
            os.replace(self.path, os.path.join(old, "dataset"))
            os.replace(tmp, self.path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, self.path)

    def abort(self) -> None:
        """Discard everything written so far."""
        if self._tmp_path is not None:
            shutil.rmtree(self._tmp_path, ignore_errors=True)
            self._tmp_path = None
