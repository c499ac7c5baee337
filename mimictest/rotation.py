"""Batched rotation conversions in torch.

Every function maps tensors with arbitrary leading batch dimensions ``(..., k)``.
Conventions:
- quaternions are ``(x, y, z, w)``, robosuite's order (``robosuite.utils.transform_utils``);
- axis-angle is the rotation vector ``angle * unit_axis``, angle in [0, pi];
- ``euler_xyz`` is the intrinsic X-Y-Z sequence, ``R = Rx(a) @ Ry(b) @ Rz(c)``;
- the 6D representation (Zhou et al., "On the Continuity of Rotation Representations in Neural
  Networks", CVPR 2019) is the first two COLUMNS of the rotation matrix, ``(r00, r10, r20, r01,
  r11, r21)``; it maps back to a matrix by Gram-Schmidt, which makes it continuous and lets any
  6-vector (such as a network output) map to a valid rotation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_EPS = 1e-8


def quat_to_matrix(quat: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` xyzw quaternion (need not be unit) -> ``(..., 3, 3)`` rotation matrix."""
    q = F.normalize(quat, dim=-1)
    x, y, z, w = q.unbind(-1)
    xx, yy, zz = x * x, y * y, z * z
    xy, xz, yz = x * y, x * z, y * z
    wx, wy, wz = w * x, w * y, w * z
    rows = (
        1 - 2 * (yy + zz), 2 * (xy - wz), 2 * (xz + wy),
        2 * (xy + wz), 1 - 2 * (xx + zz), 2 * (yz - wx),
        2 * (xz - wy), 2 * (yz + wx), 1 - 2 * (xx + yy),
    )
    return torch.stack(rows, dim=-1).reshape(q.shape[:-1] + (3, 3))


def matrix_to_quat(matrix: torch.Tensor) -> torch.Tensor:
    """``(..., 3, 3)`` -> ``(..., 4)`` unit xyzw quaternion with ``w >= 0``.

    Computes the four candidate quaternions (one per largest diagonal term, Shepperd's method)
    and keeps the best-conditioned one, so it is accurate for every rotation, 180 degrees included.
    """
    m = matrix
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    # 4 * w^2, 4 * x^2, 4 * y^2, 4 * z^2
    four_sq = torch.stack(
        (1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22), dim=-1
    )
    root = torch.sqrt(four_sq.clamp_min(0.0))  # (..., 4): 2|w|, 2|x|, 2|y|, 2|z|
    d21, d02, d10 = m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]
    s21, s02, s10 = m[..., 2, 1] + m[..., 1, 2], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 0] + m[..., 0, 1]
    # Each candidate is (x, y, z, w) scaled by 4 * (its pivot component).
    candidates = torch.stack(
        (
            torch.stack((d21, d02, d10, root[..., 0] ** 2), dim=-1),
            torch.stack((root[..., 1] ** 2, s10, s02, d21), dim=-1),
            torch.stack((s10, root[..., 2] ** 2, s21, d02), dim=-1),
            torch.stack((s02, s21, root[..., 3] ** 2, d10), dim=-1),
        ),
        dim=-2,
    )  # (..., 4 candidates, 4)
    candidates = candidates / (2 * root.clamp_min(0.1)).unsqueeze(-1)
    best = four_sq.argmax(dim=-1, keepdim=True)  # (..., 1)
    quat = torch.gather(candidates, -2, best.unsqueeze(-1).expand(best.shape[:-1] + (1, 4))).squeeze(-2)
    quat = F.normalize(quat, dim=-1)
    return torch.where(quat[..., 3:] < 0, -quat, quat)


def axis_angle_to_quat(axis_angle: torch.Tensor) -> torch.Tensor:
    """``(..., 3)`` rotation vector -> ``(..., 4)`` xyzw unit quaternion."""
    angle = axis_angle.norm(dim=-1, keepdim=True)
    half = angle / 2
    # sin(a/2)/a, with its Taylor expansion near zero so gradients and values stay finite.
    small = angle < 1e-4
    scale = torch.where(small, 0.5 - angle**2 / 48, torch.sin(half) / angle.clamp_min(_EPS))
    return torch.cat((axis_angle * scale, torch.cos(half)), dim=-1)


