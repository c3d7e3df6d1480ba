"""How closely students match their teacher's chunk likelihoods on held-out text: the quantity ALM
trains, measured where bits per byte is measured.

    python bench/alm_fidelity.py --teacher zoo:smollm2 --text zoo:heldout \\
        fvt=runs/experiment/fvt alm=runs/experiment/alm/model sft=runs/experiment/sft/model

For each student, the held-out text is cut into examples, tokenized by teacher and student,
aligned into chunks and grouped by the teacher's space probability exactly as in training
(`transfer.data.PairCollator`, `transfer.losses.alm_group_scores`, gamma 0.1). Printed per
student, over all valid groups: the mean |log P_T - log P_S| (nats), the mean of log P_S - log P_T
(negative: the student gives the text less probability than the teacher) and the mean binary KL
at tau 100 (the default ALM distance). With ``--debias none`` every chunk is its own group, and
the summed gaps are also split by the kind of chunk (`chunk_kinds`): the same single token on both
sides, one student token for several teacher tokens, or several student tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch
from tqdm import tqdm


KINDS = ("same_token", "one_student_token", "several_student_tokens")


def chunk_kinds(student_matrix: torch.Tensor, teacher_matrix: torch.Tensor, student_mask: torch.Tensor,
                teacher_mask: torch.Tensor) -> torch.Tensor:
    """Long [B, K]: each chunk's kind as an index into `KINDS`, from its scored tokens per side
    (the start token at position 0 and padding do not count): 0 when one token on each side (the
    same token, as the chunk's bytes are the same), 1 when one student token covers several
    teacher tokens, 2 when the student needs several tokens."""
    from transfer.losses import scored_positions

    def count(matrix: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bt,btk->bk", scored_positions(mask.bool()).float(), matrix.float())

    s_count, t_count = count(student_matrix, student_mask), count(teacher_matrix, teacher_mask)
    return torch.where(s_count > 1, 2, torch.where(t_count > 1, 1, 0))


def group_gaps(teacher, teacher_tok, student, student_tok, text: str, seq_len: int, max_examples: int,
               batch_size: int = 4, debias: str = "space") -> dict[str, Any]:
    """Mean |dlogP|, mean signed dlogP (student - teacher) and mean binary KL over valid groups;
    with debias="none" also "by_kind": the chunks and summed dlogP of each kind (`chunk_kinds`)."""
    from transfer import losses
    from transfer.data import PairCollator, Side, load_examples
    from transfer.tokens import space_token_mask

    examples = load_examples(text, fmt="text")[:max_examples]
    collate = PairCollator(Side(teacher_tok), Side(student_tok), seq_len)
    t_space = space_token_mask(teacher_tok, teacher.get_output_embeddings().weight.shape[0])
    s_space = space_token_mask(student_tok, student.get_output_embeddings().weight.shape[0])
    diffs: list[torch.Tensor] = []
    kls: list[torch.Tensor] = []
    kinds: list[torch.Tensor] = []
    for start in tqdm(range(0, len(examples), batch_size), desc="groups", unit="batch", file=sys.stderr):
        batch = collate(examples[start : start + batch_size])
        with torch.no_grad():
            t_logits = teacher(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]).logits
            s_logits = student(input_ids=batch["student_input_ids"], attention_mask=batch["student_attention_mask"]).logits
            scores = losses.alm_group_scores(
                s_logits, t_logits, batch["student_input_ids"], batch["teacher_input_ids"],
                batch["student_chunks"], batch["teacher_chunks"], batch["student_attention_mask"],
                batch["teacher_attention_mask"], s_space, t_space, batch["chunk_mask"], gamma=0.1, debias=debias)
        valid = scores.valid
        diffs.append((scores.student - scores.teacher)[valid])
        kls.append(losses.binary_kl_divergence(scores.teacher, scores.student)[valid])
        if debias == "none":  # groups are chunks: [B, K] like the chunk matrices' columns
            kinds.append(chunk_kinds(batch["student_chunks"], batch["teacher_chunks"], batch["student_attention_mask"],
                                     batch["teacher_attention_mask"])[valid])
    d, k = torch.cat(diffs), torch.cat(kls)
    result = {"groups": int(d.numel()), "mean_abs_dlogp": float(d.abs().mean()),
              "mean_dlogp": float(d.mean()), "mean_binary_kl": float(k.mean())}
    if kinds:
        kind = torch.cat(kinds)
        result["by_kind"] = {name: {"chunks": int((kind == i).sum()), "sum_dlogp": float(d[kind == i].sum())}
                             for i, name in enumerate(KINDS)}
    return result


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transfer.config import resolve_model, resolve_text

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("students", nargs="+", help="NAME=MODEL_DIR (each folder holds its tokenizer)")
    p.add_argument("--teacher", default="zoo:smollm2")
    p.add_argument("--text", default="zoo:heldout")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--examples", type=int, default=64, help="held-out examples (about 2 KB each, cut to seq-len)")
    p.add_argument("--debias", choices=["space", "none"], default="space",
                   help="none: compare single chunks, without the space-probability term")
    args = p.parse_args(argv)
    pairs = [s.split("=", 1) for s in args.students]
    if any(len(pair) != 2 for pair in pairs):
        p.error("students are NAME=MODEL_DIR")
    teacher_dir = resolve_model(args.teacher)
    teacher_tok = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    text = resolve_text(args.text)
    for name, folder in pairs:
        student_tok = AutoTokenizer.from_pretrained(folder)
        student = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        result = group_gaps(teacher, teacher_tok, student, student_tok, text, args.seq_len, args.examples,
                            debias=args.debias)
        print(json.dumps({"student": name, "text": args.text, "debias": args.debias, **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
