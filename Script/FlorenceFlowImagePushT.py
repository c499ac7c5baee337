"""Florence-2 with a pi0-style flow-matching action expert (the original mimictest's FlorencePi0Net) on PushT, from 96x96 images.

Xiao et al. 2024 (Florence-2-base, transformers' native Florence2ForConditionalGeneration) as in
EDiRobotics/mimictest's PushT experiments (its Florence-2 linear head: 53%, its MDT DiT head: 64%):
the 96x96 image randomly cropped to 84x84 goes through the DaViT tower (trained here, as in
mimictest's PushT runs) and the projector (10 tokens), joined with the fixed prompt "<Action>" and
one token per step of the agent position in the BART encoder: the prefix, computed once per chunk.
The BART decoder is the action expert (Black et al. 2024, pi0): the 16 noisy 2-d actions, each
mixed with the flow time's sine-cosine embedding, cross-attend to the prefix and a Linear layer
reads out the velocity; pi0's Beta(1.5, 1) flow times, NUM_FLOW_STEPS = 10 Euler steps (openpi:
10). mimictest's values: 2 observation steps, chunk steps [1, 9) executed, AdamW lr 1e-4 with
weight decay 1e-4, grad clip 10, EMA, batch 64, 400 epochs, 300-step evaluation episodes (its
flow loss is L1; pi0's, used here, is the MSE).

FLORENCE_PATH is a local folder in transformers' native Florence-2 layout (a download of
florence-community/Florence-2-base, see mimictest.nets.florence.FLORENCE_LAYOUT); with
FLORENCE_PATH = None a FLORENCE_CONFIG of the same shape is built with random weights. With
DATASET_PATH empty, the scripted PushT expert writes NUM_DEMOS episodes to EXPERT_PATH; for the
human demonstrations, download https://diffusion-policy.cs.columbia.edu/data/training/pusht.zip and
set DATASET_PATH = "Datasets/pusht/pusht_cchi_v7_replay.zarr". Sized for one GPU:
    pip install -e ".[florence]"
    accelerate launch Script/FlorenceFlowImagePushT.py
"""

from functools import partial

from mimictest.config import apply_overrides, seed_everything
from mimictest.data import require_dataset
from mimictest.data.pusht import HOW_TO_GET, PushTDataset
from mimictest.demos import ensure_demos
from mimictest.demos.pusht import generate_pusht_demos
from mimictest.envs.pusht import PushTEnv
from mimictest.evaluate import EvalTask, Evaluator
from mimictest.nets.florence import FlorenceActionExpert, FlorenceBackbone, load_florence
from mimictest.policies.flow import FlowMatchingPolicy
from mimictest.preprocess import ActionSpace, Preprocessor
from mimictest.train import TrainConfig, train

# Data
DATASET_PATH = ""  # "" = scripted-expert demos at EXPERT_PATH; or the real pusht_cchi_v7_replay.zarr
EXPERT_PATH = "Datasets/pusht_expert.zarr"
NUM_DEMOS = 100  # scripted-expert episodes attempted when EXPERT_PATH does not exist
IMAGE_SIZE, CROP_SIZE = (96, 96), (84, 84)
OBS_HORIZON = 2
CHUNK_SIZE = 16
N_ACTION_STEPS = 8  # actions executed per predicted chunk (mimictest: chunk steps [1, 9))
EXEC_START, EXEC_END = OBS_HORIZON - 1, OBS_HORIZON - 1 + N_ACTION_STEPS
# Network
FLORENCE_PATH = "Models/Florence-2-base"  # a native Florence-2 folder; None: FLORENCE_CONFIG from scratch
FLORENCE_CONFIG = "base"  # the architecture built when FLORENCE_PATH is None ("base", "large", "small")
FREEZE_VISION_TOWER = False  # mimictest's PushT runs train the DaViT too
NUM_FLOW_STEPS = 10  # Euler steps per chunk (pi0 / openpi: 10)
TIME_SAMPLING = "beta"  # pi0's Beta(1.5, 1) flow times; "uniform" for U(0, 1)
COMPILE_HEAD = False  # True: torch.compile the action expert (its Euler steps; not measured on a GPU here)
# Optimisation
BATCH_SIZE = 64  # per process
NUM_WORKERS = 8
LR, WEIGHT_DECAY = 1e-4, 1e-4
BETAS = (0.9, 0.999)
WARMUP_STEPS = 500  # mimictest: 5 steps
LR_SCHEDULE = "constant"  # mimictest: constant after the warmup
GRAD_CLIP = 10.0
EMA = True
MAX_STEPS = 150000  # about 400 epochs of the 206 human demonstrations (25k samples) at batch 64
BF16 = "auto"  # bf16 autocast where measured faster (GPUs; CPUs with AMX or AVX512-BF16)
# Evaluation
NUM_ENVS = 16
NUM_EVAL_EPISODES = 96  # mimictest: 16 envs x 6 episodes
MAX_EPISODE_STEPS = 300
EVAL_EVERY = 25000
SUCCESS_LAST_K = 3  # success pooled over the last K evaluations (mimictest: 3 x 96 rollouts)
SEED = 0  # networks' initialisation, data order, training noise
RUN_NAME = "FlorenceFlowImagePushT"
apply_overrides(globals())  # e.g. accelerate launch Script/FlorenceFlowImagePushT.py --MAX_STEPS=2000

seed_everything(SEED)
if DATASET_PATH:
    require_dataset(DATASET_PATH, f"Set DATASET_PATH = '' to train on generated demos, or {HOW_TO_GET}.")
else:
    ensure_demos(EXPERT_PATH, generate_pusht_demos, episodes=NUM_DEMOS)
dataset = PushTDataset(DATASET_PATH or EXPERT_PATH, obs_mode="image", obs_horizon=OBS_HORIZON, chunk_size=CHUNK_SIZE)
action_space = ActionSpace(None, "absolute", env_dim=2)
preprocess = Preprocessor(dataset.stats, action_space, dataset.cams, image_size=IMAGE_SIZE, crop_size=CROP_SIZE)

florence, tokenizer, how = load_florence(FLORENCE_PATH, FLORENCE_CONFIG)
print(how)
backbone = FlorenceBackbone(florence, dataset.cams, low_dim_dim=dataset.low_dim_dim, tokenizer=tokenizer,
                            freeze_vision_tower=FREEZE_VISION_TOWER)
expert = FlorenceActionExpert(backbone, action_space.model_dim, CHUNK_SIZE)
if COMPILE_HEAD:
    expert.compile()
policy = FlowMatchingPolicy(expert, action_space.model_dim, CHUNK_SIZE, num_flow_steps=NUM_FLOW_STEPS,
                            time_sampling=TIME_SAMPLING)

make_env = partial(PushTEnv, obs_mode="image", max_episode_steps=MAX_EPISODE_STEPS)
evaluator = Evaluator(tasks=[EvalTask("pusht", make_env, NUM_EVAL_EPISODES)], num_envs=NUM_ENVS, obs_horizon=OBS_HORIZON,
                      exec_start=EXEC_START, exec_end=EXEC_END)

train(policy, preprocess, dataset, TrainConfig(
    run_name=RUN_NAME, max_steps=MAX_STEPS, batch_size=BATCH_SIZE, lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS,
    warmup_steps=WARMUP_STEPS, lr_schedule=LR_SCHEDULE, grad_clip=GRAD_CLIP, ema=EMA, num_workers=NUM_WORKERS,
    bf16=BF16, eval_every=EVAL_EVERY, success_last_k=SUCCESS_LAST_K, seed=SEED,
), evaluator)
