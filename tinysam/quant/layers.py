"""Quantized layers: every linear, convolution and attention matmul `O = A B` with scales for A and B.

Layers are converted in place by swapping the class of the existing module (`QLinear` is an
`nn.Linear`, `QConv2dBN` a `Conv2d_BN`, ...), so parameters keep their official names and the
quantized model's state dict is the float model's. Each layer runs in one of four modes:
- "float": the float layer, unchanged;
- "observe": float, and shows its inputs and outputs to a calibration recorder;
- "sim": simulated quantization (fake-quant inputs and weights, float arithmetic), for accuracy;
- "int8": integer kernels (oneDNN) where they exist and pay off: linear layers, 1x1 and dense
  convolutions, 2x2 transposed convolutions. Depthwise convolutions and the attention matmuls
  keep the simulated form in this mode (same numbers; oneDNN's int8 depthwise is slower than
  fp32 here and PyTorch has no batched int8 matmul on CPU).
Weights are quantized per output channel; the searched weight scale is a common ratio on each
channel's max (the paper's grid of ratios). Activations have one scale per tensor, or two
(twin quantizers) after softmax and GELU. A grouped (depthwise) convolution is one matmul per
group, so it gets one activation scale and one weight ratio per group.
"""

import contextlib
import functools
import warnings
from typing import Dict, Iterator, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.tiny_vit import Conv2d_BN
from .quantizer import TWIN_KINDS, fake_quant, qrange, quant_codes, second_scale, twin_fake_quant

MODES = ("float", "observe", "sim", "int8")
_export_weight_bits = 8  # see export_weight_bits
PACKED = ("int8_linear", "int8_conv")  # oneDNN's packed int8 weights: non-persistent buffers, int8 mode only


@functools.lru_cache(maxsize=None)
def int8_unavailable_reason() -> Optional[str]:
    """Why oneDNN's int8 kernels cannot run here, or None when they can."""
    ops = getattr(torch.ops, "onednn", None)
    if not (
        torch.backends.mkldnn.is_available()
        and ops is not None
        and hasattr(ops, "qlinear_pointwise")
        and hasattr(ops, "qconv_pointwise")
    ):
        return "this PyTorch build has no oneDNN int8 kernels (they need an x86 CPU build)"
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):
        return None  # an older PyTorch cannot say: trust the CPU
    if not any(caps.get(k) for k in ("avx512_vnni", "avx_vnni", "amx_int8")):
        # Without VNNI, oneDNN multiplies u8 x s8 pairs into saturating 16-bit sums (vpmaddubsw):
        # full-range 8-bit codes overflow and the results are wrong, not only slower (oneDNN's
        # "Nuances of int8 computations"; seen on an AVX2-only AMD EPYC: 19% off in a 2x2 upscaling).
        cpu = caps.get("cpu_name", "unknown")
        return f"this CPU ({cpu}) has no VNNI instructions, so oneDNN's int8 kernels saturate"
    return None


