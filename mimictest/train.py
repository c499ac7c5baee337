"""The one training loop, on Hugging Face accelerate: one CPU, one GPU or many, same code.

Per optimizer step: prefetched batch -> device-side preprocessing -> ``policy(batch)`` (the loss
dict) -> backward -> gradient clipping -> AdamW -> LR warmup -> EMA. Periodically: a log line
(loss, LR, samples/s, fraction of time waiting for data), an evaluation in parallel simulators
with the EMA weights, and an atomic checkpoint. Running the same script again resumes from
``<save_root>/<run_name>/last.pt``; a finished run only re-evaluates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mimictest import checkpoint
from mimictest.cpu import configure_cpu
from mimictest.data.prefetcher import Prefetcher, endless
from mimictest.evaluate import Evaluator, Predictor, format_table, save_results, summarize
from mimictest.policies.ema import EMA
from mimictest.preprocess import Preprocessor


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings. All step counts are optimizer steps.

    Attributes:
        run_name: checkpoints, evaluation results and videos go to ``<save_root>/<run_name>/``.
        batch_size: samples per process per step (global batch = batch_size * processes).
        max_steps: total optimizer steps.
        max_minutes: also stop after this many minutes of training in this launch (evaluations not
            counted), then save and evaluate as at ``max_steps``; ``None`` for no time limit.
        lr, weight_decay, betas: AdamW (Diffusion Policy: 1e-4, 1e-6, (0.95, 0.999)).
        warmup_steps: linear LR warmup, then constant.
        grad_clip: max global gradient norm (``0`` disables).
        ema: evaluate and save an exponential moving average of the weights.
        num_workers: DataLoader worker processes per training process.
        log_every, eval_every, save_every: intervals in steps (``0`` = only at the end).
        bf16: bf16 autocast (CUDA, and CPUs with AMX/AVX512-BF16).
        channels_last: store 4-D (convolution) weights channels-last; with ``bf16`` on this AMX CPU it
            makes the ResNet-18 step 2x faster (``python -m mimictest.bench train --channels-last``).
        compile: ``torch.compile`` the policy's loss computation.
        eval_only: do not train; evaluate the checkpoint ``<run>/last.pt`` (e.g. again with other
            execution settings, such as ACT with and without temporal ensembling).
        profile: record a torch profiler trace of a few steps to ``<run>/profile/``.
        wandb_project: log to Weights & Biases under this project, or ``None`` for stdout only.
        wandb_mode: ``"online"`` or ``"offline"`` (sync later with ``wandb sync``).
        seed: base seed (each process adds its rank).
    """

    run_name: str
    max_steps: int
    max_minutes: float | None = None
    batch_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 1e-6
    betas: tuple[float, float] = (0.95, 0.999)
    warmup_steps: int = 500
    grad_clip: float = 1.0
    ema: bool = True
    num_workers: int = 2
    log_every: int = 100
    eval_every: int = 0
    save_every: int = 1000
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    eval_only: bool = False
    profile: bool = False
    wandb_project: str | None = None
    wandb_mode: str = "offline"
    seed: int = 0
    save_root: str = "Save"


