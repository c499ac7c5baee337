"""Benchmarks that print tables (and write JSON): training throughput, inference latency, env scaling.

    python -m mimictest.bench train --config dp-pusht-image [--precision both] [--vs-lerobot]
    python -m mimictest.bench infer --config dp-pusht-image --envs 8
    python -m mimictest.bench envs --env lift-lowdim --workers 1 2
    python -m mimictest.bench train --config dp-pusht-image-small --lerobot Datasets/lerobot_pusht
    python -m mimictest.bench decode Datasets/lerobot_pusht

Training steps run the real path: uint8 batches from a DataLoader through the prefetcher, the
device-side preprocessor, the policy's loss, backward and AdamW. Batches are synthetic, with the
configuration's exact shapes, so no dataset is needed; ``--lerobot PATH`` reads a LeRobotDataset
folder instead (its videos decoded once into RAM, as the scripts do) and reports the decode rate
beside the data-wait fraction. ``decode`` times the video decoders on such a folder. ``--vs-lerobot`` also times LeRobot 0.6.1
on the same shapes through ``shared/peers/lerobot`` (installed in its own venv by its setup.sh)
and prints ours / LeRobot from the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable

import numpy as np
import torch
import torchvision  # noqa: F401  (before dm_control's EGL context: importing it afterwards segfaults)
from torch.utils.data import DataLoader, Dataset, default_collate

from mimictest.atomic import write_text
from mimictest.cpu import configure_cpu
from mimictest.data.prefetcher import Prefetcher, endless, map_tensors
from mimictest.precision import cpu_description, cpu_measurement
from mimictest.preprocess import ActionSpace, Preprocessor


@dataclass(frozen=True)
class BenchConfig:
    """Shapes and network of one policy x benchmark configuration."""

    policy: str  # "diffusion-unet" | "diffusion-transformer" | "act" | "rt1" | "florence-linear" | "florence-dit" | "florence-flow"
    cams: tuple[str, ...]
    image: tuple[int, int] | None
    crop: tuple[int, int] | None
    low_dim: int
    env_action: int
    rotation: str | None
    obs_horizon: int
    chunk: int
    batch: int
    net: dict = field(default_factory=dict)


RT1_LIFT_NET = {"efficientnet": "efficientnet_b0", "token_dim": 256, "d_model": 256, "nhead": 4, "num_layers": 4,
                "dim_feedforward": 1024}
CONFIGS: dict[str, BenchConfig] = {
    # Diffusion Policy's PushT image configuration (Chi et al. 2023), the LeRobot comparison point.
    "dp-pusht-image": BenchConfig("diffusion-unet", ("image",), (96, 96), (84, 84), 2, 2, None, 2, 16, 32,
                                  {"down_dims": (512, 1024, 2048)}),
    # Script/DiffusionUNetImagePushT.py: the same inputs with the small CPU-sized UNet.
    "dp-pusht-image-small": BenchConfig("diffusion-unet", ("image",), (96, 96), (84, 84), 2, 2, None, 2, 16, 32,
                                        {"down_dims": (64, 128, 256)}),
    "dpt-pusht-image": BenchConfig("diffusion-transformer", ("image",), (96, 96), (84, 84), 2, 2, None, 2, 16, 64, {}),
    # The quickstart: Script/DiffusionUNetLowdimLift.py.
    "dp-lift-lowdim": BenchConfig("diffusion-unet", (), None, None, 19, 7, "axis_angle", 2, 16, 256,
                                  {"down_dims": (64, 128, 256)}),
    "dp-lift-image": BenchConfig("diffusion-unet", ("agentview_image", "robot0_eye_in_hand_image"), (84, 84), (76, 76), 9, 7, "axis_angle", 2, 16, 64,
                                 {"down_dims": (256, 512, 1024)}),
    # Script/DiffusionUNetImageMetaWorldMT10.py without its instruction embedding: corner camera + hand.
    "dp-metaworld-image": BenchConfig("diffusion-unet", ("corner",), (84, 84), (76, 76), 4, 4, None, 2, 16, 32,
                                      {"down_dims": (128, 256, 512)}),
    # LeRobot's default ACT configuration (chunk 100, batch 8) on ALOHA's 14-d joints, one 480x640 camera;
    # ACT's (and LeRobot's) ResNet-18 has frozen BatchNorm.
    "act-aloha": BenchConfig("act", ("top",), (480, 640), None, 14, 14, None, 1, 100, 8, {"backbone_norm": "frozen_batch"}),
    # Script/ACTImageTransferCube.py: the CPU-sized ACT (120x160 top camera, d_model 256).
    "act-aloha-small": BenchConfig("act", ("top",), (120, 160), None, 14, 14, None, 1, 100, 8,
                                   {"d_model": 256, "dim_feedforward": 1024}),
    # RT-1 at the paper's size (Brohan et al. 2022): one 300x300 camera, 6 frames, EfficientNet-B3, 8 tokens per
    # image, 8 layers of width 512 with 8 heads and 512-wide feed-forward, 256 bins for each of 11 action dims, batch 32
    # (FiLM off: no instruction).
    "rt1-paper": BenchConfig("rt1", ("image",), (300, 300), None, 0, 11, None, 6, 1, 32,
                             {"efficientnet": "efficientnet_b3", "dim_feedforward": 512, "bins": 256}),
    # Script/RT1ImageLift.py: the CPU-sized RT-1 (EfficientNet-B0, 1 frame, 4 layers of width 256), continuous chunks,
    # and the same network with RT-1's 256-bin head.
    "rt1-lift-image": BenchConfig("rt1", ("agentview_image", "robot0_eye_in_hand_image"), (84, 84), (76, 76), 9, 7,
                                  "axis_angle", 1, 16, 32, RT1_LIFT_NET),
    "rt1-lift-image-discrete": BenchConfig("rt1", ("agentview_image", "robot0_eye_in_hand_image"), (84, 84), (76, 76), 9,
                                           7, "axis_angle", 1, 16, 32, {**RT1_LIFT_NET, "bins": 256}),
    # Florence-2-base's shape (random weights: no download) on robomimic Square's inputs, each head as its script
    # (Script/Florence{Linear,DiT,Flow}ImageSquare.py, DaViT frozen), and the CPU-sized from-scratch Lift scripts'
    # "small" Florence-2 (Script/Florence{DiT,Flow}ImageLift.py: 1 observation step, DaViT trained).
    **{f"florence-{head}-square-base": BenchConfig(f"florence-{head}", ("agentview_image", "robot0_eye_in_hand_image"),
                                                   (84, 84), (76, 76), 9, 7, "axis_angle", 2, 16, 64,
                                                   {"florence": "base", "freeze_vision_tower": True})
       for head in ("linear", "dit", "flow")},
    **{f"florence-{head}-lift-small": BenchConfig(f"florence-{head}", ("agentview_image", "robot0_eye_in_hand_image"),
                                                  (84, 84), (76, 76), 9, 7, "axis_angle", 1, 16, 32,
                                                  {"florence": "small", "freeze_vision_tower": False})
       for head in ("dit", "flow")},
}


def build_policy(cfg: BenchConfig, action_range: tuple[list[float], list[float]] | None = None
                 ) -> tuple[torch.nn.Module, Preprocessor]:
    """The policy and preprocessor of a configuration: unit statistics, or env actions over ``action_range``."""
    action_space = ActionSpace(cfg.rotation, "absolute", env_dim=cfg.env_action)
    low, high = action_range or ([-1.0] * cfg.env_action, [1.0] * cfg.env_action)
    stats = {"action": {"min": list(low), "max": list(high)}}
    if cfg.low_dim:
        stats["low_dim"] = {"min": [-1.0] * cfg.low_dim, "max": [1.0] * cfg.low_dim}
    preprocess = Preprocessor(stats, action_space, cfg.cams, image_size=cfg.image, crop_size=cfg.crop)
    A = action_space.model_dim
    if cfg.policy.startswith("diffusion"):
        from mimictest.nets.obs_encoder import ObsEncoder
        from mimictest.policies.diffusion import DiffusionPolicy

        encoder = ObsEncoder(cfg.cams, low_dim_dim=cfg.low_dim)
        if cfg.policy == "diffusion-unet":
            from mimictest.nets.unet1d import ConditionalUnet1D

            net = ConditionalUnet1D(A, encoder.out_dim, cfg.obs_horizon, **cfg.net)
        else:
            from mimictest.nets.transformer import DiffusionTransformer

            net = DiffusionTransformer(A, chunk_size=cfg.chunk, n_obs_steps=cfg.obs_horizon, cond_dim=encoder.out_dim, **cfg.net)
        return DiffusionPolicy(encoder, net, A, cfg.chunk), preprocess
    if cfg.policy == "act":
        from mimictest.nets.act import ACT
        from mimictest.policies.act import ACTPolicy

        return ACTPolicy(ACT(cams=cfg.cams, low_dim_dim=cfg.low_dim, action_dim=A, chunk_size=cfg.chunk, **cfg.net)), preprocess
    if cfg.policy == "rt1":
        from mimictest.nets.rt1 import RT1
        from mimictest.policies.regression import RegressionPolicy

        net = RT1(A, cfg.chunk, cfg.obs_horizon, cfg.cams, low_dim_dim=cfg.low_dim, **cfg.net)
        return RegressionPolicy(net, loss="l1" if net.bins is None else "ce"), preprocess
    if cfg.policy.startswith("florence"):
        return florence_policy(cfg, A), preprocess
    raise ValueError(f"unknown policy {cfg.policy!r}")


def florence_policy(cfg: BenchConfig, action_dim: int) -> torch.nn.Module:
    """A Florence-2 head as its scripts build it: L1 regression, DiT with 64 queries and DDIM 10, or flow with 10 Euler steps."""
    from mimictest.nets.florence import FlorenceBackbone, load_florence

    florence, _, _ = load_florence(None, cfg.net["florence"])
    backbone = FlorenceBackbone(florence, cfg.cams, low_dim_dim=cfg.low_dim, freeze_vision_tower=cfg.net["freeze_vision_tower"])
    if cfg.policy == "florence-linear":
        from mimictest.nets.florence import FlorenceLinear
        from mimictest.policies.regression import RegressionPolicy

        return RegressionPolicy(FlorenceLinear(backbone, action_dim, cfg.chunk), loss="l1")
    if cfg.policy == "florence-dit":
        from mimictest.nets.dit import DiT
        from mimictest.nets.florence import FlorenceQueryEncoder
        from mimictest.policies.diffusion import DiffusionPolicy

        queries = FlorenceQueryEncoder(backbone, num_queries=64)
        dit = DiT(action_dim, cfg.chunk, queries.num_tokens, queries.out_dim)
        return DiffusionPolicy(queries, dit, action_dim, cfg.chunk, sampler="ddim", num_inference_steps=10, num_train_timesteps=10)
    from mimictest.nets.florence import FlorenceActionExpert
    from mimictest.policies.flow import FlowMatchingPolicy

    return FlowMatchingPolicy(FlorenceActionExpert(backbone, action_dim, cfg.chunk), action_dim, cfg.chunk, num_flow_steps=10)


class SyntheticWindows(Dataset):
    """Random uint8 images / float vectors with a configuration's item shapes (as a reader yields them)."""

    def __init__(self, cfg: BenchConfig, length: int = 4096) -> None:
        self.cfg, self.length = cfg, length
        rng = np.random.default_rng(0)
        self.pool = rng.integers(0, 256, (16, len(cfg.cams), *cfg.image, 3), dtype=np.uint8) if cfg.cams else None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        c, rng = self.cfg, np.random.default_rng(i)
        item = {"action": rng.uniform(-1, 1, (c.chunk, c.env_action)).astype(np.float32),
                "is_pad": np.zeros(c.chunk, dtype=bool)}
        if c.rotation == "axis_angle":
            item["action"][:, 3:6] *= 3.0  # rotation vectors up to ~pi
        if c.low_dim:
            item["low_dim"] = rng.uniform(-1, 1, (c.obs_horizon, c.low_dim)).astype(np.float32)
        if c.cams:
            images = self.pool[(i + np.arange(c.obs_horizon)) % len(self.pool)]  # (T_obs, cams, H, W, 3)
            item["rgb"] = {cam: images[:, k] for k, cam in enumerate(c.cams)}  # {cam: (T_obs, H, W, 3)}
        return item


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(cfg: BenchConfig, device: torch.device, bf16: bool, steps: int, warmup: int,
                  compile_: bool = False, channels_last: bool = False, workers: int = 2,
                  dataset: Dataset | None = None, profile: bool = False) -> dict:
    """Median seconds per optimizer step (data, preprocessing, loss, backward, AdamW) and more.

    ``dataset``: real windows with the configuration's shapes (and ``stats``) instead of synthetic ones.
    ``profile``: also the step's split into phases and modules, and its GEMM rate (``step_profile``)."""
    torch.manual_seed(0)
    if device.type == "cpu":
        configure_cpu()  # as train() does
    action_range = (dataset.stats["action"]["min"], dataset.stats["action"]["max"]) if dataset is not None else None
    policy, preprocess = build_policy(cfg, action_range)
    policy.to(device).train()
    preprocess.to(device)
    if channels_last:
        policy.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4, weight_decay=1e-6, fused=True)  # as train.py
    model = torch.compile(policy) if compile_ else policy
    loader = DataLoader(dataset if dataset is not None else SyntheticWindows(cfg), batch_size=cfg.batch, shuffle=True, drop_last=True,
                        num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    batches = Prefetcher(endless(loader), device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    times, waits = [], []
    phases = {name: 0.0 for name in PHASES}
    prof = (torch.profiler.profile(with_flops=True, record_shapes=True) if profile else contextlib.nullcontext())
    hooks = _module_ranges(policy) if profile else []
    for i in range(warmup + steps):
        if i == warmup:
            prof.__enter__()
        marks = [time.perf_counter()]
        batch = preprocess(next(batches), train=True)
        _sync(device)
        marks.append(time.perf_counter())
        with autocast:
            loss = model(batch)["total_loss"]
        _sync(device)
        marks.append(time.perf_counter())
        loss.backward()
        _sync(device)
        marks.append(time.perf_counter())
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        marks.append(time.perf_counter())
        if i >= warmup:
            times.append(marks[-1] - marks[0])
            waits.append(batches.pop_wait())
            for name, a, b in zip(PHASES, marks, marks[1:]):
                phases[name] += b - a
        else:
            batches.pop_wait()
    median = statistics.median(times)
    result = {"s_per_step": median, "samples_per_s": cfg.batch / median,
              "data_wait_frac": sum(waits) / sum(times), "peak_mem_mb": _peak_memory_mb(device),
              "params_M": sum(p.numel() for p in policy.parameters()) / 1e6, "final_loss": loss.item()}
    if profile:
        prof.__exit__(None, None, None)
        for hook in hooks:
            hook.remove()
        result["profile"] = step_profile(prof, phases, sum(times), steps)
    return result


PHASES = ("data + preprocess", "forward", "backward", "optimizer")
_GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::convolution", "aten::_convolution",
             "aten::mkldnn_convolution", "aten::convolution_backward")


def _module_ranges(policy: torch.nn.Module) -> list:
    """Name each direct child's (and grandchild's) forward in the profile: ``module: obs_encoder.rgb``.

    A ``ModuleList`` or ``ModuleDict`` has no forward of its own, so its members are timed under its
    name (``net.blocks`` sums the transformer's blocks).
    """
    containers = (torch.nn.ModuleList, torch.nn.ModuleDict)

    def labelled(parent: torch.nn.Module, prefix: str, depth: int):
        for name, child in parent.named_children():
            if isinstance(child, containers):
                yield from ((prefix + name, member) for member in child.children())
            else:
                yield prefix + name, child
                if depth < 1:
                    yield from labelled(child, f"{prefix}{name}.", depth + 1)

    handles = []
    for name, module in labelled(policy, "", 0):
        ranges: list = []

        def enter(_m, _args, label=f"module: {name}", ranges=ranges):
            ranges.append(torch.profiler.record_function(label))
            ranges[-1].__enter__()

        def leave(_m, _args, _out, ranges=ranges):
            ranges.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


def step_profile(prof, phases: dict[str, float], total: float, steps: int) -> dict:
    """Where a training step's time goes: phases, forward time per module, the top ops, and the GEMM rate.

    The GEMM rate is the FLOPs the profiler counts for matmul and convolution ops over their own time,
    beside this CPU's 1024^3 fp32 matmul rate (``precision.measure_cpu``) as the reachable ceiling.
    """
    events = prof.key_averages()
    per_step = 1e3 * steps  # profiler microseconds over all steps -> ms per step
    modules = sorted(((e.key.removeprefix("module: "), e.cpu_time_total / per_step) for e in events
                      if e.key.startswith("module: ")), key=lambda kv: -kv[1])
    ops = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total)
    gemm = [e for e in events if e.key in _GEMM_OPS]
    gemm_us, gemm_flops = sum(e.self_cpu_time_total for e in gemm), sum(e.flops for e in gemm)
    return {"phases_ms": {k: 1e3 * v / steps for k, v in phases.items()}, "step_ms": 1e3 * total / steps,
            "forward_modules_ms": dict(modules[:12]),
            "top_ops_ms": {e.key: e.self_cpu_time_total / per_step for e in ops[:10]},
            "gemm_ms": gemm_us / per_step, "gemm_gflops": gemm_flops / max(gemm_us, 1) / 1e3,
            "fp32_matmul_gflops": cpu_measurement()["fp32_gflops"]}


