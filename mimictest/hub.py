"""Hub-format policies: a folder of ``model.safetensors`` and ``config.json`` that rebuilds itself.

``save_pretrained(policy, preprocess, out_dir, evaluator=..., run=...)`` writes:

- ``model.safetensors``: the policy's weights (pass the EMA module to save the EMA weights) as
  ``policy.<name>``, and the preprocessor's statistics buffers as ``preprocess.<name>`` (with the
  embeddings of the training instructions as ``preprocess.lang_table``);
- ``config.json``: ``policy`` and ``preprocess``, the recipes of both (each network's class and its
  constructor arguments, nested networks included: ``mimictest.recipe``; a Florence-2 tokenizer is
  saved in ``tokenizer/``), so the preprocessing
  statistics and the action space are there in plain numbers; ``instructions``, the rows of
  ``lang_table``; ``evaluator``, the recipe of the benchmark's ``Evaluator`` (its tasks, each
  with its env factory as ``{"__partial__": "mimictest.envs.pusht:PushTEnv", "kwargs": ...}``),
  or ``null``; ``run``, the training run's ``config.json`` (the script's name, every UPPERCASE
  constant and the ``TrainConfig``), or ``null``.

``from_pretrained(policy_dir)`` builds the policy, the preprocessor and the evaluator from the
recipes, with no script, and loads the weights. The text encoder is not saved: the saved
embeddings cover the training instructions, and a new instruction is refused with a clear error.

``python -m mimictest.evaluate POLICY_DIR --episodes 50`` rolls a saved policy out in its
benchmark's env (``evaluate_main``), prints the success table and writes every episode to
``POLICY_DIR/eval/episodes<N>.json`` (videos, with ``--videos K``, to ``POLICY_DIR/eval/videos/``).
``--sampler ddim --inference-steps 10`` evaluates a diffusion policy with another sampler than it
was saved with (written to ``episodes<N>_ddim10.json``).
Paths in the env's recipe (CALVIN's ``dataset_path``) are as the script gave them: run it from the
same working directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import NamedTuple

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from mimictest.atomic import write_bytes, write_text
from mimictest.preprocess import Preprocessor
from mimictest.recipe import decode, encode, encode_arguments

FORMAT = "mimictest-policy"
VERSION = 1
WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer"
_NOT_RECIPE = ("text_encoder", "instructions")  # Preprocessor arguments carried by the saved embeddings instead


class Pretrained(NamedTuple):
    """What ``from_pretrained`` returns."""

    policy: nn.Module
    preprocess: Preprocessor
    evaluator: object | None  # mimictest.evaluate.Evaluator
    config: dict


def save_pretrained(policy: nn.Module, preprocess: Preprocessor, out_dir: str, evaluator=None,
                    run: dict | None = None) -> str:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.json`` atomically; returns ``out_dir``.

    ``policy`` and the networks in it must be built from ``mimictest.recipe.Recorded`` classes (every
    policy and network of the package is); ``evaluator`` is the run's ``Evaluator`` and ``run`` the
    run's configuration (``Save/<run>/config.json``'s content). A Florence-2 tokenizer goes to
    ``out_dir/tokenizer/``. A folder that holds other files than these is refused, so nothing else is
    overwritten; a folder that holds a saved policy gets the new one (its ``eval/`` results stay).
    """
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not _is_policy_dir(out_dir):
        raise FileExistsError(f"{out_dir} already holds {sorted(os.listdir(out_dir))[:3]} and no saved policy; save the "
                              "policy to a new or empty folder")
    extra = preprocess.get_extra_state()
    config = {
        "format": FORMAT, "version": VERSION,
        "policy": encode(policy, "policy", folder=out_dir),
        "preprocess": {"__class__": "mimictest.preprocess:Preprocessor",
                       "kwargs": encode_arguments(preprocess, "preprocess", skip=_NOT_RECIPE)},
        "instructions": list(extra["instructions"]),
        "evaluator": None if evaluator is None else encode(evaluator, "evaluator"),
        "run": run,
    }
    tensors = {f"policy.{k}": _tensor(v, k) for k, v in policy.state_dict().items()}
    tensors.update((f"preprocess.{k}", _tensor(v, k)) for k, v in preprocess.state_dict().items() if k != "_extra_state")
    tensors["preprocess.lang_table"] = extra["lang_table"].float().contiguous()
    text = json.dumps(config, indent=1)  # refuse an unserialisable run config before anything is written
    write_bytes(os.path.join(out_dir, WEIGHTS), save_tensors(tensors, metadata={"format": FORMAT}))
    write_text(os.path.join(out_dir, CONFIG), text)
    return out_dir


