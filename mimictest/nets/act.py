"""Action Chunking with Transformers (ACT): the conditional-VAE transformer network.

Zhao et al., "Learning Fine-Grained Bimanual Manipulation with Low-Cost Hardware", RSS 2023
(github.com/tonyzhaozh/act: ``detr/models/{detr_vae,transformer,backbone,position_encoding}.py``,
``imitate_episodes.py``; cross-checked with huggingface/lerobot ``policies/act/modeling_act.py``).

- Vision: one torchvision ResNet-18 shared by every camera (ACT feeds each camera through
  ``backbones[0]``), avgpool and fc dropped; its layer4 map ``(512, ceil(H/32), ceil(W/32))`` is
  projected to ``d_model`` by one 1x1 conv shared across cameras, and every pixel becomes a token
  with DETR's normalised 2D sinusoidal position embedding (``d_model / 2`` channels for y, then
  ``d_model / 2`` for x; positions ``1..h`` scaled to ``(0, 2 pi]``). Each camera gets the same
  embedding, as in ACT. ``shared_backbone=False`` gives each camera its own ResNet instead.
- Normalisation in the ResNet: ACT loads ImageNet weights and freezes BatchNorm
  (``backbone_norm="frozen_batch"`` with ``backbone_weights`` = a local torchvision ResNet-18 file;
  inputs are then normalised with ImageNet's mean and std, as ACT does). Without pretrained weights
  a frozen BatchNorm with fresh statistics is the identity (LeRobot's ACT with
  ``pretrained_backbone_weights=None``), so the default trains the ResNet from scratch with
  GroupNorm (``channels // 16`` groups), Diffusion Policy's choice for from-scratch ResNets: unlike
  trainable BatchNorm it does not depend on ACT's small batches (8), has no train/eval gap, and
  keeps no running statistics for DDP or an EMA to sync.
- Transformer (DETR style, post-norm, ReLU, dropout 0.1): encoder over
  ``[latent, proprio, image tokens]`` with learned position embeddings for the first two tokens;
  decoder whose ``chunk_size`` learned queries start from zeros and cross-attend to the encoder
  output; position embeddings are added to queries and keys at every layer, never to values; a
  final LayerNorm on the decoder and a Linear action head. Xavier-uniform init of both stacks.
  ACT's defaults: d_model 512, 8 heads, 4 encoder layers, dim_feedforward 3200.
- Decoder depth: ACT's code builds 7 decoder layers but reads ``hs[0]``, the first layer's
  (final-LayerNorm'ed) output, so only one layer ever affects the actions (tonyzhaozh/act#25);
  ``num_decoder_layers=1`` is that same computation without six unused layers (LeRobot's default).
- CVAE encoder (training only): a 4-layer post-norm transformer encoder over
  ``[CLS, proprio, action_0..action_{chunk-1}]`` with fixed 1D sinusoidal position embeddings and a
  key padding mask over padded actions; the CLS output is projected to ``mu`` and ``logvar`` of a
  32-d latent, which is sampled with the reparameterisation trick. Without actions (inference)
  the latent is zero, the prior's mean.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimictest.nets.attention import MultiheadAttention
from mimictest.nets.dropout import Dropout
from mimictest.nets.vision import resnet18_trunk
from mimictest.recipe import Recorded


def sinusoidal_1d(num_positions: int, dim: int) -> Tensor:
    """Transformer position table `(num_positions, dim)`: sin on even, cos on odd channels."""
    if dim % 2:
        raise ValueError(f"sinusoidal embeddings need an even dim, got {dim}")
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]  # (P, 1)
    freq = 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim / 2,)
    angles = pos / freq  # (P, dim / 2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1).float()  # (P, dim)


def sinusoidal_2d(height: int, width: int, dim: int, device: torch.device | None = None) -> Tensor:
    """DETR's normalised 2D sine embedding of an `h x w` feature map -> `(h * w, dim)`, row-major.

    The first `dim / 2` channels encode the row, the rest the column; positions `1..n` are scaled
    to `(0, 2 pi]` and expanded into interleaved sin / cos pairs with temperature 10000.
    """
    if dim % 4:
        raise ValueError(f"the 2D sine embedding needs dim divisible by 4, got {dim}")
    half = dim // 2
    freq = 10000.0 ** (torch.arange(0, half, 2, dtype=torch.float32, device=device) / half)  # (half / 2,)

    def encode(n: int) -> Tensor:
        pos = torch.arange(1, n + 1, dtype=torch.float32, device=device) / (n + 1e-6) * (2 * math.pi)  # (n,)
        angles = pos[:, None] / freq  # (n, half / 2)
        return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1)  # (n, half)

    rows = encode(height)[:, None].expand(height, width, half)  # (h, w, half)
    cols = encode(width)[None].expand(height, width, half)  # (h, w, half)
    return torch.cat((rows, cols), dim=-1).reshape(height * width, dim)


def _with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos.to(x.dtype)


class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer; `pos` is added to queries and keys only. `(B, S, d)` -> `(B, S, d)`."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)

    def forward(self, x: Tensor, pos: Tensor | None = None, key_padding_mask: Tensor | None = None) -> Tensor:
        q = k = _with_pos(x, pos)
        attn = self.self_attn(q, k, x, key_padding_mask=key_padding_mask)
        x = self.norm1(x + self.dropout1(attn))
        ff = self.linear2(self.dropout(F.relu(self.linear1(x))))
        return self.norm2(x + self.dropout2(ff))


class DecoderLayer(nn.Module):
    """Post-norm transformer decoder layer: self-attention, cross-attention, feed-forward.

    `query_pos` is added to the queries (and self-attention keys), `memory_pos` to the memory keys.
    `(B, Q, d)`, memory `(B, S, d)` -> `(B, Q, d)`.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.cross_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.dropout3 = Dropout(dropout)

    def forward(self, x: Tensor, memory: Tensor, query_pos: Tensor, memory_pos: Tensor) -> Tensor:
        q = k = _with_pos(x, query_pos)
        attn = self.self_attn(q, k, x)
        x = self.norm1(x + self.dropout1(attn))
        attn = self.cross_attn(_with_pos(x, query_pos), _with_pos(memory, memory_pos), memory)
        x = self.norm2(x + self.dropout2(attn))
        ff = self.linear2(self.dropout(F.relu(self.linear1(x))))
        return self.norm3(x + self.dropout3(ff))


