"""Reader for LeRobotDataset folders (codebase v3.0, and v2.1), such as a downloaded hub snapshot.

The layout, as LeRobot's ``LeRobotDataset`` writes it (huggingface/lerobot, ``datasets/lerobot_dataset.py``
and ``datasets/utils.py``; read there, written anew here)::

    meta/info.json        codebase_version, fps, features {key: {dtype, shape, names}},
                          data_path and video_path templates, chunks_size
    meta/stats.json       per-feature min / max / mean / std (and more) over the whole dataset
    meta/tasks.parquet    one row per task string (the pandas index), with its task_index
    meta/episodes/chunk-XXX/file-XXX.parquet
                          one row per episode: length, tasks, dataset_from_index / dataset_to_index,
                          data/chunk_index, data/file_index and, per video key,
                          videos/<key>/{chunk_index, file_index, from_timestamp, to_timestamp}
    data/chunk-XXX/file-XXX.parquet
                          one row per frame: action, observation.state, ..., timestamp, frame_index,
                          episode_index, index, task_index (images of dtype "image" as PNG bytes)
    videos/<key>/chunk-XXX/file-XXX.mp4
                          the frames of consecutive episodes in one file; episode e's frame at
                          ``timestamp`` is the video frame at ``from_timestamp[e] + timestamp``

v2.1 keeps one parquet file and one mp4 per episode (``data_path`` / ``video_path`` templates with
``episode_chunk`` and ``episode_index``), ``meta/episodes.jsonl`` and ``meta/tasks.jsonl``, and every
episode's video starts at time 0.

Mapping to windows (``mimictest.data.windows``): every feature of dtype ``video`` or ``image`` is a
camera named by its key without the ``observation.images.`` / ``observation.`` prefix
(``observation.image`` -> ``image``, ``observation.images.top`` -> ``top``, the camera names of our
PushT and ALOHA envs); ``observation.state`` is ``low_dim``; ``action`` is the action; the episode's
task string is its instruction (``lang``), and with more than one task also its task id.

Videos are decoded once, sequentially (no seeking), with PyAV into a uint8 RAM cache, like the other
readers cache images, so training never waits on a decoder. Measured with ``python -m mimictest.bench
decode`` (docs/benchmarks.md), PyAV with one scaler per file decodes LeRobot's AV1 files in order
about as fast as torchcodec (8.5-9.2k vs 8.3-10.8k frames/s for 96x96 PushT, same dav1d
decoder); PyAV is used because its wheels bring their own FFmpeg, where torchcodec needs the
system's shared libraries and a release matched to torch. Each row's frame is the video frame
within ``TOLERANCE_S`` of its time, as LeRobot requires. ``image_size`` resizes while decoding
(ALOHA's 480x640 frames to a CPU-sized 120x160: 20000 frames are 1.2 GB instead of 18 GB).
Statistics of ``action`` and ``observation.state`` are computed from the frames (they equal
LeRobot's ``meta/stats.json``) and cached beside the folder.
"""

from __future__ import annotations

import io
import json
import os
import time

import numpy as np

from mimictest.data.stats import array_stats, cached_stats
from mimictest.data.windows import WindowDataset

SUPPORTED_VERSIONS = ("v2.1", "v3.0")
TOLERANCE_S = 1e-4  # LeRobot's default tolerance_s between a frame's timestamp and its video frame
STATE_KEY, ACTION_KEY = "observation.state", "action"
CAMERA_PREFIXES = ("observation.images.", "observation.")
def how_to_get(repo: str = "lerobot/pusht", folder: str = "Datasets/lerobot_pusht") -> str:
    """The sentence that says where a LeRobot dataset folder comes from."""
    return (f"Download one with `hf download --repo-type dataset {repo} --local-dir {folder}` (any LeRobotDataset "
            "repo), or record one with LeRobot's writer (tests/make_lerobot_fixture.py records our experts' demos)")
INSTALL = "install the reader's dependencies with `pip install -e \".[lerobot]\"` (pyarrow, av)"


