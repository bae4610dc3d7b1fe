"""Generators with a latent space: the shipped regularised autoencoder (trained for a
few real steps here), its folder format, loading by reference, and the StyleGAN adapters
(lucidrains' stylegan2_pytorch on a randomly initialised network saved by their Trainer)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from factory.errors import FactoryError
from factory.latent.generator import (
    LucidrainsStyleGAN2Adapter,
    RAEGenerator,
    StyleGANAdapter,
    check_generator_ref,
    import_stylegan2_pytorch,
    load_generator,
)
from factory.models.latent_ae import LatentAE
from factory.train.latent import train_latent_ae
from factory.train.loop import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def rae_folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("latent-ae")
    cfg = TrainConfig(out=out / "run", steps=4, lr=1e-3, checkpoint_every=2, eval_every=4, threads=1)
    train_latent_ae(cfg, "world:train:64", out / "model", batch=8, test="world:test:8", components=4)
    return out / "model"


def test_training_writes_a_loadable_folder(rae_folder):
    assert {p.name for p in rae_folder.iterdir()} >= {"config.json", "model.safetensors", "prior.npz", "curve.jsonl"}
    cfg = json.loads((rae_folder / "config.json").read_text())
    assert cfg["kind"] == "latent-ae" and cfg["latent_dim"] == 144
    assert cfg["code_stats"]["radius"] > 0 and "counter_exact_on_reconstructions" in cfg["code_stats"]["eval"]
    curve = [json.loads(line) for line in (rae_folder / "curve.jsonl").read_text().splitlines()]
    assert curve[-1]["step"] == 4 and 0 <= curve[-1]["counter_exact_on_reconstructions"] <= 1
    # fp16 on disk, fp32 in memory
    model = LatentAE.from_pretrained(rae_folder)
    assert next(model.parameters()).dtype == torch.float32


def test_rae_generator_round_trip(rae_folder):
    gen = load_generator(str(rae_folder))
    assert isinstance(gen, RAEGenerator) and gen.has_encoder
    assert (gen.latent_dim, gen.image_size) == (144, 64) and gen.model_id.startswith("latent-ae:")
    z = gen.sample_latents([3, 1, 2])
    assert z.shape == (3, 144) and z.dtype == np.float32
    # the same seed gives the same code, whatever else is in the batch
    np.testing.assert_array_equal(z, gen.sample_latents([3, 1, 2]))
    np.testing.assert_array_equal(z[2], gen.sample_latents([2])[0])
    assert not np.allclose(z[0], z[1])
    zt = torch.from_numpy(z).requires_grad_(True)
    images = gen.synthesize(zt)
    assert images.shape == (3, 3, 64, 64) and images.min() >= 0 and images.max() <= 1
    images.mean().backward()
    assert zt.grad is not None and zt.grad.abs().sum() > 0
    codes = gen.encode(images.detach())
    assert codes.shape == (3, 144)
    assert gen.latent_radius() == json.loads((rae_folder / "config.json").read_text())["code_stats"]["radius"]


def test_wrong_kind_folders_are_refused(tmp_path):
    with pytest.raises(FactoryError, match="density-counter"):
        LatentAE.from_pretrained(ROOT / "models/counter")
    with pytest.raises(FactoryError, match="density-counter"):
        load_generator(str(ROOT / "models/counter"))
    with pytest.raises(FactoryError, match="diffusers pipeline"):
        LatentAE.from_pretrained(ROOT / "models/tiny-sd")
    with pytest.raises(FactoryError, match="does not exist"):
        load_generator(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="density-counter"):
        check_generator_ref(str(ROOT / "models/counter"))
    assert check_generator_ref("some-org/some-gan") == "some-org/some-gan"  # hub ids are fetched later


def test_lucidrains_stylegan2_checkpoint(tmp_path, monkeypatch):
    # installed with --no-deps (see pyproject's `stylegan` extra), so it may be absent; a plain
    # import would fail on its `import aim` even when it is there, hence find_spec
    if importlib.util.find_spec("stylegan2_pytorch") is None:
        pytest.skip("stylegan2_pytorch is not installed: pip install --no-deps stylegan2_pytorch==1.9.0")
    sg = import_stylegan2_pytorch()
    trainer = sg.Trainer(name="default", base_dir=str(tmp_path), image_size=32, network_capacity=2,
                         latent_dim=32, style_depth=2)
    # Their StyleGAN2 constructor moves itself to a GPU (self.cuda(rank)); on a CPU-only
    # machine keep it where it is. The weights are what matters here.
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, device=None: self)
    trainer.init_GAN()
    trainer.save(7)  # models/default/model_7.pt + .config.json, exactly as their training does
    monkeypatch.undo()

    folder = tmp_path / "models" / "default"
    assert check_generator_ref(str(folder)) == str(folder)
    gen = load_generator(str(folder))
    assert isinstance(gen, LucidrainsStyleGAN2Adapter) and gen.latent_dim == 32 and gen.image_size == 32
    z = gen.sample_latents([5, 6])
    np.testing.assert_array_equal(z, gen.sample_latents([5, 6]))
    zt = torch.from_numpy(z).requires_grad_(True)
    images = gen.synthesize(zt)
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images, gen.synthesize(torch.from_numpy(z)))
    images.sum().backward()
    assert zt.grad.abs().sum() > 0
    # the same images their own generation path gives (EMA mapping + EMA generator)
    with torch.no_grad():
        w = trainer.GAN.SE(torch.from_numpy(z))
        theirs = trainer.GAN.GE(w[:, None].expand(-1, gen.num_layers, -1), gen.noise.expand(2, -1, -1, -1))
    torch.testing.assert_close(images.detach(), theirs.clamp(0, 1))
    assert load_generator(str(folder), image_size=64).synthesize(zt.detach()).shape == (2, 3, 64, 64)


class _NVlabsAPI(torch.nn.Module):
    """A two-layer network with the NVlabs generator API (mapping, synthesis)."""

    z_dim, c_dim, img_resolution = 8, 2, 16

    def __init__(self):
        super().__init__()
        self.map = torch.nn.Linear(self.z_dim + self.c_dim, 8)
        self.out = torch.nn.Linear(8, 3 * self.img_resolution**2)

    def mapping(self, z, c, truncation_psi=1.0):
        return self.map(torch.cat([z, c], 1))[:, None].expand(-1, 4, -1) * truncation_psi

    def synthesis(self, ws, noise_mode="random"):
        assert noise_mode == "const"
        return torch.tanh(self.out(ws[:, 0])).view(-1, 3, self.img_resolution, self.img_resolution)


def test_nvlabs_api_adapter():
    with pytest.raises(FactoryError, match="class_index"):
        StyleGANAdapter(_NVlabsAPI(), "test")
    gen = StyleGANAdapter(_NVlabsAPI(), "test", class_index=1, image_size=32, truncation_psi=0.7)
    z = torch.from_numpy(gen.sample_latents([1, 2])).requires_grad_(True)
    images = gen.synthesize(z)
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    images.sum().backward()
    assert z.grad.abs().sum() > 0
    with pytest.raises(FactoryError, match="z_dim"):
        StyleGANAdapter(torch.nn.Linear(2, 2), "test")


def test_shipped_latent_ae_loads():
    folder = ROOT / "models/latent-ae"
    gen = load_generator(str(folder))
    assert isinstance(gen, RAEGenerator) and gen.latent_dim == 528
    assert sum(p.stat().st_size for p in folder.iterdir()) < 5_000_000  # the shipped folder stays small
    with torch.no_grad():
        images = gen.synthesize(torch.from_numpy(gen.sample_latents([0, 1])))
    assert images.shape == (2, 3, 64, 64)
