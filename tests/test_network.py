"""MultitaskUNet on the networks nnU-Net builds: one encoder pass, nnU-Net-compatible forward and weights,
gradient isolation between the phases, and the head registry."""
import json
import math

import pytest
import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from multitask_nnunet.errors import InputError
from multitask_nnunet.model.heads import HEADS, SegGuidedHead, build_head, head_spec_from_checkpoint, plan_head
from multitask_nnunet.model.network import MultitaskUNet, split_state_dict

COMMON = {"conv_bias": True, "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
          "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
REQ_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]


def build(arch: str, dim: int, deep_supervision: bool = True):
    conv, norm = (("torch.nn.Conv3d", "torch.nn.InstanceNorm3d") if dim == 3 else
                  ("torch.nn.Conv2d", "torch.nn.InstanceNorm2d"))
    kwargs = {"n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": conv, "norm_op": norm,
              "kernel_sizes": [[3] * dim] * 3, "strides": [[1] * dim, [2] * dim, [2] * dim], **COMMON}
    if arch == "PlainConvUNet":
        kwargs.update(n_conv_per_stage=[1, 1, 1], n_conv_per_stage_decoder=[1, 1])
    else:
        kwargs.update(n_blocks_per_stage=[1, 1, 1], n_conv_per_stage_decoder=[1, 1])
    torch.manual_seed(0)
    return get_network_from_plans(f"dynamic_network_architectures.architectures.unet.{arch}", kwargs, REQ_IMPORT,
                                  input_channels=1, output_channels=2, allow_init=True,
                                  deep_supervision=deep_supervision)


ARCHS = [("PlainConvUNet", 3), ("PlainConvUNet", 2), ("ResidualEncoderUNet", 3), ("ResidualEncoderUNet", 2)]
# a label-based network with 2 output channels: the guide is label 1 (softmax), as resolve_guide plans it
LABEL_GUIDE = {"guide_channels": [1], "foreground_channels": [1], "guide_activation": "softmax"}


def multitask(arch: str, dim: int, head_class: str = "SegGuidedHead", deep_supervision: bool = True,
              num_classes: int = 3, **head_kwargs) -> MultitaskUNet:
    network = build(arch, dim, deep_supervision)
    spec = plan_head(head_class, network.encoder.output_channels, num_classes, LABEL_GUIDE, **head_kwargs)
    return MultitaskUNet(network, build_head(spec))


def batch(dim: int) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 1, *([16] * dim))


@pytest.mark.parametrize("head_class", sorted(HEADS))
@pytest.mark.parametrize("arch,dim", ARCHS)
def test_forward_is_nnunets_and_weights_are_stock_compatible(arch, dim, head_class):
    plain = build(arch, dim)
    model = multitask(arch, dim, head_class)
    model.load_state_dict({**model.state_dict(), **plain.state_dict()})
    model.eval(), plain.eval()
    x = batch(dim)
    seg_only = model(x)
    seg, logits = model.forward_multitask(x)
    expected = plain(x)
    assert isinstance(seg_only, list) and len(seg_only) == len(expected) == 2  # deep supervision as nnU-Net set it
    for a, b, c in zip(seg_only, seg, expected):
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(b, c)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    segmentation_weights, head_weights = split_state_dict(model.state_dict())
    assert set(segmentation_weights) == set(plain.state_dict())
    assert head_weights and all(not k.startswith("classification_head.") for k in head_weights)
    build(arch, dim, deep_supervision=False).load_state_dict(segmentation_weights)  # strict, like nnUNetv2_predict


def test_one_encoder_pass_per_forward():
    model = multitask("PlainConvUNet", 3)
    calls = []
    model.encoder.register_forward_hook(lambda *a: calls.append(1))
    model.forward_multitask(batch(3))
    assert len(calls) == 1


