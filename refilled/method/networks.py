"""The three network families of the authors' code (njulus/REFILLED, networks/*.py).

Each family computes what the authors' `MyNetwork` computes, in train and eval
mode, and names its modules as theirs do, so an authors' checkpoint loads into
it as is (`from_authors`). Their quirks that change numbers are kept, each
named where it is built:

- wide_resnet: the block is BN-ReLU-conv1 (stride 1)-BN-ReLU-dropout-conv2
  (**stride s**); the 1x1 shortcut reads the **raw** block input; every conv
  has a bias; the last BatchNorm has `momentum=0.9`, so its running statistics
  are about the last training batch's.
- resnet: depth 6n+2 only, 16-32-64 channels whatever `width` says; shortcuts
  that change shape are "option A": subsample by 2 and zero-pad the channels.
- mobile_net: the stem has stride 2 at every image size; channels are
  `int(c * ca)` (truncated).

Weights start from PyTorch's default initialisation, as the authors' do
(their `conv_init` is defined but never applied). Two things are ours: the
stem may take another number of input channels (`in_channels`, 1 for 8x8
digits; the authors' is 3), and dropout draws its mask as `rand >= p` (the
same distribution and scaling as nn.Dropout, a cheaper draw on CPU; another
random stream).

Every model is a `Network`: one forward pass returns `(embedding, logits)` --
the pooled penultimate feature REFILLED works on, and the classifier `fc` on
it -- so stage 1 (embedding only) and stage 2 (the teacher's embedding, the
student's logits) never run a network twice. The authors' `forward(x,
flag_both=True)` returns `(logits, embedding)`: the same two, in the other order.
"""

from __future__ import annotations

import numbers
import operator
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from refilled.errors import UserError

NAMES = ("wide_resnet", "resnet", "mobile_net")
# The arguments each family uses (the authors' names); `arch` records only these.
FAMILY_ARGS = {"wide_resnet": ("depth", "width", "dropout_rate"), "resnet": ("depth",), "mobile_net": ("ca",)}


class Network(nn.Module):
    """What every family shares: `embed`, `forward -> (embedding, logits)`, the classifier `fc`."""

    fc: nn.Linear

    def __init__(self, arch: dict):
        super().__init__()
        self.arch = dict(arch)
        self.n_classes = arch["n_classes"]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled penultimate feature, shape (B, embedding_dim), unnormalised."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.embed(x)
        return embedding, self.fc(embedding)

    @property
    def embedding_dim(self) -> int:
        return self.fc.in_features

    def feature_parameters(self) -> list[nn.Parameter]:
        """Everything but the classifier (the authors' `get_network_params`)."""
        return [p for n, p in self.named_parameters() if not n.startswith("fc.")]

    def classifier_parameters(self) -> list[nn.Parameter]:
        """The classifier `fc` (the authors' `get_classifier_params`)."""
        return list(self.fc.parameters())