def from_pretrained(policy_dir: str, device: str | torch.device = "cpu") -> Pretrained:
    """Build the policy (in eval mode), the preprocessor and the evaluator saved in ``policy_dir``."""
    paths = [os.path.join(policy_dir, name) for name in (CONFIG, WEIGHTS)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{policy_dir} is not a saved policy: no {missing[0]}; write one with "
                                "mimictest.hub.save_pretrained")
    with open(paths[0]) as fh:
        config = json.load(fh)
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise ValueError(f"{paths[0]} is not a {FORMAT} config of version {VERSION} "
                         f"(format {config.get('format')!r}, version {config.get('version')!r})")
    with open(paths[1], "rb") as fh:
        tensors = load_tensors(fh.read())
    policy = decode(config["policy"], policy_dir)
    policy.load_state_dict(_part(tensors, "policy."))
    preprocess = Preprocessor(**decode(config["preprocess"]["kwargs"]))
    state = _part(tensors, "preprocess.")
    state["_extra_state"] = {"instructions": config["instructions"], "lang_table": state.pop("lang_table")}
    preprocess.load_state_dict(state)
    evaluator = None if config["evaluator"] is None else decode(config["evaluator"])
    return Pretrained(policy.to(device).eval(), preprocess.to(device), evaluator, config)


def _is_policy_dir(folder: str) -> bool:
    try:
        with open(os.path.join(folder, CONFIG)) as fh:
            return json.load(fh).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _tensor(value, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"state_dict entry {name!r} is a {type(value).__name__}, not a tensor; safetensors holds tensors only")
    return value.detach().cpu().contiguous().clone()  # clone: tied weights become separate tensors


def _part(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def evaluate_main(argv: list[str] | None = None) -> dict:
    """``python -m mimictest.evaluate POLICY_DIR --episodes 50``: the summary of a saved policy's rollouts."""
    from mimictest.config import seed_everything
    from mimictest.evaluate import Predictor, format_table, save_results, summarize

    parser = argparse.ArgumentParser(prog="python -m mimictest.evaluate",
                                     description="Evaluate a policy saved by mimictest.hub.save_pretrained in its env.")
    parser.add_argument("policy_dir")
    parser.add_argument("--episodes", type=int, default=None, help="episodes per task (default: the saved count)")
    parser.add_argument("--num-envs", type=int, default=None, help="parallel env workers (default: the saved count)")
    parser.add_argument("--videos", type=int, default=0, help="rollouts to save as mp4 in POLICY_DIR/eval/videos/")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the policy's sampling noise")
    parser.add_argument("--sampler", choices=("ddpm", "ddim"), default=None,
                        help="a diffusion policy's sampler for this evaluation (default: the saved one)")
    parser.add_argument("--inference-steps", type=int, default=10, help="denoising steps with --sampler ddim")
    args = parser.parse_args(argv)
    if args.episodes is not None and args.episodes < 1:
        parser.error(f"--episodes must be >= 1, got {args.episodes}")
    try:
        loaded = from_pretrained(args.policy_dir, args.device)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    policy, tag = loaded.policy, ""
    if args.sampler is not None:
        if not hasattr(policy, "with_sampler"):
            parser.error(f"--sampler needs a diffusion policy; {args.policy_dir} holds a {type(policy).__name__}")
        try:
            policy = policy.with_sampler(args.sampler, args.inference_steps).eval()
        except ValueError as exc:
            parser.error(str(exc))
        tag = f"_{args.sampler}{policy.sample_scheduler.num_inference_steps}"  # _ddpm100, _ddim10
    evaluator = loaded.evaluator
    if evaluator is None:
        parser.error(f"{args.policy_dir} was saved without an evaluator (save_pretrained(..., evaluator=...)); "
                     "it names no env to evaluate in")
    tasks = [_with_episodes(task, args.episodes) for task in evaluator.tasks] if args.episodes else evaluator.tasks
    evaluator = dataclasses.replace(evaluator, tasks=tasks, num_envs=args.num_envs or evaluator.num_envs,
                                    num_videos=args.videos)
    seed_everything(args.seed)
    predictor = Predictor(policy, loaded.preprocess, torch.device(args.device))
    video_dir = os.path.join(args.policy_dir, "eval", "videos") if args.videos else None
    try:
        records = evaluator.rollouts(predictor, video_dir=video_dir, progress=True)
    finally:
        evaluator.close()
    summary = summarize(records)
    out = os.path.join(args.policy_dir, "eval", f"episodes{evaluator.num_episodes}{tag}.json")
    save_results({**summary, "execution": evaluator.execution}, records, out)
    print(format_table(summary))
    print(f"episodes written to {out}")
    return summary


def _with_episodes(task, episodes: int):
    """``task`` with ``episodes`` episodes: its first saved starts, or the seeds from the evaluator's."""
    if task.starts is None:
        return dataclasses.replace(task, num_episodes=episodes)
    if episodes > len(task.starts):
        raise SystemExit(f"task {task.name!r} was saved with {len(task.starts)} starts; ask for at most that many --episodes")
    return dataclasses.replace(task, num_episodes=episodes, starts=task.starts[:episodes])
