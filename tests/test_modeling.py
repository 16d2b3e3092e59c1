"""Our models against the official code: same state-dict layout, same outputs (fp32, CPU)."""

import os
import warnings

import numpy as np
import pytest
import torch

from tinysam import SamPredictor, build_sam, save_checkpoint
from tinysam.build_sam import infer_model_type
from tinysam.weights import CheckpointError

from .helpers import import_official, randomize_

EXPECTED_KEYS = {"vit_h": 594, "vit_l": 482, "vit_b": 314, "vit_t": 439}
TOL = 1e-4


@pytest.fixture(autouse=True)
def all_cores():
    """Parity runs at the default thread count, whose rounding TOL was set for (conftest gives each
    xdist worker fewer threads; with 1 the vit_t logits move 4e-4 from the official)."""
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(before)


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h"])
def test_sam_vit_state_dict_layout_equals_official(model_type):
    """On the meta device: the layout needs shapes only (ViT-H's 2.5 GB of random weights took
    most of this test's minute)."""
    segment_anything = import_official("segment_anything")
    with torch.device("meta"):
        official = segment_anything.sam_model_registry[model_type]()
        ours = build_sam(model_type)
    assert len(ours.state_dict()) == EXPECTED_KEYS[model_type]
    assert _shapes(ours.state_dict()) == _shapes(official.state_dict())
    # Both directions load strictly: official files into ours, our saves into the official code.
    ours.load_state_dict(official.state_dict(), strict=True, assign=True)
    official.load_state_dict(ours.state_dict(), strict=True, assign=True)
    assert infer_model_type(official.state_dict()) == model_type


def test_mobile_sam_checkpoint_loads_strictly_with_all_439_keys(mobile_sam_path, vit_t):
    sd = torch.load(mobile_sam_path, weights_only=True)
    assert len(sd) == 439
    assert any(k.startswith("image_encoder.head.") for k in sd)  # unused classifier kept
    assert any(k.endswith("num_batches_tracked") for k in sd)
    for k, v in vit_t.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_wrong_model_type_is_refused_with_a_hint(mobile_sam_path):
    with pytest.raises(CheckpointError, match=r"mobile_sam\.pt.*vit_b.*look like 'vit_t'"):
        build_sam("vit_b", str(mobile_sam_path))


def _predictor_outputs(predictor, image, prompts):
    predictor.set_image(image)
    emb = predictor.get_image_embedding().detach().clone()
    return emb, [predictor.predict(**p) for p in prompts]


def _prompts(h, w):
    return [
        dict(point_coords=np.array([[w * 0.45, h * 0.35]]), point_labels=np.array([1])),
        dict(
            point_coords=np.array([[w * 0.45, h * 0.35], [w * 0.8, h * 0.8]]),
            point_labels=np.array([1, 0]),
            multimask_output=False,
        ),
        dict(box=np.array([w * 0.2, h * 0.1, w * 0.75, h * 0.9])),
        dict(
            point_coords=np.array([[w * 0.5, h * 0.5]]),
            point_labels=np.array([1]),
            box=np.array([w * 0.2, h * 0.1, w * 0.75, h * 0.9]),
            multimask_output=False,
        ),
    ]


def _logits_close(a: np.ndarray, b: np.ndarray) -> bool:
    """Mask logits within TOL of the official relative to the official's own largest value (CPUs
    round differently: AVX2 kernels moved the vit_t logits 1.9e-4, at logits of 18). No floor on
    that scale: random-weight models give logits of ~1e-3, which a floor of 1 would compare to
    within 10%."""
    scale = np.abs(b).max()
    assert scale > 0, "all-zero reference logits"
    return np.abs(a - b).max() <= TOL * scale


def _assert_parity(ours_out, official_out, informative_masks: bool = True):
    """Embeddings, logits, IoU predictions and masks equal to the official's. With
    `informative_masks` some official mask must be neither empty nor full (random-weight models'
    tiny logits give all-or-nothing masks: their logits, compared at their own scale, carry the test)."""
    emb_a, preds_a = ours_out
    emb_b, preds_b = official_out
    assert emb_b.abs().max().item() >= 0.01  # a non-trivial embedding
    assert (emb_a - emb_b).abs().max().item() <= TOL * max(1.0, emb_b.abs().max().item())
    compared = 0
    for (ma, ia, la), (mb, ib, lb) in zip(preds_a, preds_b):
        assert ma.shape == mb.shape and la.shape == lb.shape == (ma.shape[0], 256, 256)
        assert _logits_close(la, lb)
        assert np.abs(ia - ib).max() <= TOL
        for a, b in zip(ma, mb):
            assert a.sum() == b.sum() == 0 or np.logical_and(a, b).sum() / np.logical_or(a, b).sum() >= 0.999
            compared += 0 < b.sum() < b.size  # neither empty nor full: a mask that says something
    assert compared >= 1 or not informative_masks, "every official mask empty or full: nothing was compared"


