"""transfer.losses: token/chunk log-probs, space debiasing, distances, ALM, SFT, latents, combination."""

from __future__ import annotations

import math
from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from transfer import align, losses, losses_logprobs, tokens, zoo

torch.manual_seed(0)


def _batch1(*tensors):
    return [t.unsqueeze(0) for t in tensors]


def _identity_chunks(n: int):
    """Same tokenizer on both sides: chunk k is token k."""
    a, b = align.chunk_matrices([((k, k + 1), (k, k + 1)) for k in range(n)], n, n)
    return a, b


# --------------------------------------------------------------------------- log-probs


def test_token_logprobs_match_log_softmax():
    logits = torch.randn(2, 5, 7, dtype=torch.bfloat16)
    ids = torch.randint(0, 7, (2, 5))
    lp = losses.token_logprobs(logits, ids)
    assert lp.dtype == torch.float32 and lp.shape == (2, 5)
    ref = torch.log_softmax(logits.float(), -1)
    for b in range(2):
        assert lp[b, 0] == 0
        for t in range(1, 5):
            assert torch.isclose(lp[b, t], ref[b, t - 1, ids[b, t]], atol=1e-6)


def test_token_logprobs_respect_padding():
    logits = torch.randn(2, 4, 5)
    ids = torch.randint(0, 5, (2, 4))
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])  # right- and left-padded
    lp = losses.token_logprobs(logits, ids, mask)
    assert lp[0, 3] == 0 and lp[1, 0] == 0 and lp[1, 1] == 0  # pad, and first real token after pad
    assert lp[0, 1] != 0 and lp[1, 2] != 0
    assert losses.scored_positions(mask).tolist() == [[False, True, True, False], [False, False, True, True]]


def test_chunk_logprobs_sum_and_validity():
    token_lp = torch.tensor([[0.0, -1.0, -2.0, -0.5]])
    matrix = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    chunk_lp, has = losses.chunk_logprobs(token_lp, matrix)
    assert chunk_lp.tolist() == [[0.0, -3.0, -0.5]]
    assert has.tolist() == [[False, True, True]]  # chunk 0 holds only the unscored position 0
    chunk_lp, _ = losses.chunk_logprobs(torch.tensor([[0.0, 1e-7, 1e-7, -0.5]]), matrix)
    assert chunk_lp[0, 1] == 0.0  # min(0, sum): rounding never gives a probability above 1


def test_space_prob():
    logits = torch.tensor([[[0.0, math.log(3.0), 0.0, -1e9]]])  # p = [0.2, 0.6, 0.2, 0]
    mask = torch.tensor([False, True, False])  # shorter than V: the padded id counts as False
    assert torch.isclose(losses.space_prob(logits, mask), torch.tensor([[math.log(0.6)]]), atol=1e-6)
    with pytest.raises(ValueError, match="space_mask"):
        losses.space_prob(logits, torch.ones(5, dtype=torch.bool))


# --------------------------------------------------------------------------- distances


EXTREMES = [0.0, -1e-8, -1e-4, -0.1, -1.0, -30.0, -100.0, -1e3, -1e4]


def test_log1mexp_is_accurate_and_has_finite_gradients():
    x = torch.tensor([-1e-7, -1e-3, -0.5, -0.7, -1.0, -20.0, -100.0, -1e4], dtype=torch.float64, requires_grad=True)
    y = losses.log1mexp(x)
    assert torch.allclose(y, torch.log(-torch.expm1(x)), rtol=1e-12)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_binarised_divergence_gradients_are_finite_at_the_extremes():
    grid_t, grid_s = torch.meshgrid(torch.tensor(EXTREMES), torch.tensor(EXTREMES), indexing="ij")
    lp_s = grid_s.clone().requires_grad_(True)
    loss = losses.binarised_divergence(grid_t, lp_s)
    assert torch.isfinite(loss).all() and (loss >= 0).all()
    loss.sum().backward()
    assert torch.isfinite(lp_s.grad).all()
    assert lp_s.grad.abs().max() > 0
    # -inf log-probs (a -inf logit) stay finite too.
    lp_inf = torch.tensor([float("-inf"), -1.0], requires_grad=True)
    out = losses.binarised_divergence(torch.tensor([-1.0, float("-inf")]), lp_inf)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(lp_inf.grad).all()


