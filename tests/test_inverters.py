"""Inverters: encoder, optimisation and DDIM inversion, and the `invert` stage.

The latent-space tests run on real, randomly initialised torch networks (no
checkpoint is needed to test the mechanics); DDIM inversion runs on the
shipped tiny SD.
"""
import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from factory.evaluation.fidelity import heldout_layouts
from factory.latent.generator import Generator
from factory.latent.inversion import (QUANTISATION_MSE, encoder_inversion, masked_mse, optimise_inversion,
                                      psnr, ssim, to_tensor)

torch.set_num_threads(1)


class RandomConvGenerator(Generator):
    """A randomly initialised conv decoder (and a pooling encoder), 16-d codes, 64x64 images.

    Its logits are standardised over prior codes at construction so that the
    image really depends on the code (a fresh network's output hardly does),
    which is what inversion needs to be tested.
    """

    def __init__(self, latent_dim: int = 16, seed: int = 0):
        torch.manual_seed(seed)
        self.latent_dim, self.image_size, self.model_id = latent_dim, 64, f"test:random-conv-{seed}"

        def up(ci, co):
            return [nn.Upsample(scale_factor=2), nn.Conv2d(ci, co, 3, padding=1), nn.SiLU()]

        self.decoder = nn.Sequential(nn.Linear(latent_dim, 16 * 8 * 8), nn.Unflatten(1, (16, 8, 8)),
                                     *up(16, 16), *up(16, 8), *up(8, 8), nn.Conv2d(8, 3, 3, padding=1)).eval()
        self.encoder = nn.Sequential(nn.AvgPool2d(8), nn.Flatten(), nn.Linear(3 * 64, latent_dim)).eval()
        for p in [*self.decoder.parameters(), *self.encoder.parameters()]:
            p.requires_grad_(False)
        with torch.no_grad():
            logits = self.decoder(torch.from_numpy(self.sample_latents(list(range(64)))))
        self.shift, self.scale = logits.mean(0), 2.0 / logits.std(0).mean()

    def sample_latents(self, seeds):
        return np.stack([np.random.default_rng(s).standard_normal(self.latent_dim) for s in seeds]).astype(np.float32)

    def synthesize(self, z):
        return torch.sigmoid((self.decoder(z) - self.shift) * self.scale)

    def encode(self, images):
        return self.encoder(images * 2 - 1)


@pytest.fixture(scope="module")
def gen():
    return RandomConvGenerator()


@pytest.fixture(scope="module")
def scenes():
    return heldout_layouts(3)


def test_optimisation_beats_the_encoder_and_stays_in_the_ball(gen, scenes):
    x = to_tensor([s.image for s in scenes])
    z_enc, err = encoder_inversion(gen, x)
    r = optimise_inversion(gen, x, steps=60)  # warm start: the encoder
    assert (r.mse < err["mse"] - 1e-3).all(), (r.mse, err["mse"])
    assert np.allclose(r.psnr, 10 * np.log10(1 / r.mse), atol=1e-3)
    assert (np.linalg.norm(r.z, axis=1) <= gen.latent_radius() + 1e-4).all()
    # A small ball binds: every code ends on or inside it.
    small = optimise_inversion(gen, x, steps=20, radius=0.5)
    assert (np.linalg.norm(small.z, axis=1) <= 0.5 + 1e-5).all()
    assert np.isclose(np.linalg.norm(small.z, axis=1), 0.5, atol=1e-3).any()


def test_an_image_in_the_generators_range_comes_back(gen):
    z_true = torch.from_numpy(gen.sample_latents([10, 11]))
    with torch.no_grad():
        y = gen.synthesize(z_true)
    _, err = encoder_inversion(gen, y)
    r = optimise_inversion(gen, y, steps=150)
    assert (err["psnr"] < 15).all() and (r.psnr > 30).all(), (err["psnr"], r.psnr)


def test_only_masked_pixels_count(gen, scenes):
    x = to_tensor([s.image for s in scenes[:2]])
    mask = torch.ones_like(x[:, :1])
    mask[:, :, :, 32:] = 0
    spoiled = x.clone()
    spoiled[:, :, :, 32:] = torch.rand_like(spoiled[:, :, :, 32:])
    a = optimise_inversion(gen, x, steps=15, mask=mask)
    b = optimise_inversion(gen, spoiled, steps=15, mask=mask)
    assert np.allclose(a.z, b.z, atol=1e-5) and np.allclose(a.mse, b.mse, atol=1e-7)
    assert not np.allclose(optimise_inversion(gen, spoiled, steps=15).z, a.z, atol=1e-3)


