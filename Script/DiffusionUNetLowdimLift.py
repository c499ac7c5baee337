"""Diffusion Policy (Chi et al. 2023) with the 1D temporal UNet on robomimic Lift, low-dim observations.

The quickstart: with no dataset at DATASET_PATH, the scripted Lift expert writes one (robomimic
hdf5, absolute OSC_POSE actions); then training, then evaluation in parallel simulators.
    accelerate launch Script/DiffusionUNetLowdimLift.py
Sized to finish on a 2-core CPU; for a GPU, raise DOWN_DIMS to the paper's (256, 512, 1024),
BATCH_SIZE and MAX_STEPS. To train on robomimic's own data, point DATASET_PATH at its
``low_dim_abs.hdf5`` (absolute actions, like this expert's).
"""

from functools import partial

from mimictest.config import apply_overrides, seed_everything
from mimictest.data.robomimic import RobomimicDataset
from mimictest.demos import ensure_demos
from mimictest.demos.lift import generate_lift_demos
from mimictest.envs.robosuite import RobosuiteEnv
from mimictest.evaluate import EvalTask, Evaluator
from mimictest.nets.obs_encoder import ObsEncoder
from mimictest.nets.unet1d import ConditionalUnet1D
from mimictest.policies.diffusion import DiffusionPolicy
from mimictest.preprocess import ActionSpace, Preprocessor
from mimictest.train import TrainConfig, train

# Data
DATASET_PATH = "Datasets/lift_expert_lowdim.hdf5"
NUM_DEMOS = 200  # scripted-expert episodes attempted when DATASET_PATH does not exist
LOW_DIM_KEYS = ["object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"]
OBS_HORIZON = 2  # observation steps the policy sees
CHUNK_SIZE = 16  # predicted action steps, starting at the first observation step
N_ACTION_STEPS = 8  # actions executed per predicted chunk (Diffusion Policy: 8)
EXEC_START, EXEC_END = OBS_HORIZON - 1, OBS_HORIZON - 1 + N_ACTION_STEPS
PAD_AFTER = N_ACTION_STEPS - 1  # Diffusion Policy's sampler: at most n_action_steps - 1 padded steps
NORMALIZATION = "minmax"  # Diffusion Policy: min-max to [-1, 1]
# Network and diffusion
DOWN_DIMS = (64, 128, 256)  # the paper uses (256, 512, 1024): 14x the parameters, 13x slower on a CPU
SAMPLER, NUM_INFERENCE_STEPS = "ddpm", 100  # the paper's simulation setting
# Optimisation
BATCH_SIZE = 256
NUM_WORKERS = 0  # low-dim windows are cheap to gather; worker processes would only compete for cores
LR, WEIGHT_DECAY = 1e-4, 1e-6
WARMUP_STEPS = 200
BETAS = (0.95, 0.999)  # Diffusion Policy's AdamW betas
LR_SCHEDULE = "cosine"  # Diffusion Policy: cosine decay after the warmup
GRAD_CLIP = 0.0  # Diffusion Policy: no clipping
EMA = True  # Diffusion Policy: EMA weights for evaluation
MAX_STEPS = 4000
BF16 = False
# Evaluation
NUM_ENVS = 4
NUM_EVAL_EPISODES = 50
MAX_EPISODE_STEPS = 300
EVAL_EVERY = 0  # 0: only after training (one evaluation: 6-12 min less than two on a 2-core CPU)
SUCCESS_LAST_K = 1  # success pooled over the last K evaluations (the original mimictest: 3 x 96 rollouts)
EVAL_CHECKPOINTS = None  # "all" or [steps]: evaluate the kept Save/<RUN_NAME>/checkpoints/step<N>.pt, no training
SEED = 0  # networks' initialisation, data order, training noise
RUN_NAME = "DiffusionUNetLowdimLift"
apply_overrides(globals())  # e.g. accelerate launch Script/DiffusionUNetLowdimLift.py --MAX_STEPS=2000

seed_everything(SEED)
ensure_demos(DATASET_PATH, generate_lift_demos, episodes=NUM_DEMOS)
dataset = RobomimicDataset(DATASET_PATH, rgb_keys=[], low_dim_keys=LOW_DIM_KEYS,
                           obs_horizon=OBS_HORIZON, chunk_size=CHUNK_SIZE, pad_after=PAD_AFTER)
action_space = ActionSpace("axis_angle", "absolute" if dataset.absolute_actions else "relative")
preprocess = Preprocessor(dataset.stats, action_space, normalization=NORMALIZATION)

obs_encoder = ObsEncoder([], low_dim_dim=dataset.low_dim_dim)
noise_net = ConditionalUnet1D(action_space.model_dim, obs_encoder.out_dim, OBS_HORIZON, down_dims=DOWN_DIMS)
policy = DiffusionPolicy(obs_encoder, noise_net, action_space.model_dim, CHUNK_SIZE,
                         sampler=SAMPLER, num_inference_steps=NUM_INFERENCE_STEPS)

make_env = partial(RobosuiteEnv, dataset.env_meta, rgb_keys=[], low_dim_keys=LOW_DIM_KEYS,
                   max_episode_steps=MAX_EPISODE_STEPS)
evaluator = Evaluator(tasks=[EvalTask("lift", make_env, NUM_EVAL_EPISODES)], num_envs=NUM_ENVS, obs_horizon=OBS_HORIZON,
                      exec_start=EXEC_START, exec_end=EXEC_END)

train(policy, preprocess, dataset, TrainConfig(
    run_name=RUN_NAME, max_steps=MAX_STEPS, batch_size=BATCH_SIZE, lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS,
    warmup_steps=WARMUP_STEPS, lr_schedule=LR_SCHEDULE, grad_clip=GRAD_CLIP, ema=EMA, num_workers=NUM_WORKERS,
    bf16=BF16, eval_every=EVAL_EVERY, success_last_k=SUCCESS_LAST_K, eval_checkpoints=EVAL_CHECKPOINTS, seed=SEED,
), evaluator)