def camera_name(key: str) -> str:
    """A LeRobot image key as a camera name: ``observation.images.top`` -> ``top``, ``observation.image`` -> ``image``."""
    for prefix in CAMERA_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def read_info(root: str) -> dict:
    """``meta/info.json`` of a LeRobot dataset folder, with one-line errors for a foreign folder or version."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"LeRobot dataset folder not found: {root!r}. {how_to_get(folder=root)}")
    path = os.path.join(root, "meta", "info.json")
    if not os.path.isfile(path):
        raise ValueError(f"{root!r} is not a LeRobot dataset folder: it has no meta/info.json (expected the folder "
                         f"with meta/, data/ and videos/ of a LeRobotDataset). {how_to_get()}")
    with open(path) as fh:
        try:
            info = json.load(fh)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path!r} is not valid JSON ({err}); re-download the dataset") from err
    version = info.get("codebase_version")
    if version not in SUPPORTED_VERSIONS:
        hint = (" (v2.0 and older: convert with LeRobot's convert_dataset_v21_to_v30 after upgrading to v2.1)"
                if isinstance(version, str) and version < "v2.1" else "")
        raise ValueError(f"{root!r}: codebase_version {version!r} is not supported; this reader reads "
                         f"{' and '.join(SUPPORTED_VERSIONS)}{hint}")
    missing = [k for k in ("fps", "features", "data_path") if k not in info]
    if missing:
        raise ValueError(f"{path!r} has no {missing}; a LeRobot info.json has fps, features and data_path")
    return info


def _import_pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError(f"reading LeRobot datasets needs pyarrow; {INSTALL}") from err
    return pq


def _read_parquet(path: str, columns: list[str] | None = None):
    """A parquet file's ``columns`` (all with ``None``) as a pyarrow Table, with one-line errors."""
    pq = _import_pyarrow()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} is missing; the LeRobot dataset is incomplete (re-download it)")
    try:
        return pq.read_table(path, columns=columns)
    except Exception as err:  # pyarrow raises ArrowInvalid / ArrowIOError for truncated or foreign files
        raise ValueError(f"{path!r} is not a readable parquet file with columns {columns} ({err}); "
                         "re-download the dataset") from err


def _read_parquet_schema(path: str) -> list[str]:
    """The column names of a parquet file."""
    pq = _import_pyarrow()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} is missing; the LeRobot dataset is incomplete (re-download it)")
    try:
        return pq.read_schema(path).names
    except Exception as err:
        raise ValueError(f"{path!r} is not a readable parquet file ({err}); re-download the dataset") from err


def _column(table, name: str) -> np.ndarray:
    """A parquet column as numpy: scalars ``(N,)``, fixed-size or variable lists ``(N, D)``."""
    import pyarrow as pa

    col = table.column(name).combine_chunks()
    if pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type) or pa.types.is_large_list(col.type):
        flat = col.flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(len(col), -1) if len(col) else flat.reshape(0, 0)
    return col.to_numpy(zero_copy_only=False)


def _jsonl(path: str) -> list[dict]:
    """The records of a v2.1 ``meta/*.jsonl`` file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} is missing; a v2.1 LeRobot dataset has meta/episodes.jsonl and "
                                "meta/tasks.jsonl (re-download it)")
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _episode_table(root: str, info: dict) -> list[dict]:
    """One dict per episode, sorted by ``episode_index``, with the keys of v3.0's episode table."""
    if info["codebase_version"] == "v2.1":
        chunks = int(info.get("chunks_size", 1000))
        rows = _jsonl(os.path.join(root, "meta", "episodes.jsonl"))
        for row in rows:
            row["episode_chunk"] = int(row["episode_index"]) // chunks
        return sorted(rows, key=lambda r: int(r["episode_index"]))
    folder = os.path.join(root, "meta", "episodes")
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.endswith(".parquet"))
    if not paths:
        raise FileNotFoundError(f"{root!r} has no meta/episodes/chunk-*/file-*.parquet; the LeRobot v3.0 dataset is "
                                "incomplete (re-download it)")
    rows = []
    for path in paths:
        names = [n for n in _read_parquet_schema(path) if not n.startswith("stats/")]
        table = _read_parquet(path, names)
        rows += table.to_pylist()
    return sorted(rows, key=lambda r: int(r["episode_index"]))


def _task_names(root: str, info: dict) -> dict[int, str]:
    """``{task_index: task string}``."""
    if info["codebase_version"] == "v2.1":
        return {int(r["task_index"]): str(r["task"]) for r in _jsonl(os.path.join(root, "meta", "tasks.jsonl"))}
    table = _read_parquet(os.path.join(root, "meta", "tasks.parquet"))
    strings = [n for n in table.column_names if n != "task_index"]  # the pandas index column holds the string
    if "task_index" not in table.column_names or len(strings) != 1:
        raise ValueError(f"{root!r}: meta/tasks.parquet has columns {table.column_names}, expected task_index and "
                         "the task string")
    return dict(zip(map(int, _column(table, "task_index")), map(str, table.column(strings[0]).to_pylist())))


