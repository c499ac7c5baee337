"""Diffusion Policy (Chi et al. 2023) with the 1D temporal UNet on robomimic Square (ph, absolute actions).

The configuration of EDiRobotics/mimictest's ``DiffusionChiUNetImageMimic.py``: agentview +
eye-in-hand 84x84 images cropped to 76x76, ResNet-18 (GroupNorm, spatial softmax) per camera,
down_dims (512, 1024, 2048), DDPM 100 steps, 8 executed steps per chunk, lr 3e-4, 400-step episodes.
It needs ``square/ph/image_abs.hdf5`` (Diffusion Policy's data release; there is no scripted Square expert):
    accelerate launch --multi_gpu --num_processes 4 Script/DiffusionUNetImageSquare.py
"""

from functools import partial

from mimictest.config import apply_overrides, seed_everything
from mimictest.data import require_dataset
from mimictest.data.robomimic import RobomimicDataset
from mimictest.envs.robosuite import RobosuiteEnv
from mimictest.evaluate import EvalTask, Evaluator
from mimictest.nets.obs_encoder import ObsEncoder
from mimictest.nets.unet1d import ConditionalUnet1D
from mimictest.policies.diffusion import DiffusionPolicy
from mimictest.preprocess import ActionSpace, Preprocessor
from mimictest.train import TrainConfig, train

# Data
DATASET_PATH = "Datasets/robomimic/square/ph/image_abs.hdf5"
RGB_KEYS = ["agentview_image", "robot0_eye_in_hand_image"]
LOW_DIM_KEYS = ["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"]
IMAGE_SIZE, CROP_SIZE = (84, 84), (76, 76)
OBS_HORIZON = 2
CHUNK_SIZE = 16
N_ACTION_STEPS = 8  # actions executed per predicted chunk (Diffusion Policy: 8)
EXEC_START, EXEC_END = OBS_HORIZON - 1, OBS_HORIZON - 1 + N_ACTION_STEPS
PAD_AFTER = N_ACTION_STEPS - 1  # Diffusion Policy's sampler: at most n_action_steps - 1 padded steps
NORMALIZATION = "minmax"  # Diffusion Policy: min-max to [-1, 1]
# Network and diffusion
DOWN_DIMS = (512, 1024, 2048)
SAMPLER, NUM_INFERENCE_STEPS = "ddpm", 100
# Optimisation
BATCH_SIZE = 256  # per process
NUM_WORKERS = 8
LR, WEIGHT_DECAY = 3e-4, 1e-4
WARMUP_STEPS = 500
BETAS = (0.95, 0.999)  # Diffusion Policy's AdamW betas
LR_SCHEDULE = "cosine"  # Diffusion Policy: cosine decay after the warmup
EMA = True  # Diffusion Policy: EMA weights for evaluation
GRAD_CLIP = 10.0
MAX_STEPS = 60000
BF16 = "auto"  # bf16 autocast where measured faster (GPUs; CPUs with AMX or AVX512-BF16)
# Evaluation
NUM_ENVS = 16
NUM_EVAL_EPISODES = 96
MAX_EPISODE_STEPS = 400
EVAL_EVERY = 10000
SUCCESS_LAST_K = 3  # success pooled over the last K evaluations (the original mimictest: 3 x 96 rollouts)
EVAL_CHECKPOINTS = None  # "all" or [steps]: evaluate the kept Save/<RUN_NAME>/checkpoints/step<N>.pt, no training
SEED = 0  # networks' initialisation, data order, training noise
RUN_NAME = "DiffusionUNetImageSquare"
apply_overrides(globals())  # e.g. accelerate launch Script/DiffusionUNetImageSquare.py --MAX_STEPS=2000

seed_everything(SEED)
require_dataset(DATASET_PATH, "Get square/ph/image_abs.hdf5 from the Diffusion Policy data release (robomimic_image.zip), "
                "or robomimic's square/ph/image.hdf5 (delta actions), and set DATASET_PATH at the top of this script.")
dataset = RobomimicDataset(DATASET_PATH, rgb_keys=RGB_KEYS, low_dim_keys=LOW_DIM_KEYS, obs_horizon=OBS_HORIZON,
                           chunk_size=CHUNK_SIZE, pad_after=PAD_AFTER, image_size=IMAGE_SIZE)
action_space = ActionSpace("axis_angle", "absolute" if dataset.absolute_actions else "relative")
preprocess = Preprocessor(dataset.stats, action_space, dataset.cams, image_size=IMAGE_SIZE, crop_size=CROP_SIZE,
                          normalization=NORMALIZATION)

obs_encoder = ObsEncoder(dataset.cams, low_dim_dim=dataset.low_dim_dim)
noise_net = ConditionalUnet1D(action_space.model_dim, obs_encoder.out_dim, OBS_HORIZON, down_dims=DOWN_DIMS)
policy = DiffusionPolicy(obs_encoder, noise_net, action_space.model_dim, CHUNK_SIZE,
                         sampler=SAMPLER, num_inference_steps=NUM_INFERENCE_STEPS)

make_env = partial(RobosuiteEnv, dataset.env_meta, rgb_keys=RGB_KEYS, low_dim_keys=LOW_DIM_KEYS,
                   max_episode_steps=MAX_EPISODE_STEPS, image_size=IMAGE_SIZE)
evaluator = Evaluator(tasks=[EvalTask("square", make_env, NUM_EVAL_EPISODES)], num_envs=NUM_ENVS, obs_horizon=OBS_HORIZON,
                      exec_start=EXEC_START, exec_end=EXEC_END)

train(policy, preprocess, dataset, TrainConfig(
    run_name=RUN_NAME, max_steps=MAX_STEPS, batch_size=BATCH_SIZE, lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS,
    warmup_steps=WARMUP_STEPS, lr_schedule=LR_SCHEDULE, grad_clip=GRAD_CLIP, ema=EMA, num_workers=NUM_WORKERS,
    bf16=BF16, eval_every=EVAL_EVERY, success_last_k=SUCCESS_LAST_K, eval_checkpoints=EVAL_CHECKPOINTS, seed=SEED,
), evaluator)
