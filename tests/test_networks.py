"""Behaviour of refilled.method.networks: the authors' networks, their checkpoints, shapes, errors."""

from pathlib import Path

import pytest
import torch

from refilled.errors import UserError
from refilled.method.networks import Network, build_network, from_authors, teacher_arch

SMALL = {  # fast members of each family
    "wide_resnet": dict(depth=10, width=1, dropout_rate=0.3),
    "resnet": dict(depth=8),
    "mobile_net": dict(ca=0.25),
}
AUTHORS = Path(__file__).resolve().parents[2] / "shared" / "authors_checkpoints"
# the authors' released networks (and one of their resnet.py with random weights), with
# the outputs their own code computes from them on fixed inputs (AUTHORS/README.md)
RELEASED = {
    "cifar100_wrn16_1": dict(name="wide_resnet", n_classes=100, depth=16, width=1, dropout_rate=0.3),
    "cub200_mobilenet_ca025": dict(name="mobile_net", n_classes=200, ca=0.25, image_size=224),
    "random_cifar100_resnet20": dict(name="resnet", n_classes=100, depth=20),
}


def n_params(params) -> int:
    return sum(p.numel() for p in params)


def close_relative(a: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    """Equal to 1e-5 relative, measured against the reference's scale."""
    torch.testing.assert_close(a, ref, rtol=rtol, atol=rtol * ref.abs().max().item())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------- the authors' checkpoints

@pytest.mark.parametrize("file", list(RELEASED))
def test_authors_checkpoints_give_the_authors_outputs(file):
    ref = torch.load(AUTHORS / f"{file}.ref.pt", weights_only=True)
    arch = ref["arch"]
    kw = RELEASED[file]
    assert arch["authors_module"] == kw["name"] and arch["number_of_classes"] == kw["n_classes"]
    net = from_authors(AUTHORS / f"{file}.model", kw["name"], kw["n_classes"],
                       **{k: v for k, v in kw.items() if k not in ("name", "n_classes")})
    assert not net.training  # loaded for use: eval mode
    net.eval()
    with torch.no_grad():
        embedding, logits = net(ref["x"])  # theirs: logits, embedding = net(x, flag_both=True)
    close_relative(embedding, ref["embedding"])
    close_relative(logits, ref["logits"])
    # and as every run uses it: channels_last weights and inputs
    from refilled.runtime import prepare_model

    with torch.no_grad():
        embedding, logits = prepare_model(net, torch.device("cpu"))(ref["x"].contiguous(memory_format=torch.channels_last))
    close_relative(embedding, ref["embedding"], 1e-4)
    close_relative(logits, ref["logits"], 1e-4)


def _authors_file(tmp_path, net: Network, name: str, data_parallel: bool = False) -> Path:
    """A checkpoint in the authors' format (pretrain.py: state_dict, validating_accuracy, epoch),
    optionally with DataParallel's "module." prefix (their runs on several GPUs)."""
    state = {("module." if data_parallel else "") + k: v for k, v in net.state_dict().items()}
    path = tmp_path / f"{name}.model"
    torch.save({"state_dict": state, "validating_accuracy": 0.5, "epoch": 7}, path)
    return path


@pytest.mark.parametrize("kw", [
    dict(name="wide_resnet", n_classes=100, depth=40, width=1, dropout_rate=0.3),  # released: depth 40 width 1
    dict(name="wide_resnet", n_classes=100, depth=16, width=2, dropout_rate=0.3),  # released: depth 16 width 2
    dict(name="mobile_net", n_classes=200, ca=0.5),                                # released: ca 0.5
    dict(name="resnet", n_classes=50, depth=110),
])
@pytest.mark.parametrize("data_parallel", [False, True])
def test_loader_holds_for_other_authors_architectures(tmp_path, kw, data_parallel):
    net = build_network(**kw).eval()
    path = _authors_file(tmp_path, net, kw["name"], data_parallel)
    loaded = from_authors(path, **kw)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(loaded(x), net(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_wrong_architecture_or_class_count_is_one_line(tmp_path):
    path = _authors_file(tmp_path, build_network("wide_resnet", 100, depth=16, width=1), "wrn16_1")
    with pytest.raises(UserError) as e:
        from_authors(path, "wide_resnet", 100, depth=40, width=2)
    msg = str(e.value)
    assert "\n" not in msg and "does not hold a wide_resnet depth 40 width 2" in msg
    assert "in the file" in msg and "the file's classifier has 100 classes" in msg
    with pytest.raises(UserError, match=r"fc.weight is \(100, 64\) in the file, \(50, 64\) here"):
        from_authors(path, "wide_resnet", 50, depth=16, width=1)
    with pytest.raises(UserError, match="does not hold a resnet depth 20"):
        from_authors(path, "resnet", 100, depth=20)
    torch.save({"weights": {}}, tmp_path / "other.model")
    with pytest.raises(UserError, match="not an authors' checkpoint"):
        from_authors(tmp_path / "other.model", "wide_resnet", 100)
    with pytest.raises(UserError, match="not found"):
        from_authors(tmp_path / "missing.model", "wide_resnet", 100)


# ----------------------------------------------------------------------------- the authors' quirks

def _blocks(net, kind: str):
    return [m for m in net.modules() if type(m).__name__ == kind]


def test_wide_resnet_block_strides_on_the_second_conv_and_shortcut_reads_the_raw_input():
    net = build_network("wide_resnet", 10, depth=16, width=2, dropout_rate=0.0)
    down = [b for b in _blocks(net, "_WideBlock") if b.conv2.stride == (2, 2)]
    assert len(down) == 2 and all(b.conv1.stride == (1, 1) for b in _blocks(net, "_WideBlock"))
    assert all(m.bias is not None for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    seen = {}
    block = down[0]
    block.register_forward_pre_hook(lambda m, args: seen.update(block_in=args[0]))  # hooks return None
    block.shortcut.register_forward_pre_hook(lambda m, args: seen.update(shortcut_in=args[0]))
    net(torch.randn(2, 3, 32, 32))
    assert torch.equal(seen["shortcut_in"], seen["block_in"])  # not its BN-ReLU'd form


def test_wide_resnet_last_batchnorm_keeps_about_the_last_batch_statistics():
    net = build_network("wide_resnet", 10, depth=10, width=1, dropout_rate=0.0).train()
    assert net.bn.momentum == 0.9 and all(m.momentum == 0.1 for m in net.modules()
                                          if isinstance(m, torch.nn.BatchNorm2d) and m is not net.bn)
    seen = {}
    net.bn.register_forward_pre_hook(lambda m, args: seen.update(x=args[0].detach()))
    net(torch.randn(8, 3, 32, 32))
    torch.testing.assert_close(net.bn.running_mean, 0.9 * seen["x"].mean(dim=(0, 2, 3)))


def test_resnet_option_a_shortcut_and_depth_rule():
    net = build_network("resnet", 10, depth=20)
    down = [b for b in _blocks(net, "_BasicBlock") if b.conv1.stride == (2, 2)]
    assert len(down) == 2 and len(_blocks(net, "_BasicBlock")) == 9  # (20 - 2) / 6 = 3 a stage
    x = torch.randn(2, 16, 32, 32)
    y = down[0].shortcut(x)  # subsampled by 2, 16 channels zero-padded to 32 (8 each side)
    assert y.shape == (2, 32, 16, 16) and not list(down[0].shortcut.parameters())
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2]) and not y[:, :8].any() and not y[:, 24:].any()
    assert "width" not in net.arch and net.embedding_dim == 64  # their resnet has no width
    with pytest.raises(UserError, match="6n\\+2 .* as the authors' resnet.py asserts, got 16"):
        build_network("resnet", 10, depth=16)  # the journal code's ResNet-16 fails their own assert


@pytest.mark.parametrize("size", [32, 224])
def test_mobile_net_stem_has_stride_2_and_truncated_channels(size):
    net = build_network("mobile_net", 5, ca=0.3, image_size=size)
    assert net.conv1.stride == (2, 2) and net.conv1.out_channels == 9  # int(32 * 0.3)
    assert net.embedding_dim == 307  # int(1024 * 0.3)
    emb, logits = net(torch.randn(2, 3, size, size))
    assert emb.shape == (2, 307) and logits.shape == (2, 5)


def test_weights_start_from_pytorchs_default_initialisation():
    # the authors define conv_init but never apply it: nn.Conv2d's own init, |w| <= 1/sqrt(fan_in)
    net = build_network("wide_resnet", 10, depth=16, width=1)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            fan_in = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            assert m.weight.abs().max() <= fan_in ** -0.5 + 1e-6


# ----------------------------------------------------------------------------- interface

@pytest.mark.parametrize("name", list(SMALL))
@pytest.mark.parametrize("in_channels,size", [(3, 32), (1, 8)])
def test_output_shapes(name, in_channels, size):
    net = build_network(name, 7, in_channels=in_channels, image_size=size, **SMALL[name])
    assert isinstance(net, Network)
    emb, logits = net(torch.randn(2, in_channels, size, size))
    assert emb.shape == (2, net.embedding_dim)
    assert logits.shape == (2, 7)
    assert net.n_classes == 7 and net.fc.out_features == 7


@pytest.mark.parametrize("kw,dim", [
    (dict(name="wide_resnet", depth=16, width=1), 64),
    (dict(name="wide_resnet", depth=40, width=2), 128),
    (dict(name="resnet", depth=20), 64),
    (dict(name="resnet", depth=14), 64),
    (dict(name="mobile_net", ca=0.25), 256),
    (dict(name="mobile_net", ca=1.0), 1024),
])
def test_embedding_dim(kw, dim):
    net = build_network(n_classes=10, **kw)
    assert net.embedding_dim == dim == net.fc.in_features


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
    ("resnet", 15), ("resnet", 18), ("resnet", 4), ("resnet", 16),
])
def test_bad_depth_raises_user_error(name, depth):
    with pytest.raises(UserError, match=f"got {depth}"):
        build_network(name, 10, depth=depth)


def test_accepted_resnet_depths():
    def n_blocks(depth):
        return len(_blocks(build_network("resnet", 10, depth=depth), "_BasicBlock"))

    assert [n_blocks(d) for d in (8, 14, 20, 32)] == [3, 6, 9, 15]  # n = (depth - 2) / 6 per stage


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
    classifier_ids = {id(p) for p in net.fc.parameters()}
    assert not classifier_ids & {id(p) for p in feats}
    assert n_params(feats) + n_params(net.fc.parameters()) == n_params(net.parameters())
    assert len(feats) + 2 == len(list(net.parameters())) and net.classifier_parameters() == list(net.fc.parameters())


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
                "resnet": dict(depth=110), "mobile_net": dict(ca=1.0)}[name]
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
    assert first_conv.weight.grad.abs().sum() > 0 and net.fc.weight.grad is None


@pytest.mark.parametrize("name", list(SMALL))
def test_logits_are_classifier_of_embedding_and_eval_is_deterministic(name):
    net = build_network(name, 6, **SMALL[name]).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        emb, logits = net(x)
        emb2, logits2 = net(x)
        torch.testing.assert_close(logits, net.fc(emb))
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
        assert prepared.conv1.weight.is_contiguous(memory_format=torch.channels_last)
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
