"""`ensemble fit`: the differentiable pooled score, the fit itself, and the command on a tiny ensemble."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from ensemble.cli import main as cli_main
from ensemble.fit import FitConfig, fit_ensemble
from ensemble.fit_maths import RuleFit, bits_per_byte, fit_rule, pooled_target_logprobs
from ensemble.manifest import EnsembleManifest, ManifestError
from ensemble.pooling import pool_logprobs


@pytest.mark.parametrize("rule", ["prob_mean", "logprob_mean"])
def test_pooled_target_logprobs_equal_the_engines_pooling(rule: str) -> None:
    gen = torch.Generator().manual_seed(0)
    k, r, v = 3, 7, 40
    logits = torch.randn(k, r, v, generator=gen) * 3
    logits[:, :, 38:] = float("-inf")  # padding every member lacks (masked, never a target)
    targets = torch.randint(0, 35, (r,), generator=gen)
    weights, temps = torch.tensor([0.5, 0.2, 0.3]), torch.tensor([0.7, 1.0, 1.6])
    ours = pooled_target_logprobs(logits, targets, weights, temps, rule)
    engines = pool_logprobs(list(logits), weights.tolist(), rule, temps.tolist()).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(ours, engines, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rule", ["prob_mean", "logprob_mean"])
def test_the_fit_leaves_out_what_members_abstain_on(rule: str) -> None:
    """Ids one member lacks (the specials of a longer tokenizer) are pooled over the others by
    the engines, but the fit's objective gives them nothing: it differs from the engines by the
    mass the other members put there, nothing when that mass is as small as a special token's
    in text."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 40, generator=gen) * 3
    logits[1, :, 35:] = float("-inf")  # member 1 lacks ids 35..39
    targets = torch.randint(0, 35, (7,), generator=gen)
    weights, temps = torch.tensor([0.5, 0.2, 0.3]), torch.tensor([0.7, 1.0, 1.6])

    def gap(x: torch.Tensor) -> float:
        ours = pooled_target_logprobs(x, targets, weights, temps, rule)
        engines = pool_logprobs(list(x), weights.tolist(), rule, temps.tolist()).gather(1, targets[:, None])[:, 0]
        return float((ours - engines).abs().max())

    assert gap(logits) > 1e-3
    rare = logits.clone()
    rare[[0, 2], :, 35:] -= 20.0  # the members that have them make them rare
    assert gap(rare) < 1e-5


