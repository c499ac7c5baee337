"""ACT (Zhao et al., RSS 2023) on robomimic Lift, from the agentview and eye-in-hand cameras.

One 84x84 observation per step (random 76x76 crops, as robomimic's ACT template) through one
ResNet-18 shared by both cameras, plus the proprioceptive keys as ACT's joint token; a CVAE
transformer predicts 20-step chunks of 10-d actions (xyz, 6D rotation, gripper), one second at
20 Hz (ACT's tip: a chunk should cover about a second of motion; ACT itself uses 100 steps at
50 Hz). Evaluation queries the policy every step and executes ACT's temporal ensemble of every
chunk that covers the step (``TEMPORAL_ENSEMBLE = None`` executes whole chunks open-loop instead).
With no dataset at DATASET_PATH, the scripted Lift expert writes one with images (about 10 s an
episode on a CPU). Sized for one GPU:
    accelerate launch Script/ACTImageLift.py
For robomimic's own data, point DATASET_PATH at ``lift/ph/image_abs.hdf5``.
"""

from functools import partial

from mimictest.config import apply_overrides, seed_everything
from mimictest.data.robomimic import RobomimicDataset
from mimictest.demos import ensure_demos
from mimictest.demos.lift import generate_lift_demos
from mimictest.envs.robosuite import RobosuiteEnv
from mimictest.evaluate import EvalTask, Evaluator
from mimictest.nets.act import ACT
from mimictest.policies.act import ACTPolicy
from mimictest.preprocess import ActionSpace, Preprocessor
from mimictest.train import TrainConfig, train

# Data
DATASET_PATH = "Datasets/lift_expert_image.hdf5"
NUM_DEMOS = 100  # scripted-expert episodes attempted when DATASET_PATH does not exist
RGB_KEYS = ["agentview_image", "robot0_eye_in_hand_image"]
LOW_DIM_KEYS = ["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"]
IMAGE_SIZE, CROP_SIZE = (84, 84), (76, 76)
OBS_HORIZON = 1  # ACT sees the current observation only
CHUNK_SIZE = 20
# Execution: ACT's temporal ensembling coefficient, or None to run each chunk's [EXEC_START, EXEC_END) open-loop
TEMPORAL_ENSEMBLE = 0.01
EXEC_START, EXEC_END = 0, CHUNK_SIZE
PAD_AFTER = CHUNK_SIZE - OBS_HORIZON  # ACT: every step starts a chunk, padded (and masked) to the episode end
NORMALIZATION = "meanstd"  # ACT: (x - mean) / clip(std, 0.01, 10)
# Network (ACT: d_model 512, 8 heads, 4 encoder layers, 1 effective decoder layer, feed-forward 3200)
BACKBONE_NORM, BACKBONE_WEIGHTS = "group", None  # ACT: "frozen_batch" and ImageNet weights (a local resnet18-f37072fd.pth)
D_MODEL, NHEAD, DIM_FEEDFORWARD, DROPOUT = 512, 8, 3200, 0.1
NUM_ENCODER_LAYERS, NUM_DECODER_LAYERS = 4, 1
NUM_VAE_ENCODER_LAYERS, LATENT_DIM = 4, 32
KL_WEIGHT = 10.0  # ACT: 10; robomimic's ACT config: 20
# Optimisation (ACT: AdamW, lr 1e-5 for both groups, weight decay 1e-4, batch 8, no schedule, no EMA;
# robomimic's ACT config: lr 5e-5; the ResNet here is trained from scratch, hence the larger lr)
BATCH_SIZE = 64
NUM_WORKERS = 4
LR, LR_BACKBONE, WEIGHT_DECAY = 5e-5, 5e-5, 1e-4
BETAS = (0.9, 0.999)
WARMUP_STEPS = 0
LR_SCHEDULE = "constant"  # ACT: constant
EMA = False  # ACT: none
GRAD_CLIP = 10.0  # ACT: none; LeRobot: 10
MAX_STEPS = 20000
BF16 = "auto"  # bf16 autocast where measured faster (GPUs; CPUs with AMX or AVX512-BF16)
CHANNELS_LAST = True  # with BF16, faster ResNet-18 steps
# Evaluation
NUM_ENVS = 8
NUM_EVAL_EPISODES = 50
MAX_EPISODE_STEPS = 300
EVAL_EVERY = 5000
EVAL_ONLY = False  # True: only evaluate Save/<RUN_NAME>/last.pt, e.g. again with TEMPORAL_ENSEMBLE = None
SUCCESS_LAST_K = 3  # success pooled over the last K evaluations (the original mimictest: 3 x 96 rollouts)
EVAL_CHECKPOINTS = None  # "all" or [steps]: evaluate the kept Save/<RUN_NAME>/checkpoints/step<N>.pt, no training
SEED = 0  # networks' initialisation, data order, training noise
RUN_NAME = "ACTImageLift"
apply_overrides(globals())  # e.g. accelerate launch Script/ACTImageLift.py --MAX_STEPS=2000