def qlinear(
    codes_u8: torch.Tensor,
    scale: float,
    packed: torch.Tensor,
    w_scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """oneDNN's int8 linear on unsigned activation codes (zero point 128), fp32 out.

    Unsigned, not signed, codes: the same numbers, but on an AVX512-VNNI CPU without AMX (AMD Zen 4)
    oneDNN has no fast kernel for signed activations and falls back to one ~1000x slower than fp32,
    while u8 x s8 is its native VNNI form (docs/design.md, "int8 on CPUs")."""
    return torch.ops.onednn.qlinear_pointwise(
        codes_u8, scale, 128, packed, w_scales, zeros, bias, 1.0, 0, torch.float32, "none", [], ""
    )


@functools.lru_cache(maxsize=None)
def int8_slow_reason() -> Optional[str]:
    """Why oneDNN's int8 linear kernel does not pay here (it is slower than fp32), or None.

    VNNI alone does not decide: a CPU may have it and still take a reference path. The probe
    times the kernel the layers run against fp32 on one thread (~10 ms when fast), once per
    process."""
    if int8_unavailable_reason() is not None:
        return None  # refused for correctness already
    import time

    g = torch.Generator().manual_seed(0)
    rows, cin, cout = 256, 160, 480  # a TinyViT MLP's shape at a small token count
    w = torch.randn(cout, cin, generator=g)
    x = torch.randn(rows, cin, generator=g)
    scales = w.abs().amax(1) / 127
    packed = torch.ops.onednn.qlinear_prepack(quant_codes(w / scales[:, None], 1.0, 8).contiguous(), None)
    zeros = torch.zeros(cout, dtype=torch.long)
    codes = quant_codes(x, 0.05, 8, unsigned=True)

    def best_ms(fn, repeats: int = 5) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times) * 1000

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        int8_ms = best_ms(lambda: qlinear(codes, 0.05, packed, scales, zeros, None))
        fp32_ms = best_ms(lambda: F.linear(x, w))
    finally:
        torch.set_num_threads(threads)
    if int8_ms <= fp32_ms:
        return None
    cpu = torch.cpu.get_capabilities().get("cpu_name", "unknown") if hasattr(torch.cpu, "get_capabilities") else "?"
    return (
        f"oneDNN's int8 linear kernel is {int8_ms / fp32_ms:.1f}x slower than fp32 on this CPU ({cpu}): "
        f"{int8_ms:.2f} ms vs {fp32_ms:.2f} ms for {rows}x{cin}->{cout} on one thread"
    )


def int8_available() -> bool:
    """oneDNN's int8 kernels give correct results here (x86 CPU build, a CPU with VNNI) and are
    measured faster than fp32 (`int8_slow_reason`)."""
    return int8_unavailable_reason() is None and int8_slow_reason() is None


def require_int8() -> None:
    reason = int8_unavailable_reason()
    if reason:
        raise RuntimeError(
            f"int8 execution is not available: {reason}; use mode 'sim' for simulated "
            "quantization (the same quantized numbers, in float arithmetic)"
        )


@contextlib.contextmanager
def export_weight_bits(bits: int) -> Iterator[None]:
    """Within: ONNX export traces the weights at `bits` (7: scale doubled, weights clipped first),
    for int8 kernels without VNNI, which sum u8 x s8 pairs in saturating 16-bit lanes."""
    global _export_weight_bits
    previous, _export_weight_bits = _export_weight_bits, bits
    try:
        yield
    finally:
        _export_weight_bits = previous


def resolve_mode(mode: str) -> str:
    """The mode to run: int8 is refused where its kernels give wrong numbers (no VNNI), and falls
    back to sim, with a warning giving the reason, where they are measured slower than fp32."""
    if mode != "int8":
        return mode
    require_int8()
    slow = int8_slow_reason()
    if slow:
        warnings.warn(
            f"int8 mode falls back to sim (the same quantized numbers in float arithmetic): {slow}",
            RuntimeWarning,
            stacklevel=3,
        )
        return "sim"
    return mode


