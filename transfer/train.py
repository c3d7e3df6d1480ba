"""Tokenizer transfer / cross-tokenizer distillation training loop (ALM, SFT, latents).

One function, :func:`train`, runs a :class:`~transfer.config.RunConfig` through ``accelerate``,
so the same code runs on a CPU, one GPU, or several with ``accelerate launch`` (DDP or FSDP;
several CPU processes: ``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N -m
transfer.cli run ...``; note that ``accelerate launch --cpu`` starts ONE process whatever
``--num_processes`` says, accelerate's single-process launcher):

* the teacher is frozen (eval mode, no grad); the student is the teacher's weights (self-transfer)
  or another model (distillation), FVT-initialised when its tokenizer changes
  (:mod:`transfer.fvt`), then trained with LoRA adapters (peft) plus trainable embeddings and
  head, or fully;
* each optimizer step takes ``train.batch_size`` examples from a resumable shuffled order
  (split over processes and ``grad_accum`` micro-batches); the collator tokenizes with both
  tokenizers and aligns on the CPU (:mod:`transfer.data`); the loss terms come from
  :mod:`transfer.losses`; AdamW, warmup + linear decay, gradient clipping, bf16 autocast or fp32
  (``train.dtype: auto``: bf16 where the hardware has it natively, :mod:`transfer.precision`);
* with ``grad_accum`` micro-batches (or several processes) each loss term is normalised over
  the whole step's units, as one big batch would be (:mod:`transfer.train_units`);
* checkpoints (trainable weights and optimizer tensors as safetensors; schedule, RNG states,
  data position and step as JSON; no pickles) are written to a temporary folder, fsynced and
  renamed into place; ``resume=True`` continues from the newest one exactly where the run
  stopped;
* the run logs JSON lines (and a CSV copy) and a loss plot, evaluates held-out bits per byte, and ends with an
  HF folder (LoRA merged, the student's tokenizer and chat template) under ``<dir>/model``,
  written beside the previous one and swapped in (:mod:`transfer.durable`).

Modules: `transfer.train_setup` (accelerator, models, adapters, optimizer, schedule),
`transfer.train_checkpoints` (checkpoint files, resume checks), `transfer.train_state` (optimizer,
schedule and RNG states as JSON / safetensors), `transfer.train_loss` (the loss terms of a
micro-batch), `transfer.train_units` (the micro-batches' weights in a step), `transfer.durable`
(fsync, folder swaps) and this one (the loop, one small function per phase). Every public name of
`train_setup`, `train_checkpoints` and `train_loss` is importable from here.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml

from . import losses
from .config import RunConfig, resolve_text
from .data import Example, PairCollator, ShuffledOrder, Side, load_examples
from .durable import recover_swap, replace_folder
from .errors import ConfigError, DataError
from .evaluate import bits_per_byte, read_windows
from .precision import announce, short_name
from .runlog import RunLog, plot_losses, write_csv

# Re-exported: callers and tests use these as `transfer.train.<name>`.
from .train_checkpoints import (  # noqa: F401
    CHECKPOINTS,
    CONFIG_FILE,
    MODEL_DIR,
    STATE_FILE,
    TRAINABLE_FILE,
    Resumable,
    _check_output,
    checkpoint_dirs,
    checkpoint_step,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from .train_loss import compute_losses, teacher_outputs
from .train_setup import (  # noqa: F401
    Models,
    _accelerator,
    add_adapters,
    build_models,
    embedding_parameter_ids,
    last_layer_parameters,
    lr_factor,
    make_optimizer,
    make_scheduler,
    trainable_parameters,
)
from .train_units import micro_weights, unit_counts

# --------------------------------------------------------------------------------------------
# The loop


def _to(batch: dict[str, torch.Tensor], device: Any) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _export_log(log: RunLog, out: Path, cfg: RunConfig) -> None:
    """``log.csv`` and ``loss.png`` from the JSON-lines log."""
    records = log.records()
    write_csv(records, out / "log.csv")
    plot_losses(records, out / "loss.png", title=f"{'+'.join(cfg.loss.terms)} {out.name}")


def _check_chat(examples: list[Example], models: Models) -> None:
    if any(e.messages is not None for e in examples):
        for name, tok in (("teacher", models.teacher_tok), ("student", models.student_tok)):
            if not getattr(tok, "chat_template", None):
                raise DataError(f"the data holds chat messages but the {name} tokenizer has no chat template")




@dataclass
class _Run:
    """What a run carries from step to step (the loop's helpers read and update it)."""

    cfg: RunConfig
    out: Path
    accelerator: Any
    dtype: torch.dtype
    why: str  # why that compute dtype (train.dtype: auto decides from the hardware)
    models: Models
    student: Any  # as prepared by accelerate (DDP / FSDP wrapped)
    teacher: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    order: ShuffledOrder
    collator: PairCollator
    examples: list[Example]
    eval_windows: list
    balance: Optional[list[torch.nn.Parameter]]  # last-layer parameters for loss.balance
    weights: dict[str, float]
    clip_params: list[torch.nn.Parameter]
    micro: int  # examples per micro-batch of this process
    log: RunLog
    step: int = 0
    tokens_seen: int = 0
    elapsed: float = 0.0
    factors: Optional[dict[str, float]] = None  # gradient-balancing factors, refreshed every loss.balance_every steps
    bar: Any = None


def _load_data(cfg: RunConfig) -> tuple[list[Example], list]:
    """The training examples and the held-out evaluation windows (none without data.eval)."""
    train_paths = [resolve_text(spec) for spec in cfg.data.train]
    eval_path = resolve_text(cfg.data.eval) if cfg.data.eval else None
    chunk_bytes = cfg.data.chunk_bytes or 5 * cfg.data.seq_len
    examples = [ex for path in train_paths for ex in load_examples(path, cfg.data.format, chunk_bytes)]
    eval_windows = read_windows(eval_path, max_bytes=cfg.output.eval_bytes) if eval_path and cfg.output.eval_bytes else []
    return examples, eval_windows


def _setup(cfg: RunConfig, out: Path, examples: list[Example], eval_windows: list) -> _Run:
    """Accelerator, models, optimizer, schedule, data order and collator, prepared for the run."""
    from accelerate.utils import set_seed

    accelerator, dtype, why = _accelerator(cfg)
    per_process = cfg.train.batch_size // accelerator.num_processes
    if cfg.train.batch_size % (accelerator.num_processes * cfg.train.grad_accum):
        raise ConfigError(
            f"train.batch_size ({cfg.train.batch_size}) must be a multiple of processes x train.grad_accum "
            f"({accelerator.num_processes} x {cfg.train.grad_accum})"
        )
    set_seed(cfg.train.seed)
    models = build_models(cfg, dtype)
    _check_chat(examples, models)
    student = add_adapters(models.student, cfg)
    optimizer = make_optimizer(student, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    order = ShuffledOrder(len(examples), cfg.data.seed)
    collator = PairCollator(Side(models.teacher_tok, models.teacher_tok.chat_template),
                            Side(models.student_tok, models.student_template), cfg.data.seq_len)
    student, optimizer = accelerator.prepare(student, optimizer)
    teacher = models.teacher.to(accelerator.device)
    models.teacher_space = models.teacher_space.to(accelerator.device)
    models.student_space = models.student_space.to(accelerator.device)
    balance = last_layer_parameters(accelerator.unwrap_model(student)) if cfg.loss.balance else None
    weights = {t: cfg.loss_weight(t) for t in cfg.loss.terms}
    # All of the student's parameters (frozen ones have no gradient): under FSDP accelerate then
    # uses the sharded model's own clip_grad_norm_, which computes the global norm.
    clip_params = list(student.parameters())
    return _Run(cfg=cfg, out=out, accelerator=accelerator, dtype=dtype, why=why, models=models, student=student,
                teacher=teacher, optimizer=optimizer, scheduler=scheduler, order=order, collator=collator,
                examples=examples, eval_windows=eval_windows, balance=balance, weights=weights,
                clip_params=clip_params, micro=per_process // cfg.train.grad_accum, log=RunLog(out / "log.jsonl"))


def _resumable(run: _Run) -> Resumable:
    return Resumable(run.accelerator, run.student, run.optimizer, run.scheduler)


def _start(run: _Run, latest: Optional[Path]) -> None:
    """Save the run's config and clear what a kill left half done (a checkpoint being written, a
    model folder being swapped); on resume, load checkpoint `latest` (weights, optimizer,
    schedule, data order, RNG states, step counters, balancing factors) and drop what came
    after it."""
    accelerator, out = run.accelerator, run.out
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(yaml.safe_dump(run.cfg.to_dict(), sort_keys=False), encoding="utf-8")
        recover_swap(out / MODEL_DIR)
        for partial in (out / CHECKPOINTS).glob(".tmp-step-*"):
            shutil.rmtree(partial, ignore_errors=True)
    if latest is not None:
        state = load_checkpoint(_resumable(run), latest)
        run.order.load_state_dict(state["data"])
        run.step, run.tokens_seen, run.elapsed = state["step"], state["tokens"], state["elapsed"]
        run.factors = state.get("balance")
        if accelerator.is_main_process:
            run.log.truncate_after(run.step)
    elif accelerator.is_main_process:
        run.log.truncate_after(-1)


def _evaluate(run: _Run, at: int) -> None:
    """Held-out bits per byte of the student after step `at`, logged (nothing without eval data)."""
    if not run.eval_windows:
        return
    accelerator = run.accelerator
    model = accelerator.unwrap_model(run.student)
    with accelerator.autocast():
        result = bits_per_byte(model, run.models.student_tok, run.eval_windows)
    if accelerator.is_main_process:
        run.log.write({"step": at, "eval_bpb": result.bits_per_byte, "eval_bytes": result.bytes})
        run.bar.write(f"step {at}: held-out bits per byte {result.bits_per_byte:.4f}")


def _step_weights(run: _Run, batches: list[dict[str, torch.Tensor]]) -> tuple[list[dict[str, float]], Any]:
    """(per micro-batch {term: weight of its mean}, the teacher's outputs on the first micro-batch
    or None). The weights normalise the step like one big batch (:mod:`transfer.train_units`):
    all 1 with one micro-batch on one process. Otherwise ALM's group counts need the teacher on
    every micro-batch first; its outputs on the first one are kept for its loss, the others'
    are recomputed then (an extra teacher forward per further micro-batch, to keep the memory
    of one micro-batch)."""
    cfg, accelerator = run.cfg, run.accelerator
    if cfg.train.grad_accum == 1 and accelerator.num_processes == 1:
        return [{t: 1.0 for t in cfg.loss.terms}], None
    counts, first = [], None
    for j, cpu_batch in enumerate(batches):
        batch = _to(cpu_batch, accelerator.device)
        t_out = None
        with accelerator.autocast():  # as in the loss: the same teacher logits, the same groups
            if "alm" in cfg.loss.terms:
                t_out = teacher_outputs(batch, run.teacher, cfg)
            counts.append(unit_counts(batch, None if t_out is None else t_out.logits, run.models.teacher_space, cfg))
        if j == 0:
            first = t_out
    sum_over = None if accelerator.num_processes == 1 else (lambda t: accelerator.reduce(t, reduction="sum"))
    return micro_weights(counts, accelerator.num_processes, sum_over, accelerator.device), first


def _accumulate(run: _Run, mine: list[int]) -> tuple[dict[str, float], int, dict[str, float]]:
    """Forward and backward of this process's micro-batches of one step (gradients accumulate;
    synchronised on the last), each term weighted so that the step averages over all its units.
    Returns (this process's share of the step's losses, the student's real tokens, the weight
    used per term)."""
    cfg, accelerator, student = run.cfg, run.accelerator, run.student
    batches = [run.collator([run.examples[i] for i in mine[j * run.micro : (j + 1) * run.micro]])
               for j in range(cfg.train.grad_accum)]
    n_tokens = sum(int(b["student_attention_mask"].sum()) for b in batches)
    weights, first_teacher = _step_weights(run, batches)
    sums: dict[str, float] = {}
    used: dict[str, float] = {}
    for j, cpu_batch in enumerate(batches):
        batch = _to(cpu_batch, accelerator.device)
        sync = contextlib.nullcontext() if j == cfg.train.grad_accum - 1 else accelerator.no_sync(student)
        with sync:  # the backward too: FSDP reads no_sync in its post-backward hooks
            t_out, first_teacher = first_teacher, None  # the first micro-batch's, then freed
            with accelerator.autocast():
                terms = compute_losses(batch, student, run.teacher, run.models, cfg, t_out)
                if run.balance is not None and j == 0 and (run.factors is None or run.step % cfg.loss.balance_every == 0):
                    run.factors = losses.balance_weights(terms, run.balance, _mean_over_processes(accelerator),
                                                         previous=run.factors)
                terms = {name: value * weights[j][name] for name, value in terms.items()}
                total, used = losses.combine_losses(terms, run.weights, run.factors)
            accelerator.backward(total)
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach())
        sums["loss"] = sums.get("loss", 0.0) + float(total.detach())
    return sums, n_tokens, used


def _mean_over_processes(accelerator: Any) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """Averages a tensor over the processes of a distributed run (None when there is one)."""
    if accelerator.num_processes == 1:
        return None
    return lambda tensor: accelerator.reduce(tensor, reduction="mean")


def _optimizer_step(run: _Run) -> tuple[Optional[torch.Tensor], float]:
    """Clip, step the optimizer and the schedule, clear the gradients; (gradient norm, lr used)."""
    cfg = run.cfg
    grad_norm = run.accelerator.clip_grad_norm_(run.clip_params, cfg.train.clip) if cfg.train.clip > 0 else None
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr


def _train_step(run: _Run) -> dict[str, Any]:
    """One optimizer step over `train.batch_size` examples; returns the step's log record."""
    accelerator = run.accelerator
    started = time.perf_counter()
    indices = run.order.take(run.cfg.train.batch_size)
    mine = indices[accelerator.process_index :: accelerator.num_processes]
    sums, n_tokens, used = _accumulate(run, mine)
    grad_norm, lr = _optimizer_step(run)
    run.step += 1

    stats = torch.tensor([sums[k] for k in sorted(sums)] + [float(n_tokens)], device=accelerator.device)
    stats = accelerator.reduce(stats, reduction="sum")
    n_all = float(stats[-1])
    avg = {k: float(v) / accelerator.num_processes for k, v in zip(sorted(sums), stats[:-1])}
    dt = time.perf_counter() - started
    run.elapsed += dt
    run.tokens_seen += int(n_all)
    record = {"step": run.step, "lr": lr, "tokens": run.tokens_seen, "tokens_per_s": n_all / max(dt, 1e-9),
              "step_s": dt, "elapsed": run.elapsed, "processes": accelerator.num_processes,
              **{("loss" if k == "loss" else f"loss_{k}"): v for k, v in avg.items()}}
    if grad_norm is not None:
        record["grad_norm"] = float(grad_norm)
    if run.cfg.loss.balance:
        record.update({f"weight_{k}": v for k, v in used.items()})
    return record


def _after_step(run: _Run, record: dict[str, Any], stop: int,
                on_step: Optional[Callable[[int, dict], None]]) -> None:
    """Log the step's record, call `on_step`, evaluate and checkpoint when due."""
    cfg, step = run.cfg, run.step
    if run.accelerator.is_main_process:
        if step % cfg.output.log_every == 0 or step == stop:
            run.log.write(record)
        run.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        run.bar.update(1)
    if on_step is not None:
        on_step(step, record)
    if step % cfg.output.eval_every == 0 or step == cfg.train.steps:
        _evaluate(run, step)
    if step % cfg.output.checkpoint_every == 0 or step == stop:
        state = {"step": step, "tokens": run.tokens_seen, "elapsed": run.elapsed, "data": run.order.state_dict(),
                 "balance": run.factors}
        save_checkpoint(_resumable(run), run.out, step, state, cfg.output.keep_checkpoints)
        if run.accelerator.is_main_process:
            _export_log(run.log, run.out, cfg)


def _export_final(run: _Run) -> None:
    """Write the final HF folder (LoRA merged, bf16 if the run computed in bf16) and the log's copies."""
    accelerator, out = run.accelerator, run.out
    final = accelerator.unwrap_model(run.student)
    if accelerator.is_main_process:
        merged = final.merge_and_unload() if hasattr(final, "merge_and_unload") else final
        merged.requires_grad_(False)
        if run.dtype == torch.bfloat16:
            merged = merged.to(torch.bfloat16)
        target = out / MODEL_DIR

        def write(folder: Path) -> None:
            merged.save_pretrained(folder)
            run.models.student_tok.save_pretrained(folder)

        replace_folder(target, write)  # beside the previous folder, then swapped in
        _export_log(run.log, out, run.cfg)
        run.bar.write(f"final model: {target}")
    accelerator.wait_for_everyone()


def train(cfg: RunConfig, resume: bool = False, on_step: Optional[Callable[[int, dict], None]] = None) -> Path:
    """Run (or resume) a transfer; return the output folder.

    ``on_step(step, record)`` is called after each optimizer step (tests use it to stop a run).
    The final HF folder is written to ``<output.dir>/model`` unless ``train.stop_after`` ended
    the run early.
    """
    from tqdm.auto import tqdm

    out = Path(cfg.output.dir)
    latest = _check_output(out, cfg, resume)
    examples, eval_windows = _load_data(cfg)
    run = _setup(cfg, out, examples, eval_windows)
    _start(run, latest)
    stop = cfg.train.stop_after or cfg.train.steps
    if run.accelerator.is_main_process:  # said once everything is loaded: bad input stays a one-line error
        announce(f"training on {run.accelerator.device}", run.dtype, run.why)
    run.bar = tqdm(total=cfg.train.steps, initial=run.step, desc=f"transfer ({short_name(run.dtype)})", unit="step",
                   disable=not run.accelerator.is_main_process, dynamic_ncols=True)
    if run.step == 0:
        _evaluate(run, 0)
    run.student.train()
    while run.step < stop:
        _after_step(run, _train_step(run), stop, on_step)
    run.bar.close()
    if run.step >= cfg.train.steps:
        _export_final(run)
    run.accelerator.end_training()
    return out
