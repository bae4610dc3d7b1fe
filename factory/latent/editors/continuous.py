"""Calibrated continuous controls (Plumerault et al., ICLR 2020; thesis Ch. 4).

Knobs in a generator's latent space for factors a pixel transform can apply: horizontal and
vertical shift, zoom, brightness. For each factor:

1. **Trajectories** (the paper's Algorithm 1, :func:`trajectories`): codes z0 from the prior;
   targets T_t(G(z0)) for t on a regular grid of N steps up to +-span; each target inverted
   from the previous step's code (warm start) by :func:`factory.latent.inversion.optimise_inversion`
   (a blurred, masked MSE, sigma 3 px, the mask leaving out the pixels the transform brought in
   from outside the frame; codes kept in the prior's norm ball). The worst ``drop`` share of the
   trajectories by final error is dropped.
2. **Direction** u: the first principal direction of the code differences z_k - z0.
3. **Calibration** t = g(<u, z>): a monotone piecewise-linear g, fitted on the differences
   (t_k = g(<u, z_k>) - g(<u, z0>)) by non-negative least squares on its slopes, and anchored
   by the factor measured from the pixels of the G(z0), so g also reads a code's current value.

An edit by t moves a code to z + (g^-1(g(<u, z>) + t) - <u, z>) u: (a) a shift by a requested
amount, (b) a value set (the current value read through g), (c) a value drawn from a
requested distribution. Amounts are physical: pixels for shifts (the ink barycentre), a
scale factor for zoom (the square root of the ink area), a mean-intensity change (0-1) for
brightness; internally zoom works on log scale factors, so its steps add up.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from factory.errors import FactoryError
from factory.latent.editors.common import ARTEFACT_VERSION, EditorFamily


@dataclass(frozen=True)
class Factor:
    """A factor a pixel transform applies: its unit, the span its trajectories cover by
    default (in its own units: px, a scale factor, an intensity change) and whether its
    amounts multiply (zoom) rather than add."""

    name: str
    unit: str
    span: float
    multiplicative: bool = False

    def internal(self, amount):
        """Physical amount -> the additive parameter trajectories and g work in."""
        a = np.asarray(amount, np.float64)
        if self.multiplicative:
            if np.any(a <= 0):
                raise FactoryError(f"a {self.name} amount is a scale factor > 0 (1.2 = 20 % larger), got {amount}")
            return np.log(a)
        return a

    def physical(self, t):
        t = np.asarray(t, np.float64)
        return np.exp(t) if self.multiplicative else t

    def range_text(self, lo: float, hi: float) -> str:
        return f"{self.physical(lo):.3g} to {self.physical(hi):.3g} {self.unit}"


FACTORS = {f.name: f for f in (
    Factor("x_shift", "px", 8.0),
    Factor("y_shift", "px", 8.0),
    # zoom about the image centre; span 1.3: trajectories from 1/1.3 to 1.3
    Factor("zoom", "x", 1.3, multiplicative=True),
    Factor("brightness", "(mean intensity, 0-1)", 0.2),
)}

# Hyper-parameters of the fit and their defaults; a spec carries them all (the cache key).
HYPER = {
    "trajectories": 64,    # codes z0, half moved towards +span and half towards -span
    "steps": 10,           # N: grid steps per trajectory
    "iters": 40,           # Adam steps per inversion (warm-started: each target is close to the last code)
    "lr": 0.02,
    "sigma": 3.0,          # px: the blur of the inversion's masked MSE
    "drop": 0.1,           # share of trajectories dropped, the worst by final error
    "knots": 6,            # segments of the piecewise-linear calibration
    "warm": 1.0,           # 1: warm start from the previous step's code; 0: every target from z0 (the baseline)
}


def refine_stages(art, dt) -> int:
    """Warm-started inversion steps for a change: as many as the fit took for it (span / steps each)."""
    per = float(art.stats["t_span"]) / int(art.spec["hyper"]["steps"])
    return max(1, math.ceil(float(np.max(np.abs(dt))) / per - 1e-9))
# Pixels whose colour is this far (RGB distance, 0-1 per channel) from the background are ink.
INK_DISTANCE = 0.25


def check_factor(name: str) -> Factor:
    if name not in FACTORS:
        raise FactoryError(f"no continuous direction for factor {name!r}: the continuous editor knows "
                           f"{', '.join(FACTORS)}")
    return FACTORS[name]


# --- the pixel transforms and the pixel measurements ---------------------------------------


def transform(x: torch.Tensor, factor: str, t) -> tuple[torch.Tensor, torch.Tensor]:
    """T_t(x) for images (n, 3, H, W) in [0, 1] and per-image parameters ``t`` (internal units),
    and the mask (n, 1, H, W) of the pixels that come from inside the original frame."""
    n, _, h, w = x.shape
    t = torch.as_tensor(np.broadcast_to(np.asarray(t, np.float32), (n,)).copy(), device=x.device)
    if factor == "brightness":
        return (x + t[:, None, None, None]).clamp(0, 1), torch.ones_like(x[:, :1])
    theta = torch.zeros(n, 2, 3, device=x.device)
    if factor in ("x_shift", "y_shift"):
        theta[:, 0, 0] = theta[:, 1, 1] = 1
        # output pixel p samples the input at p - t (normalised coordinates: 2 / size per px)
        if factor == "x_shift":
            theta[:, 0, 2] = -2 * t / w
        else:
            theta[:, 1, 2] = -2 * t / h
    elif factor == "zoom":
        theta[:, 0, 0] = theta[:, 1, 1] = torch.exp(-t)
    else:
        check_factor(factor)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    inside = F.grid_sample(torch.ones_like(x[:, :1]), grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)
    return y, (inside > 0.999).float()


def measure(images, mask: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """Per image, from pixels: the ink barycentre (cx, cy, px), the ink area (px) and the mean
    brightness (0-1). Ink: pixels at least INK_DISTANCE from the background colour (the
    median colour of the border); with a ``mask`` (n, 1, H, W), only where it is 1 (a
    transformed image's pixels from inside the frame; the rest reads as background)."""
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(
        np.asarray(images, np.float32) / 255).permute(0, 3, 1, 2)
    x = x.detach().float().cpu()
    n, _, h, w = x.shape
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], 2)
    bg = border.median(2).values
    ink = ((x - bg[:, :, None, None]).pow(2).sum(1).sqrt() > INK_DISTANCE).float()
    if mask is not None:
        ink = ink * mask.detach().float().cpu()[:, 0]
    area = ink.sum((1, 2))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32) + 0.5, torch.arange(w, dtype=torch.float32) + 0.5,
                            indexing="ij")
    safe = area.clamp_min(1)
    cx = (ink * xs).sum((1, 2)) / safe
    cy = (ink * ys).sum((1, 2)) / safe
    empty = area == 0
    cx[empty], cy[empty] = w / 2, h / 2
    return {"cx": cx.numpy(), "cy": cy.numpy(), "area": area.numpy(), "brightness": x.mean((1, 2, 3)).numpy()}


