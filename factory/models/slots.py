"""An object-slot scene model (after SPACE, Lin et al. ICLR 2020; thesis Ch. 5): a generator
whose code lists the objects, so that a count edit is switching one slot on or off.

The 64x64 scene is cut into a ``grid`` x ``grid`` grid of cells (8 x 8 cells of 8 px). Each
cell proposes ``slots_per_cell`` objects (K), each with

- ``pres``: presence, a Bernoulli (relaxed during training, 0/1 in a code);
- ``where``: 3 numbers before their squashing: the object's centre as an offset from the cell
  centre (tanh, up to ``reach`` cells either way) and the side of its square glimpse
  (sigmoid, ``min_side``-``max_side`` px);
- ``what``: the object VAE's code (``what_dim`` numbers), decoded to a ``glimpse`` x ``glimpse``
  RGB appearance and an alpha mask, pasted into the scene at its box by a spatial transformer.

A background module draws what no object covers from ``bg_dim`` numbers, at 4 x 4 px of
detail upsampled: it cannot draw a digit, so the objects must (SPACE's failure is a
background that learns the objects). The scene is the objects' alpha composite over it.

Why 8 px cells and K = 1: two digits of the world are at least 13 px apart centre to centre
(10 px glyphs, 3 px gaps), more than a cell's diagonal (11.3 px), so no cell ever holds two
centres; K > 1 is supported for worlds where one can.

Training (``factory train slots``) maximises the ELBO with a Gaussian likelihood
(sigma ``SIGMA``), KL terms against N(0, I) for where/what/bg and a Bernoulli prior of
low presence, plus the object-prior loss: a present object's alpha must be centred in its
glimpse and leave the glimpse's border empty, and the image itself must show background on
the glimpse's border, so boxes sit on whole objects rather than on halves of two (without the
image term, 2,000 steps split most digits between two vertically neighbouring cells, each
drawing half: every scene over-counted, 6 objects too many on average). At inference, duplicate proposals of one object by neighbouring cells are
removed (:meth:`SlotSceneModel.decompose`). After training, a learned autoregressive prior
over layouts and appearances (:class:`LayoutPrior`, a masked-conv net over the grid in raster
order, conditioned on the background code) is fitted on the encoded training scenes, so new
scenes can be drawn with plausible counts, spacing and one colour per scene.

The code a :class:`factory.latent.generator.Generator` sees is flat: ``bg_dim`` numbers,
then for each slot (cells in raster order, K per cell) ``1 + 3 + what_dim`` numbers
(pres, where, what); see :class:`SlotLayout`.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from factory.models.folder import read_kind_config, resolve_model_folder, save_model_folder

KIND = "slot-scene"
SIGMA = 0.15  # the likelihood's pixel noise, SPACE's value for its foreground
MAKE = "train one with `factory train slots` (e.g. models/slots)"


def _gn(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, c // 4) or 1, c)


@dataclass(frozen=True)
class SlotLayout:
    """Where each part sits in a flat slot code: ``bg_dim`` numbers, then ``n_slots`` rows of
    ``1 + 3 + what_dim`` (presence, where, what), cells in raster order, K per cell."""

    grid: int
    slots_per_cell: int
    what_dim: int
    bg_dim: int

    @property
    def n_slots(self) -> int:
        return self.grid * self.grid * self.slots_per_cell

    @property
    def slot_dim(self) -> int:
        return 4 + self.what_dim

    @property
    def latent_dim(self) -> int:
        return self.bg_dim + self.n_slots * self.slot_dim

    def split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(n, latent_dim) -> bg (n, B), pres (n, S), where (n, S, 3), what (n, S, D)."""
        bg = z[:, :self.bg_dim]
        slots = z[:, self.bg_dim:].reshape(len(z), self.n_slots, self.slot_dim)
        return bg, slots[..., 0], slots[..., 1:4], slots[..., 4:]

    def join(self, bg: torch.Tensor, pres: torch.Tensor, where: torch.Tensor, what: torch.Tensor) -> torch.Tensor:
        slots = torch.cat([pres[..., None], where, what], -1)
        return torch.cat([bg, slots.flatten(1)], 1)

    def cell_of(self, slot: int) -> tuple[int, int]:
        """(row, column) of the cell a slot belongs to."""
        cell = slot // self.slots_per_cell
        return cell // self.grid, cell % self.grid