def test_gap_head_follows_the_reference_design():
    model = multitask("PlainConvUNet", 3, "GAPHead")
    layers = list(model.classification_head.mlp)
    kinds = [type(m).__name__ for m in layers]
    assert kinds == ["LayerNorm", "Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert layers[0].normalized_shape == (16,)  # C_bottleneck read from the encoder
    assert (layers[1].in_features, layers[1].out_features) == (16, 128)
    assert (layers[4].in_features, layers[4].out_features) == (128, 64)
    assert (layers[7].in_features, layers[7].out_features) == (64, 3)
    assert layers[3].p == 0.3


def test_seg_guided_head_pools_stages_one_on_plus_bottleneck():
    head = multitask("PlainConvUNet", 3).classification_head
    assert head.pool_stages == [1, 2]
    # stages 1 and 2 by the guide and by the organ, the bottleneck's global average; the 4 + 6 descriptors (1
    # channel) in their own branch
    assert head.mlp[0].normalized_shape == (2 * (8 + 16) + 16,)
    assert head.descriptor_linear.in_features == 10
    inline = multitask("PlainConvUNet", 3, descriptor_logits=False).classification_head
    assert inline.mlp[0].normalized_shape == (2 * (8 + 16) + 16 + 10,) and inline.descriptor_linear is None
    plain = multitask("PlainConvUNet", 3, context=False, descriptors=False).classification_head
    assert plain.mlp[0].normalized_shape == (8 + 16 + 16,)


@pytest.mark.parametrize("head_class,head_kwargs", [(name, {}) for name in sorted(HEADS)] +
                         [("SegGuidedHead", {"attention": False, "context": False,
                                                               "descriptors": False})])
@pytest.mark.parametrize("arch,dim", ARCHS)
def test_gradient_isolation(arch, dim, head_class, head_kwargs):
    """Warm-up and phase 1 (detached features): the classification loss sends exactly zero gradient into the
    encoder and decoder but trains the head; phase 2: it reaches the encoder."""
    model = multitask(arch, dim, head_class, **head_kwargs)
    target = torch.tensor([0, 2])
    for detach, encoder_gets_gradient in ((True, False), (False, True)):
        model.zero_grad(set_to_none=False)
        _, logits = model.forward_multitask(batch(dim), detach_features=detach)
        torch.nn.functional.cross_entropy(logits, target).backward()
        encoder_grads = [p.grad for p in model.encoder.parameters()]
        total = sum(float(g.abs().sum()) for g in encoder_grads if g is not None)
        if encoder_gets_gradient:
            assert total > 0
        else:
            assert all(g is None or torch.count_nonzero(g) == 0 for g in encoder_grads)
        # the guide is always detached: the classification loss never trains the decoder
        encoder_ids = {id(p) for p in model.encoder.parameters()}  # nnU-Net's decoder holds the encoder too
        assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.decoder.parameters()
                   if id(p) not in encoder_ids)
        assert sum(float(p.grad.abs().sum()) for p in model.classification_head.parameters()) > 0


def _guided_head(activation="sigmoid", **kwargs) -> SegGuidedHead:
    return SegGuidedHead([1, 1], num_classes=2, guide_channels=[1], foreground_channels=[0, 1],
                         guide_activation=activation, pool_stages=[0], **kwargs)


def test_seg_guided_head_pools_where_the_guide_is():
    """Features 5 inside a small cube and 0 elsewhere: the guide-weighted mean is ~5 while a global average is
    ~0.01, which is what a lesion of well under 1% of the crop leaves after global pooling."""
    head = _guided_head()
    features = torch.zeros(1, 1, 8, 32, 32)
    features[..., 2:4, 10:13, 10:13] = 5
    logits = torch.full((1, 2, 8, 32, 32), -20.0)
    logits[:, 1, 2:4, 10:13, 10:13] = 20.0
    weights = head.pooling_weights(logits)
    pooled = (features * weights).sum() / weights.sum()
    assert float(pooled) > 4.9 and float(features.mean()) < 0.05


