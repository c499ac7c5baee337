"""RT-1 (Brohan et al. 2022) on PushT, from 96x96 images, predicting continuous action chunks.

mimictest's RT-1 variant (EDiRobotics/mimictest ``RT1ImagePushT.py``, which reports 52% on
PushT): the FiLM-EfficientNet tokenizer and TokenLearner give 8 tokens per 84x84 crop, the agent
position one more token per step, and a decoder-only transformer, causal over the two observation
steps, reads them with 16 action queries regressed with L1 (``LOSS = "ce"`` gives RT-1's 256-bin
head instead). PushT has one task and no instruction, so FiLM is off.

RT-1's values beside the ones changed for a 2-core CPU: EfficientNet-B3 with ImageNet weights at
300x300 (here B0 from scratch with GroupNorm), 6 frames (here 2, Diffusion Policy's PushT
horizon), 8 layers of width 512 with 8 heads (here 4 of width 256 with 4 heads), one action per
step (here chunks of 16, 8 executed). With ImageNet weights (BACKBONE_WEIGHTS, a local
torchvision file, with BACKBONE_NORM = "frozen_batch"), FREEZE_VISION_TOWER and UNFREEZE_STEP run
staged training as in Script/RT1ImageLift.py.

With DATASET_PATH empty, the scripted PushT expert writes NUM_DEMOS episodes (seeds 0 ..
NUM_DEMOS - 1, about 2 s each) to EXPERT_PATH; evaluation seeds start at 100000. For the human
demonstrations, download https://diffusion-policy.cs.columbia.edu/data/training/pusht.zip and set
DATASET_PATH = "Datasets/pusht/pusht_cchi_v7_replay.zarr".
    accelerate launch Script/RT1ImagePushT.py
"""

from functools import partial

from mimictest.config import apply_overrides, seed_everything
from mimictest.data import require_dataset
from mimictest.data.pusht import HOW_TO_GET, PushTDataset
from mimictest.demos import ensure_demos
from mimictest.demos.pusht import generate_pusht_demos
from mimictest.envs.pusht import PushTEnv
from mimictest.evaluate import EvalTask, Evaluator
from mimictest.nets.rt1 import RT1
from mimictest.policies.regression import RegressionPolicy
from mimictest.preprocess import ActionSpace, Preprocessor
from mimictest.train import TrainConfig, train

# Data
DATASET_PATH = ""  # "" = scripted-expert demos at EXPERT_PATH; or the real pusht_cchi_v7_replay.zarr
EXPERT_PATH = "Datasets/pusht_expert.zarr"
NUM_DEMOS = 100  # scripted-expert episodes attempted when EXPERT_PATH does not exist
IMAGE_SIZE, CROP_SIZE = (96, 96), (84, 84)  # RT-1: 300x300
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
MAX_STEPS = 10000
MAX_MINUTES = 60  # stop training after this long even if MAX_STEPS is not reached (None: no limit)
BF16 = False  # measured slower for the EfficientNet on this CPU (no AMX): python -m mimictest.bench train --config rt1-lift-image
CHANNELS_LAST = True  # faster EfficientNet steps in fp32 on the CPU (not with "frozen_batch")
# Evaluation
NUM_ENVS = 4
NUM_EVAL_EPISODES = 50
MAX_EPISODE_STEPS = 300
EVAL_EVERY = 0  # 0: only after training
EVAL_ONLY = False  # True: only evaluate Save/<RUN_NAME>/last.pt
SEED = 0  # networks' initialisation, data order, training noise
RUN_NAME = "RT1ImagePushT"
apply_overrides(globals())  # e.g. accelerate launch Script/RT1ImagePushT.py --LOSS=ce (its run: RT1ImagePushT_LOSS=ce)

seed_everything(SEED)
if DATASET_PATH:
    require_dataset(DATASET_PATH, f"Set DATASET_PATH = '' to train on generated demos, or {HOW_TO_GET}.")
else:
    ensure_demos(EXPERT_PATH, generate_pusht_demos, episodes=NUM_DEMOS)
dataset = PushTDataset(DATASET_PATH or EXPERT_PATH, obs_mode="image", obs_horizon=OBS_HORIZON, chunk_size=CHUNK_SIZE,
                       pad_after=PAD_AFTER)
action_space = ActionSpace(None, "absolute", env_dim=2)
preprocess = Preprocessor(dataset.stats, action_space, dataset.cams, image_size=IMAGE_SIZE, crop_size=CROP_SIZE,
                          normalization=NORMALIZATION)

net = RT1(action_space.model_dim, CHUNK_SIZE, OBS_HORIZON, dataset.cams, low_dim_dim=dataset.low_dim_dim,
          efficientnet=EFFICIENTNET, backbone_norm=BACKBONE_NORM, backbone_weights=BACKBONE_WEIGHTS,
          token_dim=TOKEN_DIM, num_tokens=NUM_TOKENS, d_model=D_MODEL, nhead=NHEAD, num_layers=NUM_LAYERS,
          dim_feedforward=DIM_FEEDFORWARD, dropout=DROPOUT, bins=BINS if LOSS == "ce" else None)
policy = RegressionPolicy(net, loss=LOSS, bins=BINS, decode=DECODE)

make_env = partial(PushTEnv, obs_mode="image", max_episode_steps=MAX_EPISODE_STEPS)
evaluator = Evaluator(tasks=[EvalTask("pusht", make_env, NUM_EVAL_EPISODES)], num_envs=NUM_ENVS, obs_horizon=OBS_HORIZON,
                      exec_start=EXEC_START, exec_end=EXEC_END)

train(policy, preprocess, dataset, TrainConfig(
    run_name=RUN_NAME, max_steps=MAX_STEPS, max_minutes=MAX_MINUTES, batch_size=BATCH_SIZE, lr=LR,
    weight_decay=WEIGHT_DECAY, betas=BETAS, warmup_steps=WARMUP_STEPS, lr_schedule=LR_SCHEDULE, grad_clip=GRAD_CLIP,
    ema=EMA, num_workers=NUM_WORKERS, bf16=BF16, channels_last=CHANNELS_LAST, unfreeze_step=UNFREEZE_STEP,
    eval_every=EVAL_EVERY, eval_only=EVAL_ONLY, seed=SEED,
), evaluator, param_groups=net.param_groups(LR_VISION), frozen=net.vision_tower() if FREEZE_VISION_TOWER else [])
