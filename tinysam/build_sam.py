"""The model registry: one builder per model type, each a small config handed to one function.

`sam_model_registry["vit_t"](checkpoint=...)` works as in the official packages; `checkpoint` may be
anything `tinysam.weights.load_checkpoint` accepts (a known name, a path, an http(s) or s3 URL).
"""

from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch

from .modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TinyViT, TwoWayTransformer
from .weights import CheckpointError, load_checkpoint

PROMPT_EMBED_DIM = 256
IMAGE_SIZE = 1024
EMBEDDING_SIZE = 64


@dataclass(frozen=True)
class ViTConfig:
    """SAM ViT encoder hyper-parameters."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: Tuple[int, ...]


@dataclass(frozen=True)
class TinyViTConfig:
    """TinyViT encoder hyper-parameters (the 5M model by default)."""

    embed_dims: Tuple[int, ...] = (64, 128, 160, 320)
    depths: Tuple[int, ...] = (2, 2, 6, 2)
    num_heads: Tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: Tuple[int, ...] = (7, 7, 14, 7)


MODEL_CONFIGS: Dict[str, object] = {
    "vit_h": ViTConfig(1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": ViTConfig(1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": ViTConfig(768, 12, 12, (2, 5, 8, 11)),
    "vit_t": TinyViTConfig(),
    # A narrower, shallower TinyViT (2.4M parameters, most in the neck) for quick CPU distillation
    # runs and tests. No official checkpoint exists for it.
    "vit_t_mini": TinyViTConfig((16, 32, 64, 320), (1, 1, 1, 1), (1, 1, 2, 5), (7, 7, 14, 7)),
}


def build_image_encoder(config: object) -> torch.nn.Module:
    if isinstance(config, ViTConfig):
        return ImageEncoderViT(
            img_size=IMAGE_SIZE,
            patch_size=IMAGE_SIZE // EMBEDDING_SIZE,
            embed_dim=config.embed_dim,
            depth=config.depth,
            num_heads=config.num_heads,
            mlp_ratio=4.0,
            out_chans=PROMPT_EMBED_DIM,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=14,
            global_attn_indexes=config.global_attn_indexes,
        )
    if isinstance(config, TinyViTConfig):
        return TinyViT(
            img_size=IMAGE_SIZE,
            embed_dims=config.embed_dims,
            depths=config.depths,
            num_heads=config.num_heads,
            window_sizes=config.window_sizes,
            out_chans=PROMPT_EMBED_DIM,
        )
    raise TypeError(f"unknown encoder config {config!r}")


def build_sam(model_type: str, checkpoint: Optional[str] = None) -> Sam:
    """Build a model of a registered type, optionally loading a checkpoint strictly; returns it in eval mode."""
    if model_type == "default":
        model_type = "vit_h"
    if model_type not in MODEL_CONFIGS:
        raise KeyError(f"unknown model type {model_type!r}; known: {', '.join(sorted(MODEL_CONFIGS))}")
    sam = Sam(
        image_encoder=build_image_encoder(MODEL_CONFIGS[model_type]),
        prompt_encoder=PromptEncoder(
            embed_dim=PROMPT_EMBED_DIM,
            image_embedding_size=(EMBEDDING_SIZE, EMBEDDING_SIZE),
            input_image_size=(IMAGE_SIZE, IMAGE_SIZE),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8),
            transformer_dim=PROMPT_EMBED_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
    )
    if checkpoint is not None:
        load_into(sam, load_checkpoint(checkpoint), label=f"{checkpoint} ({model_type})")
    return sam.eval()


def check_checkpoint(model_type: str, checkpoint: str) -> None:
    """Check that `checkpoint` loads strictly into `model_type`, without reading its weights (they
    are memory-mapped) or allocating the model's (it is built on the meta device): a cheap
    pre-flight for jobs, whose driver also hashes the file for provenance."""
    state_dict = load_checkpoint(checkpoint, mmap=True)
    with torch.device("meta"):
        model = build_sam(model_type)
    load_into(model, state_dict, label=f"{checkpoint} ({model_type})", assign=True)


def load_into(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], label: str = "checkpoint", assign: bool = False
) -> None:
    """`load_state_dict(strict=True)` with an error that names the file and the likely model type."""
    try:
        model.load_state_dict(state_dict, strict=True, assign=assign)
    except RuntimeError as e:
        guess = infer_model_type(state_dict)
        hint = f"; its keys look like {guess!r}" if guess else ""
        raise CheckpointError(
            f"{label}: does not match the model{hint}: {str(e).splitlines()[0]} {_key_diff(model, state_dict)}"
        ) from e


def _key_diff(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> str:
    ours, theirs = set(model.state_dict()), set(state_dict)
    missing, unexpected = sorted(ours - theirs), sorted(theirs - ours)
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing, e.g. {missing[:3]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}")
    return "(" + "; ".join(parts) + ")" if parts else "(shape mismatch)"


def infer_model_type(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Guess the registry type of a SAM-family state dict from its encoder keys."""
    if "image_encoder.patch_embed.seq.0.c.weight" in state_dict:
        return "vit_t"
    pos = state_dict.get("image_encoder.pos_embed")
    if pos is not None:
        by_dim = {c.embed_dim: name for name, c in MODEL_CONFIGS.items() if isinstance(c, ViTConfig)}
        return by_dim.get(int(pos.shape[-1]))
    return None


def _builder(model_type: str) -> Callable[..., Sam]:
    def build(checkpoint: Optional[str] = None) -> Sam:
        return build_sam(model_type, checkpoint)

    build.__name__ = f"build_sam_{model_type}"
    build.__doc__ = f"Build a `{model_type}` model; `checkpoint` is any spec `load_checkpoint` accepts."
    return build


build_sam_vit_h = _builder("vit_h")
build_sam_vit_l = _builder("vit_l")
build_sam_vit_b = _builder("vit_b")
build_sam_vit_t = _builder("vit_t")

sam_model_registry: Dict[str, Callable[..., Sam]] = {
    "default": build_sam_vit_h,
    "vit_h": build_sam_vit_h,
    "vit_l": build_sam_vit_l,
    "vit_b": build_sam_vit_b,
    "vit_t": build_sam_vit_t,
}
