"""The one training loop, on Hugging Face accelerate: one CPU, one GPU or many, same code.

Per optimizer step: a batch (``StepSampler``: fixed by the seed and the step) -> device-side
preprocessing -> ``policy(batch)`` (the loss dict) -> backward -> gradient norm (and clipping) ->
fused AdamW, skipped when the loss or the gradient is not finite -> LR warmup and schedule -> EMA.
Periodically: a log line (loss, LR, samples/s, fraction of time waiting for data), an evaluation in
parallel simulators with the EMA weights, and an atomic checkpoint. Running the same script again
resumes from ``<save_root>/<run_name>/last.pt`` exactly: every process's RNG state, the position in
the epoch, EMA and the optimizer come back, and evaluation draws from its own seeded RNG, so a
resumed run logs the same loss at every step as an uninterrupted one. A finished run only
re-evaluates.

Results of a run, in ``<save_root>/<run_name>/``: ``config.json`` (every UPPERCASE constant of the
script and the ``TrainConfig``), ``metrics.jsonl``, ``eval_step<N>.json`` (every episode),
``summary.json`` (each evaluation's success rate with its 95% Wilson interval, and the success
over the last ``success_last_k`` evaluations, as the seeds report it), ``report.html`` (curves,
success, tables, videos and settings in one file), ``checkpoints/step<N>.pt`` (the evaluated
weights, for ``eval_checkpoints``), ``videos/`` and, at the end, ``policy/`` (``mimictest.hub``:
the weights and everything needed to rebuild the policy without the script).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mimictest import checkpoint
from mimictest.atomic import write_json
from mimictest.config import FREE_FIELDS, changed_values, script_constants, script_name, seed_everything
from mimictest.cpu import configure_cpu
from mimictest.data.prefetcher import Prefetcher
from mimictest.data.sampler import StepSampler
from mimictest.evaluate import EvaluationError, Evaluator, Predictor, format_table, save_results, summarize
from mimictest.hub import save_pretrained
from mimictest.policies.ema import EMA
from mimictest.precision import cpu_model, resolve_bf16
from mimictest.preprocess import Preprocessor
from mimictest.report import write_report


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation and bookkeeping settings. All step counts are optimizer steps.

    The algorithm settings have no defaults: every script states them, with the reference's
    value beside it where it differs.

    Attributes:
        run_name: checkpoints, evaluation results and videos go to ``<save_root>/<run_name>/``.
        max_steps: total optimizer steps.
        batch_size: samples per process per step (global batch = batch_size * processes).
        lr, weight_decay, betas: AdamW (Diffusion Policy: 1e-4, 1e-6, (0.95, 0.999)).
        lr_schedule: ``"cosine"`` (decay to 0 at ``max_steps``, after the warmup; Diffusion Policy)
            or ``"constant"`` (ACT).
        warmup_steps: linear LR warmup from ``lr / warmup_steps`` to ``lr``.
        grad_clip: max global gradient norm, ``0`` for none (Diffusion Policy and ACT: none).
        ema: evaluate and save an exponential moving average of the weights.
        max_minutes: also stop after this many minutes of training in this launch (evaluations not
            counted), then save and evaluate as at ``max_steps``; ``None`` for no time limit.
        num_workers: DataLoader worker processes per training process.
        log_every, eval_every, save_every: intervals in steps (``0`` = only at the end).
        bf16: ``"auto"`` (bf16 autocast where it is measured faster: CUDA GPUs with bf16, CPUs
            whose bf16 matmul beats fp32; see ``mimictest.precision``), or ``True`` / ``False``.
        channels_last: store 4-D (convolution) weights channels-last.
        compile: ``torch.compile`` the policy's loss computation.
        nonfinite: a step whose loss or gradient is NaN or infinite is never applied; ``"stop"``
            then ends the run with a message naming the step and the loss terms, before anything
            is saved; ``"skip"`` goes on and counts such steps (``skipped_steps`` in the log).
        unfreeze_step: the modules passed as ``train(frozen=...)`` train from this step on
            (``None``: frozen for the whole run).
        success_last_k: the run's success is pooled over its last ``k`` evaluations (mimictest:
            3 checkpoints x 96 rollouts); ``summary.json`` also gives the best one.
        keep_checkpoints: keep the weights of only the ``k`` best-evaluated steps in
            ``checkpoints/`` (``None``: keep every evaluated step's).
        eval_only: do not train; evaluate ``<run>/last.pt`` (e.g. again with other execution
            settings, such as ACT with and without temporal ensembling).
        eval_checkpoints: do not train; evaluate the saved ``checkpoints/step<N>.pt``: ``"all"``
            or a list of steps.
        allow_config_change: resume even when the script's settings differ from the checkpoint's
            (otherwise a changed setting stops the launch with the changed values named).
        profile: record a torch profiler trace of a few steps to ``<run>/profile/``.
        wandb_project: log to Weights & Biases under this project, or ``None`` for stdout only.
        wandb_mode: ``"online"`` or ``"offline"`` (sync later with ``wandb sync``).
        seed: base seed of the data order and of each process's random stream (process ``r``
            uses ``seed + r``).
    """

    run_name: str
    max_steps: int
    batch_size: int
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    lr_schedule: str
    warmup_steps: int
    grad_clip: float
    ema: bool
    max_minutes: float | None = None
    num_workers: int = 2
    log_every: int = 100
    eval_every: int = 0
    save_every: int = 1000
    bf16: bool | str = "auto"
    channels_last: bool = False
    compile: bool = False
    nonfinite: str = "stop"
    unfreeze_step: int | None = None
    success_last_k: int = 1
    keep_checkpoints: int | None = None
    eval_only: bool = False
    eval_checkpoints: str | list[int] | None = None
    allow_config_change: bool = False
    profile: bool = False
    wandb_project: str | None = None
    wandb_mode: str = "offline"
    seed: int = 0
    save_root: str = "Save"

    def __post_init__(self) -> None:
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if self.nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got {self.nonfinite!r}")
        if self.success_last_k < 1:
            raise ValueError(f"success_last_k must be >= 1, got {self.success_last_k}")
        if self.eval_checkpoints is not None and self.eval_checkpoints != "all" and not isinstance(self.eval_checkpoints, list):
            raise ValueError(f"eval_checkpoints must be None, 'all' or a list of steps, got {self.eval_checkpoints!r}")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """The LR multiplier after ``step`` optimizer steps: linear warmup, then constant or a cosine to 0.

    As diffusers' ``get_cosine_schedule_with_warmup`` (what Diffusion Policy uses), except that
    the warmup starts at ``1 / warmup_steps`` rather than 0, so the first step is not wasted.
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def train(policy: nn.Module, preprocess: Preprocessor, dataset: Dataset, cfg: TrainConfig,
          evaluator: Evaluator | None = None, param_groups: list[dict] | None = None,
          frozen: Sequence[nn.Module] = ()) -> dict | None:
    """Train ``policy`` on ``dataset``, evaluating with ``evaluator``; returns the last evaluation summary.

    ``param_groups`` are AdamW parameter groups (per-group weight decay or learning rate, e.g. a
    slower vision tower); by default every parameter uses ``cfg.lr`` and ``cfg.weight_decay``.
    ``frozen`` modules receive no gradient (their weights and normalisation statistics stay fixed)
    until ``cfg.unfreeze_step``; they stay in the optimizer, so its state carries over the switch.
    """
    accelerator = Accelerator(mixed_precision="no")  # precision is cfg.bf16's, applied by this loop
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    if device.type == "cpu":
        configure_cpu(world)
    seed_everything(cfg.seed + rank)
    run_dir = os.path.join(cfg.save_root, cfg.run_name)
    ckpt_path = os.path.join(run_dir, "last.pt")
    run_config = {"script": script_name(), "constants": script_constants(), "train": _plain_config(cfg)}
    log = _Logger(accelerator, cfg, run_dir, run_config)
    bf16 = _decide_bf16(accelerator, cfg, log)
    if len(dataset) < cfg.batch_size * world:
        raise ValueError(f"the dataset has {len(dataset)} samples, fewer than batch_size={cfg.batch_size} x "
                         f"{world} process(es); lower BATCH_SIZE")
    if evaluator is not None:
        evaluator.check(getattr(dataset, "task_names", None), instructions=preprocess.lang_dim > 0)
    policy.to(device)
    if cfg.channels_last:
        policy.to(memory_format=torch.channels_last)
    preprocess.to(device)
    eval_ctx = _EvalContext(accelerator, evaluator, preprocess, run_dir, cfg, bf16, log)
    if cfg.eval_only or cfg.eval_checkpoints is not None:
        summary = eval_ctx.saved(policy, ckpt_path)
        eval_ctx.close()
        return summary

    optimizer = torch.optim.AdamW(param_groups or policy.parameters(), lr=cfg.lr, betas=cfg.betas,
                                  weight_decay=cfg.weight_decay,
                                  fused=True)  # one kernel per step, on CPU too: 10x faster than foreach there
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    ema = EMA(policy) if cfg.ema else None
    guard = _NonFiniteGuard(device, cfg.nonfinite)

    step = 0
    state = checkpoint.load_resumable(ckpt_path)  # falls back to the previous checkpoint if last.pt is damaged
    if state is not None:
        _check_same_run(state, run_config, cfg, ckpt_path, log)
        _load_weights(policy, state["policy"], ckpt_path)
        preprocess.load_state_dict(state["preprocess"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        step = state["step"]
        guard.skipped = state.get("skipped_steps", 0)
        if len(state["rng"]) == world:
            checkpoint.set_rng_state(state["rng"][rank])
        else:
            log.print(f"note: {ckpt_path} was written by {len(state['rng'])} process(es), this launch has {world}; "
                      "the data order and random streams now differ from an uninterrupted run")
        log.print(f"resumed from {ckpt_path} at step {step}/{cfg.max_steps}")
    elif accelerator.is_main_process:
        write_json(os.path.join(run_dir, "config.json"), run_config)

    is_frozen = bool(frozen) and (cfg.unfreeze_step is None or step < cfg.unfreeze_step)
    _set_frozen(frozen, is_frozen)
    model = _wrap(accelerator, policy, cfg)
    sampler = StepSampler(len(dataset), cfg.batch_size, cfg.seed, rank, world, start_step=step)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(cfg.seed))  # worker seeds: not the global stream
    batches = Prefetcher(iter(loader), device)
    samples_per_step = cfg.batch_size * world
    log.print(f"{sum(p.numel() for p in policy.parameters()) / 1e6:.2f} M parameters | {len(dataset)} samples | "
              f"{world} process(es) on {device.type} | global batch {samples_per_step} | {cfg.max_steps} steps | "
              f"{'bf16' if bf16 else 'fp32'}")

    summary = None
    profiler = _profiler(run_dir) if cfg.profile and accelerator.is_main_process else contextlib.nullcontext()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", disable=not accelerator.is_main_process)
    window_loss, window_good = torch.zeros((), device=device), torch.zeros((), device=device)
    window_steps, window_start = 0, time.perf_counter()
    deadline = time.perf_counter() + 60 * cfg.max_minutes if cfg.max_minutes else math.inf
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    model.train()
    _set_frozen(frozen, is_frozen)
    with profiler as prof:
        while step < cfg.max_steps:
            if is_frozen and cfg.unfreeze_step is not None and step >= cfg.unfreeze_step:
                is_frozen = False
                _set_frozen(frozen, False)
                model = _wrap(accelerator, policy, cfg)  # DDP registers only the parameters that need gradients
                model.train()
                log.print(f"step {step}: unfroze {sum(p.numel() for m in frozen for p in m.parameters()) / 1e6:.2f} M parameters")
            batch = preprocess(next(batches), train=True)
            with autocast:
                losses = model(batch)
            accelerator.backward(losses["total_loss"])
            grad_norm = _grad_norm(policy, cfg.grad_clip)
            bad = guard.observe(step + 1, losses, grad_norm)
            optimizer.found_inf = bad.float()  # the fused AdamW kernel skips the whole update when it is 1
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(policy)
            step += 1
            window_loss += torch.where(bad, 0.0, losses["total_loss"].detach().float())
            window_good += (~bad).float()
            window_steps += 1
            bar.update(1)
            if prof is not None:
                prof.step()

            time_up = False
            if cfg.max_minutes and step % max(cfg.log_every, 1) == 0:  # every process must agree to stop
                late = torch.tensor(float(time.perf_counter() >= deadline), device=device)
                time_up = accelerator.reduce(late, reduction="sum").item() > 0
            last = step == cfg.max_steps or time_up
            due_log, due_save = _due(step, cfg.log_every, last), _due(step, cfg.save_every, last)
            due_eval = evaluator is not None and _due(step, cfg.eval_every, last)
            if device.type != "cuda" or due_log or due_save or due_eval:  # on CUDA, a sync only at these steps
                guard.check()
            if last and step < cfg.max_steps:
                log.print(f"stopping at step {step}: max_minutes={cfg.max_minutes} of training reached")
                if cfg.lr_schedule == "cosine":
                    log.print(f"the cosine LR had decayed only to {lr_factor(step, cfg):.2f} x lr (it reaches 0 at "
                              f"max_steps={cfg.max_steps}); for the full decay on this machine, set MAX_STEPS to about {step}")
            if due_log:
                elapsed = time.perf_counter() - window_start
                good = accelerator.reduce(window_good, reduction="sum").item()
                loss = accelerator.reduce(window_loss, reduction="sum").item() / max(good, 1.0)
                wait = batches.pop_wait()
                values = {"loss": loss, "lr": scheduler.get_last_lr()[0],
                          "samples_per_s": samples_per_step * window_steps / elapsed, "data_wait_frac": wait / elapsed}
                if cfg.nonfinite == "skip":
                    values["skipped_steps"] = guard.skipped
                log.metrics(step, values)
                bar.set_postfix(loss=f"{loss:.4f}")
                window_loss.zero_()
                window_good.zero_()
                window_steps, window_start = 0, time.perf_counter()
            if due_save:
                _save(accelerator, ckpt_path, policy, preprocess, optimizer, scheduler, ema, step, sampler,
                      guard.skipped, run_config)
            if due_eval:
                eval_start = time.perf_counter()
                summary = eval_ctx.training(ema.module if ema else policy, step)
                model.train()
                _set_frozen(frozen, is_frozen)
                window_start = time.perf_counter()
                deadline += window_start - eval_start
                batches.pop_wait()
            if last:
                break
    bar.close()
    if evaluator is not None and summary is None:  # a finished run launched again
        summary = eval_ctx.training(ema.module if ema else policy, step)
    if accelerator.is_main_process:  # after the evaluation, so that its results are safe whatever happens here
        policy_dir = save_pretrained(ema.module if ema else policy, preprocess, os.path.join(run_dir, "policy"),
                                     evaluator=evaluator, run=run_config)
        log.print(f"policy saved to {policy_dir}/ (evaluate it: python -m mimictest.evaluate {policy_dir} --episodes 50)")
    eval_ctx.close()
    return summary


def _plain_config(cfg: TrainConfig) -> dict:
    """``TrainConfig`` as JSON values (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _decide_bf16(accelerator: Accelerator, cfg: TrainConfig, log: "_Logger") -> bool:
    """The main process resolves ``cfg.bf16`` (measuring once per CPU kind) and every process follows it."""
    decision = [None, None]
    if accelerator.is_main_process:
        decision = list(resolve_bf16(cfg.bf16, accelerator.device))
    if accelerator.num_processes > 1:
        decision = broadcast_object_list(decision)
    log.print(decision[1])
    return bool(decision[0])


def _wrap(accelerator: Accelerator, policy: nn.Module, cfg: TrainConfig) -> nn.Module:
    """The policy as trained: DDP-wrapped with several processes, compiled if asked."""
    model = accelerator.prepare_model(policy)
    return torch.compile(model) if cfg.compile else model


def _set_frozen(frozen: Sequence[nn.Module], on: bool) -> None:
    """Freeze (no gradients, normalisation statistics fixed in eval mode) or release ``frozen``."""
    for module in frozen:
        module.requires_grad_(not on)
        if on:
            module.eval()


def _grad_norm(policy: nn.Module, max_norm: float) -> Tensor:
    """The global L2 norm of the gradients, after clipping them to ``max_norm`` when it is > 0."""
    grads = [p for p in policy.parameters() if p.grad is not None]
    if not grads:
        raise RuntimeError("no parameter received a gradient: is everything frozen, or does the loss ignore the network?")
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(grads, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in grads])


