"""Loss-based instance reweighting (Sow et al., ICLR 2025), framework-free.

Every function here is pure torch (plus one optional all-gather), so it can be used
outside Megatron.  The formulas are those of the paper:

    x_i = (2δ l_i − δ (l_max + l_min)) / max(l_max − l_min, ε)       normalise to [−δ, δ]
    w_i = π_i exp(f(x_i) / r) / Σ_{j∈V} π_j exp(f(x_j) / r)         over the valid samples V

with the prior π uniform (the paper's formula) or, given token counts, π_i ∝ n_i: the
weights that maximise Σ w_i f_i − r·KL(w ‖ π).  With the token prior, `uniform` weights
make Σ w_i l_i exactly the token-mean loss of the batch, Megatron's ordinary loss; when
every sample has the same number of loss tokens (packed pretraining sequences) the two
priors coincide.

Nothing on this path reads a tensor value on the host: no `.item()`, no `.tolist()`, no
Python branch on data.  Invalid samples (flagged, NaN or ±Inf) are replaced before any
arithmetic so that no NaN can reach min, max or the softmax.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist

EPSILON = 1e-6


@dataclass(frozen=True)
class Strategy:
    """f(x) on the normalised loss x ∈ [−δ, δ], with the words the docs and `--help` show."""

    f: Callable[[torch.Tensor, float], torch.Tensor]
    formula: str
    effect: str
    # Which losses get more weight: "nothing" (f constant), "high" (f never falls as x grows),
    # "medium" (f rises to x = 0, then falls) or "ends" (falls to x = 0, then rises).
    favours: str

    def __call__(self, x: torch.Tensor, delta: float) -> torch.Tensor:
        return self.f(x, delta)


# The one registry of strategies: the config's choices, `--help` and the README table come
# from here.  The names are the ones users type in configs.
STRATEGIES: dict[str, Strategy] = {
    "uniform": Strategy(
        lambda x, delta: torch.zeros_like(x),
        "0",
        "every valid sample alike: exactly Megatron's token-mean loss (the baseline)",
        "nothing",
    ),
    "linupper": Strategy(
        lambda x, delta: torch.clamp(x + delta, max=delta),
        "min(x + δ, δ)",
        "down-weights low-loss samples, caps high-loss ones (the paper's best)",
        "high",
    ),
    "quadratic": Strategy(
        lambda x, delta: 1.0 - x.square() / delta**2,
        "1 − x²/δ²",
        "favours medium losses, down-weights both ends",
        "medium",
    ),
    "extremes": Strategy(lambda x, delta: x.abs(), "|x|", "favours both ends", "ends"),
    "upper": Strategy(lambda x, delta: x / 2 + delta / 2, "x/2 + δ/2", "linear in the loss, favours high loss", "high"),
}

# Reference implementations' names that mean one strategy here.  The GPT-2 reference's `mid`
# is `quadratic`.  `upper` is deliberately not an alias: the GPT-2 reference's `upper` is this
# project's `upper`, but the Llama (FMS) reference's `upper` is `linupper`.
STRATEGY_ALIASES: dict[str, str] = {"mid": "quadratic"}


def check_strategy(strategy: str, temperature: float) -> None:
    """Refuse settings the formulas cannot honour, naming what to change."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown reweighting strategy {strategy!r}; choose one of {sorted(STRATEGIES)}")
    if not temperature > 0:
        raise ValueError(
            f"reweighting temperature must be > 0 (got {temperature}); use a large value for near-uniform weights"
        )


