"""One typed description of an everything-mode run: the mode and every setting its generators take.

The generators keep the official keyword arguments (drop-in), with their defaults read from this
dataclass (`DEFAULTS`); it is what the rest of the project passes around: the auto-masking job
declares one flag per field (pipelines/cli.py, with the help text written here), the evaluation
job parses its `--everything` specs into it, the actor builds its generator from it, and the
Parquet `params` column stores it (`to_json`). It imports no torch, so a driver can validate
settings before any model is loaded.
"""

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Dict, Optional

MODES = ("hierarchical", "dense")
DECODER_DTYPES = ("float32", "bfloat16")
# Settings only the hierarchical generator has: refused in dense mode unless left at their default.
HIERARCHICAL_ONLY = ("round1_points_per_side", "high_confidence_thresh", "skip_margin", "skip_similarity")
# Settings that set speed and memory, never the masks: a job stores and compares the others only,
# so a run resumed on other hardware (CPU or GPU values) is not refused.
EXECUTION_ONLY = ("points_per_batch", "decoder_chunk", "upsample_chunk")
# Their values when the model runs on a GPU, where larger calls keep the card busy and give the same
# masks (measured: docs/benchmarks.md, "On a GPU"). Each decoded prompt holds ~25 MiB of
# activations, so a decoder chunk of 256 takes ~6 GiB per actor.
GPU_EXECUTION: Dict[str, int] = {"points_per_batch": 256, "decoder_chunk": 256, "upsample_chunk": 64}
# Named starting points over the settings below; measured speed and agreement in docs/benchmarks.md.
PRESETS: Dict[str, Dict[str, Any]] = {
    "quality": {"mode": "dense", "low_res_decisions": False},  # the official generator's masks, exactly
    "balanced": {},  # the defaults: hierarchical, the dense masks at a fraction of the points
    "fast": {"skip_margin": 0.0, "skip_similarity": 0.0},  # the paper's rule
}


