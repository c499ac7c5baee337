"""The CPU-cheap dropout and the multi-head attention built on it, against PyTorch's own."""

import pytest
import torch

from mimictest.nets.attention import MultiheadAttention
from mimictest.nets.dropout import Dropout, dropout, keep_multiplier

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_rate_and_scale(p: float) -> None:
    torch.manual_seed(0)
    x = torch.ones(1_000_003)  # not a multiple of 4: the last random word is only partly used
    multiplier = keep_multiplier(x, p)
    dropped = (multiplier == 0).float().mean().item()
    assert abs(dropped - p) < 0.003, f"dropped {dropped:.4f} of the elements, expected {p}"
    values = multiplier.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / (1 - p))
    out = dropout(x, p, training=True)
    assert abs(out.mean().item() - 1.0) < 0.01, "inverted dropout keeps the expectation"
    for dtype in (torch.bfloat16, torch.float32):
        assert dropout(x.to(dtype), p, training=True).dtype == dtype


def test_dropout_gradient_masks_like_the_forward() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 33, requires_grad=True)
    out = dropout(x, 0.3, training=True)
    out.sum().backward()
    torch.testing.assert_close(x.grad, out.detach() / x.detach())


def test_dropout_identity_when_off_and_rejects_bad_p() -> None:
    x = torch.randn(10)
    layer = Dropout(0.5).eval()
    assert torch.equal(layer(x), x) and torch.equal(dropout(x, 0.0, training=True), x)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        dropout(x, 1.0, training=True)


@pytest.mark.parametrize("padded", [False, True])
def test_attention_matches_torch(padded: bool) -> None:
    """Same parameters as nn.MultiheadAttention; same output without dropout (eval) on both code paths."""
    torch.manual_seed(0)
    ours = MultiheadAttention(32, 4, dropout=0.1)
    ref = torch.nn.MultiheadAttention(32, 4, dropout=0.1, batch_first=True)
    ref.load_state_dict(ours.state_dict())
    q, kv = torch.randn(3, 5, 32), torch.randn(3, 7, 32)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    if padded:
        mask[:, 5:] = True
    ours.eval(), ref.eval()
    expected = ref(q, kv, kv, key_padding_mask=mask if padded else None, need_weights=False)[0]
    torch.testing.assert_close(ours(q, kv, kv, key_padding_mask=mask if padded else None), expected)
    # Training mode: dropout on the attention weights; padded keys still never contribute.
    ours.train()
    torch.manual_seed(1)
    out = ours(q, kv, kv, key_padding_mask=mask if padded else None)
    assert out.shape == (3, 5, 32) and not torch.allclose(out, expected)
    if padded:
        kv_changed = kv.clone()
        kv_changed[:, 5:] = 100.0
        torch.manual_seed(1)
        torch.testing.assert_close(ours(q, kv_changed, kv_changed, key_padding_mask=mask), out)
