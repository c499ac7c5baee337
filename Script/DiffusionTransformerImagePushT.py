"""Diffusion Policy (Chi et al. 2023) with the time-series diffusion transformer on PushT, from 96x96 images.

The paper's PushT image transformer setup (diffusion_policy ``image_pusht_diffusion_policy_transformer.yaml``):
one 96x96 image randomly cropped to 84x84 and encoded by a ResNet-18 with GroupNorm and spatial softmax,
plus the agent position; obs horizon 2, prediction horizon 10, 8 executed steps; an 8-layer 256-wide
4-head causal transformer with attention dropout 0.3; DDPM with 100 steps; AdamW lr 1e-4 with betas
(0.9, 0.95), weight decay 1e-3 on the transformer and 1e-6 on the observation encoder, 1000 warmup
steps (then a cosine decay in the reference; constant here), batch 64 for 3050 epochs on a GPU. The
network is the paper's; the run length, batch and warmup below are sized like
``DiffusionUNetImagePushT.py`` for a 2-core CPU (the ResNet-18 dominates the step there), so expect a
partly trained policy and use the paper's BATCH_SIZE, WARMUP_STEPS and a far larger MAX_STEPS on a GPU.

With DATASET_PATH empty, the scripted PushT expert writes NUM_DEMOS episodes (seeds 0 ..
NUM_DEMOS - 1, about 2 s each) to EXPERT_PATH; evaluation seeds start at 100000. For the human
demonstrations, download https://diffusion-policy.cs.columbia.edu/data/training/pusht.zip and set
DATASET_PATH = "Datasets/pusht/pusht_cchi_v7_replay.zarr".
    accelerate launch Script/DiffusionTransformerImagePushT.py
"""

from functools import partial

from mimictest.config import apply_overrides, seed_everything
from mimictest.data import require_dataset
from mimictest.data.pusht import HOW_TO_GET, PushTDataset
from mimictest.demos import ensure_demos
from mimictest.demos.pusht import generate_pusht_demos
from mimictest.envs.pusht import PushTEnv
from mimictest.evaluate import EvalTask, Evaluator
from mimictest.nets.obs_encoder import ObsEncoder
from mimictest.nets.transformer import DiffusionTransformer
from mimictest.policies.diffusion import DiffusionPolicy
from mimictest.preprocess import ActionSpace, Preprocessor
from mimictest.train import TrainConfig, train

# Data
DATASET_PATH = ""  # "" = scripted-expert demos at EXPERT_PATH; or the real pusht_cchi_v7_replay.zarr
EXPERT_PATH = "Datasets/pusht_expert.zarr"
NUM_DEMOS = 100  # scripted-expert episodes attempted when EXPERT_PATH does not exist
IMAGE_SIZE, CROP_SIZE = (96, 96), (84, 84)
OBS_HORIZON = 2
CHUNK_SIZE = 10
N_ACTION_STEPS = 8  # actions executed per predicted chunk (Diffusion Policy: 8)
EXEC_START, EXEC_END = OBS_HORIZON - 1, OBS_HORIZON - 1 + N_ACTION_STEPS
PAD_AFTER = N_ACTION_STEPS - 1  # Diffusion Policy's sampler: at most n_action_steps - 1 padded steps
NORMALIZATION = "minmax"  # Diffusion Policy: min-max to [-1, 1]
# Network and diffusion
N_LAYER, N_HEAD, N_EMB = 8, 4, 256
P_DROP_EMB, P_DROP_ATTN = 0.0, 0.3
N_COND_LAYERS = 0
SAMPLER, NUM_INFERENCE_STEPS = "ddpm", 100  # the paper's simulation setting
# Optimisation
BATCH_SIZE = 32  # the paper: 64
NUM_WORKERS = 0  # images are cached in RAM; worker processes would only compete for the 2 cores
LR, BETAS = 1e-4, (0.9, 0.95)
TRANSFORMER_WEIGHT_DECAY, OBS_ENCODER_WEIGHT_DECAY = 1e-3, 1e-6
WARMUP_STEPS = 200  # the paper: 1000
LR_SCHEDULE = "cosine"  # Diffusion Policy: cosine decay after the warmup
GRAD_CLIP = 0.0  # Diffusion Policy: no clipping
EMA = True  # Diffusion Policy: EMA weights for evaluation
MAX_STEPS = 2500
BF16 = False
# Evaluation
NUM_ENVS = 4
NUM_EVAL_EPISODES = 50
MAX_EPISODE_STEPS = 300
EVAL_EVERY = 0  # 0: only after training
SUCCESS_LAST_K = 1  # success pooled over the last K evaluations (the original mimictest: 3 x 96 rollouts)
EVAL_CHECKPOINTS = None  # "all" or [steps]: evaluate the kept Save/<RUN_NAME>/checkpoints/step<N>.pt, no training
SEED = 0  # networks' initialisation, data order, training noise
RUN_NAME = "DiffusionTransformerImagePushT"
apply_overrides(globals())  # e.g. accelerate launch Script/DiffusionTransformerImagePushT.py --MAX_STEPS=2000