def test_seg_guided_head_falls_back_when_the_guide_is_empty():
    """Empty guide -> foreground; empty foreground too -> uniform (global pooling); never NaN."""
    head = _guided_head()
    logits = torch.full((3, 2, 4, 8, 8), -30.0)
    logits[0, 1, 1, 1, 1:4] = 30.0          # case 0: guide (3 voxels)
    logits[1, 0, 2, 2:6, 2:6] = 30.0        # case 1: no guide, foreground channel 0 only
    weights = head.pooling_weights(logits)  # case 2: nothing at all
    assert float(weights[0].sum()) == pytest.approx(3, abs=1e-3)
    assert float(weights[1].sum()) == pytest.approx(16, abs=1e-3)
    assert torch.equal(weights[2], torch.ones_like(weights[2]))
    out = head([torch.randn(3, 1, 4, 8, 8), torch.randn(3, 1, 2, 4, 4)], logits)
    assert torch.isfinite(out).all()


def test_seg_guided_head_attention_learns_where_to_pool_within_the_guide():
    """``attention=True``: zero-initialised scores give exactly the plain guide pooling; scores learned from the
    class loss alone (the lesion not segmented, the guide fallen back to the foreground) move the pooling onto
    the voxels that carry the class, never outside the guide's support, without overflow for large scores."""
    def head(**kwargs):
        return SegGuidedHead([2, 1], num_classes=2, guide_channels=[1], foreground_channels=[0, 1],
                             pool_stages=[0], **kwargs)
    torch.manual_seed(0)
    plain, attending = head(), head(attention=True)
    attending.mlp.load_state_dict(plain.mlp.state_dict())
    plain.eval(), attending.eval()
    logits = torch.full((2, 2, 4, 8, 8), -30.0)
    logits[:, 0, :, :, :4] = 30.0                      # foreground predicted, no guide: the fallback pools it
    features = [torch.zeros(2, 2, 4, 8, 8), torch.zeros(2, 1, 2, 4, 4)]
    features[0][:, 1] = 1.0                            # channel 1: the same everywhere
    features[0][1, 0, 1, 1, 1] = 5.0                   # case 1 (class 1): one "lesion" voxel in the foreground
    features[0][:, 0, 3, 7, 7] = 9.0                   # both cases: a brighter voxel outside it
    torch.testing.assert_close(attending(features, logits), plain(features, logits))
    assert [p.shape for p in attending.attention.parameters()] == [(1, 2), (1,)]
    pooled = []
    attending.mlp.register_forward_hook(lambda m, args, out: pooled.append(args[0][:, 0].detach()))
    attending.train()
    optimizer = torch.optim.Adam(attending.parameters(), lr=0.05)
    for _ in range(100):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(attending(features, logits), torch.tensor([0, 1])).backward()
        optimizer.step()
    kept = attending.last_pooling_weights  # what the trainer logs: where the first pooled stage pooled
    assert kept.shape == (2, 1, 4, 8, 8) and float(kept[1, 0, 1, 1, 1] / kept[1].sum()) > 0.5
    attending.eval()
    with torch.no_grad():
        attending(features, logits)
    # the plain pooling's mean over the foreground is 5/128 in case 1; learned, the lesion voxel holds most of
    # the weight, and the brighter voxel outside the guide's support none (the pooled value would exceed 5)
    assert float(pooled[0][1]) == pytest.approx(5 / 128) and 2.5 < float(pooled[-1][1]) <= 5.0
    assert float(pooled[-1][0]) == 0.0
    with torch.no_grad():
        attending.attention[0].weight.fill_(1e4)
        assert torch.isfinite(attending(features, logits)).all()
        from multitask_nnunet.model.heads import _attend
        weights = _attend(torch.tensor([[0.0, 1.0, 1.0, 0.5]]), torch.tensor([[1e5, 3.0, 1e4, 1e4]]))
        torch.testing.assert_close(weights, torch.tensor([[0.0, 0.0, 1.0, 0.5]]))