class QuantMixin:
    """State and mode switch shared by the quantized layers. Subclasses define the float op, how
    weights map to a (groups, out, in) matrix, and the int8 kernel."""

    weight_axis = 0  # the output-channel axis of the weight tensor

    def init_quant(self, bits: int) -> None:
        self.bits = bits
        self.mode = "float"
        self.recorder = None
        self.a_kind = ""  # "", "softmax" or "gelu": twin scales for A
        self.a_scale: Optional[torch.Tensor] = None  # (groups,): one per matmul
        self.b_scale: Optional[torch.Tensor] = None  # weights: one per output channel
        self._cache: Dict[str, object] = {}

    # -- parameters --------------------------------------------------------------------------
    def qparams(self) -> Dict[str, object]:
        return {"a_scale": self.a_scale, "b_scale": self.b_scale, "a_kind": self.a_kind}

    def load_qparams(self, params: Dict[str, object]) -> None:
        if params["a_kind"] not in TWIN_KINDS:
            raise ValueError(f"unknown activation kind {params['a_kind']!r}")
        self.a_kind = str(params["a_kind"])
        self.a_scale = torch.as_tensor(params["a_scale"], dtype=torch.float32)
        self.b_scale = None if params["b_scale"] is None else torch.as_tensor(params["b_scale"], dtype=torch.float32)
        self._cache.clear()

    @property
    def calibrated(self) -> bool:
        return self.a_scale is not None

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; known: {MODES}")
        mode = resolve_mode(mode)
        if mode in ("sim", "int8") and not self.calibrated:
            mode = "float"  # never called during calibration (e.g. the unused classifier head)
        self.mode = mode
        self._cache.clear()
        for name in PACKED:
            self._buffers.pop(name, None)
        if self.mode != "float":
            self.prepare()

    def prepare(self) -> None:
        """Fill the caches a forward in the current mode reads (quantized weights, packed int8
        kernels) now, not during the first forward, so that a compiled forward only reads them."""

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.a_scale
        if scale.numel() > 1:  # a grouped convolution's input (B, C, H, W): one scale per group
            scale = scale.repeat_interleave(x.shape[1] // scale.numel())
        return twin_fake_quant(x, scale, self.a_kind, self.bits, axis=1)


class QuantWeighted(QuantMixin):
    """A layer with a weight: O = A W^T (+ bias)."""

    def effective_weight(self) -> torch.Tensor:
        return self.weight

    def effective_bias(self) -> Optional[torch.Tensor]:
        return self.bias

    def scale_view(self, scale: torch.Tensor) -> torch.Tensor:
        shape = [1] * self.effective_weight().dim()
        shape[self.weight_axis] = -1
        return scale.view(shape)

    def channel_amax(self) -> torch.Tensor:
        w = self.effective_weight().detach()
        dims = [d for d in range(w.dim()) if d != self.weight_axis]
        return w.abs().amax(dim=dims)

    def quant_weight(self, b_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        scale = self.b_scale if b_scale is None else b_scale
        return fake_quant(self.effective_weight().detach(), scale, self.bits, axis=self.weight_axis)

    def weight_codes(self) -> torch.Tensor:
        w = self.effective_weight().detach()
        return quant_codes(w / self.scale_view(self.b_scale), 1.0, self.bits)

    def as_matrix(self, w: torch.Tensor) -> torch.Tensor:
        """(groups, out, in) matrix whose rows match the recorder's output rows."""
        return w.reshape(1, w.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "float":
            return self.float_op(x, self.effective_weight(), self.effective_bias())
        if self.mode == "observe":
            out = self.float_op(x, self.effective_weight(), self.effective_bias())
            self.recorder.observe(self, x, out)
            return out
        if self.mode == "int8" and self.int8_op is not None:
            kernel = self.int8_op()
            if kernel is not None:
                return kernel(x)
        if torch.onnx.is_in_onnx_export():  # traced: the weights become int8 codes and a DequantizeLinear
            return self.float_op(self.quant_input(x), self._export_weight(), self.effective_bias())
        if "w" not in self._cache:
            self.prepare()
        return self.float_op(self.quant_input(x), self._cache["w"], self._cache["b"])

    def _export_weight(self) -> torch.Tensor:
        """The fake-quantized weight as ONNX export traces it; with fewer export bits (7), the
        scale doubles and the weight is clipped first, so every code fits in 7 bits."""
        w, scale = self.effective_weight().detach(), self.b_scale
        bits = min(self.bits, _export_weight_bits)
        if bits < self.bits:
            scale = scale * 2.0 ** (self.bits - bits)
            limit = self.scale_view(scale) * qrange(bits)
            w = torch.maximum(torch.minimum(w, limit), -limit)
        return fake_quant(w, scale, self.bits, axis=self.weight_axis)

    def prepare(self) -> None:
        if self.mode in ("sim", "int8") and "w" not in self._cache:
            self._cache["w"] = self.quant_weight()
            self._cache["b"] = None if self.effective_bias() is None else self.effective_bias().detach()
        if self.mode == "int8" and self.int8_op is not None:
            self.int8_op()

    int8_op = None

    # -- int8 through oneDNN's linear kernel --------------------------------------------------
    def _packed_linear(self, w_matrix: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor]):
        """A kernel computing x (rows, in) -> (rows, out) with int8 inputs and int8 weights."""
        codes = quant_codes(w_matrix / scales[:, None], 1.0, self.bits).contiguous()  # prepack reads raw memory
        # a buffer, read through self below: torch.compile with frozen weights then sees a constant
        self.register_buffer(PACKED[0], torch.ops.onednn.qlinear_prepack(codes, None), persistent=False)
        w_scales = scales.float().contiguous()
        zeros = torch.zeros(len(scales), dtype=torch.long)
        bias = None if bias is None else bias.detach().float().contiguous()
        a_scale, bits, kind = float(self.a_scale), self.bits, self.a_kind
        q = qrange(bits)

        def gemm(codes_x: torch.Tensor, scale: float, b: Optional[torch.Tensor], _keep=codes) -> torch.Tensor:
            # _keep: the codes stay alive as long as the packed weight (oneDNN does not say whether it copies)
            return qlinear(codes_x, scale, self.int8_linear, w_scales, zeros, b)

        if kind == "gelu":  # two groups, two scales: two integer products
            neg_scale = second_scale("gelu", bits)

            def run(x2: torch.Tensor) -> torch.Tensor:
                out = gemm(quant_codes(x2, a_scale, bits, low=0, unsigned=True), a_scale, bias)
                # the second product accumulates into the first's output (oneDNN's sum post-op):
                # no second output tensor (512 MB in the decoder's last upscaling) to allocate and add
                return torch.ops.onednn.qlinear_pointwise.binary(
                    quant_codes(x2, neg_scale, bits, low=-q, high=0, unsigned=True),
                    neg_scale,
                    128,
                    self.int8_linear,
                    w_scales,
                    zeros,
                    out,
                    None,
                    1.0,
                    0,
                    torch.float32,
                    1.0,
                    0,
                    "sum",
                    1.0,
                    "none",
                    [],
                    "",
                )
        elif kind == "":

            def run(x2: torch.Tensor) -> torch.Tensor:
                return gemm(quant_codes(x2, a_scale, bits, unsigned=True), a_scale, bias)
        else:
            return None
        return run


class QLinear(QuantWeighted, nn.Linear):
    def float_op(self, x, w, b):
        return F.linear(x, w, b)

    def int8_op(self):
        if "int8" not in self._cache:
            run = self._packed_linear(self.weight.detach(), self.b_scale, self.bias)
            self._cache["int8"] = (
                None if run is None else (lambda x: run(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1))
            )
        return self._cache["int8"]


class _QConvBase(QuantWeighted):
    """Conv2d semantics shared by plain and BatchNorm-folded convolutions."""

    def conv(self) -> nn.Conv2d:
        return self

    def float_op(self, x, w, b):
        c = self.conv()
        return F.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups)

    def as_matrix(self, w: torch.Tensor) -> torch.Tensor:
        g = self.conv().groups
        return w.reshape(g, w.shape[0] // g, -1)

    def int8_op(self):
        if "int8" in self._cache:
            return self._cache["int8"]
        c, run = self.conv(), None
        if c.groups == 1 and c.kernel_size == (1, 1) and c.stride == (1, 1) and c.padding == (0, 0):
            # a 1x1 convolution is a linear layer over channels: run it channels-last
            w = self.effective_weight().detach()
            lin = self._packed_linear(w.reshape(w.shape[0], -1), self.b_scale, self.effective_bias())
            if lin is not None:

                def pointwise(x):
                    b, _, h, wd = x.shape
                    return lin(x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])).view(b, h, wd, -1).permute(0, 3, 1, 2)

                run = pointwise
        elif c.groups == 1 and self.a_kind == "":
            run = self._packed_conv()
        self._cache["int8"] = run
        return run

    def _packed_conv(self):
        c = self.conv()
        codes = self.weight_codes().contiguous()
        a_scale, bits = float(self.a_scale), self.bits
        w_scales = self.b_scale.float().contiguous()
        zeros = torch.zeros(len(w_scales), dtype=torch.long)
        bias = self.effective_bias()
        bias = None if bias is None else bias.detach().float().contiguous()
        args = (list(c.stride), list(c.padding), list(c.dilation), c.groups)
        self.register_buffer(
            PACKED[1], torch.ops.onednn.qconv_prepack(codes, w_scales, a_scale, 128, *args, None), persistent=False
        )

        def run(x, _keep=codes):  # oneDNN's int8 convolution takes unsigned codes: zero point 128
            ux = quant_codes(x, a_scale, bits, unsigned=True)
            return torch.ops.onednn.qconv_pointwise(
                ux, a_scale, 128, self.int8_conv, w_scales, zeros, bias, *args, 1.0, 0, torch.float32, "none", [], None
            )

        return run


