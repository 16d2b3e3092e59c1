"""Calibration: the paper's Hessian-guided alternating grid search of each matmul's two scales.

For a quantized matmul O = A B the distance between the quantized output and the float one is
weighted by the diagonal Hessian of the task loss KL(masks) + KL(IoUs) at the layer's output:
`d = sum_rows sum_j H_jj (O^_j - O_j)^2`. At the float model the KL's gradient is zero, and its
Hessian equals the Fisher information, estimated here (as in PTQ4ViT / BRECQ) by squared gradients
of the model's log-likelihood of labels sampled from its own predictions: per-pixel Bernoulli
labels for the mask logits, a categorical label over the IoU predictions.

One calibration pass records, for every quantized layer, the max |A| (and |B|), a sample of
input rows (stratified, see Recorder; patches for convolutions, (batch, head) slices for
attention matmuls) and the gradients at the matching output rows. The search then runs on those samples alone:
scales `alpha * max / 2^(b-1)` for alpha on `n` points in [theta_l, theta_u], alternately for A
(with B fixed) and B (with A fixed), `rounds` times, starting from max-scaling.
"""

import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..modeling.sam import Sam
from .layers import QConvTranspose2d, QMatMul, QuantMixin, QuantWeighted, _QConvBase, quant_layers
from .quantizer import GELU_MIN, fake_quant, max_scale, qrange, twin_fake_quant


@dataclass
class QuantConfig:
    """The recipe. Defaults are the paper's (W8A8, theta_l=0.01, theta_u=1.2, n=100, rounds=3, 8 images)."""

    bits: int = 8
    theta_low: float = 0.01
    theta_high: float = 1.2
    candidates: int = 100
    rounds: int = 3
    calibration_images: int = 8
    points_per_side: int = 4  # calibration prompts: a grid of points, and two boxes per point (see boxes_of)
    rows_per_call: int = 128  # randomly sampled output rows (pixels / tokens) per layer call
    outlier_rows_per_call: int = 32  # plus the rows with the largest inputs (see Recorder)
    slices_per_call: int = 8  # attention matmuls: sampled (batch, head) slices per call,
    slice_rows: int = 64  # and rows of A (queries) and columns of B (keys) within them
    slice_cols: int = 256
    search: bool = True  # False: plain max-scaling (the baseline)
    seed: int = 0

    def __post_init__(self) -> None:
        qrange(self.bits)
        if not 0 < self.theta_low < self.theta_high:
            raise ValueError("need 0 < theta_low < theta_high")
        if self.candidates < 1 or self.rounds < 1 or self.calibration_images < 1:
            raise ValueError("candidates, rounds and calibration_images must be >= 1")

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


