"""Any classification model torchvision builds (`torchvision:NAME`), as a Network: the
teacher a user fine-tuned elsewhere, or a student.

The embedding is the input of the model's last linear layer (`fc` here: the rest is
`body`), so REFILLED's relations and class centres live where the authors' networks keep
them. The model sees the images as its weights expect, whatever size the student trains
at: `InputAdapter` takes the batch as the data pipeline normalised it, resizes it to the
model's input size and normalises it with the model's own mean and std (torchvision's
weights give both; a state-dict file takes them from the config).
"""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from refilled.errors import UserError
from refilled.method.networks import Network

PREFIX = "torchvision:"
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's convention for a weights file that says nothing
IMAGENET_STD = (0.229, 0.224, 0.225)


def is_torchvision(name: str) -> bool:
    return str(name).startswith(PREFIX)


def model_name(name: str) -> str:
    """`torchvision:resnet18` -> `resnet18`, refused in one line (with the closest names) when
    torchvision builds no classification model of that name."""
    import torchvision
    from torchvision.models import list_models

    bare = str(name).removeprefix(PREFIX)
    known = list_models(module=torchvision.models)
    if bare not in known:
        close = difflib.get_close_matches(bare, known, n=3)
        hint = f"did you mean {', '.join(PREFIX + c for c in close)}?" if close else \
            "see torchvision.models.list_models() for the names"
        raise UserError(f"torchvision has no classification model {bare!r}: {hint}")
    return bare


def _last_linear(model: nn.Module, shown: str) -> str:
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"{shown} has no linear last layer (its classifier is not an nn.Linear), so it has no "
                        "embedding REFILLED can use: choose another model")
    return linears[-1]


def classes_in(name: str, state: dict[str, torch.Tensor], shown: str = "the weights") -> int:
    """How many classes a torchvision model's state dict was trained for (its last linear
    layer's rows); weights whose keys or shapes do not fit the architecture are refused in one
    line that names the keys."""
    from torchvision.models import get_model

    bare = model_name(name)
    key = f"{_last_linear(get_model(bare, weights=None), PREFIX + bare)}.weight"
    n = int(state[key].shape[0]) if key in state and state[key].ndim == 2 else None
    mine = get_model(bare, weights=None, num_classes=n or 1000).state_dict()
    missing, extra = [k for k in mine if k not in state], [k for k in state if k not in mine]
    shapes = [k for k in mine if k in state and tuple(state[k].shape) != tuple(mine[k].shape)]
    if n is None or missing or extra or shapes:
        said = [f"{len(missing)} keys missing ({', '.join(missing[:3])})" if missing else "",
                f"{len(extra)} it does not have ({', '.join(extra[:3])})" if extra else "",
                f"{len(shapes)} of other shapes ({', '.join(shapes[:3])})" if shapes else ""]
        raise UserError(f"{shown} do not fit {PREFIX}{bare}: " + "; ".join(s for s in said if s) +
                        ": give weights of that architecture, or name the one they are of")
    return n