def _decode_png(data: bytes, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.BOX)  # area averaging, as the videos (swscale AREA)
    return np.asarray(image)  # (H, W, 3) uint8


def decode_video_rows(path: str, times: np.ndarray, size: tuple[int, int] | None, out: np.ndarray, rows: np.ndarray,
                      what: str) -> int:
    """Decode ``path`` once from its start and write the frame at each ``times[i]`` (seconds) to ``out[rows[i]]``.

    Frames are converted to RGB (and resized to ``size`` ``(H, W)``, with area averaging) only when some row
    needs them, and decoding stops after the last needed one. Returns the number of frames decoded.
    """
    try:
        import av
        from av.video.reformatter import VideoReformatter
    except ImportError as err:
        raise ImportError(f"decoding LeRobot videos needs PyAV; {INSTALL}") from err
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} is missing; the LeRobot dataset's videos are incomplete (re-download it)")
    order = np.argsort(times, kind="stable")
    targets, targets_rows = times[order], rows[order]
    resize = {} if size is None else {"width": size[1], "height": size[0], "interpolation": "AREA"}
    j, decoded, last = 0, 0, None
    reformatter = VideoReformatter()  # one scaler for the file: frame.to_ndarray(format=...) builds one per frame, 7x slower
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                decoded += 1
                t = float(frame.time)
                if targets[j] < t - TOLERANCE_S:
                    break  # a timestamp fell between two frames
                k = j
                while k < len(targets) and abs(targets[k] - t) <= TOLERANCE_S:
                    k += 1
                if k > j:
                    out[targets_rows[j:k]] = reformatter.reformat(frame, format="rgb24", **resize).to_ndarray()  # (H, W, 3)
                    j, last = k, t
                    if j == len(targets):
                        return decoded
    except av.error.FFmpegError as err:
        raise ValueError(f"{path!r} could not be decoded ({err}); re-download the dataset's videos") from err
    after = "no frame was decoded" if last is None else f"the last matching frame is at {last:.4f} s"
    raise ValueError(f"{what}: {path!r} has no frame within {TOLERANCE_S} s of {targets[j]:.4f} s ({after}); the "
                     "episode table's from_timestamp or the frames' timestamps disagree with the video")