def print_profile(name: str, precision: str, p: dict) -> None:
    """The tables of ``step_profile``."""
    step = p["step_ms"]
    print(f"\n{name} {precision}: {step:.0f} ms per step")
    print(_table([{"part": k, "ms": v, "share": v / step} for k, v in p["phases_ms"].items()],
                 [("part", "phase", "s"), ("ms", "ms/step", ".0f"), ("share", "share", ".0%")]))
    print(_table([{"part": k, "ms": v, "share": v / step} for k, v in p["forward_modules_ms"].items()],
                 [("part", "module (forward only)", "s"), ("ms", "ms/step", ".0f"), ("share", "of step", ".0%")]))
    print(_table([{"part": k, "ms": v, "share": v / step} for k, v in p["top_ops_ms"].items()],
                 [("part", "op (forward + backward)", "s"), ("ms", "self ms/step", ".0f"), ("share", "of step", ".0%")]))
    print(f"matmul + convolution: {p['gemm_ms']:.0f} ms/step ({p['gemm_ms'] / step:.0%}), {p['gemm_gflops']:.1f} GFLOP/s "
          f"where counted, against {p['fp32_matmul_gflops']:.1f} GFLOP/s for a 1024^3 fp32 matmul on this CPU")


_PEERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "peers")  # beside the checkout


