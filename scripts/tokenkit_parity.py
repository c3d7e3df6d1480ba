#!/usr/bin/env python
"""Run tokenkit's ALM loss on small fixed inputs and write the parity fixture.

tokenkit (github.com/bminixhofer/tokenkit, JAX) is the ALM paper's own code. This script runs
its chunk alignment (`tokenkit.align.get_unconstrained_alignments`), its space mask
(`tokenkit.utils.get_space_mask`), its ALM loss (`tokenkit.training.losses.compute_alm_loss`,
with the gradient w.r.t. the student logits by `jax.grad`) and its GradMag weights
(`tokenkit.training.multitask`) on a few tiny hand-made sequence pairs, and writes the inputs
and tokenkit's outputs to `tests/transfer/fixtures/tokenkit_alm.json`.
`tests/transfer/test_tokenkit_parity.py` recomputes everything with chorus' PyTorch code
(`transfer.align`, `transfer.losses`) and compares. Nothing of tokenkit is copied here: its
modules are imported from the checkout given with ``--tokenkit``.

Needs a Python with jax and numpy (CPU is enough), not chorus' venv, e.g.

    python -m venv /tmp/tkvenv && /tmp/tkvenv/bin/pip install jax jaxlib numpy
    git clone https://github.com/bminixhofer/tokenkit /tmp/tokenkit    # or, from a bare mirror:
    git --git-dir=<mirror>.git worktree add --detach /tmp/tokenkit <commit>
    /tmp/tkvenv/bin/python scripts/tokenkit_parity.py --tokenkit /tmp/tokenkit

tokenkit's heavy imports (flax, optax, transformers, wandb, ...) are not needed by the functions
used here. `scripts/tokenkit_parity_loader.py` loads tokenkit: where a module is missing, an
empty stand-in module is registered under its name before tokenkit is imported (printed on
stderr), and the two helpers needed from `tokenkit/utils.py` (`get_large_negative_number`,
`get_space_mask`) are taken from that file's source by name. The inputs are built from fixed
numbers and a seeded numpy generator, so a rerun writes the same file (up to the JAX version's
float32 rounding).

What the cases cover (see docs/alm.md, "Parity with tokenkit"): chunks that differ between the
two tokenizations, groups of chunks merged by the teacher's space probability, trailing chunks
after the last boundary, a sequence cut to a token budget (tokenkit truncates each side and
drops the incomplete last chunk), special tokens with and without a counterpart, byte-fallback
pieces (a UTF-8 character split into single bytes, a lone space byte), right padding in a batch;
space debiasing on (``merge_by_space_prob+append_space``) and off, distances ``binary_ce`` and
``abs``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenkit_parity_loader import load_tokenkit  # this script's folder is on sys.path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "transfer" / "fixtures" / "tokenkit_alm.json"

GAMMA = 0.1  # tokenkit: tokenizer_pair_bias_threshold (its default for merge_by_space_prob); chorus: loss.gamma
TAU = 100.0  # tokenkit: binarization_temp; chorus: loss.tau
SPACE_MASK_MODE = "space+tab+newline+special"  # tokenkit's default; chorus' space_token_mask rule

# --------------------------------------------------------------------------------------------
# The cases: token sequences of two tiny tokenizers
#
# A token is text (str, its UTF-8 bytes), raw bytes (a byte-fallback piece) or a special token
# given by role: "bos" and "eot" exist on both sides (the collator's special_map pairs them),
# "hdr" only on the teacher side. Every row starts with "bos" on both sides: chorus' zero-byte
# start token, and for tokenkit a bos that both "model kinds" have, so it is its own chunk.

ROLES = {"bos": "<|<bos>|>", "eot": "<|<eot>|>", "hdr": "<|<start_header>|>"}
TEACHER_SPECIALS = {"bos": "<T_bos>", "eot": "<T_eot>", "hdr": "<T_hdr>"}
STUDENT_SPECIALS = {"bos": "<S_bos>", "eot": "<S_eot>"}
BOS, EOT, HDR = ("bos",), ("eot",), ("hdr",)


@dataclass(frozen=True)
class Row:
    teacher: list
    student: list
    marks: list[int]  # teacher chunks (tokenkit's byte chunks, bos chunk excluded, from 0) to end a group
    budget: int | None = None  # tokens per side (tokenkit truncates, chorus cuts at a chunk end)


CASES: dict[str, list[Row]] = {
    # Chunks [Hel lo|Hello] [ world|" wor" ld] [, hi|", " hi] [ the re| there]; all four boundaries likely.
    "words": [Row([BOS, "Hel", "lo", " world", ",", " hi", " the", "re"],
                  [BOS, "Hello", " wor", "ld", ", ", "hi", " there"], marks=[0, 1, 3])],
    # Row 0: the last two chunks follow the last likely boundary. Row 1: cut to 6 tokens (the
    # student's " down" does not fit) and no likely boundary at all. Padded to a batch.
    "tail": [Row([BOS, "The", " cat", " s", "at", " do", "wn", " qu", "ick"],
                 [BOS, "Th", "e", " cat", " sat", " down", " quick"], marks=[0, 2]),
             Row([BOS, "The", " cat", " sat", " down"], [BOS, "The", " c", "at", " s", "at", " down"],
                 marks=[], budget=6)],
    # Specials with a counterpart: chunks of their own (chorus: the same marker bytes on both sides).
    "specials": [Row([BOS, "Hi", EOT, " you", " there", EOT], [BOS, "H", "i", EOT, " you", " the", "re", EOT],
                     marks=[0, 1, 3])],
    # A teacher special without a student counterpart, inside the text: zero bytes.
    "unmatched_special": [Row([BOS, "Hi", EOT, HDR, " you", " there"], [BOS, "Hi", EOT, " you", " the", "re"],
                              marks=[0, 1, 2, 3])],
    # Byte fallback: one 3-byte teacher token against three single bytes, "é" split in two, and a
    # student space that is a lone byte token (it opens a word on both sides: a space byte).
    "bytes": [Row([BOS, "日", "本", " café", " ok", "\n"],
                  [BOS, b"\xe6", b"\x97", b"\xa5", "本", b" ", "caf", b"\xc3", b"\xa9", " ok", "\n"], marks=[1, 2, 3])],
}

EXTRA_TEACHER = [" a", "x", "\t", " ", "\n\n"]
EXTRA_STUDENT = [" a", "y", "\t", "\n\n", " th"]


def _token_bytes(tok) -> bytes | None:
    if isinstance(tok, tuple):
        return None
    return tok if isinstance(tok, bytes) else tok.encode("utf-8")


class Vocab:
    """A tiny tokenizer side: token ids, byte strings (None for specials), tokenkit strings."""

    def __init__(self, tokens: list, specials: dict[str, str], byte_chars: dict[int, str]):
        self.tokens: list = []
        self.index: dict = {}
        for tok in tokens:
            key = tok if not isinstance(tok, tuple) else ("special", tok[0])
            if key not in self.index:
                self.index[key] = len(self.tokens)
                self.tokens.append(tok)
        self.specials = specials
        self.byte_chars = byte_chars

    def id(self, tok) -> int:
        return self.index[tok if not isinstance(tok, tuple) else ("special", tok[0])]

    def tokenkit_string(self, tok) -> str:
        if isinstance(tok, tuple):
            return self.specials[tok[0]]
        return "".join(self.byte_chars[b] for b in _token_bytes(tok))

    def table(self) -> list:
        return [None if isinstance(t, tuple) else list(_token_bytes(t)) for t in self.tokens]


class FakeModelKind:
    def __init__(self, mapping: dict[str, str]):
        self.replacements = {key: ([mapping[role]] if role in mapping else None) for role, key in ROLES.items()}


class FakeTokenizer:
    """What tokenkit's align and get_space_mask read of a (byteified) tokenizer."""

    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        self.model_kind_cls = FakeModelKind(vocab.specials)
        self.all_special_ids = [i for i, t in enumerate(vocab.tokens) if isinstance(t, tuple)]
        self.eos_token_id = vocab.id(EOT)

    def __len__(self) -> int:
        return len(self.vocab.tokens)

    def convert_ids_to_tokens(self, ids) -> list[str]:
        return [self.vocab.tokenkit_string(self.vocab.tokens[int(i)]) for i in ids]


