"""Meta-World demonstrations in 3D Diffusion Policy's zarr layout: a writer and a multi-task reader.

3D Diffusion Policy (DP3; Ze et al., RSS 2024, github.com/YanjieZe/3D-Diffusion-Policy,
``third_party/Metaworld/gen_demonstration_expert.py``) shares Meta-World expert data as one
diffusion_policy replay buffer per task, ``metaworld_<name>_expert.zarr``, where ``<name>`` is the
task without its version (``metaworld_drawer-open_expert.zarr`` for ``drawer-open-v3``). A dataset
here is a folder of such files, one per task. In zarr v2::

    data/img           (N, H, W, 3)  uint8    the first camera (DP3: corner2, moved, 128x128)
    data/img_<cam>     (N, H, W, 3)  uint8    each further camera (mimictest's addition)
    data/state         (N, 9)        float32  hand xyz, right and left fingertip xyz (DP3's agent_pos)
    data/full_state    (N, 39)       float32  Meta-World's observation, what the expert read
    data/action        (N, 4)        float32  xyz displacement in [-1, 1], gripper effort
    meta/episode_ends  (E,)          int64    exclusive end row of each episode

Every row is recorded before the action of the same row. Arrays are chunked 100 rows at a time and
compressed with Blosc zstd level 3, byte shuffle, as DP3 does. DP3 also stores ``data/point_cloud``
(1024 points with colour, from corner2's depth) and ``data/depth``; they are not written here (the
point-cloud pipeline is DP3's own code and doubles the generation time) and are ignored when a file
has them. The root's attributes add what DP3 leaves implicit: ``task``, ``instruction``, ``cams``
(the camera of ``data/img`` first), ``image_size``, ``episode_seeds``, ``max_episode_steps``,
``render_quality`` and ``metaworld_version``. A file without them (DP3's own) is read as
``cams=["corner2"]`` and the task's instruction from ``mimictest.envs.metaworld.INSTRUCTIONS``.

``MetaWorldDataset`` concatenates the episodes of several tasks. ``low_dim`` is
``full_state[:, :4]`` (hand xyz + gripper opening), the env's ``low_dim``; images are upright (see
``mimictest.envs.metaworld``). DP3's own files were rendered with mujoco-py, by our reading
mirror-imaged, and from a moved camera, so they do not match this env's images.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib import metadata

import numcodecs
import numpy as np
import zarr

from mimictest.data.stats import Stats, array_stats, cached_stats
from mimictest.data.windows import WindowDataset, check_episode_ends
from mimictest.data.writer import AtomicWriter
from mimictest.envs.metaworld import ACTION_DIM, LOW_DIM, check_cams, check_task, instruction
from mimictest.preprocess import ActionSpace

HOW_TO_MAKE = "make demos with `python -m mimictest.demos metaworld --episodes 10 --out FOLDER [--tasks a-v3,b-v3]`"
CHUNK_ROWS = 100  # DP3's chunk length
STATE_DIM, FULL_STATE_DIM = 9, 39
DP3_CAMERA = "corner2"  # the camera of data/img in a file without a "cams" attribute
IMAGE_READ_ROWS = 1024  # rows read at a time when caching images


def zarr_name(task: str) -> str:
    """DP3's file name for ``task``: ``"drawer-open-v3"`` -> ``"metaworld_drawer-open_expert.zarr"``."""
    check_task(task)
    return f"metaworld_{task.rsplit('-v', 1)[0]}_expert.zarr"


def image_key(cams: list[str], cam: str) -> str:
    """The array of ``cam`` in a file recording ``cams``: ``img`` for the first, ``img_<cam>`` after."""
    return "img" if cam == cams[0] else f"img_{cam}"


def _compressor() -> numcodecs.Blosc:
    return numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.SHUFFLE)


