"""ACT (Zhao et al., RSS 2023) on simulated ALOHA transfer-cube, trained on a LeRobotDataset folder.

The same recipe as Script/ACTImageTransferCube.py (ACT's values are listed there and beside each
constant), read from LeRobot's hub dataset ``lerobot/aloha_sim_transfer_cube_human`` (50 human
episodes of 400 steps at 50 Hz: the 480x640 ``observation.images.top`` video, ``observation.state`` =
the 14 joint positions, ``action`` = the 14 joint targets) and evaluated in our ALOHA env (the
same gym-aloha scene, top camera and joint units). The videos are resized to IMAGE_SIZE while
they are decoded once into RAM at each launch (20000 frames: 1.2 GB at 120x160, 18 GB at ACT's
480x640; a few minutes of decoding on a 2-core CPU, docs/benchmarks.md). Download
it first (any LeRobotDataset v3.0 or v2.1 folder of this shape works):
    hf download --repo-type dataset lerobot/aloha_sim_transfer_cube_human --local-dir Datasets/lerobot_aloha_sim_transfer_cube_human
    accelerate launch Script/ACTImageTransferCubeLeRobot.py
The scripted ACT-format episodes of Script/ACTImageTransferCube.py can be recorded with LeRobot's
own writer too: python tests/make_lerobot_fixture.py --from-aloha FOLDER --out FOLDER_lerobot
"""

from functools import partial

from mimictest.config import apply_overrides, seed_everything
from mimictest.data import require_dataset
from mimictest.data.lerobot import LeRobotDataset, how_to_get
from mimictest.envs.aloha import AlohaEnv
from mimictest.evaluate import EvalTask, Evaluator
from mimictest.nets.act import ACT
from mimictest.policies.act import ACTPolicy
from mimictest.preprocess import ActionSpace, Preprocessor
from mimictest.train import TrainConfig, train

# Data
TASK = "transfer_cube"
DATASET_PATH = "Datasets/lerobot_aloha_sim_transfer_cube_human"  # a local LeRobotDataset folder
CAMS = ["top"]  # observation.images.top (ACT: ["top"]); our ALOHA env's camera has the same name
IMAGE_SIZE = (120, 160)  # ACT: (480, 640); frames are resized to this while they are decoded
OBS_HORIZON = 1  # ACT sees the current observation only
CHUNK_SIZE = 100  # ACT: 100 (2 s at 50 Hz)
# Execution: ACT's temporal ensembling coefficient, or None to run each chunk's [EXEC_START, EXEC_END) open-loop
TEMPORAL_ENSEMBLE = 0.01  # ACT: 0.01 (with --temporal_agg)
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
BATCH_SIZE = 8  # ACT: 8
NUM_WORKERS = 0  # frames are decoded once into RAM; worker processes would only compete for the CPU cores
LR, LR_BACKBONE, WEIGHT_DECAY = 5e-5, 5e-5, 1e-4  # ACT: 1e-5, 1e-5 (pretrained ResNet), 1e-4
BETAS = (0.9, 0.999)  # ACT: AdamW's defaults
WARMUP_STEPS = 0  # ACT: constant lr
LR_SCHEDULE = "constant"  # ACT: constant
EMA = False  # ACT: none
GRAD_CLIP = 10.0  # ACT: none; LeRobot: 10
MAX_STEPS = 10000  # ACT: 2000 epochs x 5 batches
MAX_MINUTES = 60  # stop training after an hour even if MAX_STEPS is not reached (None: no limit)
BF16 = "auto"  # bf16 autocast where measured faster (GPUs; CPUs with AMX or AVX512-BF16)
CHANNELS_LAST = True  # with BF16, faster ResNet-18 steps
# Evaluation
NUM_ENVS = 4
NUM_EVAL_EPISODES = 50  # ACT: 50
MAX_EPISODE_STEPS = 400  # ACT: 400
EVAL_EVERY = 0  # only at the end
EVAL_ONLY = False  # True: only evaluate Save/<RUN_NAME>/last.pt, e.g. again with TEMPORAL_ENSEMBLE = None
SUCCESS_LAST_K = 1  # success pooled over the last K evaluations (the original mimictest: 3 x 96 rollouts)
EVAL_CHECKPOINTS = None  # "all" or [steps]: evaluate the kept Save/<RUN_NAME>/checkpoints/step<N>.pt, no training
SEED = 0  # networks' initialisation, data order, training noise
RUN_NAME = "ACTImageTransferCubeLeRobot"
apply_overrides(globals())  # e.g. accelerate launch Script/ACTImageTransferCubeLeRobot.py --MAX_STEPS=2000

seed_everything(SEED)
require_dataset(DATASET_PATH, how_to_get("lerobot/aloha_sim_transfer_cube_human", DATASET_PATH))
dataset = LeRobotDataset(DATASET_PATH, obs_horizon=OBS_HORIZON, chunk_size=CHUNK_SIZE, cams=CAMS, image_size=IMAGE_SIZE,
                         pad_after=PAD_AFTER)
action_space = ActionSpace(None, "absolute", env_dim=14)
preprocess = Preprocessor(dataset.stats, action_space, dataset.cams, image_size=IMAGE_SIZE, normalization=NORMALIZATION)

net = ACT(action_space.model_dim, CHUNK_SIZE, low_dim_dim=dataset.low_dim_dim, cams=dataset.cams,
          backbone_norm=BACKBONE_NORM, backbone_weights=BACKBONE_WEIGHTS,
          d_model=D_MODEL, nhead=NHEAD, num_encoder_layers=NUM_ENCODER_LAYERS, num_decoder_layers=NUM_DECODER_LAYERS,
          dim_feedforward=DIM_FEEDFORWARD, dropout=DROPOUT, num_vae_encoder_layers=NUM_VAE_ENCODER_LAYERS,
          latent_dim=LATENT_DIM)
policy = ACTPolicy(net, kl_weight=KL_WEIGHT)

make_env = partial(AlohaEnv, TASK, cams=CAMS, image_size=IMAGE_SIZE, max_episode_steps=MAX_EPISODE_STEPS)
evaluator = Evaluator(tasks=[EvalTask(TASK, make_env, NUM_EVAL_EPISODES)], num_envs=NUM_ENVS, obs_horizon=OBS_HORIZON,
                      exec_start=EXEC_START, exec_end=EXEC_END, video_fps=round(dataset.fps), temporal_ensemble=TEMPORAL_ENSEMBLE)

train(policy, preprocess, dataset, TrainConfig(
    run_name=RUN_NAME, max_steps=MAX_STEPS, max_minutes=MAX_MINUTES, batch_size=BATCH_SIZE, lr=LR,
    weight_decay=WEIGHT_DECAY, betas=BETAS, warmup_steps=WARMUP_STEPS, lr_schedule=LR_SCHEDULE, grad_clip=GRAD_CLIP,
    ema=EMA, num_workers=NUM_WORKERS, bf16=BF16, channels_last=CHANNELS_LAST, eval_every=EVAL_EVERY,
    success_last_k=SUCCESS_LAST_K, eval_checkpoints=EVAL_CHECKPOINTS, eval_only=EVAL_ONLY, seed=SEED,
), evaluator, param_groups=policy.param_groups(LR_BACKBONE))
