"""Tokenizer transfer / cross-tokenizer distillation training loop (ALM, SFT, latents).

One function, :func:`train`, runs a :class:`~transfer.config.RunConfig` through ``accelerate``,
so the same code runs on a CPU, one GPU, or several with ``accelerate launch`` (DDP or FSDP;
several CPU processes: ``accelerate launch --cpu --num_processes N -m transfer.cli run ...``):

* the teacher is frozen (eval mode, no grad); the student is the teacher's weights (self-transfer)
  or another model (distillation), FVT-initialised when its tokenizer changes
  (:mod:`transfer.fvt`), then trained with LoRA adapters (peft) plus trainable embeddings and
  head, or fully;
* each optimizer step takes ``train.batch_size`` examples from a resumable shuffled order
  (split over processes and ``grad_accum`` micro-batches); the collator tokenizes with both
  tokenizers and aligns on the CPU (:mod:`transfer.data`); the loss terms come from
  :mod:`transfer.losses`; AdamW, warmup + linear decay, gradient clipping, bf16 autocast or fp32
  (``train.dtype: auto``: bf16 where the hardware has it natively, :mod:`transfer.precision`);
* checkpoints (trainable weights, optimizer, scheduler, RNG states, data position, step) are
  written to a temporary folder and renamed into place; ``resume=True`` continues from the
  newest one exactly where the run stopped;
* the run logs JSON lines (and a CSV copy) and a loss plot, evaluates held-out bits per byte, and ends with an
  HF folder (LoRA merged, the student's tokenizer and chat template) under ``<dir>/model``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml

from . import losses
from .config import RunConfig, resolve_model, resolve_text, resolve_tokenizer
from .data import Example, PairCollator, ShuffledOrder, Side, load_examples
from .errors import ConfigError, DataError, UserInputError
from .evaluate import bits_per_byte, read_windows
from .fvt import init_student, load_target_tokenizer, save_model_folder, transfer_chat_template
from .precision import announce, decide, short_name
from .runlog import RunLog, plot_losses, write_csv
from .tokens import load_tokenizer, space_token_mask

CHECKPOINTS = "checkpoints"
TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
MODEL_DIR = "model"


@dataclass
class Models:
    """Everything model-side a run needs."""

    teacher: Any
    teacher_tok: Any
    student: Any
    student_tok: Any
    student_template: Optional[str]
    teacher_space: torch.Tensor
    student_space: torch.Tensor


# --------------------------------------------------------------------------------------------
# Setup


def build_models(cfg: RunConfig, dtype: torch.dtype = torch.float32) -> Models:
    """Load the teacher (in `dtype`, the run's compute precision), build the student (fp32
    master weights; FVT when its tokenizer changes) and the space masks."""
    from transformers import AutoModelForCausalLM

    teacher_dir = resolve_model(cfg.model.teacher)
    student_dir = resolve_model(cfg.model.student) if cfg.model.student else teacher_dir
    teacher_tok = load_tokenizer(teacher_dir)
    student_own_tok = teacher_tok if student_dir == teacher_dir else load_tokenizer(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=dtype)
    teacher.eval().requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    if cfg.model.tokenizer is not None:
        student_tok = load_target_tokenizer(resolve_tokenizer(cfg.model.tokenizer), student_own_tok)
        student, student_tok = init_student(student, student_own_tok, student_tok)
    else:
        student_tok = load_tokenizer(student_dir)
    # The student speaks the teacher's chat format, written with its own special tokens.
    template = transfer_chat_template(teacher_tok, student_tok)
    if template:
        student_tok.chat_template = template
    return Models(
        teacher=teacher,
        teacher_tok=teacher_tok,
        student=student,
        student_tok=student_tok,
        student_template=template,
        teacher_space=space_token_mask(teacher_tok, teacher.get_output_embeddings().weight.shape[0]),
        student_space=space_token_mask(student_tok, student.get_output_embeddings().weight.shape[0]),
    )


def add_adapters(student: Any, cfg: RunConfig) -> Any:
    """Full fine-tuning, or LoRA (peft) on ``train.lora.targets`` plus trainable embeddings/head."""
    if cfg.train.full_finetune:
        student.requires_grad_(True)
        return student
    from peft import LoraConfig, get_peft_model

    lora = cfg.train.lora
    names = {name.rsplit(".", 1)[-1] for name, mod in student.named_modules() if isinstance(mod, torch.nn.Linear)}
    missing = [t for t in lora.targets if t not in names]
    if missing:
        raise ConfigError(
            f"train.lora.targets {missing} are not linear layers of the student (it has: {', '.join(sorted(names))})"
        )
    peft_cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=list(lora.targets), bias="none", task_type="CAUSAL_LM")
    student = get_peft_model(student, peft_cfg)
    if lora.train_embeddings:
        student.get_input_embeddings().weight.requires_grad_(True)
        student.get_output_embeddings().weight.requires_grad_(True)
    return student


def trainable_parameters(model: Any) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every trainable parameter, shared ones once."""
    seen, out = set(), []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def last_layer_parameters(model: Any) -> list[torch.nn.Parameter]:
    """Trainable parameters of the last decoder layer (for gradient balancing)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    tag = f"layers.{config.num_hidden_layers - 1}."
    params = [p for name, p in trainable_parameters(model) if tag in name]
    if not params:
        raise ConfigError("loss.balance needs trainable parameters in the student's last layer (check train.lora.targets)")
    return params


def embedding_parameter_ids(model: Any) -> set[int]:
    """ids of the input and output embedding matrices (one id when they are tied)."""
    ids = set()
    for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
        if layer is not None and getattr(layer, "weight", None) is not None:
            ids.add(id(layer.weight))
    return ids


def make_optimizer(model: Any, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW (fused kernel where the device has one); weight decay on matrices only (not on
    norms and biases); the embeddings at ``train.embedding_lr`` when it is set."""
    params = trainable_parameters(model)
    embeddings = embedding_parameter_ids(model) if cfg.train.embedding_lr is not None else set()
    decay = [p for _, p in params if p.ndim >= 2 and id(p) not in embeddings]
    no_decay = [p for _, p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}]
    embedding_params = [p for _, p in params if id(p) in embeddings]
    if embedding_params:
        groups.append({"params": embedding_params, "weight_decay": cfg.train.weight_decay,
                       "lr": cfg.train.embedding_lr})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    # The fused kernel (CPU and CUDA) is several times faster than the per-tensor loop on the
    # CPU (0.2 s instead of 2 s a step for SmolLM2's 194M trainable parameters) and as exact.
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for _, p in params)
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=cfg.train.betas, fused=fused or None)


