"""Florence-2 with an MDT-style DiT diffusion head (the original mimictest's FlorenceMDTNet) on robomimic Square (ph, abs. actions).

Xiao et al. 2024 (Florence-2-base, transformers' native Florence2ForConditionalGeneration) as in
EDiRobotics/mimictest, where this configuration reaches 93.75% on Square ph image: agentview +
eye-in-hand 84x84 images cropped to 76x76 go through the frozen DaViT tower and the projector
(10 tokens per image), joined with the fixed prompt "<Action>" and one token per step of the
proprioceptive state in the BART encoder; 64 learned queries through the BART decoder are the
condition tokens of a DiT (Reuss et al. 2024, MDT: AdaLN on the diffusion step, causal
self-attention, cross-attention to the condition; width 128, 4 layers, 8 heads, dropout 0.3 / 0.1
/ 0.05) that denoises the 16-step chunk of 10-d actions (xyz, 6D rotation, gripper): DDPM training
with 10 steps, DDIM sampling with 10 steps, epsilon prediction. Florence runs once per chunk, the
DiT once per denoising step. mimictest's values: 2 observation steps, 8 executed steps, AdamW lr
1e-4 with weight decay 1e-4, grad clip 10, EMA, batch 64, 1000 epochs, 400-step evaluation
episodes. Its low-dim state is a DiT condition token; here it is an encoder token.

FLORENCE_PATH is a local folder in transformers' native Florence-2 layout (a download of
florence-community/Florence-2-base, see mimictest.nets.florence.FLORENCE_LAYOUT); with
FLORENCE_PATH = None a FLORENCE_CONFIG of the same shape is built with random weights (and the
vision tower then trains: a random frozen tower sees nothing). It needs
``square/ph/image_abs.hdf5`` (Diffusion Policy's data release; there is no scripted Square expert).
Sized for one GPU:
    pip install -e ".[florence]"
    accelerate launch Script/FlorenceDiTImageSquare.py
"""

from functools import partial

from mimictest.config import apply_overrides, seed_everything
from mimictest.data import require_dataset
from mimictest.data.robomimic import RobomimicDataset
from mimictest.envs.robosuite import RobosuiteEnv
from mimictest.evaluate import EvalTask, Evaluator
from mimictest.nets.dit import DiT
from mimictest.nets.florence import FlorenceBackbone, FlorenceQueryEncoder, load_florence
from mimictest.policies.diffusion import DiffusionPolicy
from mimictest.preprocess import ActionSpace, Preprocessor
from mimictest.train import TrainConfig, train

# Data
DATASET_PATH = "Datasets/robomimic/square/ph/image_abs.hdf5"
RGB_KEYS = ["agentview_image", "robot0_eye_in_hand_image"]
LOW_DIM_KEYS = ["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"]
IMAGE_SIZE, CROP_SIZE = (84, 84), (76, 76)
OBS_HORIZON = 2
CHUNK_SIZE = 16
N_ACTION_STEPS = 8  # actions executed per predicted chunk (mimictest: 8)
EXEC_START, EXEC_END = OBS_HORIZON - 1, OBS_HORIZON - 1 + N_ACTION_STEPS
# Network
FLORENCE_PATH = "Models/Florence-2-base"  # a native Florence-2 folder; None: FLORENCE_CONFIG from scratch
FLORENCE_CONFIG = "base"  # the architecture built when FLORENCE_PATH is None ("base", "large", "small")
FREEZE_VISION_TOWER = FLORENCE_PATH is not None  # mimictest: True (pretrained DaViT)
NUM_QUERIES = 64  # the DiT's condition tokens
N_LAYER, N_HEAD, N_EMB = 4, 8, 128
P_DROP_ATTN, P_DROP_RESID, P_DROP_MLP = 0.3, 0.1, 0.05
NUM_TRAIN_TIMESTEPS, SAMPLER, NUM_INFERENCE_STEPS = 10, "ddim", 10
COMPILE_HEAD = False  # True: torch.compile the DiT (its denoising passes; not measured on a GPU here)
# Optimisation
BATCH_SIZE = 64  # per process
NUM_WORKERS = 8
LR, WEIGHT_DECAY = 1e-4, 1e-4
BETAS = (0.9, 0.999)
WARMUP_STEPS = 500  # mimictest: 5 steps
LR_SCHEDULE = "constant"  # mimictest: constant after the warmup
GRAD_CLIP = 10.0
EMA = True
MAX_STEPS = 200000  # about 430 epochs of the 200 demonstrations (mimictest: 1000 epochs)
BF16 = "auto"  # bf16 autocast where measured faster (GPUs; CPUs with AMX or AVX512-BF16)
# Evaluation
NUM_ENVS = 16
NUM_EVAL_EPISODES = 96  # mimictest: 16 envs x 6 episodes
MAX_EPISODE_STEPS = 400
EVAL_EVERY = 25000
SUCCESS_LAST_K = 3  # success pooled over the last K evaluations (mimictest: 3 x 96 rollouts)
SEED = 0  # networks' initialisation, data order, training noise
RUN_NAME = "FlorenceDiTImageSquare"
apply_overrides(globals())  # e.g. accelerate launch Script/FlorenceDiTImageSquare.py --MAX_STEPS=2000