def test_vit_t_matches_official_mobilesam_with_real_weights(vit_t, official_vit_t, photos):
    mobile_sam = import_official("mobile_sam")
    for name in ("astronaut", "coffee"):
        image = photos[name]
        prompts = _prompts(*image.shape[:2])
        ours = _predictor_outputs(SamPredictor(vit_t), image, prompts)
        official = _predictor_outputs(mobile_sam.SamPredictor(official_vit_t), image, prompts)
        _assert_parity(ours, official)


def test_mask_input_round_trip_matches_official(vit_t, official_vit_t, astronaut):
    mobile_sam = import_official("mobile_sam")
    h, w = astronaut.shape[:2]
    first = dict(point_coords=np.array([[w * 0.45, h * 0.35]]), point_labels=np.array([1]))
    outs = []
    for predictor in (SamPredictor(vit_t), mobile_sam.SamPredictor(official_vit_t)):
        predictor.set_image(astronaut)
        _, iou, low_res = predictor.predict(**first)
        best = low_res[np.argmax(iou)][None]
        outs.append(predictor.predict(**first, mask_input=best, multimask_output=False))
    assert _logits_close(outs[0][2], outs[1][2])
    assert np.abs(outs[0][1] - outs[1][1]).max() <= TOL


# The encoders run two of their blocks: the first (windowed attention) and the first with global
# attention (vit_b: blocks 1 and 3 of 12, vit_h: 1 and 8 of 32): that runs every code path (patch
# embedding, windowed and global attention with their relative positions, neck) with the real widths
# and heads, in a CI-sized time; every block's configuration (window, heads) is asserted equal to
# the official one, and the layouts of all blocks are checked above. vit_l differs only in sizes.
@pytest.mark.parametrize("model_type", ["vit_b", "vit_h"])
def test_sam_vit_matches_official_with_random_weights(model_type, astronaut):
    segment_anything = import_official("segment_anything")
    # Built on the meta device and made real after the cut: ViT-H's 32 blocks of random weights
    # took most of a minute, for two blocks run.
    with torch.device("meta"):
        official = segment_anything.sam_model_registry[model_type]()
        ours = build_sam(model_type)
    blocks = list(zip(ours.image_encoder.blocks, official.image_encoder.blocks, strict=True))
    for a, b in blocks:
        assert (a.window_size, a.attn.num_heads) == (b.window_size, b.attn.num_heads)
    run = [0, next(i for i, (_, b) in enumerate(blocks) if b.window_size == 0)]
    for model in (ours, official):
        model.image_encoder.blocks = torch.nn.ModuleList(model.image_encoder.blocks[i] for i in run)
    official = randomize_(official.to_empty(device="cpu"), seed=1).eval()
    ours = ours.to_empty(device="cpu")
    ours.load_state_dict(official.state_dict(), strict=True)
    ours.eval()
    for model in (ours, official):  # not in the state dict: to_empty left them unset
        model.pixel_mean.copy_(torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1))
        model.pixel_std.copy_(torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1))
    prompts = _prompts(*astronaut.shape[:2])[2:]
    with torch.inference_mode():
        ours_out = _predictor_outputs(SamPredictor(ours), astronaut, prompts)
        official_out = _predictor_outputs(segment_anything.SamPredictor(official), astronaut, prompts)
    _assert_parity(ours_out, official_out, informative_masks=False)
    del official, ours


def test_decoder_returns_transformer_tokens_equal_to_official(vit_t, official_vit_t, astronaut):
    predictor = SamPredictor(vit_t)
    predictor.set_image(astronaut)
    emb = predictor.get_image_embedding()
    coords = torch.tensor([[[300.0, 200.0], [500.0, 700.0]], [[100.0, 100.0], [800.0, 600.0]]])
    labels = torch.tensor([[1, 0], [1, 1]])
    with torch.inference_mode():
        sparse, dense = vit_t.prompt_encoder((coords, labels), None, None)
        pe = vit_t.prompt_encoder.get_dense_pe()
        masks, iou, tokens = vit_t.mask_decoder(emb, pe, sparse, dense, True, return_tokens=True)
        masks2, iou2 = vit_t.mask_decoder(emb, pe, sparse, dense, True)
        # The oracle: the official transformer on explicitly repeated image tokens.
        dec = official_vit_t.mask_decoder
        out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        q = torch.cat([out_tokens[None].expand(2, -1, -1), sparse], dim=1)
        src = torch.repeat_interleave(emb, 2, dim=0) + dense
        hs, _ = dec.transformer(src, torch.repeat_interleave(pe, 2, dim=0), q)
    assert tokens.shape == (2, 1 + 4 + 3, 256)  # iou token, 4 mask tokens, 2 points + padding
    assert (tokens - hs).abs().max().item() <= TOL
    assert torch.equal(masks, masks2) and torch.equal(iou, iou2)