def lr_factor(index: int, warmup: int, steps: int, schedule: str = "linear") -> float:
    """Learning-rate multiplier of optimizer step ``index`` (0-based).

    Warmup: ``(index + 1) / warmup`` for the first ``warmup`` steps (the first step already
    moves the weights); then 1 (``constant``) or a linear decay that would reach 0 at step
    ``steps`` (``linear``: the last step, ``steps - 1``, uses ``1 / (steps - warmup)``).
    """
    if index < warmup:
        return (index + 1) / warmup
    if schedule == "constant":
        return 1.0
    return max(0.0, (steps - index) / max(1, steps - warmup))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then linear decay to 0 at ``train.steps`` (or constant): :func:`lr_factor`."""
    t = cfg.train
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: lr_factor(i, t.warmup_steps, t.steps, t.schedule)
    )


# --------------------------------------------------------------------------------------------
# Loss


def compute_losses(batch: dict[str, torch.Tensor], student: Any, teacher: Any, models: Models,
                   cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The configured loss terms of one micro-batch (the teacher runs only when needed)."""
    terms = cfg.loss.terms
    hidden = "latents" in terms
    s_ids, s_mask = batch["student_input_ids"], batch["student_attention_mask"]
    t_ids, t_mask = batch["teacher_input_ids"], batch["teacher_attention_mask"]
    t_out = None
    if "alm" in terms or "latents" in terms:
        with torch.no_grad():
            t_out = teacher(input_ids=t_ids, attention_mask=t_mask, output_hidden_states=hidden)
    s_out = student(input_ids=s_ids, attention_mask=s_mask, output_hidden_states=hidden)
    out: dict[str, torch.Tensor] = {}
    for term in terms:
        if term == "alm":
            out["alm"] = losses.alm_loss(
                s_out.logits, t_out.logits, s_ids, t_ids, batch["student_chunks"], batch["teacher_chunks"],
                s_mask, t_mask, models.student_space, models.teacher_space, batch["chunk_mask"],
                gamma=cfg.loss.gamma, distance=cfg.loss.distance, tau=cfg.loss.tau,
            )
        elif term == "sft":
            out["sft"] = losses.sft_loss(s_out.logits, s_ids, attention_mask=s_mask)
        elif term == "latents":
            out["latents"] = losses.latents_loss(
                s_out.hidden_states[-1], t_out.hidden_states[-1], batch["student_chunks"],
                batch["teacher_chunks"], batch["chunk_mask"],
            )
    return out