def _setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class EverythingConfig:
    """Dense mode (the official generator's grid) or TinySAM's hierarchical mode, with its settings.
    Defaults are the official generator's, plus the hierarchical round, the memory bounds, and the
    decisions on the low-res logits (the `quality` preset turns those off: the official masks)."""

    mode: str = _setting("hierarchical", "hierarchical (TinySAM's two rounds) or dense (the official grid)")
    points_per_side: int = _setting(32, "grid density: points along each side (hierarchical: round 2's grid)")
    round1_points_per_side: Optional[int] = _setting(
        None, "hierarchical round 1's grid density (default: points_per_side / 4)"
    )
    high_confidence_thresh: float = _setting(
        8.5, "hierarchical: logit above which a round-1 mask's pixels count as done (tau)"
    )
    skip_margin: float = _setting(
        0.25, "hierarchical: confident area, in grid spacings, a round-2 point needs around it to be skipped"
    )
    skip_similarity: float = _setting(
        0.6,
        "hierarchical: a confident point is skipped only where the image embedding is at least this similar "
        "(cosine) to its neighbours' (0: off, the paper's rule)",
    )
    points_per_batch: int = _setting(64, "prompts decoded per model call")
    pred_iou_thresh: float = _setting(0.88, "keep masks whose predicted IoU is at least this")
    stability_score_thresh: float = _setting(0.95, "keep masks whose stability score is at least this")
    stability_score_offset: float = _setting(1.0, "logit offset of the stability score")
    box_nms_thresh: float = _setting(0.7, "box IoU above which the lower-scored of two masks is dropped")
    crop_n_layers: int = _setting(0, "layers of image crops, each encoded again (0: the whole image only)")
    crop_nms_thresh: float = _setting(0.7, "box NMS threshold between crops")
    crop_overlap_ratio: float = _setting(512 / 1500, "overlap of neighbouring crops, as a fraction of the crop")
    crop_n_points_downscale_factor: int = _setting(1, "grid density divided by this in each crop layer")
    min_mask_region_area: int = _setting(0, "remove holes and islands smaller than this (pixels; 0: off)")
    upsample_chunk: int = _setting(
        16,
        "on an accelerator: masks upsampled to full resolution at once (bounds memory; the CPU upsamples each "
        "mask's own window)",
    )
    decoder_chunk: int = _setting(16, "prompts through the mask decoder at once (~25 MiB each: bounds memory)")
    fast_decoder: bool = _setting(True, "the folded decoder (same masks, faster); false: the official rounding")
    decoder_dtype: str = _setting(
        "float32",
        "mask decoder precision: bfloat16 pays on CPUs with AVX512-BF16 or AMX and on GPUs (masks near the "
        "filters' thresholds can change)",
    )
    low_res_decisions: bool = _setting(
        True,
        "decide stability, boxes and NMS on the decoder's 256x256 logits and draw only the kept masks at full "
        "resolution (faster, most on large images; masks near a threshold can change; false: the official "
        "full-resolution decisions)",
    )

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.decoder_dtype not in DECODER_DTYPES:
            raise ValueError(f"decoder_dtype must be one of {', '.join(DECODER_DTYPES)}, got {self.decoder_dtype!r}")
        for name in (
            "points_per_side",
            "points_per_batch",
            "upsample_chunk",
            "decoder_chunk",
            "crop_n_points_downscale_factor",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.round1_points_per_side is not None and self.round1_points_per_side < 1:
            raise ValueError(f"round1_points_per_side must be >= 1, got {self.round1_points_per_side}")
        for name in ("crop_n_layers", "min_mask_region_area", "skip_margin"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("box_nms_thresh", "crop_nms_thresh", "crop_overlap_ratio", "skip_similarity"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.mode == "dense":
            changed = [n for n in HIERARCHICAL_ONLY if getattr(self, n) != _default(n)]
            if changed:
                raise ValueError(f"dense mode has no setting {', '.join(changed)} (hierarchical mode only)")

    @classmethod
    def from_dict(cls, settings: Dict[str, Any]) -> "EverythingConfig":
        """From {name: value}; an unknown name is refused with the list of known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known - {"name"})  # "name" as `as_dict` writes it
        if unknown:
            raise ValueError(f"everything mode has no setting {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**{k: v for k, v in settings.items() if k in known})

    @classmethod
    def from_preset(cls, preset: Optional[str] = None, **settings: Any) -> "EverythingConfig":
        """A preset's settings (`PRESETS`), then `settings` over them. A mode of dense given over a
        hierarchical preset drops the preset's hierarchical-only settings."""
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"no everything-mode preset {preset!r}; presets: {', '.join(PRESETS)}")
        base = dict(PRESETS[preset]) if preset else {}
        if settings.get("mode") == "dense":
            base = {k: v for k, v in base.items() if k not in HIERARCHICAL_ONLY}
        return cls.from_dict({**base, **settings})

    @classmethod
    def parse(cls, spec: str) -> "EverythingConfig":
        """A preset name, 'dense:32' or 'hierarchical:8:32:8.5:0.25:0.6' (round 1, round 2, tau, skip
        margin, skip similarity; the defaults for the parts left off), then any other settings as
        ',name=value' (e.g. 'balanced,low_res_decisions=false')."""
        base, *pairs = spec.split(",")
        config = cls._parse_mode(base, spec)
        settings = {}
        for pair in pairs:
            name, sep, value = pair.partition("=")
            if not sep:
                raise ValueError(f"{spec!r}: {pair!r} is not name=value")
            settings[name.strip()] = _setting_value(name.strip(), value.strip(), spec)
        return cls.from_dict({**asdict(config), **settings}) if settings else config

    @classmethod
    def _parse_mode(cls, spec: str, whole: str) -> "EverythingConfig":
        if spec in PRESETS:
            return cls.from_preset(spec)
        parts = spec.split(":")
        try:
            if parts[0] == "dense" and len(parts) <= 2:
                return cls("dense", int(parts[1]) if len(parts) > 1 else 32)
            if parts[0] == "hierarchical" and len(parts) <= 6:
                names = (
                    "round1_points_per_side",
                    "points_per_side",
                    "high_confidence_thresh",
                    "skip_margin",
                    "skip_similarity",
                )
                kinds = (int, int, float, float, float)
                return cls.from_dict({n: k(v) for n, k, v in zip(names, kinds, parts[1:])})
        except ValueError:
            pass
        raise ValueError(
            f"{whole!r}: expected a preset ({', '.join(PRESETS)}), dense[:POINTS] or "
            "hierarchical[:ROUND1[:ROUND2[:TAU[:MARGIN[:SIMILARITY]]]]], then any ,name=value"
        )

    @property
    def round1(self) -> int:
        """Round 1's grid density (hierarchical mode)."""
        return self.round1_points_per_side or max(1, self.points_per_side // 4)

    @property
    def name(self) -> str:
        """A label that tells apart any two configs whose masks can differ: the mode and its grid,
        then each other mask-deciding setting that is not at its default (an evaluation's results
        are keyed by it)."""
        if self.mode == "dense":
            label = f"dense {self.points_per_side}"
        else:
            label = (
                f"hierarchical {self.round1}/{self.points_per_side} tau {self.high_confidence_thresh:g} "
                f"margin {self.skip_margin:g} similarity {self.skip_similarity:g}"
            )
        shown = {"mode", "points_per_side", *HIERARCHICAL_ONLY, *EXECUTION_ONLY}
        changed = [
            f"{f.name}={getattr(self, f.name)}"
            for f in fields(self)
            if f.name not in shown and getattr(self, f.name) != f.default
        ]
        return " ".join([label, *changed])

    def as_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "name": self.name}

    def to_json(self) -> str:
        """Every setting, sorted."""
        return json.dumps(asdict(self), sort_keys=True)

    def provenance_json(self) -> str:
        """The settings that decide the masks (all but `EXECUTION_ONLY`), sorted: what the
        auto-masking job stores with each row and compares on a rerun."""
        return json.dumps({k: v for k, v in asdict(self).items() if k not in EXECUTION_ONLY}, sort_keys=True)

    def generator_kwargs(self) -> Dict[str, Any]:
        """The generator's keyword arguments (the official names)."""
        kwargs = asdict(self)
        del kwargs["mode"]
        if self.mode == "dense":
            for name in HIERARCHICAL_ONLY:
                del kwargs[name]
        return kwargs

    def generator(self, model, output_mode: str = "binary_mask"):
        """The generator of this mode and settings for `model`."""
        from . import SamAutomaticMaskGenerator, SamHierarchicalMaskGenerator

        cls = SamHierarchicalMaskGenerator if self.mode == "hierarchical" else SamAutomaticMaskGenerator
        return cls(model, output_mode=output_mode, **self.generator_kwargs())


# The settings' defaults, read by the generators' signatures: written once, in the fields above.
DEFAULTS = EverythingConfig()


def _setting_value(name: str, value: str, spec: str) -> Any:
    """`value` as the type of setting `name`'s default (booleans: true/false, yes/no, 1/0)."""
    known = {f.name: f for f in fields(EverythingConfig)}
    if name not in known:
        raise ValueError(f"{spec!r}: everything mode has no setting {name}; known: {', '.join(sorted(known))}")
    default = known[name].default
    try:
        if isinstance(default, bool):
            flags = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
            return flags[value.lower()]
        if default is None or isinstance(default, int):  # round1_points_per_side: an int or None
            return None if value.lower() == "none" else int(value)
        return type(default)(value)
    except (KeyError, ValueError):
        raise ValueError(f"{spec!r}: {name}={value!r} is not a {type(default).__name__}") from None


def _default(name: str) -> Any:
    f = next(f for f in fields(EverythingConfig) if f.name == name)
    return None if f.default is MISSING else f.default