def global_sample_weights(
    losses: torch.Tensor,
    valid: torch.Tensor,
    *,
    strategy: str,
    temperature: float,
    delta: float = 1.0,
    token_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weights of a whole (already gathered) batch: Σ_valid w = 1, invalid samples get 0.

    Computed in float64 whatever the input dtype so that every rank that holds the same
    losses produces bit-identical weights, and small temperatures do not underflow.
    `strategy` and `temperature` are checked where they are set (`check_strategy`), not here
    on the per-micro-batch path.
    """
    losses = losses.detach().to(torch.float64)
    # Re-checked here so that no caller can let a NaN or an empty sample through.
    valid = valid.to(torch.bool) & torch.isfinite(losses)
    if token_counts is not None:
        valid = valid & (token_counts > 0)
    # Neutral stand-ins keep invalid entries out of min/max without a host-side branch.
    l_min = torch.where(valid, losses, math.inf).amin()
    l_max = torch.where(valid, losses, -math.inf).amax()
    # With no valid sample both are ±inf; zero them so nothing below turns NaN.
    any_valid = valid.any()
    l_min = torch.where(any_valid, l_min, 0.0)
    l_max = torch.where(any_valid, l_max, 0.0)
    safe = torch.where(valid, losses, l_min)
    x = (2 * delta * safe - delta * (l_max + l_min)) / torch.clamp(l_max - l_min, min=EPSILON)
    f = STRATEGIES[strategy](x, delta)
    f_max = torch.where(valid, f, -math.inf).amax()
    f_max = torch.where(any_valid, f_max, 0.0)
    unnormalised = torch.exp((f - f_max) / temperature)
    if token_counts is not None:
        unnormalised = unnormalised * token_counts.to(torch.float64)
    unnormalised = torch.where(valid, unnormalised, 0.0)
    return unnormalised / torch.clamp(unnormalised.sum(), min=torch.finfo(torch.float64).tiny)


def all_gather_batch(local: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenate every rank's `local` (equal shapes) along dim 0, in group-rank order."""
    if group is None or dist.get_world_size(group) == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts)


class GatheredBatch(NamedTuple):
    """A whole data-parallel batch, gathered, with its weights (float64, group-rank order)."""

    weights: torch.Tensor
    losses: torch.Tensor
    valid: torch.Tensor  # bool
    token_counts: torch.Tensor
    extra: torch.Tensor  # [N, k] of the caller's extra per-sample columns

    def local(self, values: torch.Tensor, local_size: int, group: dist.ProcessGroup | None) -> torch.Tensor:
        """This rank's rows of `values` (one of the gathered tensors)."""
        rank = 0 if group is None else dist.get_rank(group)
        return values[rank * local_size : (rank + 1) * local_size]


