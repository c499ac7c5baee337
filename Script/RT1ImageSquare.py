"""RT-1 (Brohan et al. 2022) on robomimic Square (ph, absolute actions), from two cameras.

mimictest's RT-1 variant with continuous action chunks, the setup of EDiRobotics/mimictest's
``RT1ImageMimic.py``, which reports 62% success on Square: agentview + eye-in-hand 84x84 images
cropped to 76x76, a FiLM-EfficientNet and TokenLearner giving 8 tokens per image, a decoder-only
transformer, causal over the two observation steps, reading them with 16 action queries
regressed with L1 (``LOSS = "ce"`` gives RT-1's 256-bin head). Square has one task and no
instruction, so FiLM is off. It needs ``square/ph/image_abs.hdf5`` (Diffusion Policy's data
release; there is no scripted Square expert).

The defaults are those of Script/RT1ImageLift.py, sized for a 2-core CPU; the comments give
RT-1's values and those of EDiRobotics/mimictest's Square run ("mimictest:"), a GPU run: restore
them on GPUs, e.g.
    accelerate launch --multi_gpu --num_processes 4 Script/RT1ImageSquare.py
RT-1 itself: EfficientNet-B3 with ImageNet weights at 300x300, 6 frames, 8 layers of width 512
with 8 heads, one action per step. With ImageNet weights (BACKBONE_WEIGHTS, a local torchvision
file, with BACKBONE_NORM = "frozen_batch"), FREEZE_VISION_TOWER and UNFREEZE_STEP run staged
training as in Script/RT1ImageLift.py.
"""

from functools import partial

from mimictest.config import apply_overrides, seed_everything
from mimictest.data import require_dataset
from mimictest.data.robomimic import RobomimicDataset
from mimictest.envs.robosuite import RobosuiteEnv
from mimictest.evaluate import EvalTask, Evaluator
from mimictest.nets.rt1 import RT1
from mimictest.policies.regression import RegressionPolicy
from mimictest.preprocess import ActionSpace, Preprocessor
from mimictest.train import TrainConfig, train

# Data
DATASET_PATH = "Datasets/robomimic/square/ph/image_abs.hdf5"
RGB_KEYS = ["agentview_image", "robot0_eye_in_hand_image"]
LOW_DIM_KEYS = ["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"]  # RT-1: images only
IMAGE_SIZE, CROP_SIZE = (84, 84), (76, 76)  # RT-1: 300x300
OBS_HORIZON = 2  # RT-1: 6 frames; mimictest: 2
CHUNK_SIZE = 16  # RT-1: 1; mimictest: 16
N_ACTION_STEPS = 8  # actions executed per predicted chunk (mimictest: 1)
EXEC_START, EXEC_END = OBS_HORIZON - 1, OBS_HORIZON - 1 + N_ACTION_STEPS
PAD_AFTER = CHUNK_SIZE - OBS_HORIZON  # every step starts a chunk, padded to the episode end and masked in the loss
NORMALIZATION = "minmax"  # RT-1: actions scaled to their bounds before binning; the bins cover [-1, 1]
# Head: "l1" / "mse" regress the chunk (mimictest's RT-1); "ce" is RT-1's 256-bin head
LOSS = "l1"
BINS, DECODE = 256, "argmax"  # RT-1: 256 bins, argmax; "expectation" decodes the mean bin centre
# Network
EFFICIENTNET = "efficientnet_b0"  # RT-1: "efficientnet_b3"; mimictest: "efficientnet_v2_s"
BACKBONE_NORM, BACKBONE_WEIGHTS = "group", None  # RT-1 and mimictest: ImageNet weights ("frozen_batch" + a local file)
TOKEN_DIM, NUM_TOKENS = 256, 8  # RT-1 and mimictest: 512, 8
D_MODEL, NHEAD, NUM_LAYERS, DIM_FEEDFORWARD, DROPOUT = 256, 4, 4, 1024, 0.1  # RT-1: 512, 8, 8, 512; mimictest: 128, 2, 8
# Optimisation (RT-1: Adam, lr 1e-4; mimictest: AdamW lr 1e-4, weight decay 1e-4, grad clip 10, constant lr)
FREEZE_VISION_TOWER = False  # stage 1 of staged training: the EfficientNet trunk frozen
UNFREEZE_STEP = None  # stage 2 from this step (None: frozen for the whole run when FREEZE_VISION_TOWER)
BATCH_SIZE = 32  # mimictest: 432 per GPU
NUM_WORKERS = 0  # images are cached in RAM; worker processes would only compete for the 2 cores (GPU: 8)
LR, LR_VISION, WEIGHT_DECAY = 1e-4, 1e-4, 1e-4
BETAS = (0.9, 0.999)
WARMUP_STEPS = 200
LR_SCHEDULE = "constant"
GRAD_CLIP = 10.0
EMA = True
MAX_STEPS = 60000
MAX_MINUTES = 90  # stop training after this long even if MAX_STEPS is not reached (GPU: None)
BF16 = False  # measured slower for the EfficientNet on this CPU (no AMX); "auto" on a GPU
CHANNELS_LAST = True  # faster EfficientNet steps in fp32 on the CPU (not with "frozen_batch")
# Evaluation
NUM_ENVS = 2  # GPU: 16
NUM_EVAL_EPISODES = 50  # GPU: 96
MAX_EPISODE_STEPS = 400
EVAL_EVERY = 0  # 0: only after training (GPU: 10000)
EVAL_ONLY = False  # True: only evaluate Save/<RUN_NAME>/last.pt
SEED = 0  # networks' initialisation, data order, training noise
RUN_NAME = "RT1ImageSquare"
apply_overrides(globals())  # e.g. accelerate launch Script/RT1ImageSquare.py --LOSS=ce (its run: RT1ImageSquare_LOSS=ce)