class QConv2d(_QConvBase, nn.Conv2d):
    pass


class QConv2dBN(_QConvBase, Conv2d_BN):
    """A Conv2d_BN quantized after folding its BatchNorm (inference runs the folded convolution)."""

    def conv(self) -> nn.Conv2d:
        return self.c

    def effective_weight(self) -> torch.Tensor:
        return self.folded()[0]

    def effective_bias(self) -> torch.Tensor:
        return self.folded()[1]


class QConvTranspose2d(QuantWeighted, nn.ConvTranspose2d):
    """SAM's 2x2 stride-2 upscaling: each input pixel feeds its own 2x2 output block, so it is a
    linear layer from C_in to C_out * 4 per pixel (how the recorder and the int8 kernel see it)."""

    weight_axis = 1

    def check_supported(self) -> None:
        if (
            self.kernel_size != self.stride
            or self.padding != (0, 0)
            or self.groups != 1
            or self.output_padding != (0, 0)
            or self.dilation != (1, 1)
        ):
            raise ValueError("only transposed convolutions with kernel == stride, no padding, one group are supported")

    def float_op(self, x, w, b):
        return F.conv_transpose2d(x, w, b, self.stride, self.padding, self.output_padding, self.groups, self.dilation)

    def as_matrix(self, w: torch.Tensor) -> torch.Tensor:
        return w.permute(1, 2, 3, 0).reshape(1, -1, w.shape[0])  # rows ordered (out, ky, kx)

    def int8_op(self):
        if "int8" not in self._cache:
            k = self.kernel_size
            w = self.weight.detach()
            # output columns ordered (ky, kx, out): each input pixel's k x k block of output
            # pixels, channels innermost, so a channels-last result is a copy of whole rows
            rows = w.permute(2, 3, 1, 0).reshape(-1, w.shape[0])
            scales = self.b_scale.repeat(k[0] * k[1])
            bias = None if self.bias is None else self.bias.detach().repeat(k[0] * k[1])
            lin = self._packed_linear(rows, scales, bias)

            def upscale(x):
                b, c, h, wd = x.shape
                y = lin(x.permute(0, 2, 3, 1).reshape(-1, c)).view(b, h, wd, k[0], k[1], -1)
                if x.is_contiguous():  # NCHW in, NCHW out (a full transpose)
                    return y.permute(0, 5, 1, 3, 2, 4).reshape(b, -1, h * k[0], wd * k[1])
                # channels-last in (the decoder's fast upscaling): channels-last out, (b, h, ky, w, kx, C) in memory
                out = y.permute(0, 1, 3, 2, 4, 5).reshape(b, h * k[0], wd * k[1], -1)
                return out.permute(0, 3, 1, 2)

            self._cache["int8"] = None if lin is None else upscale
        return self._cache["int8"]


