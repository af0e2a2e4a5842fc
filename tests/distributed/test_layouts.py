"""The reweighted loss under every parallel layout equals a single-process reference.

For each layout a real multi-process Megatron-Core run (gloo) takes one global
micro-batch through Megatron's schedules and DDP; its per-sample weights, reported losses
and full gradients must match a plain single-process autograd computation of
Σ_i w_i l_i on the same batch, with weights from an independent NumPy implementation
of the paper's formula.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.megatron_harness import global_batch, numpy_weights
from helpers.multiprocess import run_distributed

LAYOUTS = {  # id: (tp, pp, dp, cp)
    "tp1-pp1-dp1": (1, 1, 1, 1),
    "tp2-pp1-dp1": (2, 1, 1, 1),
    "tp1-pp2-dp1": (1, 2, 1, 1),
    "tp1-pp1-dp2": (1, 1, 2, 1),
    "tp1-pp1-dp1-cp2": (1, 1, 1, 2),
    "tp2-pp2-dp2": (2, 2, 2, 1),
}
STRATEGIES = ("uniform", "linupper")
TEMPERATURE = 0.5
# TP and CP change the order of floating-point sums; linupper's weights, exp(f(x)/r) of losses
# normalised by the batch's spread, amplify that (measured: 1.5e-5 under TP=2 and CP=2).
RTOL = 5e-5


# ---- the single-process reference -------------------------------------------------------


def _reference_worker(batch_seeds):
    from helpers.megatron_harness import _named_local_parameters, tiny_gpt

    from megatron_patches.parallel import destroy_parallel, initialize_parallel

    initialize_parallel(seed=7)
    model = tiny_gpt()
    full_state = {name: p.detach().clone() for name, p in _named_local_parameters(model)}
    params = dict(_named_local_parameters(model))
    results = {}
    for strategy in STRATEGIES:
        objective, per_batch = 0.0, []
        for seed in batch_seeds:
            batch = global_batch(seed)
            token_losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
            mask = batch["loss_mask"]
            counts = mask.sum(1)
            losses = (token_losses * mask).sum(1) / counts.clamp(min=1)
            weights = numpy_weights(losses.detach().double().numpy(), counts.double().numpy(), strategy, TEMPERATURE)
            valid = counts > 0
            loss = (torch.from_numpy(weights).float() * torch.where(valid, losses, 0.0)).sum()
            lm_loss = (token_losses * mask).sum() / mask.sum()
            per_batch.append(dict(weights=weights, weighted_loss=loss.item(), lm_loss=lm_loss.item()))
            # Megatron averages the micro-batches of one step.
            objective = objective + loss / len(batch_seeds)
        grads = torch.autograd.grad(objective, list(params.values()))
        results[strategy] = dict(batches=per_batch, grads=dict(zip(params, grads)))
    destroy_parallel()
    return full_state, results


# ---- the layout runs ----------------------------------------------------------------------


def _megatron_ordinary_loss(loss_mask, domains, token_losses):
    """Megatron-LM's own GPT loss function: (Σ m·c, Σ m); the schedule divides."""
    mask = loss_mask.float()
    return (token_losses * mask).sum(), mask.sum().to(torch.int), {}


def _layout_worker(tp, pp, cp, full_state, batch_seeds):
    from helpers.megatron_harness import layout_stepper
    from megatron.core import parallel_state as ps

    from megatron_patches.loss import ReweightedLoss
    from megatron_patches.parallel import destroy_parallel, initialize_parallel
    from megatron_patches.reweighting import ReweightSchedule

    initialize_parallel(tp, pp, cp, seed=123)  # a different seed: weights come from full_state
    step = layout_stepper(full_state)

    out = {"last_stage": ps.is_pipeline_last_stage()}
    for strategy in STRATEGIES:
        loss_fn = ReweightedLoss(ReweightSchedule(strategy, TEMPERATURE), num_domains=2)
        out[strategy] = step(loss_fn, [global_batch(s) for s in batch_seeds])
    full_mask = [global_batch(0, ragged=False)]
    out["megatron_ordinary"] = step(_megatron_ordinary_loss, full_mask)
    out["uniform_full_mask"] = step(ReweightedLoss(ReweightSchedule("uniform", 1.0)), full_mask)
    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def reference():
    return run_distributed(_reference_worker, 1, (0, 1))[0]


_layout_cache: dict = {}


@pytest.fixture
def layout_run(request, reference):
    layout_id = request.param
    if layout_id not in _layout_cache:
        tp, pp, dp, cp = LAYOUTS[layout_id]
        full_state, _ = reference
        _layout_cache[layout_id] = run_distributed(_layout_worker, tp * pp * dp * cp, tp, pp, cp, full_state, (0, 1))
    return _layout_cache[layout_id]


def _assert_gradients_match(rank_results, key, expected):
    """Every rank's gathered gradient equals the reference; together they cover every parameter."""
    seen = set()
    for result in rank_results:
        for name, grad in result[key][1].items():
            scale = expected[name].abs().max()
            torch.testing.assert_close(
                grad, expected[name], rtol=RTOL, atol=RTOL * scale, msg=lambda m, name=name: f"{name}: {m}"
            )
            seen.add(name)
    assert seen == set(expected)


@pytest.mark.parametrize("layout_run", list(LAYOUTS), indirect=True)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_layout_matches_single_process_reference(layout_run, reference, strategy):
    _, ref = reference
    ref = ref[strategy]
    last_stage = [r for r in layout_run if r["last_stage"]]
    for result in last_stage:
        reports, _ = result[strategy]
        assert len(reports) == len(ref["batches"])
        for report, expected in zip(reports, ref["batches"]):
            np.testing.assert_allclose(report["weights"].numpy(), expected["weights"], rtol=RTOL, atol=1e-12)
            np.testing.assert_allclose(report["weighted_loss"].item(), expected["weighted_loss"], rtol=RTOL)
            np.testing.assert_allclose(report["lm_loss"].item(), expected["lm_loss"], rtol=RTOL)
            assert report["weights"][2] == 0  # the fully masked sample
    # Bit-identical weights on every TP/CP/DP rank of the last stage.
    first = last_stage[0][strategy][0]
    for result in last_stage[1:]:
        for a, b in zip(first, result[strategy][0]):
            assert torch.equal(a["weights"], b["weights"])
    _assert_gradients_match(layout_run, strategy, ref["grads"])


@pytest.mark.parametrize("layout_run", list(LAYOUTS), indirect=True)
def test_uniform_is_megatron_ordinary_loss(layout_run):
    """With every sample fully masked-in, `uniform` gives Megatron's own loss and gradient."""
    for result in layout_run:
        expected = result["megatron_ordinary"][1]
        for name, grad in result["uniform_full_mask"][1].items():
            torch.testing.assert_close(grad, expected[name], rtol=RTOL, atol=1e-8)