# --------------------------------------------------------------------------------------------
# Building the batch of one case


def _chunks_of(matrix_t: np.ndarray, matrix_s: np.ndarray) -> list[list[list[int]]]:
    """Non-empty chunk columns as [teacher token indices, student token indices]."""
    out = []
    for col in range(matrix_t.shape[1]):
        t, s = np.nonzero(matrix_t[:, col])[0].tolist(), np.nonzero(matrix_s[:, col])[0].tolist()
        if t or s:
            out.append([t, s])
    return out


def _set_space_prob(row_logits: np.ndarray, space: np.ndarray, target: float) -> None:
    """Shift the word-opening tokens' logits so that their total probability is `target`."""
    p = np.exp(row_logits - row_logits.max())
    s, n = p[space].sum(), p[~space].sum()
    row_logits[space] += np.log(target * n / ((1.0 - target) * s))


def build_case(tk, name: str, rows: list[Row], vt: Vocab, vs: Vocab, tok_t: FakeTokenizer, tok_s: FakeTokenizer,
               space_t: np.ndarray, space_s: np.ndarray, seed: int) -> dict:
    rng = np.random.RandomState(seed)
    ids_t, ids_s = _row_ids(rows, vt, vs)
    input_t, mask_t = _padded(ids_t, vt.id(EOT))
    input_s, mask_s = _padded(ids_s, vs.id(EOT))
    a, b = tk.align.get_unconstrained_alignments(input_t, input_s, mask_t, mask_s, tok_t, tok_s)
    chunks = [_chunks_of(b[k], a[k]) for k in range(len(rows))]
    logits_t, logits_s = _logits(rng, rows, chunks, input_t.shape[1], input_s.shape[1], vt, vs, space_t, space_s)
    _check_boundaries(name, rows, chunks, logits_t, space_t)
    case = {
        "rows": [
            {
                "teacher_ids": ids_t[k],
                "student_ids": ids_s[k],
                "full_teacher_ids": [vt.id(x) for x in r.teacher],
                "full_student_ids": [vs.id(x) for x in r.student],
                "budget": r.budget,
                "tokenkit_chunks": chunks[k],
            }
            for k, r in enumerate(rows)
        ],
        "teacher_input_ids": input_t.tolist(),
        "student_input_ids": input_s.tolist(),
        "teacher_attention_mask": mask_t.tolist(),
        "student_attention_mask": mask_s.tolist(),
        "teacher_logits": logits_t.tolist(),
        "student_logits": logits_s.tolist(),
    }
    case["tokenkit"] = run_alm(tk, input_t, input_s, mask_t, mask_s, a, b, logits_t, logits_s, space_t, space_s)
    return case