class SlotSceneModel(nn.Module):
    def __init__(self, image_size: int = 64, grid: int = 8, slots_per_cell: int = 1, what_dim: int = 12,
                 bg_dim: int = 6, glimpse: int = 16, min_side: float = 8.0, max_side: float = 24.0,
                 reach: float = 0.75, width: int = 64):
        super().__init__()
        self.config = {"kind": KIND, "image_size": image_size, "grid": grid, "slots_per_cell": slots_per_cell,
                       "what_dim": what_dim, "bg_dim": bg_dim, "glimpse": glimpse, "min_side": min_side,
                       "max_side": max_side, "reach": reach, "width": width}
        self.image_size, self.grid, self.K = image_size, grid, slots_per_cell
        self.what_dim, self.bg_dim, self.glimpse = what_dim, bg_dim, glimpse
        self.min_side, self.max_side, self.reach = min_side, max_side, reach
        self.layout = SlotLayout(grid, slots_per_cell, what_dim, bg_dim)
        stages = int(round(math.log2(image_size // grid)))
        w = width
        # Image -> one feature vector per cell; 3 stride-2 stages, so each cell sees about 30 px
        # around it: enough for a whole 16 px digit whose centre lies in the cell.
        layers = [nn.Conv2d(3, w // 2, 3, padding=1), _gn(w // 2), nn.SiLU()]
        c = w // 2
        for _ in range(stages):
            layers += [nn.Conv2d(c, w, 4, stride=2, padding=1), _gn(w), nn.SiLU()]
            c = w
        layers += [nn.Conv2d(w, w, 3, padding=1), _gn(w), nn.SiLU()]
        self.cell_encoder = nn.Sequential(*layers)
        # Per slot: presence logit, where mean and log-std (3 + 3).
        self.cell_head = nn.Conv2d(w, slots_per_cell * 7, 1)
        # The object VAE: glimpse -> what (mean, log-var); what -> RGB + alpha glimpse.
        g = glimpse
        self.what_encoder = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.SiLU(),  # g/2
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),  # g/4
            nn.Flatten(), nn.Linear(64 * (g // 4) ** 2, 128), nn.SiLU(), nn.Linear(128, 2 * what_dim))
        self.what_decoder_fc = nn.Sequential(nn.Linear(what_dim, 128), nn.SiLU(), nn.Linear(128, 64 * (g // 4) ** 2))
        self.what_decoder = nn.Sequential(
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(32, 32, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(32, 4, 3, padding=1))
        # Background: the image seen at 8 x 8 -> bg code -> 3 x 4 x 4 colours, upsampled.
        self.bg_encoder = nn.Sequential(
            nn.AdaptiveAvgPool2d(8), nn.Flatten(), nn.Linear(3 * 64, 64), nn.SiLU(), nn.Linear(64, 2 * bg_dim))
        self.bg_decoder = nn.Sequential(nn.Linear(bg_dim, 64), nn.SiLU(), nn.Linear(64, 3 * 16))

    # --- geometry ------------------------------------------------------------------

    def cell_centres(self, device) -> torch.Tensor:
        """(S, 2) pixel (x, y) centre of each slot's cell."""
        cell = self.image_size / self.grid
        r = (torch.arange(self.grid, device=device, dtype=torch.float32) + 0.5) * cell
        cy, cx = torch.meshgrid(r, r, indexing="ij")
        centres = torch.stack([cx.flatten(), cy.flatten()], -1)
        return centres.repeat_interleave(self.K, 0)

    def boxes(self, where: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """where (n, S, 3) -> glimpse centres (n, S, 2) in px and sides (n, S) in px."""
        cell = self.image_size / self.grid
        centre = self.cell_centres(where.device) + self.reach * cell * torch.tanh(where[..., :2])
        side = self.min_side + (self.max_side - self.min_side) * torch.sigmoid(where[..., 2])
        return centre, side

    def _theta(self, centre: torch.Tensor, side: torch.Tensor, inverse: bool) -> torch.Tensor:
        """Affine matrices (N, 2, 3) of the spatial transformer, in [-1, 1] coordinates."""
        half = self.image_size / 2
        c = centre / half - 1
        s = side / self.image_size
        theta = torch.zeros(len(s), 2, 3, device=s.device)
        if inverse:  # image coordinates -> glimpse coordinates: paste
            theta[:, 0, 0] = theta[:, 1, 1] = 1 / s
            theta[:, :, 2] = -c / s[:, None]
        else:  # glimpse coordinates -> image coordinates: crop
            theta[:, 0, 0] = theta[:, 1, 1] = s
            theta[:, :, 2] = c
        return theta

    def crop(self, x: torch.Tensor, centre: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        """Glimpses (n*S, 3, g, g) of images (n, 3, H, W) at boxes (n, S, .)."""
        n, S = side.shape
        theta = self._theta(centre.reshape(-1, 2), side.reshape(-1), inverse=False)
        grid = F.affine_grid(theta, (n * S, 3, self.glimpse, self.glimpse), align_corners=False)
        src = x[:, None].expand(-1, S, -1, -1, -1).reshape(n * S, *x.shape[1:])
        return F.grid_sample(src, grid, align_corners=False)

    def paste(self, glimpses: torch.Tensor, centre: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        """Glimpses (n*S, C, g, g) -> (n, S, C, H, W), zero outside each box."""
        n, S = side.shape
        theta = self._theta(centre.reshape(-1, 2), side.reshape(-1), inverse=True)
        grid = F.affine_grid(theta, (n * S, glimpses.shape[1], self.image_size, self.image_size), align_corners=False)
        out = F.grid_sample(glimpses, grid, align_corners=False)
        return out.reshape(n, S, glimpses.shape[1], self.image_size, self.image_size)

    # --- the parts -----------------------------------------------------------------

    def encode_cells(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images -> presence logits (n, S), where mean and log-std (n, S, 3) each."""
        h = self.cell_head(self.cell_encoder(x * 2 - 1))  # (n, K*7, G, G)
        n = len(x)
        h = h.reshape(n, self.K, 7, self.grid, self.grid).permute(0, 3, 4, 1, 2).reshape(n, -1, 7)
        return h[..., 0], h[..., 1:4], h[..., 4:7].clamp(-6, 2)

    def encode_what(self, glimpses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.what_encoder(glimpses * 2 - 1).chunk(2, -1)
        return mu, logvar.clamp(-8, 4)

    def decode_what(self, what: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """what (N, D) -> RGB (N, 3, g, g) and alpha (N, 1, g, g), both in [0, 1]."""
        q = self.glimpse // 4
        h = self.what_decoder(self.what_decoder_fc(what).reshape(-1, 64, q, q))
        return torch.sigmoid(h[:, :3]), torch.sigmoid(h[:, 3:])

    def encode_bg(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.bg_encoder(x * 2 - 1).chunk(2, -1)
        return mu, logvar.clamp(-8, 4)

    def decode_bg(self, bg: torch.Tensor) -> torch.Tensor:
        rgb = torch.sigmoid(self.bg_decoder(bg)).reshape(-1, 3, 4, 4)
        return F.interpolate(rgb, size=self.image_size, mode="bilinear", align_corners=False)

    def render(self, bg: torch.Tensor, pres: torch.Tensor, where: torch.Tensor, what: torch.Tensor,
               with_layers: bool = False):
        """Codes -> images (n, 3, H, W) in [0, 1]; with_layers also returns each slot's pasted alpha
        (n, S, H, W) times its presence and the glimpse alphas (n*S, 1, g, g)."""
        n, S = pres.shape
        centre, side = self.boxes(where)
        rgb, alpha = self.decode_what(what.reshape(n * S, -1))
        pasted = self.paste(torch.cat([rgb * alpha, alpha], 1), centre, side)  # premultiplied colour
        a = pasted[:, :, 3] * pres[..., None, None]  # (n, S, H, W)
        colour = (pasted[:, :, :3] * pres[..., None, None, None]).sum(1)
        # Objects of the world do not overlap; where proposals do, the union's alpha is
        # 1 - prod(1 - a) and the colour their alpha-weighted mean.
        cover = 1 - torch.prod(1 - a.clamp(0, 1), 1)
        fg = colour / a.sum(1, keepdim=True).clamp_min(1e-4)
        image = cover[:, None] * fg + (1 - cover[:, None]) * self.decode_bg(bg)
        if with_layers:
            return image.clamp(0, 1), a, alpha
        return image.clamp(0, 1)

    # --- training ------------------------------------------------------------------

    def elbo_terms(self, x: torch.Tensor, tau: float, prior_pres: float, generator: torch.Generator | None = None) -> dict:
        """The loss terms of one training batch, each a mean over its images."""
        n = len(x)
        logits, w_mu, w_logstd = self.encode_cells(x)
        noise = lambda t: torch.randn(t.shape, generator=generator, device=t.device)  # noqa: E731
        where = w_mu + noise(w_mu) * w_logstd.exp()
        centre, side = self.boxes(where)
        glimpses = self.crop(x, centre, side)
        q_mu, q_logvar = self.encode_what(glimpses)
        what = q_mu + noise(q_mu) * (0.5 * q_logvar).exp()
        b_mu, b_logvar = self.encode_bg(x)
        bg = b_mu + noise(b_mu) * (0.5 * b_logvar).exp()
        # Relaxed Bernoulli (binary Concrete) presence.
        u = torch.rand(logits.shape, generator=generator, device=x.device).clamp(1e-6, 1 - 1e-6)
        pres = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)
        image, _, alpha = self.render(bg, pres, where, what.reshape(n, -1, self.what_dim), with_layers=True)
        nll = ((image - x) ** 2).sum((1, 2, 3)) / (2 * SIGMA**2)
        # The glimpse's border must look like background in the *image*: a box that cuts through
        # an object (two slots each drawing half a digit) sees ink on its edge. In the likelihood's
        # nats, per glimpse.
        bg_glimpses = self.crop(self.decode_bg(bg), centre, side)
        border = (ring(self.glimpse, BORDER, x.device) * ((glimpses - bg_glimpses) ** 2).sum(1)).sum((1, 2))
        border = (border / (2 * SIGMA**2)).reshape(n, -1)
        q = torch.sigmoid(logits).clamp(1e-5, 1 - 1e-5)
        kl_pres = (q * torch.log(q / prior_pres) + (1 - q) * torch.log((1 - q) / (1 - prior_pres))).sum(1)
        kl_where = (0.5 * (w_mu**2 + (2 * w_logstd).exp()) - w_logstd - 0.5).sum(-1)
        kl_what = (0.5 * (q_mu**2 + q_logvar.exp() - q_logvar - 1)).sum(-1).reshape(n, -1)
        kl_bg = (0.5 * (b_mu**2 + b_logvar.exp() - b_logvar - 1)).sum(-1)
        return {"nll": nll.mean(), "kl_pres": kl_pres.mean(), "kl_where": (q * kl_where).sum(1).mean(),
                "kl_what": (q * kl_what).sum(1).mean(), "kl_bg": kl_bg.mean(),
                "object_prior": (q * object_prior(alpha).reshape(n, -1)).sum(1).mean(),
                # presence detached: the border term moves boxes (and teaches the background), it
                # does not switch slots off (early on, before the background is learnt, it would
                # switch them all off)
                "border": (q.detach() * border).sum(1).mean()}

    # --- inference -------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, x: torch.Tensor, threshold: float = 0.5, iou: float = 0.3) -> torch.Tensor:
        """Images -> flat codes: posterior means, presence 0/1 after duplicate removal."""
        logits, w_mu, _ = self.encode_cells(x)
        centre, side = self.boxes(w_mu)
        q_mu, _ = self.encode_what(self.crop(x, centre, side))
        bg, _ = self.encode_bg(x)
        what = q_mu.reshape(len(x), -1, self.what_dim)
        prob = torch.sigmoid(logits)
        pres = (prob > threshold).float()
        pres = self.remove_duplicates(pres, prob, w_mu, what, iou)
        return self.layout.join(bg, pres, w_mu, what)

    def remove_duplicates(self, pres, prob, where, what, iou: float) -> torch.Tensor:
        """Presence with proposals of one object by two cells (at cell borders) cut to one: of two
        present slots whose drawn objects' boxes overlap by more than ``iou``, the less sure goes."""
        boxes = self.object_boxes(pres, where, what)
        keep = pres.clone()
        for b in range(len(pres)):
            on = [int(i) for i in torch.argsort(prob[b], descending=True) if pres[b, i] > 0]
            kept: list[int] = []
            for i in on:
                if any(box_iou(boxes[b, i], boxes[b, j]) > iou for j in kept):
                    keep[b, i] = 0
                else:
                    kept.append(i)
        return keep

    @torch.no_grad()
    def object_boxes(self, pres: torch.Tensor, where: torch.Tensor, what: torch.Tensor,
                     threshold: float = 0.5) -> torch.Tensor:
        """(n, S, 4) pixel boxes x0, y0, x1, y1 (exclusive) of each slot's drawn alpha above
        ``threshold`` (tight, like the world's ink boxes); zeros where a slot draws nothing."""
        n, S = pres.shape
        on = pres > 0
        out = torch.zeros(n, S, 4)
        if not on.any():
            return out
        # Only present slots are drawn (about one in ten): pasting all 64 per scene dominated the cost.
        centre, side = self.boxes(where)
        _, alpha = self.decode_what(what[on])
        a = self.paste(alpha, centre[on][None], side[on][None])[0, :, 0] > threshold  # (P, H, W)
        ys, xs = a.any(2), a.any(1)  # (P, H), (P, W)

        def span(v):  # first and one past the last True along the last axis
            first = v.float().argmax(-1)
            last = v.shape[-1] - v.flip(-1).float().argmax(-1)
            return first.float(), last.float()

        y0, y1 = span(ys)
        x0, x1 = span(xs)
        boxes = torch.stack([x0, y0, x1, y1], -1)
        out[on] = torch.where(ys.any(-1)[:, None], boxes, torch.zeros_like(boxes)).cpu()
        return out

    @torch.no_grad()
    def slot_alphas(self, z: torch.Tensor) -> torch.Tensor:
        """(n, S, H, W) each slot's pasted alpha times its presence, for codes z."""
        bg, pres, where, what = self.layout.split(z)
        return self.render(bg, pres, where, what, with_layers=True)[1]

    def synthesize(self, z: torch.Tensor) -> torch.Tensor:
        bg, pres, where, what = self.layout.split(z)
        return self.render(bg, pres, where, what)

    @torch.no_grad()
    def foreground(self, images) -> np.ndarray:
        """Foreground probability (B, H, W) float32 of images (uint8 (B, H, W, 3) or float (B, 3, H, W)):
        the union of the decomposition's object alphas, 1 - prod(1 - a_i). With it the slot model is
        a mask model learnt without masks, for the `segment` stage, like ReDO's."""
        from factory.models.folder import image_batch

        def mismatch(w: int, h: int) -> str:
            return (f"images are {w}x{h} but the slot model was trained on {self.image_size}x{self.image_size} "
                    f"images: resize the samples with an `augment` stage (resize: {self.image_size})")

        x = image_batch(images, self, self.image_size, mismatch)
        a = self.slot_alphas(self.encode(x)).clamp(0, 1)
        return (1 - torch.prod(1 - a, 1)).cpu().numpy().astype(np.float32)

    # --- folder ------------------------------------------------------------------------

    def save_pretrained(self, folder, extra: dict | None = None, prior: "LayoutPrior | None" = None) -> None:
        cfg = {**self.config, **(extra or {})}
        state = dict(self.state_dict())
        if prior is not None:
            cfg["prior"] = prior.config
            state.update({f"prior.{k}": v for k, v in prior.state_dict().items()})
        save_model_folder(folder, cfg, state, torch.float16)

    @classmethod
    def from_pretrained(cls, ref, device: str = "cpu") -> "SlotSceneModel":
        from safetensors.torch import load_file

        from factory.models.folder import WEIGHTS

        folder = resolve_model_folder(ref, "slot scene model")
        cfg = read_config(folder)
        arch = {k: v for k, v in cfg.items() if k in inspect.signature(cls).parameters}
        model = cls(**arch)
        state = {k: v.float() for k, v in load_file(str(folder / WEIGHTS)).items()}
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("prior.")})
        model.meta = {k: v for k, v in cfg.items() if k not in arch}
        model.prior = None
        if "prior" in cfg:
            model.prior = LayoutPrior(**{k: v for k, v in cfg["prior"].items() if k != "kind"})
            model.prior.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("prior.")})
            model.prior.to(device).eval()
        return model.to(device).eval()


def read_config(folder) -> dict:
    return read_kind_config(folder, KIND, "slot scene model", "slot scene model", MAKE)


BORDER = 2  # px of a glimpse's edge (at glimpse resolution) that must hold no object


def ring(g: int, border: int, device=None) -> torch.Tensor:
    """(g, g) ones on the outer ``border`` px of a glimpse, zeros inside."""
    r = torch.ones(g, g, device=device)
    r[border:-border, border:-border] = 0
    return r


def object_prior(alpha: torch.Tensor, border: int = BORDER) -> torch.Tensor:
    """The object-prior loss of each glimpse (N, 1, g, g): its alpha's centre of mass away from the
    glimpse centre (in glimpse halves, squared) plus the share of its alpha on the outer ``border``
    px, so a box sits centred on one whole object."""
    g = alpha.shape[-1]
    a = alpha[:, 0]
    mass = a.sum((1, 2)).clamp_min(1e-3)
    r = (torch.arange(g, device=a.device, dtype=torch.float32) + 0.5) / g * 2 - 1
    cx = (a.sum(1) * r).sum(1) / mass
    cy = (a.sum(2) * r).sum(1) / mass
    return cx**2 + cy**2 + (a * ring(g, border, a.device)).sum((1, 2)) / mass


def box_iou(a, b) -> float:
    ix = max(0.0, float(min(a[2], b[2]) - max(a[0], b[0])))
    iy = max(0.0, float(min(a[3], b[3]) - max(a[1], b[1])))
    inter = ix * iy
    union = float((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])) - inter
    return inter / union if union > 0 else 0.0


# --- the learned prior over layouts ---------------------------------------------------------

class MaskedConv(nn.Conv2d):
    """A PixelCNN convolution: a cell sees only the cells before it in raster order (and itself
    when ``include_centre``), so the grid can be sampled one cell at a time."""

    def __init__(self, cin: int, cout: int, k: int, include_centre: bool):
        super().__init__(cin, cout, k, padding=k // 2)
        mask = torch.ones_like(self.weight)
        c = k // 2
        mask[:, :, c, c + (1 if include_centre else 0):] = 0
        mask[:, :, c + 1:] = 0
        self.register_buffer("mask", mask)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class LayoutPrior(nn.Module):
    """p(scene) p(slots | scene): a scene is drawn top-down, then its cells one at a time.

    First the scene-level variables: the object count n from its training frequencies
    (``count_probs``), and the background code with the scene's *style* (the mean appearance code
    of its objects: their colour) from one Gaussian fitted on the training scenes (``scene_mean``,
    ``scene_chol``), so the objects' colour goes with the background's as the world pairs them.
    Then each cell's slots (presence, where, what) given the cells before it in raster order and
    those scene variables: a masked-convolution net (PixelCNN-style), Gaussian where/what given
    presence. Why the scene level: a raster-order net sees only the cells near the one it draws,
    so on its own it could hold neither the count (scenes of 0 and 16 objects) nor one colour per
    scene (colours drifted from one object to the next)."""

    def __init__(self, grid: int, slots_per_cell: int, what_dim: int, bg_dim: int, width: int = 64):
        super().__init__()
        self.config = {"kind": "layout-prior", "grid": grid, "slots_per_cell": slots_per_cell,
                       "what_dim": what_dim, "bg_dim": bg_dim, "width": width}
        self.grid, self.K, self.what_dim, self.bg_dim = grid, slots_per_cell, what_dim, bg_dim
        self.n_slots = grid * grid * slots_per_cell
        cin = slots_per_cell * (4 + what_dim)
        self.out_per_slot = 1 + 2 * (3 + what_dim)
        self.first = MaskedConv(cin, width, 5, include_centre=False)
        self.scene_in = nn.Linear(bg_dim + what_dim, width)
        self.count_in = nn.Embedding(self.n_slots + 1, width)
        self.body = nn.ModuleList([MaskedConv(width, width, 3, include_centre=True) for _ in range(4)])
        self.head = nn.Conv2d(width, slots_per_cell * self.out_per_slot, 1)
        self.register_buffer("count_probs", torch.full((self.n_slots + 1,), 1.0 / (self.n_slots + 1)))
        self.register_buffer("scene_mean", torch.zeros(bg_dim + what_dim))
        self.register_buffer("scene_chol", torch.eye(bg_dim + what_dim))

    @staticmethod
    def scene_of(pres, what) -> tuple[torch.Tensor, torch.Tensor]:
        """The scene variables of codes: object counts (n,) and styles (n, D), the mean what of the
        present slots (zeros for a scene without objects)."""
        count = (pres > 0.5).sum(1)
        style = (what * pres[..., None]).sum(1) / count.clamp_min(1)[:, None]
        return count, style

    def fit_scene(self, bg, pres, what) -> None:
        """The scene-level distributions, from training codes."""
        count, style = self.scene_of(pres, what)
        freq = torch.bincount(count, minlength=self.n_slots + 1).float()[: self.n_slots + 1]
        self.count_probs.copy_(freq / freq.sum())
        v = torch.cat([bg, style], 1)
        mean = v.mean(0)
        self.scene_mean.copy_(mean)
        self.scene_chol.copy_(torch.linalg.cholesky(torch.cov((v - mean).T) + 1e-4 * torch.eye(v.shape[1])))

    def grid_of(self, pres, where, what) -> torch.Tensor:
        n = len(pres)
        slots = torch.cat([pres[..., None], where, what], -1)  # (n, S, 4 + D)
        return slots.reshape(n, self.grid, self.grid, -1).permute(0, 3, 1, 2)

    def forward(self, bg, pres, where, what, count=None, style=None):
        """Per slot: presence logit (n, S), where mean/log-std (n, S, 3), what mean/log-std (n, S, D).
        ``count`` and ``style`` default to those of the codes (teacher forcing, in training)."""
        if count is None:
            count, style = self.scene_of(pres, what)
        cond = self.scene_in(torch.cat([bg, style], 1)) + self.count_in(count.clamp(0, self.n_slots))
        h = F.silu(self.first(self.grid_of(pres, where, what)) + cond[:, :, None, None])
        for layer in self.body:
            h = h + F.silu(layer(h))
        out = self.head(h)  # (n, K*O, G, G)
        n = len(bg)
        out = out.reshape(n, self.K, self.out_per_slot, self.grid, self.grid).permute(0, 3, 4, 1, 2)
        out = out.reshape(n, -1, self.out_per_slot)
        d = self.what_dim
        return (out[..., 0], out[..., 1:4], out[..., 4:7].clamp(-5, 2), out[..., 7:7 + d],
                out[..., 7 + d:].clamp(-5, 2))

    def nll(self, bg, pres, where, what) -> torch.Tensor:
        """Mean negative log-likelihood per scene of codes whose absent slots are zeroed
        (:meth:`sample` draws them so): presence everywhere, where and what where present."""
        logit, wm, ws, qm, qs = self(bg, pres, where, what)
        n_pres = F.binary_cross_entropy_with_logits(logit, pres, reduction="none").sum(1)

        def gauss(x, m, logstd):
            return (0.5 * ((x - m) / logstd.exp()) ** 2 + logstd).sum(-1)

        n_obj = ((gauss(where, wm, ws) + gauss(what, qm, qs)) * pres).sum(1)
        return (n_pres + n_obj).mean()

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """n codes (bg, pres, where, what), one cell at a time in raster order."""
        dev = self.scene_mean.device
        count = torch.multinomial(self.count_probs.cpu(), n, replacement=True, generator=generator).to(dev)
        scene = self.scene_mean + torch.randn(n, len(self.scene_mean), generator=generator).to(dev) @ self.scene_chol.T
        bg, style = scene[:, :self.bg_dim], scene[:, self.bg_dim:]
        S = self.n_slots
        pres = torch.zeros(n, S, device=dev)
        where = torch.zeros(n, S, 3, device=dev)
        what = torch.zeros(n, S, self.what_dim, device=dev)
        for cell in range(self.grid * self.grid):
            logit, wm, ws, qm, qs = self(bg, pres, where, what, count, style)
            for k in range(self.K):
                s = cell * self.K + k
                u = torch.rand(n, generator=generator).to(dev)
                pres[:, s] = (u < torch.sigmoid(logit[:, s])).float()
                on = pres[:, s, None]  # absent slots stay zero, as in the codes the prior was fitted on
                where[:, s] = on * (wm[:, s] + ws[:, s].exp() * torch.randn(n, 3, generator=generator).to(dev))
                what[:, s] = on * (qm[:, s] + qs[:, s].exp() * torch.randn(n, self.what_dim, generator=generator).to(dev))
        return bg, pres, where, what