# --------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_dirs(out: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file())


def _install_checkpoint_hooks(accelerator: Any) -> None:
    """Checkpoints hold only trainable weights (frozen ones are rebuilt identically at resume)."""
    from accelerate.utils import DistributedType
    from safetensors.torch import load_file, save_file

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return  # sharded states: accelerate's own format

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            for i, model in enumerate(models):
                names = {name for name, _ in trainable_parameters(model)}
                tensors = {k: v.detach().contiguous().cpu() for k, v in weights[i].items() if k in names}
                save_file(tensors, os.path.join(output_dir, f"{i}.{TRAINABLE_FILE}"))
        weights.clear()

    def load_hook(models: list, input_dir: str) -> None:
        for i, model in enumerate(models):
            tensors = load_file(os.path.join(input_dir, f"{i}.{TRAINABLE_FILE}"))
            expected = {name for name, _ in trainable_parameters(model)}
            if set(tensors) != expected:
                raise UserInputError(f"checkpoint {input_dir} does not match this run's trainable weights; resume with the same config")
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, value in tensors.items():
                    params[name].copy_(value)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator: Any, out: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint ``step`` into a temporary folder and rename it into place."""
    root = out / CHECKPOINTS
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_dirs(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _check_output(out: Path, cfg: RunConfig, resume: bool) -> Optional[Path]:
    """Refuse to overwrite a run; on resume return the newest checkpoint (None: start over)."""
    existing = checkpoint_dirs(out)
    saved_cfg = out / CONFIG_FILE
    if not resume:
        if existing or (out / MODEL_DIR).exists() or saved_cfg.exists():
            raise UserInputError(f"output dir {out} already holds a run; pass --resume to continue it or set output.dir elsewhere")
        return None
    if not saved_cfg.exists():
        raise UserInputError(f"nothing to resume in {out}: no {CONFIG_FILE} there")
    before = yaml.safe_load(saved_cfg.read_text(encoding="utf-8"))
    now = cfg.to_dict()
    diff = [f"{sec}.{k}" for sec in now for k in now[sec]
            if sec != "output" and (sec, k) != ("train", "stop_after") and before.get(sec, {}).get(k) != now[sec][k]]
    if diff:
        raise ConfigError(f"--resume with a config that differs from the run's in {', '.join(diff)}")
    return existing[-1] if existing else None


# --------------------------------------------------------------------------------------------
# The loop


def _to(batch: dict[str, torch.Tensor], device: Any) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _accelerator(cfg: RunConfig) -> tuple[Any, torch.dtype, str]:
    """The run's Accelerator (processes from ``accelerate launch``), compute dtype (bf16 autocast
    or none, ``train.dtype: auto`` decided from the device the process runs on) and why."""
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, parse_flag_from_env

    if PartialState._shared_state.get("distributed_type") == DistributedType.NO:
        # A single process may run several trainings (tests, notebooks): accelerate keeps the
        # first one's mixed precision in a process-wide singleton, so start each run afresh.
        AcceleratorState._reset_state(reset_partial_state=True)
    # The process state first, to learn the device; `cpu` as the Accelerator itself would read it
    # (`accelerate launch --cpu` sets ACCELERATE_USE_CPU), so the Accelerator below reuses it.
    device = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).device
    dtype, why = decide(cfg.train.dtype, device)
    return Accelerator(mixed_precision="bf16" if dtype == torch.bfloat16 else "no"), dtype, why


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


def train(cfg: RunConfig, resume: bool = False, on_step: Optional[Callable[[int, dict], None]] = None) -> Path:
    """Run (or resume) a transfer; return the output folder.

    ``on_step(step, record)`` is called after each optimizer step (tests use it to stop a run).
    The final HF folder is written to ``<output.dir>/model`` unless ``train.stop_after`` ended
    the run early.
    """
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    out = Path(cfg.output.dir)
    latest = _check_output(out, cfg, resume)
    train_paths = [resolve_text(spec) for spec in cfg.data.train]
    eval_path = resolve_text(cfg.data.eval) if cfg.data.eval else None
    chunk_bytes = cfg.data.chunk_bytes or 5 * cfg.data.seq_len
    examples = [ex for path in train_paths for ex in load_examples(path, cfg.data.format, chunk_bytes)]
    eval_windows = read_windows(eval_path, max_bytes=cfg.output.eval_bytes) if eval_path and cfg.output.eval_bytes else []

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
    accelerator.register_for_checkpointing(scheduler, order)
    _install_checkpoint_hooks(accelerator)
    teacher = models.teacher.to(accelerator.device)
    models.teacher_space = models.teacher_space.to(accelerator.device)
    models.student_space = models.student_space.to(accelerator.device)
    balance = last_layer_parameters(accelerator.unwrap_model(student)) if cfg.loss.balance else None
    weights = {t: cfg.loss_weight(t) for t in cfg.loss.terms}
    # All of the student's parameters (frozen ones have no gradient): under FSDP accelerate then
    # uses the sharded model's own clip_grad_norm_, which computes the global norm.
    clip_params = list(student.parameters())

    log = RunLog(out / "log.jsonl")
    step, tokens_seen, elapsed = 0, 0, 0.0
    factors: dict[str, float] | None = None  # gradient-balancing factors, refreshed every loss.balance_every steps
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
    if latest is not None:
        accelerator.load_state(str(latest))
        state = json.loads((latest / STATE_FILE).read_text(encoding="utf-8"))
        step, tokens_seen, elapsed = state["step"], state["tokens"], state["elapsed"]
        factors = state.get("balance")
        if accelerator.is_main_process:
            log.truncate_after(step)
            for partial in (out / CHECKPOINTS).glob(".tmp-step-*"):  # a save the kill interrupted
                shutil.rmtree(partial, ignore_errors=True)
    elif accelerator.is_main_process:
        log.truncate_after(-1)

    def evaluate_now(at: int) -> None:
        if not eval_windows:
            return
        model = accelerator.unwrap_model(student)
        with accelerator.autocast():
            result = bits_per_byte(model, models.student_tok, eval_windows)
        if accelerator.is_main_process:
            log.write({"step": at, "eval_bpb": result.bits_per_byte, "eval_bytes": result.bytes})
            bar.write(f"step {at}: held-out bits per byte {result.bits_per_byte:.4f}")

    stop = cfg.train.stop_after or cfg.train.steps
    if accelerator.is_main_process:  # said once everything is loaded: bad input stays a one-line error
        announce(f"training on {accelerator.device}", dtype, why)
    bar = tqdm(total=cfg.train.steps, initial=step, desc=f"transfer ({short_name(dtype)})", unit="step",
               disable=not accelerator.is_main_process, dynamic_ncols=True)
    if step == 0:
        evaluate_now(0)
    student.train()
    micro = per_process // cfg.train.grad_accum
    while step < stop:
        started = time.perf_counter()
        indices = order.take(cfg.train.batch_size)
        mine = indices[accelerator.process_index :: accelerator.num_processes]
        sums: dict[str, float] = {}
        n_tokens = 0
        used: dict[str, float] = {}
        for j in range(cfg.train.grad_accum):
            batch = collator([examples[i] for i in mine[j * micro : (j + 1) * micro]])
            n_tokens += int(batch["student_attention_mask"].sum())
            batch = _to(batch, accelerator.device)
            sync = contextlib.nullcontext() if j == cfg.train.grad_accum - 1 else accelerator.no_sync(student)
            with sync:  # the backward too: FSDP reads no_sync in its post-backward hooks
                with accelerator.autocast():
                    terms = compute_losses(batch, student, teacher, models, cfg)
                    if balance is not None and (factors is None or step % cfg.loss.balance_every == 0):
                        factors = losses.balance_weights(terms, balance)
                    total, used = losses.combine_losses(terms, weights, factors)
                accelerator.backward(total / cfg.train.grad_accum)
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) / cfg.train.grad_accum
            sums["loss"] = sums.get("loss", 0.0) + float(total.detach()) / cfg.train.grad_accum
        grad_norm = accelerator.clip_grad_norm_(clip_params, cfg.train.clip) if cfg.train.clip > 0 else None
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        stats = torch.tensor([sums[k] for k in sorted(sums)] + [float(n_tokens)], device=accelerator.device)
        stats = accelerator.reduce(stats, reduction="sum")
        n_all = float(stats[-1])
        avg = {k: float(v) / accelerator.num_processes for k, v in zip(sorted(sums), stats[:-1])}
        dt = time.perf_counter() - started
        elapsed += dt
        tokens_seen += int(n_all)
        record = {"step": step, "lr": lr, "tokens": tokens_seen, "tokens_per_s": n_all / max(dt, 1e-9), "step_s": dt,
                  "elapsed": elapsed, **{("loss" if k == "loss" else f"loss_{k}"): v for k, v in avg.items()}}
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if cfg.loss.balance:
            record.update({f"weight_{k}": v for k, v in used.items()})
        if accelerator.is_main_process:
            if step % cfg.output.log_every == 0 or step == stop:
                log.write(record)
            bar.set_postfix(loss=f"{avg['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
        if on_step is not None:
            on_step(step, record)
        if step % cfg.output.eval_every == 0 or step == cfg.train.steps:
            evaluate_now(step)
        if step % cfg.output.checkpoint_every == 0 or step == stop:
            state = {"step": step, "tokens": tokens_seen, "elapsed": elapsed, "data": order.state_dict(),
                     "balance": factors}
            save_checkpoint(accelerator, out, step, state, cfg.output.keep_checkpoints)
            if accelerator.is_main_process:
                _export_log(log, out, cfg)
    bar.close()

    if step >= cfg.train.steps:
        final = accelerator.unwrap_model(student)
        if accelerator.is_main_process:
            merged = final.merge_and_unload() if hasattr(final, "merge_and_unload") else final
            merged.requires_grad_(False)
            if dtype == torch.bfloat16:
                merged = merged.to(torch.bfloat16)
            target = out / MODEL_DIR
            if target.exists():
                shutil.rmtree(target)
            save_model_folder(merged, models.student_tok, target)
            _export_log(log, out, cfg)
            bar.write(f"final model: {target}")
        accelerator.wait_for_everyone()
    accelerator.end_training()
    return out
