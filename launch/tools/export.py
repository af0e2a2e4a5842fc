"""Export a run's checkpoint as a Hugging Face `transformers` model directory.

    python -m launch.tools.export --run-dir runs/gpt2 --out exports/gpt2

Each model family (`launch/models/`) maps its weights: GPT-2-style runs (learned positions,
LayerNorm, GELU) become `GPT2LMHeadModel`, Llama-style runs (RoPE, RMSNorm, SwiGLU, optional
GQA) `LlamaForCausalLM`; any other model is refused, naming what keeps each architecture from
representing it exactly. The
checkpoint is loaded with TP=PP=CP=1 in this one process (dist_checkpointing reshards
whatever layout it was saved under), model weights only. The vocabulary keeps Megatron's
padding, so the exported softmax is the trained one: logits and losses equal the run's.
The run's tokenizer goes with it: a SentencePiece model is copied and converted to a
`tokenizer.json` that encodes exactly as SentencePiece does; a Hugging Face `tokenizer.json` is
copied with a `tokenizer_config.json` naming the run's EOS. Everything is written to `OUT.tmp`
and renamed when complete.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from launch import quiet

quiet.install()  # before anything imports Megatron-Core, DeepSpeed or transformers

import sentencepiece  # noqa: E402
import torch  # noqa: E402

from data_prep.errors import DataPrepError  # noqa: E402
from data_prep.tokenizer import TOKENIZER_CONFIG, HuggingFaceTokenizer, load_tokenizer  # noqa: E402
from launch.models import FAMILIES  # noqa: E402
from launch.models.family import ModelFamily  # noqa: E402

EXAMPLES = """\
examples:
  python -m launch.tools.export --run-dir runs/gpt2 --out exports/gpt2
  python -m launch.tools.export --run-dir runs/l7 --step 20000 --out exports/l7-20k
  python -m launch.tools.export --run-dir runs/demo/linupper --out exports/demo \\
      --tokenizer-model data/demo/tokenizer.model   # when the run's path no longer resolves

Then, offline:
  AutoModelForCausalLM.from_pretrained("exports/gpt2"); AutoTokenizer.from_pretrained("exports/gpt2")
"""


class ExportError(Exception):
    """A checkpoint or model that cannot be exported; the message says what to change."""


# --------------------------------------------------------------------------- loading


class LoadedCheckpoint(NamedTuple):
    model: torch.nn.Module  # Megatron-Core GPTModel, fp32, on CPU, in eval mode
    tokenizer_model: str | None  # the run's SentencePiece model or tokenizer.json (data.tokenizer_model)
    eos_token: str | None  # data.eos_token
    step: int
    path: Path


@contextlib.contextmanager
def load_checkpoint(run_dir: Path, step: int | None = None) -> Iterator[LoadedCheckpoint]:
    """The run's model at `step` (default: the newest complete checkpoint) in this process.

    The only place that knows the launch code: the config saved with the checkpoint, the
    model builder and the checkpoint layout. The model is built with TP=PP=CP=1 on a gloo
    world of one (no port, no torchrun) and the padding rule of the layout it was trained
    under, so the embedding keeps the saved shape; only the model's shards are read.
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from launch.checkpoint import STATE_FILE, Checkpointer, verify
    from launch.config import from_dict
    from launch.engines.megatron import Engine as MegatronEngine
    from launch.model import build_model
    from launch.sources import padded_vocab_size, vocab_size
    from megatron_patches.parallel import destroy_parallel, initialize_parallel

    checkpoints = Path(run_dir) / "checkpoints"
    if not checkpoints.is_dir():
        raise ExportError(f"{checkpoints} does not exist: give --run-dir a run directory of launch.pretrain")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        initialize_parallel(1, 1, 1)
        complete = Checkpointer(checkpoints, MegatronEngine).complete_checkpoints()
        steps = {json.loads((p / STATE_FILE).read_text())["step"]: p for p in complete}
        if not steps:
            raise ExportError(
                f"no complete checkpoint in {checkpoints}: train until one is saved (checkpoint.interval)"
            )
        if step is not None and step not in steps:
            raise ExportError(f"no complete checkpoint of step {step} in {checkpoints}; complete ones: {sorted(steps)}")
        chosen = max(steps) if step is None else step
        problem = verify(steps[chosen])
        if problem is not None:
            raise ExportError(f"{steps[chosen]} failed verification: {problem}; export another --step")
        state = json.loads((steps[chosen] / STATE_FILE).read_text())
        cfg = from_dict(state["config"])
        if cfg.engine != "megatron":
            raise ExportError(
                f"{steps[chosen]} was written by engine={cfg.engine}; only engine=megatron checkpoints are exported"
            )
        saved_tp = state["layout"]["tp"]
        cfg = dataclasses.replace(
            cfg,
            model=dataclasses.replace(
                cfg.model,
                precision="fp32",
                transformer_impl="local",
                make_vocab_size_divisible_by=cfg.model.make_vocab_size_divisible_by * saved_tp,
            ),
            parallel=dataclasses.replace(cfg.parallel, tp=1, pp=1, cp=1, sequence_parallel=False),
        )
        model = build_model(cfg, padded_vocab_size(cfg, vocab_size(cfg)))
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(steps[chosen]))
        model.load_state_dict(loaded["model"])
        yield LoadedCheckpoint(model.eval(), cfg.data.tokenizer_model, cfg.data.eos_token, chosen, steps[chosen])
    finally:
        destroy_parallel()


