"""Florence-2 with a pi0-style flow-matching action expert on robomimic Lift, from two cameras: CPU-sized, from scratch.

The Florence-2 flow policy of Script/FlorenceFlowImageSquare.py (Xiao et al. 2024; the action
expert of Black et al. 2024, pi0), sized for a 2-core CPU with no pretrained weights: the "small"
Florence-2 (DaViT widths 32-256, BART width 256 with 3 + 3 layers, 8.8 M weights; Florence-2-base:
widths 128-1024, BART-base 768 with 6 + 6 layers, 231 M) is built from scratch, so its vision tower
trains. agentview + eye-in-hand 84x84 images (random 76x76 crops, 10 tokens each) and one token
for the proprioceptive state go through the BART encoder once per chunk; the BART decoder
integrates the 16-step chunk of 10-d actions (xyz, 6D rotation, gripper) in NUM_FLOW_STEPS = 10
Euler steps from pi0's Beta(1.5, 1) flow-time training.

Values changed for the CPU, with mimictest's (Florence-2-base on Square) and the papers' beside
them: 1 observation step (mimictest: 2; pi0: 1), batch 32 (mimictest: 192), lr 3e-4 constant
after 200 warmup steps (mimictest: 1e-4), training stopped after MAX_MINUTES = 55, evaluation on 2
parallel envs. With no dataset at DATASET_PATH, the scripted Lift expert first writes NUM_DEMOS
episodes with images (about 12 s an episode on a CPU, 20 minutes; the file is shared with the
other image Lift scripts). Budget on a 2-core CPU: 55 minutes of training + the 50-episode
evaluation, 75 minutes with the demos present, 95 when the script writes them first. Measured on one
Zen 4 core: step 3100 in the 55 minutes, evaluation 1050 s, 88.0% (95% CI 76.2-94.4) over 50 episodes
(docs/benchmarks.md, "Florence-2").
    pip install -e ".[florence]"
    accelerate launch Script/FlorenceFlowImageLift.py
Script/FlorenceDiTImageLift.py is the same experiment with the DiT diffusion head.
"""

from functools import partial

from mimictest.config import apply_overrides, seed_everything
from mimictest.data.robomimic import RobomimicDataset
from mimictest.demos import ensure_demos
from mimictest.demos.lift import generate_lift_demos
from mimictest.envs.robosuite import RobosuiteEnv
from mimictest.evaluate import EvalTask, Evaluator
from mimictest.nets.florence import FlorenceActionExpert, FlorenceBackbone, load_florence
from mimictest.policies.flow import FlowMatchingPolicy
from mimictest.preprocess import ActionSpace, Preprocessor
from mimictest.train import TrainConfig, train

# Data
DATASET_PATH = "Datasets/lift_expert_image.hdf5"
NUM_DEMOS = 100  # scripted-expert episodes attempted when DATASET_PATH does not exist
RGB_KEYS = ["agentview_image", "robot0_eye_in_hand_image"]
LOW_DIM_KEYS = ["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"]
IMAGE_SIZE, CROP_SIZE = (84, 84), (76, 76)
OBS_HORIZON = 1  # mimictest: 2; pi0: 1 (each step costs a DaViT pass per camera)
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
NUM_ENVS = 2
NUM_EVAL_EPISODES = 50
MAX_EPISODE_STEPS = 300
EVAL_EVERY = 0  # 0: only after training
EVAL_ONLY = False  # True: only evaluate Save/<RUN_NAME>/last.pt
SEED = 0  # networks' initialisation, data order, training noise
RUN_NAME = "FlorenceFlowImageLift"
apply_overrides(globals())  # e.g. accelerate launch Script/FlorenceFlowImageLift.py --MAX_STEPS=2000

seed_everything(SEED)
ensure_demos(DATASET_PATH, generate_lift_demos, episodes=NUM_DEMOS, image=True)
dataset = RobomimicDataset(DATASET_PATH, rgb_keys=RGB_KEYS, low_dim_keys=LOW_DIM_KEYS, obs_horizon=OBS_HORIZON,
                           chunk_size=CHUNK_SIZE, image_size=IMAGE_SIZE)
action_space = ActionSpace("axis_angle", "absolute" if dataset.absolute_actions else "relative")
preprocess = Preprocessor(dataset.stats, action_space, dataset.cams, image_size=IMAGE_SIZE, crop_size=CROP_SIZE)

florence, tokenizer, how = load_florence(FLORENCE_PATH, FLORENCE_CONFIG)
print(how)
backbone = FlorenceBackbone(florence, dataset.cams, low_dim_dim=dataset.low_dim_dim, tokenizer=tokenizer,
                            freeze_vision_tower=FREEZE_VISION_TOWER)
policy = FlowMatchingPolicy(FlorenceActionExpert(backbone, action_space.model_dim, CHUNK_SIZE), action_space.model_dim,
                            CHUNK_SIZE, num_flow_steps=NUM_FLOW_STEPS, time_sampling=TIME_SAMPLING)

make_env = partial(RobosuiteEnv, dataset.env_meta, rgb_keys=RGB_KEYS, low_dim_keys=LOW_DIM_KEYS,
                   max_episode_steps=MAX_EPISODE_STEPS, image_size=IMAGE_SIZE)
evaluator = Evaluator(tasks=[EvalTask("lift", make_env, NUM_EVAL_EPISODES)], num_envs=NUM_ENVS, obs_horizon=OBS_HORIZON,
                      exec_start=EXEC_START, exec_end=EXEC_END)

train(policy, preprocess, dataset, TrainConfig(
    run_name=RUN_NAME, max_steps=MAX_STEPS, max_minutes=MAX_MINUTES, batch_size=BATCH_SIZE, lr=LR,
    weight_decay=WEIGHT_DECAY, betas=BETAS, warmup_steps=WARMUP_STEPS, lr_schedule=LR_SCHEDULE, grad_clip=GRAD_CLIP,
    ema=EMA, num_workers=NUM_WORKERS, bf16=BF16, eval_every=EVAL_EVERY, eval_only=EVAL_ONLY, seed=SEED,
), evaluator)