class _NonFiniteGuard:
    """Spots a NaN or infinite loss term or gradient norm at every step without a device sync.

    ``observe`` returns the step's flag (the fused optimizer's ``found_inf``: the update is
    skipped) and remembers the first bad step and its terms on the device; ``check`` (a sync)
    raises in ``"stop"`` mode, or adds the bad steps to ``skipped`` in ``"skip"`` mode.
    """

    def __init__(self, device: torch.device, mode: str) -> None:
        self.mode, self.skipped = mode, 0
        self.count = torch.zeros((), dtype=torch.long, device=device)
        self.first_step = torch.full((), -1, dtype=torch.long, device=device)
        self.first_terms: Tensor | None = None
        self.names: list[str] = []

    def observe(self, step: int, losses: dict[str, Tensor], grad_norm: Tensor) -> Tensor:
        self.names = [*losses, "grad_norm"]
        terms = torch.stack([v.detach().float().reshape(()) for v in losses.values()] + [grad_norm.detach().float()])
        bad = ~torch.isfinite(terms).all()
        first = bad & (self.first_step < 0)
        self.first_step = torch.where(first, step, self.first_step)
        self.first_terms = terms if self.first_terms is None else torch.where(first, terms, self.first_terms)
        self.count += bad
        return bad

    def check(self) -> None:
        count = int(self.count.item())
        if count == 0:
            return
        if self.mode == "stop":
            terms = ", ".join(f"{n}={v:.4g}" for n, v in zip(self.names, self.first_terms.tolist()))
            raise FloatingPointError(
                f"non-finite training at step {int(self.first_step.item())} ({terms}); that update was not applied and "
                "nothing was saved after it. Lower LR, check the data for NaN, or set nonfinite='skip' in TrainConfig")
        self.skipped += count
        self.count.zero_()
        self.first_step.fill_(-1)