class LeRobotDataset(WindowDataset):
    """Windows over a local LeRobotDataset folder (v3.0 or v2.1).

    Args:
        root: the dataset folder (with ``meta/info.json``), e.g. a hub snapshot such as ``lerobot/pusht``.
        obs_horizon, chunk_size: window sizes (see ``mimictest.data.windows``).
        cams: camera names to read (``top`` for ``observation.images.top``), or ``None`` for every
            image / video feature.
        state_key: the feature used as ``low_dim`` (``None``: no low-dim observations).
        action_key: the feature used as the action.
        episodes: the episode indices to read (``None``: all), like LeRobot's ``episodes=``.
        image_size: ``(H, W)`` to resize frames to while decoding, or ``None`` to keep the dataset's size;
            a camera of another size is resized, so every camera has this size.
        pad_after: the most padded actions after an episode's end (``mimictest.data.windows``).

    Attributes: ``stats`` (for ``Preprocessor``), ``image_size``, ``fps``, ``info``, ``features``,
    ``camera_keys`` (``{camera: LeRobot key}``), ``decode_seconds`` and ``decoded_frames`` (the video cache's
    cost), ``task_names`` (``None`` for single-task data), ``low_dim_dim``, ``num_episodes``.
    """

    def __init__(
        self,
        root: str,
        obs_horizon: int,
        chunk_size: int,
        cams: list[str] | tuple[str, ...] | None = None,
        state_key: str | None = STATE_KEY,
        action_key: str = ACTION_KEY,
        episodes: list[int] | None = None,
        image_size: tuple[int, int] | None = None,
        pad_after: int | None = None,
    ) -> None:
        self.root, self.info = root, read_info(root)
        self.fps, self.features = float(self.info["fps"]), self.info["features"]
        version = self.info["codebase_version"]
        visual = {camera_name(k): k for k, f in self.features.items() if f.get("dtype") in ("video", "image")}
        if cams is None:
            cams = list(visual)
        absent = [c for c in cams if c not in visual]
        if absent:
            raise KeyError(f"{root!r} has no camera(s) {absent}; its image/video features are {visual}. Set CAMS "
                           f"to some of {list(visual)}")
        self.camera_keys = {cam: visual[cam] for cam in cams}
        for name, key in (("action_key", action_key), ("state_key", state_key)):
            if key is not None and key not in self.features:
                vectors = [k for k, f in self.features.items() if f.get("dtype") not in ("video", "image", "string")]
                raise KeyError(f"{root!r} has no feature {key!r} ({name}); its vector features are {vectors}")
            if key is not None and self.features[key].get("dtype") not in ("float32", "float64"):
                raise ValueError(f"{root!r}: feature {key!r} has dtype {self.features[key].get('dtype')!r}, expected "
                                 "float32 or float64")

        table = _episode_table(root, self.info)
        known = [int(r["episode_index"]) for r in table]
        if episodes is not None:
            unknown = sorted(set(episodes) - set(known))
            if unknown:
                raise ValueError(f"{root!r} has no episode(s) {unknown[:10]}; it has episodes {known[0]}..{known[-1]}")
            wanted = set(episodes)
            table = [r for r in table if int(r["episode_index"]) in wanted]
        frames = self._read_frames(table, version, [action_key, state_key])
        lengths = np.array([int(r["length"]) for r in table])
        episode_ends = np.cumsum(lengths)
        action = frames[action_key].astype(np.float32)  # (N, A)
        low_dim = frames[state_key].astype(np.float32) if state_key is not None else None  # (N, D)

        tasks = _task_names(root, self.info)
        task_of_episode = frames["task_index"][episode_ends - lengths]  # (E,) each episode's first frame's task
        bad = sorted(set(task_of_episode.tolist()) - set(tasks))
        if bad:
            raise ValueError(f"{root!r}: frames refer to task_index {bad} that meta/tasks has not")
        episode_lang = [tasks[int(t)] for t in task_of_episode]
        episode_task, task_names = None, None
        if len(tasks) > 1:
            task_names = [tasks[i] for i in sorted(tasks)]
            episode_task = np.searchsorted(sorted(tasks), task_of_episode)

        start = time.perf_counter()
        rgb, self.decoded_frames = self._load_cameras(table, version, frames, episode_ends, image_size)
        self.decode_seconds = time.perf_counter() - start
        self.image_size = image_size
        if image_size is None and rgb:
            sizes = {cam: images.shape[1:3] for cam, images in rgb.items()}
            self.image_size = tuple(next(iter(sizes.values())))
            if len(set(sizes.values())) > 1:
                raise ValueError(f"{root!r}: the cameras have different sizes {sizes}; pass image_size to resize them "
                                 "to one")
        super().__init__(episode_ends, obs_horizon, chunk_size, action, low_dim, rgb, episode_task=episode_task,
                         task_names=task_names, episode_lang=episode_lang, pad_after=pad_after, source=root)
        selection = "" if episodes is None else f"[episodes {','.join(map(str, sorted(set(episodes))))}]"
        arrays = {"action": (f"{action_key}{selection}", action)}  # a subset's statistics are its own
        if low_dim is not None:
            arrays["low_dim"] = (f"{state_key}{selection}", low_dim)
        names = {name: array for name, array in arrays.values()}
        raw = cached_stats(root, list(names), lambda name: array_stats(names[name]))
        self.stats = {ours: raw[name] for ours, (name, _) in arrays.items()}

    def _data_paths(self, table: list[dict], version: str) -> list[tuple[str, list[dict]]]:
        """The data files holding ``table``'s episodes, in order, each with its episodes."""
        files: dict[str, list[dict]] = {}
        for row in table:
            if version == "v2.1":
                rel = self.info["data_path"].format(episode_chunk=row["episode_chunk"], episode_index=row["episode_index"])
            else:
                rel = self.info["data_path"].format(chunk_index=row["data/chunk_index"], file_index=row["data/file_index"])
            files.setdefault(os.path.join(self.root, rel), []).append(row)
        return list(files.items())

    def _read_frames(self, table: list[dict], version: str, keys: list[str | None]) -> dict[str, np.ndarray]:
        """The frames of ``table``'s episodes, in episode order: ``keys`` + index columns (+ image columns)."""
        images = [k for k in self.camera_keys.values() if self.features[k]["dtype"] == "image"]
        columns = [k for k in keys if k is not None] + ["timestamp", "frame_index", "episode_index", "index", "task_index"]
        parts: dict[str, list] = {name: [] for name in columns + images}
        for path, rows in self._data_paths(table, version):
            have = _read_parquet_schema(path)
            missing = [c for c in columns + images if c not in have]
            if missing:
                raise KeyError(f"{path!r} has no column(s) {missing}; info.json lists them as features, so the "
                               "dataset is inconsistent (re-download it)")
            data = _read_parquet(path, columns + images)
            values = {name: _column(data, name) for name in columns}
            cells = {key: data.column(key).to_pylist() for key in images}  # [{"bytes": PNG, "path": ...}]
            order = np.lexsort((values["frame_index"], values["episode_index"]))  # (n,) rows by episode, then frame
            sorted_episodes = values["episode_index"][order]
            for row in rows:
                e = int(row["episode_index"])
                picked = order[np.searchsorted(sorted_episodes, e):np.searchsorted(sorted_episodes, e, side="right")]
                if len(picked) != int(row["length"]):
                    raise ValueError(f"{path!r} holds {len(picked)} frames of episode {e}, but the episode table says "
                                     f"{row['length']}; the dataset is inconsistent (re-download it)")
                if not np.array_equal(values["frame_index"][picked], np.arange(len(picked))):
                    raise ValueError(f"{path!r}: episode {e}'s frame_index is not 0..{len(picked) - 1}")
                for name in columns:
                    parts[name].append(values[name][picked])
                for key in images:
                    parts[key].append([cells[key][i] for i in picked])
        frames = {name: np.concatenate(parts[name]) for name in columns}
        for key in images:
            frames[key] = sum(parts[key], [])
        for key in keys:
            if key is not None and frames[key].ndim != 2:
                frames[key] = frames[key].reshape(len(frames[key]), -1)
        return frames

    def _load_cameras(self, table: list[dict], version: str, frames: dict, episode_ends: np.ndarray,
                      image_size: tuple[int, int] | None) -> tuple[dict[str, np.ndarray], int]:
        """``{camera: (N, H, W, 3) uint8}`` for every selected camera, and the number of frames decoded."""
        starts = episode_ends - np.array([int(r["length"]) for r in table])
        rgb, decoded = {}, 0
        for cam, key in self.camera_keys.items():
            shape = tuple(self.features[key]["shape"])
            names = self.features[key].get("names") or []
            hwc = shape if len(shape) != 3 or list(names[:1]) != ["channels"] else (shape[1], shape[2], shape[0])
            if len(hwc) != 3 or hwc[2] != 3:
                raise ValueError(f"{self.root!r}: feature {key!r} has shape {shape} (names {names}); expected RGB "
                                 "images (H, W, 3)")
            size = tuple(image_size) if image_size is not None else tuple(hwc[:2])
            out = np.empty((int(episode_ends[-1]), *size, 3), dtype=np.uint8)  # (N, H, W, 3)
            if self.features[key]["dtype"] == "image":
                for i, cell in enumerate(frames[key]):
                    if not isinstance(cell, dict) or not cell.get("bytes"):
                        raise ValueError(f"{self.root!r}: image {key!r} of frame {i} has no embedded bytes")
                    out[i] = _decode_png(cell["bytes"], image_size)
                rgb[cam] = out
                continue
            if not self.info.get("video_path"):
                raise ValueError(f"{self.root!r}: {key!r} is a video feature but info.json has no video_path")
            files: dict[str, list[np.ndarray]] = {}  # {mp4 path: [rows of each of its episodes]}
            times = frames["timestamp"].astype(np.float64)  # (N,) seconds into each row's video file
            for row, lo, hi in zip(table, starts, episode_ends):
                if version == "v2.1":  # one file per episode, starting at 0
                    rel = self.info["video_path"].format(episode_chunk=row["episode_chunk"], video_key=key,
                                                         episode_index=row["episode_index"])
                else:
                    rel = self.info["video_path"].format(video_key=key, chunk_index=row[f"videos/{key}/chunk_index"],
                                                         file_index=row[f"videos/{key}/file_index"])
                    times[lo:hi] += float(row[f"videos/{key}/from_timestamp"])
                files.setdefault(os.path.join(self.root, rel), []).append(np.arange(lo, hi))
            for path, parts in files.items():
                rows = np.concatenate(parts)
                decoded += decode_video_rows(path, times[rows], size, out, rows, f"{self.root!r} {key!r}")
            rgb[cam] = out
        return rgb, decoded
