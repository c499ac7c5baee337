"""A tiny Lift experiment for the end-to-end tests.

    python tests/tiny_lift.py DATASET SAVE_ROOT MAX_STEPS [EPISODES] [--eval-only-ensemble | --eval-checkpoints]

``--eval-only-ensemble`` only evaluates the saved checkpoint again, with temporal ensembling;
``--eval-checkpoints`` evaluates every kept ``checkpoints/step<N>.pt`` again. The loss is logged
at every step, a checkpoint saved every 5 and an evaluation of EPISODES episodes (default 2; 0 for
none) run every 20.

Mirrors ``Script/DiffusionUNetLowdimLift.py`` at toy sizes, so tests can launch it as a real
process (to kill it, resume it, or run it under ``accelerate launch`` with two processes).
"""

import json
import sys
from functools import partial

from mimictest.config import seed_everything
from mimictest.data.robomimic import RobomimicDataset
from mimictest.envs.robosuite import RobosuiteEnv
from mimictest.evaluate import EvalTask, Evaluator
from mimictest.nets.obs_encoder import ObsEncoder
from mimictest.nets.unet1d import ConditionalUnet1D
from mimictest.policies.diffusion import DiffusionPolicy
from mimictest.preprocess import ActionSpace, Preprocessor
from mimictest.train import TrainConfig, train

DATASET, SAVE_ROOT, MAX_STEPS = sys.argv[1], sys.argv[2], int(sys.argv[3])
EPISODES = int(sys.argv[4]) if len(sys.argv) > 4 else 2
EVAL_ONLY_ENSEMBLE = "--eval-only-ensemble" in sys.argv[5:]
EVAL_CHECKPOINTS = "all" if "--eval-checkpoints" in sys.argv[5:] else None
KEYS = ["object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"]

seed_everything(0)
dataset = RobomimicDataset(DATASET, [], KEYS, obs_horizon=2, chunk_size=8)
action_space = ActionSpace("axis_angle", "absolute")
preprocess = Preprocessor(dataset.stats, action_space)
encoder = ObsEncoder([], low_dim_dim=dataset.low_dim_dim)
net = ConditionalUnet1D(action_space.model_dim, encoder.out_dim, 2, down_dims=(16, 32), diffusion_step_embed_dim=16)
policy = DiffusionPolicy(encoder, net, action_space.model_dim, 8, sampler="ddim", num_inference_steps=3)
make_env = partial(RobosuiteEnv, dataset.env_meta, rgb_keys=[], low_dim_keys=KEYS, max_episode_steps=15)
evaluator = Evaluator(tasks=[EvalTask("lift", make_env, EPISODES)], num_envs=2, obs_horizon=2, exec_start=1, exec_end=5,
                      num_videos=1, temporal_ensemble=0.01 if EVAL_ONLY_ENSEMBLE else None) if EPISODES else None
summary = train(policy, preprocess, dataset, TrainConfig(
    run_name="tiny", max_steps=MAX_STEPS, batch_size=16, lr=1e-4, weight_decay=1e-6, betas=(0.95, 0.999),
    warmup_steps=5, lr_schedule="cosine", grad_clip=0.0, ema=True, num_workers=0,
    log_every=1, save_every=5, eval_every=20, success_last_k=2, save_root=SAVE_ROOT, eval_only=EVAL_ONLY_ENSEMBLE,
    eval_checkpoints=EVAL_CHECKPOINTS,
), evaluator)
print("SUMMARY " + json.dumps(summary))