class Recorder:
    """Collects, per quantized layer, the statistics and samples the search needs.

    Rows are sampled as a stratified estimate of the whole call's distance: the rows whose inputs
    are largest are always kept (weight 1), the rest are a random sample weighted by the inverse
    sampling rate. Without the outlier rows a scale that clips rare large activations looks free.
    """

    def __init__(self, config: QuantConfig) -> None:
        self.config = config
        self.gen = torch.Generator().manual_seed(config.seed)
        self.amax_a: Dict[QuantMixin, float] = {}
        self.amin_a: Dict[QuantMixin, float] = {}
        self.amax_b: Dict[QuantMixin, float] = {}
        self.a: Dict[QuantMixin, List[torch.Tensor]] = {}
        self.b: Dict[QuantMixin, List[torch.Tensor]] = {}
        self.g: Dict[QuantMixin, List[torch.Tensor]] = {}
        self.w: Dict[QuantMixin, List[torch.Tensor]] = {}

    def _stats(self, layer, a: torch.Tensor) -> None:
        a = a.detach()
        self.amax_a[layer] = max(self.amax_a.get(layer, 0.0), float(a.abs().max()))
        self.amin_a[layer] = min(self.amin_a.get(layer, 0.0), float(a.min()))

    def _pick(self, total: int, k: int) -> torch.Tensor:
        if total <= k:
            return torch.arange(total)
        return torch.randperm(total, generator=self.gen)[:k]

    def _pick_rows(self, layer, row_max: torch.Tensor) -> torch.Tensor:
        """Indices of the outlier rows and a random sample of the others; records their weights."""
        total = row_max.numel()
        k, top = self.config.rows_per_call, self.config.outlier_rows_per_call
        if total <= k + top:
            idx, weight = torch.arange(total), torch.ones(total)
        else:
            outliers = torch.topk(row_max.reshape(-1), top).indices
            rest = torch.ones(total, dtype=torch.bool)
            rest[outliers] = False
            others = rest.nonzero()[:, 0]
            others = others[torch.randperm(len(others), generator=self.gen)[:k]]
            idx = torch.cat([outliers, others])
            weight = torch.cat([torch.ones(top), torch.full((k,), (total - top) / k)])
        self.w.setdefault(layer, []).append(weight)
        return idx

    def _hook(self, layer, out: torch.Tensor, select: Callable[[torch.Tensor], torch.Tensor]) -> None:
        grads = self.g.setdefault(layer, [])
        slot = len(grads)
        grads.append(torch.zeros_like(select(out.detach())))  # stays zero if no gradient arrives
        if out.requires_grad:

            def store(g: torch.Tensor) -> None:
                grads[slot] = select(g.detach())

            out.register_hook(store)

    def observe(self, layer: QuantWeighted, x: torch.Tensor, out: torch.Tensor) -> None:
        """Input rows (g, in) and output rows (g, out) of a linear, convolution or 2x2 up-convolution."""
        if not torch.is_grad_enabled():
            return  # a helper pass (finding box prompts), not a calibration sample
        self._stats(layer, x)
        x = x.detach()
        if isinstance(layer, _QConvBase):
            c = layer.conv()
            b, _, ho, wo = out.shape
            # a patch's largest input, through a max-pool of the per-pixel channel max
            pixel_max = x.abs().amax(1, keepdim=True)
            row_max = F.max_pool2d(pixel_max, c.kernel_size, c.stride, c.padding, c.dilation)[:, 0, :ho, :wo]
            idx = self._pick_rows(layer, row_max)
            bi, yi, xi = idx // (ho * wo), (idx // wo) % ho, idx % wo
            a = _patches(x, bi, yi, xi, c.kernel_size, c.stride, c.padding, c.dilation)
            g = c.groups
            a = a.reshape(len(idx), g, -1)

            def select(t: torch.Tensor) -> torch.Tensor:
                return t[bi, :, yi, xi].reshape(len(idx), g, -1)
        elif isinstance(layer, QConvTranspose2d):
            b, _, h, w = x.shape
            kh, kw = layer.kernel_size
            idx = self._pick_rows(layer, x.abs().amax(1))
            bi, yi, xi = idx // (h * w), (idx // w) % h, idx % w
            a = x[bi, :, yi, xi].reshape(len(idx), 1, -1)
            ys = (yi[:, None] * kh + torch.arange(kh)[None]).repeat_interleave(kw, 1)
            xs = (xi[:, None] * kw + torch.arange(kw)[None]).repeat(1, kh)

            def select(t: torch.Tensor) -> torch.Tensor:  # (rows, out, kh*kw) -> rows ordered (out, ky, kx)
                return t[bi[:, None], :, ys, xs].permute(0, 2, 1).reshape(len(idx), 1, -1)
        else:
            rows = x.reshape(-1, x.shape[-1])
            idx = self._pick_rows(layer, rows.abs().amax(1))
            a = rows[idx].reshape(len(idx), 1, -1)

            def select(t: torch.Tensor) -> torch.Tensor:
                return t.reshape(-1, t.shape[-1])[idx].reshape(len(idx), 1, -1)

        self.a.setdefault(layer, []).append(a.clone())
        self._hook(layer, out, select)

    def observe_matmul(self, layer: QMatMul, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
        if not torch.is_grad_enabled():
            return
        self._stats(layer, a)
        self.amax_b[layer] = max(self.amax_b.get(layer, 0.0), float(b.detach().abs().max()))
        a3 = a.detach().reshape(-1, *a.shape[-2:])
        b3 = b.detach().reshape(-1, *b.shape[-2:])
        c = self.config
        idx = self._pick(a3.shape[0], c.slices_per_call)
        rows = self._pick(a3.shape[1], c.slice_rows)  # output (i, j) needs row i of A and column j of B
        cols = self._pick(b3.shape[2], c.slice_cols)
        rate = (a3.shape[0] / len(idx)) * (a3.shape[1] / len(rows)) * (b3.shape[2] / len(cols))
        self.w.setdefault(layer, []).append(torch.full((len(idx),), rate))
        self.a.setdefault(layer, []).append(a3[idx][:, rows].clone())
        self.b.setdefault(layer, []).append(b3[idx][:, :, cols].clone())
        self._hook(layer, out, lambda t: t.reshape(-1, *t.shape[-2:])[idx][:, rows][:, :, cols])


def _patches(x: torch.Tensor, bi, yi, xi, kernel, stride, padding, dilation) -> torch.Tensor:
    """The convolution's input patches (rows, C * kh * kw) at the sampled output positions."""
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    dy = torch.arange(kernel[0]) * dilation[0]
    dx = torch.arange(kernel[1]) * dilation[1]
    ys = (yi[:, None] * stride[0] + dy[None]).repeat_interleave(kernel[1], 1)  # (rows, kh*kw)
    xs = (xi[:, None] * stride[1] + dx[None]).repeat(1, kernel[0])
    p = xp[bi[:, None], :, ys, xs]  # (rows, kh*kw, C)
    return p.permute(0, 2, 1).reshape(len(bi), -1)


# -- the calibration pass ------------------------------------------------------------------------


def calibration_prompts(points_per_side: int, size: int) -> torch.Tensor:
    """A regular grid of point prompts (n, 1, 2) inside a `size` x `size` model input."""
    step = size / points_per_side
    c = (torch.arange(points_per_side, dtype=torch.float32) + 0.5) * step
    ys, xs = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)[:, None, :]