class _Dropout(nn.Dropout):
    """nn.Dropout with its mask drawn as rand >= p: the same distribution and
    scaling, a cheaper draw than bernoulli_ on CPU (29% of a banked epoch there,
    benchmarks/README.md). The random stream differs from nn.Dropout's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = torch.rand_like(x, dtype=torch.float32) >= self.p  # fp32 draw, also under bf16 autocast
        return x * keep * (1.0 / (1.0 - self.p))


# ---------------------------------------------------------------- wide_resnet
class _WideBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, dropout_rate: float, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=1, padding=1, bias=True)
        self.dropout = _Dropout(dropout_rate)
        self.bn2 = nn.BatchNorm2d(c_out)
        # authors' quirk: the stride is on the block's *second* conv
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=stride, padding=1, bias=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:  # authors' quirk: a 1x1 conv (with bias) of the raw input
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.relu(self.bn1(x)))
        y = self.conv2(self.dropout(F.relu(self.bn2(y))))
        return y + self.shortcut(x)


class WideResNet(Network):
    def __init__(self, arch: dict):
        super().__init__(arch)
        depth, width = arch["depth"], arch["width"]
        n = (depth - 4) // 6
        channels = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(arch["in_channels"], 16, 3, padding=1, bias=True)
        self.layer1 = self._layer(channels[0], channels[1], n, arch["dropout_rate"], 1)
        self.layer2 = self._layer(channels[1], channels[2], n, arch["dropout_rate"], 2)
        self.layer3 = self._layer(channels[2], channels[3], n, arch["dropout_rate"], 2)
        # authors' quirk: momentum 0.9 (PyTorch's default is 0.1): eval statistics ~ the last batch's
        self.bn = nn.BatchNorm2d(channels[3], momentum=0.9)
        self.fc = nn.Linear(channels[3], arch["n_classes"])

    @staticmethod
    def _layer(c_in: int, c_out: int, n: int, dropout_rate: float, stride: int) -> nn.Sequential:
        return nn.Sequential(*(_WideBlock(c_in if i == 0 else c_out, c_out, dropout_rate, stride if i == 0 else 1)
                               for i in range(n)))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return F.relu(self.bn(y)).mean(dim=(2, 3))


# --------------------------------------------------------------------- resnet
class _PadShortcut(nn.Module):
    """Option A: every other pixel, the channels zero-padded by c_out // 4 on each side
    (the authors' LambdaLayer; it assumes c_out == 2 * c_in, true in every block that uses it)."""

    def __init__(self, c_out: int):
        super().__init__()
        self.pad = c_out // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = _PadShortcut(c_out) if stride != 1 or c_in != c_out else nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + self.shortcut(x))


class ResNet(Network):
    def __init__(self, arch: dict):
        super().__init__(arch)
        n = (arch["depth"] - 2) // 6
        self.conv1 = nn.Conv2d(arch["in_channels"], 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(*(_BasicBlock(16, 16, 1) for _ in range(n)))
        self.layer2 = nn.Sequential(*(_BasicBlock(16 if i == 0 else 32, 32, 2 if i == 0 else 1) for i in range(n)))
        self.layer3 = nn.Sequential(*(_BasicBlock(32 if i == 0 else 64, 64, 2 if i == 0 else 1) for i in range(n)))
        self.fc = nn.Linear(64, arch["n_classes"])

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        # the authors pool with avg_pool2d(y, width): the global mean for the square images they take
        return self.layer3(self.layer2(self.layer1(y))).mean(dim=(2, 3))


# ----------------------------------------------------------------- mobile_net
# MobileNet v1's 13 depthwise-separable blocks: output channels, stride.
_MOBILE_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
                  (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)]


class _DepthwiseSeparable(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv2 = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class MobileNet(Network):
    def __init__(self, arch: dict):
        super().__init__(arch)
        ca = arch["ca"]
        c_in = int(32 * ca)  # authors' quirk: channels truncated, int(c * ca)
        # authors' quirk: the stem has stride 2 at every image size (CIFAR's 32 px too)
        self.conv1 = nn.Conv2d(arch["in_channels"], c_in, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        blocks = []
        for c, stride in _MOBILE_BLOCKS:
            blocks.append(_DepthwiseSeparable(c_in, int(c * ca), stride))
            c_in = int(c * ca)
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, arch["n_classes"])

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(F.relu(self.bn1(self.conv1(x)))).mean(dim=(2, 3))


FAMILIES = {"wide_resnet": WideResNet, "resnet": ResNet, "mobile_net": MobileNet}


# -------------------------------------------------------------------- public
def _check_family(name: str, arch: dict) -> None:
    depth = arch.get("depth")
    if name == "wide_resnet" and (depth < 10 or (depth - 4) % 6):
        raise UserError(f"wide_resnet depth must be 6n+4 (10, 16, 22, 28, 40, ...), got {depth}")
    if name == "resnet" and (depth < 8 or (depth - 2) % 6):
        raise UserError(f"resnet depth must be 6n+2 (8, 14, 20, 32, 56, 110, ...), as the authors' resnet.py "
                        f"asserts, got {depth}")
    if name == "mobile_net" and int(32 * arch["ca"]) < 1:
        raise UserError(f"mobile_net channel multiplier ca must be >= 1/32 (int(32 * ca) stem channels), "
                        f"got {arch['ca']}")


def build_network(name: str, n_classes: int, *, depth: int = 16, width: int = 1, ca: float = 0.25,
                  dropout_rate: float = 0.3, in_channels: int = 3, image_size: int = 32) -> Network:
    """One of `NAMES`, with the authors' argument names and defaults. `arch`
    records the arguments the family uses (FAMILY_ARGS), so `build_network(**net.arch)`
    rebuilds it; `image_size` is the side of the images it is meant for (recorded only)."""
    if name not in NAMES:
        raise UserError(f"unknown network {name!r}; valid names: {', '.join(NAMES)}")

    def integer(label: str, value, minimum: int) -> int:
        try:
            value = operator.index(value)  # ints (numpy ints too), not floats or strings
        except TypeError:
            raise UserError(f"{label} must be an integer, got {value!r}") from None
        if value < minimum:
            raise UserError(f"{label} must be >= {minimum}, got {value}")
        return value

    def real(label: str, value) -> float:
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise UserError(f"{label} must be a number, got {value!r}")
        return float(value)

    given = {"depth": lambda: integer("depth", depth, 1), "width": lambda: integer("width", width, 1),
             "ca": lambda: real("ca", ca), "dropout_rate": lambda: real("dropout_rate", dropout_rate)}
    arch = {"name": name, "n_classes": integer("n_classes", n_classes, 1),
            **{k: given[k]() for k in FAMILY_ARGS[name]},
            "in_channels": integer("in_channels", in_channels, 1), "image_size": integer("image_size", image_size, 1)}
    if not 0.0 <= arch.get("dropout_rate", 0.0) < 1.0:
        raise UserError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
    if arch.get("ca", 1.0) <= 0:
        raise UserError(f"mobile_net channel multiplier ca must be > 0, got {ca}")
    _check_family(name, arch)
    return FAMILIES[name](arch)


def describe(arch: dict) -> str:
    """'wide_resnet depth 16 width 1 dropout_rate 0.3, 100 classes': for messages."""
    if arch["name"] not in FAMILY_ARGS:  # torchvision:NAME
        return f"{arch['name']}, {arch['n_classes']} classes"
    args = " ".join(f"{k} {arch[k]:g}" if isinstance(arch[k], float) else f"{k} {arch[k]}"
                    for k in FAMILY_ARGS[arch["name"]])
    return f"{arch['name']} {args}, {arch['n_classes']} classes"


def authors_state_dict(obj, path: str | Path) -> dict[str, torch.Tensor]:
    """The module state of an authors' checkpoint ({"state_dict", "validating_accuracy",
    "epoch"}), with the "module." prefix torch.nn.DataParallel adds (their multi-GPU runs) removed."""
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        raise UserError(f"{path} is not an authors' checkpoint (a dict with 'state_dict', "
                        "'validating_accuracy' and 'epoch', as their pretrain.py saves)")
    state = obj["state_dict"]
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_weights(net: Network, state: dict[str, torch.Tensor], path: str | Path) -> Network:
    """Load `state` into `net`, or say in one line how the file's network differs."""
    mine = net.state_dict()
    missing = [k for k in mine if k not in state]
    extra = [k for k in state if k not in mine]
    shapes = [k for k in mine if k in state and tuple(state[k].shape) != tuple(mine[k].shape)]
    if missing or extra or shapes:
        if shapes:
            k = shapes[0]
            detail = f"{k} is {tuple(state[k].shape)} in the file, {tuple(mine[k].shape)} here"
        else:
            detail = (f"the file lacks {missing[0]}" if missing else f"the file has {extra[0]}, which it does not")
        classes = state.get("fc.weight")
        counted = f" (the file's classifier has {classes.shape[0]} classes)" if classes is not None else ""
        raise UserError(f"{path} does not hold a {describe(net.arch)}: {detail}{counted}; "
                        "give the checkpoint's architecture and class count")
    net.load_state_dict(state)
    return net


def from_authors(path: str | Path, name: str, n_classes: int, *, image_size: int = 32, depth: int = 16,
                 width: int = 1, ca: float = 0.25, dropout_rate: float = 0.3, in_channels: int = 3) -> Network:
    """A network from an authors' checkpoint file, on the CPU, in eval mode.

    The file holds `{"state_dict", "validating_accuracy", "epoch"}` as their
    `pretrain.py` saves it (from CUDA, possibly through DataParallel); it is read
    with `weights_only=True`. The architecture is not in the file: give it with
    their argument names (defaults are theirs). `embedding, logits = net(x)`
    equals their `logits, embedding = net(x, flag_both=True)`.
    """
    from refilled.files import checkpoint

    obj = checkpoint.load(path, "authors' checkpoint")
    net = build_network(name, n_classes, depth=depth, width=width, ca=ca, dropout_rate=dropout_rate,
                        in_channels=in_channels, image_size=image_size)
    return load_weights(net, authors_state_dict(obj, path), path).eval()


def teacher_arch(name: str) -> dict:
    """The authors' teacher architecture for a family, as `build_network` keywords (with name)."""
    defaults = {
        "wide_resnet": {"depth": 40, "width": 2, "dropout_rate": 0.3},  # WRN-40-2
        "resnet": {"depth": 110},                                        # ResNet-110
        "mobile_net": {"ca": 1.0},                                       # MobileNet 1.0
    }
    if name not in defaults:
        raise UserError(f"unknown network {name!r}; valid names: {', '.join(NAMES)}")
    return {"name": name, **defaults[name]}