seed_everything(SEED)
require_dataset(DATASET_PATH, "Get square/ph/image_abs.hdf5 from the Diffusion Policy data release (robomimic_image.zip), "
                "or robomimic's square/ph/image.hdf5 (delta actions), and set DATASET_PATH at the top of this script.")
dataset = RobomimicDataset(DATASET_PATH, rgb_keys=RGB_KEYS, low_dim_keys=LOW_DIM_KEYS, obs_horizon=OBS_HORIZON,
                           chunk_size=CHUNK_SIZE, image_size=IMAGE_SIZE)
action_space = ActionSpace("axis_angle", "absolute" if dataset.absolute_actions else "relative")
preprocess = Preprocessor(dataset.stats, action_space, dataset.cams, image_size=IMAGE_SIZE, crop_size=CROP_SIZE)

florence, tokenizer, how = load_florence(FLORENCE_PATH, FLORENCE_CONFIG)
print(how)
backbone = FlorenceBackbone(florence, dataset.cams, low_dim_dim=dataset.low_dim_dim, tokenizer=tokenizer,
                            freeze_vision_tower=FREEZE_VISION_TOWER)
obs_encoder = FlorenceQueryEncoder(backbone, num_queries=NUM_QUERIES)
noise_net = DiT(action_space.model_dim, CHUNK_SIZE, obs_encoder.num_tokens, obs_encoder.out_dim, n_layer=N_LAYER,
                n_head=N_HEAD, n_emb=N_EMB, p_drop_attn=P_DROP_ATTN, p_drop_resid=P_DROP_RESID, p_drop_mlp=P_DROP_MLP)
if COMPILE_HEAD:
    noise_net.compile()
policy = DiffusionPolicy(obs_encoder, noise_net, action_space.model_dim, CHUNK_SIZE, sampler=SAMPLER,
                         num_inference_steps=NUM_INFERENCE_STEPS, num_train_timesteps=NUM_TRAIN_TIMESTEPS)

make_env = partial(RobosuiteEnv, dataset.env_meta, rgb_keys=RGB_KEYS, low_dim_keys=LOW_DIM_KEYS,
                   max_episode_steps=MAX_EPISODE_STEPS, image_size=IMAGE_SIZE)
evaluator = Evaluator(tasks=[EvalTask("square", make_env, NUM_EVAL_EPISODES)], num_envs=NUM_ENVS, obs_horizon=OBS_HORIZON,
                      exec_start=EXEC_START, exec_end=EXEC_END)

train(policy, preprocess, dataset, TrainConfig(
    run_name=RUN_NAME, max_steps=MAX_STEPS, batch_size=BATCH_SIZE, lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS,
    warmup_steps=WARMUP_STEPS, lr_schedule=LR_SCHEDULE, grad_clip=GRAD_CLIP, ema=EMA, num_workers=NUM_WORKERS,
    bf16=BF16, eval_every=EVAL_EVERY, success_last_k=SUCCESS_LAST_K, seed=SEED,
), evaluator)
