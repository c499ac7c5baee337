"""mimictest: a simple and fast testbed for robot-manipulation imitation policies."""

from setuptools import find_packages, setup

SIM = [
    "robosuite==1.5.2",  # MuJoCo 3; forces numpy<2
    "mujoco>=3.3,<3.9",  # gym-aloha needs mujoco<3.9
    "stable-baselines3>=2.3",
    "gymnasium>=1.0",
    "gym-pusht>=0.1.5",
    "gym-aloha>=0.1.1",
]
FLORENCE = ["transformers>=5.0"]
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
    ],
    extras_require={
        "sim": SIM,
        "florence": FLORENCE,
        "dev": DEV,
        "all": SIM + FLORENCE + DEV,
    },
)
