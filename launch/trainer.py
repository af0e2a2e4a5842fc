"""The training loop: a Megatron-Core model, an engine, the reweighted loss, data and checkpoints.

Read `Trainer.train` top to bottom for the loop.  Each concern is a small module of
`launch/`: the data sources (`sources`), the datasets (`data`), the model (`model`), the
engine that steps it (`engines/`), checkpoints and metrics; the loss is
`megatron_patches.loss`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from launch.checkpoint import Checkpointer, CheckpointError, TrainerState, warn
from launch.config import Config, ConfigError, experiment_changes, to_dict
from launch.console import say
from launch.data import MicroBatchLoader, build_train_dataset, build_validation_datasets
from launch.dry_run import describe_run
from launch.engines import engine_class
from launch.metrics import MetricsLog, StepStatistics, console_line, is_reporter, reduce_to_rank0
from launch.mixing import MixedDataset
from launch.model import build_model_chunks, use_bf16
from launch.sources import DataSources
from launch.stopping import StopRequests
from launch.throughput import Throughput
from launch.watchdog import Watchdog
from launch.weights_log import weight_rows, write_weights
from megatron_patches.device import device, on_gpu
from megatron_patches.loss import ReweightedLoss
from megatron_patches.parallel import initialize_parallel
from megatron_patches.reweighting import ReweightSchedule


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


def use_tf32(cfg: Config, gpu: bool | None = None) -> bool:
    """TF32 matmuls (fp32's range, a 10-bit mantissa; several times fp32's speed on A100 and
    later) for fp32 runs on a GPU, unless `model.tf32: false`.  bf16 runs multiply in bf16, and a
    CPU has no TF32.  `gpu`: None = whether this process has one."""
    gpu = on_gpu() if gpu is None else gpu
    return gpu and cfg.model.tf32 and not use_bf16(cfg, gpu)


def reweight_schedule(cfg: Config) -> ReweightSchedule:
    r = cfg.reweight
    return ReweightSchedule(
        strategy=r.strategy,
        temperature=r.temperature,
        warmup_steps=r.warmup_steps,
        warmup_temperature=r.warmup_temperature,
        anneal_steps=r.anneal_steps,
    )


def _token_sum_loss(loss_mask, domains, token_losses, **units):
    """Validation: plain token sums, so per-domain means can be reduced exactly over ranks
    (whatever the weighting unit: `units` are not needed)."""
    mask = loss_mask.to(token_losses.dtype)
    total, count = (token_losses * mask).sum(), mask.sum()
    return total, count.to(torch.int), {"sum_count": torch.stack([total.detach(), count])}


def _forward_step(loss_fn, batches, model):
    """Megatron's `forward_step_func`: one micro-batch through the model, and its loss."""
    batch = {k: v.to(device(), non_blocking=True) for k, v in next(batches).items()}
    # data.reset_attention_mask: the SDPA attention masks by each position's document.
    output = model(batch["tokens"], batch["position_ids"], batch.get("document_ids"), labels=batch["labels"])
    units = {key: batch[key] for key in ("unit_ids", "unit_counts") if key in batch}  # reweight.unit=document
    return output, partial(loss_fn, batch["loss_mask"], batch["domains"], **units)


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        p, t = cfg.parallel, cfg.train
        initialize_parallel(
            p.tp, p.pp, p.cp, seed=t.seed, timeout_minutes=cfg.faults.collective_timeout_minutes,
            vpp=p.virtual_pipeline_size,
        )  # fmt: skip
        torch.set_float32_matmul_precision("high" if use_tf32(cfg) else "highest")
        self.micro_batches_per_step = t.micro_batches_per_step(ps.get_data_parallel_world_size())
        self.sources = DataSources.open(cfg)

        self.model_chunks = build_model_chunks(cfg, self.sources.padded_vocab_size)
        self.engine = engine_class(cfg.engine)(cfg, self.model_chunks, self.micro_batches_per_step)
        self.scheduler = lr_scheduler(cfg, self.engine.optimizer)
        self.checkpointer = Checkpointer(
            self.run_dir / "checkpoints", self.engine, cfg.checkpoint.keep, asynchronous=cfg.checkpoint.async_save
        )

        domains = self.sources.train.domains
        self.loss = ReweightedLoss(
            reweight_schedule(cfg),
            delta=cfg.reweight.delta,
            num_domains=len(domains),
            units_per_row=cfg.reweight.units_per_row,
        )

        cache = Path(cfg.data.cache_dir or self.run_dir / "data_cache")
        self.train_data = build_train_dataset(cfg, self.sources, cache)
        # data.mixing=odm: a training set whose mixture the losses move (None: a fixed blend).
        self.mixing = self.train_data if isinstance(self.train_data, MixedDataset) else None
        valid_blend = self.sources.valid or self.sources.train
        self.valid_data = build_validation_datasets(cfg, self.sources, valid_blend, cache)
        self.train_loader = MicroBatchLoader(self.train_data, cfg, t.steps)
        self.valid_loaders = {d: MicroBatchLoader(data, cfg, t.eval_iters) for d, data in self.valid_data.items()}

        self.statistics = StepStatistics(domains, documents=cfg.reweight.unit == "document")
        self.throughput = Throughput(cfg, self.sources.padded_vocab_size, dist.get_world_size())

        # What a checkpoint saves beside the engine's shards: a new stateful part is one line.
        self.trainer_state = TrainerState()
        self.trainer_state.register("scheduler", self.scheduler)
        self.trainer_state.register("reweight_schedule", self.loss.schedule)
        # A resume mid-interval logs the same rows; older checkpoints named it log_interval.
        self.trainer_state.register("step_statistics", self.statistics, formerly=("log_interval",))
        if self.mixing is not None:  # the mixture, the bandit and each domain's read position
            self.trainer_state.register("mixing", self.mixing)
        # Called in order after every optimizer step, whichever the engine. The reweighting
        # schedule is looked up at call time: launch.bench swaps it between steps.
        self.after_step: list[Callable[[], None]] = [
            partial(self.scheduler.step, increment=1),
            lambda: self.loss.schedule.advance(),
        ]
        if self.mixing is not None:
            self.after_step.append(self.mixing.end_step)

        self.resumed_from: Path | None = None
        self.step = self._resume()
        self.log = MetricsLog(
            self.run_dir, cfg.logging.tensorboard, resume_step=self.step, wandb=self._wandb_settings()
        )
        self.stop_requests = StopRequests(t.exit_duration_minutes)

    def _wandb_settings(self) -> dict | None:
        lg = self.cfg.logging
        if not lg.wandb:
            return None
        return {
            "project": lg.wandb_project,
            "mode": lg.wandb_mode,
            "name": self.run_dir.name,
            "config": to_dict(self.cfg),
        }

    def _announce(self) -> None:
        """Rank 0: what this run is (the --dry-run account) and where it starts, before the first step."""
        if dist.get_rank() != 0:
            return
        lines = describe_run(self.cfg, dist.get_world_size())
        workers = self.train_loader.num_workers
        reading = (
            f"{workers} worker processes per rank, each up to {self.cfg.data.prefetch} micro-batches ahead"
            if workers
            else "on the training thread"
        )
        lines.append(f"data: read {reading}{', into pinned memory' if on_gpu() else ''} (data.num_workers)")
        if use_tf32(self.cfg):
            lines.append("TF32 matmuls: on, an fp32 run on a GPU (model.tf32=false turns them off)")
        else:
            lines.append(f"TF32 matmuls: off ({'model.tf32=false' if on_gpu() else 'no GPU'})")
        if self.resumed_from is None:
            lines.append(f"starting at step {self.step} of {self.cfg.train.steps}")
        else:
            lines.append(f"resuming from {self.resumed_from} at step {self.step} of {self.cfg.train.steps}")
        say("\n".join(lines))

    # ---- the loop -------------------------------------------------------------------------

    def train(self) -> str | None:
        """Train to the end, or until a stop request; returns what the run stopped for, if anything."""
        t = self.cfg.train
        stop = t.steps if t.exit_after is None else min(t.steps, self.step + t.exit_after)
        self._announce()
        f = self.cfg.faults
        watchdog = Watchdog(f.hang_multiple, f.hang_min_seconds, 60 * f.hang_max_minutes, dist.get_rank())
        first = self.step
        reason = self.stop_requests.agreed(deadline=False)  # a signal during start-up: stop before training
        while self.step < stop and reason is None:
            watchdog.step_started(self.step + 1)
            start = time.perf_counter()
            reports, grad_norm = self.train_step()
            self.step += 1
            seconds = time.perf_counter() - start
            watchdog.step_finished(self.step, seconds)
            self.statistics.add(reports, grad_norm, seconds)
            if self.cfg.logging.weights_every and self.step % self.cfg.logging.weights_every == 0:
                self._log_weights(reports)
            last = self.step == t.steps
            if self.step % t.log_interval == 0 or last:
                self._log_train()
            if self.valid_data and (self.step % t.eval_interval == 0 or last):
                self._evaluate()
            reason = self.stop_requests.agreed()
            self.checkpointer.poll()
            if self.step % self.cfg.checkpoint.interval == 0 or self.step == stop or reason:
                self._save()
        self.checkpointer.finish_pending()
        self.train_loader.close()
        watchdog.stop()
        if reason and dist.get_rank() == 0:
            saved = "checkpoint saved" if self.step > first else "nothing trained since the last checkpoint"
            say(f"stopping on {reason} at step {self.step}; {saved}; rerun to resume")
        self.log.close()
        return reason

    def train_step(self) -> tuple[list[dict], float]:
        """One optimizer step on the global batch at `self.step`: loss reports and grad norm."""
        if self.mixing is not None:  # the draw of this step, from the mixture the last update left
            self.mixing.start_step(self.step)
        batches = self.train_loader.micro_batches(self.step)
        reports = self.engine.forward_backward(
            partial(_forward_step, self.loss), batches, self.micro_batches_per_step, forward_only=False
        )
        grad_norm = self.engine.step()
        if self.mixing is not None:
            self.mixing.observe(reports)
        for hook in self.after_step:
            hook()
        return reports, grad_norm

    # ---- metrics --------------------------------------------------------------------------

    def _log_train(self) -> None:
        means = self.statistics.means()
        if means is None:
            return
        strategy, temperature = self.loss.schedule.current()
        row = {
            "kind": "train",
            "step": self.step,
            **means.statistics,
            "lr": self.engine.optimizer.param_groups[0]["lr"],
            "grad_norm": means.grad_norm,
            "step_time_s": means.step_time_s,
            **self.throughput.row(means.step_time_s),
            "reweight_strategy": strategy,
            "reweight_temperature": temperature,
            "domain_weight_share": means.domain_weight_share,
            "domain_sample_share": means.domain_sample_share,
            "domain_mixture": dict(zip(self.sources.train.domains, self._mixture())),
        }
        self.log.write(row)
        say(console_line(row, self.cfg.train.steps, mixture=self.mixing is not None))

    def _mixture(self) -> list[float]:
        """The domain weights that drew the last step's samples."""
        return self.sources.train.weights if self.mixing is None else self.mixing.step_mixture

    def _log_weights(self, reports: list[dict]) -> None:
        """The step's first global micro-batch: its samples start at the global batch's first index."""
        if not is_reporter():
            return
        first_index = (self.step - 1) * self.cfg.train.global_batch_size
        domains = self.sources.train.domains
        rows = weight_rows(self.train_data, first_index, self.step, domains, reports[0], self.loss.units_per_row)
        write_weights(self.run_dir, self.step, rows)

    def _evaluate(self) -> None:
        """Held-out token-mean loss per domain, on the same samples every time."""
        for chunk in self.model_chunks:
            chunk.eval()
        iters = self.cfg.train.eval_iters
        sums = []
        with torch.no_grad():
            for loader in self.valid_loaders.values():
                reports = self.engine.forward_backward(
                    partial(_forward_step, _token_sum_loss),
                    loader.micro_batches(0, iters),
                    iters * self.micro_batches_per_step,
                    forward_only=True,
                )
                total = torch.stack([r["sum_count"] for r in reports]).sum(0) if reports else torch.zeros(2)
                sums.append(total.to(torch.float64).cpu())
        for chunk in self.model_chunks:
            chunk.train()
        # Every DP and CP rank of the last stage holds part of the tokens: add them all.
        contributes = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
        values = reduce_to_rank0(torch.cat(sums), contributes)
        if values is None:
            return
        losses = {d: values[2 * i] / max(values[2 * i + 1], 1.0) for i, d in enumerate(self.valid_data)}
        row = {
            "kind": "valid",
            "step": self.step,
            "valid_loss": sum(losses.values()) / len(losses),
            "valid_loss_per_domain": losses,
        }
        self.log.write(row)
        say(f"step {self.step:>6} | validation " + " | ".join(f"{d} {v:.4f}" for d, v in losses.items()))

    # ---- checkpoints ----------------------------------------------------------------------

    def _save(self) -> None:
        self.checkpointer.save(self.step, {**self.trainer_state.state_dict(), "config": to_dict(self.cfg)})

    def _check_same_experiment(self, path: Path, saved: dict) -> None:
        """`saved`: the checkpoint's trainer state (its config, and the layout it was saved under)."""
        changes = experiment_changes(
            saved["config"], self.cfg, saved_dp=saved["layout"]["dp"], dp=ps.get_data_parallel_world_size()
        )
        if not changes:
            return
        if not self.cfg.checkpoint.allow_config_change:
            raise ConfigError(
                f"this run resumes {path} but changes the experiment:\n  "
                + "\n  ".join(changes)
                + "\nuse another --run-dir, or --set checkpoint.allow_config_change=true to go on anyway"
            )
        warn("resuming with a changed experiment (checkpoint.allow_config_change): " + "; ".join(changes))

    def _resume(self) -> int:
        """The newest checkpoint that verifies and loads (else `checkpoint.load`, else none)."""
        candidates = self.checkpointer.complete_checkpoints() if self.checkpointer.root.is_dir() else []
        if not candidates and self.cfg.checkpoint.load:
            candidates = [Path(self.cfg.checkpoint.load)]
        for path in candidates:
            try:
                state = self.checkpointer.load(path)
            except CheckpointError as error:
                warn(f"checkpoint {path} is incomplete or corrupted, not used: {error}; trying an earlier one")
                continue
            self._check_same_experiment(path, state)
            self.trainer_state.load_state_dict(state, path)
            self.resumed_from = path
            return state["step"]
        if candidates:  # a partly loaded model must not train on as if it were fresh
            raise CheckpointError(
                f"no checkpoint of {self.checkpointer.root} could be used (see the warnings above):"
                " move them aside to start afresh, or point checkpoint.load at a good one"
            )
        return 0