class QMatMul(QuantMixin, nn.Module):
    """An attention matmul of two activations, A (..., n, d) @ B (..., d, m), one scale each;
    the value matmul's A is a softmax output (twin scales)."""

    def __init__(self, bits: int, a_kind: str = "") -> None:
        nn.Module.__init__(self)
        self.init_quant(bits)
        self.a_kind = a_kind

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.mode == "float":
            return torch.matmul(a, b)
        if self.mode == "observe":
            out = torch.matmul(a, b)
            self.recorder.observe_matmul(self, a, b, out)
            return out
        return torch.matmul(self.quant_input(a), fake_quant(b, self.b_scale, self.bits))


_SWAPS = ((Conv2d_BN, QConv2dBN), (nn.ConvTranspose2d, QConvTranspose2d), (nn.Conv2d, QConv2d), (nn.Linear, QLinear))


def quant_layers(model: nn.Module) -> Dict[str, QuantMixin]:
    """Every quantized layer of a converted model, by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantMixin)}


def convert(model: nn.Module, bits: int, scopes: List[str]) -> Dict[str, QuantMixin]:
    """Swap every linear / convolution under `scopes` (module paths) for its quantized class and give
    every attention module quantized matmuls; returns the quantized layers by path (mode "float")."""
    from ..modeling.tiny_vit import Attention as WindowAttention
    from ..modeling.transformer import Attention as DecoderAttention

    for scope in scopes:
        root = model.get_submodule(scope)
        for name, module in list(root.named_modules()):
            if isinstance(module, QuantMixin):
                continue
            if isinstance(module, (WindowAttention, DecoderAttention)) and module.matmuls is None:
                module.matmuls = nn.ModuleList([QMatMul(bits), QMatMul(bits, a_kind="softmax")])
                continue
            for float_cls, quant_cls in _SWAPS:
                if type(module) is float_cls:
                    if float_cls is nn.Conv2d and _inside_conv_bn(root, name):
                        break  # the conv of a Conv2d_BN is quantized with its BatchNorm folded in
                    module.__class__ = quant_cls
                    module.init_quant(bits)
                    if isinstance(module, QConvTranspose2d):
                        module.check_supported()
                    break
    return quant_layers(model)


def _inside_conv_bn(root: nn.Module, name: str) -> bool:
    parent = name.rpartition(".")[0]
    return bool(name) and isinstance(root.get_submodule(parent) if parent else root, Conv2d_BN)


class FrozenCompiled(nn.Module):
    """`module` compiled by Inductor for inference with its weights frozen into constants: oneDNN's
    packed int8 weights become graph constants, and each quantization step (round, clamp, cast)
    fuses into the op that produced its input instead of being a pass over memory of its own.
    Works for float modules too (the fair baseline). Set the mode first: compiling happens on the
    first call (minutes for a whole encoder), under torch.no_grad or inference_mode, and a later
    mode change is not seen. Attributes not its own are the module's (`img_size`, ...)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.compiled = torch.compile(module, dynamic=False)

    def forward(self, *args, **kwargs):
        # freezing is read when the graph is compiled, outside what torch.compile(options=) patches
        with torch._inductor.config.patch(freezing=True):
            return self.compiled(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.compiled, name)


def compile_frozen(module: nn.Module) -> nn.Module:
    """See FrozenCompiled."""
    return FrozenCompiled(module)


def set_mode(model: nn.Module, mode: str) -> None:
    """Switch every quantized layer of `model` to one mode ("float", "sim", "int8", ...)."""
    mode = resolve_mode(mode)
    for layer in quant_layers(model).values():
        layer.set_mode(mode)
