"""mimictest: a simple and fast testbed for robot-manipulation imitation policies."""

__version__ = "0.1.0"