def _sampled(rows: int = 3000, vocab: int = 30, seed: int = 0):
    """Targets drawn from softmax(z); member 0 has logits 2z (overconfident by 2), member 1 noise."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, vocab, generator=gen) * 1.5
    targets = torch.multinomial(torch.softmax(z, -1), 1, generator=gen)[:, 0]
    logits = torch.stack([2 * z, torch.randn(rows, vocab, generator=gen)])
    return [(logits[:, i:i + 500], targets[i:i + 500]) for i in range(0, rows, 500)], rows


@pytest.mark.parametrize("rule", ["prob_mean", "logprob_mean"])
def test_fit_finds_the_true_member_and_its_temperature(rule: str) -> None:
    windows, n = _sampled()
    equal = bits_per_byte(windows, n, torch.tensor([0.5, 0.5]), torch.ones(2), rule)
    fit = fit_rule(windows, n, rule, temperatures=None)
    assert fit.bits_per_byte < equal
    assert fit.weights[0] > 0.8, fit
    assert fit.temperatures[0] == pytest.approx(2.0, rel=0.2), fit
    # Weights only: the temperatures stay as given.
    kept = fit_rule(windows, n, rule, temperatures=[1.0, 1.0])
    assert kept.temperatures == (1.0, 1.0)
    assert fit.bits_per_byte <= kept.bits_per_byte + 1e-6


def test_fit_config_rejects_bad_values() -> None:
    with pytest.raises(ManifestError, match="unknown pooling rule 'median'"):
        FitConfig(rules=("median",))
    with pytest.raises(ManifestError, match="max_bytes >= window_bytes"):
        FitConfig(max_bytes=100)
    with pytest.raises(ManifestError, match="max_iter"):
        FitConfig(max_iter=0)
    with pytest.raises(ManifestError, match="at least one dev text"):
        FitConfig(texts=())


@pytest.fixture
def dev_text(tmp_path: Path) -> Path:
    path = tmp_path / "dev.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 60, encoding="utf-8")
    return path


def test_fit_command_rewrites_the_manifest(make_ensemble, tiny_models, dev_text: Path, capsys) -> None:
    folder = make_ensemble([("llama", tiny_models["llama"], 1.0), ("gemma", tiny_models["gemma3"], 1.0)])
    status = cli_main(["fit", str(folder), "--text", str(dev_text), "--max-bytes", "1024", "--max-iter", "3"])
    out = capsys.readouterr().out
    assert status == 0, out
    report = json.loads((folder / "fit.json").read_text())
    manifest = EnsembleManifest.load(folder)
    chosen = min(report["fits"], key=lambda f: f["bits_per_byte"])
    assert manifest.rule == chosen["rule"]
    assert list(manifest.weights) == chosen["weights"] and list(manifest.temperatures) == chosen["temperatures"]
    assert chosen["bits_per_byte"] <= report["before"]["bits_per_byte"] + 1e-6
    assert 900 < report["bytes"] <= 1024 and len(report["sha256"][0]) == 64 and "<- chosen" in out
    # Relative member paths and the rest of the manifest survive.
    stored = json.loads((folder / "chorus_ensemble.json").read_text())
    assert [m["name"] for m in stored["members"]] == ["llama", "gemma"]
    # vLLM's copy in config.json is the fitted manifest too.
    assert json.loads((folder / "config.json").read_text())["chorus"] == stored


def test_fit_dry_run_writes_nothing(make_ensemble, tiny_models, dev_text: Path) -> None:
    folder = make_ensemble([("llama", tiny_models["llama"], 1.0), ("gemma", tiny_models["gemma3"], 3.0)])
    before = (folder / "chorus_ensemble.json").read_text()
    report = fit_ensemble(folder, FitConfig(texts=(str(dev_text),), max_bytes=1024, max_iter=2,
                                            rules=("prob_mean",)), write=False)
    assert (folder / "chorus_ensemble.json").read_text() == before and not (folder / "fit.json").exists()
    assert report.before.weights == (1.0, 3.0) and math.isfinite(report.chosen.bits_per_byte)


@pytest.mark.parametrize("args, message", [
    (["{tmp}"], "is not an ensemble folder: chorus_ensemble.json is missing"),
    (["{ens}", "--text", "{tmp}/missing.txt"], "data file {tmp}/missing.txt not found"),
    (["{ens}", "--text", "zoo:nonsense"], "zoo:nonsense: unknown corpus split 'nonsense'"),
])
def test_fit_errors_are_one_line(args, message, tiny_ensemble: Path, tmp_path: Path, capsys) -> None:
    fill = {"tmp": str(tmp_path), "ens": str(tiny_ensemble)}
    status = cli_main(["fit"] + [a.format(**fill) for a in args])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and message.format(**fill) in err, err


def test_mixture_weights_recover_the_mixing_proportions() -> None:
    from ensemble.fit_maths import mixture_weights

    gen = torch.Generator().manual_seed(1)
    a, b = torch.softmax(torch.randn(20000, 8, generator=gen) * 2, -1), torch.softmax(torch.randn(20000, 8, generator=gen) * 2, -1)
    which = torch.rand(20000, generator=gen) < 0.3
    targets = torch.multinomial(torch.where(which[:, None], a, b), 1, generator=gen)[:, 0]
    logprobs = torch.stack([a.log().gather(1, targets[:, None])[:, 0], b.log().gather(1, targets[:, None])[:, 0]])
    w = mixture_weights(logprobs)
    assert w.sum().item() == pytest.approx(1.0) and w[0].item() == pytest.approx(0.3, abs=0.03)


def _masked_windows(seed: int = 2):
    """Three members over 50 ids, one lacking the last ten (-inf), in windows of uneven length."""
    gen = torch.Generator().manual_seed(seed)
    windows = []
    for rows in (5, 13, 1):
        logits = torch.randn(3, rows, 50, generator=gen) * 2
        logits[2, :, 40:] = float("-inf")
        windows.append((logits.to(torch.float16), torch.randint(0, 40, (rows,), generator=gen)))
    return windows


@pytest.mark.parametrize("rule", ["prob_mean", "logprob_mean"])
def test_bits_per_byte_is_the_sum_of_pooled_target_logprobs(rule: str) -> None:
    windows = _masked_windows()
    weights, temps = torch.tensor([0.2, 0.5, 0.3]), torch.tensor([0.8, 1.3, 1.0])
    nats = -sum(float(pooled_target_logprobs(x.float(), t, weights, temps, rule).sum()) for x, t in windows)
    assert bits_per_byte(windows, 77, weights, temps, rule) == pytest.approx(nats / (math.log(2) * 77), rel=1e-5)


def test_geometric_pass_gradient_and_hessian_equal_autograds() -> None:
    from ensemble.fit_maths import _geometric_pass

    windows = _masked_windows()
    c = torch.tensor([0.4, 0.7, 0.2], dtype=torch.float64)

    def loss(c: Tensor) -> Tensor:
        total = 0
        for x, t in windows:
            s = (c[:, None, None] * x.double().clamp_min(-1e4)).sum(0)
            total = total + (torch.logsumexp(s, -1) - s.gather(1, t[:, None])[:, 0]).sum()
        return total

    f, grad, hess = _geometric_pass(windows, c)
    assert f == pytest.approx(float(loss(c)), rel=1e-6)
    torch.testing.assert_close(grad, torch.autograd.functional.jacobian(loss, c), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hess, torch.autograd.functional.hessian(loss, c), rtol=1e-3, atol=1e-3)


def _three_members():
    """Member 0 sharper than the truth plus noise, member 1 flatter plus noise, member 2 the truth negated."""
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(2000, 20, generator=gen) * 1.5
    targets = torch.multinomial(torch.softmax(z, -1), 1, generator=gen)[:, 0]
    logits = torch.stack([1.5 * z + torch.randn(2000, 20, generator=gen), 0.5 * z + torch.randn(2000, 20, generator=gen), -z])
    return [(logits[:, i:i + 400], targets[i:i + 400]) for i in range(0, 2000, 400)]


def test_newton_finds_the_optimum_and_drops_a_useless_member() -> None:
    """Free temperatures: the negated member can only hurt, so it ends at exactly 0, and no point of a
    dense search over the other two (weight x shared temperature) does better."""
    windows = _three_members()
    fit = fit_rule(windows, 2000, "logprob_mean", temperatures=None)
    assert fit.weights[2] == 0.0, fit
    best = min(bits_per_byte(windows, 2000, torch.tensor([w0, 1 - w0, 0.0]), torch.full((3,), temp), "logprob_mean")
               for w0 in torch.linspace(0, 1, 51).tolist() for temp in torch.linspace(0.5, 2.0, 61).tolist())
    assert best - 1e-3 < fit.bits_per_byte <= best + 1e-7


def test_newton_with_fixed_temperatures_stays_on_the_simplex() -> None:
    """Fixed temperatures: the weights sum to one, and no point of a dense simplex search does better
    (here the negated member keeps some weight: with the scale fixed it acts as a cooler)."""
    windows, temps = _three_members(), torch.tensor([0.7, 1.0, 1.5])
    fit = fit_rule(windows, 2000, "logprob_mean", temperatures=temps.tolist())
    assert fit.temperatures == (0.7, 1.0, 1.5) and sum(fit.weights) == pytest.approx(1.0, abs=1e-3)
    grid = [(a / 50, b / 50) for a in range(51) for b in range(51 - a)]
    best = min(bits_per_byte(windows, 2000, torch.tensor([a, b, 1 - a - b]), temps, "logprob_mean") for a, b in grid)
    assert best - 1e-3 < fit.bits_per_byte <= best + 1e-7


def test_gated_pass_gradient_and_hessian_equal_autograds() -> None:
    """With row features the coefficients are theta @ phi_r; the pass differentiates in theta."""
    from ensemble.fit_maths import _geometric_pass

    windows = _masked_windows()
    gen = torch.Generator().manual_seed(5)
    features = [torch.cat([torch.ones(x.shape[1], 1), torch.rand(x.shape[1], 2, generator=gen)], 1) for x, _ in windows]
    theta = torch.tensor([[0.4, 0.1, -0.2], [0.7, 0.0, 0.3], [0.2, -0.1, 0.1]], dtype=torch.float64)

    def loss(theta: Tensor) -> Tensor:
        total = 0
        for (x, t), phi in zip(windows, features):
            c = phi.double() @ theta.t()  # [R, K]
            s = (c.t()[:, :, None] * x.double().clamp_min(-1e4)).sum(0)
            total = total + (torch.logsumexp(s, -1) - s.gather(1, t[:, None])[:, 0]).sum()
        return total

    f, grad, hess = _geometric_pass(windows, theta, features=features)
    assert f == pytest.approx(float(loss(theta)), rel=1e-6)
    torch.testing.assert_close(grad, torch.autograd.functional.jacobian(loss, theta), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hess, torch.autograd.functional.hessian(loss, theta), rtol=1e-3, atol=1e-3)


def _reliable_when_sure(rows: int = 3000, vocab: int = 30, seed: int = 7):
    """Member 0 is the truth, sharpened, on half the rows and flat noise elsewhere (high entropy
    there); member 1 is a blurred truth everywhere: its weight should rise where member 0 is unsure."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, vocab, generator=gen) * 2
    targets = torch.multinomial(torch.softmax(z, -1), 1, generator=gen)[:, 0]
    sure = torch.rand(rows, 1, generator=gen) < 0.5
    m0 = torch.where(sure, 1.5 * z, 0.1 * torch.randn(rows, vocab, generator=gen))
    m1 = 0.5 * z + 0.8 * torch.randn(rows, vocab, generator=gen)
    logits = torch.stack([m0, m1]).to(torch.float16)
    return [(logits[:, i:i + 500], targets[i:i + 500]) for i in range(0, rows, 500)], rows