class MetaWorldZarrWriter(AtomicWriter):
    """Appends episodes of one task and atomically publishes its ``metaworld_<name>_expert.zarr``.

    Everything is written to a temporary folder beside ``path`` and renamed at ``close``; an existing
    ``path`` is never replaced.

    Args:
        path: the ``.zarr`` folder to create.
        task: the Meta-World task (stored with its instruction in the attributes).
        cams: the cameras of the episodes, in order (the first goes to ``data/img``); may be empty.
        attrs: more root attributes (``max_episode_steps``, ``render_quality``...).
    """

    def __init__(self, path: str, task: str, cams: tuple[str, ...] | list[str], attrs: dict | None = None) -> None:
        check_task(task)
        self.cams = list(check_cams(cams))
        if os.path.exists(path):
            raise FileExistsError(f"{path!r} already exists; delete it or write to another folder")
        self.path, self.task = os.path.normpath(path), task
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        self._tmp_path: str | None = tempfile.mkdtemp(dir=directory, prefix=f".{os.path.basename(self.path)}.",
                                                      suffix=".tmp")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self._tmp_path, 0o777 & ~umask)  # mkdtemp creates 0700; publish with normal permissions
        self._root = zarr.open_group(self._tmp_path, mode="w")
        self._root.create_group("data")
        self._root.create_group("meta")
        self._attrs = {"task": task, "instruction": instruction(task), "cams": self.cams, **(attrs or {})}
        self._episode_ends: list[int] = []
        self._seeds: list[int] = []

    @property
    def num_episodes(self) -> int:
        """Episodes added so far."""
        return len(self._episode_ends)

    def add_episode(self, images: dict[str, np.ndarray], state: np.ndarray, full_state: np.ndarray,
                    action: np.ndarray, seed: int) -> int:
        """Append one episode; returns its index.

        ``images`` ``{cam: (T, H, W, 3) uint8}`` for exactly the writer's ``cams``, ``state`` ``(T, 9)``,
        ``full_state`` ``(T, 39)``, ``action`` ``(T, 4)``; ``seed`` is the episode's reset seed.
        """
        if self._tmp_path is None:
            raise RuntimeError("the writer is closed; open a new MetaWorldZarrWriter to add episodes")
        if sorted(images) != sorted(self.cams):
            raise ValueError(f"images are for cameras {sorted(images)} but the writer records {self.cams}")
        arrays = {
            "state": np.asarray(state, dtype=np.float32),
            "full_state": np.asarray(full_state, dtype=np.float32),
            "action": np.asarray(action, dtype=np.float32),
        }
        expected = {"state": (STATE_DIM,), "full_state": (FULL_STATE_DIM,), "action": (ACTION_DIM,)}
        for cam in self.cams:
            image = np.asarray(images[cam])
            if image.dtype != np.uint8 or image.ndim != 4 or image.shape[-1] != 3:
                raise ValueError(f"images[{cam!r}] must be (T, H, W, 3) uint8, got {image.shape} {image.dtype}")
            arrays[image_key(self.cams, cam)] = image
            expected[image_key(self.cams, cam)] = image.shape[1:]
        wrong = {k: v.shape for k, v in arrays.items() if v.ndim < 2 or v.shape[1:] != expected[k]}
        if wrong:
            raise ValueError(f"expected rows of {expected}, got shapes {wrong}")
        lengths = {name: len(value) for name, value in arrays.items()}
        if len(set(lengths.values())) != 1 or lengths["action"] == 0:
            raise ValueError(f"every array needs the same number T >= 1 of rows, got {lengths}")
        data = self._root["data"]
        for name, value in arrays.items():
            if name not in data:
                data.create_dataset(name, shape=(0, *value.shape[1:]), chunks=(CHUNK_ROWS, *value.shape[1:]),
                                    dtype=value.dtype, compressor=_compressor())
            elif data[name].shape[1:] != value.shape[1:]:
                raise ValueError(f"{name} rows are {value.shape[1:]} but earlier episodes had {data[name].shape[1:]}")
            data[name].append(value)
        self._episode_ends.append((self._episode_ends[-1] if self._episode_ends else 0) + lengths["action"])
        self._seeds.append(int(seed))
        return self.num_episodes - 1

    def close(self) -> None:
        """Write ``meta/episode_ends`` and the attributes, then move the folder to its final path."""
        if self._tmp_path is None:
            return
        if not self._episode_ends:
            self.abort()
            raise ValueError(f"no episodes were added, so {self.path!r} was not written")
        self._root["meta"].create_dataset("episode_ends", data=np.asarray(self._episode_ends, dtype=np.int64),
                                          compressor=None)
        image_size = list(self._root["data"]["img"].shape[1:3]) if self.cams else None
        self._root.attrs.update({**self._attrs, "image_size": image_size, "episode_seeds": self._seeds,
                                 "metaworld_version": metadata.version("metaworld")})
        tmp, self._tmp_path = self._tmp_path, None
        if os.path.exists(self.path):
            shutil.rmtree(tmp)
            raise FileExistsError(f"{self.path!r} appeared while writing; it was left as it is")
        os.replace(tmp, self.path)

    def abort(self) -> None:
        """Discard everything written so far."""
        if self._tmp_path is not None:
            shutil.rmtree(self._tmp_path, ignore_errors=True)
            self._tmp_path = None


