"""Parity with tokenkit, the ALM paper's own (JAX) code: alignment, space mask, ALM loss, GradMag.

`fixtures/tokenkit_alm.json` holds tiny token sequences, logits and what tokenkit computed on
them (written by `scripts/tokenkit_parity.py`, which needs a tokenkit checkout and jax; see
docs/alm.md, "Parity with tokenkit"). Here chorus' own code recomputes everything from the same
inputs: chunks from `transfer.align` on the byte pieces the collator would build, the loss from
`transfer.losses`. The differences (docs/alm.md section 10) are checked as such: tokenkit
divides a merged loss by too few groups (`tokenkit_group_counts`), and it drops the log-prob of a
zero-byte special token that chorus counts in its chunk.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from transfer import align, byte_view, losses
from transfer.data import _marker, cut_chunks

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "tokenkit_alm.json").read_text(encoding="utf-8"))
CASES = FIXTURE["cases"]
EXACT = [name for name in CASES if name != "unmatched_special"]
RTOL, ATOL = 1e-5, 1e-6


def _setting(name: str) -> tuple[str, str]:
    """(chorus debias, distance) of a fixture setting: "space" is tokenkit's
    merge_by_space_prob+append_space, "none" neither."""
    debias, distance = name.split("_", 1)
    return debias, distance


def _table(side: str) -> list[bytes | None]:
    return [None if b is None else bytes(b) for b in FIXTURE[f"{side}_vocab"]["bytes"]]


TABLE_T, TABLE_S = _table("teacher"), _table("student")
ROLES_T, ROLES_S = FIXTURE["teacher_vocab"]["special_roles"], FIXTURE["student_vocab"]["special_roles"]
# As PairCollator: a teacher special with a student counterpart (same role) and that counterpart
# get the student id's marker bytes; other specials and the start token cover no bytes.
MARKERS_T = {ROLES_T[r]: _marker(ROLES_S[r]) for r in ROLES_T if r in ROLES_S and r != "bos"}
MARKERS_S = {ROLES_S[r]: _marker(ROLES_S[r]) for r in ROLES_S if r != "bos"}


def _pieces(ids: list[int], table: list, markers: dict[int, bytes]) -> list[bytes]:
    assert ids[0] == (ROLES_T if table is TABLE_T else ROLES_S)["bos"]  # the zero-byte start token
    return [b""] + [markers.get(i, b"") if table[i] is None else table[i] for i in ids[1:]]


def _our_chunks(row: dict) -> list:
    t_pieces = _pieces(row["full_teacher_ids"], TABLE_T, MARKERS_T)
    s_pieces = _pieces(row["full_student_ids"], TABLE_S, MARKERS_S)
    chunks = align.align_chunks(t_pieces, s_pieces)
    return cut_chunks(chunks, row["budget"]) if row["budget"] else chunks


def _scored_byte_tokens(chunks, t_pieces_len, s_pieces_len) -> list:
    """Chunks as [teacher, student] index lists of the tokens whose log-probs can count: position
    >= 1 (position 0 is never scored) and not zero-byte; chunks left empty are dropped."""
    out = []
    for t_idx, s_idx in chunks:
        t = [i for i in t_idx if i >= 1 and t_pieces_len[i] > 0]
        s = [j for j in s_idx if j >= 1 and s_pieces_len[j] > 0]
        if t or s:
            out.append([t, s])
    return out


def _space_mask(table, monkeypatch) -> torch.Tensor:
    monkeypatch.setattr(byte_view, "token_bytes", lambda _tok: table)
    return byte_view.space_token_mask(object())


@pytest.fixture
def space_masks(monkeypatch):
    return _space_mask(TABLE_T, monkeypatch), _space_mask(TABLE_S, monkeypatch)


def _inputs(case: dict, space_masks, drop_zero_byte_rows: bool = False) -> dict:
    """chorus' loss inputs for a case: the fixture's ids, masks, logits; chunk matrices from
    chorus' own alignment, padded as `build_batch` does."""
    ids_t = torch.tensor(case["teacher_input_ids"])
    ids_s = torch.tensor(case["student_input_ids"])
    lt, ls = ids_t.shape[1], ids_s.shape[1]
    rows = [_our_chunks(r) for r in case["rows"]]
    k = max(map(len, rows))
    mats = [align.chunk_matrices(c, lt, ls, n_chunks=k) for c in rows]
    a, b = torch.stack([m[0] for m in mats]), torch.stack([m[1] for m in mats])
    if drop_zero_byte_rows:  # tokenkit's treatment of tokens it maps to no bytes
        for row, r in enumerate(case["rows"]):
            for i, tid in enumerate(r["teacher_ids"][1:], 1):
                if TABLE_T[tid] is None and tid not in MARKERS_T:
                    b[row, i] = 0
    chunk_mask = torch.zeros(len(rows), k, dtype=torch.bool)
    for row, c in enumerate(rows):
        chunk_mask[row, : len(c)] = True
    return dict(
        student_logits=torch.tensor(case["student_logits"], dtype=torch.float32, requires_grad=True),
        teacher_logits=torch.tensor(case["teacher_logits"], dtype=torch.float32),
        student_ids=ids_s, teacher_ids=ids_t, student_matrix=a, teacher_matrix=b,
        student_mask=torch.tensor(case["student_attention_mask"]),
        teacher_mask=torch.tensor(case["teacher_attention_mask"]),
        student_space_mask=space_masks[1], teacher_space_mask=space_masks[0], chunk_mask=chunk_mask,
    )


