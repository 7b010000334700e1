"""Approach 7: diffusion-guided adaptive sampling. A score-based field (approach 3's
ScoreField) is the prior; its samples conditioned on the queries so far give an importance
map (their variance: where the model is unsure), the next queries go where it is highest,
the field (the posterior mean) is updated, and the loop repeats.

Shapes: the unknown signal lives on the prior's grid of G points; a query reads one grid
entry of the truth. values / truth [B, G], mask (queried so far) [B, G] bool.

    round r:  K samples x^(k) ~ p(x | queried values)   (ScoreField.sample: the network
                                                          reads the queries, which are
                                                          clamped)
              field      mean_k D(q; x^(k), 0, y)        [B, N], at any resolution, through
                                                          the queried values
              importance var_k x^(k), 0 where queried     [B, G]
              queries    the `per_round` largest entries, greedily, each suppressing its
                         neighbours within `spacing` grid points (no clustered queries)
    baselines: the same field, fitted the same way, from queries of the same counts that
              ignore the model: evenly spaced (a fresh evenly spaced set per count) or
              random (uniformly drawn unqueried points added per round).

Where a signal has localised detail (a narrow bump at an unknown place), the samples
disagree around it once a query has touched it, so the queries gather there; evenly spaced
queries need a spacing finer than the detail everywhere. query_curves measures both: the
field's error per query count, and so the queries each needs to reach the same error.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from .blocks import FieldModel, check_shape, plot_rows, train_loop
from .latent_field import signal_grid
from .score_field import ScoreField

APPROACH = 7


def bump_signals(n: int, length: int, generator=None, widths: Tuple[float, float] = (0.02, 0.05),
                 background: Tuple[float, float] = (0.05, 0.25)) -> torch.Tensor:
    """Smooth background a sin(pi f x + phi) (a in `background`, f in [0.5, 1.5]) plus one
    narrow Gaussian bump b exp(-(x - c)^2 / (2 w^2)) (w in `widths`, |b| in [0.6, 1.2], c in
    [-0.8, 0.8]) on linspace(-1, 1, length): [n, length]. The defaults put the detail
    below what evenly spaced queries resolve until they are dense (w of 0.6 to 1.6 spacings
    of a 64-point grid) over a background that few queries pin down."""
    x = signal_grid(length).squeeze(-1)

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(n, 1, generator=generator)

    background = u(*background) * torch.sin(math.pi * u(0.5, 1.5) * x + u(0, 2 * math.pi))
    sign = torch.where(torch.rand(n, 1, generator=generator) < 0.5, -1.0, 1.0)
    bump = sign * u(0.6, 1.2) * torch.exp(-(x - u(-0.8, 0.8)) ** 2 / (2 * u(*widths) ** 2))
    return background + bump


def evenly_spaced(batch: int, grid: int, count: int, device=None) -> torch.Tensor:
    """The plain baseline's queries: `count` evenly spaced grid points, bool [batch, grid]."""
    if not 1 <= count <= grid:
        raise ValueError(f"count must be in 1..{grid}, got {count}")
    mask = torch.zeros(batch, grid, dtype=torch.bool, device=device)
    mask[:, torch.linspace(0, grid - 1, count).round().long()] = True
    return mask


BASELINES = ("evenly spaced", "random")


