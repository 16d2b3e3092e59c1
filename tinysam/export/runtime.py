"""Run exported SAM files on ONNX Runtime or OpenVINO, with the PyTorch predictor's inputs and
outputs: point and box prompts in the image's own frame, many prompts per call."""

from typing import List, Optional, Tuple

import numpy as np

from ..transforms import ResizeLongestSide, prepare_image

ENGINES = ("onnxruntime", "openvino")


class OnnxSamPredictor:
    """`SamPredictor`'s API over an exported encoder and decoder (`tinysam.export`). The decoder
    returns one mask per prompt (the official export's `return_single_mask`).

    `engine`: "onnxruntime" (`providers`, default its CPU provider), or "openvino": the encoder
    file on OpenVINO's CPU device (the optional `openvino` extra), the decoder still on ONNX
    Runtime. OpenVINO 2026.4 rounds the decoder's output size to a multiple of 4 (303 rows come
    back as 304), and its decoder is slower at 64 prompts (`docs/benchmarks.md`). `precision`
    (OpenVINO only): "f32", or "bf16" where the CPU computes in bfloat16 natively (AMX,
    AVX512-BF16): the encoder several times faster, at an embedding cosine of ~0.9999."""

    mask_threshold = 0.0

    def __init__(
        self,
        encoder_path: Optional[str],
        decoder_path: str,
        providers: Optional[List[str]] = None,
        threads: Optional[int] = None,
        engine: str = "onnxruntime",
        precision: str = "f32",
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine {engine!r}: one of {', '.join(ENGINES)}")
        if precision not in ("f32", "bf16") or (precision != "f32" and engine != "openvino"):
            raise ValueError(f"precision {precision!r}: 'f32', or 'bf16' with the openvino engine")
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = providers or ["CPUExecutionProvider"]
        self.decoder = ort.InferenceSession(decoder_path, options, providers=providers)
        if not encoder_path:
            self.encoder = None
        elif engine == "openvino":
            self.encoder = _OpenVinoSession(encoder_path, threads, precision)
        else:
            self.encoder = ort.InferenceSession(encoder_path, options, providers=providers)
        self.image_size = 1024
        self.transform = ResizeLongestSide(self.image_size)
        self.embedding: Optional[np.ndarray] = None
        self.original_size: Tuple[int, int] = (0, 0)

    def set_image(self, image: np.ndarray) -> None:
        """Encode an HxWx3 RGB image (other layouts converted as by `SamPredictor`)."""
        if self.encoder is None:
            raise ValueError("no encoder file given: use set_embedding")
        prepared = prepare_image(image, self.image_size)
        embedding = _run(self.encoder, {"image": prepared.tensor[None].numpy()})[0]
        self.set_embedding(embedding, prepared.original_size)

    def set_embedding(self, embedding: np.ndarray, original_size: Tuple[int, int]) -> None:
        """Use a stored (1, 256, 64, 64) embedding of an image of `original_size` (H, W)."""
        self.embedding = np.asarray(embedding, np.float32).reshape(1, *np.shape(embedding)[-3:])
        self.original_size = (int(original_size[0]), int(original_size[1]))

    def predict(
        self,
        point_coords: Optional[np.ndarray] = None,
        point_labels: Optional[np.ndarray] = None,
        box: Optional[np.ndarray] = None,
        mask_input: Optional[np.ndarray] = None,
        return_logits: bool = False,
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks (B, 1, H, W), IoU predictions (B, 1) and low-res logits (B, 1, 256, 256) for B
        prompts: points (N, 2) or (B, N, 2) with labels, and/or boxes (4,) or (B, 4), in the
        original image's pixels. One prompt's points and its box go together, as in SAM."""
        if self.embedding is None:
            raise RuntimeError("set an image or an embedding first")
        coords, labels = self._prompts(point_coords, point_labels, box)
        has_mask = mask_input is not None
        mask = np.asarray(mask_input).reshape(1, 1, 256, 256) if has_mask else np.zeros((1, 1, 256, 256))
        masks, iou, low_res = _run(
            self.decoder,
            {
                "image_embeddings": self.embedding,
                "point_coords": coords,
                "point_labels": labels,
                "mask_input": mask,
                "has_mask_input": np.array([float(has_mask)]),
                "orig_im_size": np.array(self.original_size),
            },
        )
        return (masks if return_logits else masks > self.mask_threshold), iou, low_res

    def _prompts(self, point_coords, point_labels, box) -> Tuple[np.ndarray, np.ndarray]:
        """(B, N, 2) coordinates in the 1024 frame and (B, N) labels: points, then box corners
        (labels 2, 3); without a box a padding point (label -1), as the official example does."""
        parts, labels = [], []
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_coords need point_labels")
            pts = np.asarray(point_coords, float)
            pts = pts[None] if pts.ndim == 2 else pts
            parts.append(self.transform.apply_coords(pts.reshape(-1, 2), self.original_size).reshape(pts.shape))
            lab = np.asarray(point_labels, float)
            labels.append(lab[None] if lab.ndim == 1 else lab)
        if box is not None:
            boxes = np.asarray(box, float).reshape(-1, 4)
            parts.append(self.transform.apply_boxes(boxes, self.original_size).reshape(-1, 2, 2))
            labels.append(np.tile([2.0, 3.0], (len(boxes), 1)))
        else:
            b = parts[0].shape[0] if parts else 1
            parts.append(np.zeros((b, 1, 2)))
            labels.append(-np.ones((b, 1)))
        sizes = {p.shape[0] for p in parts}
        if len(sizes) > 1:
            b = max(sizes)
            if 1 not in sizes:
                raise ValueError(f"points for {sorted(sizes)} prompts cannot be paired")
            parts = [np.repeat(p, b, 0) if p.shape[0] == 1 else p for p in parts]
            labels = [np.repeat(q, b, 0) if q.shape[0] == 1 else q for q in labels]
        return np.concatenate(parts, 1).astype(np.float32), np.concatenate(labels, 1).astype(np.float32)


def _run(session, inputs: dict) -> List[np.ndarray]:
    """Run `session` with each input cast to the file's type (float32, or float16 for an fp16
    export); float outputs come back as float32."""
    types = {i.name: np.float16 if i.type == "tensor(float16)" else np.float32 for i in session.get_inputs()}
    outputs = session.run(None, {k: np.asarray(v, types[k]) for k, v in inputs.items()})
    return [o.astype(np.float32) if o.dtype == np.float16 else o for o in outputs]


class _OpenVinoSession:
    """An OpenVINO compiled model on the CPU behind the two calls `_run` makes of an ONNX Runtime
    session: `get_inputs()` (name and type) and `run(None, feed)`."""

    class _Input:
        def __init__(self, name: str, type_: str) -> None:
            self.name, self.type = name, type_

    def __init__(self, path: str, threads: Optional[int], precision: str) -> None:
        import openvino as ov

        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.model = ov.Core().compile_model(path, "CPU", config)
        self.request = self.model.create_infer_request()
        f16 = ov.Type.f16
        self.inputs = [
            self._Input(port.get_any_name(), "tensor(float16)" if port.get_element_type() == f16 else "tensor(float)")
            for port in self.model.inputs
        ]

    def get_inputs(self) -> List["_OpenVinoSession._Input"]:
        return self.inputs

    def run(self, _outputs, feed: dict) -> List[np.ndarray]:
        results = self.request.infer(feed)
        return [np.array(results[port]) for port in self.model.outputs]
