"""The SAM models. Names resolve on first use (PEP 562): `tinysam.modeling.pixels` (the pixel
constants, which `tinysam.transforms` reads in torch-free data workers) imports no model."""

from typing import Any

_EXPORTS = {
    "ImageEncoderViT": "image_encoder",
    "MaskDecoder": "mask_decoder",
    "PromptEncoder": "prompt_encoder",
    "Sam": "sam",
    "TinyViT": "tiny_vit",
    "TwoWayTransformer": "transformer",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ImageEncoderViT", "MaskDecoder", "PromptEncoder", "Sam", "TinyViT", "TwoWayTransformer"]
