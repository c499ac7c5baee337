"""LeRobotDataset folders written by LeRobot 0.6.1's own writer (tests/make_lerobot_fixture.py): read back value by
value against LeRobot's own reader and its stats.json, v2.1's layout, one-line errors, and both scripts run on them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("pyarrow", reason="the LeRobot reader needs pyarrow (pip install -e '.[lerobot]')")
av = pytest.importorskip("av", reason="the LeRobot reader needs PyAV (pip install -e '.[lerobot]')")
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from mimictest import checkpoint  # noqa: E402
from mimictest.data.lerobot import LeRobotDataset  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
ENV = {**os.environ, "MUJOCO_GL": "egl", "OMP_NUM_THREADS": "1"}
PUSHT_TASK = "Push the T-shaped block onto the T-shaped target."


def copy_of(name: str, tmp_path) -> str:
    """A writable copy of a committed fixture (the reader caches statistics beside its folder)."""
    dst = str(tmp_path / name)
    shutil.copytree(os.path.join(DATA, name), dst)
    return dst


@pytest.fixture
def pusht(tmp_path) -> str:
    return copy_of("lerobot_pusht", tmp_path)


def expected(name: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(DATA, f"{name}_expected.npz")) as f:
        return dict(f)


def test_reads_what_lerobot_wrote_as_lerobot_reads_it(pusht) -> None:
    ds = LeRobotDataset(pusht, obs_horizon=2, chunk_size=16, pad_after=7)
    with open(os.path.join(pusht, "meta", "info.json")) as fh:
        info = json.load(fh)
    assert info["codebase_version"] == "v3.0" and info["features"]["observation.image"]["dtype"] == "video"
    assert ds.cams == ["image"] and ds.camera_keys == {"image": "observation.image"} and ds.image_size == (96, 96)
    assert ds.num_episodes == 3 and ds.episode_ends[-1] == info["total_frames"] == ds.decoded_frames
    assert ds.fps == 10 and ds.low_dim_dim == 2 and ds.action.shape == (info["total_frames"], 2)
    assert ds.episode_lang == [PUSHT_TASK] * 3 and ds.task_names is None  # one task: the instruction only
    want = expected("lerobot_pusht")
    rows = want["rows"]
    np.testing.assert_array_equal(ds.action[rows], want["action"])
    np.testing.assert_array_equal(ds.low_dim[rows], want["state"])
    frames = ds.rgb["image"][rows].astype(int)  # (n, 96, 96, 3)
    assert np.abs(frames - want["lerobot.image"]).max() <= 2  # LeRobot's decode (PyAV 15 there, ours here)
    mse = np.mean((frames - want["source.image"].astype(int)) ** 2)
    assert 10 * np.log10(255**2 / mse) > 30  # AV1 at crf 30 against the rendered frames before encoding
    assert list(want["task"]) == [PUSHT_TASK] * len(rows)

    with open(os.path.join(pusht, "meta", "stats.json")) as fh:
        lerobot_stats = json.load(fh)
    for ours, theirs in (("action", "action"), ("low_dim", "observation.state")):
        for stat in ("min", "max", "mean", "std"):  # LeRobot aggregates per-episode float32 statistics
            np.testing.assert_allclose(ds.stats[ours][stat], lerobot_stats[theirs][stat], rtol=1e-5, atol=0)

    item = ds[0]  # episode 0's first step: the history is its first frame twice
    assert item["rgb"]["image"].shape == (2, 96, 96, 3) and item["rgb"]["image"].dtype == np.uint8
    np.testing.assert_array_equal(item["rgb"]["image"][0], ds.rgb["image"][0])
    np.testing.assert_array_equal(item["rgb"]["image"][1], ds.rgb["image"][0])
    assert item["low_dim"].shape == (2, 2) and item["action"].shape == (16, 2) and item["lang"] == PUSHT_TASK
    last = ds[len(ds) - 1]  # the last sample pads at most PAD_AFTER actions after the dataset's last frame
    assert last["is_pad"].sum() == 7
    np.testing.assert_array_equal(last["action"][-8:], np.repeat(ds.action[-1:], 8, axis=0))


def test_resize_and_episode_subset(pusht) -> None:
    full = LeRobotDataset(pusht, obs_horizon=1, chunk_size=4)
    small = LeRobotDataset(pusht, obs_horizon=1, chunk_size=4, episodes=[2], image_size=(48, 48))
    lo = int(full.episode_ends[1])
    assert small.num_episodes == 1 and small.image_size == (48, 48) and small.rgb["image"].shape[1:] == (48, 48, 3)
    np.testing.assert_array_equal(small.action, full.action[lo:])
    assert small.decoded_frames == full.decoded_frames  # one pass from the file's start to episode 2's last frame
    halves = full.rgb["image"][lo:].reshape(-1, 48, 2, 48, 2, 3).mean(axis=(2, 4))  # 2x2 area average
    assert np.abs(small.rgb["image"].astype(float) - halves).mean() < 2.0
    np.testing.assert_allclose(small.stats["action"]["mean"], full.action[lo:].mean(0), rtol=1e-6)
    assert full.stats["action"]["mean"] != small.stats["action"]["mean"]  # a subset's statistics are its own


def to_v21(v3: str, out: str) -> None:
    """Rewrite a v3.0 folder in LeRobot's v2.1 layout: one parquet and one (H.264) mp4 per episode, jsonl metadata."""
    with open(os.path.join(v3, "meta", "info.json")) as fh:
        info = json.load(fh)
    episodes = pq.read_table(os.path.join(v3, "meta", "episodes", "chunk-000", "file-000.parquet")).to_pylist()
    frames = pq.read_table(os.path.join(v3, "data", "chunk-000", "file-000.parquet"))
    os.makedirs(os.path.join(out, "meta"))
    info.update(codebase_version="v2.1", data_path="data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
                video_path="videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4")
    with open(os.path.join(out, "meta", "info.json"), "w") as fh:
        json.dump(info, fh)
    with open(os.path.join(out, "meta", "episodes.jsonl"), "w") as fh:
        fh.writelines(json.dumps({"episode_index": e["episode_index"], "tasks": e["tasks"], "length": e["length"]}) + "\n"
                      for e in episodes)
    with open(os.path.join(out, "meta", "tasks.jsonl"), "w") as fh:
        fh.write(json.dumps({"task_index": 0, "task": PUSHT_TASK}) + "\n")
    source = LeRobotDataset(v3, obs_horizon=1, chunk_size=1).rgb["image"]  # (N, 96, 96, 3)
    for e in episodes:
        lo, hi, i = e["dataset_from_index"], e["dataset_to_index"], e["episode_index"]
        path = os.path.join(out, "data", "chunk-000", f"episode_{i:06d}.parquet")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(frames.slice(lo, hi - lo), path)
        video = os.path.join(out, "videos", "chunk-000", "observation.image", f"episode_{i:06d}.mp4")
        os.makedirs(os.path.dirname(video), exist_ok=True)
        with av.open(video, "w") as container:
            stream = container.add_stream("libx264", rate=info["fps"], options={"crf": "0"})  # lossless H.264
            stream.width, stream.height, stream.pix_fmt = 96, 96, "yuv444p"
            for image in source[lo:hi]:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            container.mux(stream.encode())