def test_batched_prompts_equal_one_by_one(vit_t, astronaut):
    predictor = SamPredictor(vit_t)
    predictor.set_image(astronaut)
    boxes = np.array([[50, 20, 300, 400], [200, 100, 480, 500], [10, 300, 200, 510]], dtype=float)
    masks, iou, low_res = predictor.predict(box=boxes, multimask_output=True)
    assert masks.shape == (3, 3, *astronaut.shape[:2]) and iou.shape == (3, 3)
    for i, box in enumerate(boxes):
        m, s, lr = predictor.predict(box=box)
        assert np.abs(lr - low_res[i]).max() <= TOL
        assert np.abs(s - iou[i]).max() <= TOL
        assert (m != masks[i]).mean() < 1e-4


def test_folded_decoder_equals_the_plain_decoder(vit_t, astronaut):
    """Everything mode's folded decoder: the plain decoder's function up to fp32 rounding, for
    points and boxes, one image or prompts grouped per image; quantized decoders are not folded."""
    from tinysam.modeling.folded_decoder import FoldedMaskDecoder, supports
    from tinysam.quant.layers import convert

    predictor = SamPredictor(vit_t)
    predictor.set_image(astronaut)
    emb = predictor.features
    two = torch.cat([emb, emb.flip(-1)])  # two different "images", prompts grouped 3 + 3
    pe = vit_t.prompt_encoder.get_dense_pe()
    gen = torch.Generator().manual_seed(0)
    points = (torch.rand(6, 1, 2, generator=gen) * 1024, torch.ones(6, 1, dtype=torch.int))
    boxes = torch.rand(6, 4, generator=gen) * 512
    boxes[:, 2:] += boxes[:, :2]
    folded = FoldedMaskDecoder(vit_t.mask_decoder)
    with torch.inference_mode():
        for images, prompts in ((emb, dict(points=points)), (two, dict(points=points)), (two, dict(boxes=boxes))):
            sparse, dense = vit_t.prompt_encoder(prompts.get("points"), prompts.get("boxes"), None)
            for multimask in (True, False):
                masks, iou = vit_t.mask_decoder(images, pe, sparse, dense, multimask_output=multimask)
                masks2, iou2 = folded(images, pe, sparse, dense, multimask_output=multimask)
                assert masks2.shape == masks.shape and iou2.shape == iou.shape
                assert (masks2 - masks).abs().max().item() <= 5e-3  # logits span about +-40
                assert (iou2 - iou).abs().max().item() <= TOL
                assert ((masks2 > 0) != (masks > 0)).float().mean().item() < 1e-5
    import copy

    quantized = copy.deepcopy(vit_t)
    convert(quantized, 8, ["mask_decoder"])
    assert not supports(quantized.mask_decoder)
    with pytest.raises(ValueError, match="float MaskDecoder"):
        FoldedMaskDecoder(quantized.mask_decoder)


def test_saved_checkpoint_loads_in_official_code_and_ours(vit_t, tmp_path):
    mobile_sam = import_official("mobile_sam")
    path = save_checkpoint(vit_t, tmp_path / "student.pt")
    sd = torch.load(path, weights_only=True)
    assert len(sd) == 439
    official = mobile_sam.sam_model_registry["vit_t"]()
    official.load_state_dict(sd, strict=True)
    again = build_sam("vit_t", str(path))
    for k, v in vit_t.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])


def test_checkpoint_preflight_checks_layout_without_building_weights(mobile_sam_path):
    from tinysam.build_sam import check_checkpoint

    check_checkpoint("vit_t", str(mobile_sam_path))
    with pytest.raises(CheckpointError, match=r"mobile_sam\.pt \(vit_h\).*look like 'vit_t'"):
        check_checkpoint("vit_h", str(mobile_sam_path))


@pytest.mark.parametrize("window", [0, 14])
def test_fused_rel_pos_attention_equals_explicit(window):
    """FlexAttention with the decomposed relative-position bias as a score_mod (the CUDA default)
    gives the explicit biased attention's output: a global block and a windowed one whose 20x20
    grid pads to two 14x14 windows; fp32 on CPU, random weights of SAM's layout."""
    from tinysam.modeling.image_encoder import Block, set_attention_impl

    torch.manual_seed(0)
    size = (20, 20)
    block = Block(64, 4, 4.0, True, torch.nn.LayerNorm, torch.nn.GELU, True, window, size).eval()
    with torch.no_grad():
        block.attn.rel_pos_h.normal_(0, 0.5)
        block.attn.rel_pos_w.normal_(0, 0.5)
    x = torch.randn(2, *size, 64)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention warns that it is a reference implementation
        explicit = set_attention_impl(block, "explicit")(x)
        fused = set_attention_impl(block, "fused")(x)
    assert block.attn.impl == "fused"
    assert (fused - explicit).abs().max().item() <= 1e-5 * explicit.abs().max().item()
    with pytest.raises(ValueError, match="attention impl"):
        set_attention_impl(block, "flash")
