"""Behaviour of refilled.networks: shapes, sizes, errors, interface contracts."""

import pytest
import torch

from refilled.errors import UserError
from refilled.networks import Network, build_network, teacher_arch

SMALL = {  # fast members of each family
    "wide_resnet": dict(depth=10, width=1, dropout_rate=0.3),
    "resnet": dict(depth=8),
    "mobile_net": dict(ca=0.25),
}


def n_params(params) -> int:
    return sum(p.numel() for p in params)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name", list(SMALL))
@pytest.mark.parametrize("in_channels,size", [(3, 32), (1, 8)])
def test_output_shapes(name, in_channels, size):
    net = build_network(name, 7, in_channels=in_channels, image_size=size, **SMALL[name])
    assert isinstance(net, Network)
    emb, logits = net(torch.randn(2, in_channels, size, size))
    assert emb.shape == (2, net.embedding_dim)
    assert logits.shape == (2, 7)
    assert net.n_classes == 7 and net.classifier.out_features == 7


@pytest.mark.parametrize("size,image_size", [(64, 64), (128, 128)])
def test_mobile_net_other_input_sizes(size, image_size):
    net = build_network("mobile_net", 5, ca=0.25, image_size=image_size)
    emb, logits = net(torch.randn(2, 3, size, size))
    assert emb.shape == (2, 256) and logits.shape == (2, 5)


def test_mobile_net_stem_stride_follows_image_size():
    small = build_network("mobile_net", 5, ca=0.25, image_size=32)
    large = build_network("mobile_net", 5, ca=0.25, image_size=224)
    assert small.features[0].stride == (1, 1)
    assert large.features[0].stride == (2, 2)


@pytest.mark.parametrize("kw,dim", [
    (dict(name="wide_resnet", depth=16, width=1), 64),
    (dict(name="wide_resnet", depth=40, width=2), 128),
    (dict(name="resnet", depth=20, width=1), 64),
    (dict(name="resnet", depth=16, width=2), 128),
    (dict(name="mobile_net", ca=0.25), 256),
    (dict(name="mobile_net", ca=1.0), 1024),
])
def test_embedding_dim(kw, dim):
    net = build_network(n_classes=10, **kw)
    assert net.embedding_dim == dim == net.classifier.in_features


@pytest.mark.parametrize("kw,low,high", [
    (dict(name="wide_resnet", depth=40, width=2), 2.2e6 * 0.95, 2.2e6 * 1.05),  # WRN-40-2
    (dict(name="wide_resnet", depth=16, width=1), 0.17e6, 0.18e6),              # WRN-16-1
    (dict(name="resnet", depth=110), 1.7e6 * 0.95, 1.7e6 * 1.05),               # ResNet-110
    (dict(name="resnet", depth=20), 0.26e6, 0.28e6),                            # ResNet-20
    (dict(name="mobile_net", ca=1.0), 3.1e6, 3.3e6),                            # MobileNet 1.0
])
def test_parameter_counts_plausible(kw, low, high):
    net = build_network(n_classes=10, **kw)
    assert low <= n_params(net.parameters()) <= high


@pytest.mark.parametrize("name,depth", [
    ("wide_resnet", 15), ("wide_resnet", 18), ("wide_resnet", 4),
    ("resnet", 15), ("resnet", 18), ("resnet", 4),
])
def test_bad_depth_raises_user_error(name, depth):
    with pytest.raises(UserError, match=f"got {depth}$"):
        build_network(name, 10, depth=depth)


def test_accepted_resnet_depths():
    for depth in (8, 10, 16, 20, 32):
        build_network("resnet", 10, depth=depth)

    def n_blocks(depth):
        return sum(type(m).__name__ == "_BasicBlock" for m in build_network("resnet", 10, depth=depth).modules())

    assert n_blocks(16) == 6 and n_blocks(20) == 9  # n = (depth - 2) // 6 per stage


def test_bad_name_and_arguments_raise_user_error():
    with pytest.raises(UserError, match="wide_resnet, resnet, mobile_net"):
        build_network("vgg", 10)
    with pytest.raises(UserError, match="width"):
        build_network("wide_resnet", 10, width=0)
    with pytest.raises(UserError, match="ca"):
        build_network("mobile_net", 10, ca=0.0)
    with pytest.raises(UserError, match="depth"):
        build_network("resnet", 10, depth=16.5)
    with pytest.raises(UserError):
        teacher_arch("vgg")


@pytest.mark.parametrize("name", list(SMALL))
def test_feature_parameters_exclude_exactly_the_classifier(name):
    net = build_network(name, 10, **SMALL[name])
    feats = net.feature_parameters()
    classifier_ids = {id(p) for p in net.classifier.parameters()}
    assert not classifier_ids & {id(p) for p in feats}
    assert n_params(feats) + n_params(net.classifier.parameters()) == n_params(net.parameters())
    assert len(feats) + 2 == len(list(net.parameters()))


