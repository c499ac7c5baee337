"""RT-1: FiLM-EfficientNet image tokens, TokenLearner, a decoder-only transformer and an action head.

Brohan et al. 2022, "RT-1: Robotics Transformer for Real-World Control at Scale"
(github.com/google-research/robotics_transformer: ``transformer_network.py``, ``transformer.py``,
``tokenizers/``), and EDiRobotics/mimictest's ``Nets/RT1.py`` variant with action chunks.

- Image tokens (`mimictest.nets.film`, `mimictest.nets.token_learner`): each camera image of each
  observation step goes through an EfficientNet with FiLM after every MBConv block, a 1x1
  convolution to `token_dim` (RT-1: 512) and TokenLearner down to `num_tokens` (RT-1: 8) tokens.
  FiLM is conditioned on the instruction embedding `lang_emb` (RT-1: the Universal Sentence
  Encoder), or, for multi-task data without instructions, on a learned embedding of
  `batch["task"]`, or is off.
- Low-dim state (not in RT-1, which sees images only): one more token per step when
  `low_dim_dim > 0`.
- Transformer (RT-1: 8 pre-norm layers, 8 heads, d_model 512, 6 frames): a decoder-only stack
  over the `obs_horizon x (cams x num_tokens [+ 1])` observation tokens with learned position
  embeddings and causal masking over time: a token of step t attends to the tokens of steps <= t.
  `chunk_size` learned action queries follow the observation tokens and attend to all of them and
  to each other; their outputs are the prediction. RT-1's own readout also predicts all action
  dimensions of a step at once from the image tokens (its action tokens never attend to each
  other), for one action per step; with ``chunk_size=1`` and ``bins=256`` this is that head.
- Action heads: ``bins=None`` gives the continuous chunk `(B, chunk, A)` (mimictest's variant,
  trained with L1 or MSE by `mimictest.policies.regression.RegressionPolicy`); ``bins=256`` gives
  RT-1's logits `(B, chunk, A, 256)` over uniform bins of the normalised [-1, 1] range.

RT-1's layers (``configs/transformer_mixin.gin``) have a 512-wide residual stream, 8 heads of key
size 128 and a feed-forward of one 512-wide Dense layer without activation; here heads are
`d_model / nhead` wide and the feed-forward is the usual Linear-GELU-Linear of `dim_feedforward`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimictest.nets.dropout import Dropout
from mimictest.nets.film import FiLMEfficientNet
from mimictest.nets.token_learner import TokenLearner
from mimictest.recipe import Recorded


class Block(nn.Module):
    """Pre-norm transformer layer (RT-1's ``_TransformerLayer``): `(B, L, d)`, mask `(L, L)` -> `(B, L, d)`."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model={d_model} must be divisible by nhead={nhead}")
        self.nhead = nhead
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, dim_feedforward), nn.GELU(), nn.Linear(dim_feedforward, d_model))
        self.drop1, self.drop2 = Dropout(dropout), Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """`mask` is True where a query (row) may attend to a key (column)."""
        q, k, v = self.qkv(self.norm1(x)).unflatten(-1, (3, self.nhead, -1)).permute(2, 0, 3, 1, 4)  # (B, h, L, hd) each
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, L, hd)
        x = x + self.drop1(self.out(attn.transpose(1, 2).flatten(2)))
        return x + self.drop2(self.ff(self.norm2(x)))


def time_causal_mask(obs_horizon: int, tokens_per_step: int, num_queries: int) -> Tensor:
    """`(L, L)` bool, True = may attend, for `obs_horizon` steps of `tokens_per_step` tokens then `num_queries` queries.

    Observation tokens of step t see every token of steps 0..t; the queries see everything.
    """
    step = torch.arange(obs_horizon).repeat_interleave(tokens_per_step)  # (T * N,)
    step = torch.cat((step, torch.full((num_queries,), obs_horizon)))  # queries come after every step
    return step[None, :] <= step[:, None]