def factor_value(factor: str, m: dict[str, np.ndarray]) -> np.ndarray:
    """The factor in internal units from :func:`measure`'s numbers: px for shifts, the log of
    the ink's linear size (sqrt of its area) for zoom, the mean intensity for brightness."""
    if factor == "x_shift":
        return m["cx"].astype(np.float64)
    if factor == "y_shift":
        return m["cy"].astype(np.float64)
    if factor == "zoom":
        return np.log(np.sqrt(np.maximum(m["area"], 1.0)))
    return m["brightness"].astype(np.float64)


# --- trajectories (Algorithm 1) --------------------------------------------------------------


@dataclass
class Trajectories:
    """Per trajectory: codes z (n, N+1, d) from z0, their parameters t (n, N+1) (t[:, 0] = 0),
    the inversion error of each step (n, N) and the factor measured on G(z0) (n,)."""

    z: np.ndarray
    t: np.ndarray
    mse: np.ndarray
    value0: np.ndarray
    seconds: float


def trajectory_seeds(seed: int, n: int) -> list[int]:
    from factory.sample import sample_seed

    return [sample_seed(seed, f"continuous-fit-{i}") % (2**31) for i in range(n)]


def trajectories(generator, factor: str, n: int, span: float, steps: int = 10, iters: int = 40, lr: float = 0.02,
                 sigma: float = 3.0, warm: bool = True, seed: int = 0) -> Trajectories:
    """Algorithm 1: for codes z0 from the prior, targets T_{k span/N}(G(z0)), k = 1..N (every
    other trajectory towards -span), each inverted from the previous step's code (``warm``) or
    from z0, with the masked blurred MSE in the norm ball."""
    from factory.latent.inversion import optimise_inversion

    t0 = time.perf_counter()
    z0 = np.asarray(generator.sample_latents(trajectory_seeds(seed, n)), np.float32)
    radius = generator.latent_radius()
    with torch.no_grad():
        x0 = generator.synthesize(torch.from_numpy(z0).to(generator.device)).float()
    sign = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    zs, ts, errs = [z0], [np.zeros(n)], []
    for k in range(1, steps + 1):
        t = sign * span * k / steps
        target, mask = transform(x0, factor, t)
        start = zs[-1] if warm else z0
        res = optimise_inversion(generator, target, z0=start, steps=iters, lr=lr, sigma=sigma, mask=mask,
                                 radius=radius, tol=0.0)
        zs.append(res.z)
        ts.append(t)
        errs.append(res.mse)
    return Trajectories(np.stack(zs, 1), np.stack(ts, 1), np.stack(errs, 1),
                        factor_value(factor, measure(x0)), time.perf_counter() - t0)