def test_convergence_is_reported_per_image_with_a_reason(gen, scenes):
    x = to_tensor([s.image for s in scenes[:2]])
    r = optimise_inversion(gen, x, steps=2, max_mse=1e-6)
    assert not r.converged.any() and (r.steps == 2).all()
    assert all("above max_mse 1e-06" in why and "still falling" in why for why in r.reasons), r.reasons
    done = optimise_inversion(gen, x, steps=300, tol=1e-2)
    assert done.converged.all() and (done.steps < 300).all() and done.reasons == [None, None]
    exact = optimise_inversion(gen, gen.synthesize(torch.from_numpy(done.z)).detach(), z0=done.z, steps=50)
    assert exact.converged.all() and (exact.mse < QUANTISATION_MSE).all() and (exact.steps == 0).all()


def test_metrics():
    a = torch.rand(2, 3, 64, 64)
    assert (psnr(a, a) == 100).all() and np.allclose(ssim(a, a), 1)
    b = (a + 0.1).clamp(0, 1)
    assert np.allclose(psnr(a, b), 10 * np.log10(1 / masked_mse(a, b).numpy()))
    assert (ssim(a, b) < 1).all()


# --- the `invert` stage ---------------------------------------------------------------

@pytest.fixture(scope="module")
def rae_folder(tmp_path_factory):
    """A randomly initialised, small regularised autoencoder in the shipped folder format."""
    from factory.models.latent_ae import LatentAE, code_statistics, fit_prior

    torch.manual_seed(0)
    model = LatentAE(latent_dim=32, channels=(8, 16, 16, 16), dec_channels=(16, 16, 8, 8), global_dim=16)
    codes = np.random.default_rng(0).standard_normal((200, 32)).astype(np.float32)
    folder = tmp_path_factory.mktemp("rae") / "latent-ae"
    model.save_pretrained(folder, code_statistics(codes), fit_prior(codes, components=2))
    return str(folder)


def invert(samples, **params):
    from actors.inverters import Inverter
    from factory.sample import from_batch, to_batch

    stage = Inverter(params, "cpu")
    # Through Ray's row format: the labels must survive JSON.
    return from_batch(stage(to_batch(samples)))


@pytest.mark.parametrize("method", ["encoder+optimise", "optimise", "encoder"])
def test_stage_writes_the_code_and_keeps_the_real_image(rae_folder, method):
    samples = heldout_layouts(2)
    before = [(s.image.copy(), s.meta["count"], s.meta["points"]) for s in samples]
    out = invert(samples, method=method, generator=rae_folder, steps=5, max_mse=None)
    for s, (image, count, points) in zip(out, before):
        assert s.alive, s.meta.get("failed")
        assert np.array_equal(s.image, image) and s.meta["count"] == count and s.meta["points"] == points
        assert len(s.meta["latent"]["z"]) == 32 and s.meta["latent"]["generator"] == f"latent-ae:{rae_folder}"
        inv = s.meta["inversion"]
        assert inv["method"] == method and 0 < inv["mse"] < 1 and inv["psnr"] > 0
        assert (inv["steps"] == 0) == (method == "encoder")
        assert set(inv) == {"method", "mse", "psnr", "steps", "converged"}  # no wall time: see below
        assert s.meta["ops"][-1]["op"] == "invert" and s.meta["ops"][-1]["sigma"] == 3.0


def test_two_inversions_write_the_same_bytes_and_the_time_goes_to_the_stats(rae_folder):
    from factory.sample import encode_members
    from factory.stage import SECONDS

    first, second = (invert(heldout_layouts(3), method="encoder+optimise", generator=rae_folder, steps=3,
                            max_mse=None) for _ in range(2))
    for a, b in zip(first, second):
        assert encode_members(a) == encode_members(b)  # shards of an invert recipe: byte-identical
        assert a.meta[SECONDS]["invert"] > 0 and SECONDS not in encode_members(a)["json"].decode()