seed_everything(SEED)
ensure_demos(DATASET_PATH, generate_lift_demos, episodes=NUM_DEMOS, image=True)
dataset = RobomimicDataset(DATASET_PATH, rgb_keys=RGB_KEYS, low_dim_keys=LOW_DIM_KEYS, obs_horizon=OBS_HORIZON,
                           chunk_size=CHUNK_SIZE, pad_after=PAD_AFTER, image_size=IMAGE_SIZE)
action_space = ActionSpace("axis_angle", "absolute" if dataset.absolute_actions else "relative")
preprocess = Preprocessor(dataset.stats, action_space, dataset.cams, image_size=IMAGE_SIZE, crop_size=CROP_SIZE,
                          normalization=NORMALIZATION)

net = ACT(action_space.model_dim, CHUNK_SIZE, low_dim_dim=dataset.low_dim_dim, cams=dataset.cams,
          backbone_norm=BACKBONE_NORM, backbone_weights=BACKBONE_WEIGHTS,
          d_model=D_MODEL, nhead=NHEAD, num_encoder_layers=NUM_ENCODER_LAYERS, num_decoder_layers=NUM_DECODER_LAYERS,
          dim_feedforward=DIM_FEEDFORWARD, dropout=DROPOUT, num_vae_encoder_layers=NUM_VAE_ENCODER_LAYERS,
          latent_dim=LATENT_DIM)
policy = ACTPolicy(net, kl_weight=KL_WEIGHT)

make_env = partial(RobosuiteEnv, dataset.env_meta, rgb_keys=RGB_KEYS, low_dim_keys=LOW_DIM_KEYS,
                   max_episode_steps=MAX_EPISODE_STEPS, image_size=IMAGE_SIZE)
evaluator = Evaluator(tasks=[EvalTask("lift", make_env, NUM_EVAL_EPISODES)], num_envs=NUM_ENVS, obs_horizon=OBS_HORIZON,
                      exec_start=EXEC_START, exec_end=EXEC_END, temporal_ensemble=TEMPORAL_ENSEMBLE)

train(policy, preprocess, dataset, TrainConfig(
    run_name=RUN_NAME, max_steps=MAX_STEPS, batch_size=BATCH_SIZE, lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS,
    warmup_steps=WARMUP_STEPS, lr_schedule=LR_SCHEDULE, grad_clip=GRAD_CLIP, ema=EMA, num_workers=NUM_WORKERS,
    bf16=BF16, channels_last=CHANNELS_LAST, eval_every=EVAL_EVERY, success_last_k=SUCCESS_LAST_K,
    eval_checkpoints=EVAL_CHECKPOINTS, eval_only=EVAL_ONLY, seed=SEED,
), evaluator, param_groups=policy.param_groups(LR_BACKBONE))
