"""Device-side preprocessing: the one place where env/dataset units meet network units.

- ``ActionSpace`` maps env actions to the unified model action and back. End-effector actions
  ``xyz (3) + rotation (r) + gripper (g)`` become ``xyz (3) + 6D rotation (6) + gripper (g)``
  (10-d for one arm), in absolute mode (world-frame targets) or relative mode (per-step deltas,
  such as robosuite's default OSC_POSE ``control_delta=True``). Joint-space actions pass through.
- ``Preprocessor`` (an ``nn.Module`` so its statistics travel in checkpoints) turns a uint8 batch
  into network inputs: each camera's images to float in [-1, 1], optional resize, random crop when
  training and centre crop when evaluating, normalisation of actions and low-dim observations
  (min-max to [-1, 1], Diffusion Policy's, or mean/std, ACT's), instructions to embeddings; and maps
  predicted actions back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mimictest import rotation
from mimictest.recipe import Recorded

_MIN_RANGE = 1e-4  # a dimension whose range is below this is treated as constant
# ACT's get_norm_stats (tonyzhaozh/act, utils.py) clips every std to [1e-2, 10].
STD_MIN, STD_MAX = 1e-2, 10.0
NORMALIZATIONS = ("minmax", "meanstd")


@dataclass(frozen=True)
class ActionSpace:
    """How env actions map to model actions.

    Attributes:
        rotation: representation of the env action's rotation (``"axis_angle"``, ``"quat"``,
            ``"euler_xyz"``), or ``None`` for joint-space actions that pass through unchanged.
        mode: ``"absolute"`` (targets in the world frame) or ``"relative"`` (per-step deltas).
            Both use the same 6D mapping; the mode is recorded so that a checkpoint says what its
            actions mean, and so scripts can refuse a dataset of the other kind.
        env_dim: the env action's dimension, e.g. 7 for robosuite OSC_POSE with one gripper.
    """

    rotation: str | None = "axis_angle"
    mode: str = "absolute"
    env_dim: int = 7

    def __post_init__(self) -> None:
        if self.mode not in ("absolute", "relative"):
            raise ValueError(f"ActionSpace.mode must be 'absolute' or 'relative', got {self.mode!r}")
        if self.rotation is not None and self.rotation not in rotation.ROTATION_DIMS:
            raise ValueError(
                f"ActionSpace.rotation must be one of {sorted(rotation.ROTATION_DIMS)} or None, got {self.rotation!r}"
            )
        if self.rotation is not None and self.env_dim < 3 + rotation.ROTATION_DIMS[self.rotation]:
            raise ValueError(f"env_dim={self.env_dim} is too small for xyz + {self.rotation}")

    @property
    def rot_dim(self) -> int:
        return 0 if self.rotation is None else rotation.ROTATION_DIMS[self.rotation]

    @property
    def model_dim(self) -> int:
        return self.env_dim if self.rotation is None else self.env_dim - self.rot_dim + 6

    def to_model(self, action: torch.Tensor) -> torch.Tensor:
        """``(..., env_dim)`` -> ``(..., model_dim)``."""
        if action.shape[-1] != self.env_dim:
            raise ValueError(f"expected env actions with {self.env_dim} dims, got shape {tuple(action.shape)}")
        if self.rotation is None:
            return action
        r = 3 + self.rot_dim
        rot6d = rotation.to_rot6d(action[..., 3:r], self.rotation)
        return torch.cat((action[..., :3], rot6d, action[..., r:]), dim=-1)

    def to_env(self, action: torch.Tensor) -> torch.Tensor:
        """``(..., model_dim)`` -> ``(..., env_dim)``, the exact inverse of ``to_model``."""
        if self.rotation is None:
            return action
        rot = rotation.from_rot6d(action[..., 3:9], self.rotation)
        return torch.cat((action[..., :3], rot, action[..., 9:]), dim=-1)

    def model_shift_scale(self, shift: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dim normalisation ``(shift, scale)`` of model actions from the env actions' ``(env_dim,)`` ones;
        the 6D rotation columns, unit vectors already, get 0 and 1 (never scaled)."""
        if self.rotation is None:
            return shift, scale
        r = 3 + self.rot_dim
        zeros, ones = torch.zeros(6, dtype=shift.dtype), torch.ones(6, dtype=scale.dtype)
        return torch.cat((shift[:3], zeros, shift[r:])), torch.cat((scale[:3], ones, scale[r:]))