def _ours(inputs: dict, setting: str) -> tuple[float, torch.Tensor]:
    debias, distance = _setting(setting)
    inputs["student_logits"].grad = None
    loss = losses.alm_loss(**inputs, debias=debias, distance=distance, gamma=FIXTURE["gamma"], tau=FIXTURE["tau"])
    loss.backward()
    return float(loss.detach()), inputs["student_logits"].grad.clone()


def tokenkit_group_counts(case: dict, space_t: torch.Tensor) -> tuple[int, int]:
    """(groups in tokenkit's merge_by_space_prob loss, groups that loss divides their sum by).

    tokenkit (training/losses.py, compute_alm_loss) merges the per-chunk token counts into
    per-group counts, and then computes the denominator's "global" counts by merging the
    already merged counts a second time (``aligned_count[:, None] @ chunk_merging_matrix``
    after ``aligned_count`` was overwritten): group g' is counted when one of its chunk
    columns k holds a non-empty group k. Groups whose chunk columns all lie past the last
    non-empty group are not counted, so the loss (and its gradient) is scaled by
    groups / counted groups >= 1. Rebuilt here from tokenkit's own column layout (its chunks,
    the bos chunk first, then empty columns up to min(Lt, Ls) that end "at" position 0).
    """
    p_sp = losses.space_prob(torch.tensor(case["teacher_logits"], dtype=torch.float32), space_t).exp()
    columns = min(len(case["teacher_input_ids"][0]), len(case["student_input_ids"][0]))
    groups = counted = 0
    for row, r in enumerate(case["rows"]):
        cols = [t for t, _ in r["tokenkit_chunks"]] + [[]] * (columns - len(r["tokenkit_chunks"]))
        assert all(t == list(range(t[0], t[-1] + 1)) for t in cols if t)  # contiguous: last = t[-1]
        count = [sum(1 for i in t if i >= 1) for t in cols]  # scored teacher tokens
        marks = [bool(p_sp[row, t[-1] if t else 0] > FIXTURE["gamma"]) for t in cols]
        group = [sum(marks[:k]) for k in range(columns)]
        merged, remerged = [0] * columns, [0] * columns
        for k in range(columns):
            merged[group[k]] += count[k]
        for k in range(columns):
            if count[k]:
                remerged[group[k]] += merged[k]
        groups += sum(m > 0 for m in merged)
        counted += sum(m > 0 for m in remerged)
    return groups, counted


def _tokenkit_scale(name: str, setting: str, space_masks) -> float:
    """Factor from chorus' mean over valid groups to tokenkit's value (1 without merging)."""
    if _setting(setting)[0] != "space":
        return 1.0
    groups, counted = tokenkit_group_counts(CASES[name], space_masks[0])
    return groups / counted


# --------------------------------------------------------------------------------------------


def test_fixture_is_tokenkits_default_setting():
    assert FIXTURE["gamma"] == 0.1 and FIXTURE["tau"] == 100.0
    assert FIXTURE["space_mask_mode"] == "space+tab+newline+special"
    assert FIXTURE["settings"]["space_binary_ce"]["alm_mode"] == "merge_by_space_prob+append_space"
    assert len(FIXTURE["tokenkit_commit"]) == 40


def test_space_masks_match(space_masks):
    for mask, side in zip(space_masks, ("teacher", "student")):
        assert mask.int().tolist() == FIXTURE["tokenkit_space_mask"][side]


@pytest.mark.parametrize("name", list(CASES))
def test_chunks_match(name):
    """chorus' chunks (after the collator's cut to the token budget) are tokenkit's, counting the
    tokens whose log-probs can enter a chunk: tokenkit gives both start tokens a chunk of their
    own and drops zero-byte tokens from the matrices, chorus puts them in the chunk that starts
    at them (position 0 is never scored, so that chunk is the same)."""
    for row in CASES[name]["rows"]:
        t_len = [0] + [len(TABLE_T[i]) if TABLE_T[i] is not None else len(MARKERS_T.get(i, b""))
                       for i in row["teacher_ids"][1:]]
        s_len = [0] + [len(TABLE_S[i]) if TABLE_S[i] is not None else len(MARKERS_S.get(i, b""))
                       for i in row["student_ids"][1:]]
        ours = [[list(range(*t)), list(range(*s))] for t, s in _our_chunks(row)]
        assert _scored_byte_tokens(ours, t_len, s_len) == _scored_byte_tokens(row["tokenkit_chunks"], t_len, s_len)


