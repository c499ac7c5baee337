"""Rotation conversions: round trips, and agreement with robosuite's own transform_utils."""

import numpy as np
import pytest
import torch
from robosuite.utils import transform_utils as T

from mimictest import rotation as R
from mimictest.preprocess import ActionSpace, Preprocessor

torch.manual_seed(0)


def random_quats(n: int) -> torch.Tensor:
    q = torch.nn.functional.normalize(torch.randn(n, 4, dtype=torch.float64), dim=-1)
    return torch.where(q[:, 3:] < 0, -q, q)


def special_matrices() -> torch.Tensor:
    """Identity, 180-degree turns about each axis and a diagonal: the hard cases for matrix -> quat."""
    aa = torch.tensor([[0, 0, 0], [np.pi, 0, 0], [0, np.pi, 0], [0, 0, np.pi], [np.pi / np.sqrt(3)] * 3,
                       [1e-7, 0, 0], [np.pi - 1e-6, 0, 0]], dtype=torch.float64)
    return R.axis_angle_to_matrix(aa)


def test_quat_matrix_round_trip():
    q = random_quats(1000)
    assert torch.allclose(R.matrix_to_quat(R.quat_to_matrix(q)), q, atol=1e-10)
    m = special_matrices()
    assert torch.allclose(R.quat_to_matrix(R.matrix_to_quat(m)), m, atol=1e-6)


def test_axis_angle_round_trip_including_small_angles():
    aa = torch.randn(1000, 3, dtype=torch.float64)
    aa = aa / aa.norm(dim=-1, keepdim=True) * torch.rand(1000, 1, dtype=torch.float64) * (np.pi - 1e-3)
    aa[:10] *= 1e-6
    assert torch.allclose(R.quat_to_axis_angle(R.axis_angle_to_quat(aa)), aa, atol=1e-9)
    assert torch.allclose(R.matrix_to_axis_angle(R.axis_angle_to_matrix(aa)), aa, atol=1e-7)


def test_euler_round_trip():
    e = (torch.rand(1000, 3, dtype=torch.float64) * 2 - 1) * torch.tensor([np.pi, np.pi / 2 - 1e-3, np.pi])
    assert torch.allclose(R.matrix_to_euler_xyz(R.euler_xyz_to_matrix(e)), e, atol=1e-8)


def test_rot6d_round_trip_and_gram_schmidt():
    m = R.quat_to_matrix(random_quats(500))
    assert torch.allclose(R.rot6d_to_matrix(R.matrix_to_rot6d(m)), m, atol=1e-10)
    out = R.rot6d_to_matrix(torch.randn(500, 6, dtype=torch.float64))  # any 6-vector gives a rotation
    eye = torch.eye(3, dtype=torch.float64).expand(500, 3, 3)
    assert torch.allclose(out.transpose(-1, -2) @ out, eye, atol=1e-10)
    assert torch.allclose(torch.linalg.det(out), torch.ones(500, dtype=torch.float64), atol=1e-10)
    for rep in ("axis_angle", "quat", "euler_xyz"):
        x = R.from_rot6d(R.matrix_to_rot6d(m), rep)
        assert torch.allclose(R.to_rot6d(x, rep), R.matrix_to_rot6d(m), atol=1e-8)


@pytest.mark.parametrize("i", range(50))
def test_agrees_with_robosuite(i):
    q = random_quats(1)[0]
    qn = q.numpy()
    assert np.allclose(R.quat_to_matrix(q).numpy(), T.quat2mat(qn), atol=1e-6)
    m = T.quat2mat(qn)
    rq = T.mat2quat(m)
    ours = R.matrix_to_quat(torch.from_numpy(m)).numpy()
    assert np.allclose(ours, rq, atol=1e-6) or np.allclose(ours, -rq, atol=1e-6)
    assert np.allclose(R.quat_to_axis_angle(q).numpy(), T.quat2axisangle(qn), atol=1e-6)
    aa = T.quat2axisangle(qn)
    rq2 = T.axisangle2quat(aa)
    ours2 = R.axis_angle_to_quat(torch.from_numpy(aa)).numpy()
    assert np.allclose(ours2, rq2, atol=1e-6) or np.allclose(ours2, -rq2, atol=1e-6)