def test_binarised_divergence_is_minimised_at_equality():
    """Equal log-probs: the loss equals the binary entropy H(u) (not 0) and d loss / d lpS = 0."""
    lp = torch.tensor(EXTREMES)
    lp_s = lp.clone().requires_grad_(True)
    loss = losses.binarised_divergence(lp, lp_s)
    assert torch.allclose(loss, losses.binary_entropy(lp), atol=1e-6)
    loss.sum().backward()
    assert lp_s.grad.abs().max() < 1e-4
    # Moving the student either way raises the loss.
    mid = torch.tensor([-0.1, -1.0, -30.0, -100.0])
    at_min = losses.binarised_divergence(mid, mid)
    for factor in (0.5, 1.5):
        assert (losses.binarised_divergence(mid, factor * mid) > at_min).all()


def test_abs_divergence():
    assert losses.abs_divergence(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])).tolist() == [1.0, 2.0]


# --------------------------------------------------------------------------- ALM


def _same_tokenizer_inputs(batch=2, length=9, vocab=13, scale=3.0):
    logits_t = scale * torch.randn(batch, length, vocab)
    ids = torch.randint(0, vocab, (batch, length))
    a, b = _identity_chunks(length)
    space = torch.zeros(vocab, dtype=torch.bool)
    space[:4] = True
    return logits_t, ids, a.expand(batch, -1, -1), b.expand(batch, -1, -1), space


@pytest.mark.parametrize("debias", ["space", "none"])
def test_student_equal_to_teacher(debias):
    """Same tokenizer and student == teacher: the default ALM loss (binary KL) and the abs loss
    are 0; the raw binarised loss equals the mean binary entropy of the teacher's group
    probabilities; the gradient w.r.t. the student logits vanishes (the student sits at the
    minimum)."""
    logits_t, ids, a, b, space = _same_tokenizer_inputs()
    student = logits_t.clone().requires_grad_(True)
    kw = dict(student_space_mask=space, teacher_space_mask=space, debias=debias)
    assert losses.alm_loss(student, logits_t, ids, ids, a, b, distance="abs", **kw) == 0
    raw = losses.alm_loss(student, logits_t, ids, ids, a, b, distance="binary_ce", **kw)
    scores = losses.alm_group_scores(student, logits_t, ids, ids, a, b, **kw)
    assert scores.valid.any()
    expected = losses.binary_entropy(scores.teacher)[scores.valid].mean()
    assert torch.isclose(raw, expected, rtol=1e-5)
    loss = losses.alm_loss(student, logits_t, ids, ids, a, b, **kw)
    assert abs(float(loss.detach())) < 1e-6
    loss.backward()
    assert student.grad.abs().max() < 1e-6
    # A perturbed student has a larger loss and a non-zero gradient.
    other = (logits_t + torch.randn_like(logits_t)).requires_grad_(True)
    worse = losses.alm_loss(other, logits_t, ids, ids, a, b, **kw)
    worse.backward()
    assert worse > loss and other.grad.abs().max() > 1e-6


def test_binary_kl_is_the_binarised_divergence_minus_its_floor():
    """Non-negative, 0 only at equality, and with exactly the binarised divergence's gradient."""
    lp_t = -torch.rand(64) * 20
    lp_s = (-torch.rand(64) * 20).requires_grad_(True)
    kl = losses.binary_kl_divergence(lp_t, lp_s)
    assert (kl >= -1e-7).all() and kl.max() > 0
    assert losses.binary_kl_divergence(lp_t, lp_t).abs().max() < 1e-7
    (g_kl,) = torch.autograd.grad(kl.sum(), lp_s)
    (g_ce,) = torch.autograd.grad(losses.binarised_divergence(lp_t, lp_s).sum(), lp_s)
    torch.testing.assert_close(g_kl, g_ce)