def test_logged_guide_share_reads_the_attended_weights_at_their_own_grid():
    """The trainer's ``train_guide_share`` with an attention head: the attended weights of the first pooled stage
    (half the segmentation's resolution here) against the ground-truth mask area-averaged to that grid."""
    from types import SimpleNamespace
    from multitask_nnunet.training.trainer import MultitasknnUNetTrainer
    head = SimpleNamespace(last_pooling_weights=torch.zeros(2, 1, 2, 4, 4))
    head.last_pooling_weights[:, 0, 0, 0, 0] = 3.0     # both cases: 3/4 of the weight on the first coarse voxel
    head.last_pooling_weights[:, 0, 1, 3, 3] = 1.0
    trainer = SimpleNamespace(_unwrapped_network=lambda: SimpleNamespace(classification_head=head))
    mask = torch.zeros(2, 1, 4, 8, 8, dtype=torch.bool)
    mask[0, 0, :2, :2, :2] = True                      # case 0: the whole first coarse voxel
    mask[1, 0, 0, 0, 0] = True                         # case 1: an eighth of it
    share = MultitasknnUNetTrainer._guide_share(trainer, mask)
    assert share == pytest.approx([0.75, 0.75 / 8])


def test_seg_guided_head_keeps_its_training_pooling_weights_for_the_log():
    """In training mode the head keeps the detached weights it pooled with (what the trainer logs as
    ``train_guide_share``, without computing them twice); at inference it keeps nothing, and never in its state."""
    head = _guided_head()
    logits = torch.full((2, 2, 4, 8, 8), -30.0)
    logits[:, 1, 1, 1, 1:4] = 30.0
    features = [torch.randn(2, 1, 4, 8, 8, requires_grad=True), torch.randn(2, 1, 2, 4, 4)]
    head.train()
    head(features, logits).sum().backward()
    assert torch.equal(head.last_pooling_weights, head.pooling_weights(logits))
    assert not head.last_pooling_weights.requires_grad
    assert "last_pooling_weights" not in head.state_dict()
    kept = head.last_pooling_weights
    head.eval()
    with torch.no_grad():
        head(features, logits)
    assert head.last_pooling_weights is kept


def test_head_specs_round_trip_and_old_checkpoints_load():
    network = build("PlainConvUNet", 3)
    for name in HEADS:
        spec = plan_head(name, network.encoder.output_channels, 3, LABEL_GUIDE)
        rebuilt = build_head(json.loads(json.dumps(spec)))  # as stored: plain JSON types
        assert type(rebuilt).__name__ == name
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
            {k: v.shape for k, v in build_head(spec).state_dict().items()}
    old = build_head(plan_head("GAPHead", network.encoder.output_channels, 3))
    legacy_entry = {"state_dict": old.state_dict(), "num_classes": 3, "hidden": [128, 64], "dropout": 0.3,
                    "class_names": ["a", "b", "c"]}  # a 0.1.0 checkpoint's classification_head
    build_head(head_spec_from_checkpoint(legacy_entry)).load_state_dict(legacy_entry["state_dict"])


def _quiz_like_case():
    """One case, 1 input channel: an organ (foreground channel 0) of 8x8x8 voxels holding a 2x2x2 guide
    (channel 1), intensity 1 in the organ, 5 in the guide, 0 outside."""
    logits = torch.full((1, 2, 8, 16, 16), -30.0)
    logits[0, 0, 0:8, 4:12, 4:12] = 30.0
    logits[0, 1, 3:5, 7:9, 7:9] = 30.0
    image = torch.zeros(1, 1, 8, 16, 16)
    image[0, 0, 0:8, 4:12, 4:12] = 1.0
    image[0, 0, 3:5, 7:9, 7:9] = 5.0
    return logits, image