# --- direction and calibration ---------------------------------------------------------------


def principal_direction(dz: np.ndarray, dt: np.ndarray) -> tuple[np.ndarray, float]:
    """The unit first principal direction of the code differences (uncentred: they start at 0),
    signed so that the projection grows with t, and the share of their energy it holds."""
    _, s, vt = np.linalg.svd(dz.astype(np.float64), full_matrices=False)
    u = vt[0]
    if np.dot(dz @ u, dt) < 0:
        u = -u
    return u.astype(np.float32), float(s[0] ** 2 / (s ** 2).sum())


def _segment_lengths(p: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """(len(p), K) how far p runs along each of the K segments between K+1 knots; the first
    and last segments extend beyond the knots (g extrapolates with their slopes)."""
    p = np.asarray(p, np.float64)[:, None]
    lo, hi = knots[None, :-1], knots[None, 1:]
    out = np.clip(p, lo, hi) - lo
    out[:, 0] = np.minimum(p[:, 0], knots[1]) - knots[0]
    out[:, -1] = np.maximum(p[:, 0], knots[-2]) - knots[-2] if len(knots) > 2 else p[:, 0] - knots[0]
    return out


@dataclass
class Calibration:
    """t = g(p) = offset + sum_j slope_j * (length of p along segment j): monotone piecewise-linear."""

    knots: np.ndarray
    slopes: np.ndarray
    offset: float

    def __call__(self, p) -> np.ndarray:
        return self.offset + _segment_lengths(np.atleast_1d(p), self.knots) @ self.slopes

    def inverse(self, t) -> np.ndarray:
        t = np.atleast_1d(np.asarray(t, np.float64))
        g = self(self.knots)
        p = np.interp(t, g, self.knots)
        below, above = t < g[0], t > g[-1]
        p[below] = self.knots[0] + (t[below] - g[0]) / self.slopes[0]
        p[above] = self.knots[-1] + (t[above] - g[-1]) / self.slopes[-1]
        return p


def fit_calibration(p0: np.ndarray, p: np.ndarray, dt: np.ndarray, start: np.ndarray, value0: np.ndarray,
                    segments: int = 6, ridge: float = 0.1) -> tuple[Calibration, dict]:
    """g from the differences: dt = g(p) - g(p0) for each step (p0 the projection of the step's
    trajectory start), slopes >= 0 by non-negative least squares; the offset puts g at the
    trajectory starts' projections (``start``) at the factor measured on their images
    (``value0``) on average."""
    from scipy.optimize import nnls

    allp = np.concatenate([p0, p])
    knots = np.unique(np.quantile(allp, np.linspace(0, 1, segments + 1)))
    if len(knots) < 2:
        raise FactoryError("the trajectories did not move along their direction: raise span or iters")
    a = _segment_lengths(p, knots) - _segment_lengths(p0, knots)
    # A ridge towards one common slope (the linear fit): with a few dozen noisy trajectories plain
    # NNLS put the whole change on one or two segments and made g a staircase.
    dp = p - p0
    common = max(float(dp @ dt) / max(float(dp @ dp), 1e-12), 0.0)
    lam = math.sqrt(ridge * float((a ** 2).sum(0).mean()))
    k = a.shape[1]
    slopes, _ = nnls(np.vstack([a, lam * np.eye(k)]), np.concatenate([dt, np.full(k, lam * common)]))
    floor = 1e-3 * max(float(slopes.max()), 1e-12)
    slopes = np.maximum(slopes, floor)  # strictly increasing: g has an inverse
    cal = Calibration(knots, slopes, 0.0)
    cal.offset = float(np.mean(value0 - cal(start)))
    resid = cal(p) - cal(p0) - dt
    return cal, {"knots": knots.tolist(), "slopes": slopes.tolist(), "offset": cal.offset,
                 "residual_rms": float(np.sqrt(np.mean(resid ** 2))), "dt_rms": float(np.sqrt(np.mean(dt ** 2)))}


def fit_continuous(generator, factor: str, hyper: dict, span: float, seed: int = 0) -> tuple[dict, dict]:
    """Trajectories, the worst ``drop`` dropped, u and g: the artefact's tensors and stats."""
    h = {**HYPER, **hyper}
    f = check_factor(factor)
    t_span = float(f.internal(span))
    tr = trajectories(generator, factor, int(h["trajectories"]), t_span, int(h["steps"]), int(h["iters"]), h["lr"],
                      h["sigma"], bool(h["warm"]), seed)
    return fit_trajectories(tr, factor, h, span)


def fit_trajectories(tr: Trajectories, factor: str, hyper: dict, span: float) -> tuple[dict, dict]:
    """u and g from trajectories, the worst ``drop`` share dropped by final error."""
    h = {**HYPER, **hyper}
    f = FACTORS[factor]
    t_span = float(f.internal(span))
    final = tr.mse[:, -1]
    keep = np.argsort(final)[: max(2, int(math.ceil(len(final) * (1 - h["drop"]))))]
    z, t = tr.z[keep], tr.t[keep]
    dz = (z[:, 1:] - z[:, :1]).reshape(-1, z.shape[2])
    dt = t[:, 1:].reshape(-1)
    u, explained = principal_direction(dz, dt)
    p0 = np.repeat(z[:, 0] @ u, z.shape[1] - 1)
    p = z[:, 1:].reshape(-1, z.shape[2]) @ u
    cal, cstats = fit_calibration(p0, p, dt, z[:, 0] @ u, tr.value0[keep], int(h["knots"]))
    # The naive baseline of the benchmark: least squares dz ~ dt * w, applied linearly (z + t*w).
    naive = (dz.T @ dt / max(float(dt @ dt), 1e-12)).astype(np.float32)
    allp = np.concatenate([z[:, 0] @ u, p])
    values = cal(np.array([allp.min(), allp.max()]))
    stats = {"method": "continuous", "factor": factor, "unit": f.unit, "span": span, "t_span": t_span,
             "trajectories": len(final), "kept": len(keep), "explained": explained,
             "final_mse_kept_max": float(final[keep].max()), "final_mse_median": float(np.median(final)),
             "step_mse_median": float(np.median(tr.mse)), "value0_mean": float(tr.value0.mean()),
             "value_range": [float(values[0]), float(values[1])], "trajectory_seconds": round(tr.seconds, 2),
             **cstats}
    tensors = {"u": torch.from_numpy(u), "knots": torch.from_numpy(cal.knots.astype(np.float64)),
               "slopes": torch.from_numpy(cal.slopes.astype(np.float64)),
               "offset": torch.tensor([cal.offset], dtype=torch.float64), "naive": torch.from_numpy(naive)}
    return tensors, stats


def calibration_of(art) -> Calibration:
    return Calibration(art.tensors["knots"].double().numpy(), art.tensors["slopes"].double().numpy(),
                       float(art.tensors["offset"][0]))


# --- specs, fitting through the artefact cache ----------------------------------------------


def continuous_spec(factor: str, generator: str, *, span: float | None = None, fit_seed: int = 0,
                    hyper: dict | None = None) -> dict:
    """The canonical spec of one fitted control: what decides it, defaults filled in."""
    f = check_factor(factor)
    unknown = set(hyper or {}) - set(HYPER)
    if unknown:
        raise FactoryError(f"unknown continuous hyper-parameters {sorted(unknown)}; known: {sorted(HYPER)}")
    span = float(f.span if span is None else span)
    f.internal(span)
    if not f.multiplicative and span <= 0 or f.multiplicative and span <= 1:
        raise FactoryError(f"span of {factor} must be {'> 1 (a scale factor)' if f.multiplicative else '> 0'}, "
                           f"got {span}")
    return {"version": ARTEFACT_VERSION, "editor": "continuous", "generator": generator, "factor": factor,
            "span": span, "fit_seed": int(fit_seed),
            "hyper": {k: type(v)((hyper or {}).get(k, v)) for k, v in HYPER.items()}}


def _fit(spec: dict, codes=None, device: str = "cpu") -> tuple[dict, dict]:
    from factory.latent.generator import load_generator

    if not spec.get("generator"):
        raise FactoryError("the continuous editor needs the generator in its spec: it inverts its images")
    generator = load_generator(spec["generator"], device)
    return fit_continuous(generator, spec["factor"], spec["hyper"], spec["span"], spec["fit_seed"])


# --- edits ------------------------------------------------------------------------------------


def shift_codes(art, z: torch.Tensor, dt) -> tuple[torch.Tensor, list]:
    """z + (g^-1(g(<u, z>) + dt) - <u, z>) u per code (dt in internal units), and per code None or
    why it was left unchanged: a change beyond the +-span the trajectories covered."""
    cal = calibration_of(art)
    u = art.tensors["u"].to(z.device).float()
    p = (z.float() @ u).detach().cpu().numpy().astype(np.float64)
    dt = np.broadcast_to(np.asarray(dt, np.float64), p.shape)
    reasons = [out_of_range(art, d) for d in dt]
    ok = np.array([r is None for r in reasons])
    step = np.where(ok, cal.inverse(cal(p) + dt) - p, 0.0)
    return z.float() + torch.from_numpy(step.astype(np.float32)).to(z.device)[:, None] * u, reasons


def out_of_range(art, dt: float) -> str | None:
    """Why a change of ``dt`` (internal units) is beyond the fitted range, or None."""
    span = float(art.stats["t_span"])
    if abs(dt) <= span + 1e-9:
        return None
    f = FACTORS[art.spec["factor"]]
    return (f"a {f.name} change of {fmt_change(f, dt)} is beyond the fitted range "
            f"{fmt_change(f, -span)} to {fmt_change(f, span)}: raise span and fit again")


def fmt_change(f: Factor, dt: float) -> str:
    return f"x{math.exp(dt):.3g}" if f.multiplicative else f"{dt:+.3g} {f.unit}"


def refine_codes(generator, z_source: torch.Tensor, z_start: torch.Tensor, factor: str, dt, stages: int = 2,
                 iters: int = 20, lr: float = 0.02, sigma: float = 3.0) -> tuple[torch.Tensor, np.ndarray]:
    """Codes whose images match T_dt(G(z_source)) on the pixels from inside the frame: Algorithm 1
    for one edit, warm-started at the calibrated direction's code ``z_start`` (or at z_source,
    whichever is closer to the full change) and reaching it in ``stages`` steps. The direction gives the start; the inversion makes the
    change exact where one global direction cannot (a grid code moves an object by writing
    other cells). Returns the codes and the masked MSE of the last step."""
    from factory.latent.inversion import optimise_inversion

    from factory.latent.inversion import masked_blur, masked_mse

    with torch.no_grad():
        x = generator.synthesize(z_source.float()).float()
        dt = np.broadcast_to(np.asarray(dt, np.float64), (len(x),))
        # Per code, the better start for the full change: the direction's code, or the source's
        # own (on the latent-ae a shift direction is a poor start: one direction cannot move every
        # scene's objects, and from its code the inversion got stuck at 8x the error).
        target, mask = transform(x, factor, dt)
        goal = masked_blur(target, mask, sigma)
        err = [masked_mse(masked_blur(generator.synthesize(c.float()), mask, sigma), goal, mask)
               for c in (z_start, z_source)]
        z = torch.where((err[0] <= err[1])[:, None], z_start.float(), z_source.float()).detach()
    mse = np.zeros(len(x))
    for k in range(1, stages + 1):
        target, mask = transform(x, factor, dt * k / stages)
        res = optimise_inversion(generator, target, z0=z, steps=iters, lr=lr, sigma=sigma, mask=mask, tol=0.0)
        z, mse = torch.from_numpy(res.z).to(z_start.device), res.mse
    return z, mse


def current_value(art, z: torch.Tensor) -> np.ndarray:
    """The factor a code shows, read through g (internal units)."""
    u = art.tensors["u"].to(z.device).float()
    return calibration_of(art)((z.float() @ u).detach().cpu().numpy())


def _step(art, z: torch.Tensor, target=None, check=None, place_check=None):
    """The step to the requested change ``target`` (per code, internal units): alpha 1 is the edit."""
    if target is None:
        raise FactoryError("a continuous edit needs the requested change of every code (internal units)")
    new, reasons = shift_codes(art, z, torch.as_tensor(target).detach().cpu().numpy())
    return new - z.float(), reasons, None


CONTINUOUS = EditorFamily("continuous", __name__, HYPER, _fit, _step, labelled=False)


# --- requested distributions ------------------------------------------------------------------


def sample_distribution(dist: dict, seeds: list[int]) -> np.ndarray:
    """One physical value per seed from a requested distribution: {uniform: [lo, hi]} (or
    {range: [lo, hi]}, the same), or {histogram: {edges: [...], weights: [...]}} (a bin drawn by
    its weight, then uniform within it)."""
    out = np.empty(len(seeds))
    for i, s in enumerate(seeds):
        rng = np.random.default_rng(int(s) % (2**63))
        if "histogram" in dist:
            edges = np.asarray(dist["histogram"]["edges"], np.float64)
            w = np.asarray(dist["histogram"]["weights"], np.float64)
            b = rng.choice(len(w), p=w / w.sum())
            out[i] = rng.uniform(edges[b], edges[b + 1])
        else:
            lo, hi = dist.get("uniform", dist.get("range"))
            out[i] = rng.uniform(lo, hi)
    return out


def move_points(points: list, boxes: list | None, factor: str, dt: float,
                size: tuple[int, int]) -> tuple[list, list | None, list[bool]]:
    """Points [x, y] and boxes [x0, y0, x1, y1] (px) under the transform T_dt, exactly: a shift adds
    dt, a zoom scales about the image centre by exp(dt). Boxes are clipped to the frame; a point
    the transform takes out of the frame is marked outside."""
    h, w = size

    def move(x, y):
        if factor == "x_shift":
            return x + dt, y
        if factor == "y_shift":
            return x, y + dt
        s = math.exp(dt)
        return w / 2 + s * (x - w / 2), h / 2 + s * (y - h / 2)

    moved = [[round(c, 3) for c in move(float(x), float(y))] for x, y in (pt[:2] for pt in points)]
    inside = [0 <= x < w and 0 <= y < h for x, y in moved]
    out_boxes = None
    if boxes is not None:
        out_boxes = []
        for b in boxes:
            x0, y0 = move(float(b[0]), float(b[1]))
            x1, y1 = move(float(b[2]), float(b[3]))
            out_boxes.append([round(min(max(x0, 0.0), w), 3), round(min(max(y0, 0.0), h), 3),
                              round(min(max(x1, 0.0), w), 3), round(min(max(y1, 0.0), h), 3)])
    return moved, out_boxes, inside
