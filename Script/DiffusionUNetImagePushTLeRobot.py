"""Diffusion Policy (Chi et al. 2023) with the 1D temporal UNet on PushT, trained on a LeRobotDataset folder.

The same recipe as Script/DiffusionUNetImagePushT.py (the paper's values are listed there), read
from LeRobot's hub dataset ``lerobot/pusht`` (206 human episodes, 25650 frames at 10 fps: the
96x96 ``observation.image`` video, ``observation.state`` = the agent's position, ``action`` = its
target, both in pixels) instead of diffusion_policy's zarr, and evaluated in our PushT env (the
same gym-pusht scene, camera and units). Its videos are decoded once into RAM (about 700 MB).
Download it first (any LeRobotDataset v3.0 or v2.1 folder of this shape works):
    hf download --repo-type dataset lerobot/pusht --local-dir Datasets/lerobot_pusht
    accelerate launch Script/DiffusionUNetImagePushTLeRobot.py
or record our scripted expert's demos with LeRobot's own writer (tests/make_lerobot_fixture.py).
"""

from functools import partial

from mimictest.config import apply_overrides, seed_everything
from mimictest.data import require_dataset
from mimictest.data.lerobot import LeRobotDataset, how_to_get
from mimictest.envs.pusht import PushTEnv
from mimictest.evaluate import EvalTask, Evaluator
from mimictest.nets.obs_encoder import ObsEncoder
from mimictest.nets.unet1d import ConditionalUnet1D
from mimictest.policies.diffusion import DiffusionPolicy
from mimictest.preprocess import ActionSpace, Preprocessor
from mimictest.train import TrainConfig, train

# Data
DATASET_PATH = "Datasets/lerobot_pusht"  # a local LeRobotDataset folder (meta/info.json, data/, videos/)
CAMS = ["image"]  # observation.image; our PushT env's camera has the same name
IMAGE_SIZE, CROP_SIZE = (96, 96), (84, 84)
OBS_HORIZON = 2
CHUNK_SIZE = 16
N_ACTION_STEPS = 8  # actions executed per predicted chunk (Diffusion Policy: 8)
EXEC_START, EXEC_END = OBS_HORIZON - 1, OBS_HORIZON - 1 + N_ACTION_STEPS
PAD_AFTER = N_ACTION_STEPS - 1  # Diffusion Policy's sampler: at most n_action_steps - 1 padded steps
NORMALIZATION = "minmax"  # Diffusion Policy: min-max to [-1, 1]
# Network and diffusion
DOWN_DIMS = (64, 128, 256)  # 4.9M parameters; the paper's (512, 1024, 2048) has 252M
SAMPLER, NUM_INFERENCE_STEPS = "ddim", 10  # the paper: DDPM with 100 steps (10x slower evaluation on a CPU)
# Optimisation
BATCH_SIZE = 32  # the paper: 64
NUM_WORKERS = 0  # frames are decoded once into RAM; worker processes would only compete for the 2 cores
LR, WEIGHT_DECAY = 1e-4, 1e-6
WARMUP_STEPS = 200
BETAS = (0.95, 0.999)  # Diffusion Policy's AdamW betas
LR_SCHEDULE = "cosine"  # Diffusion Policy: cosine decay after the warmup
GRAD_CLIP = 0.0  # Diffusion Policy: no clipping
EMA = True  # Diffusion Policy: EMA weights for evaluation
MAX_STEPS = 5000  # the cosine decays to 0 here; about an hour on one Zen 5 core
MAX_MINUTES = 60  # a guard: stop training after an hour even if MAX_STEPS is not reached (None: no limit)
BF16 = "auto"  # bf16 autocast where measured faster (GPUs; CPUs with AMX or AVX512-BF16)
CHANNELS_LAST = True  # with BF16, 2x faster ResNet-18 steps on an AMX CPU
# Evaluation
NUM_ENVS = 4
NUM_EVAL_EPISODES = 50
MAX_EPISODE_STEPS = 300
EVAL_EVERY = 0  # 0: only after training
SUCCESS_LAST_K = 1  # success pooled over the last K evaluations (the original mimictest: 3 x 96 rollouts)
EVAL_CHECKPOINTS = None  # "all" or [steps]: evaluate the kept Save/<RUN_NAME>/checkpoints/step<N>.pt, no training
SEED = 0  # networks' initialisation, data order, training noise
RUN_NAME = "DiffusionUNetImagePushTLeRobot"
apply_overrides(globals())  # e.g. accelerate launch Script/DiffusionUNetImagePushTLeRobot.py --MAX_STEPS=2000

seed_everything(SEED)
require_dataset(DATASET_PATH, how_to_get("lerobot/pusht", DATASET_PATH))
dataset = LeRobotDataset(DATASET_PATH, obs_horizon=OBS_HORIZON, chunk_size=CHUNK_SIZE, cams=CAMS, image_size=IMAGE_SIZE,
                         pad_after=PAD_AFTER)
action_space = ActionSpace(None, "absolute", env_dim=2)
preprocess = Preprocessor(dataset.stats, action_space, dataset.cams, image_size=IMAGE_SIZE, crop_size=CROP_SIZE,
                          normalization=NORMALIZATION)

obs_encoder = ObsEncoder(dataset.cams, low_dim_dim=dataset.low_dim_dim)
noise_net = ConditionalUnet1D(action_space.model_dim, obs_encoder.out_dim, OBS_HORIZON, down_dims=DOWN_DIMS)
policy = DiffusionPolicy(obs_encoder, noise_net, action_space.model_dim, CHUNK_SIZE,
                         sampler=SAMPLER, num_inference_steps=NUM_INFERENCE_STEPS)

make_env = partial(PushTEnv, obs_mode="image", max_episode_steps=MAX_EPISODE_STEPS)
evaluator = Evaluator(tasks=[EvalTask("pusht", make_env, NUM_EVAL_EPISODES)], num_envs=NUM_ENVS, obs_horizon=OBS_HORIZON,
                      exec_start=EXEC_START, exec_end=EXEC_END, video_fps=round(dataset.fps))

train(policy, preprocess, dataset, TrainConfig(
    run_name=RUN_NAME, max_steps=MAX_STEPS, max_minutes=MAX_MINUTES, batch_size=BATCH_SIZE, lr=LR,
    weight_decay=WEIGHT_DECAY, betas=BETAS, warmup_steps=WARMUP_STEPS, lr_schedule=LR_SCHEDULE, grad_clip=GRAD_CLIP,
    ema=EMA, num_workers=NUM_WORKERS, bf16=BF16, channels_last=CHANNELS_LAST, eval_every=EVAL_EVERY,
    success_last_k=SUCCESS_LAST_K, eval_checkpoints=EVAL_CHECKPOINTS, seed=SEED,
), evaluator)
