"""The world's binary attributes and the two attribute classifiers.

Both classifiers map images (n, 3, 64, 64) in [0, 1] to logits for the four
binary attributes of :func:`factory.world.scenes.attributes` and to logits over
the counts 1-12 (a count head, so latents can be labelled by count too).

- :class:`LabellerNet` labels the latents of generated images; editors learn
  their directions from its labels.
- :class:`CheckerNet` only checks edits. It shares neither architecture,
  seed nor training scenes with the labeller: an edit that fools the labeller
  (an adversarial nudge in its feature space) should not fool the checker too,
  which is the whole point of an independent check (DESIGN §1).

Saved like :class:`factory.models.counter.DensityCounter`: a folder with
``config.json`` and ``model.safetensors``, loaded by ``from_pretrained``.
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from factory.errors import FactoryError

ATTRIBUTES = ("warm_objects", "dark_background", "large_objects", "many_objects")
COUNTS = tuple(range(1, 13))
from factory.models.folder import CONFIG, WEIGHTS, image_batch, save_model_folder

KIND = "attribute-classifier"
IMAGE_SIZE = 64


class AttributeClassifier(nn.Module):
    """Base of both architectures: config, save/load, and ``predict``.

    Subclasses build ``self.body`` (image -> penultimate features) and
    ``self.head`` (features -> len(ATTRIBUTES) + len(COUNTS) logits).
    """

    arch: str = ""

    def __init__(self, **config):
        super().__init__()
        self.config = {"kind": KIND, "arch": self.arch, "attributes": list(ATTRIBUTES), "counts": list(COUNTS),
                       "image_size": IMAGE_SIZE, **config}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (n, d): what the edit checker compares for identity."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (n, 3, H, W) in [0, 1] -> (attribute logits (n, 4), count logits (n, 12))."""
        out = self.head(self.features(images))
        return out[:, : len(ATTRIBUTES)], out[:, len(ATTRIBUTES):]

    @torch.no_grad()
    def predict(self, images: torch.Tensor | np.ndarray, with_features: bool = False) -> dict:
        """Probabilities of each attribute and of each count, and the most likely count
        (and the penultimate features with ``with_features``).

        Accepts a float tensor (n, 3, H, W) in [0, 1] or uint8 arrays (n, H, W, 3)
        as the factory's samples hold them; images of another side are resized.
        """
        x = self.to_tensor(images)
        was_training = self.training
        self.eval()
        feats = self.features(x)
        out = self.head(feats)
        self.train(was_training)
        attr, count = out[:, : len(ATTRIBUTES)], out[:, len(ATTRIBUTES):]
        count_probs = count.softmax(-1).cpu().numpy()
        result = {"probs": attr.sigmoid().cpu().numpy(), "count_probs": count_probs,
                  "count": np.asarray(COUNTS)[count_probs.argmax(-1)]}
        if with_features:
            result["features"] = feats.cpu().numpy()
        return result

    def to_tensor(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        # The classifiers learnt the world's 64 px scale; a bigger image is resized, not refused
        # (it would show bigger digits).
        return image_batch(images, self, self.config["image_size"])

    def save_pretrained(self, folder: str | Path) -> None:
        save_model_folder(folder, self.config, self.state_dict())

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str = "cpu") -> "AttributeClassifier":
        """Load either architecture (the folder's config says which); a subclass loads only its own."""
        from safetensors.torch import load_file

        cfg = read_config(folder)
        arch = cfg.get("arch")
        if arch not in ARCHS:
            raise FactoryError(f"{folder} holds an attribute classifier of unknown arch {arch!r}; "
                               f"known: {', '.join(ARCHS)}")
        model_cls = ARCHS[arch]
        if cls is not AttributeClassifier and model_cls is not cls:
            raise FactoryError(f"{folder} holds a {arch} classifier, not a {cls.arch}: load it with "
                               f"AttributeClassifier.from_pretrained or pass a {cls.arch} folder")
        if list(cfg.get("attributes", [])) != list(ATTRIBUTES) or list(cfg.get("counts", [])) != list(COUNTS):
            raise FactoryError(f"{folder} classifies attributes {cfg.get('attributes')} and counts {cfg.get('counts')}, "
                               f"but this version knows {list(ATTRIBUTES)} and 1-12: retrain it with "
                               f"`factory train attributes`")
        params = {k: v for k, v in cfg.items() if k not in ("kind", "arch", "attributes", "counts", "image_size")}
        model = model_cls(**params)
        model.load_state_dict(load_file(str(Path(folder) / WEIGHTS)))
        return model.to(device).eval()


