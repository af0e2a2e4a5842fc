"""Online domain mixing: a training set whose domain mixture moves between steps.

`data.mixing: fixed` (the default) is Megatron's `BlendedDataset`, its mixture set before
step 1 (`launch.data`).  `data.mixing: odm` is a `MixedDataset` steered by an `Exp3Mixer`.

The draw.  Global sample j (step s holds j in [s·G, (s+1)·G), G the global batch) takes its
domain from the current mixture π by one uniform number u_j, a pure hash of (seed, j): the
first domain k with u_j < π_1 + … + π_k.  Each domain is one Megatron `GPTDataset`, read in
its own shuffled order: the n-th sample drawn from domain k is that dataset's sample n, a
counter per domain.  The data order is therefore a pure function of the seed and the history
of π, whatever the layout, and the counters, the mixer and π are all a checkpoint needs.
`start_step(s)` resolves step s (domain and position of each of its samples) on the training
thread when the step starts, after the previous step's update; its order is not fixed in
advance (`order_fixed_in_advance`), so no reader may prefetch past the step.

The bandit (Albalak et al. 2023, "Efficient Online Data Mixing for Language Model
Pre-Training", ODM): EXP3 over the K domains with the training loss as reward.  At update
t = 1, 2, … (every `update_interval` steps), with exploration γ_t and step size η_t = γ_t / K:

    γ_t = min(1, sqrt(K ln K / t))          (ODM's ε_t = min(1/K, sqrt(ln K / (K t))) is γ_t / K)
    π_t,i = (1 − γ_t) · softmax_i(ln w_i + η_{t−1} R̂_i) + γ_t / K        (η_0 = 1/K)
    R̂_i ← α R̂_i + (1 − α) L_i / π_t,i     for each domain i drawn in the interval

where w is `data.weights` (the starting point: R̂ = 0 gives π = w, mixed with the uniform
share γ), L_i the mean per-sample loss of domain i's samples in the interval's global
batches (ODM draws one domain per batch and rewards it with the batch loss; a mixed batch
rewards every domain it holds with its own mean), 1/π_t,i the importance weight, and α the
reward smoothing.  A fixed `data.mixing_exploration` replaces γ_t.  A domain with weight 0
would have no prior (ln 0) yet be explored, so `launch.config` refuses it.

Cost: the losses are those the reweighting already gathers (`domain_loss_sum`,
`domain_samples` of each micro-batch's loss report), summed on the device; each update adds
one all-reduce of 2K numbers over the world group (the reports live on the last pipeline
stage, and every rank draws) and one host copy of them: nothing per step between updates.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from launch.metrics import is_reporter
from megatron_patches.device import device

_MASK64 = np.uint64(2**64 - 1)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A bijective 64-bit mix (Steele et al. 2014's SplitMix64 finaliser), vectorised."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def sample_uniforms(seed: int, indices: np.ndarray) -> np.ndarray:
    """u_j in [0, 1) for each global sample index j: a pure function of (seed, j)."""
    keyed = _splitmix64(_splitmix64(np.full(len(indices), seed, dtype=np.uint64)) ^ indices.astype(np.uint64))
    return (keyed >> np.uint64(11)).astype(np.float64) * 2.0**-53


def draw_domains(seed: int, indices: np.ndarray, mixture: np.ndarray) -> np.ndarray:
    """The domain of each global sample index under `mixture` (K weights summing to 1)."""
    bounds = np.cumsum(mixture)
    return np.minimum(np.searchsorted(bounds, sample_uniforms(seed, indices), side="right"), len(mixture) - 1)


class Exp3Mixer:
    """ODM's EXP3 bandit over domains (see the module docstring for the update)."""

    def __init__(self, prior: list[float], exploration: float | None, smoothing: float):
        self.prior = np.asarray(prior, dtype=np.float64) / sum(prior)
        self.exploration = exploration
        self.smoothing = smoothing
        self.rewards = np.zeros(len(self.prior))
        self.updates = 0
        self.mixture = self._policy(self.updates + 1)

    @property
    def num_domains(self) -> int:
        return len(self.prior)

    def _gamma(self, t: int) -> float:
        """The uniform share of the mixture at update t (t = 0: all of it, ODM's ε_0 = 1/K)."""
        if self.exploration is not None:
            return self.exploration
        k = self.num_domains
        return 1.0 if t == 0 else min(1.0, math.sqrt(k * math.log(k) / t))

    def _policy(self, t: int) -> np.ndarray:
        logits = np.log(self.prior) + self._gamma(t - 1) / self.num_domains * self.rewards
        exploit = np.exp(logits - logits.max())
        gamma = self._gamma(t)
        return (1.0 - gamma) * exploit / exploit.sum() + gamma / self.num_domains

    def update(self, loss_sums: np.ndarray, samples: np.ndarray) -> None:
        """One update from the interval's per-domain loss sums and sample counts."""
        drawn = samples > 0
        losses = np.where(drawn, loss_sums / np.maximum(samples, 1.0), 0.0)
        estimate = self.smoothing * self.rewards + (1.0 - self.smoothing) * losses / self.mixture
        self.rewards = np.where(drawn, estimate, self.rewards)
        self.updates += 1
        self.mixture = self._policy(self.updates + 1)

    def state_dict(self) -> dict:
        return {"rewards": self.rewards.tolist(), "updates": self.updates, "mixture": self.mixture.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.rewards = np.asarray(state["rewards"], dtype=np.float64)
        self.updates = int(state["updates"])
        self.mixture = np.asarray(state["mixture"], dtype=np.float64)


class MixedDataset:
    """The training set of `data.mixing: odm`: one `GPTDataset` per domain, read through the
    mixture of an `Exp3Mixer`; indexed by global sample index, one resolved step at a time.

    Per step: `start_step(step)` before reading, `observe(reports)` with the step's loss
    reports, `end_step()` after the optimizer step (the update, every `update_interval` steps).
    A sample is `{"dataset_id": domain, **datasets[domain][position]}`, as a `BlendedDataset`'s.
    """

    order_fixed_in_advance = False  # a step's samples are known only once it starts

    def __init__(
        self, datasets: list, mixer: Exp3Mixer, *, seed: int, global_batch_size: int, steps: int, update_interval: int
    ):
        self.datasets = datasets
        self.mixer = mixer
        self.seed = seed
        self.global_batch_size = global_batch_size
        self.steps = steps
        self.update_interval = update_interval
        self.positions = np.zeros(len(datasets), dtype=np.int64)  # samples drawn per domain so far
        self.step = 0  # steps resolved so far
        self.step_mixture = self.mixture
        self._resolved: tuple[int, np.ndarray, np.ndarray] | None = None  # first index, domains, positions
        self._sums = torch.zeros(2, len(datasets), dtype=torch.float64, device=device())  # loss sums, samples

    @property
    def config(self):
        """The datasets' shared GPTDatasetConfig (tokenizer, sequence length), as a GPTDataset's."""
        return self.datasets[0].config

    @property
    def mixture(self) -> list[float]:
        """The weights that draw the next step's samples."""
        return self.mixer.mixture.tolist()

    def __len__(self) -> int:
        return self.steps * self.global_batch_size

    def start_step(self, step: int) -> None:
        """Resolve global batch `step`: each sample's domain and its position in the domain."""
        if step != self.step:
            raise RuntimeError(f"the mixture has resolved {self.step} steps; step {step} cannot start")
        first = step * self.global_batch_size
        indices = np.arange(first, first + self.global_batch_size, dtype=np.int64)
        domains = draw_domains(self.seed, indices, self.mixer.mixture)
        positions = np.empty_like(indices)
        for k in range(len(self.datasets)):
            chosen = domains == k
            positions[chosen] = self.positions[k] + np.arange(chosen.sum())
            self.positions[k] += chosen.sum()
        self._resolved = (first, domains, positions)
        self.step_mixture = self.mixture  # what the log reports for this step
        self.step += 1

    def locate(self, index: int) -> tuple[int, int]:
        """(domain, position in the domain's dataset) of a global sample of the resolved step."""
        first, domains, positions = self._resolved
        offset = index - first
        if not 0 <= offset < len(domains):
            raise IndexError(
                f"sample {index} is not in the step being read (samples {first}-{first + len(domains) - 1})"
            )
        domain = int(domains[offset])
        return domain, int(positions[offset]) % len(self.datasets[domain])

    def read(self, domain: int, position: int) -> dict:
        return {"dataset_id": domain, **self.datasets[domain][position]}

    def __getitem__(self, index: int) -> dict:
        return self.read(*self.locate(index))

    def observe(self, reports: list[dict]) -> None:
        """Add one step's per-domain loss sums and sample counts (device tensors, no sync)."""
        for report in reports:
            self._sums += torch.stack([report["domain_loss_sum"], report["domain_samples"]]).to(torch.float64)

    def end_step(self) -> None:
        """After the optimizer step: every `update_interval` steps, the bandit's update."""
        if self.step % self.update_interval:
            return
        loss_sums, samples = self._reduced()
        self._sums.zero_()
        self.mixer.update(np.asarray(loss_sums), np.asarray(samples))

    def _reduced(self) -> list[list[float]]:
        """The interval's sums on every rank (a world collective): every rank of the last stage
        holds the whole global batch's, so the one reporting rank's are taken."""
        sums = self._sums.clone() if is_reporter() else torch.zeros_like(self._sums)
        dist.all_reduce(sums)
        return sums.tolist()

    def state_dict(self) -> dict:
        """A collective (every rank calls it): the open interval's sums come to every rank."""
        return {
            "step": self.step,
            "positions": self.positions.tolist(),
            "interval_sums": self._reduced(),
            "mixer": self.mixer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["positions"]) != len(self.datasets):
            raise ValueError(f"the checkpoint mixes {len(state['positions'])} domains, this run {len(self.datasets)}")
        self.step = int(state["step"])
        self.positions = np.asarray(state["positions"], dtype=np.int64)
        self._sums = torch.tensor(state["interval_sums"], dtype=torch.float64, device=device())
        self.mixer.load_state_dict(state["mixer"])
