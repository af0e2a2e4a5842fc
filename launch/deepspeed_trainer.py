"""The training loop on DeepSpeed ZeRO (`engine: deepspeed`).

The same Megatron-Core GPTModel (tensor parallelism included), data order, reweighted loss,
metrics, validation and checkpoint discipline as `launch.trainer.Trainer`; only the engine
differs: DeepSpeed partitions the optimizer state (ZeRO-1), gradients (ZeRO-2) and
parameters (ZeRO-3) over the data-parallel group, reduces the gradients and clips them.
`megatron_patches.deepspeed` explains why a step computes exactly the Megatron engine's
gradient.  The optimizer is torch's AdamW with Megatron's parameter groups and the learning
rate comes from Megatron's own `OptimizerParamScheduler`, so both engines follow one
schedule, and the optimizer needs no compiled DeepSpeed op.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from functools import partial
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from launch.checkpoint import PREFIX, STATE_FILE, Checkpointer, _rng_state, _set_rng_state, _write_json_atomically
from launch.config import Config, ConfigError, _deep_merge, resolve_blend, resolve_valid_blend, to_dict
from launch.data import build_train_dataset, build_validation_datasets, micro_batches
from launch.metrics import MetricsLog
from launch.model import build_model, use_bf16
from launch.trainer import Trainer
from megatron_patches.deepspeed import MegatronMPU, forward_backward, optimizer_param_groups
from megatron_patches.loss import ReweightedLoss
from megatron_patches.parallel import initialize_parallel
from megatron_patches.reweighting import ReweightSchedule

# DeepSpeed's model-states files: `mp_rank_XX_...` per TP rank, `zero_pp_rank_N_mp_rank_XX_...` under ZeRO-3.
MODEL_STATES = "*model_states.pt"


def deepspeed_config(cfg: Config, micro_batches_per_step: int) -> dict:
    """DeepSpeed's settings from the run config, with `deepspeed.config` (a JSON) merged over them.

    The JSON may add settings (e.g. offloading, bucket sizes) but not contradict the run
    config: batch sizes, accumulation, clipping, precision and the ZeRO stage define the
    step that both engines must compute, so each has one place to be set.
    """
    step = {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": micro_batches_per_step,
        # The loop calls engine.step() once per global batch, like Megatron's optimizer.step().
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": use_bf16(cfg)},
    }
    settings = {**step, "log_level": "warning"}  # DeepSpeed's INFO lines would drown the step lines
    if cfg.deepspeed.config is None:
        return settings
    try:
        extra = json.loads(Path(cfg.deepspeed.config).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"deepspeed.config {cfg.deepspeed.config} is not a readable JSON file ({error})") from None
    for section in ("optimizer", "scheduler"):
        if section in extra:
            raise ConfigError(
                f"deepspeed.config sets {section!r}: the optimizer and LR schedule come from optim.* in the run config"
            )
    merged = _deep_merge(settings, extra)
    conflicts = [key for key in _dotted_keys(step) if _lookup(merged, key) != _lookup(step, key)]
    if conflicts:
        raise ConfigError(
            f"deepspeed.config {cfg.deepspeed.config} contradicts the run config on {', '.join(conflicts)}:"
            " set train.*, optim.clip_grad, model.precision or deepspeed.zero_stage instead"
        )
    return merged


def _dotted_keys(settings: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in settings.items():
        keys += _dotted_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]
    return keys


def _lookup(settings: dict, dotted: str):
    for key in dotted.split("."):
        settings = settings.get(key) if isinstance(settings, dict) else None
    return settings


def build_engine(cfg: Config, model: torch.nn.Module, micro_batches_per_step: int):
    """DeepSpeed's engine around `model`, and the torch optimizer whose LR the scheduler sets."""
    o = cfg.optim
    optimizer_class = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    optimizer = optimizer_class(
        optimizer_param_groups(model), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, micro_batches_per_step), mpu=MegatronMPU()
    )
    return engine, optimizer


def lr_scheduler(cfg: Config, optimizer) -> OptimizerParamScheduler:
    """Warm-up then decay, and weight decay per parameter group: Megatron's scheduler, as in `Trainer`."""
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


def _layout() -> dict[str, int]:
    return dict(tp=ps.get_tensor_model_parallel_world_size(), dp=ps.get_data_parallel_world_size())


