"""RT-1 (Brohan et al. 2022) on robomimic Lift, from the agentview and eye-in-hand cameras.

Each 84x84 image (random 76x76 crops) goes through a FiLM-EfficientNet and TokenLearner to 8
tokens; with one token for the proprioceptive state (not in RT-1), a decoder-only transformer,
causal over the observation steps, reads them with 16 action queries. ``LOSS`` picks the head:
``"l1"`` (or ``"mse"``) regresses 16-step chunks of 10-d actions (xyz, 6D rotation, gripper),
mimictest's RT-1 variant; ``"ce"`` is RT-1's head, 256 uniform bins per action dimension trained
with cross-entropy, decoded by ``DECODE``. Run both on the same budget to compare them:
``--LOSS=ce`` on the command line gives the binned run its own RUN_NAME. Lift has one task and no
instruction, so FiLM is off.

RT-1's values beside the ones changed for a 2-core CPU: EfficientNet-B3 with ImageNet weights at
300x300 (here B0 from scratch, GroupNorm: no weights can be downloaded here), 6 frames (here 1:
each frame costs a pass through the EfficientNet for each camera), 8 layers of width 512 with 8
heads (here 4 of width 256 with 4 heads), one action per step (here chunks of 16, 8 executed).
Without ImageNet weights the EfficientNet trains from scratch with the rest, so the vision
tower is not frozen; with weights, set BACKBONE_WEIGHTS (a local torchvision file),
BACKBONE_NORM = "frozen_batch", FREEZE_VISION_TOWER = True and UNFREEZE_STEP for RT-1-style
staged training: stage 1 trains everything but the EfficientNet trunk (FiLM layers included),
stage 2 from UNFREEZE_STEP trains it too at LR_VISION (or resume a stage-1 run with
FREEZE_VISION_TOWER = False, passing allow_config_change=True to TrainConfig).

With no dataset at DATASET_PATH, the scripted Lift expert writes one with images (about 10 s an
episode on a CPU).
    accelerate launch Script/RT1ImageLift.py
For robomimic's own data, point DATASET_PATH at ``lift/ph/image_abs.hdf5``.
"""

from functools import partial

from mimictest.config import apply_overrides, seed_everything
from mimictest.data.robomimic import RobomimicDataset
from mimictest.demos import ensure_demos
from mimictest.demos.lift import generate_lift_demos
from mimictest.envs.robosuite import RobosuiteEnv
from mimictest.evaluate import EvalTask, Evaluator
from mimictest.nets.rt1 import RT1
from mimictest.policies.regression import RegressionPolicy
from mimictest.preprocess import ActionSpace, Preprocessor
from mimictest.train import TrainConfig, train

# Data
DATASET_PATH = "Datasets/lift_expert_image.hdf5"
NUM_DEMOS = 100  # scripted-expert episodes attempted when DATASET_PATH does not exist
RGB_KEYS = ["agentview_image", "robot0_eye_in_hand_image"]
LOW_DIM_KEYS = ["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"]  # RT-1: images only
IMAGE_SIZE, CROP_SIZE = (84, 84), (76, 76)  # RT-1: 300x300
OBS_HORIZON = 1  # RT-1: 6 frames
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
SHARED_BACKBONE = True  # one EfficientNet for both cameras
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
MAX_STEPS = 5000
MAX_MINUTES = 60  # stop training after this long even if MAX_STEPS is not reached (None: no limit)
BF16 = False  # measured slower for the EfficientNet on this CPU (no AMX): python -m mimictest.bench train --config rt1-lift-image
CHANNELS_LAST = True  # faster EfficientNet steps in fp32 on the CPU (not with "frozen_batch")
# Evaluation
NUM_ENVS = 2
NUM_EVAL_EPISODES = 50
MAX_EPISODE_STEPS = 300
EVAL_EVERY = 0  # 0: only after training
EVAL_ONLY = False  # True: only evaluate Save/<RUN_NAME>/last.pt
SEED = 0  # networks' initialisation, data order, training noise
RUN_NAME = "RT1ImageLift"
apply_overrides(globals())  # e.g. accelerate launch Script/RT1ImageLift.py --LOSS=ce (its run: RT1ImageLift_LOSS=ce)

seed_everything(SEED)
ensure_demos(DATASET_PATH, generate_lift_demos, episodes=NUM_DEMOS, image=True)
dataset = RobomimicDataset(DATASET_PATH, rgb_keys=RGB_KEYS, low_dim_keys=LOW_DIM_KEYS, obs_horizon=OBS_HORIZON,
                           chunk_size=CHUNK_SIZE, pad_after=PAD_AFTER, image_size=IMAGE_SIZE)
action_space = ActionSpace("axis_angle", "absolute" if dataset.absolute_actions else "relative")
preprocess = Preprocessor(dataset.stats, action_space, dataset.cams, image_size=IMAGE_SIZE, crop_size=CROP_SIZE,
                          normalization=NORMALIZATION)

net = RT1(action_space.model_dim, CHUNK_SIZE, OBS_HORIZON, dataset.cams, low_dim_dim=dataset.low_dim_dim,
          efficientnet=EFFICIENTNET, backbone_norm=BACKBONE_NORM, backbone_weights=BACKBONE_WEIGHTS,
          shared_backbone=SHARED_BACKBONE, token_dim=TOKEN_DIM, num_tokens=NUM_TOKENS, d_model=D_MODEL, nhead=NHEAD,
          num_layers=NUM_LAYERS, dim_feedforward=DIM_FEEDFORWARD, dropout=DROPOUT,
          bins=BINS if LOSS == "ce" else None)
policy = RegressionPolicy(net, loss=LOSS, bins=BINS, decode=DECODE)

make_env = partial(RobosuiteEnv, dataset.env_meta, rgb_keys=RGB_KEYS, low_dim_keys=LOW_DIM_KEYS,
                   max_episode_steps=MAX_EPISODE_STEPS, image_size=IMAGE_SIZE)
evaluator = Evaluator(tasks=[EvalTask("lift", make_env, NUM_EVAL_EPISODES)], num_envs=NUM_ENVS, obs_horizon=OBS_HORIZON,
                      exec_start=EXEC_START, exec_end=EXEC_END)

train(policy, preprocess, dataset, TrainConfig(
    run_name=RUN_NAME, max_steps=MAX_STEPS, max_minutes=MAX_MINUTES, batch_size=BATCH_SIZE, lr=LR,
    weight_decay=WEIGHT_DECAY, betas=BETAS, warmup_steps=WARMUP_STEPS, lr_schedule=LR_SCHEDULE, grad_clip=GRAD_CLIP,
    ema=EMA, num_workers=NUM_WORKERS, bf16=BF16, channels_last=CHANNELS_LAST, unfreeze_step=UNFREEZE_STEP,
    eval_every=EVAL_EVERY, eval_only=EVAL_ONLY, seed=SEED,
), evaluator, param_groups=net.param_groups(LR_VISION), frozen=net.vision_tower() if FREEZE_VISION_TOWER else [])
