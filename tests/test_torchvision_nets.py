"""torchvision models as Networks (refilled.method.torchvision_nets): the embedding is the input
of the last linear layer, the input adapted to the model, weights read from a state-dict file."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import get_model

from refilled.errors import UserError
from refilled.method.networks import load_weights
from refilled.method.torchvision_nets import TorchvisionNetwork, classes_in, model_name, read_weights, torchvision_arch

DATA = ((0.5, 0.4, 0.3), (0.25, 0.2, 0.2))


def test_the_embedding_is_the_input_of_the_last_linear_layer_and_the_logits_are_the_models():
    torch.manual_seed(0)
    model = get_model("resnet18", weights=None, num_classes=7).eval()
    net = TorchvisionNetwork(torchvision_arch("torchvision:resnet18", 7, data=DATA, image_size=32,
                                              input_norm=DATA)).eval()
    load_weights(net, net.torchvision_state(model.state_dict()), "resnet18.pt")
    x = torch.randn(2, 3, 32, 32)
    embedding, logits = net(x)
    assert embedding.shape == (2, 512) and net.embedding_dim == 512
    assert torch.allclose(logits, model(x), atol=1e-5)  # same normalisation, same size: the model itself
    assert [n for n, _ in net.named_parameters() if n.startswith("fc.")] == ["fc.weight", "fc.bias"]


def test_the_model_sees_its_own_size_and_normalisation_whatever_the_student_trains_at():
    torch.manual_seed(0)
    model = get_model("mobilenet_v3_small", weights=None, num_classes=3).eval()
    arch = torchvision_arch("torchvision:mobilenet_v3_small", 3, data=DATA, image_size=16, input_size=64,
                            input_norm=((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    net = TorchvisionNetwork(arch).eval()
    load_weights(net, net.torchvision_state(model.state_dict()), "m.pt")
    pixels = torch.rand(2, 3, 16, 16)
    as_pipeline = (pixels - torch.tensor(DATA[0]).view(1, 3, 1, 1)) / torch.tensor(DATA[1]).view(1, 3, 1, 1)
    expected = torch.nn.functional.interpolate(pixels, size=(64, 64), mode="bilinear", align_corners=False)
    expected = (expected - torch.tensor(arch["input_mean"]).view(1, 3, 1, 1)) / torch.tensor(arch["input_std"]).view(
        1, 3, 1, 1)
    assert torch.allclose(net(as_pipeline)[1], model(expected), atol=1e-4)
    # the embedding is the input of classifier.3, the last linear layer (1024 features)
    assert net.head_name == "classifier.3" and net.embed(as_pipeline).shape == (2, 1024)


def test_grey_images_are_given_three_channels():
    net = TorchvisionNetwork(torchvision_arch("torchvision:resnet18", 2, data=((0.3,), (0.4,)), image_size=8,
                                              input_size=32, input_norm=(DATA[0], DATA[1]))).eval()
    assert net(torch.randn(2, 1, 8, 8))[1].shape == (2, 2)


def test_weights_files_are_read_and_their_class_count_found(tmp_path):
    model = get_model("resnet18", weights=None, num_classes=5)
    torch.save(model.state_dict(), tmp_path / "r18.pt")
    state, said = read_weights(str(tmp_path / "r18.pt"), "torchvision:resnet18")
    assert said == {} and classes_in("torchvision:resnet18", state) == 5
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp_path / "dp.pt")  # DataParallel's
    assert classes_in("torchvision:resnet18", read_weights(str(tmp_path / "dp.pt"), "torchvision:resnet18")[0]) == 5


def test_weights_that_do_not_fit_the_architecture_say_which_keys(tmp_path):
    state = get_model("resnet34", weights=None, num_classes=5).state_dict()
    net = TorchvisionNetwork(torchvision_arch("torchvision:resnet18", 5, data=DATA, image_size=32))
    with pytest.raises(UserError, match=r"does not hold a torchvision:resnet18, 5 classes: the file has body\.layer1\.2"):
        load_weights(net, net.torchvision_state(state), "r34.pt")


@pytest.mark.parametrize("name, message", [
    ("torchvision:resnet181", "no classification model 'resnet181': did you mean torchvision:resnet18"),
    ("torchvision:squeezenet1_0", "no linear last layer"),
])
def test_a_name_torchvision_does_not_build_or_a_model_without_a_linear_head_is_refused(name, message):
    with pytest.raises(UserError, match=message):
        TorchvisionNetwork(torchvision_arch(name, 3, data=DATA, image_size=32))
    assert model_name("torchvision:resnet18") == "resnet18"


@pytest.mark.parametrize("spec, message", [
    ("nothing-here.pt", "neither a file nor a torchvision weights name"),
    ("ResNet18_Weights.NOPE", "knows no weights"),
])
def test_weights_that_name_nothing_are_refused(spec, message):
    with pytest.raises(UserError, match=message):
        read_weights(spec, "torchvision:resnet18")