def test_entropy_gate_beats_fixed_weights_and_is_scored_as_the_engines_pool() -> None:
    from ensemble.fit_maths import fit_entropy_gate, gated_bits_per_byte, window_entropies

    windows, n = _reliable_when_sure()
    plain = fit_rule(windows, n, "logprob_mean", temperatures=None)
    entropies = window_entropies(windows)
    gated = fit_entropy_gate(windows, entropies, n, plain)
    assert gated.entropy_gate is not None and gated.bits_per_byte < plain.bits_per_byte - 0.05, (plain, gated)
    # Member 0's weight falls as its own entropy rises, member 1's rises with it.
    assert gated.entropy_gate.slopes[0][0] < 0 < gated.entropy_gate.slopes[1][0], gated
    # Its bits are the engines' pooled log-probabilities of the targets.
    nats = 0.0
    for x, t in windows:
        pooled = pool_logprobs(list(x.float()), list(gated.weights), "logprob_mean", list(gated.temperatures),
                               gate=gated.entropy_gate)
        nats -= float(pooled.gather(1, t[:, None]).sum())
    assert gated.bits_per_byte == pytest.approx(nats / (math.log(2) * n), rel=1e-5)
    assert gated_bits_per_byte(windows, entropies, n, gated) == pytest.approx(gated.bits_per_byte)