def test_reads_the_v21_layout(pusht, tmp_path) -> None:
    v21 = str(tmp_path / "v21")
    to_v21(pusht, v21)
    old, new = LeRobotDataset(v21, obs_horizon=2, chunk_size=8), LeRobotDataset(pusht, obs_horizon=2, chunk_size=8)
    np.testing.assert_array_equal(old.episode_ends, new.episode_ends)
    np.testing.assert_array_equal(old.action, new.action)
    np.testing.assert_array_equal(old.low_dim, new.low_dim)
    assert old.episode_lang == new.episode_lang
    assert np.abs(old.rgb["image"].astype(int) - new.rgb["image"]).max() <= 3  # lossless up to RGB <-> YUV rounding


def test_several_tasks_become_task_ids_and_instructions(pusht) -> None:
    """Episode 1 relabelled with a second task (as LeRobot stores one: a tasks.parquet row and the frames' task_index)."""
    other = "Push the T-shaped block to the left."
    tasks = pq.read_table(os.path.join(pusht, "meta", "tasks.parquet"))
    pq.write_table(pa.Table.from_pylist([*tasks.to_pylist(), {"task_index": 1, "task": other}], schema=tasks.schema),
                   os.path.join(pusht, "meta", "tasks.parquet"))
    path = os.path.join(pusht, "data", "chunk-000", "file-000.parquet")
    frames = pq.read_table(path)
    relabelled = np.where(frames.column("episode_index").to_numpy() == 1, 1, frames.column("task_index").to_numpy())
    pq.write_table(frames.set_column(frames.column_names.index("task_index"), "task_index", pa.array(relabelled)), path)
    ds = LeRobotDataset(pusht, obs_horizon=1, chunk_size=4)
    assert ds.task_names == [PUSHT_TASK, other] and ds.episode_task.tolist() == [0, 1, 0]
    assert ds.episode_lang == [PUSHT_TASK, other, PUSHT_TASK] and ds.instructions == [PUSHT_TASK, other]
    item = ds[int(ds.episode_ends[0])]  # episode 1's first step
    assert item["task"] == 1 and item["lang"] == other