def merge_stats(parts: list[Stats], counts: list[int]) -> Stats:
    """Statistics over the rows of several arrays with the same dims, from each one's stats and row count."""
    n = np.asarray(counts, dtype=np.float64)[:, None]
    mean = np.asarray([p["mean"] for p in parts])
    second = np.asarray([p["std"] for p in parts]) ** 2 + mean ** 2
    total_mean = (n * mean).sum(0) / n.sum()
    variance = np.maximum((n * second).sum(0) / n.sum() - total_mean ** 2, 0.0)
    return {"min": np.min([p["min"] for p in parts], axis=0).tolist(),
            "max": np.max([p["max"] for p in parts], axis=0).tolist(),
            "mean": total_mean.tolist(), "std": np.sqrt(variance).tolist()}


class _LazyImages:
    """Reads one camera's rows from the task files on demand (opened once per DataLoader worker)."""

    def __init__(self, sources: list[tuple[str, str]], starts: np.ndarray) -> None:
        self.sources, self.starts = sources, starts  # (zarr path, array name) and first flat row of each file
        self._arrays: list[zarr.Array] | None = None
        self._pid = -1

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        if self._arrays is None or self._pid != os.getpid():
            numcodecs.blosc.use_threads = False  # Blosc's threads are not fork-safe
            self._arrays = [zarr.open_group(path, mode="r")["data"][name] for path, name in self.sources]
            self._pid = os.getpid()
        part = int(np.searchsorted(self.starts, rows[0], side="right")) - 1  # a window never spans episodes
        local = rows - self.starts[part]
        lo, hi = int(local.min()), int(local.max()) + 1
        return self._arrays[part][lo:hi][local - lo]  # (T_obs, H, W, 3)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None, "_pid": -1}


def _open_task(path: str, task: str) -> tuple[str, zarr.Group]:
    """The zarr of ``task`` in dataset folder ``path``, with clear errors for a missing or foreign file."""
    file = os.path.join(path, zarr_name(task))
    if not os.path.isdir(file):
        found = sorted(name for name in os.listdir(path) if name.endswith(".zarr"))
        raise FileNotFoundError(f"{path!r} has no {zarr_name(task)} for task {task!r}; it holds {found}. "
                                f"To add the task, {HOW_TO_MAKE}")
    try:
        root = zarr.open_group(file, mode="r")
    except ValueError as err:  # zarr's GroupNotFoundError and ContainsArrayError are ValueErrors
        raise ValueError(f"{file!r} is not a zarr group ({err})") from err
    if "meta" not in root or "episode_ends" not in root["meta"] or "data" not in root:
        raise KeyError(f"{file!r} has no meta/episode_ends or data/; is it an incomplete copy? Otherwise {HOW_TO_MAKE}")
    stored = root.attrs.get("task")
    if stored is not None and stored != task:
        raise ValueError(f"{file!r} holds task {stored!r}, not {task!r}")
    return file, root


def _array(root: zarr.Group, file: str, name: str, row_shape: str, good) -> zarr.Array:
    available = sorted(root["data"].array_keys())
    if name not in available:
        raise KeyError(f"{file!r} has no data/{name} {row_shape}; data/ holds {available}")
    array = root["data"][name]
    if not good(array.shape):
        raise ValueError(f"{file!r}: data/{name} has shape {array.shape}, expected {row_shape}")
    return array


