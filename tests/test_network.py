"""MultitaskUNet on the networks nnU-Net builds: one encoder pass, nnU-Net-compatible forward and weights,
and gradient isolation between the phases."""
import pytest
import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from multitask_nnunet.network import MultitaskUNet, split_state_dict

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


def batch(dim: int) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 1, *([16] * dim))


@pytest.mark.parametrize("arch,dim", ARCHS)
def test_forward_is_nnunets_and_weights_are_stock_compatible(arch, dim):
    plain = build(arch, dim)
    model = MultitaskUNet(build(arch, dim), num_classes=3)
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
    assert logits.shape == (2, 3)
    segmentation_weights, head_weights = split_state_dict(model.state_dict())
    assert set(segmentation_weights) == set(plain.state_dict())
    assert head_weights and all(not k.startswith("classification_head.") for k in head_weights)
    build(arch, dim, deep_supervision=False).load_state_dict(segmentation_weights)  # strict, like nnUNetv2_predict


def test_one_encoder_pass_per_forward():
    model = MultitaskUNet(build("PlainConvUNet", 3), num_classes=3)
    calls = []
    model.encoder.register_forward_hook(lambda *a: calls.append(1))
    model.forward_multitask(batch(3))
    assert len(calls) == 1


def test_head_follows_the_reference_design():
    model = MultitaskUNet(build("PlainConvUNet", 3), num_classes=3)
    layers = list(model.classification_head.mlp)
    kinds = [type(m).__name__ for m in layers]
    assert kinds == ["LayerNorm", "Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert layers[0].normalized_shape == (16,)  # C_bottleneck read from the encoder
    assert (layers[1].in_features, layers[1].out_features) == (16, 128)
    assert (layers[4].in_features, layers[4].out_features) == (128, 64)
    assert (layers[7].in_features, layers[7].out_features) == (64, 3)
    assert layers[3].p == 0.3


@pytest.mark.parametrize("arch,dim", ARCHS)
def test_gradient_isolation(arch, dim):
    """Phase 1 (detached features): the classification loss sends exactly zero gradient into the encoder but
    trains the head; phase 2: it reaches the encoder."""
    model = MultitaskUNet(build(arch, dim), num_classes=3)
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
        assert sum(float(p.grad.abs().sum()) for p in model.classification_head.parameters()) > 0


def test_divisibility_is_product_of_strides():
    assert MultitaskUNet(build("PlainConvUNet", 3), num_classes=2).divisibility() == (4, 4, 4)