def test_reads_image_features_stored_in_the_parquet(pusht) -> None:
    """``dtype: image`` (LeRobot's ``use_videos=False``): PNG bytes in a {bytes, path} struct column, decoded losslessly."""
    import io

    from PIL import Image

    video = LeRobotDataset(pusht, obs_horizon=1, chunk_size=1).rgb["image"]  # (N, 96, 96, 3)
    pngs = []
    for image in video:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        pngs.append({"bytes": buffer.getvalue(), "path": None})
    path = os.path.join(pusht, "data", "chunk-000", "file-000.parquet")
    frames = pq.read_table(path)
    column = pa.array(pngs, type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(frames.append_column("observation.image", column), path)
    info_path = os.path.join(pusht, "meta", "info.json")
    with open(info_path) as fh:
        info = json.load(fh)
    info["features"]["observation.image"]["dtype"] = "image"
    info["video_path"] = None
    with open(info_path, "w") as fh:
        json.dump(info, fh)
    shutil.rmtree(os.path.join(pusht, "videos"))
    ds = LeRobotDataset(pusht, obs_horizon=2, chunk_size=4)
    assert ds.cams == ["image"] and ds.decoded_frames == 0
    np.testing.assert_array_equal(ds.rgb["image"], video)
    assert LeRobotDataset(pusht, obs_horizon=1, chunk_size=1, image_size=(48, 48)).rgb["image"].shape[1:] == (48, 48, 3)


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def rewrite_episodes(root: str, column: str, change) -> None:
    path = os.path.join(root, "meta", "episodes", "chunk-000", "file-000.parquet")
    table = pq.read_table(path)
    values = [change(v) for v in table.column(column).to_pylist()]
    pq.write_table(table.set_column(table.column_names.index(column), column, pa.array(values)), path)


def test_bad_input_gets_one_line_errors(pusht, tmp_path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        LeRobotDataset(str(tmp_path / "absent"), 1, 1)
    assert "hf download --repo-type dataset" in one_line(err)
    script = os.path.join(ROOT, "Script", "ACTImageTransferCubeLeRobot.py")
    out = subprocess.run([sys.executable, script], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and out.stderr.strip().splitlines()[-1] == (
        "dataset not found: 'Datasets/lerobot_aloha_sim_transfer_cube_human'. Download one with `hf download "
        "--repo-type dataset lerobot/aloha_sim_transfer_cube_human --local-dir "
        "Datasets/lerobot_aloha_sim_transfer_cube_human` (any LeRobotDataset repo), or record one with LeRobot's writer "
        "(tests/make_lerobot_fixture.py records our experts' demos)")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError) as err:
        LeRobotDataset(str(tmp_path / "empty"), 1, 1)
    assert "is not a LeRobot dataset folder" in one_line(err)
    with pytest.raises(KeyError) as err:
        LeRobotDataset(pusht, 1, 1, state_key="observation.environment_state")
    assert "has no feature 'observation.environment_state'" in one_line(err) and "observation.state" in one_line(err)
    with pytest.raises(KeyError) as err:
        LeRobotDataset(pusht, 1, 1, cams=["top"])
    assert "no camera(s) ['top']" in one_line(err) and "['image']" in one_line(err)
    with pytest.raises(ValueError) as err:
        LeRobotDataset(pusht, 1, 1, episodes=[7])
    assert "no episode(s) [7]" in one_line(err)

    shifted = copy_of("lerobot_pusht", tmp_path / "shifted")
    rewrite_episodes(shifted, "videos/observation.image/from_timestamp", lambda t: t + 0.05)  # between two frames
    with pytest.raises(ValueError) as err:
        LeRobotDataset(shifted, 1, 1)
    assert "has no frame within" in one_line(err)

    os.remove(os.path.join(pusht, "videos", "observation.image", "chunk-000", "file-000.mp4"))
    with pytest.raises(FileNotFoundError) as err:
        LeRobotDataset(pusht, 1, 1)
    assert "file-000.mp4' is missing" in one_line(err)
    info_path = os.path.join(pusht, "meta", "info.json")
    with open(info_path) as fh:
        info = json.load(fh)
    with open(info_path, "w") as fh:
        json.dump({**info, "codebase_version": "v2.0"}, fh)
    with pytest.raises(ValueError) as err:
        LeRobotDataset(pusht, 1, 1)
    assert "codebase_version 'v2.0' is not supported" in one_line(err)


def run_script(name: str, tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, os.path.join(ROOT, "Script", name), *overrides], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def evaluation_of(run_dir) -> dict:
    [path] = [os.path.join(run_dir, n) for n in os.listdir(run_dir) if n.startswith("eval_step") and n.endswith(".json")]
    with open(path) as fh:
        return json.load(fh)


def test_pusht_script_trains_and_evaluates_in_our_pusht_env(pusht, tmp_path) -> None:
    """Script/DiffusionUNetImagePushTLeRobot.py on LeRobot-written PushT data: 2 steps, one short PushT episode."""
    run_script("DiffusionUNetImagePushTLeRobot.py", tmp_path, f"--DATASET_PATH={pusht}", "--MAX_STEPS=2",
               "--BATCH_SIZE=8", "--WARMUP_STEPS=1", "--DOWN_DIMS=(16,32)", "--NUM_INFERENCE_STEPS=2",
               "--NUM_EVAL_EPISODES=1", "--NUM_ENVS=1", "--MAX_EPISODE_STEPS=6", "--RUN_NAME=pusht")
    state = checkpoint.load(str(tmp_path / "Save" / "pusht" / "last.pt"))
    assert state["step"] == 2 and state["run"]["constants"]["DATASET_PATH"] == pusht
    result = evaluation_of(tmp_path / "Save" / "pusht")
    assert result["summary"]["episodes"] == 1 and result["episodes"][0]["length"] == 6


def test_act_script_trains_and_evaluates_in_our_aloha_env(tmp_path) -> None:
    """Script/ACTImageTransferCubeLeRobot.py on a LeRobot-written ALOHA episode (48x64 top camera): 2 steps, one
    short transfer-cube episode."""
    aloha = copy_of("lerobot_aloha_transfer_cube", tmp_path)
    want = expected("lerobot_aloha_transfer_cube")
    ds = LeRobotDataset(aloha, obs_horizon=1, chunk_size=100)
    assert ds.cams == ["top"] and ds.image_size == (48, 64) and ds.low_dim_dim == 14 and ds.fps == 50
    np.testing.assert_array_equal(ds.action[want["rows"]], want["action"])
    assert np.abs(ds.rgb["top"][want["rows"]].astype(int) - want["lerobot.top"]).max() <= 2
    run_script("ACTImageTransferCubeLeRobot.py", tmp_path, f"--DATASET_PATH={aloha}", "--IMAGE_SIZE=(48,64)",
               "--MAX_STEPS=2", "--BATCH_SIZE=4", "--D_MODEL=32", "--NHEAD=2", "--DIM_FEEDFORWARD=64",
               "--NUM_ENCODER_LAYERS=1", "--NUM_VAE_ENCODER_LAYERS=1", "--NUM_EVAL_EPISODES=1", "--NUM_ENVS=1",
               "--MAX_EPISODE_STEPS=4", "--RUN_NAME=act")
    result = evaluation_of(tmp_path / "Save" / "act")
    assert result["summary"]["episodes"] == 1 and result["episodes"][0]["length"] == 4


def test_bench_trains_on_a_lerobot_folder_and_times_the_decoders(pusht, tmp_path) -> None:
    """``bench train --lerobot`` and ``bench decode`` run their real paths on the fixture (numbers are not asserted)."""
    from mimictest import bench

    out = tmp_path / "train.json"
    bench.main(["--device", "cpu", "--json", str(out), "train", "--config", "dp-pusht-image-small", "--batch", "4",
                "--precision", "fp32", "--steps", "2", "--warmup", "1", "--workers", "0", "--lerobot", pusht])
    [row] = json.load(open(out))["rows"]
    assert row["data"] == "lerobot" and row["frames"] == 533 and row["decode_fps"] > 0
    assert 0 <= row["data_wait_frac"] <= 1
    out = tmp_path / "decode.json"
    bench.main(["--json", str(out), "decode", pusht, "--windows", "5", "--repeats", "1"])
    rows = json.load(open(out))["rows"]
    assert [r["access"] for r in rows[:2]] == ["sequential (the reader)", "random windows of 2"]
    assert all(r["frames_per_s"] > 0 for r in rows)