@pytest.mark.parametrize("setting", list(FIXTURE["settings"]))
@pytest.mark.parametrize("name", EXACT)
def test_loss_and_gradient_match(name, setting, space_masks):
    case = CASES[name]
    expected = case["tokenkit"][setting]
    scale = _tokenkit_scale(name, setting, space_masks)
    value, grad = _ours(_inputs(case, space_masks), setting)
    assert value * scale == pytest.approx(expected["loss"], rel=RTOL, abs=ATOL)
    if "grad_student_logits" in expected:
        torch.testing.assert_close(grad * scale, torch.tensor(expected["grad_student_logits"]), rtol=1e-4, atol=1e-7)


def test_tokenkit_group_count_rebuild_agrees_with_chorus_groups(space_masks):
    """The groups counted above are chorus' valid groups; the cases include one where tokenkit
    divides by fewer (its denominator bug changes the value) and ones where it does not."""
    scales = {}
    for name in EXACT:
        inputs = _inputs(CASES[name], space_masks)
        scores = losses.alm_group_scores(**inputs, debias="space", gamma=FIXTURE["gamma"])
        groups, counted = tokenkit_group_counts(CASES[name], space_masks[0])
        assert groups == int(scores.valid.sum())
        scales[name] = groups / counted
    assert scales["words"] == 1.0 and scales["tail"] > 1.0


@pytest.mark.parametrize("debias", ["space", "none"])
def test_default_binary_kl_has_tokenkits_binary_ce_gradient(debias, space_masks):
    """chorus' default distance is binary_ce minus the teacher's binary entropy: tokenkit's
    gradient, and its value less the mean entropy of the teacher's valid groups."""
    for name in EXACT:
        case = CASES[name]
        expected = case["tokenkit"][f"{debias}_binary_ce"]
        scale = _tokenkit_scale(name, f"{debias}_binary_ce", space_masks)
        inputs = _inputs(case, space_masks)
        loss = losses.alm_loss(**inputs, debias=debias, gamma=FIXTURE["gamma"], tau=FIXTURE["tau"])
        loss.backward()
        torch.testing.assert_close(inputs["student_logits"].grad * scale,
                                   torch.tensor(expected["grad_student_logits"]), rtol=1e-4, atol=1e-7)
        scores = losses.alm_group_scores(**inputs, debias=debias, gamma=FIXTURE["gamma"])
        entropy = losses.binary_entropy(scores.teacher, FIXTURE["tau"])[scores.valid].mean()
        assert (float(loss.detach()) + float(entropy)) * scale == pytest.approx(expected["loss"], rel=RTOL, abs=ATOL)


@pytest.mark.parametrize("setting", list(FIXTURE["settings"]))
def test_unmatched_special_differs_only_by_its_log_prob(setting, space_masks):
    """A teacher special with no student counterpart covers zero bytes: chorus counts its
    log-prob in the chunk that starts at it, tokenkit removes it from the chunk. Without that
    token's row the losses agree; with it they differ (docs/alm.md, "Parity with tokenkit")."""
    case = CASES["unmatched_special"]
    expected = case["tokenkit"][setting]
    scale = _tokenkit_scale("unmatched_special", setting, space_masks)
    value, grad = _ours(_inputs(case, space_masks, drop_zero_byte_rows=True), setting)
    assert value * scale == pytest.approx(expected["loss"], rel=RTOL, abs=ATOL)
    if "grad_student_logits" in expected:
        torch.testing.assert_close(grad * scale, torch.tensor(expected["grad_student_logits"]), rtol=1e-4, atol=1e-7)
    ours, _ = _ours(_inputs(case, space_masks), setting)
    assert abs(ours * scale - expected["loss"]) > 1e-3


def test_gradmag_weights_match():
    """tokenkit's approx_gradmag weights, 1 / (||grad_i|| + 1e-8) over the last layer, are
    `balance_weights`; its approx_gradmag_preserve_mag also divides the total by their sum,
    which chorus does not do (docs/alm.md)."""
    g = FIXTURE["gradmag"]
    w, b = torch.zeros(3, 4, requires_grad=True), torch.zeros(4, requires_grad=True)
    grads_w, grads_b = torch.tensor(g["task_grads"]["w"]), torch.tensor(g["task_grads"]["b"])
    terms = {f"t{i}": (grads_w[i] * w).sum() + (grads_b[i] * b).sum() for i in range(len(grads_w))}
    weights = losses.balance_weights(terms, [w, b])
    assert list(weights.values()) == pytest.approx(g["approx_gradmag_weights"], rel=1e-6)
    assert sum(weights.values()) == pytest.approx(g["preserve_mag_denominator"], rel=1e-6)