def test_seg_guided_head_descriptors_read_the_predicted_structures():
    """Volumes in mL (``voxel_ml`` each), the guide's share of the organ, the found flag, and the intensity in the
    guide, its rim and the organ without it; a missed guide gives volume 0, found 0 and zero guide statistics."""
    head = _guided_head(descriptors=True, voxel_ml=0.5)
    logits, image = _quiz_like_case()
    guide, organ = head.predicted_structures(logits)
    d = head.describe(image, guide, organ)[0]
    assert d.shape == (10,)
    torch.testing.assert_close(d[:4], torch.tensor([math.log1p(8 * 0.5), math.log1p(512 * 0.5), 8 / 512, 1.0]))
    # guide mean 5, spread 0; rim (2 voxels around it, all inside the organ) mean 1, spread 0; parenchyma 1, 0
    torch.testing.assert_close(d[4:], torch.tensor([5.0, 0.0, 1.0, 0.0, 1.0, 0.0]))
    missed = logits.clone()
    missed[:, 1] = -30.0
    guide, organ = head.predicted_structures(missed)
    d = head.describe(image, guide, organ)[0]
    assert float(d[0]) == 0.0 and float(d[3]) == 0.0 and float(d[4]) == 0.0 and float(d[5]) == 0.0
    assert float(d[8]) == pytest.approx(1 + 4 * 8 / 512)  # the parenchyma is the whole organ: 504 ones, 8 fives


def test_seg_guided_head_interior_reads_intensities_away_from_the_boundaries():
    """With ``interior``, a guide whose edge voxels mix with the organ is read on its core, the rim stays inside
    the organ, and the parenchyma skips the organ's edge and the guide's surroundings; without it, the guide's
    spread is the mixing at its edge and the parenchyma takes in the lesion voxels the segmentation missed.
    A guide too small to have an interior is read whole."""
    logits = torch.full((1, 2, 12, 24, 24), -30.0)
    logits[0, 0, 1:11, 2:22, 2:22] = 30.0        # the organ, 10 x 20 x 20
    logits[0, 1, 3:9, 8:14, 8:14] = 30.0         # the predicted guide, 6 x 6 x 6
    image = torch.full((1, 1, 12, 24, 24), -4.0)  # background
    image[0, 0, 1:11, 2:22, 2:22] = 1.0
    image[0, 0, 3:9, 8:14, 8:14] = 2.0           # the guide's edge: half lesion, half organ
    image[0, 0, 4:8, 9:13, 9:13] = 5.0           # the lesion itself
    image[0, 0, 3:9, 8:14, 14] = 5.0             # lesion voxels the segmentation missed
    image[0, 0, 1:11, 2:22, 2] = 0.0             # the organ's edge, partly background
    interior = _guided_head(descriptors=True, interior=True)
    whole = _guided_head(descriptors=True)
    guide, organ = interior.predicted_structures(logits)
    d = interior.describe(image, guide, organ)[0]
    torch.testing.assert_close(d[4:6], torch.tensor([5.0, 0.0]))  # the core: 4 x 4 x 4 fives
    lesion, rim, parenchyma = interior.intensity_regions(guide, organ)
    assert int(lesion.sum()) == 64 and not bool((rim & ~(organ > 0)).any())
    assert float(d[8]) == pytest.approx(1.0) and float(d[9]) == pytest.approx(0.0)  # ones only
    w = whole.describe(image, guide, organ)[0]
    assert float(w[5]) > 1.0 and float(w[8]) < 1.0  # spread from the edge; parenchyma pulled off 1
    small = logits.clone()
    small[0, 1] = -30.0
    small[0, 1, 5:7, 10:12, 10:12] = 30.0        # 2 x 2 x 2: no interior
    g, o = interior.predicted_structures(small)
    assert int(interior.intensity_regions(g, o)[0].sum()) == 8
    assert interior.descriptor_presence(g, o)[0].all()