class MetaWorldDataset(WindowDataset):
    """Windows over the Meta-World demos of several tasks, each episode labelled with its task and instruction.

    Args:
        path: the dataset folder, holding ``metaworld_<name>_expert.zarr`` per task.
        tasks: the tasks to read; task ids (``item["task"]``) follow this order.
        cams: the cameras to read (``[]`` for low-dim only); every task's file must have them.
        obs_horizon, chunk_size: window sizes (see ``mimictest.data.windows``).
        cache_images: load every image into RAM, or read them from the files per sample.
        pad_after: the most padded actions after an episode's end (``mimictest.data.windows``;
            Diffusion Policy: ``n_action_steps - 1``; ``None``: every timestep is a sample).

    Items: ``{"action": (chunk, 4), "is_pad": (chunk,), "low_dim": (T_obs, 4), "rgb": {cam:
    (T_obs, H, W, 3) uint8}, "task": int64, "lang": str}``. Attributes: ``stats`` (``"action"``,
    ``"low_dim"``, for ``Preprocessor``), ``task_names``, ``action_space``, ``image_sizes``
    (``{cam: (H, W)}``), ``num_episodes``.
    """

    def __init__(
        self,
        path: str,
        tasks: list[str],
        cams: list[str],
        obs_horizon: int,
        chunk_size: int,
        cache_images: bool = True,
        pad_after: int | None = None,
    ) -> None:
        tasks, cams = list(tasks), list(check_cams(cams))
        if not tasks:
            raise ValueError("tasks is empty; name at least one Meta-World task such as 'drawer-open-v3'")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks lists a task twice: {tasks}")
        for task in tasks:
            check_task(task)
        if not os.path.exists(path):
            raise FileNotFoundError(f"Meta-World dataset folder not found: {path!r}; {HOW_TO_MAKE}")
        if not os.path.isdir(path):
            raise ValueError(f"{path!r} is a file, but a Meta-World dataset is a folder of "
                             "metaworld_<task>_expert.zarr replay buffers")
        self.path = path
        actions, low_dims, ends, episode_task, episode_lang = [], [], [], [], []
        images: dict[str, list] = {cam: [] for cam in cams}
        self.image_sizes: dict[str, tuple[int, int]] = {}
        files, starts, action_stats, low_dim_stats, counts = [], [], [], [], []
        offset = 0
        for task_id, task in enumerate(tasks):
            file, root = _open_task(path, task)
            episode_ends = root["meta"]["episode_ends"][:]
            arrays = {
                "action": _array(root, file, "action", f"(N, {ACTION_DIM})",
                                 lambda s: len(s) == 2 and s[1] == ACTION_DIM),
                "full_state": _array(root, file, "full_state", f"(N, {FULL_STATE_DIM})",
                                     lambda s: len(s) == 2 and s[1] >= LOW_DIM),
            }
            recorded = list(root.attrs.get("cams", [DP3_CAMERA] if "img" in root["data"] else []))
            missing = [cam for cam in cams if cam not in recorded]
            if missing:
                raise KeyError(f"{file!r} has no camera(s) {missing}; it has {recorded}")
            for cam in cams:
                key = image_key(recorded, cam)
                arrays[key] = _array(root, file, key, f"(N, H, W, 3) uint8 for camera {cam!r}",
                                     lambda s: len(s) == 4 and s[-1] == 3)
                if arrays[key].dtype != np.uint8:
                    raise ValueError(f"{file!r}: data/{key} is {arrays[key].dtype}, expected uint8 images")
                size = tuple(arrays[key].shape[1:3])
                if self.image_sizes.setdefault(cam, size) != size:
                    raise ValueError(f"camera {cam!r} has {size[0]}x{size[1]} images in {file!r} but "
                                     f"{self.image_sizes[cam][0]}x{self.image_sizes[cam][1]} in earlier tasks")
            for name, array in arrays.items():
                try:
                    check_episode_ends(episode_ends, len(array))
                except ValueError as err:
                    raise ValueError(f"{file!r}: meta/episode_ends does not match data/{name} ({err})") from err
            action = arrays["action"][:].astype(np.float32)
            low_dim = arrays["full_state"][:, :LOW_DIM].astype(np.float32)
            columns = {"action": action, "low_dim": low_dim}

            def compute(key: str, columns: dict = columns, file: str = file) -> Stats:
                if not np.isfinite(columns[key]).all():
                    raise ValueError(f"{file!r}: the {key} data contains NaN or inf; remove or repair those episodes")
                return array_stats(columns[key])

            stats = cached_stats(file, ["action", "low_dim"], compute)
            action_stats.append(stats["action"])
            low_dim_stats.append(stats["low_dim"])
            counts.append(len(action))
            for cam in cams:
                key = image_key(recorded, cam)
                if cache_images:
                    cached = np.empty(arrays[key].shape, dtype=np.uint8)
                    for lo in range(0, len(cached), IMAGE_READ_ROWS):
                        cached[lo:lo + IMAGE_READ_ROWS] = arrays[key][lo:lo + IMAGE_READ_ROWS]
                    images[cam].append(cached)
                else:
                    images[cam].append((file, key))
            actions.append(action)
            low_dims.append(low_dim)
            ends.append(offset + episode_ends.astype(np.int64))
            starts.append(offset)
            files.append(file)
            episode_task += [task_id] * len(episode_ends)
            episode_lang += [str(root.attrs.get("instruction", instruction(task)))] * len(episode_ends)
            offset += len(action)
        if cache_images:
            rgb = {cam: np.concatenate(parts) for cam, parts in images.items()}
        else:
            rgb = {cam: _LazyImages(parts, np.asarray(starts, dtype=np.int64)) for cam, parts in images.items()}
        super().__init__(np.concatenate(ends), obs_horizon, chunk_size, np.concatenate(actions),
                         np.concatenate(low_dims), rgb, episode_task=np.asarray(episode_task),
                         task_names=tasks, episode_lang=episode_lang, pad_after=pad_after)
        self.files = files
        self.stats = {"action": merge_stats(action_stats, counts), "low_dim": merge_stats(low_dim_stats, counts)}
        self.action_space = ActionSpace(None, "relative", env_dim=ACTION_DIM)