def test_same_tokenizer_reduces_to_token_level_matching():
    """Every chunk is one token, so ALM without debiasing is the per-token distance at t >= 1."""
    logits_t, ids, a, b, _ = _same_tokenizer_inputs()
    logits_s = torch.randn_like(logits_t)
    lp_t = losses.token_logprobs(logits_t, ids)[:, 1:]
    lp_s = losses.token_logprobs(logits_s, ids)[:, 1:]
    for distance, fn in (("binary_kl", losses.binary_kl_divergence), ("binary_ce", losses.binarised_divergence),
                         ("abs", losses.abs_divergence)):
        got = losses.alm_loss(logits_s, logits_t, ids, ids, a, b, debias="none", distance=distance)
        assert torch.isclose(got, fn(lp_t, lp_s).mean(), rtol=1e-6)


def test_space_debiasing_groups_on_a_hand_built_example():
    """Teacher 6 tokens, student 6 tokens, 4 chunks; the teacher's p_sp is high after chunks 0 and 2."""
    vocab, space_id = 5, 4
    space = torch.zeros(vocab, dtype=torch.bool)
    space[space_id] = True
    chunks = [((0, 2), (0, 2)), ((2, 3), (2, 4)), ((3, 5), (4, 5)), ((5, 6), (5, 6))]
    a, b = align.chunk_matrices(chunks, 6, 6)
    ids_t = torch.tensor([0, 1, 2, 3, 1, 2])
    ids_s = torch.tensor([0, 3, 1, 1, 2, 0])
    logits_t = torch.randn(6, vocab)
    logits_t[:, space_id] = -5.0  # p_sp well below gamma ...
    logits_t[1, space_id] = 5.0  # ... except after teacher token 1 (end of chunk 0)
    logits_t[4, space_id] = 5.0  # and after teacher token 4 (end of chunk 2)
    logits_s = torch.randn(6, vocab)
    logits_t, logits_s, ids_t, ids_s, a, b = _batch1(logits_t, logits_s, ids_t, ids_s, a, b)
    scores = losses.alm_group_scores(logits_s, logits_t, ids_s, ids_t, a, b, student_space_mask=space,
                                     teacher_space_mask=space, debias="space", gamma=0.1)
    # Chunk 3 reaches no likely boundary: it is the row's last group, ending at the row's end
    # with its (low) p_sp, as in tokenkit (tests/transfer/test_tokenkit_parity.py).
    assert scores.chunk_group.tolist() == [[0, 1, 1, 2]]
    assert scores.valid.tolist() == [[True, True, True, False]]
    lt, ls = losses.token_logprobs(logits_t, ids_t)[0], losses.token_logprobs(logits_s, ids_s)[0]
    spt, sps = losses.space_prob(logits_t, space)[0], losses.space_prob(logits_s, space)[0]
    expected_t = [lt[1] + spt[1], lt[2] + lt[3] + lt[4] + spt[4], lt[5] + spt[5]]
    expected_s = [ls[1] + sps[1], ls[2] + ls[3] + ls[4] + sps[4], ls[5] + sps[5]]  # the student's own p_sp
    assert torch.allclose(scores.teacher[0, :3], torch.stack(expected_t), atol=1e-5)
    assert torch.allclose(scores.student[0, :3], torch.stack(expected_s), atol=1e-5)
    # Raising gamma above every p_sp leaves one group: the whole row, closed by the p_sp at its end.
    logits_s.requires_grad_(True)
    kw = dict(student_space_mask=space, teacher_space_mask=space, gamma=0.999999)
    scores = losses.alm_group_scores(logits_s, logits_t, ids_s, ids_t, a, b, **kw)
    assert scores.chunk_group.tolist() == [[0, 0, 0, 0]] and scores.valid.tolist() == [[True, False, False, False]]
    assert torch.allclose(scores.teacher[0, 0], lt[1:].sum() + spt[5], atol=1e-5)
    loss = losses.alm_loss(logits_s, logits_t, ids_s, ids_t, a, b, **kw)
    assert loss > 0 and loss.requires_grad
    # No valid group at all (every chunk masked out): the loss is 0, with a graph.
    loss = losses.alm_loss(logits_s, logits_t, ids_s, ids_t, a, b, chunk_mask=torch.zeros(1, 4, dtype=torch.bool), **kw)
    assert loss == 0 and loss.requires_grad