def lerobot_python() -> str | None:
    """The LeRobot venv's python from ``shared/peers/lerobot/setup.sh`` (installs it on first use)."""
    setup = os.path.join(_PEERS, "lerobot", "setup.sh")
    if not os.path.isfile(setup):
        return None
    out = subprocess.run(["bash", setup], capture_output=True, text=True)
    if out.returncode != 0:
        print(f"LeRobot peer unavailable: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return out.stdout.strip().splitlines()[-1]


def time_lerobot(python: str, cfg: BenchConfig, device: torch.device, bf16: bool, steps: int, warmup: int,
                 fused: bool = False) -> dict:
    """Run the peer's bench_train.py on the same shapes (height and width); its JSON line.

    ``fused``: LeRobot with fused AdamW, a one-flag tuning that is not its default (ours is fused)."""
    script = os.path.join(_PEERS, "lerobot", "bench_train.py")
    args = [python, script, "--policy", "diffusion" if cfg.policy.startswith("diffusion") else "act",
            "--cams", str(len(cfg.cams)), "--state-dim", str(cfg.low_dim), "--action-dim", str(cfg.env_action),
            "--n-obs", str(cfg.obs_horizon), "--horizon", str(cfg.chunk), "--batch", str(cfg.batch),
            "--steps", str(steps), "--warmup", str(warmup), "--device", device.type]
    if cfg.image:
        args += ["--image", str(cfg.image[0]), "--image-width", str(cfg.image[1])]
    if cfg.crop:
        args += ["--crop", str(cfg.crop[0])]
    if "down_dims" in cfg.net:
        args += ["--down-dims", *map(str, cfg.net["down_dims"])]
    if bf16:
        args.append("--amp")
    if fused:
        args.append("--fused")
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    out = subprocess.run(args, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"LeRobot benchmark failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table; ``columns`` are (key, header, format)."""
    cells = [[h for _, h, _ in columns]] + [[format(r[k], f) if k in r and r[k] is not None else "-" for k, _, f in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def lerobot_windows(path: str, cfg: BenchConfig) -> tuple[Dataset, dict]:
    """A LeRobotDataset with the configuration's cameras, horizons and image size, and its decode rate."""
    from mimictest.data.lerobot import LeRobotDataset

    dataset = LeRobotDataset(path, cfg.obs_horizon, cfg.chunk, cams=list(cfg.cams), image_size=cfg.image)
    if (dataset.low_dim_dim, dataset.action.shape[1]) != (cfg.low_dim, cfg.env_action):
        raise SystemExit(f"{path!r} has {dataset.low_dim_dim}-d state and {dataset.action.shape[1]}-d actions, but the "
                         f"configuration expects {cfg.low_dim} and {cfg.env_action}; choose a matching --config")
    return dataset, {"decode_fps": dataset.decoded_frames / dataset.decode_seconds, "frames": dataset.decoded_frames}


def machine_line(device: torch.device) -> str:
    """What the timings ran on: the CPU model, its matmul-relevant flags, threads, torch (and the GPU)."""
    line = f"{cpu_description()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    return line + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")


def cmd_train(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    print(machine_line(device), flush=True)
    rows = []
    for name in args.config:
        cfg = CONFIGS[name] if args.batch is None else replace(CONFIGS[name], batch=args.batch)
        dataset, decoding = lerobot_windows(args.lerobot, cfg) if args.lerobot else (None, {})
        for precision in (["fp32", "bf16"] if args.precision == "both" else [args.precision]):
            result = time_training(cfg, device, precision == "bf16", args.steps, args.warmup, args.compile,
                                   args.channels_last, args.workers, dataset, args.profile)
            rows.append({"who": "mimictest", "config": name, "device": device.type, "precision": precision,
                         "batch": cfg.batch, "data": "lerobot" if dataset is not None else "synthetic", **decoding,
                         **result})
            print(_table(rows[-1:], TRAIN_COLUMNS).splitlines()[-1] if len(rows) > 1 else _table(rows, TRAIN_COLUMNS), flush=True)
            if args.profile:
                print_profile(name, precision, result["profile"])
    if args.vs_lerobot:
        python = lerobot_python()
        if python is None:
            raise SystemExit("--vs-lerobot: shared/peers/lerobot/setup.sh is missing or failed; see its message")
        for name in args.config:
            cfg = CONFIGS[name] if args.batch is None else replace(CONFIGS[name], batch=args.batch)
            for precision in (["fp32", "bf16"] if args.precision == "both" else [args.precision]):
                for who, fused in (("lerobot-0.6.1", False), ("lerobot-0.6.1+fused", True)):
                    peer = time_lerobot(python, cfg, device, precision == "bf16", args.steps, args.warmup, fused)
                    rows.append({"who": who, "config": name, "device": device.type, "precision": precision,
                                 "batch": cfg.batch, "s_per_step": peer["s_per_step_median"],
                                 "samples_per_s": peer["samples_per_s"], "params_M": peer["params_M"],
                                 "final_loss": peer["final_loss"]})
                    print(_table(rows[-1:], TRAIN_COLUMNS).splitlines()[-1], flush=True)
    print("\n" + machine_line(device) + "\n" + _table(rows, TRAIN_COLUMNS))
    if args.vs_lerobot:
        for line in speedups(rows):
            print(line)
    return rows


def speedups(rows: list[dict]) -> list[str]:
    """Ours over each LeRobot row at equal precision, and the best precision of each side."""
    lines = []
    for name in dict.fromkeys(r["config"] for r in rows):
        mine = {r["precision"]: r for r in rows if r["config"] == name and r["who"] == "mimictest"}
        peers = [r for r in rows if r["config"] == name and r["who"] != "mimictest"]
        for peer in peers:
            if peer["precision"] in mine:
                ratio = mine[peer["precision"]]["samples_per_s"] / peer["samples_per_s"]
                lines.append(f"{name} {peer['precision']}: mimictest / {peer['who']} = {ratio:.2f}x")
        for who in dict.fromkeys(p["who"] for p in peers):
            ours = max(mine.values(), key=lambda r: r["samples_per_s"])
            theirs = max((p for p in peers if p["who"] == who), key=lambda r: r["samples_per_s"])
            lines.append(f"{name} best of each: mimictest {ours['precision']} {ours['samples_per_s']:.2f} samples/s / "
                         f"{who} {theirs['precision']} {theirs['samples_per_s']:.2f} = "
                         f"{ours['samples_per_s'] / theirs['samples_per_s']:.2f}x")
    return lines


TRAIN_COLUMNS = [("who", "who", "s"), ("config", "config", "s"), ("device", "device", "s"), ("precision", "precision", "s"),
                 ("batch", "batch", "d"), ("params_M", "params (M)", ".1f"), ("s_per_step", "s/step", ".3f"),
                 ("samples_per_s", "samples/s", ".1f"), ("data_wait_frac", "data wait", ".1%"),
                 ("peak_mem_mb", "peak mem (MiB)", ".0f"), ("data", "data", "s"),
                 ("decode_fps", "decode frames/s", ".0f")]


def cmd_decode(args: argparse.Namespace) -> list[dict]:
    """Frames/s of each way to decode a LeRobot folder's first video, best of ``--repeats``: the whole file in order
    (the reader's RAM cache), and random windows of ``obs_horizon`` frames with a seek each (what decoding per sample
    costs, LeRobot's way), with PyAV and with torchcodec where it is installed."""
    import av
    from av.video.reformatter import VideoReformatter

    from mimictest.data.lerobot import decode_video_rows, read_info

    info = read_info(args.path)
    keys = [k for k, f in info["features"].items() if f.get("dtype") == "video"]
    if not keys:
        raise SystemExit(f"{args.path!r} has no video feature")
    path = os.path.join(args.path, info["video_path"].format(video_key=keys[0], chunk_index=0, file_index=0,
                                                             episode_chunk=0, episode_index=0))  # v3.0 or v2.1
    with av.open(path) as container:
        stream = container.streams.video[0]
        times = np.array([float(f.time) for f in container.decode(stream)])  # (F,) every frame's time
        size = (stream.codec_context.height, stream.codec_context.width)
    starts = np.random.default_rng(0).integers(0, len(times) - args.obs_horizon, args.windows)  # (windows,)
    window_frames = args.windows * args.obs_horizon

    def pyav_sequential() -> None:
        out = np.empty((len(times), *size, 3), dtype=np.uint8)  # (F, H, W, 3)
        decode_video_rows(path, times, None, out, np.arange(len(times)), path)

    def pyav_windows() -> None:
        reformatter = VideoReformatter()
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for s in starts:  # seek to the keyframe before the window, decode up to its last frame
                container.seek(int(times[s] / stream.time_base), stream=stream, backward=True, any_frame=False)
                for frame in container.decode(stream):
                    if float(frame.time) >= times[s] - 1e-4:
                        reformatter.reformat(frame, format="rgb24").to_ndarray()
                    if float(frame.time) >= times[s + args.obs_horizon - 1] - 1e-4:
                        break

    cases = [(f"pyav {av.__version__}", "sequential (the reader)", len(times), pyav_sequential),
             (f"pyav {av.__version__}", f"random windows of {args.obs_horizon}", window_frames, pyav_windows)]
    try:
        import torchcodec
        from torchcodec.decoders import VideoDecoder

        def torchcodec_sequential() -> None:
            decoder = VideoDecoder(path, device="cpu")
            for lo in range(0, len(decoder), 256):
                decoder.get_frames_in_range(lo, min(lo + 256, len(decoder)))  # (n, 3, H, W) uint8

        def torchcodec_windows() -> None:
            decoder = VideoDecoder(path, device="cpu")  # LeRobot's default: frames played at the window's times
            for s in starts:
                decoder.get_frames_played_at([float(t) for t in times[s:s + args.obs_horizon]])

        name = f"torchcodec {torchcodec.__version__}"
        cases += [(name, "sequential", len(times), torchcodec_sequential),
                  (name, f"random windows of {args.obs_horizon}", window_frames, torchcodec_windows)]
    except (ImportError, RuntimeError) as err:  # torchcodec needs FFmpeg's shared libraries on the system
        print(f"torchcodec unavailable ({str(err).splitlines()[0]})")
    rows = []
    for decoder, access, frames, run in cases:
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - start)
        rows.append({"decoder": decoder, "access": access, "frames": frames, "frames_per_s": frames / min(seconds)})
        print(_table(rows[-1:], DECODE_COLUMNS).splitlines()[-1] if len(rows) > 1 else _table(rows, DECODE_COLUMNS),
              flush=True)
    print(f"\n{path} ({size[0]}x{size[1]}, {info['features'][keys[0]].get('info', {}).get('video.codec', '?')}):\n"
          + _table(rows, DECODE_COLUMNS))
    return rows


DECODE_COLUMNS = [("decoder", "decoder", "s"), ("access", "access", "s"), ("frames", "frames", "d"),
                  ("frames_per_s", "frames/s", ".0f")]


def cmd_infer(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    rows = []
    for name in args.config:
        cfg = CONFIGS[name]
        policy, preprocess = build_policy(cfg)
        policy.to(device).eval()
        if args.channels_last:
            policy.to(memory_format=torch.channels_last)
        preprocess.to(device)
        samplers = [("ddpm", 100), ("ddim", 10)] if cfg.policy.startswith("diffusion") else [("single pass", 1)]
        samplers = FLORENCE_SAMPLERS.get(cfg.policy, samplers)
        for sampler, steps in samplers:
            if cfg.policy.startswith("diffusion"):
                policy = policy.with_sampler(sampler, steps).to(device).eval()
            if cfg.policy == "florence-flow":  # the observation prefix once per chunk, or again at every Euler step
                policy.cache_prefix = sampler == "euler, cached prefix"
            for batch_size in sorted({1, args.envs}):  # --envs 1: batch 1 once
                data = SyntheticWindows(cfg, length=batch_size)
                items = [data[i] for i in range(batch_size)]
                raw = map_tensors(default_collate([{k: it[k] for k in ("rgb", "low_dim") if k in it} for it in items]),
                                  lambda t: t.to(device))
                for precision in (["fp32", "bf16"] if args.precision == "both" else [args.precision]):
                    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
                    times = []
                    with torch.no_grad(), autocast:  # one context for all chunks, as in evaluation: weights cast once
                        for i in range(args.warmup + args.repeats):
                            _sync(device)
                            start = time.perf_counter()
                            preprocess.unnormalize_action(policy.predict(preprocess(raw, train=False)).float())
                            _sync(device)
                            if i >= args.warmup:
                                times.append(time.perf_counter() - start)
                    rows.append({"config": name, "sampler": sampler, "steps": steps, "batch": batch_size,
                                 "precision": precision, "ms_per_chunk": 1e3 * statistics.median(times)})
                    print(_table(rows[-1:], INFER_COLUMNS).splitlines()[-1] if len(rows) > 1 else _table(rows, INFER_COLUMNS), flush=True)
    print("\n" + _table(rows, INFER_COLUMNS))
    return rows


FLORENCE_SAMPLERS = {"florence-dit": [("ddim", 10)],
                     "florence-flow": [("euler, cached prefix", 10), ("euler, prefix per step", 10)]}
INFER_COLUMNS = [("config", "config", "s"), ("sampler", "sampler", "s"), ("steps", "steps", "d"), ("batch", "batch", "d"),
                 ("precision", "precision", "s"), ("ms_per_chunk", "ms/chunk", ".1f")]


def _env_factory(name: str) -> tuple[Callable, BenchConfig, tuple[list[float], list[float]]]:
    """``make_env(render_video=...)``, the matching policy configuration, and a box of sensible env actions.

    Random actions are drawn uniformly from the box, and the policy's [-1, 1] outputs are mapped
    onto the same box, so both modes drive the simulator through similar motions (an untrained
    policy with unit statistics would push robots to their joint limits instead).
    """
    if name.startswith("lift"):
        from mimictest.demos.lift import lift_env_args, LOW_DIM_KEYS, RGB_KEYS
        from mimictest.envs.robosuite import RobosuiteEnv

        image = name == "lift-image"
        keys = ["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"] if image else LOW_DIM_KEYS
        make = partial(RobosuiteEnv, lift_env_args(image), rgb_keys=RGB_KEYS if image else [], low_dim_keys=keys,
                       max_episode_steps=10**9)
        # Absolute targets over the table, the gripper pointing down (axis-angle near (pi, 0, 0)).
        box = ([-0.15, -0.15, 0.85, np.pi - 0.1, -0.1, -0.1, -1.0], [0.15, 0.15, 1.05, np.pi + 0.1, 0.1, 0.1, 1.0])
        return make, CONFIGS["dp-lift-image" if image else "dp-lift-lowdim"], box
    if name == "pusht":
        from mimictest.envs.pusht import PushTEnv

        return (partial(PushTEnv, obs_mode="image", max_episode_steps=10**9), CONFIGS["dp-pusht-image-small"],
                ([0.0] * 2, [512.0] * 2))
    if name.startswith("aloha"):
        from mimictest.envs.aloha import AlohaEnv

        small = name == "aloha-small"
        size = (120, 160) if small else (480, 640)
        return (partial(AlohaEnv, task="transfer_cube", cams=("top",), image_size=size, max_episode_steps=10**9),
                CONFIGS["act-aloha-small" if small else "act-aloha"], ([-0.5] * 14, [0.5] * 14))
    if name == "metaworld":
        from mimictest.envs.metaworld import MetaWorldEnv

        return (partial(MetaWorldEnv, "drawer-open-v3", cams=("corner",), image_size=(84, 84), max_episode_steps=10**9),
                CONFIGS["dp-metaworld-image"], ([-1.0] * 4, [1.0] * 4))
    if name == "calvin":
        from mimictest.envs.calvin import IMAGE_SIZES, CalvinEnv

        # Script/DiffusionUNetImageCalvin.py's networks on both cameras (centre crops of the sizes its
        # resized and cropped images have), CALVIN's relative actions; calvin_env's own seeded starts.
        cfg = BenchConfig("diffusion-unet", ("static", "gripper"), IMAGE_SIZES, {"static": (88, 88), "gripper": (76, 76)},
                          15, 7, None, 2, 16, 32, {"down_dims": (128, 256, 512)})
        return partial(CalvinEnv, tasks=("open_drawer",), max_subtask_steps=10**9), cfg, ([-1.0] * 7, [1.0] * 7)
    raise SystemExit(f"unknown env {name!r}; choose from lift-lowdim, lift-image, pusht, aloha, aloha-small, metaworld, calvin")


def cmd_envs(args: argparse.Namespace) -> list[dict]:
    from mimictest.envs.vector import ScheduledEnv, make_vec_env, unflatten
    from mimictest.evaluate import Predictor, new_history, push_history

    make_env, cfg, (low, high) = _env_factory(args.env)
    device = torch.device(args.device)
    policy, preprocess = build_policy(cfg, action_range=(low, high))
    if cfg.policy.startswith("diffusion"):
        policy = policy.with_sampler("ddim", 10)  # the CPU scripts' sampler
    policy.to(device).eval()
    if args.channels_last:
        policy.to(memory_format=torch.channels_last)
    preprocess.to(device)
    predictor = Predictor(policy, preprocess, device, bf16=args.precision == "bf16")
    # Executed actions per chunk: Diffusion Policy's 8, or ACT's whole chunk (plain chunking, no ensembling).
    default_exec = 8 if cfg.policy.startswith("diffusion") else cfg.chunk
    exec_steps = max(1, min(args.exec or default_exec, cfg.chunk - cfg.obs_horizon + 1))
    rows = []
    for workers in args.workers:
        # One endless episode per worker, seeded 0, 1, ...
        fns = [partial(ScheduledEnv, [partial(make_env, render_video=False)], [(0, i)]) for i in range(workers)]
        venv = make_vec_env(fns, subprocess=workers > 1)
        rng = np.random.default_rng(0)
        for mode in ("simulator alone", "policy in the loop"):
            venv.env_method("rewind")
            obs = unflatten(venv.reset())
            history = new_history(obs, cfg.obs_horizon)
            queue: list[np.ndarray] = []
            start, steps, policy_s = time.perf_counter(), 0, 0.0
            with predictor.autocast():  # one context for the whole loop, as in evaluation
                while steps < args.steps or time.perf_counter() - start < args.min_seconds:
                    if mode == "simulator alone":
                        actions = rng.uniform(low, high, (workers, len(low)))
                    else:
                        if not queue:
                            chunk_start = time.perf_counter()
                            chunk = predictor.chunk(history)[:, cfg.obs_horizon - 1:][:, :exec_steps]  # (n, exec, model_dim)
                            policy_s += time.perf_counter() - chunk_start
                            queue = list(predictor.to_env(chunk).transpose(1, 0, 2))  # exec x (n, env_dim)
                        actions = queue.pop(0)
                    obs, _, _, _ = venv.step(actions)
                    push_history(history, unflatten(obs))
                    steps += 1
            elapsed = time.perf_counter() - start
            row = {"env": args.env, "workers": workers, "mode": mode, "env_steps_per_s": steps * workers / elapsed}
            if mode == "policy in the loop":
                alone = rows[-1]["env_steps_per_s"]
                # The policy's own compute vs. everything else: stepping at the simulator-alone rate
                # outside the policy's time means no overhead from the loop or the transfers.
                row.update(exec=exec_steps, precision=args.precision, vs_alone=row["env_steps_per_s"] / alone,
                           policy_frac=policy_s / elapsed,
                           vs_alone_outside_policy=steps * workers / (elapsed - policy_s) / alone)
            rows.append(row)
            print(_table(rows[-1:], ENV_COLUMNS).splitlines()[-1] if len(rows) > 1 else _table(rows, ENV_COLUMNS), flush=True)
        venv.close()
    print("\n" + _table(rows, ENV_COLUMNS))
    return rows


ENV_COLUMNS = [("env", "env", "s"), ("workers", "workers", "d"), ("mode", "mode", "s"), ("exec", "actions/chunk", "d"),
               ("precision", "precision", "s"), ("env_steps_per_s", "env steps/s", ".1f"), ("vs_alone", "vs alone", ".0%"),
               ("policy_frac", "policy compute", ".0%"), ("vs_alone_outside_policy", "vs alone, outside policy compute", ".0%")]


def _commit() -> str:
    """The checkout's commit, with ``+changes`` when its tracked files differ from it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = partial(subprocess.run, cwd=root, capture_output=True, text=True)
    head = run(["git", "rev-parse", "--short", "HEAD"]).stdout.strip()
    if not head:
        return "unknown (not a git checkout)"
    return head + ("+changes" if run(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip() else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mimictest.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    sub = parser.add_subparsers(dest="cmd", required=True)
    train = sub.add_parser("train", help="training throughput")
    train.add_argument("--config", nargs="+", default=["dp-pusht-image"], choices=sorted(CONFIGS))
    train.add_argument("--batch", type=int, help="override the configuration's batch size")
    train.add_argument("--precision", default="both", choices=["fp32", "bf16", "both"])
    train.add_argument("--steps", type=int, default=10)
    train.add_argument("--warmup", type=int, default=3)
    train.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    train.add_argument("--compile", action="store_true")
    train.add_argument("--channels-last", action="store_true")
    train.add_argument("--vs-lerobot", action="store_true",
                       help="also time LeRobot 0.6.1 on the same shapes, as it ships and with fused AdamW")
    train.add_argument("--profile", action="store_true",
                       help="also where each step's time goes: phases, modules, top ops, GEMM rate (adds overhead)")
    train.add_argument("--lerobot", metavar="PATH", help="train on this LeRobotDataset folder instead of synthetic data")
    decode = sub.add_parser("decode", help="video decode rate of a LeRobotDataset folder, per decoder")
    decode.add_argument("path", help="a LeRobotDataset folder with video features")
    decode.add_argument("--windows", type=int, default=200, help="random windows read with seeking")
    decode.add_argument("--obs-horizon", type=int, default=2, help="frames per seeking read")
    decode.add_argument("--repeats", type=int, default=3, help="timings of each case; the best is reported")
    infer = sub.add_parser("infer", help="latency to produce one action chunk")
    infer.add_argument("--config", nargs="+", default=["dp-pusht-image"], choices=sorted(CONFIGS))
    infer.add_argument("--envs", type=int, default=8, help="the batched size (parallel envs)")
    infer.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "both"])
    infer.add_argument("--repeats", type=int, default=5)
    infer.add_argument("--warmup", type=int, default=1)
    infer.add_argument("--channels-last", action="store_true")
    envs = sub.add_parser("envs", help="environment steps per second vs parallel workers")
    envs.add_argument("--env", default="lift-lowdim")
    envs.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    envs.add_argument("--steps", type=int, default=200, help="vector steps per measurement (at least)")
    envs.add_argument("--min-seconds", type=float, default=5.0)
    envs.add_argument("--exec", type=int, help="actions executed per predicted chunk (default: 8 for Diffusion Policy, "
                      "the whole chunk for ACT)")
    envs.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="the policy's autocast")
    envs.add_argument("--channels-last", action="store_true")
    args = parser.parse_args(argv)
    rows = {"train": cmd_train, "infer": cmd_infer, "envs": cmd_envs, "decode": cmd_decode}[args.cmd](args)
    if args.json:  # rows may hold numpy scalars and paths: default=str
        write_text(args.json, json.dumps({"command": sys.argv, "machine": machine_line(torch.device(args.device)),
                                          "commit": _commit(), "threads": torch.get_num_threads(), "rows": rows},
                                         indent=1, default=str))


if __name__ == "__main__":
    main()