def _range_buffers(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre and half-range for min-max scaling; constant dims get half-range 1 (shift only)."""
    half = (hi - lo) / 2
    half = torch.where(half < _MIN_RANGE / 2, torch.ones_like(half), half)
    return (hi + lo) / 2, half


def _shift_scale(stats: dict[str, list[float]] | None, normalization: str, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(shift, scale)`` so that ``(x - shift) / scale`` is normalised: min-max centre and half-range,
    or the mean and the std clipped to ``[STD_MIN, STD_MAX]``."""
    needed = ("min", "max") if normalization == "minmax" else ("mean", "std")
    if stats is None:
        return torch.zeros(0), torch.ones(0)
    missing = [name for name in needed if name not in stats]
    if missing:
        raise ValueError(f"normalization={normalization!r} needs the {key} statistics {list(needed)}, but they have "
                         f"only {sorted(stats)}; compute them with mimictest.data.stats.array_stats")
    a, b = (torch.tensor(stats[name], dtype=torch.float32) for name in needed)
    if normalization == "minmax":
        return _range_buffers(a, b)
    return a, b.clamp(STD_MIN, STD_MAX)


Size = tuple[int, int]


def per_camera(value: Size | dict[str, Size] | None, cams: list[str], name: str) -> dict[str, Size | None]:
    """One ``(H, W)`` for every camera, or a ``{camera: (H, W)}`` that names each of ``cams``."""
    if isinstance(value, dict):
        missing = [cam for cam in cams if cam not in value]
        if missing:
            raise ValueError(f"{name} has no size for camera(s) {missing}; give every camera in {cams} a size")
        return {cam: tuple(value[cam]) if value[cam] else None for cam in cams}
    return {cam: tuple(value) if value else None for cam in cams}


class Preprocessor(Recorded, nn.Module):
    """Turns uint8 / raw batches into normalised network inputs on the device, and back.

    Args:
        stats: ``{"action": {"min", "max", "mean", "std"}, "low_dim": {...}}`` per-dim lists, in
            env units, as computed by the dataset readers (``low_dim`` may be absent).
        action_space: the env <-> model action mapping.
        normalization: for actions and low-dim observations both, ``"minmax"`` (each dim's
            dataset range to [-1, 1]: Diffusion Policy's ``LinearNormalizer`` in ``"limits"`` mode,
            needed by diffusion samplers, which clip samples to [-1, 1]) or ``"meanstd"``
            (``(x - mean) / std`` with the std clipped to [0.01, 10]: ACT's ``get_norm_stats``, for
            ``action`` and ``qpos``; ACT's std is torch's unbiased one, the readers' the population
            std, a factor ``sqrt(N / (N - 1))`` apart). 6D rotation columns are never scaled.
        cams: the cameras of ``rgb``, in the order the networks see them.
        image_size: ``(H, W)`` of every camera's images, or ``{camera: (H, W)}``; checked on every batch.
        crop_size: ``(h, w)`` crop fed to the network (or one per camera), or ``None`` for no crop.
            Random crops when training, centre crops when evaluating (Diffusion Policy: 84 -> 76 on
            robomimic).
        resize: ``(H', W')`` (or one per camera) to resize to before cropping, or ``None``.
        text_encoder: turns instructions into embeddings (``mimictest.text.TextEncoder``); needed
            for batches with ``lang``. It is not part of the state: the embeddings it made are.
        instructions: instructions to embed now (the dataset's), so training never runs the encoder.

    With a text encoder or instructions, a batch with ``lang`` (``B`` strings) gains ``lang_emb``
    ``(B, D_lang)`` (without either, ``lang`` is dropped: the policy takes none): each distinct
    instruction is embedded once, and the embeddings travel in checkpoints, so a saved policy
    evaluates on its training instructions without the encoder.
    """

    def __init__(
        self,
        stats: dict[str, dict[str, list[float]]],
        action_space: ActionSpace,
        cams: list[str] | tuple[str, ...] = (),
        normalization: str = "minmax",
        image_size: Size | dict[str, Size] | None = None,
        crop_size: Size | dict[str, Size] | None = None,
        resize: Size | dict[str, Size] | None = None,
        text_encoder=None,
        instructions: list[str] | tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r} "
                             "(Diffusion Policy: 'minmax', ACT: 'meanstd')")
        self.action_space = action_space
        self.normalization = normalization
        self.cams = list(cams)
        self.image_size = per_camera(image_size, self.cams, "image_size")
        self.resize = per_camera(resize, self.cams, "resize")
        self.crop_size = per_camera(crop_size, self.cams, "crop_size")
        for cam in self.cams:
            source, crop = self.resize[cam] or self.image_size[cam], self.crop_size[cam]
            if crop and source and (crop[0] > source[0] or crop[1] > source[1]):
                raise ValueError(f"crop_size {crop} is larger than camera {cam!r}'s image {source}; choose a smaller crop")

        # (x - centre) / half: min-max centre and half-range, or mean and std (names kept for checkpoints).
        centre, half = action_space.model_shift_scale(*_shift_scale(stats["action"], normalization, "action"))
        self.register_buffer("action_centre", centre)
        self.register_buffer("action_half", half)
        low_centre, low_half = _shift_scale(stats.get("low_dim") or None, normalization, "low_dim")
        self.register_buffer("low_dim_centre", low_centre)
        self.register_buffer("low_dim_half", low_half)

        self.text_encoder = text_encoder
        self._lang_rows: dict[str, int] = {}  # instruction -> row of lang_table
        lang_dim = text_encoder.dim if text_encoder is not None else 0
        self.register_buffer("lang_table", torch.zeros(0, lang_dim), persistent=False)  # (instructions, D_lang)
        if instructions:
            self.embed(list(instructions))

    def output_image_size(self, cam: str) -> Size | None:
        """``(h, w)`` of the images the network receives from ``cam``."""
        return self.crop_size[cam] or self.resize[cam] or self.image_size[cam]

    @property
    def lang_dim(self) -> int:
        """``D_lang`` of ``lang_emb`` (0 without instructions)."""
        return self.lang_table.shape[1]

    def embed(self, texts: list[str]) -> torch.Tensor:
        """``B`` instructions -> ``(B, D_lang)``; each new distinct instruction runs the encoder once."""
        new = [t for t in dict.fromkeys(texts) if t not in self._lang_rows]
        if new:
            if self.text_encoder is None:
                raise ValueError(
                    f"instruction {new[0]!r} was not seen in training and this Preprocessor has no text_encoder; "
                    "pass text_encoder=TextEncoder(...) to embed new instructions"
                )
            emb = self.text_encoder.encode(new).float().to(self.lang_table.device)  # (len(new), D_lang)
            if self.lang_table.shape[0] == 0:
                self.lang_table = emb.new_zeros(0, emb.shape[1])
            base = len(self._lang_rows)
            self._lang_rows.update((t, base + j) for j, t in enumerate(new))
            self.lang_table = torch.cat((self.lang_table, emb))
        rows = torch.tensor([self._lang_rows[t] for t in texts], device=self.lang_table.device)
        return self.lang_table[rows]

    def get_extra_state(self) -> dict:
        return {"instructions": list(self._lang_rows), "lang_table": self.lang_table.cpu()}

    def set_extra_state(self, state: dict) -> None:
        self._lang_rows = {t: i for i, t in enumerate(state["instructions"])}
        self.lang_table = state["lang_table"].to(self.action_centre.device)

    def normalize_action(self, action: torch.Tensor) -> torch.Tensor:
        """``(..., env_dim)`` env actions -> ``(..., model_dim)``, in [-1, 1] over the data (min-max) or standardised."""
        return (self.action_space.to_model(action.float()) - self.action_centre) / self.action_half

    def unnormalize_action(self, action: torch.Tensor) -> torch.Tensor:
        """``(..., model_dim)`` network output -> ``(..., env_dim)`` env actions."""
        return self.action_space.to_env(action.float() * self.action_half + self.action_centre)

    def normalize_low_dim(self, low_dim: torch.Tensor) -> torch.Tensor:
        """``(..., D)`` -> ``(..., D)``, in [-1, 1] over the dataset's range (min-max) or standardised."""
        if low_dim.shape[-1] != self.low_dim_centre.shape[0]:
            raise ValueError(
                f"low_dim has {low_dim.shape[-1]} dims but the statistics have {self.low_dim_centre.shape[0]}; "
                "the observation keys of the env and the dataset must match"
            )
        return (low_dim.float() - self.low_dim_centre) / self.low_dim_half

    def images(self, rgb: dict[str, torch.Tensor], train: bool) -> dict[str, torch.Tensor]:
        """``{camera: (B, T, H, W, 3) uint8}`` -> ``{camera: (B, T, 3, h, w)}`` float in [-1, 1]."""
        missing = [cam for cam in self.cams if cam not in rgb]
        if missing:
            raise ValueError(f"the batch has no images from camera(s) {missing} (it has {sorted(rgb)}); "
                             "the script's cameras and the data's must match")
        return {cam: self._camera(cam, rgb[cam], train) for cam in self.cams}

    def _camera(self, cam: str, rgb: torch.Tensor, train: bool) -> torch.Tensor:
        """``(B, T, H, W, 3)`` uint8 -> ``(B, T, 3, h, w)`` float in [-1, 1]."""
        if rgb.dtype != torch.uint8:
            raise TypeError(f"rgb[{cam!r}] must be uint8 (0..255) until it reaches the preprocessor, got {rgb.dtype}")
        lead, (H, W) = rgb.shape[:2], rgb.shape[2:4]
        size, resize, crop = self.image_size[cam], self.resize[cam], self.crop_size[cam]
        if size is not None and (H, W) != size:
            raise ValueError(
                f"camera {cam!r} gives {H}x{W} images but this configuration expects {size[0]}x{size[1]}; "
                "set IMAGE_SIZE in the script to the dataset's size, or regenerate the demos at that size"
            )
        x = rgb.reshape(-1, H, W, 3)  # (N, H, W, 3), N = B * T
        if resize and (H, W) != resize:
            x = F.interpolate(x.permute(0, 3, 1, 2).float(), size=resize, mode="bilinear", antialias=True)
            x = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
            H, W = resize
        if crop and (H, W) != crop:
            x = _crop(x, crop, train)
        x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # (N, 3, h, w)
        return x.reshape(lead + x.shape[1:]).contiguous(memory_format=torch.contiguous_format)

    def forward(self, batch: dict, train: bool) -> dict:
        """Raw device batch -> network batch: rgb, low_dim, action, is_pad, task, and lang_emb from lang."""
        out: dict = {}
        if "rgb" in batch:
            out["rgb"] = self.images(batch["rgb"], train)
        if "low_dim" in batch:
            out["low_dim"] = self.normalize_low_dim(batch["low_dim"])
        if "action" in batch:
            out["action"] = self.normalize_action(batch["action"])
        if "is_pad" in batch:
            out["is_pad"] = batch["is_pad"]
        if "task" in batch:
            out["task"] = batch["task"]
        if "lang" in batch and (self.text_encoder is not None or self._lang_rows):  # else no policy input uses it
            out["lang_emb"] = self.embed(list(batch["lang"]))  # (B, D_lang)
        return out


def _crop(x: torch.Tensor, size: Size, train: bool) -> torch.Tensor:
    """``(N, H, W, 3)`` -> ``(N, h, w, 3)``: an independent random window per image, or the centre."""
    N, H, W, _ = x.shape
    h, w = size
    if not train:
        top, left = (H - h) // 2, (W - w) // 2
        return x[:, top : top + h, left : left + w]
    top = torch.randint(0, H - h + 1, (N, 1), device=x.device)
    left = torch.randint(0, W - w + 1, (N, 1), device=x.device)
    rows = (top + torch.arange(h, device=x.device)).unsqueeze(-1)  # (N, h, 1)
    cols = (left + torch.arange(w, device=x.device)).unsqueeze(1)  # (N, 1, w)
    n = torch.arange(N, device=x.device).view(N, 1, 1)
    return x[n, rows, cols]  # (N, h, w, 3)