def train(policy: torch.nn.Module, preprocess: Preprocessor, dataset: Dataset, cfg: TrainConfig,
          evaluator: Evaluator | None = None, param_groups: list[dict] | None = None) -> dict | None:
    """Train ``policy`` on ``dataset``, evaluating with ``evaluator``; returns the last evaluation summary.

    ``param_groups`` are AdamW parameter groups for networks that want per-group weight decay
    (Diffusion Policy's transformer); by default every parameter uses ``cfg.weight_decay``.
    """
    accelerator = Accelerator(mixed_precision="bf16" if cfg.bf16 else "no")
    set_seed(cfg.seed + accelerator.process_index)
    device = accelerator.device
    if device.type == "cpu":
        configure_cpu(accelerator.state.num_processes)
    run_dir = os.path.join(cfg.save_root, cfg.run_name)
    ckpt_path = os.path.join(run_dir, "last.pt")
    log = _Logger(accelerator, cfg, run_dir)
    if len(dataset) < cfg.batch_size:
        raise ValueError(f"the dataset has {len(dataset)} samples, fewer than batch_size={cfg.batch_size}; lower BATCH_SIZE")
    if evaluator is not None:
        evaluator.check(getattr(dataset, "task_names", None), instructions=preprocess.lang_dim > 0)
    policy.to(device)
    if cfg.channels_last:
        policy.to(memory_format=torch.channels_last)
    preprocess.to(device)
    if cfg.eval_only:
        return _evaluate_checkpoint(accelerator, evaluator, policy, preprocess, cfg, run_dir, log)

    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=cfg.num_workers > 0)
    loader = accelerator.prepare_data_loader(loader, device_placement=False)
    optimizer = torch.optim.AdamW(param_groups or policy.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                                  fused=True)  # one kernel per step, on CPU too: 10x faster than foreach there
    warmup = max(cfg.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    ema = EMA(policy) if cfg.ema else None

    step = 0
    state = checkpoint.load_resumable(ckpt_path)  # falls back to the previous checkpoint if last.pt is damaged
    if state is not None:
        policy.load_state_dict(state["policy"])
        preprocess.load_state_dict(state["preprocess"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        step = state["step"]
        if accelerator.is_main_process:
            checkpoint.set_rng_state(state["rng"])
        log.print(f"resumed from {ckpt_path} at step {step}/{cfg.max_steps}")

    model, optimizer = accelerator.prepare(policy, optimizer)
    if cfg.compile:
        model = torch.compile(model)
    steps_per_epoch = max(len(loader), 1)
    batches = Prefetcher(endless(loader, start_epoch=step // steps_per_epoch), device)
    samples_per_step = cfg.batch_size * accelerator.num_processes
    log.print(f"{sum(p.numel() for p in policy.parameters()) / 1e6:.2f} M parameters | {len(dataset)} samples | "
              f"{accelerator.num_processes} process(es) on {device.type} | global batch {samples_per_step} | "
              f"{cfg.max_steps} steps")

    summary = None
    profiler = _profiler(run_dir) if cfg.profile and accelerator.is_main_process else contextlib.nullcontext()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", disable=not accelerator.is_main_process)
    window_loss, window_steps, window_start = torch.zeros((), device=device), 0, time.perf_counter()
    deadline = time.perf_counter() + 60 * cfg.max_minutes if cfg.max_minutes else math.inf
    model.train()
    with profiler as prof:
        while step < cfg.max_steps:
            batch = preprocess(next(batches), train=True)
            with accelerator.autocast():
                losses = model(batch)
            accelerator.backward(losses["total_loss"])
            if cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(policy)
            step += 1
            window_loss += losses["total_loss"].detach()
            window_steps += 1
            bar.update(1)
            if prof is not None:
                prof.step()

            time_up = False
            if cfg.max_minutes and step % max(cfg.log_every, 1) == 0:  # every process must agree to stop
                late = torch.tensor(float(time.perf_counter() >= deadline), device=device)
                time_up = accelerator.reduce(late, reduction="sum").item() > 0
            last = step == cfg.max_steps or time_up
            if last and step < cfg.max_steps:
                log.print(f"stopping at step {step}: max_minutes={cfg.max_minutes} of training reached")
            if _due(step, cfg.log_every, last):
                elapsed = time.perf_counter() - window_start
                loss = accelerator.reduce(window_loss, reduction="mean").item() / window_steps
                if not math.isfinite(loss):
                    raise FloatingPointError(f"the training loss is {loss} at step {step}; lower LR or check the data")
                wait = batches.pop_wait()
                log.metrics(step, {"loss": loss, "lr": scheduler.get_last_lr()[0],
                                   "samples_per_s": samples_per_step * window_steps / elapsed,
                                   "data_wait_frac": wait / elapsed})
                bar.set_postfix(loss=f"{loss:.4f}")
                window_loss.zero_()
                window_steps, window_start = 0, time.perf_counter()
            if _due(step, cfg.save_every, last):
                _save(accelerator, ckpt_path, policy, preprocess, optimizer, scheduler, ema, step, cfg)
            if evaluator is not None and _due(step, cfg.eval_every, last):
                eval_start = time.perf_counter()
                summary = _evaluate(accelerator, evaluator, ema.module if ema else policy, preprocess, run_dir, step, log)
                model.train()
                window_start = time.perf_counter()
                deadline += window_start - eval_start
                batches.pop_wait()
            if last:
                break
    bar.close()
    if evaluator is not None and summary is None:  # a finished run launched again
        summary = _evaluate(accelerator, evaluator, ema.module if ema else policy, preprocess, run_dir, step, log)
    if evaluator is not None:
        evaluator.close()
    log.close()
    accelerator.wait_for_everyone()
    return summary


def _evaluate_checkpoint(accelerator: Accelerator, evaluator: Evaluator | None, policy: torch.nn.Module,
                         preprocess: Preprocessor, cfg: TrainConfig, run_dir: str, log: "_Logger") -> dict | None:
    """``eval_only``: evaluate the (EMA) weights of ``<run>/last.pt``; no optimizer, no DataLoader."""
    ckpt_path = os.path.join(run_dir, "last.pt")
    state = checkpoint.load_resumable(ckpt_path)
    if state is None:
        raise FileNotFoundError(f"eval_only: no checkpoint at {ckpt_path}; train first (EVAL_ONLY = False)")
    policy.load_state_dict(state["policy"])
    preprocess.load_state_dict(state["preprocess"])
    if cfg.ema:
        ema = EMA(policy)
        ema.load_state_dict(state["ema"])
        policy = ema.module
    log.print(f"evaluating {ckpt_path} (step {state['step']})")
    summary = None
    if evaluator is not None:
        summary = _evaluate(accelerator, evaluator, policy, preprocess, run_dir, state["step"], log)
        evaluator.close()
    log.close()
    accelerator.wait_for_everyone()
    return summary


def _due(step: int, every: int, last: bool) -> bool:
    return last or (every > 0 and step % every == 0)


def _save(accelerator: Accelerator, path: str, policy: torch.nn.Module, preprocess: Preprocessor,
          optimizer: torch.optim.Optimizer, scheduler, ema: EMA | None, step: int, cfg: TrainConfig) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        checkpoint.save_atomic({
            "policy": policy.state_dict(), "preprocess": preprocess.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "step": step, "rng": checkpoint.rng_state(), "config": dataclasses.asdict(cfg),
        }, path)


def _evaluate(accelerator: Accelerator, evaluator: Evaluator, policy: torch.nn.Module, preprocess: Preprocessor,
              run_dir: str, step: int, log: "_Logger") -> dict:
    """Each process runs its share of the episodes; the main process gathers, saves and logs."""
    policy.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    predictor = Predictor(policy, preprocess, accelerator.device, bf16=accelerator.mixed_precision == "bf16")
    start = time.perf_counter()
    # Ensembled evaluations get their own names, so re-evaluating a checkpoint both ways keeps both results.
    tag = f"_{evaluator.execution}" if evaluator.temporal_ensemble is not None else ""
    videos = os.path.join(run_dir, "videos", f"step{step}{tag}") if accelerator.is_main_process else None
    records = evaluator.rollouts(predictor, rank, world, video_dir=videos, progress=accelerator.is_main_process)
    records = gather_object(records)
    summary = summarize(records)
    summary["eval_seconds"] = time.perf_counter() - start
    if accelerator.is_main_process:
        save_results({**summary, "execution": evaluator.execution}, records, os.path.join(run_dir, f"eval_step{step}{tag}.json"))
    scalars = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
    if len(summary["tasks"]) > 1:
        scalars.update((f"{task}/success_rate", v["success_rate"]) for task, v in summary["tasks"].items())
    log.metrics(step, {f"eval/{k}{tag}": v for k, v in scalars.items()})
    lo, hi = summary["success_ci95"]
    log.print(f"step {step}: success rate {summary['success_rate']:.1f}% (95% CI {lo:.1f}-{hi:.1f}) over "
              f"{summary['episodes']} episodes, {evaluator.execution} (mean length {summary['mean_length']:.0f} steps, "
              f"{summary['eval_seconds']:.0f} s)")
    if len(summary["tasks"]) > 1:
        log.print(format_table(summary))
    return summary


def _profiler(run_dir: str) -> torch.profiler.profile:
    """Profiles steps 6-10 after (re)start and writes a Chrome trace plus a table of the top ops."""
    folder = os.path.join(run_dir, "profile")

    def on_ready(prof: torch.profiler.profile) -> None:
        os.makedirs(folder, exist_ok=True)
        prof.export_chrome_trace(os.path.join(folder, f"trace_{int(time.time())}.json"))
        with open(os.path.join(folder, "top_ops.txt"), "w") as fh:
            fh.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
        tqdm.write(f"profiler trace written to {folder}/")

    return torch.profiler.profile(schedule=torch.profiler.schedule(wait=3, warmup=2, active=5, repeat=1),
                                  on_trace_ready=on_ready, record_shapes=True)


class _Logger:
    """stdout (through tqdm) on the main process, and Weights & Biases when asked."""

    def __init__(self, accelerator: Accelerator, cfg: TrainConfig, run_dir: str) -> None:
        self.main = accelerator.is_main_process
        self.wandb = None
        if self.main:
            os.makedirs(run_dir, exist_ok=True)
            self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        if self.main and cfg.wandb_project:
            import wandb

            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.run_name, id=cfg.run_name.replace("/", "-"),
                                    resume="allow", mode=cfg.wandb_mode, dir=run_dir, config=dataclasses.asdict(cfg))

    def print(self, text: str) -> None:
        if self.main:
            tqdm.write(text)

    def metrics(self, step: int, values: dict) -> None:
        if not self.main:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)
        else:
            units = {"samples_per_s": " samples/s", "eval/eval_seconds": " s", "eval/success_rate": " %"}
            text = " | ".join(f"{k} {v:.4g}{units.get(k, '')}" for k, v in values.items())
            tqdm.write(f"step {step} | {text}")

    def close(self) -> None:
        if self.main:
            self.jsonl.close()
            if self.wandb is not None:
                self.wandb.finish()