def test_groups_with_an_invalid_chunk_are_dropped():
    # Chunk 0 holds only the unscored first token on the teacher side: the group containing it is invalid.
    chunks = [((0, 1), (0, 2)), ((1, 2), (2, 3)), ((2, 3), (3, 4))]
    a, b = align.chunk_matrices(chunks, 3, 4)
    space = torch.tensor([True, False, False])
    logits_t = torch.zeros(1, 3, 3)
    logits_t[..., 0] = 5.0  # every chunk end is a word boundary for the teacher
    ids_t, ids_s = torch.tensor([[1, 2, 1]]), torch.tensor([[1, 2, 2, 1]])
    scores = losses.alm_group_scores(torch.randn(1, 4, 3), logits_t, ids_s, ids_t, a[None], b[None],
                                     student_space_mask=space, teacher_space_mask=space)
    assert scores.valid.tolist() == [[False, True, True]]
    chunk_mask = torch.tensor([[True, True, False]])  # e.g. loss on the response only
    scores = losses.alm_group_scores(torch.randn(1, 4, 3), logits_t, ids_s, ids_t, a[None], b[None],
                                     student_space_mask=space, teacher_space_mask=space, chunk_mask=chunk_mask)
    assert scores.valid.tolist() == [[False, True, False]]


def test_batched_loss_with_padding_equals_the_pooled_single_rows():
    vocab = 11
    space = torch.zeros(vocab, dtype=torch.bool)
    space[:5] = True
    rows = []
    # Each row starts with a zero-byte BOS on both sides, as the collator does.
    for teacher_split, student_split in (([0, 1, 1, 2, 1, 3], [0, 2, 1, 1, 1, 1, 2]), ([0, 1, 2], [0, 1, 1, 1])):
        t_pieces = [b"x" * k for k in teacher_split]
        s_pieces = [b"x" * k for k in student_split]
        chunks = align.align_chunks(t_pieces, s_pieces)
        rows.append((t_pieces, s_pieces, chunks))
    max_t = max(len(r[0]) for r in rows)
    max_s = max(len(r[1]) for r in rows)
    max_k = max(len(r[2]) for r in rows)
    logits_t = 2 * torch.randn(2, max_t, vocab)
    logits_s = 2 * torch.randn(2, max_s, vocab)
    ids_t = torch.randint(0, vocab, (2, max_t))
    ids_s = torch.randint(0, vocab, (2, max_s))
    mats = [align.chunk_matrices(c, max_t, max_s, n_chunks=max_k) for _, _, c in rows]
    a = torch.stack([m[0] for m in mats])
    b = torch.stack([m[1] for m in mats])
    mask_t = torch.tensor([[i < len(r[0]) for i in range(max_t)] for r in rows])
    mask_s = torch.tensor([[i < len(r[1]) for i in range(max_s)] for r in rows])
    kw = dict(student_space_mask=space, teacher_space_mask=space, gamma=0.3)
    batched = losses.alm_group_scores(logits_s, logits_t, ids_s, ids_t, a, b, mask_s, mask_t, **kw)
    total, count = 0.0, 0
    for i, (t_pieces, s_pieces, chunks) in enumerate(rows):
        nt, ns, k = len(t_pieces), len(s_pieces), len(chunks)
        single = losses.alm_group_scores(logits_s[i:i + 1, :ns], logits_t[i:i + 1, :nt], ids_s[i:i + 1, :ns],
                                         ids_t[i:i + 1, :nt], a[i:i + 1, :ns, :k], b[i:i + 1, :nt, :k], **kw)
        assert torch.equal(single.valid[0], batched.valid[i, :k]) and not batched.valid[i, k:].any()
        assert torch.allclose(single.student[0], batched.student[i, :k], atol=1e-6)
        total += float(losses.binary_kl_divergence(single.teacher, single.student)[single.valid].sum())
        count += int(single.valid.sum())
    assert count > 0
    loss = losses.alm_loss(logits_s, logits_t, ids_s, ids_t, a, b, mask_s, mask_t, **kw)
    assert math.isclose(float(loss), total / count, rel_tol=1e-5, abs_tol=1e-7)