def test_seg_guided_head_context_branch_reads_the_organ_whatever_the_guide():
    """With ``context``, the organ-weighted mean is pooled beside the guide's: features that change only in the
    organ outside the guide change the logits, and a missed guide still leaves the organ's features."""
    torch.manual_seed(0)
    head = _guided_head(context=True, descriptors=True).eval()
    logits, image = _quiz_like_case()
    features = [torch.zeros(1, 1, 8, 16, 16), torch.zeros(1, 1, 4, 8, 8)]
    features[0][0, 0, 3:5, 7:9, 7:9] = 3.0
    moved = [f.clone() for f in features]
    moved[0][0, 0, 0:2, 4:6, 4:6] = 7.0  # organ voxels away from the guide
    pooled = []
    head.mlp.register_forward_hook(lambda m, args, out: pooled.append(args[0].detach()))
    with torch.no_grad():
        head(features, logits, image), head(moved, logits, image)
    assert float(pooled[0][0, 0]) == pytest.approx(3.0) and float(pooled[1][0, 0]) == pytest.approx(3.0)  # guide
    assert float(pooled[1][0, 1]) > float(pooled[0][0, 1])  # the context branch saw the change
    with pytest.raises(ValueError, match="needs the network's input image"):
        head(features, logits)


def test_seg_guided_head_guide_dropout_pools_some_training_cases_as_if_the_guide_were_missed():
    """In training, ``guide_dropout`` drops the predicted guide of about that share of the cases (their guide
    branch pools the organ, as at inference when the lesion is missed); in evaluation nothing is dropped."""
    torch.manual_seed(0)
    head = _guided_head(guide_dropout=0.5)
    logits, image = _quiz_like_case()
    logits = logits.repeat(200, 1, 1, 1, 1)
    features = [torch.randn(200, 1, 8, 16, 16), torch.randn(200, 1, 4, 8, 8)]
    head.train()
    head(features, logits)
    pooled_voxels = head.last_pooling_weights.flatten(1).gt(0).sum(1)
    guided, organ_only = pooled_voxels == 8, pooled_voxels == 512
    assert bool((guided ^ organ_only).all()) and 60 < int(organ_only.sum()) < 140
    head.eval()
    head.keep_pooling_weights = True
    head(features, logits)
    assert int((head.last_pooling_weights.flatten(1).gt(0).sum(1) == 8).sum()) == 200
    with pytest.raises(ValueError, match="guide_dropout"):
        _guided_head(guide_dropout=1.0)


def test_checkpoints_with_retired_head_options_at_their_off_value_still_load():
    network = build("PlainConvUNet", 3)
    spec = plan_head("SegGuidedHead", network.encoder.output_channels, 3, LABEL_GUIDE)
    head = build_head(spec)
    old = {"class_name": "SegGuidedHead", "kwargs": {**spec["kwargs"], "guide_top_fraction": 0.0,
                                                      "pool_decoder_stages": []}, "state_dict": head.state_dict()}
    build_head(head_spec_from_checkpoint(old)).load_state_dict(old["state_dict"])
    old["kwargs"]["guide_top_fraction"] = 0.1
    with pytest.raises(InputError, match="guide_top_fraction=0.1"):
        head_spec_from_checkpoint(old)


def test_divisibility_is_product_of_strides():
    assert multitask("PlainConvUNet", 3).divisibility() == (4, 4, 4)


def test_running_standardizer_learns_the_statistics_of_present_values_only():
    """Standardised by running mean and sd; absent values give 0 (their mean) and do not move the statistics;
    evaluation does not update them."""
    from multitask_nnunet.model.heads import RunningStandardizer
    torch.manual_seed(0)
    standardizer = RunningStandardizer(2).train()
    for _ in range(400):
        values = torch.randn(2, 2) * torch.tensor([3.0, 0.5]) + torch.tensor([5.0, -1.0])
        present = torch.tensor([[True, True], [True, False]])
        values[1, 1] = 1000.0  # not measured: must not count
        out = standardizer(values, present)
        assert float(out[1, 1]) == 0.0
    torch.testing.assert_close(standardizer.mean, torch.tensor([5.0, -1.0]), atol=0.8, rtol=0)
    torch.testing.assert_close(standardizer.var.sqrt(), torch.tensor([3.0, 0.5]), atol=0.8, rtol=0)
    assert standardizer.count.tolist() == [800.0, 400.0]
    standardizer.eval()
    before = standardizer.mean.clone()
    out = standardizer(torch.tensor([[5.0, 100.0]]), torch.tensor([[True, True]]))
    assert torch.equal(standardizer.mean, before) and float(out[0, 1]) == standardizer.clip


