"""Writer for demonstration files in the robomimic hdf5 layout.

Layout follows robomimic (Mandlekar et al., 2021, https://github.com/ARISE-Initiative/robomimic,
docs "Dataset Structure"): ``data/demo_<i>/{obs/<key>, actions, states, rewards, dones}`` with demo
attrs ``num_samples`` and ``model_file``, ``data.attrs["env_args"]`` and ``data.attrs["total"]``,
and train/valid filter keys under ``mask/``.
"""

from __future__ import annotations

import json
import os
import tempfile

import h5py
import numpy as np

from mimictest.data.writer import AtomicWriter


class RobomimicWriter(AtomicWriter):
    """Context manager that collects demos and atomically publishes a robomimic hdf5 file on close.

    Everything is written to a temporary file next to ``path`` and renamed at close, so an
    interrupted run never leaves a partial file under the final name.
    """

    def __init__(
        self,
        path: str,
        env_args: dict,
        overwrite: bool = False,
        valid_fraction: float = 0.1,
        split_seed: int = 0,
    ) -> None:
        missing = [key for key in ("env_name", "type", "env_kwargs") if key not in env_args]
        if missing:
            raise ValueError(f"env_args lacks {missing}; expected robomimic's {{'env_name', 'type', 'env_kwargs'}}")
        if not 0.0 <= valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path!r} already exists; pass overwrite=True (--overwrite) or choose another path")
        self.path = path
        self.valid_fraction = valid_fraction
        self.split_seed = split_seed
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        handle, self._tmp_path = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        os.close(handle)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self._tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; publish with normal permissions
        self._file: h5py.File | None = h5py.File(self._tmp_path, "w")
        self._data = self._file.create_group("data")
        self._data.attrs["env_args"] = json.dumps(env_args)
        self._demos: list[str] = []
        self._total = 0

    @property
    def num_demos(self) -> int:
        """Number of demos added so far."""
        return len(self._demos)

    def add_demo(
        self,
        obs: dict[str, np.ndarray],
        actions: np.ndarray,
        states: np.ndarray,
        rewards: np.ndarray,
        dones: np.ndarray,
        model_xml: str,
    ) -> str:
        """Append one demo; returns its name (``demo_<i>``).

        obs: key -> (T, H, W, 3) uint8 image or (T, D) low-dim array; actions (T, A); states (T, S);
        rewards (T,); dones (T,).
        """
        if self._file is None:
            raise RuntimeError("the writer is closed; open a new RobomimicWriter to add demos")
        actions = np.asarray(actions, dtype=np.float64)
        states = np.asarray(states, dtype=np.float64)
        rewards = np.asarray(rewards, dtype=np.float64)
        dones = np.asarray(dones, dtype=np.int64)
        if actions.ndim != 2 or states.ndim != 2:
            raise ValueError(f"actions and states must be (T, A) and (T, S), got {actions.shape} and {states.shape}")
        steps = actions.shape[0]
        if steps == 0:
            raise ValueError("a demo needs at least one step")
        lengths = {"states": states.shape[0], "rewards": rewards.shape[0], "dones": dones.shape[0]}
        lengths.update({f"obs/{key}": np.shape(value)[0] for key, value in obs.items()})
        wrong = {name: length for name, length in lengths.items() if length != steps}
        if wrong:
            raise ValueError(f"every array must have T={steps} steps like actions, got {wrong}")

        name = f"demo_{len(self._demos)}"
        group = self._data.create_group(name)
        obs_group = group.create_group("obs")
        for key, value in obs.items():
            value = np.asarray(value)
            if value.ndim == 4:
                if value.dtype != np.uint8 or value.shape[-1] != 3:
                    raise ValueError(f"image obs {key!r} must be (T, H, W, 3) uint8, got {value.shape} {value.dtype}")
                obs_group.create_dataset(key, data=value, chunks=(1, *value.shape[1:]), compression="lzf")
            elif value.ndim == 2:
                obs_group.create_dataset(key, data=value.astype(np.float64))
            else:
                raise ValueError(f"obs {key!r} must be (T, H, W, 3) images or (T, D) low-dim, got shape {value.shape}")
        group.create_dataset("actions", data=actions)
        group.create_dataset("states", data=states)
        group.create_dataset("rewards", data=rewards)
        group.create_dataset("dones", data=dones)
        group.attrs["num_samples"] = steps
        group.attrs["model_file"] = model_xml
        self._demos.append(name)
        self._total += steps
        return name

    def _write_masks(self) -> None:
        """Random train/valid split of demo names as robomimic filter keys (byte strings)."""
        assert self._file is not None
        order = np.random.default_rng(self.split_seed).permutation(len(self._demos))
        num_valid = int(round(self.valid_fraction * len(self._demos)))
        if self.valid_fraction > 0 and len(self._demos) > 1:
            num_valid = max(1, num_valid)
        valid = sorted((self._demos[i] for i in order[:num_valid]), key=lambda n: int(n.split("_")[1]))
        train = [name for name in self._demos if name not in valid]
        mask = self._file.create_group("mask")
        mask.create_dataset("train", data=np.array(train, dtype="S"))
        mask.create_dataset("valid", data=np.array(valid, dtype="S"))

    def close(self) -> None:
        """Finish the file (total, masks) and move it to its final path."""
        if self._file is None:
            return
        if not self._demos:
            self.abort()
            raise ValueError(f"no demos were added, so {self.path!r} was not written")
        self._data.attrs["total"] = self._total
        self._write_masks()
        self._file.close()
        self._file = None
        os.replace(self._tmp_path, self.path)

    def abort(self) -> None:
        """Discard everything written so far."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if os.path.exists(self._tmp_path):
            os.remove(self._tmp_path)