seed_everything(SEED)
require_dataset(DATASET_PATH, "Get square/ph/image_abs.hdf5 from the Diffusion Policy data release (robomimic_image.zip), "
                "or robomimic's square/ph/image.hdf5 (delta actions), and set DATASET_PATH at the top of this script.")
dataset = RobomimicDataset(DATASET_PATH, rgb_keys=RGB_KEYS, low_dim_keys=LOW_DIM_KEYS, obs_horizon=OBS_HORIZON,
                           chunk_size=CHUNK_SIZE, pad_after=PAD_AFTER, image_size=IMAGE_SIZE)
action_space = ActionSpace("axis_angle", "absolute" if dataset.absolute_actions else "relative")
preprocess = Preprocessor(dataset.stats, action_space, dataset.cams, image_size=IMAGE_SIZE, crop_size=CROP_SIZE,
                          normalization=NORMALIZATION)

net = RT1(action_space.model_dim, CHUNK_SIZE, OBS_HORIZON, dataset.cams, low_dim_dim=dataset.low_dim_dim,
          efficientnet=EFFICIENTNET, backbone_norm=BACKBONE_NORM, backbone_weights=BACKBONE_WEIGHTS,
          token_dim=TOKEN_DIM, num_tokens=NUM_TOKENS, d_model=D_MODEL, nhead=NHEAD, num_layers=NUM_LAYERS,
          dim_feedforward=DIM_FEEDFORWARD, dropout=DROPOUT, bins=BINS if LOSS == "ce" else None)
policy = RegressionPolicy(net, loss=LOSS, bins=BINS, decode=DECODE)

make_env = partial(RobosuiteEnv, dataset.env_meta, rgb_keys=RGB_KEYS, low_dim_keys=LOW_DIM_KEYS,
                   max_episode_steps=MAX_EPISODE_STEPS, image_size=IMAGE_SIZE)
evaluator = Evaluator(tasks=[EvalTask("square", make_env, NUM_EVAL_EPISODES)], num_envs=NUM_ENVS, obs_horizon=OBS_HORIZON,
                      exec_start=EXEC_START, exec_end=EXEC_END)

train(policy, preprocess, dataset, TrainConfig(
    run_name=RUN_NAME, max_steps=MAX_STEPS, max_minutes=MAX_MINUTES, batch_size=BATCH_SIZE, lr=LR,
    weight_decay=WEIGHT_DECAY, betas=BETAS, warmup_steps=WARMUP_STEPS, lr_schedule=LR_SCHEDULE, grad_clip=GRAD_CLIP,
    ema=EMA, num_workers=NUM_WORKERS, bf16=BF16, channels_last=CHANNELS_LAST, unfreeze_step=UNFREEZE_STEP,
    eval_every=EVAL_EVERY, eval_only=EVAL_ONLY, seed=SEED,
), evaluator, param_groups=net.param_groups(LR_VISION), frozen=net.vision_tower() if FREEZE_VISION_TOWER else [])