def test_seg_guided_head_descriptor_branch_is_a_fast_logistic_layer_on_standardised_descriptors():
    """``descriptor_logits``: the descriptors' own linear layer, zero at first, in a parameter group at
    DESCRIPTOR_LR_SCALE; a missed guide leaves its statistics at 0 after standardisation (imputed at the mean)."""
    head = _guided_head(descriptors=True, descriptor_logits=True)
    assert float(head.descriptor_linear.weight.detach().abs().sum()) == 0.0
    groups = head.parameter_groups()
    assert [g["lr_scale"] for g in groups] == [1.0, SegGuidedHead.DESCRIPTOR_LR_SCALE]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in head.descriptor_linear.parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(head.parameters()))
    logits, image = _quiz_like_case()
    missed = logits.clone()
    missed[:, 1] = -30.0
    features = [torch.randn(1, 1, 8, 16, 16)]
    standardised = []
    head.standardizer.register_forward_hook(lambda m, args, out: standardised.append(out.detach()))
    head.train()
    for _ in range(3):
        head(features, logits, image)
    head(features, missed, image)
    present = head.descriptor_presence(*head.predicted_structures(missed))[0]
    assert present.tolist() == [False, True, False, True] + [False] * 4 + [True] * 2
    assert float(standardised[-1][0][~present].abs().sum()) == 0.0
    with pytest.raises(ValueError, match="descriptor_logits needs descriptors"):
        _guided_head(descriptor_logits=True)


def test_seg_guided_head_refit_fits_the_descriptor_branch_and_the_missed_guide_mode():
    """``refit``: the standardiser takes the first pass's statistics and the linear layer becomes a logistic
    regression on top of the MLP's logits: it learns a class signal in the guide's statistics, and from the pass
    with the guide removed, one in the organ's; a case without a guide then gets a less confident answer."""
    torch.manual_seed(0)
    head = _guided_head(descriptors=True, descriptor_logits=True, guide_dropout=0.25).eval()
    head.mlp[-1].weight.data.zero_()
    head.mlp[-1].bias.data.zero_()  # the MLP says nothing: the refit alone must tell the classes
    assert [w for w, _ in head.refit_passes()] == [0.75, 0.25]
    n = 90
    labels = torch.arange(n) % 2

    def records(removed):
        out = []
        for y in labels.tolist():
            values = torch.randn(1, 10) * 0.3
            values[0, 8] += 0.5 * y  # the parenchyma's mean: a weak signal, always measured
            present = torch.ones(1, 10, dtype=torch.bool)
            if removed:
                present[0, [0, 2, 4, 5, 6, 7]] = False
            else:
                values[0, 4] += 2.0 * y  # the guide's mean: a strong one
            out.append((values, present, torch.zeros(1, 2)))
        return out

    found, missed = records(False), records(True)
    message = head.refit([(0.75, found), (0.25, missed)], labels.tolist(), torch.ones(2))
    assert "refitted on 90 training cases" in message
    torch.testing.assert_close(float(head.standardizer.mean[4]), float(torch.cat([r[0] for r in found])[:, 4].mean()))
    weight = head.descriptor_linear.weight.detach()
    assert float(weight[1, 4] - weight[0, 4]) > 1.0 and float(weight[1, 8] - weight[0, 8]) > 0.3

    def probabilities(rows):
        values, present = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
        return torch.softmax(head.descriptor_linear(head.standardizer(values, present)), 1).detach()

    p_found, p_missed = probabilities(found), probabilities(missed)
    assert float((p_found.argmax(1) == labels).float().mean()) > 0.9
    assert float((p_missed.argmax(1) == labels).float().mean()) > 0.6
    assert float(p_missed.max(1).values.mean()) < float(p_found.max(1).values.mean())
    with head.guide_removed():
        assert head._remove_guide
    assert not head._remove_guide
    assert _guided_head(descriptors=True).refit_passes() == []
