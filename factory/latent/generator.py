"""The Generator interface: what an editor needs of a generator with a latent space.

A generator maps codes ``z`` (float32, shape (n, latent_dim)) to images
(float32 tensors (n, 3, H, W) in [0, 1]). Editors move codes; inverters find
the code of a real image; checkers look only at the images. Anything that
implements this class plugs into the `sample_latent`, `invert` and `edit`
stages: the shipped regularised autoencoder, or a user's StyleGAN-family
checkpoint through an adapter.
"""
from __future__ import annotations

import abc
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from factory.errors import FactoryError


class Generator(abc.ABC):
    """A generator with a latent space. Implementations set the three attributes."""

    #: length of a code
    latent_dim: int
    #: images are (3, image_size, image_size)
    image_size: int
    #: a stable name recorded in every sample's labels (a folder path or hub id, with the kind)
    model_id: str
    device: str = "cpu"

    @abc.abstractmethod
    def sample_latents(self, seeds: list[int]) -> np.ndarray:
        """One code per seed from the generator's prior: the same seed always gives the same code."""

    @abc.abstractmethod
    def synthesize(self, z: torch.Tensor) -> torch.Tensor:
        """Images for codes: (n, latent_dim) -> (n, 3, H, W) in [0, 1], differentiable in ``z``."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """One-pass inversion: images (n, 3, H, W) in [0, 1] -> codes. Only generators with an encoder."""
        raise NotImplementedError(f"{type(self).__name__} has no encoder; invert with method: optimise")

    @property
    def has_encoder(self) -> bool:
        return type(self).encode is not Generator.encode

    def latent_radius(self) -> float:
        """Codes are kept inside this norm ball by inversion and editing (sqrt(d) for N(0, I) priors)."""
        return float(np.sqrt(self.latent_dim))

    @property
    def grid_layout(self):
        """Where a spatial grid sits in the code (a :class:`factory.latent.clone.GridLayout`), or None
        when the code has no spatial part (StyleGAN's z and w). The clone count editor needs one."""
        return None


# --- the shipped regularised autoencoder -------------------------------------------------

KIND_RAE = "latent-ae"
KIND_NVLABS = "stylegan-nvlabs"
KIND_LUCIDRAINS = "stylegan2-pytorch"
KIND_SLOTS = "slot-scene"
KNOWN_KINDS = (KIND_RAE, KIND_NVLABS, KIND_LUCIDRAINS, KIND_SLOTS)


def _seed(seed) -> int:
    s = int(seed)
    if s < 0:
        raise FactoryError(f"latent seeds must be non-negative integers, got {seed}; plan seeds are hashes >= 0")
    return s


def _as_codes(z, dim: int, device: str) -> torch.Tensor:
    z = torch.as_tensor(z, dtype=torch.float32, device=device)
    if z.ndim != 2 or z.shape[1] != dim:
        raise FactoryError(f"codes must have shape (n, {dim}), got {tuple(z.shape)}")
    return z


class RAEGenerator(Generator):
    """The regularised autoencoder of :mod:`factory.models.latent_ae` as a Generator:
    codes are drawn from the ex-post Gaussian mixture fitted on its training codes,
    the decoder synthesises, the encoder inverts in one pass."""

    def __init__(self, ref: str | Path, device: str = "cpu", model_id: str | None = None):
        from factory.models.latent_ae import LatentAE, load_prior, resolve_folder

        folder = resolve_folder(ref)
        self.model = LatentAE.from_pretrained(folder, device).requires_grad_(False)
        prior = load_prior(folder)
        self.weights = prior["weights"].astype(np.float64) / prior["weights"].sum()
        self.means, self.chols = prior["means"].astype(np.float64), prior["chols"].astype(np.float64)
        self.latent_dim = self.model.latent_dim
        self.image_size = self.model.image_size
        if self.means.shape[1] != self.latent_dim:
            raise FactoryError(f"{folder}: prior.npz is for {self.means.shape[1]}-d codes but the model's are "
                               f"{self.latent_dim}-d; re-export the folder with `factory train latent-ae`")
        self.model_id = model_id or f"{KIND_RAE}:{ref}"
        self.device = device
        stats = self.model.config.get("code_stats") or {}
        self._radius = float(stats["radius"]) if "radius" in stats else None

    def sample_latents(self, seeds: list[int]) -> np.ndarray:
        out = np.empty((len(seeds), self.latent_dim), np.float32)
        for i, seed in enumerate(seeds):
            # One generator per seed, so a code never depends on its batch neighbours.
            rng = np.random.default_rng(_seed(seed))
            k = rng.choice(len(self.weights), p=self.weights)
            out[i] = self.means[k] + self.chols[k] @ rng.standard_normal(self.latent_dim)
        return out

    def synthesize(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(_as_codes(z, self.latent_dim, self.device))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode(torch.as_tensor(images, dtype=torch.float32, device=self.device))

    def latent_radius(self) -> float:
        # The codes are not N(0, I): the 99.9th percentile norm of the training codes
        # bounds where the decoder has seen data.
        return self._radius if self._radius is not None else super().latent_radius()

    @property
    def grid_layout(self):
        from factory.latent.clone import GridLayout

        m = self.model
        if not m.spatial:
            return None
        return GridLayout(m.global_dim, m.spatial, m.base, m.base)


class SlotGenerator(Generator):
    """The object-slot scene model of :mod:`factory.models.slots` as a Generator: codes list the
    objects (:class:`factory.models.slots.SlotLayout`), are drawn from its learned prior over
    layouts, synthesised by compositing the slots over the background, and inverted in one pass by
    its encoder (presence thresholded, duplicates removed). Count edits switch slots (editor slot)."""

    def __init__(self, ref: str | Path, device: str = "cpu", model_id: str | None = None):
        from factory.models.slots import SlotSceneModel

        self.model = SlotSceneModel.from_pretrained(ref, device).requires_grad_(False)
        self.layout = self.model.layout
        self.latent_dim = self.layout.latent_dim
        self.image_size = self.model.image_size
        self.model_id = model_id or f"{KIND_SLOTS}:{ref}"
        self.device = device

    def sample_latents(self, seeds: list[int]) -> np.ndarray:
        if self.model.prior is None:
            raise FactoryError(f"{self.model_id} has no layout prior to draw codes from: re-export it with "
                               f"`factory train slots`, or invert real images instead of sampling")
        out = np.empty((len(seeds), self.latent_dim), np.float32)
        for i, seed in enumerate(seeds):  # one generator per seed: a code never depends on its batch
            gen = torch.Generator().manual_seed(_seed(seed))
            out[i] = self.layout.join(*self.model.prior.sample(1, gen))[0].cpu().numpy()
        return out

    def synthesize(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.synthesize(_as_codes(z, self.latent_dim, self.device))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode(torch.as_tensor(images, dtype=torch.float32, device=self.device))

    def latent_radius(self) -> float:
        # A slot code is not a Gaussian vector: no norm ball (presence bits and boxes are not scaled).
        return float("inf")


# --- StyleGAN-family adapters --------------------------------------------------------------

def _to_size(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[1] == 1:  # grayscale generators: the interface promises RGB
        images = images.expand(-1, 3, -1, -1)
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                               antialias=images.shape[-1] > size)
    return images


def _normal_latents(seeds: list[int], dim: int) -> np.ndarray:
    return np.stack([np.random.default_rng(_seed(s)).standard_normal(dim) for s in seeds]).astype(np.float32) \
        if len(seeds) else np.zeros((0, dim), np.float32)


class StyleGANAdapter(Generator):
    """Any module with the NVlabs stylegan2-ada-pytorch / stylegan3 API: attributes ``z_dim``,
    ``c_dim``, ``img_resolution``; ``mapping(z, c, truncation_psi=...) -> ws`` and
    ``synthesis(ws, noise_mode=...) -> images in [-1, 1]``. Codes are z ~ N(0, I), one per seed.
    Conditional generators need ``class_index``. Noise is 'const' so an image depends on z only."""

    def __init__(self, G: torch.nn.Module, model_id: str, device: str = "cpu", truncation_psi: float = 1.0,
                 image_size: int | None = None, class_index: int | None = None):
        for attr in ("z_dim", "c_dim", "img_resolution", "mapping", "synthesis"):
            if not hasattr(G, attr):
                raise FactoryError(f"{model_id}: the generator has no `{attr}`; a StyleGAN adapter needs the NVlabs "
                                   f"API (z_dim, c_dim, img_resolution, mapping, synthesis)")
        self.G = G.eval().requires_grad_(False).to(device)
        self.latent_dim = int(G.z_dim)
        self.c_dim = int(G.c_dim)
        if self.c_dim and class_index is None:
            raise FactoryError(f"{model_id} is class-conditional ({self.c_dim} classes): give class_index")
        self.class_index = class_index
        self.native_size = int(G.img_resolution)
        self.image_size = int(image_size or self.native_size)
        self.truncation_psi = float(truncation_psi)
        self.model_id = model_id
        self.device = device

    def sample_latents(self, seeds: list[int]) -> np.ndarray:
        return _normal_latents(seeds, self.latent_dim)

    def synthesize(self, z: torch.Tensor) -> torch.Tensor:
        z = _as_codes(z, self.latent_dim, self.device)
        c = torch.zeros(len(z), self.c_dim, device=self.device)
        if self.c_dim:
            c[:, self.class_index] = 1
        ws = self.G.mapping(z, c, truncation_psi=self.truncation_psi)
        img = self.G.synthesis(ws, noise_mode="const").float()
        return _to_size(((img + 1) / 2).clamp(0, 1), self.image_size)

    @classmethod
    def from_pickle(cls, path: str | Path, device: str = "cpu", **kwargs) -> "StyleGANAdapter":
        """An NVlabs network pickle (``G_ema``). Unpickling runs code from the pickle's
        classes: load only checkpoints you trust."""
        import pickle

        try:
            with open(path, "rb") as f:
                data = pickle.load(f)
        except ModuleNotFoundError as e:
            raise FactoryError(
                f"{path} is an NVlabs StyleGAN pickle and unpickling it needs their code ({e.name} is missing): "
                f"clone NVlabs/stylegan3 (or stylegan2-ada-pytorch) and put it on PYTHONPATH") from None
        if not isinstance(data, dict) or "G_ema" not in data:
            raise FactoryError(f"{path} holds no `G_ema`: not an NVlabs stylegan2-ada/stylegan3 network pickle")
        return cls(data["G_ema"], f"{KIND_NVLABS}:{path}", device, **kwargs)


# --no-deps: the package's metadata requires aim, which only its Trainer's logging uses (see below).
LUCIDRAINS_INSTALL = ("pip install --no-deps stylegan2_pytorch==1.9.0 && pip install 'factory-synth[stylegan]' "
                      "(its light deps: einops kornia vector-quantize-pytorch==0.1.0 contrastive_learner fire retry)")


def import_stylegan2_pytorch():
    """lucidrains' ``stylegan2_pytorch`` module, imported so that it works on a CPU.

    At import time the package (1) imports ``aim``, an experiment tracker that only
    its Trainer's optional logging uses, and which pulls in a heavy server stack, and
    (2) asserts ``torch.cuda.is_available()``, although its Generator and
    StyleVectorizer are plain modules that run on the CPU. So: when aim is not
    installed, a placeholder module stands in for it (it raises if anything in it is
    used, i.e. Trainer(log=True)); and is_available is reported True during this import
    only, then restored. Not thread-safe: call it before starting threads that ask CUDA.
    """
    import importlib
    import importlib.util
    import sys
    import types

    name = "stylegan2_pytorch.stylegan2_pytorch"
    if name in sys.modules:
        return sys.modules[name]
    if importlib.util.find_spec("stylegan2_pytorch") is None:
        raise FactoryError(f"lucidrains' stylegan2_pytorch is not installed: {LUCIDRAINS_INSTALL}")
    if importlib.util.find_spec("aim") is None and "aim" not in sys.modules:
        placeholder = types.ModuleType("aim", "placeholder: aim is not installed (stylegan2_pytorch logs with it)")

        def _missing(attr):
            # AttributeError (not ImportError) so that hasattr() probes, e.g. for __file__, still work.
            raise AttributeError(f"aim is not installed, so aim.{attr} is unavailable; pip install aim to log "
                                 f"stylegan2_pytorch training runs")

        placeholder.__getattr__ = _missing
        sys.modules["aim"] = placeholder
    real = torch.cuda.is_available
    torch.cuda.is_available = lambda: True
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise FactoryError(f"stylegan2_pytorch could not be imported ({e}): {LUCIDRAINS_INSTALL}") from None
    finally:
        torch.cuda.is_available = real


def _lucidrains_checkpoint(path: Path) -> Path:
    """The checkpoint a path names: a model_N.pt file, or the newest model_N.pt in a folder
    (the Trainer's models/NAME folder)."""
    if path.is_file():
        return path
    ckpts = sorted(path.glob("model_*.pt"), key=lambda p: int(p.stem.split("_")[1]) if p.stem.split("_")[1].isdigit() else -1)
    if not ckpts:
        raise FactoryError(f"{path} holds no model_N.pt: give a stylegan2_pytorch checkpoint or its models/NAME folder")
    return ckpts[-1]


class LucidrainsStyleGAN2Adapter(Generator):
    """A checkpoint of lucidrains' ``stylegan2_pytorch`` (``model_N.pt``: ``{'GAN': state_dict}``).

    Generation uses the EMA copies, as their Trainer and ModelLoader do: styles
    w = SE(z) (the StyleVectorizer; it normalises z), broadcast to every layer, then
    GE(styles, noise). Their noise is fresh uniform noise per call; here it is one fixed
    noise image (seeded), so an image depends on its code only. Only SE and GE are
    built: StyleGAN2 itself moves itself to a GPU in its constructor and holds the
    discriminator and optimisers, which generation does not need.
    """

    NOISE_SEED = 0

    def __init__(self, ref: str | Path, device: str = "cpu", truncation_psi: float = 1.0,
                 image_size: int | None = None):
        sg = import_stylegan2_pytorch()
        ckpt = _lucidrains_checkpoint(Path(ref))
        try:
            data = torch.load(ckpt, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a corrupt or foreign file: say which
            raise FactoryError(f"{ckpt} could not be read as a stylegan2_pytorch checkpoint: {e}") from None
        if not isinstance(data, dict) or "GAN" not in data:
            raise FactoryError(f"{ckpt} has no 'GAN' state dict: not a stylegan2_pytorch Trainer checkpoint")
        sd = data["GAN"]
        config_path = ckpt.parent / ".config.json"  # the Trainer writes its hyperparameters beside the checkpoints
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        # What the checkpoint does not store is read from the weights' shapes.
        latent_dim = sd["SE.net.0.weight"].shape[1]
        style_depth = len({k.split(".")[2] for k in sd if k.startswith("SE.net.") and k.endswith(".weight")})
        num_layers = len({k.split(".")[2] for k in sd if k.startswith("GE.blocks.")})
        size = 2 ** (num_layers + 1)
        last = f"GE.blocks.{num_layers - 1}"
        capacity = sd[f"{last}.conv1.weight"].shape[0] // 2
        no_const = "GE.to_initial_block.weight" in sd
        # The widest map (their fmap_max cap) is the initial one: (1, C, 4, 4) or a (latent, C, 4, 4) deconv.
        init_channels = sd["GE.to_initial_block.weight" if no_const else "GE.initial_block"].shape[1]
        transparent = sd[f"{last}.to_rgb.conv.weight"].shape[0] == 4
        attn_layers = config.get("attn_layers") or sorted(
            {num_layers - int(k.split(".")[2]) for k in sd if k.startswith("GE.attns.")})
        # lr_mul scales the mapping weights in forward (it is not a parameter): the Trainer's
        # config holds it; 0.1 is their default.
        lr_mlp = float(config.get("lr_mlp", 0.1))
        self.S = sg.StyleVectorizer(latent_dim, style_depth, lr_mul=lr_mlp)
        self.G = sg.Generator(size, latent_dim, capacity, transparent=transparent, attn_layers=attn_layers,
                              no_const=no_const, fmap_max=init_channels)
        try:
            self.S.load_state_dict({k[3:]: v for k, v in sd.items() if k.startswith("SE.")})
            self.G.load_state_dict({k[3:]: v for k, v in sd.items() if k.startswith("GE.")})
        except RuntimeError as e:
            raise FactoryError(f"{ckpt}: the EMA generator's weights do not fit the architecture read from them "
                               f"(image size {size}, latent_dim {latent_dim}, capacity {capacity}): {e}") from None
        self.S.to(device).eval().requires_grad_(False)
        self.G.to(device).eval().requires_grad_(False)
        self.latent_dim = int(latent_dim)
        self.native_size = size
        self.num_layers = num_layers
        self.image_size = int(image_size or size)
        self.truncation_psi = float(truncation_psi)
        self.model_id = f"{KIND_LUCIDRAINS}:{ref}"
        self.device = device
        gen = torch.Generator().manual_seed(self.NOISE_SEED)
        self.noise = torch.rand(1, size, size, 1, generator=gen).to(device)
        self._w_avg = None
        if self.truncation_psi != 1.0:
            # Their Trainer truncates towards the mean style of 2,000 random codes.
            with torch.no_grad():
                z = torch.randn(2000, latent_dim, generator=torch.Generator().manual_seed(self.NOISE_SEED))
                self._w_avg = self.S(z.to(device)).mean(0, keepdim=True)

    def sample_latents(self, seeds: list[int]) -> np.ndarray:
        return _normal_latents(seeds, self.latent_dim)

    def synthesize(self, z: torch.Tensor) -> torch.Tensor:
        z = _as_codes(z, self.latent_dim, self.device)
        w = self.S(z)
        if self._w_avg is not None:
            w = self._w_avg + self.truncation_psi * (w - self._w_avg)
        styles = w[:, None, :].expand(-1, self.num_layers, -1)
        img = self.G(styles, self.noise.expand(len(z), -1, -1, -1))[:, :3]
        return _to_size(img.clamp(0, 1), self.image_size)


# --- loading by reference ----------------------------------------------------------------

def generator_kind(path: Path) -> str:
    """Which kind of generator a local path holds, from its file names and config only
    (cheap enough for recipe validation)."""
    if path.is_dir():
        cfg = path / "config.json"
        if cfg.is_file():
            try:
                kind = json.loads(cfg.read_text()).get("kind")
            except ValueError:
                kind = None
            if kind in (KIND_RAE, KIND_SLOTS):
                return kind
            raise FactoryError(f"{path} holds a {kind or 'non-generator'} model, not a generator with a latent space; "
                               f"give one of: {_KINDS_HELP}")
        if any(path.glob("model_*.pt")):
            return KIND_LUCIDRAINS
        pickles = list(path.glob("*.pkl"))
        if len(pickles) == 1:
            return KIND_NVLABS
        what = "several .pkl files (name one)" if pickles else "none of the files of a known generator"
        raise FactoryError(f"{path} holds {what}; give one of: {_KINDS_HELP}")
    if path.suffix == ".pkl":
        return KIND_NVLABS
    if path.suffix in (".pt", ".pth"):
        return KIND_LUCIDRAINS
    raise FactoryError(f"{path} is not a known generator file; give one of: {_KINDS_HELP}")


_KINDS_HELP = ("a folder written by `factory train latent-ae` (config.json kind latent-ae) or `factory train slots` "
               "(kind slot-scene), "
               "an NVlabs StyleGAN network pickle (.pkl with G_ema), or a stylegan2_pytorch model_N.pt "
               "(or its models/NAME folder)")


def _local(ref: str) -> Path | None:
    import os

    p = Path(os.path.expanduser(str(ref)))
    return p if p.exists() else None


def load_generator(ref: str, device: str = "cpu", *, truncation_psi: float = 1.0,
                   image_size: int | None = None) -> Generator:
    """A Generator from a local path or a hub id, by what the path holds (see :func:`generator_kind`).
    ``truncation_psi`` and ``image_size`` apply to StyleGAN checkpoints (the autoencoder has neither)."""
    path = _local(ref)
    if path is None:
        from factory.recipe import HUB_ID, _looks_like_path

        if _looks_like_path(str(ref)) or not HUB_ID.match(str(ref)):
            raise FactoryError(f"generator {ref!r} does not exist; give {_KINDS_HELP}")
        from factory.models.latent_ae import resolve_folder

        path = resolve_folder(ref)  # a hub repo: fetched into the local cache
    kind = generator_kind(path)
    if kind == KIND_RAE:
        return RAEGenerator(path, device, model_id=f"{KIND_RAE}:{ref}")  # the name the user gave, not a cache path
    if kind == KIND_SLOTS:
        return SlotGenerator(path, device, model_id=f"{KIND_SLOTS}:{ref}")
    if kind == KIND_NVLABS:
        if path.is_dir():
            path = next(path.glob("*.pkl"))
        return StyleGANAdapter.from_pickle(path, device, truncation_psi=truncation_psi, image_size=image_size)
    return LucidrainsStyleGAN2Adapter(path, device, truncation_psi=truncation_psi, image_size=image_size)


def check_generator_ref(value: str) -> str:
    """Recipe validation of a generator reference: a local path must exist and hold a known
    kind; a hub id (org/name) or URL passes (it is fetched when the stage starts).
    Raises ValueError, which pydantic turns into an error at the recipe's YAML path."""
    from factory.recipe import check_model_ref

    check_model_ref(value)
    path = _local(value)
    if path is not None:
        try:
            generator_kind(path)
        except FactoryError as e:
            raise ValueError(str(e)) from None
    return value
