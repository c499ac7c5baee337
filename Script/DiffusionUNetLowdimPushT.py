"""Diffusion Policy (Chi et al. 2023) with the 1D temporal UNet on PushT, from block keypoints.

The paper's low-dim PushT setup (diffusion_policy ``low_dim_pusht_diffusion_policy_cnn.yaml``):
the 9 block keypoints and the agent position (20-d), obs horizon 2, prediction horizon 16, 8
executed steps, DDPM with 100 steps, AdamW lr 1e-4 with a cosine decay, 300-step evaluation
episodes, and a UNet with down_dims (256, 512, 1024) trained with batch 256. Without images a
training step is cheap, so this is the PushT configuration that learns within about an hour on a
2-core CPU; the defaults keep the paper's setup except the UNet width and the training length.
Measured on one core (docs/benchmarks.md), over 50 evaluation episodes: these defaults (5000
steps, 68 minutes on an AVX2-only Zen 2 core) gave 48% success (95% CI 35-62%) and a mean max
score of 0.84; before the faithful defaults, 5300 steps on a Zen 5 core gave 60%.

With DATASET_PATH empty, the scripted PushT expert writes NUM_DEMOS episodes (seeds 0 ..
NUM_DEMOS - 1) to EXPERT_PATH; evaluation seeds start at 100000. For the human demonstrations,
set DATASET_PATH = "Datasets/pusht/pusht_cchi_v7_replay.zarr" (see DiffusionUNetImagePushT.py).
    accelerate launch Script/DiffusionUNetLowdimPushT.py
"""

from functools import partial

from mimictest.config import apply_overrides, seed_everything
from mimictest.data import require_dataset
from mimictest.data.pusht import HOW_TO_GET, PushTDataset
from mimictest.demos import ensure_demos
from mimictest.demos.pusht import generate_pusht_demos
from mimictest.envs.pusht import PushTEnv
from mimictest.evaluate import EvalTask, Evaluator
from mimictest.nets.obs_encoder import ObsEncoder
from mimictest.nets.unet1d import ConditionalUnet1D
from mimictest.policies.diffusion import DiffusionPolicy
from mimictest.preprocess import ActionSpace, Preprocessor
from mimictest.train import TrainConfig, train

# Data
DATASET_PATH = ""  # "" = scripted-expert demos at EXPERT_PATH; or the real pusht_cchi_v7_replay.zarr
EXPERT_PATH = "Datasets/pusht_expert.zarr"
NUM_DEMOS = 100  # scripted-expert episodes attempted when EXPERT_PATH does not exist
OBS_HORIZON = 2
CHUNK_SIZE = 16
N_ACTION_STEPS = 8  # actions executed per predicted chunk (Diffusion Policy: 8)
EXEC_START, EXEC_END = OBS_HORIZON - 1, OBS_HORIZON - 1 + N_ACTION_STEPS
PAD_AFTER = N_ACTION_STEPS - 1  # Diffusion Policy's sampler: at most n_action_steps - 1 padded steps
NORMALIZATION = "minmax"  # Diffusion Policy: min-max to [-1, 1]
# Network and diffusion
DOWN_DIMS = (64, 128, 256)  # the paper: (256, 512, 1024), 14x the parameters
SAMPLER, NUM_INFERENCE_STEPS = "ddpm", 100  # the paper's simulation setting
# Optimisation
BATCH_SIZE = 256
NUM_WORKERS = 0  # low-dim windows are cheap to gather; worker processes would only compete for cores
LR, WEIGHT_DECAY = 1e-4, 1e-6
WARMUP_STEPS = 500
BETAS = (0.95, 0.999)  # Diffusion Policy's AdamW betas
LR_SCHEDULE = "cosine"  # Diffusion Policy: cosine decay after the warmup
GRAD_CLIP = 0.0  # Diffusion Policy: no clipping
EMA = True  # Diffusion Policy: EMA weights for evaluation
MAX_STEPS = 5000  # the cosine decays to 0 here: about 45 minutes on one Zen 5 core, 70 on a Zen 2 core (Diffusion Policy: 5000 epochs)
MAX_MINUTES = 90  # a guard: stop training after this long even if MAX_STEPS is not reached (None: no limit)
BF16 = False
# Evaluation
NUM_ENVS = 4
NUM_EVAL_EPISODES = 50
MAX_EPISODE_STEPS = 300
EVAL_EVERY = 0  # 0: only after training
SUCCESS_LAST_K = 1  # success pooled over the last K evaluations (the original mimictest: 3 x 96 rollouts)
EVAL_CHECKPOINTS = None  # "all" or [steps]: evaluate the kept Save/<RUN_NAME>/checkpoints/step<N>.pt, no training
SEED = 0  # networks' initialisation, data order, training noise
RUN_NAME = "DiffusionUNetLowdimPushT"
apply_overrides(globals())  # e.g. accelerate launch Script/DiffusionUNetLowdimPushT.py --MAX_STEPS=2000

seed_everything(SEED)
if DATASET_PATH:
    require_dataset(DATASET_PATH, f"Set DATASET_PATH = '' to train on generated demos, or {HOW_TO_GET}.")
else:
    ensure_demos(EXPERT_PATH, generate_pusht_demos, episodes=NUM_DEMOS)
dataset = PushTDataset(DATASET_PATH or EXPERT_PATH, obs_mode="keypoint", obs_horizon=OBS_HORIZON,
                       chunk_size=CHUNK_SIZE, pad_after=PAD_AFTER)
action_space = ActionSpace(None, "absolute", env_dim=2)
preprocess = Preprocessor(dataset.stats, action_space, normalization=NORMALIZATION)

obs_encoder = ObsEncoder([], low_dim_dim=dataset.low_dim_dim)
noise_net = ConditionalUnet1D(action_space.model_dim, obs_encoder.out_dim, OBS_HORIZON, down_dims=DOWN_DIMS)
policy = DiffusionPolicy(obs_encoder, noise_net, action_space.model_dim, CHUNK_SIZE,
                         sampler=SAMPLER, num_inference_steps=NUM_INFERENCE_STEPS)

make_env = partial(PushTEnv, obs_mode="keypoint", max_episode_steps=MAX_EPISODE_STEPS)
evaluator = Evaluator(tasks=[EvalTask("pusht", make_env, NUM_EVAL_EPISODES)], num_envs=NUM_ENVS, obs_horizon=OBS_HORIZON,
                      exec_start=EXEC_START, exec_end=EXEC_END)

train(policy, preprocess, dataset, TrainConfig(
    run_name=RUN_NAME, max_steps=MAX_STEPS, max_minutes=MAX_MINUTES, batch_size=BATCH_SIZE, lr=LR,
    weight_decay=WEIGHT_DECAY, betas=BETAS, warmup_steps=WARMUP_STEPS, lr_schedule=LR_SCHEDULE, grad_clip=GRAD_CLIP,
    ema=EMA, num_workers=NUM_WORKERS, bf16=BF16, eval_every=EVAL_EVERY, success_last_k=SUCCESS_LAST_K,
    eval_checkpoints=EVAL_CHECKPOINTS, seed=SEED,
), evaluator)