class InputAdapter(nn.Module):
    """From the batch as the data pipeline normalised it (data_mean, data_std, its side) to
    what the model expects: three channels, `size` x `size`, normalised with `mean`, `std`."""

    def __init__(self, data_mean, data_std, size: int, mean, std):
        super().__init__()
        self.size = size
        shape = (1, -1, 1, 1)
        self.register_buffer("data_mean", torch.tensor(data_mean, dtype=torch.float32).view(shape), persistent=False)
        self.register_buffer("data_std", torch.tensor(data_std, dtype=torch.float32).view(shape), persistent=False)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(shape), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.data_std.to(x.dtype) + self.data_mean.to(x.dtype)  # back to [0, 1] pixels
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class TorchvisionNetwork(Network):
    """A torchvision model split at its last linear layer: `body` (the embedding), `fc`."""

    def __init__(self, arch: dict):
        from torchvision.models import get_model

        super().__init__(arch)
        model = get_model(model_name(arch["name"]), weights=None, num_classes=arch["n_classes"])
        self.head_name = _last_linear(model, arch["name"])
        self.fc = model.get_submodule(self.head_name)
        model.set_submodule(self.head_name, nn.Identity())
        self.body = model
        self.adapt = InputAdapter(arch["data_mean"], arch["data_std"], arch["input_size"], arch["input_mean"],
                                  arch["input_std"])

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        alone = self.training and x.shape[0] == 1  # an epoch's last batch of one image: batch norm cannot
        if alone:                                   # normalise it (one value a channel), the running statistics do
            self.body.eval()
        try:
            out = self.body(self.adapt(x))
        finally:
            if alone:
                self.body.train()
        if not torch.is_tensor(out):  # googlenet / inception_v3 return named tuples in training mode
            out = out[0]
        return out.flatten(1)

    def torchvision_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A torchvision state dict of this model, keyed as this Network keys it."""
        head = self.head_name + "."
        return {(f"fc.{k[len(head):]}" if k.startswith(head) else f"body.{k}"): v for k, v in state.items()}

    def torchvision_state_dict(self) -> dict[str, torch.Tensor]:
        """This network's weights keyed as torchvision's model keys them: what
        `torch.save(model.state_dict(), FILE)` of the same torchvision model would hold."""
        out = {}
        for k, v in self.state_dict().items():
            if k.startswith("fc."):
                out[f"{self.head_name}.{k[3:]}"] = v
            elif k.startswith("body."):
                out[k[5:]] = v
        return out


def load_all_but_the_head(net: TorchvisionNetwork, state: dict[str, torch.Tensor], shown: str | None) -> None:
    """Start `net` from torchvision weights (`state`; none: nothing), its classifier too where
    it has as many classes (fine-tuning from ImageNet weights keeps the new head as built)."""
    from refilled.method.networks import load_weights

    if not state:
        return
    mine = net.torchvision_state(state)
    if tuple(mine.get("fc.weight", torch.empty(0)).shape) != tuple(net.fc.weight.shape):
        mine = {**mine, "fc.weight": net.fc.weight.detach().clone(), "fc.bias": net.fc.bias.detach().clone()}
    load_weights(net, mine, shown or "weights")


def torchvision_arch(name: str, n_classes: int, *, data: tuple, image_size: int, input_size: int | None = None,
                     input_norm: tuple | None = None) -> dict:
    """The `arch` of a torchvision Network: `data` the (mean, std) the pipeline normalises
    with; the model's input side (default: the images' own) and its (mean, std) (default:
    the data's own, as for a model trained from scratch on them)."""
    mean, std = input_norm or data
    return {"name": PREFIX + model_name(name), "n_classes": int(n_classes), "in_channels": len(data[0]),
            "image_size": int(image_size), "input_size": int(input_size or image_size),
            "input_mean": [float(m) for m in mean], "input_std": [float(s) for s in std],
            "data_mean": [float(m) for m in data[0]], "data_std": [float(s) for s in data[1]]}


def read_weights(spec: str, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights `spec` names for torchvision model `name`, and what they say of the input:
    a file (a state dict saved with torch.save, read with weights_only=True; {} said), or a
    torchvision weights name such as ResNet50_Weights.IMAGENET1K_V2 (fetched by torchvision,
    where the machine has internet; input size, mean and std from its transforms)."""
    from refilled.files import checkpoint

    path = Path(spec).expanduser()
    if path.is_file():
        state = checkpoint.load(path, "weights file", remedy="save the model's state_dict with torch.save")
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise UserError(f"weights file {path} holds no state dict (a mapping of names to tensors): save it with "
                            "torch.save(model.state_dict(), FILE)")
        if state and all(k.startswith("module.") for k in state):
            state = {k[len("module."):]: v for k, v in state.items()}
        return state, {}
    if "_Weights." not in str(spec):
        raise UserError(f"weights {spec!r} are neither a file nor a torchvision weights name (e.g. "
                        "ResNet50_Weights.IMAGENET1K_V2): give an existing state-dict file or such a name")
    from torchvision.models import get_weight

    try:
        weights = get_weight(str(spec))
    except (ValueError, KeyError, AttributeError):
        raise UserError(f"torchvision knows no weights {spec!r}: see torchvision.models.get_model_weights"
                        f"('{model_name(name)}')") from None
    try:
        state = weights.get_state_dict(progress=False)
    except Exception as e:  # no internet here: torchvision's download fails in many ways
        raise UserError(f"torchvision could not fetch {spec} ({type(e).__name__}): on a machine with internet save "
                        "it with torch.save(model.state_dict(), FILE), and give FILE") from None
    t = weights.transforms()
    return state, {"input_size": int(t.crop_size[0]), "input_norm": (tuple(t.mean), tuple(t.std))}