def _check_same_run(state: dict, run_config: dict, cfg: TrainConfig, path: str, log: "_Logger") -> None:
    """Stop a resume whose script or settings differ from the checkpoint's, naming what changed."""
    saved = state.get("run")
    if saved is None:
        raise RuntimeError(f"{path} records no run configuration (an older mimictest wrote it); move it away to start over")
    diffs = []
    if saved["script"] != run_config["script"]:
        diffs.append(f"script: {saved['script']!r} -> {run_config['script']!r}")
    diffs += changed_values(saved["constants"], run_config["constants"])
    diffs += changed_values(saved["train"], run_config["train"], FREE_FIELDS)
    if not diffs:
        return
    if not cfg.allow_config_change:
        raise ValueError(f"{path} was trained with other settings ({'; '.join(diffs)}); use another RUN_NAME, restore "
                         "them, or pass allow_config_change=True to TrainConfig to resume anyway")
    log.print(f"resuming {path} with changed settings: {'; '.join(diffs)}")


def _load_weights(policy: nn.Module, weights: dict, path: str) -> None:
    try:
        policy.load_state_dict(weights)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise RuntimeError(f"{path} holds another network's weights ({first}); it belongs to another script or "
                           "configuration: use another RUN_NAME") from None


def _due(step: int, every: int, last: bool) -> bool:
    return last or (every > 0 and step % every == 0)