def _row_ids(rows: list[Row], vt: Vocab, vs: Vocab) -> tuple[list[list[int]], list[list[int]]]:
    """Each row's teacher and student token ids, cut to its budget as tokenkit's collator cuts
    each side to its max length."""
    ids_t = [[vt.id(x) for x in r.teacher] for r in rows]
    ids_s = [[vs.id(x) for x in r.student] for r in rows]
    if any(r.budget for r in rows):
        ids_t = [i[: r.budget] if r.budget else i for i, r in zip(ids_t, rows)]
        ids_s = [i[: r.budget] if r.budget else i for i, r in zip(ids_s, rows)]
    return ids_t, ids_s


def _padded(ids: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows right-padded with `pad` into one batch, and its attention mask."""
    length = max(map(len, ids))
    inputs = np.array([i + [pad] * (length - len(i)) for i in ids], dtype=np.int32)
    mask = np.array([[1] * len(i) + [0] * (length - len(i)) for i in ids], dtype=np.int32)
    return inputs, mask


def _logits(rng: np.random.RandomState, rows: list[Row], chunks: list, lt: int, ls: int, vt: Vocab, vs: Vocab,
            space_t: np.ndarray, space_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Random teacher and student logits (4 decimals), then the teacher's word-boundary
    probability set at every chunk end (far from gamma: likely where the row says so, unlikely
    elsewhere) and the student's at its own, different levels (it has to learn them)."""
    logits_t = np.round(rng.normal(0.0, 2.0, (len(rows), lt, len(vt.tokens))), 4)
    logits_s = np.round(rng.normal(0.0, 2.0, (len(rows), ls, len(vs.tokens))), 4)
    for k, row in enumerate(rows):
        text_chunks = [c for c in chunks[k] if c[0] != [0]]  # tokenkit's own bos chunk first
        for n, (t_idx, _) in enumerate(text_chunks):
            target = rng.uniform(0.3, 0.9) if n in row.marks else rng.uniform(0.005, 0.04)
            _set_space_prob(logits_t[k, t_idx[-1]], space_t, target)
        # Position 0 ends tokenkit's own bos chunk (and stands for its empty columns): away from gamma too.
        _set_space_prob(logits_t[k, 0], space_t, rng.choice([rng.uniform(0.005, 0.04), rng.uniform(0.3, 0.9)]))
        for t_idx, s_idx in text_chunks:
            _set_space_prob(logits_s[k, s_idx[-1]], space_s, rng.uniform(0.02, 0.7))
    return np.round(logits_t, 4), np.round(logits_s, 4)


def _check_boundaries(name: str, rows: list[Row], chunks: list, logits_t: np.ndarray, space_t: np.ndarray) -> None:
    """Assert that the rounded teacher logits keep every chunk end's boundary probability on its
    side of gamma, with a margin of 2x."""
    for k, row in enumerate(rows):
        text_chunks = [c for c in chunks[k] if c[0] != [0]]
        for n, (t_idx, _) in enumerate(text_chunks):
            p = np.exp(logits_t[k, t_idx[-1]] - logits_t[k, t_idx[-1]].max())
            p_sp = p[space_t].sum() / p.sum()
            assert (p_sp > 2 * GAMMA) if n in row.marks else (p_sp < GAMMA / 2), (name, k, n, p_sp)
        p = np.exp(logits_t[k, 0] - logits_t[k, 0].max())
        assert not GAMMA / 2 <= p[space_t].sum() / p.sum() <= 2 * GAMMA, (name, k)


# --------------------------------------------------------------------------------------------
# Running tokenkit's loss

SETTINGS = {  # name: (tokenkit alm_mode, tokenkit alm_diff_fn, record the gradient)
    "space_binary_ce": ("merge_by_space_prob+append_space", "binary_ce", True),
    "space_abs": ("merge_by_space_prob+append_space", "abs", False),
    "none_binary_ce": ("", "binary_ce", True),
    "none_abs": ("", "abs", False),
}


def run_alm(tk, input_t, input_s, mask_t, mask_s, a, b, logits_t, logits_s, space_t, space_s) -> dict:
    """tokenkit's ALM loss (and d loss / d student logits) for every setting.

    The logits are turned into log-probs and probs as tokenkit's train step does
    (scripts/cross_tokenizer_distill.py: clip(log_softmax(logits + logit_mask), max=0), exp of
    that; the logit mask is 0 here: no vocabulary padding). The loss mask is the attention
    mask (tokenkit's collator without loss_mask_mode); global batch = batch (one process).
    """
    import jax
    import jax.numpy as jnp

    batch = {
        "input_ids_original": jnp.asarray(input_t),
        "input_ids_new": jnp.asarray(input_s),
        "loss_mask_original": jnp.asarray(mask_t.astype(bool)),
        "loss_mask_new": jnp.asarray(mask_s.astype(bool)),
        "alignment_matrix_a_unconstrained": jnp.asarray(a),
        "alignment_matrix_b_unconstrained": jnp.asarray(b),
    }
    t_logits = jnp.asarray(logits_t, dtype=jnp.float32)
    t_logprobs = jnp.clip(jax.nn.log_softmax(t_logits, axis=-1), max=0.0)
    out = {}
    for name, (mode, diff, with_grad) in SETTINGS.items():
        args = types.SimpleNamespace(
            alm_diff_fn=diff, binarization_temp=TAU, alm_mode=mode, tokenizer_pair_bias_threshold=GAMMA,
            distill_chunk_sizes=[1], distill_main_path_numerator="chunk_count",
            distill_main_path_denominator="chunk_count",
        )

        def loss_fn(s_logits):
            s_logprobs = jnp.clip(jax.nn.log_softmax(s_logits, axis=-1), max=0.0)
            loss_args = tk.losses.LossArgs(
                params=None, batch=batch, global_batch=batch, teacher_config=None, new_config=None,
                teacher_out=None, student_out=None, tokenizer_teacher=None, tokenizer_new=None,
                teacher_probs=jnp.exp(t_logprobs), teacher_logprobs=t_logprobs, teacher_logits=t_logits,
                student_probs=jnp.exp(s_logprobs), student_logprobs=s_logprobs, student_logits=s_logits,
                predicted_embeddings=None, scalar_report={}, space_mask_teacher=jnp.asarray(space_t),
                space_mask_new=jnp.asarray(space_s), logit_mask_teacher=None, logit_mask_new=None,
            )
            return tk.losses.compute_alm_loss("unconstrained", args, loss_args)

        s_logits = jnp.asarray(logits_s, dtype=jnp.float32)
        if with_grad:
            value, grad = jax.value_and_grad(loss_fn)(s_logits)
            out[name] = {"loss": float(value), "grad_student_logits": _floats(np.asarray(grad))}
        else:
            out[name] = {"loss": float(loss_fn(s_logits))}
    return out


def _floats(x: np.ndarray):
    """Nested lists of float32 values, written with 9 significant digits (float32 round trip)."""
    return json.loads(json.dumps(np.vectorize(lambda v: float(f"{v:.9g}"))(x.astype(np.float64)).tolist()))


def gradmag_case(tk) -> dict:
    """tokenkit's GradMag weights for two tasks' last-layer gradients (multitask.py)."""
    import jax.numpy as jnp

    rng = np.random.RandomState(7)
    scale = np.array([1.0, 30.0])  # two tasks with very different gradient scales
    grads = {"w": np.round(rng.normal(0, 1, (2, 3, 4)) * scale[:, None, None], 3),
             "b": np.round(rng.normal(0, 0.1, (2, 4)) * scale[:, None], 3)}
    tree = {k: jnp.asarray(v, dtype=jnp.float32) for k, v in grads.items()}
    inv = np.asarray(tk.multitask.compute_inv_global_grad_norm(tree))
    return {
        "task_grads": {k: v.tolist() for k, v in grads.items()},
        "approx_gradmag_weights": _floats(inv),
        "preserve_mag_denominator": float(inv.sum()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenkit", type=Path, required=True, help="a checkout (clone or worktree) of tokenkit")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"fixture to write (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    tk = load_tokenkit(args.tokenkit.resolve())
    import jax

    byte_chars = tk.constants.BYTES_TO_CHARS
    teacher_tokens = [BOS, EOT, HDR] + [x for rows in CASES.values() for r in rows for x in r.teacher] + EXTRA_TEACHER
    student_tokens = [BOS, EOT] + [x for rows in CASES.values() for r in rows for x in r.student] + EXTRA_STUDENT
    vt = Vocab(teacher_tokens, TEACHER_SPECIALS, byte_chars)
    vs = Vocab(student_tokens, STUDENT_SPECIALS, byte_chars)
    tok_t, tok_s = FakeTokenizer(vt), FakeTokenizer(vs)
    space_t = np.asarray(tk.get_space_mask(tok_t, SPACE_MASK_MODE), dtype=bool)
    space_s = np.asarray(tk.get_space_mask(tok_s, SPACE_MASK_MODE), dtype=bool)

    try:
        commit = subprocess.run(["git", "-C", str(args.tokenkit), "rev-parse", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    fixture = {
        "about": "tokenkit's ALM loss on tiny inputs; written by scripts/tokenkit_parity.py, read by "
                 "tests/transfer/test_tokenkit_parity.py (docs/alm.md, 'Parity with tokenkit')",
        "tokenkit_commit": commit,
        "jax_version": jax.__version__,
        "gamma": GAMMA,
        "tau": TAU,
        "space_mask_mode": SPACE_MASK_MODE,
        "settings": {k: {"alm_mode": m, "alm_diff_fn": d} for k, (m, d, _) in SETTINGS.items()},
        "teacher_vocab": {"bytes": vt.table(), "special_roles": {r: vt.id((r,)) for r in TEACHER_SPECIALS}},
        "student_vocab": {"bytes": vs.table(), "special_roles": {r: vs.id((r,)) for r in STUDENT_SPECIALS}},
        "tokenkit_space_mask": {"teacher": space_t.astype(int).tolist(), "student": space_s.astype(int).tolist()},
        "cases": {},
    }
    for seed, (name, rows) in enumerate(CASES.items()):
        fixture["cases"][name] = build_case(tk, name, rows, vt, vs, tok_t, tok_s, space_t, space_s, seed)
    fixture["gradmag"] = gradmag_case(tk)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(fixture, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes) from tokenkit {commit}")
    for name, case in fixture["cases"].items():
        print(f"  {name:18s} " + "  ".join(f"{k}={v['loss']:.6g}" for k, v in case["tokenkit"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