def test_entropy_gate_leaves_a_useless_member_out() -> None:
    from ensemble.fit_maths import fit_entropy_gate, window_entropies

    windows = _three_members()
    plain = fit_rule(windows, 2000, "logprob_mean", temperatures=None)
    gated = fit_entropy_gate(windows, window_entropies(windows), 2000, plain)
    assert gated.weights[2] == 0.0
    if gated.entropy_gate is not None:
        slopes = gated.entropy_gate.slopes
        assert all(row[2] == 0.0 for row in slopes) and slopes[2] == (0.0, 0.0, 0.0)


def test_a_chosen_entropy_gate_is_written_for_both_engines(make_ensemble, tiny_models) -> None:
    """`ensemble fit` stores the chosen gate in the manifest and in vLLM's copy in config.json."""
    from ensemble.fit import FitReport, _write
    from ensemble.pooling import EntropyGate

    folder = make_ensemble([("llama", tiny_models["llama"], 1.0), ("gemma", tiny_models["gemma3"], 1.0)])
    gate = EntropyGate((2.5, 3.0), ((-0.1, 0.05), (0.2, -0.03)))
    plain = RuleFit("logprob_mean", (0.6, 0.4), (1.1, 1.1), 1.5)
    gated = RuleFit("logprob_mean", (0.55, 0.45), (1.05, 1.05), 1.4, gate)
    _write(folder, gated, FitReport(("dev",), ("0" * 64,), 100, 30, plain, (plain, gated)))
    manifest = EnsembleManifest.load(folder)
    assert manifest.entropy_gate == gate and manifest.rule == "logprob_mean" and manifest.weights == (0.55, 0.45)
    stored = json.loads((folder / "chorus_ensemble.json").read_text())
    assert json.loads((folder / "config.json").read_text())["chorus"] == stored
    # A later fit without a gate removes it.
    _write(folder, plain, FitReport(("dev",), ("0" * 64,), 100, 30, gated, (plain,)))
    assert EnsembleManifest.load(folder).entropy_gate is None
