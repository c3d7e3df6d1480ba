"""Slow: the vLLM ensemble engine on the real zoo models, against the reference engine.

* Each zoo model pooled with itself (weights 1:3) in vLLM equals the same model alone in vLLM, and
  the reference engine's pooled tokens and log-probs.
* The real three-family ensemble: SmolLM2 (Llama) and Gemma-3 (sliding window 512) moved onto
  the Qwen2 tokenizer by FVT (`transfer.fvt`, as the default ensemble starts out), plus
  Qwen2.5 as it is. One prompt is longer than Gemma-3's window, so its sliding layers matter.

Everything runs in float32 and greedy tokens must be identical. Log-prob tolerances:

* ensemble vs the same model alone, both in vLLM: `ZOO_TOL` after renormalisation (measured
  2e-7 to 7.7e-5, varying from run to run: the engines batch the prompts differently, AsyncLLM
  receiving them one by one, and float32 rounding follows the batch shapes; the tiny
  self-ensemble, 2 layers, stays at 2e-6). The ensemble scores only the shared vocabulary, so
  a model whose head has extra rows (Qwen2.5's 271 filler tokens) has its log-probs raised by the
  same amount at every id of a position, -log(mass of the shared ids), measured 1.2e-4: the test
  checks that the shift is one number per position.
* vLLM vs the reference engine: `ZOO_TOL` = 3e-4 too. Measured on the three-family ensemble
  (1,600 log-probs) against the reference in float64: vLLM float32 max 1.3e-4 (median 1e-5),
  the reference in float32 max 3e-5 (median 1.4e-6): vLLM's CPU float32 kernels are that much
  noisier on 24-30-layer models.
  The tiny-model tests keep 1e-4 (measured 1e-5 to 3e-5).

Skipped when the zoo models are not built. About 7-10 minutes on 2 cores. Memory: for the
three-family ensemble (about 4 GB of float32 weights) vLLM's CPU worker peaks near 10 GB RSS (it
keeps packed copies of weights for its CPU matmuls); the reference engine runs after it stops.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from vllm_harness import aligned_logprobs, compare, run_engine, run_plain_vllm, run_reference

from ensemble.builder import build_ensemble
from ensemble.manifest import MemberSpec

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

TEXTS = (
    "Hello",
    "The quick brown fox jumps over the lazy dog, and then",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
)
LONG_PROMPT_TOKENS = 560  # beyond Gemma-3's 512-token sliding window
LONG_MAX_MODEL_LEN = 640
# Prefill in chunks of 128 tokens, so the long prompt also goes through chunked prefill across
# Gemma-3's window boundary (the reference runs it in one piece).
CHUNK_TOKENS = 128
ZOO_TOL = 3e-4


def compare_renormalised(ours, alone) -> tuple[float, float]:
    """Assert `ours` is `alone` renormalised over a sub-vocabulary: same tokens, and per position
    one shift ``ours - alone >= 0`` shared by every id within ZOO_TOL.

    Returns (the largest spread of a position's shifts, the largest shift).
    """
    spread = shift = 0.0
    for where, values in aligned_logprobs(ours, alone):
        deltas = [p - q for _, p, q in values]
        assert min(deltas) > -ZOO_TOL, f"{where}: the ensemble scores lower than the model alone: {values}"
        assert max(deltas) - min(deltas) < ZOO_TOL, f"{where}: not one shift per position: {values}"
        spread, shift = max(spread, max(deltas) - min(deltas)), max(shift, max(deltas))
    return spread, shift


def _zoo_model(name: str) -> Path:
    from transfer import zoo

    path = zoo.model_dir(name, build=False)
    if not zoo.is_built(path):
        pytest.skip(f"zoo model {name} is not built (run the zoo build first)")
    return path


def _prompts(folder: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]


@pytest.mark.parametrize("name", ["smollm2", "gemma3", "qwen2.5"])
def test_zoo_model_pooled_with_itself_equals_it_alone(name: str, tmp_path: Path) -> None:
    folder = _zoo_model(name)
    prompts = _prompts(folder)
    ensemble = build_ensemble(tmp_path / "self", [MemberSpec("first", str(folder), 1.0),
                                                  MemberSpec("second", str(folder), 3.0)])
    run = run_engine(ensemble, prompts)
    spread, shift = compare_renormalised(run.outputs, run_plain_vllm(folder, prompts))
    reference = compare(run.outputs, run_reference(ensemble, prompts), tol=ZOO_TOL)
    print(f"{name} x2 in vLLM vs {name} alone: max spread {spread:.2e}, max renormalisation shift "
          f"{shift:.2e}; vs the reference: max |logprob diff| {reference:.2e}; vLLM start-up {run.startup_s:.1f} s")


@pytest.fixture(scope="module")
def fvt_members(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """SmolLM2 and Gemma-3 FVT-initialised onto the zoo's Qwen2 tokenizer (about 15 s each)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transfer import zoo
    from transfer.fvt import init_student, save_model_folder

    qwen2 = zoo.tokenizer_dir("qwen2", build=False)
    if not zoo.is_built(qwen2):
        pytest.skip("the zoo's qwen2 tokenizer is not built")
    root = tmp_path_factory.mktemp("fvt")
    out = {}
    for name in ("smollm2", "gemma3"):
        source = _zoo_model(name)
        model = AutoModelForCausalLM.from_pretrained(source)
        student, tokenizer = init_student(model, AutoTokenizer.from_pretrained(source),
                                          AutoTokenizer.from_pretrained(qwen2))
        out[name] = save_model_folder(student, tokenizer, root / name)
    return out


def test_three_family_ensemble_matches_reference(fvt_members: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from transfer import zoo

    qwen = _zoo_model("qwen2.5")
    folder = build_ensemble(
        tmp_path / "three",
        [MemberSpec("smollm", str(fvt_members["smollm2"]), 1.0), MemberSpec("gemma", str(fvt_members["gemma3"]), 1.0),
         MemberSpec("qwen", str(qwen), 2.0)],
        rule="prob_mean", tokenizer_from="qwen",
    )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = zoo.corpus_path("heldout", build=False).read_text(encoding="utf-8")[:20_000]
    long = tokenizer(text, add_special_tokens=False)["input_ids"][:LONG_PROMPT_TOKENS]
    assert len(long) == LONG_PROMPT_TOKENS
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS] + [long]
    run = run_engine(folder, prompts, max_model_len=LONG_MAX_MODEL_LEN,
                     engine_args={"max_num_batched_tokens": CHUNK_TOKENS})
    worst = compare(run.outputs, run_reference(folder, prompts), tol=ZOO_TOL)
    print(f"smollm2+gemma3 (FVT) + qwen2.5: max |logprob diff| {worst:.2e}, vLLM start-up {run.startup_s:.1f} s")