# --------------------------------------------------------------------------- architectures


def _common_problems(model) -> list[str]:
    """What no exported architecture represents."""
    c = model.config
    problems = []
    if c.num_moe_experts or c.multi_latent_attention or c.qk_layernorm or c.window_size is not None:
        problems.append(
            "mixture-of-experts, multi-latent attention, QK layer norm and sliding windows are not exported"
        )
    if c.apply_residual_connection_post_layernorm or c.layernorm_zero_centered_gamma:
        problems.append("post-layer-norm residuals and zero-centred gamma are not exported")
    if c.softmax_scale is not None and abs(c.softmax_scale * c.kv_channels**0.5 - 1) > 1e-6:
        problems.append(f"softmax_scale={c.softmax_scale} is not 1/sqrt(head dim)")
    if c.add_qkv_bias and not c.add_bias_linear:
        problems.append("a QKV bias without the other linear biases (add_qkv_bias) is not exported")
    if getattr(model, "mtp_process", False):
        problems.append("multi-token prediction heads are not exported")
    return problems


def choose_architecture(model) -> ModelFamily:
    """The family whose Hugging Face class computes exactly what this GPTModel computes, or
    ExportError listing, per architecture, what would have to change."""
    common = _common_problems(model)
    problems = {family.hf_name: common + family.hf_problems(model) for family in FAMILIES.values()}
    for family in FAMILIES.values():
        if not problems[family.hf_name]:
            return family
    lines = [f"  {name}: " + "; ".join(found) for name, found in problems.items()]
    raise ExportError(
        "neither Hugging Face architecture represents this model exactly:\n"
        + "\n".join(lines)
        + (
            "\nchange the run's model config to one of the two styles"
            " (see configs/gpt2-124m.yaml, configs/llama-1.4b.yaml)"
        )
    )


def to_hugging_face(model, bos_id: int | None = None, eos_id: int | None = None):
    """The transformers model (GPT2LMHeadModel or LlamaForCausalLM) equal to a Megatron GPTModel."""
    family = choose_architecture(model)
    meg = {k: v.detach().float().cpu() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    tied = model.share_embeddings_and_output_weights
    hf_model, hf = family.hf_model(model, meg, bos_id, eos_id)
    if not tied:
        hf["lm_head.weight"] = meg["output_layer.weight"]
    missing, unexpected = hf_model.load_state_dict(hf, strict=False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping out of step with transformers: missing {missing}, unexpected {unexpected}")
    hf_model.tie_weights()
    return hf_model.eval()


# --------------------------------------------------------------------------- tokenizer


def hugging_face_tokenizer(model_file: str, max_length: int):
    """A `tokenizers` BPE that encodes exactly as the SentencePiece BPE model: the same
    vocabulary, merges ranked by piece score, byte fallback, and SentencePiece's dummy
    prefix added even before leading spaces (which tokenizers' Metaspace would skip).
    Special-token text is encoded as text, as SentencePiece does."""
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_sentencepiece import SentencePieceExtractor

    sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
    trainer_spec = _sentencepiece_trainer_spec(sp)
    if trainer_spec.model_type != trainer_spec.BPE or not trainer_spec.byte_fallback:
        raise ExportError(
            f"{model_file} is not a byte-fallback BPE SentencePiece model; the export converts those only"
            " (python -m data_prep train-tokenizer --model-type bpe, the default, makes one)"
        )
    vocab, _, merges = SentencePieceExtractor(model_file).extract()
    special = {
        name: sp.id_to_piece(i)
        for name, i in (("unk", sp.unk_id()), ("bos", sp.bos_id()), ("eos", sp.eos_id()))
        if i >= 0
    }
    bpe = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=special.get("unk"), fuse_unk=True, byte_fallback=True))
    bpe.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    bpe.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        unk_token=special.get("unk"),
        bos_token=special.get("bos"),
        eos_token=special.get("eos"),
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
        model_max_length=max_length,
    )