class AdaptiveField(FieldModel):
    """Approach 7: a ScoreField prior (keyword sizes as ScoreField's) and the query loop.

    Args:
        draws: K, conditioned samples per round. per_round: queries per round.
        spacing: a query suppresses importance within this many grid points.
        **prior: ScoreField's arguments (grid, channels, width, dilations, timesteps, ...);
            max_observed defaults to 0.75 here: the loop conditions on up to most of the grid.
    """

    def __init__(self, draws: int = 4, per_round: int = 4, spacing: int = 2, **prior):
        super().__init__()
        if draws < 2:
            raise ValueError(f"draws must be >= 2 (a variance needs two samples), got {draws}")
        if per_round < 1 or spacing < 0:
            raise ValueError(f"per_round must be >= 1 and spacing >= 0, got {per_round}, {spacing}")
        prior.setdefault("max_observed", 0.75)
        self.prior = ScoreField(**prior)
        self.config = dict(draws=draws, per_round=per_round, spacing=spacing, **self.prior.config)
        self.grid = self.prior.grid

    def loss(self, signals: torch.Tensor, generator=None) -> torch.Tensor:
        """The prior's denoising score matching loss (see ScoreField.loss)."""
        return self.prior.loss(signals, generator)

    training_step = loss

    # -------------------------------------------------------------------- the loop

    @torch.no_grad()
    def posterior(self, values: torch.Tensor, mask: torch.Tensor, generator=None) -> torch.Tensor:
        """K grid states conditioned on the queried entries: [K, B, G]."""
        check_shape(values, "values", (None, self.grid), f"[B, {self.grid}]")
        check_shape(mask, "mask", tuple(values.shape), f"[{values.shape[0]}, {self.grid}]")
        K, B = self.config["draws"], values.shape[0]
        states = self.prior.sample(K * B, observations=(values.repeat(K, 1), mask.repeat(K, 1)),
                                   generator=generator)
        return states.view(K, B, self.grid)

    def importance(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The importance map: the samples' variance, 0 where already queried, [B, G]."""
        return states.var(0).masked_fill(mask, 0.0)

    def propose(self, importance: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The next queries: mask with `per_round` more entries per row (greedy maxima,
        neighbours within `spacing` suppressed; never an entry already queried)."""
        score = importance.masked_fill(mask, -1.0).clone()
        new = mask.clone()
        s = self.config["spacing"]
        rows = torch.arange(mask.shape[0], device=mask.device)
        for _ in range(self.config["per_round"]):
            pick = score.argmax(1)
            ok = score[rows, pick] >= 0  # a row with nothing left to query keeps its mask
            new[rows[ok], pick[ok]] = True
            for d in range(-s, s + 1):
                score[rows, (pick + d).clamp(0, self.grid - 1)] = -1.0
            score = score.masked_fill(new, -1.0)
        return new

    def decode(self, states: torch.Tensor, coords, observations=None) -> torch.Tensor:
        """The field (mean over the K samples' fields) at any coords: states [K, B, G] ->
        [B, N]. observations: the (values, mask) [B, G] the states were drawn with, so each
        sample's field goes through the queried values (ScoreField.decode)."""
        K, B, G = states.shape
        if observations is not None:
            values, mask = self.prior.check_observations(observations, B)
            observations = (values.repeat(K, 1), mask.repeat(K, 1))
        return self.prior.decode(states.reshape(K * B, G), coords, observations).view(K, B, -1).mean(0)

    def run(self, truth: Callable[[torch.Tensor], torch.Tensor], initial: torch.Tensor, rounds: int,
            generator=None, uniform: Union[bool, str] = False) -> List[dict]:
        """The adaptive loop, or a uniform baseline of the same query counts fitted the same
        way (the same K conditioned samples, the same decode): uniform=True or "evenly
        spaced" queries (a fresh evenly spaced set each round), or "random" (each round adds
        `per_round` unqueried entries drawn uniformly). truth(mask) -> the true grid values
        [B, G] (read only where mask is True: each True entry is one field query). initial:
        the first queries, bool [B, G]. Returns per round {'queries': per-row counts [B],
        'states': [K, B, G], 'mask', 'values'}."""
        check_shape(initial, "initial", (None, self.grid), f"[B, {self.grid}]")
        baseline = "evenly spaced" if uniform is True else (uniform or None)
        if baseline is not None and baseline not in BASELINES:
            raise ValueError(f"uniform must be False, True or one of {BASELINES}, got {uniform!r}")
        mask, history = initial.clone(), []
        for r in range(rounds + 1):
            values = torch.where(mask, truth(mask), 0.0)
            states = self.posterior(values, mask, generator)
            history.append({"queries": mask.sum(1), "states": states, "mask": mask, "values": values})
            if r == rounds:
                break
            if baseline == "evenly spaced":
                count = int(mask.sum(1).max()) + self.config["per_round"]
                mask = evenly_spaced(mask.shape[0], self.grid, min(count, self.grid), mask.device)
            elif baseline == "random":
                mask = random_more(mask, self.config["per_round"], generator)
            else:
                mask = self.propose(self.importance(states, mask), mask)
        return history


def random_more(mask: torch.Tensor, count: int, generator=None) -> torch.Tensor:
    """mask with `count` more entries per row, drawn uniformly from the unqueried ones."""
    u = torch.rand(mask.shape, device=mask.device, generator=generator).masked_fill(mask, -1.0)
    picks = u.topk(min(count, mask.shape[1]), dim=1)
    new = mask.clone()
    new.scatter_(1, picks.indices, picks.values >= 0)  # a full row gains nothing
    return new | mask


# ------------------------------------------------------------------------------ demo


def queries_to_reach(errors: Sequence[float], counts: Sequence[int], target: float) -> Optional[int]:
    """The first query count whose error is <= target (None if none is)."""
    for e, c in zip(errors, counts):
        if e <= target:
            return c
    return None


NAMES = ("adaptive",) + BASELINES


def query_curves(model: AdaptiveField, signals: torch.Tensor, start: int, rounds: int,
                 seed: int = 0) -> dict:
    """Recover signals [B, R] (R = 2G - 1: the grid is every other point) by adaptive
    queries and by both uniform baselines, each from the same `start` evenly spaced
    queries, `per_round` more per round, the field fitted the same way (the mean of the
    K conditioned samples' fields, seeded alike). Returns {name: {'counts': mean queries
    per round, 'errors': the field's MSE at all R points per round, 'history': run's}}."""
    R = signals.shape[1]
    grid_truth = signals[:, ::(R - 1) // (model.grid - 1)]
    initial = evenly_spaced(signals.shape[0], model.grid, start, signals.device)
    curves = {}
    for name in NAMES:
        gen = torch.Generator(signals.device).manual_seed(seed)
        history = model.run(lambda mask: grid_truth, initial, rounds, gen,
                            uniform=False if name == "adaptive" else name)
        with torch.no_grad():
            errors = [float(((model.decode(h["states"], R, (h["values"], h["mask"])) - signals) ** 2).mean())
                      for h in history]
        curves[name] = {"counts": [int(h["queries"].float().mean()) for h in history],
                        "errors": errors, "history": history}
    return curves


def demo(out: str, *, quick: bool = False, seed: int = 0, device: str = "cpu") -> str:
    """Train the prior on bump signals, then recover held-out ones by adaptive queries and
    by evenly spaced and random uniform queries (all from 8 evenly spaced starting
    queries, 4 more per round, the field fitted alike: see query_curves). Metric: the
    field's MSE at 127 points per query count, and the queries each needs to reach the
    same error targets (MSE 0.0025 and 0.001)."""
    n_train, n_held, steps, rounds, draws = (400, 3, 40, 2, 3) if quick else (3000, 12, 2000, 8, 8)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = AdaptiveField(draws=draws, per_round=4, spacing=1).to(device)
    R = model.prior.fine_resolution(2)
    signals = bump_signals(n_train + n_held, R, generator=g).to(device)
    train, held = signals[:n_train], signals[n_train:]
    history = train_loop(model.parameters(), model.loss,
                         lambda step: train[torch.randint(0, n_train, (32,), generator=g).to(device)],
                         steps, lr=2e-3, progress=not quick, desc="train approach 7")
    curves = query_curves(model, held, 8, rounds, seed)
    with torch.no_grad():
        _plot(out, held[:3].cpu(), curves, model, R)

    def fmt(name):
        return " ".join(f"{c}:{e:.4f}" for c, e in zip(curves[name]["counts"], curves[name]["errors"]))

    return (f"approach 7: field MSE by query count, adaptive {fmt('adaptive')} | evenly spaced "
            f"{fmt('evenly spaced')} | random {fmt('random')}; {queries_needed(curves, 0.0025)}; "
            f"{queries_needed(curves, 0.001)} (of {model.grid} grid points); DSM loss "
            f"{history['loss'][0]:.3f} -> {sum(history['loss'][-20:]) / len(history['loss'][-20:]):.3f}")


def queries_needed(curves: dict, target: float) -> str:
    """'to reach MSE target: adaptive A queries, evenly spaced E, random R' from
    query_curves' result ('more than N' where a run never reaches it)."""
    shown = {}
    for name, c in curves.items():
        n = queries_to_reach(c["errors"], c["counts"], target)
        shown[name] = f"more than {c['counts'][-1]}" if n is None else str(n)
    return (f"to reach MSE {target}: adaptive {shown['adaptive']} queries, evenly spaced "
            f"{shown['evenly spaced']}, random {shown['random']}")


def _plot(out, held, curves, model, R) -> str:
    x = signal_grid(R).squeeze(-1)
    xg = signal_grid(model.grid).squeeze(-1)
    colors = {"adaptive": "C0", "evenly spaced": "C2", "random": "C3"}

    def panel(name, i):
        last = curves[name]["history"][-1]
        observations = (last["values"][i:i + 1], last["mask"][i:i + 1])
        field = model.decode(last["states"][:, i:i + 1], R, observations)[0].cpu()

        def draw(ax):
            ax.plot(x, held[i], color="0.7", label="true signal")
            ax.plot(x, field, color=colors[name], label=f"field ({name})")
            m = last["mask"][i].cpu()
            ax.plot(xg[m], held[i, ::2][m], "k|", ms=8, label="queries")
            ax.set_ylim(-2, 2)
            if i == 0:
                ax.legend(fontsize=5, loc="lower left")
        return draw

    def errors(ax):
        for name, color in colors.items():
            ax.semilogy(curves[name]["counts"], curves[name]["errors"], "o-", color=color, label=name)
        ax.set_xticks(curves["adaptive"]["counts"])
        ax.tick_params(labelsize=6)
        ax.set_xlabel("queries", fontsize=7)
        ax.set_ylabel("field MSE", fontsize=7)
        ax.legend(fontsize=6)

    rows = [(name, [(f"signal {i}", panel(name, i)) for i in range(len(held))])
            for name in ("adaptive", "evenly spaced")]
    rows.append(("error", [("MSE vs queries", errors)]))
    return plot_rows(out, rows, title="approach 7: adaptive vs uniform queries", cell=3.0)


def benchmark_calls(device, quick: bool) -> dict:
    """One training step of the prior on bump signals, and one sampling pass: a round of the
    query loop (K conditioned samples, importance, the next queries) and the field decoded
    at the fine grid: batch 64, K = 8, grid 64, T = 100 (quick: batch 2, K = 2, grid 16 and
    a narrower prior, T = 4)."""
    from .blocks import ROTATIONS, adam_step

    torch.manual_seed(0)
    if quick:
        batch, model = 2, AdaptiveField(draws=2, grid=16, channels=8, width=16, dilations=(1, 2), timesteps=4)
    else:
        batch, model = 64, AdaptiveField(draws=8)
    model = model.to(device)
    R = model.prior.fine_resolution(2)
    g = torch.Generator().manual_seed(0)
    sets = [(bump_signals(batch, R, generator=g).to(device),) for _ in range(ROTATIONS)]
    mask = evenly_spaced(batch, model.grid, 4, device)
    values = torch.where(mask, sets[0][0][:, ::2], 0.0)

    def one_round():
        with torch.no_grad():
            states = model.posterior(values, mask)
            model.propose(model.importance(states, mask), mask)
            return model.decode(states, R, (values, mask))

    return {"train_step": adam_step(model.parameters(), model.loss, sets),
            "sampling": one_round,
            "points": {"train_step": batch * R, "sampling": batch * R},
            "describe": f"batch {batch}, K = {model.config['draws']} draws, grid {model.grid}, "
                        f"field at {R} points, T = {model.config['timesteps']}"}