seed_everything(SEED)
if DATASET_PATH:
    require_dataset(DATASET_PATH, f"To train on generated demos instead, set DATASET_PATH = ''; to get the data, {HOW_TO_GET}.")
else:
    ensure_demos(EXPERT_PATH, generate_pusht_demos, episodes=NUM_DEMOS)
dataset = PushTDataset(DATASET_PATH or EXPERT_PATH, obs_mode="image", obs_horizon=OBS_HORIZON, chunk_size=CHUNK_SIZE,
                       pad_after=PAD_AFTER)
action_space = ActionSpace(None, "absolute", env_dim=2)
preprocess = Preprocessor(dataset.stats, action_space, dataset.cams, image_size=IMAGE_SIZE, crop_size=CROP_SIZE,
                          normalization=NORMALIZATION)

obs_encoder = ObsEncoder(dataset.cams, low_dim_dim=dataset.low_dim_dim)
noise_net = DiffusionTransformer(action_space.model_dim, CHUNK_SIZE, OBS_HORIZON, obs_encoder.out_dim,
                                 n_layer=N_LAYER, n_head=N_HEAD, n_emb=N_EMB, p_drop_emb=P_DROP_EMB,
                                 p_drop_attn=P_DROP_ATTN, causal_attn=True, n_cond_layers=N_COND_LAYERS)
policy = DiffusionPolicy(obs_encoder, noise_net, action_space.model_dim, CHUNK_SIZE,
                         sampler=SAMPLER, num_inference_steps=NUM_INFERENCE_STEPS)

make_env = partial(PushTEnv, obs_mode="image", max_episode_steps=MAX_EPISODE_STEPS)
evaluator = Evaluator(tasks=[EvalTask("pusht", make_env, NUM_EVAL_EPISODES)], num_envs=NUM_ENVS, obs_horizon=OBS_HORIZON,
                      exec_start=EXEC_START, exec_end=EXEC_END)

train(policy, preprocess, dataset, TrainConfig(
    run_name=RUN_NAME, max_steps=MAX_STEPS, batch_size=BATCH_SIZE, lr=LR, weight_decay=OBS_ENCODER_WEIGHT_DECAY,
    betas=BETAS, warmup_steps=WARMUP_STEPS, lr_schedule=LR_SCHEDULE, grad_clip=GRAD_CLIP, ema=EMA,
    num_workers=NUM_WORKERS, bf16=BF16, eval_every=EVAL_EVERY, success_last_k=SUCCESS_LAST_K,
    eval_checkpoints=EVAL_CHECKPOINTS, seed=SEED,
), evaluator, param_groups=noise_net.optim_groups(TRANSFORMER_WEIGHT_DECAY)
   + [{"params": obs_encoder.parameters(), "weight_decay": OBS_ENCODER_WEIGHT_DECAY}])
