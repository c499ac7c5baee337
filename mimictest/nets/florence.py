"""Florence-2 as a policy backbone: DaViT image tokens + instruction + proprio through the BART encoder.

Xiao et al., "Florence-2: Advancing a Unified Representation for a Variety of Vision Tasks", CVPR
2024, on transformers' native ``Florence2ForConditionalGeneration`` (no remote code). The policy
design follows the original mimictest (github.com/EDiRobotics/mimictest, ``FlorenceNet``,
``FlorenceMDTNet``, ``FlorencePi0Net``):

- every camera's image at every observation step goes through the DaViT vision tower and the
  multimodal projector (``(h/32) * (w/32) + 1`` tokens per image: 3 * 3 + 1 at 76x76);
- the image tokens are joined with the text tokens and one token per observation step of the
  proprioceptive state, and the BART encoder runs over the whole sequence (``encode``, the
  *prefix*, computed once per predicted chunk);
- the BART decoder reads learned query tokens (or, for the flow head, noisy action tokens) and
  cross-attends to the prefix (``decode``).

Text tokens. With a tokenizer (a pretrained ``FLORENCE_PATH`` folder) the text is Florence's own
tokens: the fixed task prompt (``"<Action>"``, as in mimictest) followed by the instruction,
tokenised by ``FlorenceTokenizer``, which the ``Preprocessor`` takes as its text encoder: each
distinct instruction is tokenised once, and its padded token ids are the ``lang_emb`` row that the
checkpoint carries (``lang_tokens=True``). With no pretrained folder there is no vocabulary: no
prompt, and an instruction arrives as the project's sentence embedding (``mimictest.text``,
``lang_dim``) projected to one encoder token.

Frozen parts. The DaViT tower is frozen by default (``freeze_vision_tower``, as in mimictest):
``requires_grad`` off, so autograd records nothing through it, and eval mode. The word embeddings
are always frozen (mimictest's MDT net does the same): only the prompt's and the instructions' few
rows are ever used, and AdamW would otherwise update the whole ``vocab x d_model`` table each step.

Weights. ``load_florence(path)`` reads a local folder in transformers' native Florence-2 layout
(``save_pretrained`` output: ``config.json`` with ``model_type`` ``"florence2"``, safetensors
weights, tokenizer files), e.g. a download of florence-community/Florence-2-base or -large, the
converted copies of microsoft/Florence-2-base / -large. The original microsoft repos hold the
remote-code layout (``auto_map``, a ``"davit"`` vision config), which transformers' native class
cannot read. ``load_florence(None, name)`` builds one of ``FLORENCE_CONFIGS`` with random weights.
"""

from __future__ import annotations

import importlib.util
import json
import os

import torch
from torch import Tensor, nn

from mimictest.recipe import Recorded

FLORENCE_LAYOUT = (
    "a folder in transformers' native Florence-2 layout (save_pretrained output: config.json with model_type "
    "'florence2', model.safetensors, tokenizer.json or vocab.json + merges.txt), e.g. a download of "
    "florence-community/Florence-2-base or -large; or FLORENCE_PATH = None to build a small Florence-2 from scratch"
)

# Named architectures. "base" and "large" are Florence-2-base / -large's shapes (DaViT + BART-base /
# BART-large, vocabulary 51289); "small" is sized for CPU training from scratch, "tiny" for tests. DaViT
# pads each feature map to whole attention windows: Florence-2's 12 suits 768x768 inputs, while a 76x76
# crop gives 19, 10, 5 and 3 cells per side; "small" uses DaViT's ImageNet window 7 (20% faster there).
FLORENCE_CONFIGS: dict[str, dict] = {
    "tiny": dict(vision=dict(embed_dim=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4),
                             num_groups=(1, 2, 3, 4), window_size=4, projection_dim=32),
                 text=dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=64,
                           max_position_embeddings=256)),
    "small": dict(vision=dict(embed_dim=(32, 64, 128, 256), depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8),
                              num_groups=(1, 2, 4, 8), window_size=7, projection_dim=256),
                  text=dict(d_model=256, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4,
                            decoder_attention_heads=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024, vocab_size=64,
                            max_position_embeddings=512)),
    "base": dict(vision=dict(embed_dim=(128, 256, 512, 1024), depths=(1, 1, 9, 1), num_heads=(4, 8, 16, 32),
                             num_groups=(4, 8, 16, 32), window_size=12, projection_dim=768),
                 text=dict(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                           decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, vocab_size=51289,
                           max_position_embeddings=1024)),
    "large": dict(vision=dict(embed_dim=(256, 512, 1024, 2048), depths=(1, 1, 9, 1), num_heads=(8, 16, 32, 64),
                              num_groups=(8, 16, 32, 64), window_size=12, projection_dim=1024),
                  text=dict(d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                            decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, vocab_size=51289,
                            max_position_embeddings=1024)),
}
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # Florence-2's image processor