def quat_to_axis_angle(quat: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` xyzw quaternion -> ``(..., 3)`` rotation vector with angle in [0, pi]."""
    q = F.normalize(quat, dim=-1)
    q = torch.where(q[..., 3:] < 0, -q, q)
    xyz, w = q[..., :3], q[..., 3:]
    sin_half = xyz.norm(dim=-1, keepdim=True)
    angle = 2 * torch.atan2(sin_half, w)
    small = sin_half < 1e-4
    scale = torch.where(small, 2.0 + angle**2 / 12, angle / sin_half.clamp_min(_EPS))
    return xyz * scale


def axis_angle_to_matrix(axis_angle: torch.Tensor) -> torch.Tensor:
    """``(..., 3)`` -> ``(..., 3, 3)``."""
    return quat_to_matrix(axis_angle_to_quat(axis_angle))


def matrix_to_axis_angle(matrix: torch.Tensor) -> torch.Tensor:
    """``(..., 3, 3)`` -> ``(..., 3)``."""
    return quat_to_axis_angle(matrix_to_quat(matrix))


def _axis_rotation(angle: torch.Tensor, axis: str) -> torch.Tensor:
    """``(...,)`` angle -> ``(..., 3, 3)`` rotation about one coordinate axis."""
    c, s = torch.cos(angle), torch.sin(angle)
    one, zero = torch.ones_like(angle), torch.zeros_like(angle)
    if axis == "X":
        rows = (one, zero, zero, zero, c, -s, zero, s, c)
    elif axis == "Y":
        rows = (c, zero, s, zero, one, zero, -s, zero, c)
    else:
        rows = (c, -s, zero, s, c, zero, zero, zero, one)
    return torch.stack(rows, dim=-1).reshape(angle.shape + (3, 3))


def euler_xyz_to_matrix(euler: torch.Tensor) -> torch.Tensor:
    """``(..., 3)`` intrinsic XYZ angles -> ``(..., 3, 3)`` = Rx @ Ry @ Rz."""
    a, b, c = euler.unbind(-1)
    return _axis_rotation(a, "X") @ _axis_rotation(b, "Y") @ _axis_rotation(c, "Z")


def matrix_to_euler_xyz(matrix: torch.Tensor) -> torch.Tensor:
    """``(..., 3, 3)`` -> ``(..., 3)`` intrinsic XYZ angles, the middle one in [-pi/2, pi/2].

    For R = Rx(a) Ry(b) Rz(c): R[0, 2] = sin b, R[1, 2] = -sin a cos b, R[2, 2] = cos a cos b,
    R[0, 1] = -cos b sin c, R[0, 0] = cos b cos c.
    """
    b = torch.asin(matrix[..., 0, 2].clamp(-1.0, 1.0))
    a = torch.atan2(-matrix[..., 1, 2], matrix[..., 2, 2])
    c = torch.atan2(-matrix[..., 0, 1], matrix[..., 0, 0])
    return torch.stack((a, b, c), dim=-1)


def matrix_to_rot6d(matrix: torch.Tensor) -> torch.Tensor:
    """``(..., 3, 3)`` -> ``(..., 6)``: the first two columns, column after column."""
    return torch.cat((matrix[..., :, 0], matrix[..., :, 1]), dim=-1)


def rot6d_to_matrix(rot6d: torch.Tensor) -> torch.Tensor:
    """``(..., 6)`` -> ``(..., 3, 3)`` by Gram-Schmidt on the two columns (Zhou et al. 2019)."""
    a1, a2 = rot6d[..., :3], rot6d[..., 3:]
    b1 = F.normalize(a1, dim=-1)
    b2 = F.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack((b1, b2, b3), dim=-1)


_TO_MATRIX = {
    "axis_angle": axis_angle_to_matrix,
    "quat": quat_to_matrix,
    "euler_xyz": euler_xyz_to_matrix,
    "matrix": lambda m: m,
}
_FROM_MATRIX = {
    "axis_angle": matrix_to_axis_angle,
    "quat": matrix_to_quat,
    "euler_xyz": matrix_to_euler_xyz,
    "matrix": lambda m: m,
}
ROTATION_DIMS = {"axis_angle": 3, "quat": 4, "euler_xyz": 3}


def to_rot6d(rotation: torch.Tensor, representation: str) -> torch.Tensor:
    """Any supported representation -> ``(..., 6)``."""
    if representation not in _TO_MATRIX:
        raise ValueError(f"unknown rotation representation {representation!r}; use one of {sorted(_TO_MATRIX)}")
    return matrix_to_rot6d(_TO_MATRIX[representation](rotation))


def from_rot6d(rot6d: torch.Tensor, representation: str) -> torch.Tensor:
    """``(..., 6)`` -> any supported representation."""
    if representation not in _FROM_MATRIX:
        raise ValueError(f"unknown rotation representation {representation!r}; use one of {sorted(_FROM_MATRIX)}")
    return _FROM_MATRIX[representation](rot6d_to_matrix(rot6d))