class DeepSpeedCheckpointer(Checkpointer):
    """`Checkpointer`'s directory discipline (`.tmp` name, rename by rank 0 after a barrier,
    trainer_state.json last, newest complete one loaded) with DeepSpeed writing the shards.

    DeepSpeed's files: the model states per TP rank (with our RNG state as client state,
    replicated over DP like Megatron's; per rank under ZeRO-3) and the ZeRO partitions per
    rank.  ZeRO partitions load only into the same TP and DP sizes.
    """

    def save(self, step: int, engine, trainer_state: dict) -> Path:
        final = self.root / f"{PREFIX}{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if dist.get_rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(f"{PREFIX}*.tmp"):
                shutil.rmtree(stale)
        dist.barrier()
        engine.save_checkpoint(str(self.root), tag=tmp.name, client_state={"rng_state": _rng_state()}, save_latest=False)
        dist.barrier()
        if dist.get_rank() == 0:
            _write_json_atomically(tmp / STATE_FILE, {**trainer_state, "step": step, "layout": _layout()})
            if final.exists():  # the same step saved again (a rerun of a finished run)
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        dist.barrier()
        return final

    def complete_checkpoints(self) -> list[Path]:
        """Finished DeepSpeed checkpoints, newest first."""
        found = [p for p in self.root.glob(f"{PREFIX}*") if p.is_dir() and not p.name.endswith(".tmp")]
        found.sort(key=lambda p: int(p.name[len(PREFIX) :]), reverse=True)
        complete = []
        for path in found:
            if (path / STATE_FILE).is_file() and any(path.glob(MODEL_STATES)):
                complete.append(path)
            elif not complete:
                warnings.warn(f"checkpoint {path} is incomplete (no {STATE_FILE} or {MODEL_STATES}); using an earlier one")
        return complete

    def load(self, path: Path, engine) -> dict:
        """Restore model, ZeRO optimizer state and RNG; returns the trainer state."""
        if not any(path.glob(MODEL_STATES)):
            raise RuntimeError(f"{path} is not a DeepSpeed checkpoint (no {MODEL_STATES}); engine=megatron wrote it?")
        trainer_state = json.loads((path / STATE_FILE).read_text())
        if trainer_state["layout"] != _layout():
            raise RuntimeError(
                f"checkpoint {path} was written with layout {trainer_state['layout']} and this run is {_layout()}:"
                " ZeRO partitions load only into the same parallel.tp and number of processes"
            )
        _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
        _set_rng_state(client_state["rng_state"])
        return trainer_state


class DeepSpeedTrainer(Trainer):
    """`Trainer`'s loop, metrics and validation on a DeepSpeed engine.

    Only what touches the engine is redefined here: construction, the step, the
    forward/backward of a global batch, and checkpoints.  The engine stands where Trainer
    keeps Megatron's DDP wrapper (`self.ddp`): validation runs forward through it and
    switches it between eval and train.
    """

    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        p, t = cfg.parallel, cfg.train
        if p.sequence_parallel:
            raise ConfigError(
                "parallel.sequence_parallel=true needs engine=megatron: DeepSpeed does not reduce the"
                " layer-norm gradients over the tensor-parallel group; set it to false"
            )
        initialize_parallel(p.tp, p.pp, p.cp, seed=t.seed)
        self.micro_batches_per_step = t.global_batch_size // (t.micro_batch_size * ps.get_data_parallel_world_size())

        self.model = build_model(cfg)
        self.engine, self.optimizer = build_engine(cfg, self.model, self.micro_batches_per_step)
        self.ddp = self.engine  # Trainer's validation runs forward through it and toggles eval/train
        self.scheduler = lr_scheduler(cfg, self.optimizer)

        r = cfg.reweight
        self.blend = resolve_blend(cfg)
        schedule = ReweightSchedule(r.strategy, r.temperature, r.warmup_steps, r.warmup_temperature, r.anneal_steps)
        self.loss = ReweightedLoss(schedule, delta=r.delta, num_domains=len(self.blend.domains))

        cache = Path(cfg.data.cache_dir or self.run_dir / "data_cache")
        self.train_data = build_train_dataset(cfg, self.blend, cache)
        valid_blend = resolve_valid_blend(cfg) or self.blend
        self.valid_data = build_validation_datasets(cfg, valid_blend, cache) if t.eval_interval > 0 else {}

        self.checkpointer = DeepSpeedCheckpointer(self.run_dir / "checkpoints", keep=cfg.checkpoint.keep)
        self.step = self._resume()
        self.log = MetricsLog(self.run_dir, cfg.logging.tensorboard, resume_step=self.step)

    def _train_step(self) -> tuple[torch.Tensor, float]:
        reports = self._forward_backward(
            micro_batches(self.train_data, self.cfg, self.step), self.loss, self.micro_batches_per_step, forward_only=False
        )
        self.engine.step()  # reduces what is left, clips, steps, zeroes the gradients
        self.scheduler.step(increment=1)
        self.loss.schedule.advance()
        grad_norm = self.engine.get_global_grad_norm()
        # ZeRO stage 0 clips with a plain torch optimizer and keeps no norm: logged as NaN.
        return self._step_statistics(reports), float("nan") if grad_norm is None else float(grad_norm)

    def _forward_backward(self, batches, loss_fn, num_microbatches: int, forward_only: bool) -> list[dict]:
        return forward_backward(self.engine, partial(self._forward_step, loss_fn), batches, num_microbatches, forward_only)

    def _save(self) -> None:
        state = {
            "scheduler": self.scheduler.state_dict(),
            "reweight_schedule": self.loss.schedule.state_dict(),
            "consumed_samples": self.step * self.cfg.train.global_batch_size,
            "config": to_dict(self.cfg),
        }
        path = self.checkpointer.save(self.step, self.engine, state)
        if dist.get_rank() == 0:
            print(f"step {self.step:>6} | saved checkpoint {path}", flush=True)

    def _resume(self) -> int:
        path = self.checkpointer.latest()
        if path is None and self.cfg.checkpoint.load:
            path = Path(self.cfg.checkpoint.load)
        if path is None:
            return 0
        state = self.checkpointer.load(path, self.engine)
        self.scheduler.load_state_dict(state["scheduler"])  # after DeepSpeed restored the param groups
        self.loss.schedule.load_state_dict(state["reweight_schedule"])
        if dist.get_rank() == 0:
            print(f"resumed from {path} at step {state['step']}", flush=True)
        return state["step"]