class Encoder(nn.Module):
    """A stack of post-norm encoder layers (no final norm, as ACT with ``pre_norm=False``)."""

    def __init__(self, num_layers: int, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(d_model, nhead, dim_feedforward, dropout) for _ in range(num_layers))

    def forward(self, x: Tensor, pos: Tensor | None = None, key_padding_mask: Tensor | None = None) -> Tensor:
        for layer in self.layers:
            x = layer(x, pos, key_padding_mask)
        return x


class Decoder(nn.Module):
    """A stack of post-norm decoder layers followed by a LayerNorm."""

    def __init__(self, num_layers: int, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(d_model, nhead, dim_feedforward, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, memory: Tensor, query_pos: Tensor, memory_pos: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, memory, query_pos, memory_pos)
        return self.norm(x)


class ACT(Recorded, nn.Module):
    """`{"rgb": {cam: (B, 1, 3, H_c, W_c)}, "low_dim": (B, 1, D), "lang_emb": (B, D_lang)}` -> `(B, chunk, A)`.

    Actions are also given when training (the CVAE posterior needs them).

    Args:
        action_dim: `A`, e.g. 14 for ALOHA joints, 10 for robomimic end-effector actions.
        chunk_size: actions predicted per call (ACT: 100 at 50 Hz).
        low_dim_dim: `D` of the proprioceptive observation (0: no proprio token, no `low_dim` key).
        cams: camera names in `rgb` (empty: no `rgb` key; the encoder then sees only latent +
            proprio). Cameras may differ in size; each gets its own token map.
        lang_dim: `D_lang` of the instruction embedding, which becomes one more encoder token
            (0: no instruction).
        shared_backbone: one ResNet-18 for every camera (ACT) or one per camera.
        backbone_norm, backbone_weights: see `mimictest.nets.vision.resnet18_trunk`; ACT: ``"frozen_batch"`` with ImageNet
            weights. With weights, images are normalised with ImageNet's mean and std.
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout: the
            transformer (ACT: 512, 8, 4, 1 effective, 3200, 0.1).
        num_vae_encoder_layers, latent_dim: the CVAE encoder (ACT: 4, 32).
    """

    def __init__(
        self,
        action_dim: int,
        chunk_size: int,
        low_dim_dim: int,
        cams: list[str] | tuple[str, ...],
        lang_dim: int = 0,
        shared_backbone: bool = True,
        backbone_norm: str = "group",
        backbone_weights: str | None = None,
        d_model: int = 512,
        nhead: int = 8,
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 1,
        dim_feedforward: int = 3200,
        dropout: float = 0.1,
        num_vae_encoder_layers: int = 4,
        latent_dim: int = 32,
    ) -> None:
        super().__init__()
        if action_dim < 1 or chunk_size < 1:
            raise ValueError(f"action_dim and chunk_size must be >= 1, got {action_dim} and {chunk_size}")
        cams = list(cams)
        if low_dim_dim < 0 or lang_dim < 0 or len(cams) + low_dim_dim == 0:
            raise ValueError(
                f"ACT needs cameras or low_dim_dim > 0, and lang_dim >= 0; got cams={cams}, low_dim_dim={low_dim_dim}, "
                f"lang_dim={lang_dim}"
            )
        if d_model % nhead or d_model % 4:
            raise ValueError(f"d_model={d_model} must be divisible by nhead={nhead} and by 4 (2D sine embedding)")
        self.action_dim, self.chunk_size = action_dim, chunk_size
        self.low_dim_dim, self.cams, self.lang_dim = low_dim_dim, cams, lang_dim
        self.latent_dim, self.d_model = latent_dim, d_model
        stack = dict(d_model=d_model, nhead=nhead, dim_feedforward=dim_feedforward, dropout=dropout)

        # Observation tokens.
        num_backbones = 0 if not cams else (1 if shared_backbone else len(cams))
        self.backbones = nn.ModuleList(resnet18_trunk(backbone_norm, backbone_weights) for _ in range(num_backbones))
        self.imagenet_input = backbone_weights is not None
        self.register_buffer("imagenet_mean", torch.tensor([0.485, 0.456, 0.406])[:, None, None], persistent=False)
        self.register_buffer("imagenet_std", torch.tensor([0.229, 0.224, 0.225])[:, None, None], persistent=False)
        self.image_proj = nn.Conv2d(512, d_model, kernel_size=1) if cams else None
        self.low_dim_proj = nn.Linear(low_dim_dim, d_model) if low_dim_dim else None
        self.lang_proj = nn.Linear(lang_dim, d_model) if lang_dim else None
        self.latent_proj = nn.Linear(latent_dim, d_model)
        self.token_pos = nn.Parameter(torch.randn(1 + (low_dim_dim > 0) + (lang_dim > 0), d_model))  # latent, proprio, lang
        # Transformer.
        self.encoder = Encoder(num_encoder_layers, **stack)
        self.decoder = Decoder(num_decoder_layers, **stack)
        self.query_pos = nn.Parameter(torch.randn(chunk_size, d_model))
        self.action_head = nn.Linear(d_model, action_dim)
        for p in [*self.encoder.parameters(), *self.decoder.parameters()]:
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        # CVAE encoder.
        self.vae_cls = nn.Parameter(torch.randn(1, d_model))
        self.vae_low_dim_proj = nn.Linear(low_dim_dim, d_model) if low_dim_dim else None
        self.vae_action_proj = nn.Linear(action_dim, d_model)
        self.vae_encoder = Encoder(num_vae_encoder_layers, **stack)
        self.vae_latent_head = nn.Linear(d_model, 2 * latent_dim)
        num_vae_tokens = 1 + (low_dim_dim > 0) + chunk_size
        self.register_buffer("vae_pos", sinusoidal_1d(num_vae_tokens, d_model), persistent=False)

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The ResNet parameters (ACT trains them with their own learning rate)."""
        return list(self.backbones.parameters())

    def _low_dim(self, batch: dict[str, Tensor]) -> Tensor | None:
        """`(B, 1, D)` -> `(B, D)`, or None without proprio."""
        if not self.low_dim_dim:
            return None
        low_dim = batch.get("low_dim")
        if low_dim is None or low_dim.ndim != 3 or low_dim.shape[1:] != (1, self.low_dim_dim):
            got = None if low_dim is None else tuple(low_dim.shape)
            raise ValueError(
                f"batch['low_dim'] must be (B, 1, {self.low_dim_dim}), got {got}; ACT sees one observation step "
                "(OBS_HORIZON = 1), and low_dim_dim must be the concatenated low-dim observation size"
            )
        return low_dim[:, 0]

    def _rgb(self, batch: dict) -> list[Tensor] | None:
        """`{cam: (B, 1, 3, H_c, W_c)}` -> one `(B, 3, H_c, W_c)` per camera, or None without cameras."""
        if not self.cams:
            return None
        rgb = batch.get("rgb")
        if not isinstance(rgb, dict) or any(cam not in rgb for cam in self.cams):
            got = sorted(rgb) if isinstance(rgb, dict) else type(rgb).__name__
            raise ValueError(f"batch['rgb'] must be {{camera: (B, 1, 3, H, W)}} with cameras {self.cams}, got {got}; "
                             "run the Preprocessor first and list the same cameras in both")
        images = [rgb[cam] for cam in self.cams]
        for cam, image in zip(self.cams, images):
            if image.ndim != 5 or image.shape[1:3] != (1, 3):
                raise ValueError(
                    f"batch['rgb'][{cam!r}] must be (B, 1, 3, H, W) float in [-1, 1], got {tuple(image.shape)}; ACT "
                    "sees one observation step (OBS_HORIZON = 1)"
                )
        return [image[:, 0] for image in images]

    def _lang(self, batch: dict) -> Tensor | None:
        """`(B, D_lang)`, or None without instructions."""
        if not self.lang_dim:
            return None
        lang = batch.get("lang_emb")
        if lang is None or lang.ndim != 2 or lang.shape[1] != self.lang_dim:
            got = None if lang is None else tuple(lang.shape)
            raise ValueError(
                f"this ACT is conditioned on instructions: batch['lang_emb'] must be (B, {self.lang_dim}), got {got}; "
                "train on a dataset with instructions (a 'lang' per episode) or build it with lang_dim=0"
            )
        return lang

    def image_tokens(self, rgb: list[Tensor]) -> tuple[Tensor, Tensor]:
        """One `(B, 3, H_c, W_c)` per camera -> tokens `(B, S_img, d)` and their position embedding `(S_img, d)`.

        A shared backbone sees cameras of one size in one batch; each camera's token map has its
        own 2D sine embedding.
        """
        if self.imagenet_input:  # [-1, 1] -> ImageNet-normalised, what pretrained weights expect
            rgb = [((image + 1) / 2 - self.imagenet_mean) / self.imagenet_std for image in rgb]
        if len(self.backbones) == 1 and len({image.shape for image in rgb}) == 1:
            feats = self.backbones[0](torch.cat(rgb)).chunk(len(rgb))  # cams x (B, 512, h, w)
        else:
            feats = [self.backbones[i % len(self.backbones)](image) for i, image in enumerate(rgb)]
        tokens, pos = [], []
        for feat in feats:
            h, w = feat.shape[-2:]
            tokens.append(self.image_proj(feat).flatten(2).transpose(1, 2))  # (B, h * w, d)
            pos.append(sinusoidal_2d(h, w, self.d_model, feat.device))  # (h * w, d)
        return torch.cat(tokens, dim=1), torch.cat(pos)

    def encode_latent(self, low_dim: Tensor | None, action: Tensor, is_pad: Tensor) -> tuple[Tensor, Tensor]:
        """CVAE posterior from `action (B, chunk, A)` and `is_pad (B, chunk)` -> `mu, logvar (B, latent)` in fp32."""
        batch_size = action.shape[0]
        tokens = [self.vae_cls.expand(batch_size, 1, self.d_model)]
        if low_dim is not None:
            tokens.append(self.vae_low_dim_proj(low_dim)[:, None])  # (B, 1, d)
        tokens.append(self.vae_action_proj(action))  # (B, chunk, d)
        x = torch.cat([t.to(tokens[-1].dtype) for t in tokens], dim=1)  # (B, 1 + [1] + chunk, d)
        keep = torch.zeros(batch_size, x.shape[1] - self.chunk_size, dtype=torch.bool, device=x.device)
        mask = torch.cat((keep, is_pad.bool()), dim=1)  # (B, S) True = padding, never attended to
        cls = self.vae_encoder(x, self.vae_pos, mask)[:, 0]  # (B, d)
        mu, logvar = self.vae_latent_head(cls).float().chunk(2, dim=-1)
        return mu, logvar

    def forward(
        self, batch: dict[str, Tensor], action: Tensor | None = None, is_pad: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Actions `(B, chunk, A)` and the posterior's `mu, logvar (B, latent)`.

        With `action (B, chunk, A)` and `is_pad (B, chunk)` the latent is sampled from the CVAE
        posterior (training); without them it is zero and `mu, logvar` are None (inference).
        """
        low_dim, rgb, lang = self._low_dim(batch), self._rgb(batch), self._lang(batch)
        observed = rgb[0] if rgb is not None else low_dim
        batch_size = observed.shape[0]
        if action is not None:
            if action.shape != (batch_size, self.chunk_size, self.action_dim):
                raise ValueError(
                    f"action must be ({batch_size}, {self.chunk_size}, {self.action_dim}), got {tuple(action.shape)}"
                )
            if is_pad is None or is_pad.shape != (batch_size, self.chunk_size):
                got = None if is_pad is None else tuple(is_pad.shape)
                raise ValueError(f"is_pad must be ({batch_size}, {self.chunk_size}) bool with the actions, got {got}")
            mu, logvar = self.encode_latent(low_dim, action, is_pad)
            latent = mu + (0.5 * logvar).exp() * torch.randn_like(mu)  # (B, latent)
        else:
            mu = logvar = None
            latent = torch.zeros(batch_size, self.latent_dim, device=observed.device)

        tokens = [self.latent_proj(latent)[:, None]]  # (B, 1, d)
        if low_dim is not None:
            tokens.append(self.low_dim_proj(low_dim)[:, None])  # (B, 1, d)
        if lang is not None:
            tokens.append(self.lang_proj(lang)[:, None])  # (B, 1, d)
        pos = [self.token_pos]
        if rgb is not None:
            image_tokens, image_pos = self.image_tokens(rgb)
            tokens.append(image_tokens)
            pos.append(image_pos)
        dtype = tokens[-1].dtype
        x = torch.cat([t.to(dtype) for t in tokens], dim=1)  # (B, S, d)
        pos = torch.cat([p.float() for p in pos])  # (S, d)
        memory = self.encoder(x, pos)  # (B, S, d)
        queries = torch.zeros(batch_size, self.chunk_size, self.d_model, dtype=memory.dtype, device=memory.device)
        out = self.decoder(queries, memory, self.query_pos, pos)  # (B, chunk, d)
        return self.action_head(out), mu, logvar
