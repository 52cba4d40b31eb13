"""The three network families of the authors' code, in plain PyTorch.

Every model is a `Network`: a feature extractor (`features`, ending in a
feature map) followed by global average pooling, which gives the *embedding*
REFILLED works on, and a linear `classifier` on that embedding. One forward
pass returns both, so stage 1 (embedding only) and stage 2 (embedding of the
teacher, logits of the student) never run a network twice.

`build_network` is the only way in; `Network.arch` records its arguments so a
checkpoint can rebuild (and check) the exact architecture with
`build_network(**net.arch)`.
"""

from __future__ import annotations

import math
import numbers
import operator

import torch
import torch.nn as nn

from refilled.errors import UserError

NAMES = ("wide_resnet", "resnet", "mobile_net")


class Network(nn.Module):
    """Feature extractor + global average pool + linear classifier."""

    def __init__(self, features: nn.Module, embedding_dim: int, arch: dict):
        super().__init__()
        self.features = features
        self.classifier = nn.Linear(embedding_dim, arch["n_classes"])
        self.embedding_dim = embedding_dim
        self.n_classes = arch["n_classes"]
        self.arch = dict(arch)
        _init_weights(self)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate feature, shape (B, embedding_dim), unnormalised."""
        return self.features(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.embed(x)
        return embedding, self.classifier(embedding)

    def feature_parameters(self) -> list[nn.Parameter]:
        """Everything but the classifier (stage 1 trains only these)."""
        return [p for n, p in self.named_parameters() if not n.startswith("classifier.")]


def _init_weights(net: nn.Module) -> None:
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def _conv3x3(c_in: int, c_out: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, groups=groups, bias=False)


def _bn_relu(c: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]


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
    """Pre-activation basic block: BN-ReLU-conv, BN-ReLU-dropout-conv."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout_rate: float):
        super().__init__()
        self.pre = nn.Sequential(*_bn_relu(c_in))
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.body = nn.Sequential(*_bn_relu(c_out), _Dropout(dropout_rate), _conv3x3(c_out, c_out))
        # When the shape changes the shortcut is a 1x1 conv on the *activated*
        # input, as in the WRN paper's code; otherwise the raw input.
        self.shortcut = (
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
            if stride != 1 or c_in != c_out else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.pre(x)
        out = self.body(self.conv1(a))
        return out + (x if self.shortcut is None else self.shortcut(a))


def _wide_resnet(depth: int, width: int, dropout_rate: float, in_channels: int):
    if depth < 10 or (depth - 4) % 6:
        raise UserError(f"wide_resnet depth must be 6n+4 (e.g. 16, 28, 40), got {depth}")
    n = (depth - 4) // 6
    chans = [16, 16 * width, 32 * width, 64 * width]
    layers: list[nn.Module] = [_conv3x3(in_channels, chans[0])]
    for g in range(3):
        for i in range(n):
            c_in = chans[g] if i == 0 else chans[g + 1]
            stride = 2 if (g > 0 and i == 0) else 1
            layers.append(_WideBlock(c_in, chans[g + 1], stride, dropout_rate))
    layers += _bn_relu(chans[3])  # blocks are pre-activation: finish with BN-ReLU
    return nn.Sequential(*layers), chans[3]


# --------------------------------------------------------------------- resnet
class _BasicBlock(nn.Module):
    """He et al. basic block: conv-BN-ReLU-conv-BN, add shortcut, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            _conv3x3(c_in, c_out, stride), *_bn_relu(c_out),
            _conv3x3(c_out, c_out), nn.BatchNorm2d(c_out),
        )
        self.shortcut = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def _resnet(depth: int, width: int, in_channels: int):
    # 6n+2 is He et al.'s CIFAR family; 6n+4 admits the authors' "depth 16".
    if depth < 8 or ((depth - 2) % 6 and (depth - 4) % 6):
        raise UserError(f"resnet depth must be 6n+2 or 6n+4 (e.g. 16, 20, 32, 56, 110), got {depth}")
    n = (depth - 2) // 6
    chans = [16 * width, 32 * width, 64 * width]
    layers: list[nn.Module] = [_conv3x3(in_channels, chans[0]), *_bn_relu(chans[0])]
    c_in = chans[0]
    for g, c in enumerate(chans):
        for i in range(n):
            layers.append(_BasicBlock(c_in, c, 2 if (g > 0 and i == 0) else 1))
            c_in = c
    return nn.Sequential(*layers), chans[2]


# ----------------------------------------------------------------- mobile_net
# (output channels, stride) of the 13 depthwise-separable blocks of MobileNet v1.
_MOBILE_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
                  (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)]


def _mobile_net(ca: float, in_channels: int, image_size: int):
    if not (ca > 0 and math.isfinite(ca)):
        raise UserError(f"mobile_net channel multiplier ca must be > 0, got {ca}")

    def ch(c: int) -> int:
        return max(8, int(round(c * ca)))

    # ImageNet-size input gets the paper's stride-2 stem; small images (CIFAR,
    # digits) keep full resolution there and only downsample in the blocks.
    c_in = ch(32)
    layers: list[nn.Module] = [_conv3x3(in_channels, c_in, 2 if image_size >= 128 else 1), *_bn_relu(c_in)]
    for c, stride in _MOBILE_BLOCKS:
        c_out = ch(c)
        layers += [_conv3x3(c_in, c_in, stride, groups=c_in), *_bn_relu(c_in),  # depthwise
                   nn.Conv2d(c_in, c_out, 1, bias=False), *_bn_relu(c_out)]    # pointwise
        c_in = c_out
    return nn.Sequential(*layers), c_in


# -------------------------------------------------------------------- public
def build_network(name: str, n_classes: int, *, depth: int = 16, width: int = 1, ca: float = 1.0,
                  dropout_rate: float = 0.0, in_channels: int = 3, image_size: int = 32) -> Network:
    """Build one of `NAMES`; arguments a family does not use are recorded but ignored."""
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

    arch = dict(name=name, n_classes=integer("n_classes", n_classes, 1), depth=integer("depth", depth, 1),
                width=integer("width", width, 1), ca=real("ca", ca), dropout_rate=real("dropout_rate", dropout_rate),
                in_channels=integer("in_channels", in_channels, 1), image_size=integer("image_size", image_size, 1))
    if not 0.0 <= arch["dropout_rate"] < 1.0:
        raise UserError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
    if name == "wide_resnet":
        features, dim = _wide_resnet(arch["depth"], arch["width"], arch["dropout_rate"], arch["in_channels"])
    elif name == "resnet":
        features, dim = _resnet(arch["depth"], arch["width"], arch["in_channels"])
    else:
        features, dim = _mobile_net(arch["ca"], arch["in_channels"], arch["image_size"])
    return Network(features, dim, arch)


def teacher_arch(name: str) -> dict:
    """The authors' teacher architecture for a family, as `build_network` keywords (with name)."""
    defaults = {
        "wide_resnet": {"depth": 40, "width": 2, "dropout_rate": 0.3},  # WRN-40-2
        "resnet": {"depth": 110, "width": 1},                            # ResNet-110
        "mobile_net": {"ca": 1.0},                                       # MobileNet 1.0
    }
    if name not in defaults:
        raise UserError(f"unknown network {name!r}; valid names: {', '.join(NAMES)}")
    return {"name": name, **defaults[name]}