def test_preprocess_inverse_returns_original_actions():
    torch.manual_seed(1)
    n = 256
    pos = torch.rand(n, 3) * torch.tensor([0.4, 0.5, 0.3]) + torch.tensor([-0.2, -0.25, 0.8])
    aa = R.quat_to_axis_angle(random_quats(n).float())
    grip = torch.where(torch.rand(n, 1) > 0.5, 1.0, -1.0)
    actions = torch.cat((pos, aa, grip), dim=-1)  # (n, 7) absolute OSC_POSE actions
    stats = {"action": {"min": actions.min(0).values.tolist(), "max": actions.max(0).values.tolist()}}
    for mode in ("absolute", "relative"):
        pre = Preprocessor(stats, ActionSpace("axis_angle", mode))
        model = pre.normalize_action(actions)
        assert model.shape == (n, 10)
        assert model.abs().max() <= 1.0 + 1e-5
        assert torch.allclose(pre.unnormalize_action(model), actions, atol=1e-5)
    joints = torch.randn(n, 14)
    pre = Preprocessor({"action": {"min": joints.min(0).values.tolist(), "max": joints.max(0).values.tolist()}},
                       ActionSpace(None, "absolute", env_dim=14))
    assert torch.allclose(pre.unnormalize_action(pre.normalize_action(joints)), joints, atol=1e-5)


def test_preprocess_images_crop_and_size_check():
    stats = {"action": {"min": [-1.0] * 7, "max": [1.0] * 7}}
    cams = ["left", "right", "wrist"]
    pre = Preprocessor(stats, ActionSpace(), cams, image_size=(84, 84), crop_size=(76, 76))
    rgb = {cam: torch.randint(0, 256, (2, 2, 84, 84, 3), dtype=torch.uint8) for cam in cams}  # {cam: (B, T, H, W, 3)}
    train = pre.images(rgb, train=True)
    evaluate = pre.images(rgb, train=False)
    assert list(train) == list(evaluate) == cams
    for cam in cams:
        assert train[cam].shape == evaluate[cam].shape == (2, 2, 3, 76, 76) and pre.output_image_size(cam) == (76, 76)
        assert train[cam].min() >= -1 and train[cam].max() <= 1
        expected = rgb[cam][..., 4:80, 4:80, :].permute(0, 1, 4, 2, 3).float() / 127.5 - 1
        assert torch.allclose(evaluate[cam], expected)
    with pytest.raises(ValueError, match="expects 84x84"):
        pre.images({**rgb, "right": torch.zeros(1, 1, 96, 96, 3, dtype=torch.uint8)}, train=False)
    with pytest.raises(ValueError, match=r"no images from camera\(s\) \['wrist'\]"):
        pre.images({cam: rgb[cam] for cam in cams[:2]}, train=False)


def test_preprocess_cameras_of_different_sizes():
    stats = {"action": {"min": [-1.0] * 7, "max": [1.0] * 7}}
    pre = Preprocessor(stats, ActionSpace(), ["top", "wrist"], image_size={"top": (84, 84), "wrist": (48, 64)},
                       crop_size={"top": (76, 76), "wrist": None})
    assert pre.output_image_size("top") == (76, 76) and pre.output_image_size("wrist") == (48, 64)
    rgb = {"top": torch.randint(0, 256, (2, 1, 84, 84, 3), dtype=torch.uint8),
           "wrist": torch.randint(0, 256, (2, 1, 48, 64, 3), dtype=torch.uint8)}
    out = pre({"rgb": rgb}, train=True)["rgb"]
    assert out["top"].shape == (2, 1, 3, 76, 76) and out["wrist"].shape == (2, 1, 3, 48, 64)
    assert torch.allclose(out["wrist"], rgb["wrist"].permute(0, 1, 4, 2, 3).float() / 127.5 - 1)  # no crop: unchanged
    with pytest.raises(ValueError, match="camera 'wrist' gives 84x84 images but this configuration expects 48x64"):
        pre.images({"top": rgb["top"], "wrist": rgb["top"]}, train=False)
    with pytest.raises(ValueError, match=r"no size for camera\(s\) \['wrist'\]"):
        Preprocessor(stats, ActionSpace(), ["top", "wrist"], image_size={"top": (84, 84)})
    with pytest.raises(ValueError, match="larger than camera 'wrist'"):
        Preprocessor(stats, ActionSpace(), ["top", "wrist"], image_size={"top": (84, 84), "wrist": (48, 64)},
                     crop_size=(76, 76))