def test_alm_is_differentiable_wrt_the_student_only_and_finite_at_extremes():
    logits_t, ids, a, b, space = _same_tokenizer_inputs(scale=1e4)
    student = 1e4 * torch.randn_like(logits_t)
    for t in range(2, ids.shape[1], 2):  # every other token is certain: log-prob ~0; the rest ~-1e4
        student[:, t - 1].scatter_(1, ids[:, t:t + 1], student[:, t - 1].max(-1, keepdim=True).values + 1e4)
        logits_t[:, t - 1].scatter_(1, ids[:, t:t + 1], logits_t[:, t - 1].max(-1, keepdim=True).values + 1e4)
    logits_t.requires_grad_(True)
    student.requires_grad_(True)
    lp = losses.token_logprobs(student, ids)
    assert lp.min() < -1e3 and lp[:, 2].max() > -1e-3
    for distance in ("binary_ce", "abs"):
        for debias in ("space", "none"):
            student.grad = None
            loss = losses.alm_loss(student, logits_t, ids, ids, a, b, student_space_mask=space,
                                   teacher_space_mask=space, debias=debias, distance=distance)
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    assert logits_t.grad is None


def test_minus_infinity_logits_stay_finite():
    """A -inf logit on a target token (a masked vocabulary entry) must not turn the loss into NaN."""
    logits_t, ids, a, b, space = _same_tokenizer_inputs()
    logits_t[0, 2, ids[0, 3]] = float("-inf")
    student = torch.randn_like(logits_t)
    student[1, 4, ids[1, 5]] = float("-inf")
    student[1, 5, :4] = float("-inf")  # no word boundary possible: log p_sp = -inf
    student.requires_grad_(True)
    for debias in ("space", "none"):
        for distance in ("binary_ce", "abs"):
            student.grad = None
            loss = losses.alm_loss(student, logits_t, ids, ids, a, b, student_space_mask=space,
                                   teacher_space_mask=space, debias=debias, distance=distance)
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


@lru_cache(maxsize=None)
def _tokenizer(name):
    return AutoTokenizer.from_pretrained(zoo.tokenizer_dir(name))