def test_a_sample_that_does_not_converge_below_max_mse_fails_with_its_reason(rae_folder):
    out = invert(heldout_layouts(2), generator=rae_folder, steps=1, max_mse=1e-6)
    for s in out:
        assert not s.alive and s.meta["failed"]["stage"] == "invert"
        reason = s.meta["failed"]["reason"]
        assert "above max_mse 1e-06" in reason and "still falling" in reason and "raise steps" in reason, reason
        assert s.meta["inversion"]["converged"] is False


def test_an_image_of_the_wrong_size_fails_clearly_and_the_rest_goes_on(rae_folder):
    ok, small = heldout_layouts(2)
    small.image = small.image[:32, :32]
    out = invert([ok, small], method="encoder", generator=rae_folder, max_mse=None)
    assert out[0].alive
    reason = out[1].meta["failed"]["reason"]
    assert "takes 64x64x3" in reason and "32x32x3" in reason and "resize: 64" in reason, reason


def test_params_are_checked_before_any_model_loads(rae_folder):
    from actors.inverters import InvertParams
    from factory.stage import get_stage

    assert get_stage("invert").Params is InvertParams
    with pytest.raises(ValidationError, match="choose one of encoder, optimise, encoder\\+optimise, ddim"):
        InvertParams(method="gradient", generator=rae_folder)
    with pytest.raises(ValidationError, match="did you mean 'optimise'"):
        InvertParams(method="optimize", generator=rae_folder)
    with pytest.raises(ValidationError, match="does not exist"):
        InvertParams(generator="./models/nope")
    with pytest.raises(ValidationError, match="Stable Diffusion pipeline"):
        InvertParams(method="ddim", model="models/tiny-controlnet")
    # A ddim recipe needs no latent generator, and a latent one no diffusion model.
    assert InvertParams(method="ddim", generator="./models/nope").model == "models/tiny-sd"


def test_ddim_inversion_reconstructs_far_better_than_random_noise():
    from actors.inverters import Inverter
    from factory.latent.inversion import to_uint8

    samples = heldout_layouts(2)
    real = np.stack([s.image for s in samples])
    stage = Inverter({"method": "ddim", "ddim_steps": 5, "emit": "reconstruction", "max_mse": None}, "cpu")
    stage.process(samples)
    assert all(s.alive for s in samples), [s.meta.get("failed") for s in samples]
    inverted = psnr(to_tensor(np.stack([s.image for s in samples])), to_tensor(real))
    noise = stage.ddim.noise_like(real, [1, 2])
    random = psnr(to_tensor(to_uint8(stage.ddim.regenerate(noise, [s.meta["caption"] for s in samples], steps=5))),
                  to_tensor(real))
    assert (inverted > random + 4).all() and (inverted > 20).all(), (inverted, random)
    for s, p in zip(samples, inverted):
        inv = s.meta["inversion"]
        assert inv["method"] == "ddim" and inv["steps"] == 5 and abs(inv["psnr"] - p) < 0.5
        assert inv["vae_psnr"] >= inv["psnr"] - 1  # the VAE's round trip is the ceiling
        assert s.meta["_ddim_latent"]["shape"] == [4, 32, 32] and len(s.meta["_ddim_latent"]["values"]) == 4096
        assert s.meta["ops"][-1]["op"] == "invert"


def test_a_reconstruction_drops_the_mask_and_the_real_image_keeps_it(rae_folder):
    real = heldout_layouts(1)[0].mask
    kept = invert(heldout_layouts(1), method="encoder", generator=rae_folder, max_mse=None)[0]
    assert np.array_equal(kept.mask, real) and "labels_dropped" not in kept.meta["ops"][-1]
    recon = invert(heldout_layouts(1), method="encoder", generator=rae_folder, max_mse=None,
                   emit="reconstruction")[0]
    assert recon.alive and recon.mask is None and recon.meta["ops"][-1]["labels_dropped"] == ["mask"]


def test_a_sampled_image_drops_its_sources_mask(rae_folder):
    from actors.generators import LatentSampler

    s = heldout_layouts(1)[0]
    LatentSampler({"generator": rae_folder}, "cpu").process([s])
    assert s.image.shape == (64, 64, 3) and s.mask is None and s.density is None
    assert s.meta["ops"][-1]["op"] == "sample_latent" and s.meta["ops"][-1]["labels_dropped"] == ["mask"]
