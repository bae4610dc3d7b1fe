"""The training loop every `factory train` command shares.

accelerate handles the device, mixed precision and the checkpoint state
(models, optimiser, step); this loop adds what it does not: batches drawn from
a generator seeded by (seed, step), so a resumed run draws exactly the batches
an uninterrupted run would, periodic evaluation into a JSONL curve, and
keeping only the newest checkpoints.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

KEEP_CHECKPOINTS = 2


@dataclass
class TrainConfig:
    out: Path
    steps: int
    seed: int = 0
    lr: float = 1e-3
    checkpoint_every: int = 250
    eval_every: int = 500
    mixed_precision: str = "no"
    threads: int | None = None
    extra: dict = field(default_factory=dict)


def latest_checkpoint(out: Path) -> tuple[int, Path | None]:
    ckpts = sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:]))
    return (int(ckpts[-1].name[5:]), ckpts[-1]) if ckpts else (0, None)


def train(
    cfg: TrainConfig,
    modules: list[torch.nn.Module],
    loss_fn: Callable[[np.random.Generator, int], torch.Tensor],
    evaluate: Callable[[int], dict] | None = None,
    export: Callable[[], None] | None = None,
    log: Callable[[str], None] = print,
    state: list | tuple = (),
    on_step: Callable[[int], None] | None = None,
) -> None:
    """``state``: more objects with ``state_dict``/``load_state_dict`` (a discriminator and its
    optimiser, an EMA of the weights) that checkpoints carry and resume too. ``on_step(step)`` runs
    after each optimiser step (an EMA update)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg.out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    acc = Accelerator(mixed_precision=cfg.mixed_precision, project_dir=str(cfg.out))
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    # A module may learn slower than the others (``lr_scale``: ReDO's mask network moves at a
    # tenth of its generators' rate); one group otherwise, so older checkpoints still resume.
    scales = [float(getattr(m, "lr_scale", 1.0)) for m in modules]
    groups = params if all(s == 1.0 for s in scales) else [
        {"params": [p for p in m.parameters() if p.requires_grad], "lr": cfg.lr * s} for m, s in zip(modules, scales)]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=1e-4, betas=tuple(cfg.extra.get("betas", (0.9, 0.999))))
    # Warm-up then cosine decay to 10 %: a constant rate leaves small models
    # oscillating (a counter's exact rate jumped 87 % -> 0 % between evals).
    warm = min(100, cfg.steps // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps))))
    prepared = acc.prepare(*modules, opt, sched)
    modules, opt, sched = list(prepared[:-2]), prepared[-2], prepared[-1]
    if state:
        acc.register_for_checkpointing(*state)
    start, ckpt = latest_checkpoint(cfg.out)
    if ckpt is not None:
        acc.load_state(str(ckpt))
        log(f"resumed from {ckpt} (step {start})")
    (cfg.out / "config.json").write_text(json.dumps({k: str(v) for k, v in vars(cfg).items()}, indent=1))
    curve = (cfg.out / "curve.jsonl").open("a")
    losses: list[float] = []
    t0 = time.time()
    for step in range(start + 1, cfg.steps + 1):
        for m in modules:
            m.train()
        rng = np.random.default_rng([cfg.seed, step])
        loss = loss_fn(rng, step)
        acc.backward(loss)
        acc.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if on_step:
            on_step(step)
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == cfg.steps:  # the last step too: a short run reports its pace
            log(f"step {step}/{cfg.steps} loss {np.mean(losses[-50:]):.5f} ({(time.time() - t0) / (step - start):.2f} s/step)")
        last = step == cfg.steps
        if step % cfg.checkpoint_every == 0 or last:
            _save(acc, cfg.out, step)
        if evaluate and (step % cfg.eval_every == 0 or last):
            for m in modules:
                m.eval()
            with torch.no_grad():
                metrics = evaluate(step)
            row = {"step": step, "loss": float(np.mean(losses[-100:])), "seconds": round(time.time() - t0, 1), **metrics}
            curve.write(json.dumps(row) + "\n")
            curve.flush()
            log(f"eval {json.dumps(row)}")
    curve.close()
    if export:
        export()


def _save(acc, out: Path, step: int) -> None:
    path = out / "checkpoints" / f"step-{step}"
    acc.save_state(str(path))
    ckpts = sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:]))
    for old in ckpts[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