def decode_all(
    sam: Sam, embedding: torch.Tensor, points: Optional[torch.Tensor] = None, boxes: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """All 4 mask logits (P, 4, 256, 256) and IoU predictions (P, 4) for single positive points
    and / or boxes (model-input coordinates): every output head takes part in the task loss, so
    every decoder layer gets a gradient."""
    sparse = []
    if points is not None:
        labels = torch.ones(points.shape[:2], dtype=torch.int64)
        sparse.append(sam.prompt_encoder(points=(points, labels), boxes=None, masks=None)[0])
    if boxes is not None:
        sparse.append(sam.prompt_encoder(points=None, boxes=boxes, masks=None)[0])
    dense = sam.prompt_encoder(points=None, boxes=None, masks=None)[1]  # "no mask", shared
    masks, iou, _ = sam.mask_decoder.predict_masks(
        embedding, sam.prompt_encoder.get_dense_pe(), torch.cat(sparse), dense
    )
    return masks, iou


def _box(mask: torch.Tensor, scale: float) -> torch.Tensor:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if not len(ys):
        return torch.tensor([0.0, 0.0, 256.0, 256.0]) * scale
    return torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float() * scale


def boxes_of(masks: torch.Tensor, iou: torch.Tensor) -> torch.Tensor:
    """Box prompts (2P, 4) in model-input coordinates around each point prompt's best multimask
    output and around its smallest one: calibration then covers box prompts of whole objects and
    of small parts (their tokens differ from points'), without any labels."""
    multi = masks[:, 1:] > 0  # (P, 3, 256, 256)
    best = multi[torch.arange(len(multi)), iou[:, 1:].argmax(1)]
    area = multi.flatten(2).sum(2).float()
    area[area == 0] = float("inf")
    small = multi[torch.arange(len(multi)), area.argmin(1)]
    scale = 4.0  # 256 low-res logits -> 1024 model input
    return torch.stack([_box(m, scale) for m in torch.cat([best, small])])


def task_loss(ref_masks, ref_iou, masks, iou) -> torch.Tensor:
    """KL(masks) + KL(IoUs) of a quantized output against the float one: per-pixel Bernoulli KL
    averaged over pixels and masks, plus the KL of the softmax over each prompt's IoU predictions."""
    p = torch.sigmoid(ref_masks)
    kl_mask = (
        p * (F.logsigmoid(ref_masks) - F.logsigmoid(masks))
        + (1 - p) * (F.logsigmoid(-ref_masks) - F.logsigmoid(-masks))
    ).mean()
    kl_iou = F.kl_div(F.log_softmax(iou, -1), F.log_softmax(ref_iou, -1), log_target=True, reduction="batchmean")
    return kl_mask + kl_iou


def _fisher_loss(masks: torch.Tensor, iou: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Log-likelihood of labels sampled from the model's own predictions: its squared gradients
    estimate the diagonal Hessian (Fisher) of task_loss at the float model."""
    with torch.no_grad():
        y = torch.bernoulli(torch.sigmoid(masks), generator=gen)
        c = torch.multinomial(torch.softmax(iou, -1), 1, generator=gen)[:, 0]
    return F.binary_cross_entropy_with_logits(masks, y) + F.cross_entropy(iou, c)


def record(
    sam: Sam, images: Sequence[torch.Tensor], config: QuantConfig, progress: Optional[Callable[[str], None]] = None
) -> Recorder:
    """Run the float model over the calibration images (model inputs, 1x3x1024x1024), recording."""
    rec = Recorder(config)
    layers = quant_layers(sam)
    for layer in layers.values():
        layer.recorder = rec
        layer.set_mode("observe")
    gen = torch.Generator().manual_seed(config.seed)
    points = calibration_prompts(config.points_per_side, sam.image_encoder.img_size)
    try:
        for i, x in enumerate(images):
            with torch.enable_grad():
                x = x.detach().clone().requires_grad_(True)  # activations need a graph; weights stay frozen
                embedding = sam.image_encoder(x)
                with torch.no_grad():
                    boxes = boxes_of(*decode_all(sam, embedding.detach(), points))
                masks, iou = decode_all(sam, embedding, points, boxes)
                _fisher_loss(masks, iou, gen).backward()
            if progress:
                progress(f"calibration image {i + 1}/{len(images)} recorded")
    finally:
        for layer in layers.values():
            layer.recorder = None
            layer.set_mode("float")
    return rec


# -- the search ------------------------------------------------------------------------------------


class _Problem:
    """One layer's samples: A rows (rows, groups, in), the float output rows (rows, groups, out;
    no bias: it cancels) and H = g^2 times the rows' sampling weights. Distances are per group:
    the groups of a grouped convolution are independent matmuls with scales of their own."""

    def __init__(self, layer: QuantMixin, rec: Recorder) -> None:
        self.layer = layer
        self.a = torch.cat(rec.a[layer])
        g = torch.cat(rec.g[layer])
        weight = torch.cat(rec.w[layer]).view(-1, *([1] * (g.dim() - 1)))
        h = g * g * weight
        # A layer no gradient reaches (rare) falls back to the plain squared error.
        self.h = h if float(h.sum()) > 0 else torch.ones_like(h)
        if isinstance(layer, QMatMul):
            self.b = torch.cat(rec.b[layer])
            self.b_amax = torch.tensor([rec.amax_b[layer]])
            self.out = torch.matmul(self.a, self.b)
            self.groups = 1
        else:
            self.w = layer.effective_weight().detach()
            self.b_amax = layer.channel_amax()
            self.out = torch.einsum("rgk,gnk->rgn", self.a, layer.as_matrix(self.w))
            self.groups = self.a.shape[1]
        self.a_amax = torch.full((self.groups,), rec.amax_a[layer])
        if self.groups > 1:  # each group's own max
            self.a_amax = torch.clamp(self.a.abs().amax(dim=(0, 2)), min=1e-8)

    def per_out(self, ratio: torch.Tensor) -> torch.Tensor:
        """Per-group ratios (groups,) spread over the weight's output channels."""
        return ratio.repeat_interleave(len(self.b_amax) // len(ratio))

    def quant_b(self, scale: torch.Tensor) -> torch.Tensor:
        if isinstance(self.layer, QMatMul):
            return fake_quant(self.b, scale, self.layer.bits)
        return self.layer.as_matrix(self.layer.quant_weight(scale))

    def quant_a(self, scale: torch.Tensor) -> torch.Tensor:
        return twin_fake_quant(self.a, scale, self.layer.a_kind, self.layer.bits, axis=1)

    def distance(self, qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
        """(groups,) Hessian-weighted squared error of the quantized output."""
        if isinstance(self.layer, QMatMul):
            err = self.h * (torch.matmul(qa, qb) - self.out).square_()
            return err.sum().view(1)
        err = self.h * (torch.einsum("rgk,gnk->rgn", qa, qb) - self.out).square_()
        return err.sum(dim=(0, 2))


def _activation_kind(layer: QuantMixin, rec: Recorder) -> str:
    """Twin scales after softmax (set by the model) and GELU: an input whose calibration minimum
    lies in GELU's range [-0.17, 0) is taken as a GELU output."""
    if layer.a_kind:
        return layer.a_kind
    low = rec.amin_a[layer]
    return "gelu" if -GELU_MIN <= low < 0 else ""


def search_layer(layer: QuantMixin, rec: Recorder, config: QuantConfig) -> Dict[str, float]:
    """Set the layer's scales: max-scaling, then (config.search) the alternating grid search,
    for every group at once (groups are independent, so each keeps its own best ratio)."""
    bits = layer.bits
    layer.a_kind = _activation_kind(layer, rec)
    prob = _Problem(layer, rec)
    a_base = max_scale(prob.a_amax, bits)
    b_base = max_scale(prob.b_amax, bits)
    ratios = torch.linspace(config.theta_low, config.theta_high, config.candidates).tolist()
    alpha = torch.ones(prob.groups)
    beta = torch.ones(prob.groups)
    qb = prob.quant_b(b_base)
    start = best = prob.distance(prob.quant_a(a_base), qb)
    if config.search:
        for _ in range(config.rounds):
            for r in ratios:  # A with B fixed
                d = prob.distance(prob.quant_a(a_base * r), qb)
                better = d < best
                alpha, best = torch.where(better, r, alpha), torch.where(better, d, best)
            qa = prob.quant_a(a_base * alpha)
            for r in ratios:  # B with A fixed
                d = prob.distance(qa, prob.quant_b(b_base * prob.per_out(torch.full_like(beta, r))))
                better = d < best
                beta, best = torch.where(better, r, beta), torch.where(better, d, best)
            qb = prob.quant_b(b_base * prob.per_out(beta))
    layer.a_scale = (a_base * alpha).float()
    layer.b_scale = (b_base * prob.per_out(beta)).float()
    layer._cache.clear()
    return {
        "alpha": float(alpha.mean()),
        "beta": float(beta.mean()),
        "distance_max_scaling": float(start.sum()),
        "distance": float(best.sum()),
    }


def search_scales(
    sam: Sam, rec: Recorder, config: QuantConfig, progress: Optional[Callable[[str], None]] = None
) -> Dict[str, Dict[str, float]]:
    """Search every recorded layer at `config.bits` (the samples do not depend on the bit width, so
    one recording serves several searches); layers never called keep float (alpha = None)."""
    results: Dict[str, Dict[str, float]] = {}
    layers = quant_layers(sam)
    for layer in layers.values():
        layer.bits = config.bits
    t0 = time.time()
    for n, (name, layer) in enumerate(layers.items(), start=1):
        if layer not in rec.a:
            results[name] = {"alpha": None}
            continue
        t = time.time()
        results[name] = search_layer(layer, rec, config)
        results[name]["kind"] = layer.a_kind
        results[name]["seconds"] = time.time() - t
        if progress and (n % 20 == 0 or n == len(layers)):
            progress(f"scales searched for {n}/{len(layers)} layers ({time.time() - t0:.0f} s)")
    return results