def read_config(folder: str | Path) -> dict:
    """The config of an attribute-classifier folder; a folder of another kind is refused by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FactoryError(f"attribute classifier {folder} is not a folder: train one with "
                           f"`factory train attributes --arch labeller|checker` or pass models/attr-labeller")
    cfg_path = folder / CONFIG
    if not cfg_path.is_file():
        raise FactoryError(f"{folder} is not an attribute-classifier folder: {CONFIG} is missing "
                           f"(train one with `factory train attributes`)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("kind") != KIND:
        other = cfg.get("kind") or cfg.get("_class_name") or "unknown"
        raise FactoryError(f"{folder} holds a {other} model, not an {KIND}: pass a folder written by "
                           f"`factory train attributes` (e.g. models/attr-labeller or models/attr-checker)")
    return cfg


def check_attribute_name(name: str, classifier_folder: str | Path | None = None) -> str:
    """``name`` if the classifier knows it; otherwise a FactoryError listing the known ones.

    Editors call this before learning a direction: a direction for an attribute
    the classifier cannot label would be learnt from noise.
    """
    known = list(read_config(classifier_folder)["attributes"]) if classifier_folder else list(ATTRIBUTES)
    if name in known:
        return name
    # Close spellings first, then a known name holding the given one ("warm" -> "warm_objects").
    close = difflib.get_close_matches(str(name), known, n=1) or [k for k in known if str(name) in k]
    hint = f" Did you mean {close[0]!r}?" if close else ""
    where = f"the classifier {classifier_folder}" if classifier_folder else "the attribute classifiers"
    raise FactoryError(f"unknown attribute {name!r}: {where} knows {', '.join(known)}.{hint}")


class LabellerNet(AttributeClassifier):
    """A small VGG-style CNN: conv stages with max-pooling, then global average pooling.

    Average pooling is a scaled sum over the image, which is what a count is.
    """

    arch = "labeller"

    def __init__(self, widths: tuple[int, ...] | list[int] = (16, 32, 64), convs: tuple[int, ...] | list[int] = (1, 2, 2),
                 hidden: int = 96):
        super().__init__(widths=list(widths), convs=list(convs), hidden=hidden)
        layers, c = [], 3
        # One conv at full resolution (where a conv costs the most), two at each coarser scale.
        for w, k in zip(widths, convs):
            for _ in range(k):
                layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                c = w
            layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(c, hidden), nn.ReLU(inplace=True))
        self.head = nn.Linear(hidden, len(ATTRIBUTES) + len(COUNTS))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.body(images * 2 - 1))


class _Residual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.GroupNorm(4, c_out), nn.SiLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.GroupNorm(4, c_out))
        self.skip = nn.Identity() if stride == 1 and c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride=stride)

    def forward(self, x):
        return nn.functional.silu(self.conv(x) + self.skip(x))


class CheckerNet(AttributeClassifier):
    """A residual net (strided stem and convs, GroupNorm, SiLU) with global average + max pooling,
    beside a colour branch on the 8x8-downsampled image.

    Built to differ from the labeller at every level (normalisation,
    downsampling, pooling, widths, an extra colour path), so the two do not
    share blind spots.
    """

    arch = "checker"

    def __init__(self, widths: tuple[int, ...] | list[int] = (24, 40, 80), hidden: int = 128, colour: int = 32):
        super().__init__(widths=list(widths), hidden=hidden, colour=colour)
        # A strided stem: digits are 10-16 px, so 32x32 keeps every stroke gap and costs a quarter.
        blocks, c = [nn.Conv2d(3, widths[0], 4, stride=2, padding=1), nn.SiLU()], widths[0]
        for i, w in enumerate(widths):
            blocks.append(_Residual(c, w, stride=1 if i == 0 else 2))
            c = w
        self.trunk = nn.Sequential(*blocks)
        # Colours decide two of the four attributes; the 8x8 thumbnail keeps
        # them without the trunk having to carry them through its nonlinearity.
        self.colour = nn.Sequential(nn.AdaptiveAvgPool2d(8), nn.Flatten(), nn.Linear(3 * 64, colour), nn.SiLU())
        self.embed = nn.Sequential(nn.Linear(2 * c + colour, hidden), nn.SiLU())
        self.head = nn.Linear(hidden, len(ATTRIBUTES) + len(COUNTS))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = images * 2 - 1
        f = self.trunk(x)
        pooled = torch.cat([f.mean((-1, -2)), f.amax((-1, -2)), self.colour(x)], dim=1)
        return self.embed(pooled)


ARCHS: dict[str, type[AttributeClassifier]] = {"labeller": LabellerNet, "checker": CheckerNet}


def build(arch: str, **config) -> AttributeClassifier:
    if arch not in ARCHS:
        close = difflib.get_close_matches(arch, ARCHS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise FactoryError(f"unknown classifier arch {arch!r}.{hint} Known: {', '.join(ARCHS)}")
    return ARCHS[arch](**config)


def attribute_vector(labels: dict) -> np.ndarray:
    """The four binary attributes of a scene's labels as a float vector, in ATTRIBUTES order."""
    return np.array([float(bool(labels[a])) for a in ATTRIBUTES], np.float32)