def _require_transformers():
    """transformers' native Florence-2 classes, or a one-line install hint."""
    try:
        from transformers import Florence2Config, Florence2ForConditionalGeneration
    except ImportError as err:
        raise ImportError('Florence-2 policies need transformers>=5 (native Florence2): pip install -e ".[florence]"') from err
    return Florence2Config, Florence2ForConditionalGeneration


def attention_implementation() -> str:
    """``"flash_attention_2"`` when flash-attn is installed and CUDA is present, else PyTorch SDPA."""
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def florence_config(name: str, dropout: float = 0.1):
    """A ``Florence2Config`` of one of ``FLORENCE_CONFIGS`` (drop-path 0; BART dropout ``dropout``, 0.1 in Florence-2)."""
    if name not in FLORENCE_CONFIGS:
        raise ValueError(f"unknown Florence-2 config {name!r}; choose from {sorted(FLORENCE_CONFIGS)}")
    Florence2Config, _ = _require_transformers()
    spec = FLORENCE_CONFIGS[name]
    text = dict(model_type="bart", dropout=dropout, attention_dropout=dropout, activation_dropout=dropout,
                scale_embedding=False, **spec["text"])
    vision = dict(drop_path_rate=0.0, **spec["vision"])
    return Florence2Config(text_config=text, vision_config=vision, image_token_id=spec["text"]["vocab_size"] - 1)