def _save(accelerator: Accelerator, path: str, policy: nn.Module, preprocess: Preprocessor,
          optimizer: torch.optim.Optimizer, scheduler, ema: EMA | None, step: int, sampler: StepSampler,
          skipped: int, run_config: dict) -> None:
    """Every process's RNG state is gathered; the main process writes the checkpoint atomically."""
    rngs = gather_object([checkpoint.rng_state()])
    if accelerator.is_main_process:
        epoch, batch = sampler.position(step)
        checkpoint.save_atomic({
            "policy": policy.state_dict(), "preprocess": preprocess.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "step": step, "rng": rngs, "data": {"seed": sampler.seed, "epoch": epoch, "batch_in_epoch": batch},
            "skipped_steps": skipped, "run": run_config,
        }, path)
    accelerator.wait_for_everyone()


@contextlib.contextmanager
def _own_rng(seed: int):
    """Run the block on freshly seeded generators and give the caller's back afterwards, so that
    evaluating does not move the training run's random streams."""
    saved = checkpoint.rng_state()
    seed_everything(seed)
    try:
        yield
    finally:
        checkpoint.set_rng_state(saved)


class _EvalContext:
    """Evaluations of one run: rollouts on every process, results gathered, saved and summarised."""

    def __init__(self, accelerator: Accelerator, evaluator: Evaluator | None, preprocess: Preprocessor, run_dir: str,
                 cfg: TrainConfig, bf16: bool, log: "_Logger") -> None:
        self.accelerator, self.evaluator, self.preprocess = accelerator, evaluator, preprocess
        self.run_dir, self.cfg, self.bf16, self.log = run_dir, cfg, bf16, log

    @property
    def tag(self) -> str:
        """Ensembled evaluations get their own names, so re-evaluating a checkpoint both ways keeps both."""
        return f"_{self.evaluator.execution}" if self.evaluator.temporal_ensemble is not None else ""

    def training(self, policy: nn.Module, step: int) -> dict:
        """Evaluate the current (EMA) weights at ``step`` and keep them as ``checkpoints/step<N>.pt``."""
        if self.accelerator.is_main_process:
            checkpoint.save_atomic({"policy": policy.state_dict(), "preprocess": self.preprocess.state_dict(),
                                    "step": step}, self._snapshot(step))
        summary = self.evaluate(policy, step)
        if self.cfg.keep_checkpoints is not None and self.accelerator.is_main_process:
            self._keep_best(self.cfg.keep_checkpoints)
        return summary

    def saved(self, policy: nn.Module, ckpt_path: str) -> dict | None:
        """``eval_only`` (``last.pt``) or ``eval_checkpoints`` (the kept ``checkpoints/step<N>.pt``)."""
        if self.evaluator is None:
            raise ValueError("eval_only / eval_checkpoints need an Evaluator: pass one to train()")
        if self.cfg.eval_checkpoints is None:
            state = checkpoint.load_resumable(ckpt_path)
            if state is None:
                raise FileNotFoundError(f"eval_only: no checkpoint at {ckpt_path}; train first (EVAL_ONLY = False)")
            _load_weights(policy, state["ema"]["module"] if self.cfg.ema else state["policy"], ckpt_path)
            self.preprocess.load_state_dict(state["preprocess"])
            self.log.print(f"evaluating {ckpt_path} (step {state['step']})")
            return self.evaluate(policy, state["step"])
        kept = self._kept_steps()
        steps = kept if self.cfg.eval_checkpoints == "all" else list(self.cfg.eval_checkpoints)
        missing = sorted(set(steps) - set(kept))
        if missing or not steps:
            raise FileNotFoundError(f"eval_checkpoints: no saved weights for step(s) {missing or steps} in "
                                    f"{os.path.join(self.run_dir, 'checkpoints')} (kept: {kept or 'none'})")
        summary = None
        for step in steps:
            state = checkpoint.load(self._snapshot(step))
            _load_weights(policy, state["policy"], self._snapshot(step))
            self.preprocess.load_state_dict(state["preprocess"])
            self.log.print(f"evaluating {self._snapshot(step)}")
            summary = self.evaluate(policy, step)
        return summary

    def evaluate(self, policy: nn.Module, step: int) -> dict:
        """Each process runs its share of the episodes; the main process gathers, saves and logs.

        A process whose rollouts fail still joins the gather (with its error), so no process waits
        forever; then every process raises.
        """
        policy.eval()
        acc, evaluator = self.accelerator, self.evaluator
        rank, world = acc.process_index, acc.num_processes
        predictor = Predictor(policy, self.preprocess, acc.device, bf16=self.bf16)
        start = time.perf_counter()
        videos = os.path.join(self.run_dir, "videos", f"step{step}{self.tag}") if acc.is_main_process else None
        error = None
        try:
            with _own_rng(self.cfg.seed + 1_000_003 * (rank + 1)):
                records = evaluator.rollouts(predictor, rank, world, video_dir=videos, progress=acc.is_main_process)
        except Exception as exc:  # reported after the gather, by every process
            records, error = [], exc
        gathered = gather_object([(records, None if error is None else f"process {rank}: {type(error).__name__}: {error}")])
        failures = [e for _, e in gathered if e is not None]
        if error is not None:
            raise error
        if failures:
            raise EvaluationError(f"evaluation failed on another process: {failures[0]}")
        records = [r for part, _ in gathered for r in part]
        summary = summarize(records)
        summary["eval_seconds"] = time.perf_counter() - start
        if acc.is_main_process:
            save_results({**summary, "execution": evaluator.execution}, records, self._result(step))
            self._write_summary()
            self.log.print(f"report: {write_report(self.run_dir)}")
        scalars = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
        if len(summary["tasks"]) > 1:
            scalars.update((f"{task}/success_rate", v["success_rate"]) for task, v in summary["tasks"].items())
        self.log.metrics(step, {f"eval/{k}{self.tag}": v for k, v in scalars.items()})
        lo, hi = summary["success_ci95"]
        self.log.print(f"step {step}: success rate {summary['success_rate']:.1f}% (95% CI {lo:.1f}-{hi:.1f}) over "
                       f"{summary['episodes']} episodes, {evaluator.execution} (mean length {summary['mean_length']:.0f} "
                       f"steps, {summary['eval_seconds']:.0f} s)")
        if len(summary["tasks"]) > 1:
            self.log.print(format_table(summary))
        return summary

    def close(self) -> None:
        if self.evaluator is not None:
            self.evaluator.close()
        self.log.close()
        self.accelerator.wait_for_everyone()

    def _snapshot(self, step: int) -> str:
        return os.path.join(self.run_dir, "checkpoints", f"step{step}.pt")

    def _result(self, step: int) -> str:
        return os.path.join(self.run_dir, f"eval_step{step}{self.tag}.json")

    def _kept_steps(self) -> list[int]:
        names = glob.glob(os.path.join(self.run_dir, "checkpoints", "step*.pt"))
        return sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"step(\d+)\.pt", os.path.basename(n))))

    def _results(self) -> list[tuple[int, dict]]:
        """``(step, eval file)`` of this execution setting, by step."""
        pattern = re.compile(rf"eval_step(\d+){re.escape(self.tag)}\.json")
        found = []
        for path in glob.glob(os.path.join(self.run_dir, "eval_step*.json")):
            if m := pattern.fullmatch(os.path.basename(path)):
                with open(path) as fh:
                    found.append((int(m.group(1)), json.load(fh)))
        return sorted(found, key=lambda item: item[0])

    def _write_summary(self) -> None:
        """``summary<tag>.json``: every evaluation, the best, and the episodes of the last K pooled."""
        results = self._results()
        k = self.cfg.success_last_k
        pooled = summarize([e for _, r in results[-k:] for e in r["episodes"]])
        best_step, best = max(results, key=lambda item: item[1]["summary"]["success_rate"])
        name, flags = cpu_model()
        write_json(os.path.join(self.run_dir, f"summary{self.tag}.json"), {
            "run": self.cfg.run_name, "execution": self.evaluator.execution, "cpu": name, "cpu_flags": flags,
            "evaluations": [{"step": s, **{key: r["summary"][key] for key in
                                           ("success_rate", "success_ci95", "episodes", "mean_task_success")}}
                            for s, r in results],
            f"success_last_{k}": {"steps": [s for s, _ in results[-k:]], **pooled},
            "best": {"step": best_step, "success_rate": best["summary"]["success_rate"],
                     "success_ci95": best["summary"]["success_ci95"]},
        })
        lo, hi = pooled["success_ci95"]
        self.log.print(f"success over the last {len(results[-k:])} evaluation(s): {pooled['success_rate']:.1f}% "
                       f"(95% CI {lo:.1f}-{hi:.1f}, {pooled['episodes']} episodes)")

    def _keep_best(self, k: int) -> None:
        """Delete the kept weights of every evaluated step outside the ``k`` best by success rate."""
        rates = {s: r["summary"]["success_rate"] for s, r in self._results()}
        ranked = sorted((s for s in self._kept_steps() if s in rates), key=lambda s: (-rates[s], -s))
        for step in ranked[k:]:
            os.remove(self._snapshot(step))


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

    def __init__(self, accelerator: Accelerator, cfg: TrainConfig, run_dir: str, run_config: dict) -> None:
        self.main = accelerator.is_main_process
        self.wandb = None
        if self.main:
            os.makedirs(run_dir, exist_ok=True)
            self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        if self.main and cfg.wandb_project:
            import wandb

            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.run_name, id=cfg.run_name.replace("/", "-"),
                                    resume="allow", mode=cfg.wandb_mode, dir=run_dir, config=run_config)

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
