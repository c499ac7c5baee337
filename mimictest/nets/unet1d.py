"""Conditional 1D temporal UNet for action-chunk denoising.

Architecture of Chi et al., "Diffusion Policy: Visuomotor Policy Learning via Action Diffusion",
RSS 2023 (reference code: github.com/real-stanford/diffusion_policy, `ConditionalUnet1D`):
sinusoidal diffusion-step embedding -> MLP, concatenated with a flat observation feature vector to
form the global condition; residual blocks of Conv1d -> GroupNorm(8) -> Mish with FiLM
(per-channel scale and bias) conditioning; strided-conv downsampling, transposed-conv upsampling
and skip connections across levels. Paper defaults: `down_dims=(256, 512, 1024)`, `kernel_size=5`,
`diffusion_step_embed_dim=256` (the low-dim configs) or 128 (the image configs), `n_groups=8`.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimictest.recipe import Recorded


class SinusoidalPosEmb(nn.Module):
    """Transformer-style sinusoidal embedding of a scalar (the diffusion step)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2 != 0 or dim < 4:
            raise ValueError(f"SinusoidalPosEmb needs an even dim >= 4, got {dim}")
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        """`(B,)` -> `(B, dim)`."""
        half = self.dim // 2
        scale = math.log(10000) / (half - 1)
        freqs = torch.exp(torch.arange(half, device=x.device, dtype=torch.float32) * -scale)
        args = x.float()[:, None] * freqs[None, :]  # (B, half)
        return torch.cat((args.sin(), args.cos()), dim=-1)