def _check_folder(path: str) -> None:
    """One line naming the expected layout if ``path`` is not a native Florence-2 folder."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"FLORENCE_PATH={path!r} is not a folder; expected {FLORENCE_LAYOUT}")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"FLORENCE_PATH={path!r} has no config.json; expected {FLORENCE_LAYOUT}")
    with open(config_file) as fh:
        config = json.load(fh)
    text_type = (config.get("text_config") or {}).get("model_type")
    if config.get("model_type") != "florence2" or "auto_map" in config or text_type not in (None, "bart"):
        raise ValueError(f"FLORENCE_PATH={path!r} holds model_type {config.get('model_type')!r}"
                         f"{' in the remote-code layout (auto_map)' if 'auto_map' in config else ''}; expected {FLORENCE_LAYOUT}")
    names = set(os.listdir(path))
    if not any(n.endswith(".safetensors") or n.startswith("pytorch_model") for n in names):
        raise FileNotFoundError(f"FLORENCE_PATH={path!r} has no weights (*.safetensors); expected {FLORENCE_LAYOUT}")
    if "tokenizer.json" not in names and not {"vocab.json", "merges.txt"} <= names:
        raise FileNotFoundError(f"FLORENCE_PATH={path!r} has no tokenizer (tokenizer.json); expected {FLORENCE_LAYOUT}")


def load_florence(path: str | None, config: str = "small", dropout: float = 0.1) -> tuple[nn.Module, object, str]:
    """``(Florence2ForConditionalGeneration, tokenizer or None, what was done)`` from ``path`` or from scratch.

    ``path``: a local folder (see ``FLORENCE_LAYOUT``), loaded with ``from_pretrained`` and its
    tokenizer; ``None``: the named ``config`` with random weights and no tokenizer. Attention runs
    through PyTorch SDPA, or flash-attn when it is installed and CUDA is present.
    """
    _, Florence2ForConditionalGeneration = _require_transformers()
    attn = attention_implementation()
    if path is None:
        model = Florence2ForConditionalGeneration._from_config(florence_config(config, dropout), attn_implementation=attn)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        return model, None, f"Florence-2: no FLORENCE_PATH, built the {config!r} config from scratch ({params:.1f} M random weights, {attn})"
    _check_folder(path)
    from transformers import AutoTokenizer

    model = Florence2ForConditionalGeneration.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                                              attn_implementation=attn)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return model, tokenizer, f"Florence-2: loaded {os.path.abspath(path)} ({params:.1f} M weights, {attn})"


class FlorenceTokenizer:
    """Instructions -> Florence-2 token ids, in ``mimictest.text.TextEncoder``'s interface, for the ``Preprocessor``.

    ``encode(texts) -> (N, max_length)`` float32 token ids padded with the tokenizer's pad id
    (exact in float32: ids < 2**24). The ``Preprocessor`` stores them as its ``lang_table`` rows,
    so each instruction is tokenised once and a checkpoint evaluates without the tokenizer.
    """

    def __init__(self, tokenizer, max_length: int = 32) -> None:
        self.tokenizer, self.dim, self.pad_id = tokenizer, max_length, tokenizer.pad_token_id
        self.name = f"Florence-2 tokenizer ({type(tokenizer).__name__}, {max_length} tokens)"

    def encode(self, texts: list[str]) -> Tensor:
        if isinstance(texts, str):
            raise TypeError("encode takes a list of instructions: wrap a single one as [text]")
        ids = self.tokenizer(list(texts), padding="max_length", max_length=self.dim, truncation=False)["input_ids"]
        long = [t for t, row in zip(texts, ids) if len(row) > self.dim]
        if long:
            raise ValueError(f"instruction {long[0]!r} has more than {self.dim} tokens; raise FlorenceTokenizer's max_length")
        return torch.tensor(ids, dtype=torch.float32).reshape(len(texts), self.dim)


class FlorenceBackbone(Recorded, nn.Module):
    """Observations -> the BART encoder's prefix ``(B, N, d_model)``; query tokens -> decoder states.

    Args:
        florence: a ``Florence2ForConditionalGeneration`` (``load_florence``).
        cams: camera names of ``batch["rgb"]``, in order; images may differ in size between cameras.
        low_dim_dim: ``D`` of ``batch["low_dim"] (B, T, D)``, one encoder token per step (0: none).
        tokenizer: Florence's tokenizer (a pretrained folder's), for the task prompt; ``None`` from scratch.
        lang_dim: ``D_lang`` of a sentence embedding ``batch["lang_emb"] (B, D_lang)``, projected to one token.
        lang_tokens: ``batch["lang_emb"]`` holds ``FlorenceTokenizer`` ids ``(B, L)`` (needs ``tokenizer``).
        prompt: the fixed task prompt, tokenised when there is a tokenizer (mimictest: ``"<Action>"``).
        freeze_vision_tower: keep DaViT fixed (mimictest: True; a tower built from scratch should train).
    """

    def __init__(self, florence: nn.Module, cams: list[str] | tuple[str, ...], low_dim_dim: int = 0, tokenizer=None,
                 lang_dim: int = 0, lang_tokens: bool = False, prompt: str = "<Action>",
                 freeze_vision_tower: bool = True) -> None:
        super().__init__()
        if lang_tokens and (tokenizer is None or lang_dim):
            raise ValueError("lang_tokens=True needs the Florence tokenizer (a FLORENCE_PATH folder) and lang_dim=0; "
                             "from scratch, pass the sentence embedding's lang_dim instead")
        if not cams and not low_dim_dim:
            raise ValueError("FlorenceBackbone needs cameras or low-dim observations (low_dim_dim > 0)")
        model = florence.model  # Florence2Model: vision_tower, multi_modal_projector, language_model (BART)
        self.vision_tower, self.projector = model.vision_tower, model.multi_modal_projector
        self.encoder, self.decoder = model.language_model.encoder, model.language_model.decoder
        self.word_embeddings = model.get_input_embeddings()  # BART's shared (scaled) embedding
        self.word_embeddings.requires_grad_(False)
        self.d_model = model.config.text_config.d_model
        self.cams, self.low_dim_dim, self.lang_dim, self.lang_tokens = list(cams), low_dim_dim, lang_dim, lang_tokens
        self.freeze_vision_tower = freeze_vision_tower
        if freeze_vision_tower:
            self.vision_tower.requires_grad_(False)
        self.low_dim_proj = nn.Linear(low_dim_dim, self.d_model) if low_dim_dim else None
        self.lang_proj = nn.Linear(lang_dim, self.d_model) if lang_dim else None
        prompt_ids = tokenizer(prompt)["input_ids"] if tokenizer is not None else []
        self.register_buffer("prompt_ids", torch.tensor(prompt_ids, dtype=torch.long), persistent=False)
        self.pad_id = tokenizer.pad_token_id if tokenizer is not None else None
        self.register_buffer("pixel_mean", torch.tensor(_IMAGENET_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(_IMAGENET_STD).view(3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "FlorenceBackbone":
        super().train(mode)
        if self.freeze_vision_tower:
            self.vision_tower.eval()
        return self

    def _image_tokens(self, rgb: dict) -> list[Tensor]:
        """``{cam: (B, T, 3, H, W)}`` in [-1, 1] -> per camera ``(B, T * n_cam, d_model)``; equal sizes share a pass."""
        if not isinstance(rgb, dict) or any(cam not in rgb for cam in self.cams):
            got = sorted(rgb) if isinstance(rgb, dict) else type(rgb).__name__
            raise ValueError(f"batch['rgb'] must be {{camera: (B, T, 3, H, W)}} with cameras {self.cams}, got {got}; "
                             "run the Preprocessor first and list the same cameras in both")
        groups: dict[tuple, list[str]] = {}
        for cam in self.cams:
            if rgb[cam].ndim != 5 or rgb[cam].shape[2] != 3:
                raise ValueError(f"batch['rgb'][{cam!r}] must be (B, T, 3, H, W), got {tuple(rgb[cam].shape)}")
            groups.setdefault(tuple(rgb[cam].shape), []).append(cam)
        tokens = {}
        for (B, T, *_), names in groups.items():
            x = torch.cat([rgb[cam].flatten(0, 1) for cam in names])  # (cams * B * T, 3, H, W)
            x = ((x + 1.0) * 0.5 - self.pixel_mean) / self.pixel_std  # ImageNet-normalised, as Florence's processor
            features = self.vision_tower(x).last_hidden_state  # (N, C, h, w); no graph when frozen
            out = self.projector(features)  # (N, h * w + 1, d_model)
            for cam, part in zip(names, out.chunk(len(names))):
                tokens[cam] = part.reshape(B, T * part.shape[1], -1)  # (B, T * n, d_model)
        return [tokens[cam] for cam in self.cams]

    def forward(self, batch: dict) -> tuple[Tensor, Tensor | None]:
        """Encode the observations -> ``(prefix (B, N, d_model), mask (B, N) bool or None = all valid)``."""
        parts = self._image_tokens(batch.get("rgb")) if self.cams else []
        B = parts[0].shape[0] if parts else batch["low_dim"].shape[0]
        masks = [None] * len(parts)
        device = parts[0].device if parts else batch["low_dim"].device
        if self.prompt_ids.numel():
            parts.append(self.word_embeddings(self.prompt_ids).unsqueeze(0).expand(B, -1, -1))  # (B, P, d)
            masks.append(None)
        if self.lang_tokens or self.lang_dim:
            lang = batch.get("lang_emb")
            want = "FlorenceTokenizer ids (B, L)" if self.lang_tokens else f"(B, {self.lang_dim})"
            if lang is None or lang.ndim != 2 or (self.lang_dim and lang.shape[1] != self.lang_dim):
                raise ValueError(f"this policy is conditioned on instructions: batch['lang_emb'] must be {want}, got "
                                 f"{None if lang is None else tuple(lang.shape)}; give the Preprocessor the matching text encoder")
            if self.lang_tokens:
                ids = lang.round().long()  # (B, L)
                parts.append(self.word_embeddings(ids))
                masks.append(ids != self.pad_id)
            else:
                parts.append(self.lang_proj(lang).unsqueeze(1))  # (B, 1, d)
                masks.append(None)
        if self.low_dim_dim:
            low_dim = batch.get("low_dim")
            if low_dim is None or low_dim.ndim != 3 or low_dim.shape[-1] != self.low_dim_dim:
                raise ValueError(f"batch['low_dim'] must be (B, T, {self.low_dim_dim}), got "
                                 f"{None if low_dim is None else tuple(low_dim.shape)}")
            parts.append(self.low_dim_proj(low_dim))  # (B, T, d)
            masks.append(None)
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else parts[0].dtype
        embeds = torch.cat([p.to(dtype) for p in parts], dim=1)  # (B, N, d)
        mask = None
        if any(m is not None for m in masks):
            mask = torch.cat([torch.ones(p.shape[:2], dtype=torch.bool, device=device) if m is None else m
                              for p, m in zip(parts, masks)], dim=1)  # (B, N)
        hidden = self.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state  # (B, N, d)
        return hidden, mask

    def decode(self, prefix: tuple[Tensor, Tensor | None], tokens: Tensor) -> Tensor:
        """``tokens (B, Q, d_model)`` through the BART decoder (causal), cross-attending to ``prefix`` -> ``(B, Q, d_model)``."""
        hidden, mask = prefix
        return self.decoder(inputs_embeds=tokens, encoder_hidden_states=hidden, encoder_attention_mask=mask,
                            use_cache=False).last_hidden_state


class FlorenceLinear(Recorded, nn.Module):
    """The linear head: ``chunk`` learned action queries through the decoder, then ``Linear`` -> ``(B, chunk, A)``.

    For ``mimictest.policies.regression.RegressionPolicy`` (mimictest's FlorenceNet: L1 loss).
    """

    def __init__(self, backbone: FlorenceBackbone, action_dim: int, chunk_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.queries = nn.Parameter(torch.randn(1, chunk_size, backbone.d_model) * 0.02)
        self.to_action = nn.Linear(backbone.d_model, action_dim)

    def forward(self, batch: dict) -> Tensor:
        prefix = self.backbone(batch)
        queries = self.queries.expand(prefix[0].shape[0], -1, -1)  # (B, chunk, d)
        return self.to_action(self.backbone.decode(prefix, queries))  # (B, chunk, A)


class FlorenceQueryEncoder(Recorded, nn.Module):
    """Observations -> ``(B, num_queries, d_model)`` decoder states of learned queries: the DiT head's condition.

    The observation encoder for ``DiffusionPolicy`` (mimictest's FlorenceMDTNet: 64 queries), which
    calls it once per chunk and flattens the result; ``mimictest.nets.dit.DiT`` reshapes it back.
    """

    def __init__(self, backbone: FlorenceBackbone, num_queries: int = 64) -> None:
        super().__init__()
        self.backbone, self.num_tokens, self.out_dim = backbone, num_queries, backbone.d_model
        self.queries = nn.Parameter(torch.randn(1, num_queries, backbone.d_model) * 0.02)

    def forward(self, batch: dict) -> Tensor:
        prefix = self.backbone(batch)
        return self.backbone.decode(prefix, self.queries.expand(prefix[0].shape[0], -1, -1))  # (B, Q, d)


def sincos_time(t: Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> Tensor:
    """pi0's sine-cosine embedding of flow times ``t (B,)`` in [0, 1] -> ``(B, dim)`` (periods 4e-3 .. 4)."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, device=t.device)
    period = min_period * (max_period / min_period) ** fraction  # (dim / 2,)
    angle = t.float()[:, None] * (2 * torch.pi / period)[None, :]  # (B, dim / 2)
    return torch.cat((angle.sin(), angle.cos()), dim=-1)


class FlorenceActionExpert(Recorded, nn.Module):
    """The flow head's network: the BART decoder as pi0's action expert over noisy action tokens.

    Black et al., "pi0: A Vision-Language-Action Flow Model for General Robot Control", 2024
    (github.com/Physical-Intelligence/openpi, ``Pi0.embed_suffix``): each noisy action is embedded
    by a Linear layer, concatenated with the sine-cosine embedding of the flow time and mixed by
    ``Linear -> swish -> Linear``; the expert's tokens attend to the observation prefix and to each
    other, and a Linear layer reads out the velocity. Here the expert is Florence's BART decoder
    (as in mimictest's FlorencePi0Net), which cross-attends to the encoder's prefix in every layer;
    its self-attention is causal over the chunk, where pi0's action tokens attend to each other
    both ways. The state is a prefix token (pi0 puts it first in the expert's sequence).

    ``encode(batch) -> prefix`` runs once per chunk; ``forward(x_t (B, chunk, A), t (B,), prefix)
    -> velocity (B, chunk, A)`` runs once per integration step.
    """

    def __init__(self, backbone: FlorenceBackbone, action_dim: int, chunk_size: int) -> None:
        super().__init__()
        d = backbone.d_model
        self.backbone, self.action_dim, self.chunk_size = backbone, action_dim, chunk_size
        self.action_in = nn.Linear(action_dim, d)
        self.action_time_mlp = nn.Sequential(nn.Linear(2 * d, d), nn.SiLU(), nn.Linear(d, d))
        self.action_out = nn.Linear(d, action_dim)

    def encode(self, batch: dict) -> tuple[Tensor, Tensor | None]:
        """The observation prefix ``(hidden (B, N, d), mask (B, N) or None)``, once per chunk."""
        return self.backbone(batch)

    def forward(self, x_t: Tensor, t: Tensor, prefix: tuple[Tensor, Tensor | None]) -> Tensor:
        if x_t.ndim != 3 or x_t.shape[1:] != (self.chunk_size, self.action_dim):
            raise ValueError(f"x_t must be (B, {self.chunk_size}, {self.action_dim}), got {tuple(x_t.shape)}")
        actions = self.action_in(x_t)  # (B, chunk, d)
        time = sincos_time(t, actions.shape[-1]).to(actions.dtype)[:, None].expand_as(actions)  # (B, chunk, d)
        tokens = self.action_time_mlp(torch.cat((actions, time), dim=-1))  # (B, chunk, d)
        return self.action_out(self.backbone.decode(prefix, tokens))  # (B, chunk, A)