class RT1(Recorded, nn.Module):
    """`{"rgb": {cam: (B, T, 3, H, W)}, "low_dim": (B, T, D), "lang_emb": (B, D_lang) | "task": (B,)}` -> actions.

    Output: `(B, chunk, A)` continuous actions (``bins=None``) or `(B, chunk, A, bins)` logits.

    Args:
        action_dim: `A` (10 for robomimic's xyz + 6D rotation + gripper).
        chunk_size: actions predicted per call (RT-1: 1, the current step's action).
        obs_horizon: `T`, observation steps seen (RT-1: 6).
        cams: camera names in `rgb` (at least one; RT-1 has one).
        low_dim_dim: `D` of the proprioceptive state, one token per step (0: none, as RT-1).
        lang_dim: `D_lang` of `lang_emb`, the FiLM condition (RT-1: 512, the Universal Sentence
            Encoder). 0 without instructions.
        num_tasks: with `lang_dim=0`, FiLM on a learned `task_emb_dim` embedding of
            `batch["task"]` for this many tasks (0: FiLM off).
        efficientnet, backbone_norm, backbone_weights: the trunk (`mimictest.nets.film`; RT-1:
            ``"efficientnet_b3"`` with ImageNet weights).
        shared_backbone: one EfficientNet for every camera, or one per camera.
        token_dim, num_tokens: channels of the image tokens and tokens per image (RT-1: 512, 8).
        d_model, nhead, num_layers, dim_feedforward, dropout: the transformer (RT-1: 512, 8, 8,
            512 (see the module docstring), 0.1).
        bins: ``None`` for the continuous head, or the number of uniform bins (RT-1: 256).
    """

    def __init__(
        self,
        action_dim: int,
        chunk_size: int,
        obs_horizon: int,
        cams: list[str] | tuple[str, ...],
        low_dim_dim: int = 0,
        lang_dim: int = 0,
        num_tasks: int = 0,
        task_emb_dim: int = 64,
        efficientnet: str = "efficientnet_b3",
        backbone_norm: str = "group",
        backbone_weights: str | None = None,
        shared_backbone: bool = True,
        token_dim: int = 512,
        num_tokens: int = 8,
        d_model: int = 512,
        nhead: int = 8,
        num_layers: int = 8,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        bins: int | None = None,
    ) -> None:
        super().__init__()
        cams = list(cams)
        if action_dim < 1 or chunk_size < 1 or obs_horizon < 1:
            raise ValueError(f"action_dim, chunk_size and obs_horizon must be >= 1, got {action_dim}, {chunk_size}, "
                             f"{obs_horizon}")
        if not cams:
            raise ValueError("RT-1 tokenizes camera images: give at least one camera in cams")
        if low_dim_dim < 0 or lang_dim < 0 or num_tasks < 0:
            raise ValueError(f"low_dim_dim, lang_dim and num_tasks must be >= 0, got {low_dim_dim}, {lang_dim}, {num_tasks}")
        if lang_dim and num_tasks:
            raise ValueError("FiLM takes either the instruction (lang_dim > 0) or a task embedding (num_tasks > 0), not both")
        if bins is not None and bins < 2:
            raise ValueError(f"bins must be None (continuous head) or >= 2, got {bins}")
        self.action_dim, self.chunk_size, self.obs_horizon = action_dim, chunk_size, obs_horizon
        self.cams, self.low_dim_dim, self.lang_dim, self.num_tasks = cams, low_dim_dim, lang_dim, num_tasks
        self.bins = bins

        self.task_emb = nn.Embedding(num_tasks, task_emb_dim) if num_tasks else None
        cond_dim = lang_dim or (task_emb_dim if num_tasks else 0)
        self.backbones = nn.ModuleList(
            FiLMEfficientNet(efficientnet, cond_dim, token_dim, backbone_norm, backbone_weights)
            for _ in range(1 if shared_backbone else len(cams))
        )
        self.token_learner = TokenLearner(token_dim, num_tokens)
        self.image_proj = nn.Linear(token_dim, d_model)
        self.low_dim_proj = nn.Linear(low_dim_dim, d_model) if low_dim_dim else None
        self.tokens_per_step = len(cams) * num_tokens + (low_dim_dim > 0)
        num_obs_tokens = obs_horizon * self.tokens_per_step
        self.pos = nn.Parameter(torch.randn(num_obs_tokens + chunk_size, d_model) * 0.02)
        self.queries = nn.Parameter(torch.randn(chunk_size, d_model) * 0.02)
        self.register_buffer("mask", time_causal_mask(obs_horizon, self.tokens_per_step, chunk_size), persistent=False)
        self.blocks = nn.ModuleList(Block(d_model, nhead, dim_feedforward, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, action_dim * (bins or 1))

    def vision_tower(self) -> list[nn.Module]:
        """The EfficientNet trunks (what ``FREEZE_VISION_TOWER`` freezes; FiLM layers, projections and TokenLearner stay trainable)."""
        return [backbone.trunk for backbone in self.backbones]

    def param_groups(self, lr_vision: float) -> list[dict]:
        """AdamW groups: the EfficientNet trunks at `lr_vision`, everything else at the optimiser's `lr`."""
        in_tower = {id(p) for m in self.vision_tower() for p in m.parameters()}
        return [{"params": [p for p in self.parameters() if id(p) not in in_tower]},
                {"params": [p for m in self.vision_tower() for p in m.parameters()], "lr": lr_vision}]

    def _condition(self, batch: dict, batch_size: int) -> Tensor | None:
        """The FiLM condition `(B, cond_dim)`, or None when FiLM is off."""
        if self.lang_dim:
            lang = batch.get("lang_emb")
            if lang is None or lang.shape != (batch_size, self.lang_dim):
                got = None if lang is None else tuple(lang.shape)
                raise ValueError(
                    f"this RT-1 is conditioned on instructions: batch['lang_emb'] must be ({batch_size}, {self.lang_dim}), "
                    f"got {got}; train on a dataset with instructions (a 'lang' per episode) or build it with lang_dim=0"
                )
            return lang
        if self.num_tasks:
            task = batch.get("task")
            if task is None or task.shape != (batch_size,):
                got = None if task is None else tuple(task.shape)
                raise ValueError(f"this RT-1 is conditioned on task ids: batch['task'] must be ({batch_size},) int64, got "
                                 f"{got}; use multi-task data or build it with num_tasks=0")
            return self.task_emb(task.long())
        return None

    def _images(self, batch: dict) -> list[Tensor]:
        """One `(B, T, 3, H, W)` per camera, checked."""
        rgb = batch.get("rgb")
        if not isinstance(rgb, dict) or any(cam not in rgb for cam in self.cams):
            got = sorted(rgb) if isinstance(rgb, dict) else type(rgb).__name__
            raise ValueError(f"batch['rgb'] must be {{camera: (B, T, 3, H, W)}} with cameras {self.cams}, got {got}; "
                             "run the Preprocessor first and list the same cameras in both")
        images = [rgb[cam] for cam in self.cams]
        for cam, image in zip(self.cams, images):
            if image.ndim != 5 or image.shape[1:3] != (self.obs_horizon, 3):
                raise ValueError(f"batch['rgb'][{cam!r}] must be (B, {self.obs_horizon}, 3, H, W), got {tuple(image.shape)}; "
                                 "the dataset's obs_horizon must match the network's")
        return images

    def image_tokens(self, images: list[Tensor], cond: Tensor | None) -> Tensor:
        """One `(B, T, 3, H, W)` per camera -> `(B, T, cams * num_tokens, token_dim)`."""
        B, T = images[0].shape[:2]
        flat = [image.flatten(0, 1) for image in images]  # cams x (B * T, 3, H, W)
        step_cond = None if cond is None else cond.repeat_interleave(T, dim=0)  # (B * T, cond_dim)
        if len(self.backbones) == 1 and len({image.shape for image in flat}) == 1:
            all_cond = None if cond is None else step_cond.repeat(len(flat), 1)
            maps = self.backbones[0](torch.cat(flat), all_cond).chunk(len(flat))  # cams x (B * T, token_dim, h, w)
        else:
            maps = [self.backbones[i % len(self.backbones)](image, step_cond) for i, image in enumerate(flat)]
        tokens = [self.token_learner(fmap).unflatten(0, (B, T)) for fmap in maps]  # cams x (B, T, num_tokens, token_dim)
        return torch.cat(tokens, dim=2)

    def forward(self, batch: dict) -> Tensor:
        """Observations -> `(B, chunk, A)` actions in [-1, 1] model space, or `(B, chunk, A, bins)` logits."""
        images = self._images(batch)
        B, T = images[0].shape[:2]
        tokens = self.image_proj(self.image_tokens(images, self._condition(batch, B)))  # (B, T, cams * K, d)
        if self.low_dim_proj is not None:
            low_dim = batch.get("low_dim")
            if low_dim is None or low_dim.shape != (B, T, self.low_dim_dim):
                got = None if low_dim is None else tuple(low_dim.shape)
                raise ValueError(f"batch['low_dim'] must be ({B}, {T}, {self.low_dim_dim}), got {got}; set low_dim_dim "
                                 "to the concatenated low-dim observation size")
            tokens = torch.cat((tokens, self.low_dim_proj(low_dim).to(tokens.dtype)[:, :, None]), dim=2)
        x = torch.cat((tokens.flatten(1, 2), self.queries.to(tokens.dtype).expand(B, -1, -1)), dim=1)  # (B, L, d)
        x = x + self.pos.to(x.dtype)
        for block in self.blocks:
            x = block(x, self.mask)
        out = self.head(self.norm(x[:, -self.chunk_size:]))  # (B, chunk, A * bins)
        if self.bins is None:
            return out
        return out.unflatten(-1, (self.action_dim, self.bins))  # (B, chunk, A, bins)
