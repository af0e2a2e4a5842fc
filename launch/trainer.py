"""The training loop: Megatron-Core's model, schedules, DDP and optimizer around the reweighted loss.

Read `Trainer.train` top to bottom for the loop; each concern (data, model, checkpoints,
metrics) is a small module of `launch/`, and the loss is `megatron_patches.loss`.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from launch.checkpoint import MegatronCheckpointer
from launch.config import Config, resolve_blend, resolve_valid_blend, to_dict
from launch.data import build_train_dataset, build_validation_datasets, micro_batches
from launch.metrics import MetricsLog, console_line, reduce_to_rank0
from launch.model import build_model, use_bf16
from megatron_patches.loss import ReweightedLoss
from megatron_patches.parallel import initialize_parallel
from megatron_patches.reweighting import ReweightSchedule

# Per-step statistics from the loss report, in this order, then the per-domain shares.
STEP_STATISTICS = (
    ("loss", "lm_loss"),
    ("weighted_loss", "weighted_loss"),
    ("weight_ess", "ess"),
    ("weight_max", "max_weight"),
    ("weight_entropy", "entropy"),
    ("invalid_fraction", "invalid_fraction"),
    ("loss_top_weighted_quarter", "loss_top_quarter"),
    ("loss_bottom_weighted_quarter", "loss_bottom_quarter"),
)


def _token_sum_loss(loss_mask, domains, token_losses):
    """Validation: plain token sums, so per-domain means can be reduced exactly over ranks."""
    mask = loss_mask.to(token_losses.dtype)
    total, count = (token_losses * mask).sum(), mask.sum()
    return total, count.to(torch.int), {"sum_count": torch.stack([total.detach(), count])}


def lr_scheduler(cfg: Config, optimizer) -> OptimizerParamScheduler:
    """Warm-up then decay (Megatron's scheduler), for either engine's optimizer."""
    o, t = cfg.optim, cfg.train
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if o.warmup_steps else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=t.steps,
        lr_decay_style=o.decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=t.steps,
        wd_incr_style="constant",
    )


def megatron_optimizer_config(cfg: Config) -> OptimizerConfig:
    o = cfg.optim
    return OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        decoupled_weight_decay=o.name == "adamw",
        adam_beta1=o.beta1,
        adam_beta2=o.beta2,
        adam_eps=o.eps,
        clip_grad=o.clip_grad,
        bf16=use_bf16(cfg),
        params_dtype=torch.bfloat16 if use_bf16(cfg) else torch.float32,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )


class Trainer:
    """Megatron-Core's engine; `launch.deepspeed_trainer` swaps in DeepSpeed's via `_build_engine`."""

    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        p, t, r = cfg.parallel, cfg.train, cfg.reweight
        initialize_parallel(p.tp, p.pp, p.cp, seed=t.seed)
        self.micro_batches_per_step = t.global_batch_size // (t.micro_batch_size * ps.get_data_parallel_world_size())

        self.model = build_model(cfg)
        self._build_engine()  # sets wrapped_model, optimizer, checkpointer
        self.scheduler = lr_scheduler(cfg, self.optimizer)

        self.blend = resolve_blend(cfg)
        schedule = ReweightSchedule(r.strategy, r.temperature, r.warmup_steps, r.warmup_temperature, r.anneal_steps)
        self.loss = ReweightedLoss(schedule, delta=r.delta, num_domains=len(self.blend.domains))

        cache = Path(cfg.data.cache_dir or self.run_dir / "data_cache")
        self.train_data = build_train_dataset(cfg, self.blend, cache)
        valid_blend = resolve_valid_blend(cfg) or self.blend
        self.valid_data = build_validation_datasets(cfg, valid_blend, cache) if t.eval_interval > 0 else {}

        self.step = self._resume()
        self.log = MetricsLog(self.run_dir, cfg.logging.tensorboard, resume_step=self.step)

    def _build_engine(self) -> None:
        """Megatron DDP (gradient reduction over DP×CP) and Megatron's optimizer."""
        self.wrapped_model = DistributedDataParallel(
            self.model.config,
            DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                use_distributed_optimizer=self.cfg.parallel.distributed_optimizer,
                check_for_nan_in_grad=True,
            ),
            self.model,
        )
        self.optimizer = get_megatron_optimizer(megatron_optimizer_config(self.cfg), [self.wrapped_model])
        self.model.config.finalize_model_grads_func = finalize_model_grads
        self.model.config.grad_scale_func = self.optimizer.scale_loss
        self.checkpointer = MegatronCheckpointer(
            self.run_dir / "checkpoints", self.cfg.checkpoint.keep, self.model, self.optimizer
        )

    # ---- the loop -------------------------------------------------------------------------

    def train(self) -> None:
        t = self.cfg.train
        # Summed on the device and read only at log steps: no host sync per step.
        interval = self._no_statistics()
        interval_steps, interval_time, interval_grad_norm = 0, 0.0, 0.0
        stop = t.steps if t.exit_after is None else min(t.steps, self.step + t.exit_after)
        while self.step < stop:
            start = time.perf_counter()
            statistics, grad_norm = self._train_step()
            self.step += 1
            interval += statistics
            interval_steps += 1
            interval_time += time.perf_counter() - start
            interval_grad_norm += grad_norm
            last = self.step == t.steps
            if self.step % t.log_interval == 0 or last:
                self._log_train(interval / interval_steps, interval_grad_norm / interval_steps, interval_time / interval_steps)
                interval.zero_()
                interval_steps, interval_time, interval_grad_norm = 0, 0.0, 0.0
            if self.valid_data and (self.step % t.eval_interval == 0 or last):
                self._evaluate()
            if self.step % self.cfg.checkpoint.interval == 0 or self.step == stop:
                self._save()
        self.log.close()

    def _train_step(self) -> tuple[torch.Tensor, float]:
        self.wrapped_model.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = self._forward_backward(
            micro_batches(self.train_data, self.cfg, self.step), self.loss, self.micro_batches_per_step, forward_only=False
        )
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        self.loss.schedule.advance()
        return self._step_statistics(reports), float("nan") if grad_norm is None else grad_norm

    def _forward_backward(self, batches, loss_fn, num_microbatches: int, forward_only: bool) -> list[dict]:
        return get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, loss_fn),
            data_iterator=batches,
            model=[self.wrapped_model],
            num_microbatches=num_microbatches,
            seq_length=self.cfg.model.seq_length,
            micro_batch_size=self.cfg.train.micro_batch_size,
            forward_only=forward_only,
        )

    @staticmethod
    def _forward_step(loss_fn, batches, model):
        batch = next(batches)
        if torch.cuda.is_available():
            batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(loss_fn, batch["loss_mask"], batch["domains"])

    # ---- metrics --------------------------------------------------------------------------

    def _no_statistics(self) -> torch.Tensor:
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        return torch.zeros(len(STEP_STATISTICS) + 2 * len(self.blend.domains), dtype=torch.float64, device=device)

    def _step_statistics(self, reports: list[dict]) -> torch.Tensor:
        """Mean over micro-batches of the loss report as one vector (zeros off the last stage)."""
        if not reports:
            return self._no_statistics()
        rows = [
            torch.cat(
                [
                    torch.stack([r[key].to(torch.float64) for _, key in STEP_STATISTICS]),
                    r["domain_weight_share"].to(torch.float64),
                    r["domain_sample_share"].to(torch.float64),
                ]
            )
            for r in reports
        ]
        return torch.stack(rows).mean(0)

    def _is_reporter(self) -> bool:
        """The one rank whose loss report is logged: last stage, first TP/CP/DP rank."""
        return (
            ps.is_pipeline_last_stage()
            and ps.get_tensor_model_parallel_rank() == 0
            and ps.get_context_parallel_rank() == 0
            and ps.get_data_parallel_rank() == 0
        )

    def _log_train(self, statistics: torch.Tensor, grad_norm: float, step_time: float) -> None:
        values = reduce_to_rank0(statistics, self._is_reporter())
        if values is None:
            return
        names = [name for name, _ in STEP_STATISTICS]
        domains = self.blend.domains
        row = {"kind": "train", "step": self.step, **dict(zip(names, values))}
        shares = values[len(names) :]
        strategy, temperature = self.loss.schedule.current()
        tokens = self.cfg.train.global_batch_size * self.cfg.model.seq_length
        row.update(
            lr=self.optimizer.param_groups[0]["lr"],
            grad_norm=grad_norm,
            step_time_s=step_time,
            tokens_per_s=tokens / step_time,
            reweight_strategy=strategy,
            reweight_temperature=temperature,
            domain_weight_share=dict(zip(domains, shares[: len(domains)])),
            domain_sample_share=dict(zip(domains, shares[len(domains) :])),
        )
        self.log.write(row)
        print(console_line(row, self.cfg.train.steps), flush=True)

    def _evaluate(self) -> None:
        """Held-out token-mean loss per domain, on the same samples every time."""
        self.wrapped_model.eval()
        iters = self.cfg.train.eval_iters
        sums = []
        with torch.no_grad():
            for dataset in self.valid_data.values():
                reports = self._forward_backward(
                    micro_batches(dataset, self.cfg, 0, iters), _token_sum_loss, iters * self.micro_batches_per_step, forward_only=True
                )
                total = torch.stack([r["sum_count"] for r in reports]).sum(0) if reports else torch.zeros(2)
                sums.append(total.to(torch.float64).cpu())
        self.wrapped_model.train()
        # Every DP and CP rank of the last stage holds part of the tokens: add them all.
        contributes = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
        values = reduce_to_rank0(torch.cat(sums), contributes)
        if values is None:
            return
        losses = {d: values[2 * i] / max(values[2 * i + 1], 1.0) for i, d in enumerate(self.valid_data)}
        row = {"kind": "valid", "step": self.step, "valid_loss": sum(losses.values()) / len(losses), "valid_loss_per_domain": losses}
        self.log.write(row)
        print(f"step {self.step:>6} | validation " + " | ".join(f"{d} {v:.4f}" for d, v in losses.items()), flush=True)

    # ---- checkpoints ----------------------------------------------------------------------

    def _save(self) -> None:
        state = {
            "scheduler": self.scheduler.state_dict(),
            "reweight_schedule": self.loss.schedule.state_dict(),
            "consumed_samples": self.step * self.cfg.train.global_batch_size,
            "config": to_dict(self.cfg),
        }
        path = self.checkpointer.save(self.step, state)
        if dist.get_rank() == 0:
            print(f"step {self.step:>6} | saved checkpoint {path}", flush=True)

    def _resume(self) -> int:
        path = self.checkpointer.latest()
        if path is None and self.cfg.checkpoint.load:
            path = Path(self.cfg.checkpoint.load)
        if path is None:
            return 0
        state = self.checkpointer.load(path)
        self.scheduler.load_state_dict(state["scheduler"])  # after the optimizer's param groups
        self.loss.schedule.load_state_dict(state["reweight_schedule"])
        if dist.get_rank() == 0:
            print(f"resumed from {path} at step {state['step']}", flush=True)
        return state["step"]