class MatmulConv1d(nn.Conv1d):
    """`nn.Conv1d(in_ch, out_ch, k, stride, padding=k // 2)` on time-major `(B, T, C)` activations, as
    one matmul over unfolded windows (im2col).

    Same parameters, initialisation and state-dict keys as the `nn.Conv1d`; stride 1 keeps the
    length, stride 2 halves it (the UNet's downsampling). At the UNet's short horizons (T = 4..16)
    and wide channels, oneDNN's conv1d backward is the bottleneck on CPU: for (B=32, 2048 -> 2048
    channels, T=4, k=5) forward + backward takes 267 ms in bf16 as a convolution and 79 ms as this
    matmul (`python -m mimictest.bench train --config dp-pusht-image` shows the whole-step effect).
    The unfolded input is only `k / stride` times the input, which is small at these horizons.
    Time-major activations make the matmul's output the next layer's input with no transpose, and
    a 1x1 convolution a plain `F.linear`.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1) -> None:
        if kernel_size % 2 != 1:
            raise ValueError(f"MatmulConv1d needs an odd kernel_size (padding k // 2 on each side), got {kernel_size}")
        super().__init__(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        """`(B, T, in_ch)` -> `(B, T', out_ch)`, `T' = ceil(T / stride)`."""
        batch, _, in_ch = x.shape
        k, stride = self.kernel_size[0], self.stride[0]
        weight = self.weight.reshape(self.out_channels, in_ch * k)  # (out_ch, in_ch*k)
        if k == 1 and stride == 1:
            return F.linear(x, weight, self.bias)
        windows = F.pad(x, (0, 0, k // 2, k // 2)).unfold(1, k, stride)  # (B, T', in_ch, k)
        horizon = windows.shape[1]
        cols = windows.reshape(batch * horizon, in_ch * k)  # (B*T', in_ch*k)
        return F.linear(cols, weight, self.bias).view(batch, horizon, self.out_channels)


class Upsample1d(nn.ConvTranspose1d):
    """`nn.ConvTranspose1d(ch, ch, 4, stride=2, padding=1)` (the UNet's upsampling, doubling T) on
    time-major `(B, T, C)` activations, as one matmul and its two output phases.

    With `o = 2i - 1 + j`, output step `2m` gathers taps 1 and 3 of inputs `m` and `m - 1`, and step
    `2m + 1` taps 0 and 2 of inputs `m + 1` and `m`; one matmul gives every input's four taps.
    Same parameters and state-dict keys as the `nn.ConvTranspose1d`.
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(in_ch, out_ch, 4, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """`(B, T, in_ch)` -> `(B, 2T, out_ch)`."""
        batch, horizon, in_ch = x.shape
        taps = x.reshape(batch * horizon, in_ch) @ self.weight.reshape(in_ch, -1)  # (B*T, out_ch*4)
        taps = taps.view(batch, horizon, self.out_channels, 4)  # (B, T, out_ch, tap)
        even = taps[..., 1] + F.pad(taps[:, :-1, :, 3], (0, 0, 1, 0))  # (B, T, out_ch): x[m] w1 + x[m-1] w3
        odd = taps[..., 2] + F.pad(taps[:, 1:, :, 0], (0, 0, 0, 1))  # x[m] w2 + x[m+1] w0
        return (torch.stack((even, odd), dim=2).view(batch, 2 * horizon, self.out_channels)
                + self.bias)  # (B, 2T, out_ch)


class TimeGroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` on time-major `(B, T, C)` activations: the same statistics, parameters and
    state-dict keys, computed by PyTorch's channels-last kernel, so no transposed copy is made."""

    def forward(self, x: Tensor) -> Tensor:
        """`(B, T, C)` -> `(B, T, C)`."""
        batch, horizon, channels = x.shape
        nhwc = x.view(batch, horizon, 1, channels).permute(0, 3, 1, 2)  # (B, C, T, 1), channels-last in memory
        out = F.group_norm(nhwc, self.num_groups, self.weight, self.bias, self.eps)  # (B, C, T, 1)
        return out.permute(0, 2, 3, 1).reshape(batch, horizon, channels)  # a view when out is channels-last


class Conv1dBlock(nn.Sequential):
    """Conv1d -> GroupNorm -> Mish, length-preserving, on time-major `(B, T, C)`."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, n_groups: int) -> None:
        super().__init__(
            MatmulConv1d(in_ch, out_ch, kernel_size),
            TimeGroupNorm(n_groups, out_ch),
            nn.Mish(),
        )


class ConditionalResidualBlock1D(nn.Module):
    """Two Conv1d blocks with FiLM conditioning in between and a residual connection."""

    def __init__(self, in_ch: int, out_ch: int, cond_dim: int, kernel_size: int, n_groups: int) -> None:
        super().__init__()
        self.out_ch = out_ch
        self.block1 = Conv1dBlock(in_ch, out_ch, kernel_size, n_groups)
        self.block2 = Conv1dBlock(out_ch, out_ch, kernel_size, n_groups)
        self.cond_encoder = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, out_ch * 2))
        self.residual_conv = MatmulConv1d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        """`x (B, T, in_ch)`, `cond (B, cond_dim)` -> `(B, T, out_ch)`."""
        out = self.block1(x)  # (B, T, out_ch)
        film = self.cond_encoder(cond).unsqueeze(1)  # (B, 1, 2 * out_ch)
        scale, bias = film[..., : self.out_ch], film[..., self.out_ch :]
        out = self.block2(scale * out + bias)
        return out + self.residual_conv(x)


class ConditionalUnet1D(Recorded, nn.Module):
    """Noise-prediction UNet over the time axis of an action chunk.

    `forward(sample (B, T, A), timestep (B,) or scalar, global_cond (B, n_obs_steps * cond_dim)) -> (B, T, A)`,
    where `global_cond` is the flattened `(B, n_obs_steps, cond_dim)` per-step observation features
    that `DiffusionPolicy` passes (Diffusion Policy's FiLM condition). With `len(down_dims) = L`
    levels, the chunk length T must be divisible by `2 ** (L - 1)`.
    """

    def __init__(
        self,
        action_dim: int,
        cond_dim: int,
        n_obs_steps: int = 1,
        down_dims: tuple[int, ...] = (256, 512, 1024),
        kernel_size: int = 5,
        n_groups: int = 8,
        diffusion_step_embed_dim: int = 128,
    ) -> None:
        super().__init__()
        if len(down_dims) < 1:
            raise ValueError("down_dims needs at least one level, e.g. (256, 512, 1024)")
        bad = [d for d in down_dims if d % n_groups != 0]
        if bad:
            raise ValueError(f"every entry of down_dims must be divisible by n_groups={n_groups}; got {bad}")
        self.action_dim = action_dim
        self.global_cond_dim = global_cond_dim = n_obs_steps * cond_dim
        self.num_downsamples = len(down_dims) - 1

        dsed = diffusion_step_embed_dim
        self.step_encoder = nn.Sequential(
            SinusoidalPosEmb(dsed),
            nn.Linear(dsed, dsed * 4),
            nn.Mish(),
            nn.Linear(dsed * 4, dsed),
        )
        cond_dim = dsed + global_cond_dim

        def res(i: int, o: int) -> ConditionalResidualBlock1D:
            return ConditionalResidualBlock1D(i, o, cond_dim, kernel_size, n_groups)

        dims = (action_dim, *down_dims)
        pairs = list(zip(dims[:-1], dims[1:]))
        self.down = nn.ModuleList()
        for level, (d_in, d_out) in enumerate(pairs):
            is_last = level == len(pairs) - 1
            resample = nn.Identity() if is_last else MatmulConv1d(d_out, d_out, 3, stride=2)
            self.down.append(nn.ModuleList([res(d_in, d_out), res(d_out, d_out), resample]))

        mid = down_dims[-1]
        self.mid = nn.ModuleList([res(mid, mid), res(mid, mid)])

        self.up = nn.ModuleList()
        for d_in, d_out in reversed(pairs[1:]):
            upsample = Upsample1d(d_in, d_in)
            self.up.append(nn.ModuleList([res(d_out * 2, d_in), res(d_in, d_in), upsample]))

        self.final_conv = nn.Sequential(
            Conv1dBlock(down_dims[0], down_dims[0], kernel_size, n_groups),
            MatmulConv1d(down_dims[0], action_dim, 1),
        )

    def forward(self, sample: Tensor, timestep: Tensor | int | float, global_cond: Tensor) -> Tensor:
        """Predict noise (or the clean sample) for `sample (B, T, A)` -> `(B, T, A)`."""
        if sample.ndim != 3 or sample.shape[-1] != self.action_dim:
            raise ValueError(f"sample must be (B, T, {self.action_dim}), got {tuple(sample.shape)}")
        batch, horizon = sample.shape[:2]
        if horizon % (2**self.num_downsamples) != 0:
            raise ValueError(
                f"chunk length {horizon} must be divisible by {2 ** self.num_downsamples} "
                f"for {self.num_downsamples + 1} UNet levels; change the chunk size or down_dims"
            )
        if global_cond.shape != (batch, self.global_cond_dim):
            raise ValueError(
                f"global_cond must be ({batch}, {self.global_cond_dim}), got {tuple(global_cond.shape)}; "
                "build the UNet with cond_dim = obs_encoder.out_dim and n_obs_steps = the observation horizon"
            )
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.expand(batch) if t.ndim == 0 else t  # (B,)

        cond = torch.cat((self.step_encoder(t), global_cond), dim=-1)  # (B, cond_dim)
        x = sample  # (B, T, A): time-major throughout, channels last
        skips = []
        for block1, block2, downsample in self.down:
            x = block2(block1(x, cond), cond)
            skips.append(x)
            x = downsample(x)
        for block in self.mid:
            x = block(x, cond)
        for block1, block2, upsample in self.up:
            x = torch.cat((x, skips.pop()), dim=-1)
            x = upsample(block2(block1(x, cond), cond))
        return self.final_conv(x)  # (B, T, A)