def _write_sentencepiece_tokenizer(converted, model_file: str, folder: Path) -> None:
    converted.save_pretrained(folder)
    shutil.copyfile(model_file, folder / "sentencepiece.model")


def _copy_hugging_face_tokenizer(tokenizer: HuggingFaceTokenizer, max_length: int, folder: Path) -> None:
    """The run's tokenizer.json as it is, and its tokenizer_config.json (if it had one) naming the
    EOS the run ended documents with; special-token text is split as data_prep encoded it."""
    shutil.copyfile(tokenizer.path, folder / "tokenizer.json")
    config_path = Path(tokenizer.path).with_name(TOKENIZER_CONFIG)
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    config.setdefault("model_max_length", max_length)
    config.update(eos_token=tokenizer.eos_token, split_special_tokens=True, clean_up_tokenization_spaces=False)
    (folder / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2))


def _sentencepiece_trainer_spec(sp):
    from sentencepiece import sentencepiece_model_pb2

    return sentencepiece_model_pb2.ModelProto.FromString(sp.serialized_model_proto()).trainer_spec


# --------------------------------------------------------------------------- command line


def export(
    run_dir: Path, out: Path, step: int | None = None, tokenizer_model: str | None = None, force: bool = False
) -> Path:
    """Write the model and tokenizer of `run_dir`'s checkpoint to `out`; returns `out`."""
    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"{out} exists: remove it, pass --force to replace it, or choose another --out")
    with load_checkpoint(run_dir, step) as loaded:
        model_file = tokenizer_model or loaded.tokenizer_model
        if model_file is None or not Path(model_file).is_file():
            raise ExportError(
                f"the run's tokenizer {model_file} is not there: pass --tokenizer-model PATH.model (or tokenizer.json)"
            )
        try:
            run_tokenizer = load_tokenizer(model_file, loaded.eos_token)
        except DataPrepError as error:
            raise ExportError(str(error)) from None
        if run_tokenizer.vocab_size > loaded.model.vocab_size:
            raise ExportError(
                f"{model_file} has {run_tokenizer.vocab_size} tokens, more than the model's {loaded.model.vocab_size}:"
                " it is not the run's tokenizer"
            )
        max_length = loaded.model.max_position_embeddings
        if isinstance(run_tokenizer, HuggingFaceTokenizer):
            bos_id = None  # training adds none
            write_tokenizer = functools.partial(_copy_hugging_face_tokenizer, run_tokenizer, max_length)
        else:
            bos_id = _id(run_tokenizer.processor.bos_id())
            converted = hugging_face_tokenizer(model_file, max_length)  # refuses a model it cannot convert
            write_tokenizer = functools.partial(_write_sentencepiece_tokenizer, converted, model_file)
        hf_model = to_hugging_face(loaded.model, bos_id=bos_id, eos_id=run_tokenizer.eos_id)
        info = {
            "run_dir": str(Path(run_dir).resolve()),
            "step": loaded.step,
            "checkpoint": str(loaded.path.resolve()),
            "architecture": type(hf_model).__name__,
            "vocab_size": loaded.model.vocab_size,  # Megatron's padded size, as trained
            "tokenizer_vocab_size": run_tokenizer.vocab_size,
        }
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hf_model.save_pretrained(tmp)
    write_tokenizer(tmp)
    (tmp / "export_info.json").write_text(json.dumps(info, indent=2))
    _modes_as_the_umask_says(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _modes_as_the_umask_says(folder: Path) -> None:
    """save_pretrained writes the weights through a private temporary file (mode 0600); an export
    is for others to read, so every file gets the mode a plain write would give it."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _id(token_id: int) -> int | None:
    return token_id if token_id >= 0 else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.tools.export",
        description="Export a checkpoint of a launch.pretrain run as a Hugging Face transformers model "
        "(GPT2LMHeadModel or LlamaForCausalLM) with its tokenizer. Runs on CPU, in one process.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--run-dir", required=True, type=Path, help="the run directory (holds checkpoints/)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest complete checkpoint)")
    parser.add_argument(
        "--out", required=True, type=Path, help="model directory to write (written as OUT.tmp, then renamed)"
    )
    parser.add_argument(
        "--tokenizer-model",
        help="SentencePiece model or tokenizer.json (default: the run's data.tokenizer_model, with its data.eos_token)",
    )
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    # A CPU job in fp32; hide GPUs before anything initialises CUDA.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # save_pretrained's bar for writing one file is noise
    try:
        out = export(args.run_dir, args.out, args.step, args.tokenizer_model, args.force)
    except ExportError as error:
        print(f"export error: {error}", file=sys.stderr)
        return 2
    info = json.loads((out / "export_info.json").read_text())
    print(f"exported step {info['step']} of {args.run_dir} as {info['architecture']} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