def test_alm_on_real_tokenizers_end_to_end():
    """Llama 3 teacher, Qwen2 student: byte pieces -> chunks -> matrices -> loss, as the collator will."""
    teacher, student = _tokenizer("llama3"), _tokenizer("qwen2")
    texts = ["To be, or not to be: that is the question.\n", "def f(x):\n    return x ** 2  # 👍 日本語\n"]
    rows = []
    for text in texts:
        t_ids, t_pieces = tokens.tokenize_bytes(teacher, text)
        s_ids, s_pieces = tokens.tokenize_bytes(student, text)
        t_ids, t_pieces = [tokens.start_token_id(teacher)] + t_ids, [b""] + t_pieces
        s_ids, s_pieces = [tokens.start_token_id(student)] + s_ids, [b""] + s_pieces
        rows.append((t_ids, s_ids, align.align_chunks(t_pieces, s_pieces)))
    nt, ns, k = (max(len(r[i]) for r in rows) for i in range(3))
    ids_t = torch.tensor([r[0] + [0] * (nt - len(r[0])) for r in rows])
    ids_s = torch.tensor([r[1] + [0] * (ns - len(r[1])) for r in rows])
    mask_t = torch.tensor([[1] * len(r[0]) + [0] * (nt - len(r[0])) for r in rows])
    mask_s = torch.tensor([[1] * len(r[1]) + [0] * (ns - len(r[1])) for r in rows])
    mats = [align.chunk_matrices(r[2], nt, ns, n_chunks=k) for r in rows]
    a, b = torch.stack([m[0] for m in mats]), torch.stack([m[1] for m in mats])
    logits_t = torch.randn(2, nt, len(teacher))
    logits_s = torch.randn(2, ns, len(student) + 271, requires_grad=True)  # an embedding padded past the vocab
    space_t, space_s = tokens.space_token_mask(teacher), tokens.space_token_mask(student, len(student) + 271)
    scores = losses.alm_group_scores(logits_s, logits_t, ids_s, ids_t, a, b, mask_s, mask_t, space_s, space_t,
                                     debias="none")
    for row, (_, _, chunks) in enumerate(rows):
        assert scores.valid[row, : len(chunks)].all()  # the zero-byte start token makes chunk 0 comparable
    loss = losses.alm_loss(logits_s, logits_t, ids_s, ids_t, a, b, mask_s, mask_t, space_s, space_t)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0 and torch.isfinite(logits_s.grad).all()


def test_alm_rejects_bad_options():
    logits_t, ids, a, b, space = _same_tokenizer_inputs()
    with pytest.raises(ValueError, match="debias"):
        losses.alm_loss(logits_t, logits_t, ids, ids, a, b, debias="bias-tables")
    with pytest.raises(ValueError, match="space_mask"):
        losses.alm_loss(logits_t, logits_t, ids, ids, a, b)
    with pytest.raises(ValueError, match="distance"):
        losses.alm_loss(logits_t, logits_t, ids, ids, a, b, debias="none", distance="kl")
    with pytest.raises(ValueError, match="chunks"):
        losses.alm_loss(logits_t, logits_t, ids, ids, a[:, :, :3], b, debias="none")


# --------------------------------------------------------------------------- other terms


def test_sft_loss_is_masked_cross_entropy():
    logits = torch.randn(2, 6, 9, requires_grad=True)
    ids = torch.randint(0, 9, (2, 6))
    attention = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 1]])
    got = losses.sft_loss(logits, ids, loss_mask, attention)
    targets = ids[:, 1:].clone()
    keep = (loss_mask[:, 1:] & attention[:, 1:] & attention[:, :-1]).bool()
    targets[~keep] = -100
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 9), targets.reshape(-1), ignore_index=-100)
    assert torch.isclose(got, ref, atol=1e-6)
    got.backward()
    assert torch.isfinite(logits.grad).all()


def test_latents_loss():
    d = 4
    chunks = [((0, 2), (0, 1)), ((2, 3), (1, 3))]
    a, b = align.chunk_matrices(chunks, 3, 3)
    ht = torch.randn(1, 3, d)
    hs = torch.randn(1, 3, d, requires_grad=True)
    ht.requires_grad_(True)
    loss = losses.latents_loss(hs, ht, a[None], b[None])
    # Chunk ends: teacher tokens 1 and 2, student tokens 0 and 2.
    t_end, s_end = ht[0, [1, 2]].detach(), hs[0, [0, 2]]
    expected = ((s_end - t_end).pow(2) / (t_end.pow(2).mean(0) + 1e-6)).mean()
    assert torch.isclose(loss, expected, rtol=1e-6)
    loss.backward()
    assert ht.grad is None and hs.grad[0, 1].abs().sum() == 0 and hs.grad[0, 0].abs().sum() > 0
    same = losses.latents_loss(ht.detach()[:, [1, 1, 2]], ht.detach(), a[None], b[None])
    assert same == 0
    with pytest.raises(ValueError, match="hidden size"):
        losses.latents_loss(torch.randn(1, 3, 5), ht, a[None], b[None])