def gather_and_weigh(
    losses: torch.Tensor,
    *,
    strategy: str,
    temperature: float,
    delta: float = 1.0,
    valid: torch.Tensor | None = None,
    token_counts: torch.Tensor | None = None,
    extra: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> GatheredBatch:
    """One all-gather of every rank's (loss, valid, token count, extra columns) over `group`,
    then the weights of the whole batch, identical on every rank of the group.

    `token_counts` switches on the token prior (see the module docstring).  `extra` ([n, k])
    travels in the same collective, e.g. the samples' domain ids for statistics.
    """
    mask = torch.ones_like(losses, dtype=torch.bool) if valid is None else valid
    counts = torch.ones_like(losses) if token_counts is None else token_counts
    columns = [losses.detach(), mask, counts]
    local = torch.stack([c.to(torch.float64) for c in columns], dim=1)
    if extra is not None:
        local = torch.cat([local, extra.to(torch.float64).reshape(losses.shape[0], -1)], dim=1)
    gathered = all_gather_batch(local, group)
    batch_losses, batch_valid, batch_counts = gathered[:, 0], gathered[:, 1] > 0, gathered[:, 2]
    weights = global_sample_weights(
        batch_losses,
        batch_valid,
        strategy=strategy,
        temperature=temperature,
        delta=delta,
        token_counts=None if token_counts is None else batch_counts,
    )
    return GatheredBatch(weights, batch_losses, batch_valid, batch_counts, gathered[:, 3:])


def compute_sample_weights(
    losses: torch.Tensor,
    *,
    strategy: str,
    temperature: float,
    delta: float = 1.0,
    valid: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    token_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """This rank's weights for its local samples, computed from the losses of all of `group`.

    `losses` is a 1-D tensor of per-sample losses (same length on every rank of `group`).
    Over all ranks the weights of the valid samples sum to 1; invalid ones are 0.
    `token_counts` switches on the token prior (see the module docstring).
    """
    check_strategy(strategy, temperature)
    batch = gather_and_weigh(
        losses,
        strategy=strategy,
        temperature=temperature,
        delta=delta,
        valid=valid,
        token_counts=token_counts,
        group=group,
    )
    return batch.local(batch.weights, losses.shape[0], group).to(losses.dtype)


def weight_statistics(
    weights: torch.Tensor,
    losses: torch.Tensor,
    valid: torch.Tensor,
    domains: torch.Tensor | None = None,
    num_domains: int = 0,
    padding: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Diagnostics of one batch's weights, as 0-d/1-d tensors (read them at log time only).

    `padding` flags slots that hold no sample at all (e.g. unused unit slots of a row): they
    are neither valid nor counted as invalid.

    - `ess`: effective sample size 1 / (|V| Σ w²) in (0, 1]; 1 means uniform.
    - `max_weight`: |V| · max w; 1 means uniform.
    - `entropy`: entropy of w over V divided by log |V|; 1 means uniform.
    - `invalid_fraction`: share of samples left out (masked-out, NaN or Inf loss).
    - `padding_fraction` (with `padding` only): share of the slots that are padding.
    - `loss_top_quarter` / `loss_bottom_quarter`: mean loss of the most / least weighted 25 %.
    - `domain_weight_share` / `domain_sample_share`: per domain id, Σ w against the share of
      valid samples; shows which domains the method steers away from.
    - `domain_samples` / `domain_loss_sum`: per domain id, its valid samples and the sum of
      their losses (the rewards of online domain mixing).
    """
    weights = weights.detach().to(torch.float64)
    valid = valid.to(torch.bool)
    n_valid = valid.sum().to(torch.float64)
    n_safe = torch.clamp(n_valid, min=1.0)
    p = torch.where(valid, weights, 0.0)
    entropy = -(p * torch.log(torch.where(p > 0, p, 1.0))).sum()
    stats = {
        "ess": torch.where(n_valid > 0, 1.0 / (n_safe * torch.clamp(p.square().sum(), min=1e-300)), 0.0),
        "max_weight": n_valid * p.amax(),
        "entropy": torch.where(n_valid > 1, entropy / torch.log(torch.clamp(n_safe, min=2.0)), 1.0),
    }
    if padding is None:
        stats["invalid_fraction"] = 1.0 - n_valid / valid.numel()
    else:
        samples = valid.numel() - padding.to(torch.bool).sum().to(torch.float64)
        stats["invalid_fraction"] = 1.0 - n_valid / torch.clamp(samples, min=1.0)
        stats["padding_fraction"] = 1.0 - samples / valid.numel()
    # Quarters by weight: rank valid samples by weight (invalid ones sort last).
    order = torch.argsort(torch.where(valid, p, -1.0), descending=True, stable=True)
    quarter = torch.clamp(torch.floor(n_valid / 4), min=1.0)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)
    top = valid & (position < quarter)
    bottom = valid & (position >= n_valid - quarter)
    safe_losses = torch.where(valid, losses.detach().to(torch.float64), 0.0)
    stats["loss_top_quarter"] = (safe_losses * top).sum() / torch.clamp(top.sum(), min=1)
    stats["loss_bottom_quarter"] = (safe_losses * bottom).sum() / torch.clamp(bottom.sum(), min=1)
    if domains is not None and num_domains > 0:
        ids = torch.where(valid, domains.to(torch.int64), num_domains)  # invalid → overflow bin
        stats["domain_weight_share"] = torch.zeros(num_domains + 1, dtype=torch.float64, device=p.device).index_add_(
            0, ids, p
        )[:num_domains]
        # index_add_, not bincount: CUDA bincount reads the ids' min and max on the host.
        counts = torch.zeros(num_domains + 1, dtype=torch.float64, device=p.device).index_add_(
            0, ids, torch.ones_like(p)
        )[:num_domains]
        stats["domain_sample_share"] = counts / n_safe
        # Sums, not means, so that micro-batches and steps add up exactly (online domain mixing).
        stats["domain_samples"] = counts
        stats["domain_loss_sum"] = torch.zeros(num_domains + 1, dtype=torch.float64, device=p.device).index_add_(
            0, ids, safe_losses
        )[:num_domains]
    return stats


@dataclass
class ReweightSchedule:
    """Which weights to use at each optimizer step: a warm-up, then the target.

    During the first `warmup_steps` steps the weights are uniform (`warmup_temperature`
    None, the GPT-2 reference) or use `warmup_temperature` (the Llama reference: r = 100).
    After warm-up the inverse temperature 1/r moves linearly to the target's over
    `anneal_steps` steps (0: switch at once).  Uniform weights are inverse temperature 0,
    so one interpolation covers both kinds of warm-up.
    """

    strategy: str
    temperature: float
    warmup_steps: int = 0
    warmup_temperature: float | None = None
    anneal_steps: int = 0
    step: int = 0

    def __post_init__(self) -> None:
        check_strategy(self.strategy, self.temperature)
        if self.warmup_temperature is not None:
            check_strategy(self.strategy, self.warmup_temperature)
        if self.warmup_steps < 0 or self.anneal_steps < 0:
            raise ValueError("reweighting warmup_steps and anneal_steps must be >= 0")

    def inverse_temperature(self, step: int | None = None) -> float:
        """1/r at `step` (default: the current step); 0 means uniform weights."""
        step = self.step if step is None else step
        start = 0.0 if self.warmup_temperature is None else 1.0 / self.warmup_temperature
        target = 0.0 if self.strategy == "uniform" else 1.0 / self.temperature
        if step < self.warmup_steps:
            return start
        if self.anneal_steps == 0:
            return target
        progress = min(1.0, (step - self.warmup_steps + 1) / self.anneal_steps)
        return start + progress * (target - start)

    def current(self) -> tuple[str, float]:
        """(strategy, temperature) for the current step; uniform while 1/r is 0."""
        inverse = self.inverse_temperature()
        return ("uniform", 1.0) if inverse == 0.0 else (self.strategy, 1.0 / inverse)

    def advance(self) -> None:
        """Call once per optimizer step, after it."""
        self.step += 1

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        settings = {k: v for k, v in state.items() if k != "step"}
        if settings != {k: v for k, v in asdict(self).items() if k != "step"}:
            # Changing the schedule on resume is allowed but should never pass silently.
            warnings.warn(f"reweighting schedule changed on resume: checkpoint {settings}, now {asdict(self)}")
        self.step = int(state["step"])


@dataclass(frozen=True)
class ReweightSettings:
    """The reweighting a run asks for: the config's `reweight:` section and the
    `--reweight-*` flags of `megatron_patches.megatron_lm` are this one definition."""

    # The names of STRATEGIES; reference names such as `mid` are accepted as their aliases
    # (STRATEGY_ALIASES) and saved under this project's name.
    strategy: Literal[tuple(STRATEGIES)] = field(default="uniform", metadata={"aliases": STRATEGY_ALIASES})
    temperature: float = 1.0  # r > 0: small = sharp weights, large = near uniform
    delta: float = 1.0  # losses are normalised to [-delta, delta]
    warmup_steps: int = 0
    warmup_temperature: float | None = None  # null = uniform weights during warm-up
    # After warm-up, 1/temperature moves linearly from the warm-up's (0 when uniform) to the
    # target's over anneal_steps steps; 0 = switch at once.
    anneal_steps: int = 0
    # What one weight applies to: `sequence` = each sample (row) of the window; `document` = each
    # document segment of a sample: the tokens up to and including an end-of-document token, a
    # document cut by the window counting as one segment.
    unit: Literal["sequence", "document"] = "sequence"
    # document: the segment slots of each sample (the all-gather has a fixed shape); a sample's
    # segments past the bound are merged into its last slot, and counted (`segments_over_bound`).
    max_segments_per_sample: int = 16

    def problems(self, train_steps: int, name: Callable[[str], str], train_steps_name: str) -> list[str]:
        """What cannot run, each naming its setting as `name(field)` (a config key or a flag)."""
        problems = [
            f"{name(key)}={getattr(self, key)} must be >= 0"
            for key in ("warmup_steps", "anneal_steps")
            if getattr(self, key) < 0
        ]
        for key in ("temperature", "warmup_temperature"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                problems.append(
                    f"{name(key)}={value} must be > 0 (small = sharp weights, large = near uniform;"
                    " 1.0 is a good start)"
                )
        # A warm-up with warmup_temperature reweights too; without one it is uniform throughout.
        if self.strategy != "uniform" and self.warmup_temperature is None and self.warmup_steps >= train_steps:
            problems.append(
                f"{name('warmup_steps')}={self.warmup_steps} >= {train_steps_name}={train_steps}: the run"
                f" would never reweight; lower {name('warmup_steps')} or use {name('strategy')}=uniform"
            )
        if self.delta <= 0:
            problems.append(f"{name('delta')}={self.delta} must be > 0 (1.0 is the paper's value)")
        if self.max_segments_per_sample < 1:
            problems.append(
                f"{name('max_segments_per_sample')}={self.max_segments_per_sample} must be >= 1 (the"
                f" document slots of each sample with {name('unit')}=document; 16 is the default)"
            )
        return problems

    @property
    def units_per_row(self) -> int:
        """The weighting unit slots of each sample: one, or a slot per document segment."""
        return self.max_segments_per_sample if self.unit == "document" else 1

    def schedule(self) -> ReweightSchedule:
        return ReweightSchedule(
            self.strategy, self.temperature, self.warmup_steps, self.warmup_temperature, self.anneal_steps
        )
