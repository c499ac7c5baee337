"""ACT (Zhao et al., RSS 2023) on simulated ALOHA transfer-cube, from the top camera and joint positions.

ACT's simulation recipe (github.com/tonyzhaozh/act, README and ``imitate_episodes.py``): 50
scripted episodes of 400 steps at 50 Hz, the 480x640 top camera plus the 14-d joint positions,
14-d joint-position actions, chunks of 100, a ResNet-18 shared by the cameras, d_model 512,
feed-forward 3200, 4 encoder layers, 1 effective decoder layer, KL weight 10, batch 8, AdamW
with lr 1e-5 (backbone 1e-5) and weight decay 1e-4, about 2000 epochs of 40 episodes (10k
steps of 8 samples), evaluated with temporal ensembling (coefficient 0.01) over 50 episodes.

The defaults below train on a 2-core CPU, with ACT's value beside every one that differs: images
rendered at 120x160 (a 4x5 token map), a narrower transformer, and training stopped after
MAX_MINUTES. The ResNet is trained from scratch (no pretrained weights are downloaded), with
GroupNorm, so the learning rate is higher than ACT's. A training step takes about 0.35 s on one
Zen 5 core in bf16 + channels-last and 1.2 s on an AVX2-only Zen 2 core in fp32 (what
BF16 = "auto" picks there). Measured on one core over 50 episodes (docs/benchmarks.md): an hour
of training gave 96-98% on Zen 5 (7900-10000 steps, min-max normalisation) and 26% on Zen 2
(3000 steps, ACT's mean/std); the two differ in both, and were not separated.
With no episodes at DATASET_PATH, ACT's scripted expert records them at IMAGE_SIZE. On a GPU,
restore ACT's values and run:
    accelerate launch Script/ACTImageTransferCube.py
"""

from functools import partial

from mimictest.config import apply_overrides, seed_everything
from mimictest.data.aloha import AlohaDataset
from mimictest.demos import ensure_demos
from mimictest.demos.aloha import generate_aloha_demos
from mimictest.envs.aloha import AlohaEnv
from mimictest.evaluate import EvalTask, Evaluator
from mimictest.nets.act import ACT
from mimictest.policies.act import ACTPolicy
from mimictest.preprocess import ActionSpace, Preprocessor
from mimictest.train import TrainConfig, train

# Data
TASK = "transfer_cube"
DATASET_PATH = "Datasets/aloha_transfer_cube_120x160"  # a folder of episode_<i>.hdf5 (ACT's format)
NUM_DEMOS = 50  # scripted-expert episodes attempted when DATASET_PATH does not exist (ACT: 50)
CAMS = ["top"]  # ACT: ["top"]
IMAGE_SIZE = (120, 160)  # ACT: (480, 640)
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
NUM_WORKERS = 0  # images are cached in RAM; worker processes would only compete for the CPU cores
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
RUN_NAME = "ACTImageTransferCube"
apply_overrides(globals())  # e.g. accelerate launch Script/ACTImageTransferCube.py --MAX_STEPS=2000

seed_everything(SEED)
ensure_demos(DATASET_PATH, partial(generate_aloha_demos, TASK), episodes=NUM_DEMOS, cams=CAMS, image_size=IMAGE_SIZE)
dataset = AlohaDataset(DATASET_PATH, CAMS, obs_horizon=OBS_HORIZON, chunk_size=CHUNK_SIZE, pad_after=PAD_AFTER,
                       image_size=IMAGE_SIZE)
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
                      exec_start=EXEC_START, exec_end=EXEC_END, video_fps=50, temporal_ensemble=TEMPORAL_ENSEMBLE)

train(policy, preprocess, dataset, TrainConfig(
    run_name=RUN_NAME, max_steps=MAX_STEPS, max_minutes=MAX_MINUTES, batch_size=BATCH_SIZE, lr=LR,
    weight_decay=WEIGHT_DECAY, betas=BETAS, warmup_steps=WARMUP_STEPS, lr_schedule=LR_SCHEDULE, grad_clip=GRAD_CLIP,
    ema=EMA, num_workers=NUM_WORKERS, bf16=BF16, channels_last=CHANNELS_LAST, eval_every=EVAL_EVERY,
    success_last_k=SUCCESS_LAST_K, eval_checkpoints=EVAL_CHECKPOINTS, eval_only=EVAL_ONLY, seed=SEED,
), evaluator, param_groups=policy.param_groups(LR_BACKBONE))