@pytest.mark.parametrize("name", list(SMALL))
def test_arch_round_trip(name):
    net = build_network(name, 10, in_channels=1, image_size=8, **SMALL[name])
    again = build_network(**net.arch)
    assert again.arch == net.arch
    a, b = net.state_dict(), again.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    again.load_state_dict(a)  # strict load works


@pytest.mark.parametrize("name,kw", [(n, teacher_arch(n)) for n in SMALL])
def test_teacher_arch(name, kw):
    expected = {"wide_resnet": dict(depth=40, width=2, dropout_rate=0.3),
                "resnet": dict(depth=110, width=1), "mobile_net": dict(ca=1.0)}[name]
    assert kw == {"name": name, **expected}
    assert build_network(n_classes=50, **kw).arch["name"] == name


@pytest.mark.parametrize("name", list(SMALL))
def test_gradients_reach_first_conv(name):
    net = build_network(name, 4, **SMALL[name])
    emb, logits = net(torch.randn(4, 3, 32, 32))
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    first_conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0
    # embedding-only losses (stage 1) also reach it, without touching the classifier
    net.zero_grad(set_to_none=True)
    net.embed(torch.randn(4, 3, 32, 32)).pow(2).sum().backward()
    assert first_conv.weight.grad.abs().sum() > 0 and net.classifier.weight.grad is None


@pytest.mark.parametrize("name", list(SMALL))
def test_logits_are_classifier_of_embedding_and_eval_is_deterministic(name):
    net = build_network(name, 6, **SMALL[name]).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        emb, logits = net(x)
        emb2, logits2 = net(x)
        torch.testing.assert_close(logits, net.classifier(emb))
        torch.testing.assert_close(net.embed(x), emb)
    assert torch.equal(emb, emb2) and torch.equal(logits, logits2)


def test_train_mode_dropout_is_active_for_wide_resnet():
    net = build_network("wide_resnet", 6, depth=10, dropout_rate=0.5).train()
    x = torch.randn(3, 3, 32, 32)
    assert not torch.equal(net(x)[0], net(x)[0])


@pytest.mark.parametrize("p", [0.3, 0.5])
def test_dropout_mask_keeps_the_distribution_and_scaling(p):
    """The wide_resnet's dropout draws its mask as rand >= p (cheaper than bernoulli_
    on CPU): a fraction p of zeros, survivors scaled by 1/(1-p), off in eval mode."""
    net = build_network("wide_resnet", 6, depth=10, dropout_rate=p)
    dropout = next(m for m in net.modules() if isinstance(m, torch.nn.Dropout))
    x = torch.ones(400, 16, 8, 8).to(memory_format=torch.channels_last)
    y = dropout.train()(x)
    zeros = (y == 0).float().mean().item()
    assert abs(zeros - p) < 0.01, zeros
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p)))
    assert abs(y.mean().item() - 1.0) < 0.02  # the expectation is kept
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(dropout.eval()(x), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # an fp32 draw under autocast: same fraction
        z = dropout.train()(x.bfloat16())
    assert abs((z == 0).float().mean().item() - p) < 0.01


def test_prepare_model_uses_channels_last_on_cpu_with_the_same_outputs():
    from refilled.runtime import prepare_model

    net = build_network("wide_resnet", 6, **SMALL["wide_resnet"]).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = net(x)
        prepared = prepare_model(net, torch.device("cpu"))
        assert prepared.features[0].weight.is_contiguous(memory_format=torch.channels_last)
        out = prepared(x.contiguous(memory_format=torch.channels_last))
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_keep_freed_memory_sets_glibc_malloc():
    import platform

    from refilled.runtime import keep_freed_memory

    assert keep_freed_memory() is (platform.libc_ver()[0] == "glibc")


@pytest.mark.parametrize("name", list(SMALL))
def test_channels_last_and_bf16_autocast(name):
    net = build_network(name, 6, **SMALL[name]).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref_emb, ref_logits = net(x)
        cl = net.to(memory_format=torch.channels_last)
        emb, logits = cl(x.to(memory_format=torch.channels_last))
        torch.testing.assert_close(emb, ref_emb, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            emb16, logits16 = cl(x.to(memory_format=torch.channels_last))
    assert emb16.shape == ref_emb.shape and logits16.shape == ref_logits.shape
    assert logits16.dtype == torch.bfloat16
    assert torch.isfinite(emb16.float()).all() and torch.isfinite(logits16.float()).all()
    # bf16 is coarse; the result must still be close to the float32 one
    assert (logits16.float() - ref_logits).abs().max() < 0.1 * ref_logits.abs().max() + 0.1


def test_bf16_autocast_training_step():
    net = build_network("resnet", 4, depth=8).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb, logits = net(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