def test_combine_losses_fixed_weights():
    x = torch.tensor(2.0, requires_grad=True)
    total, used = losses.combine_losses({"alm": x * 3, "sft": x * x}, {"sft": 0.5})
    assert used == {"alm": 1.0, "sft": 0.5} and torch.isclose(total, torch.tensor(6.0 + 2.0))
    with pytest.raises(ValueError, match="unknown"):
        losses.combine_losses({"alm": x}, {"latents": 1.0})


def test_combine_losses_balances_gradient_magnitudes():
    layer = torch.nn.Linear(4, 3)
    other = torch.nn.Parameter(torch.randn(3))
    inp = torch.randn(5, 4)
    out = layer(inp)
    terms = {"big": 1000.0 * out.pow(2).mean(), "small": 1e-3 * (out * other).sum(), "constant": other.sum() * 0}
    params = list(layer.parameters())
    factors = losses.balance_weights(terms, params)
    total, used = losses.combine_losses(terms, {"small": 2.0}, factors)
    assert used["constant"] == 0.0  # no gradient on the balanced parameters
    for name, norm in (("big", 1.0), ("small", 2.0)):  # the fixed weight scales the balanced norm
        grads = torch.autograd.grad(terms[name] * used[name], params, retain_graph=True)
        assert math.isclose(math.sqrt(sum(float(g.pow(2).sum()) for g in grads)), norm, rel_tol=1e-4)
    # averaged over processes: squared norms 4x as large -> factors halved, the same on every process
    reduced = losses.balance_weights(terms, params, reduce=lambda squares: squares * 4)
    assert reduced["big"] == pytest.approx(factors["big"] / 2, rel=1e-5)
    # a term without a usable gradient keeps the factor it had
    assert losses.balance_weights(terms, params, previous={"constant": 0.7})["constant"] == 0.7
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in params)
    with pytest.raises(ValueError, match="requires grad"):
        losses.balance_weights(terms, [torch.zeros(2)])

    with pytest.raises(ValueError, match="unknown"):
        losses.combine_losses({"big": terms["big"]}, balance={"small": 1.0})


# --------------------------------------------------------------------------- blockwise vocabulary statistics


def test_vocab_stats_match_autograd_reference_across_blocks(monkeypatch):
    """Values and gradients of the blockwise pass equal plain autograd, with blocks of 2 rows."""
    monkeypatch.setattr(losses_logprobs, "STATS_BLOCK", 2 * 50)  # read where vocab_stats lives
    logits = torch.randn(2, 5, 50, dtype=torch.float64)
    logits[0, 1, 3] = float("-inf")
    targets = torch.randint(0, 50, (2, 5))
    targets[1, 4] = -1
    subset = torch.rand(47) < 0.4  # shorter than V: the last ids are outside the subset
    weights = [torch.randn(2, 5, dtype=torch.float64) for _ in range(3)]

    x = logits.clone().requires_grad_(True)
    got = losses.vocab_stats(x, targets, subset)
    sum(w * o for w, o in zip(weights, got)).sum().backward()

    y = logits.clone().requires_grad_(True)
    idx = subset.nonzero().squeeze(-1)
    picked = y.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * (targets >= 0)
    ref = (torch.logsumexp(y, -1), picked, torch.logsumexp(y[..., idx], -1))
    sum(w * o for w, o in zip(weights, ref)).sum().backward()

    for a, b in zip(got, ref):
        assert a.dtype == torch.float32 and torch.allclose(a.double(), b, atol=1e-5)
    assert torch.allclose(x.grad, y.grad, atol=1e-6)


def test_vocab_stats_keep_the_logits_dtype_and_skip_unused_outputs():
    logits = torch.randn(3, 4, 40, dtype=torch.bfloat16, requires_grad=True)
    lse, _, sub = losses.vocab_stats(logits)
    assert torch.isneginf(sub).all()  # no subset given
    lse.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    assert torch.allclose(logits.grad.float(), torch.softmax(logits.float(), -1), atol=1e-2)
