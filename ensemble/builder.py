"""Build an ensemble folder from member model folders, validating everything before writing.

`build_ensemble` checks that every member

* is a Hugging Face causal-LM folder with its own tokenizer files;
* shares the regular-token vocabulary with the tokenizer-from member: token byte strings are
  compared id by id (see `ensemble.vocab`), and the first differing id is named with both tokens
  (special tokens after the reference's last text token may differ: the member abstains on them,
  which lets byte-level members of different families pool their 256 bytes);
* has an embedding row for every id of the shared vocabulary (rows beyond it are padding and are
  sliced off; ids a member's tokenizer lacks are masked for that member);

then maps each special role (bos, eos, end-of-turn, pad) to one id, takes ``max_model_len`` as
the minimum over members, and writes the folder atomically (a temporary sibling folder renamed
into place): the manifest, the shared tokenizer with its chat template, ``config.json`` for vLLM
and a ``generation_config.json`` listing the stop ids. Nothing is written when a check fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ensemble.hf_config import write_manifest
from ensemble.manifest import (
    EnsembleManifest,
    ManifestError,
    MemberSpec,
    SpecialTokens,
    check_members,
)
from ensemble.pooling import DEFAULT_ALPHA
from ensemble.vocab import TokenTable, describe_token, end_of_turn_token, first_mismatch, token_bytes_table


@dataclass(frozen=True)
class MemberInfo:
    """What the builder learned about one member folder."""

    spec: MemberSpec
    tokenizer: Any
    table: TokenTable
    embedding_rows: int
    max_positions: int


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


def _tokenizer_digest(path: Path) -> str:
    """sha256 over a folder's tokenizer files: equal digests mean equal tokenizers."""
    digest = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        file = path / name
        if file.is_file():
            digest.update(name.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


@lru_cache(maxsize=8)
def _load_tokenizer(digest: str, path: str) -> tuple[Any, TokenTable]:
    """Load a tokenizer and its byte table once per distinct content (both treated read-only)."""
    from transfer.tokens import load_tokenizer

    tokenizer = load_tokenizer(path)
    if not hasattr(tokenizer, "backend_tokenizer"):
        raise ManifestError(f"the tokenizer in {path} is not a fast (tokenizers) tokenizer")
    return tokenizer, token_bytes_table(tokenizer)


def inspect_member(spec: MemberSpec) -> MemberInfo:
    """Load a member's config and tokenizer (not its weights); ManifestError if unusable."""
    from transformers import AutoConfig

    path = Path(spec.path)
    if not path.is_dir():
        raise ManifestError(f"member {spec.name!r}: {path} is not a folder")
    if not (path / "config.json").is_file():
        raise ManifestError(f"member {spec.name!r}: {path} has no config.json (not a Hugging Face model folder)")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ManifestError(f"member {spec.name!r}: {path} has no tokenizer files (tokenizer.json)")
    try:
        config = _text_config(AutoConfig.from_pretrained(path))
    except Exception as err:  # noqa: BLE001 - any loader failure becomes one clear line
        raise ManifestError(f"member {spec.name!r}: cannot read {path / 'config.json'}: {err}") from None
    try:
        tokenizer, table = _load_tokenizer(_tokenizer_digest(path), str(path))
    except ManifestError as err:
        raise ManifestError(f"member {spec.name!r}: {err}") from None
    except Exception as err:  # noqa: BLE001
        raise ManifestError(f"member {spec.name!r}: cannot load the tokenizer in {path}: {err}") from None
    rows = getattr(config, "vocab_size", None)
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(rows, int) or rows < 1:
        raise ManifestError(f"member {spec.name!r}: config.json has no vocab_size")
    if not isinstance(positions, int) or positions < 1:
        raise ManifestError(f"member {spec.name!r}: config.json has no max_position_embeddings")
    return MemberInfo(spec, tokenizer, table, rows, positions)


def check_shared_vocabulary(reference: MemberInfo, member: MemberInfo, vocab_size: int) -> int:
    """The ids `member` scores (its ids from there up to `vocab_size` are masked: it abstains on
    them); raise ManifestError unless it spells every text token of `reference` alike.

    Ids below `vocab_size` that both tokenizers have must mean the same bytes, up to where the
    reference has no text tokens left: from there on (its special tokens) the tokenizers may
    differ, and the member abstains. Byte-level members of different families share the 256 bytes
    and differ in their special tokens from id 256 on. Such a member still reads the reference's
    special ids in a prompt (a chat template's turn markers) as its own special tokens of the same
    ids: plain text is the same for every member, chat markers are not. Ids the member's (shorter) tokenizer lacks
    are allowed only for the reference's special tokens, likewise masked for it. Ids beyond
    `vocab_size` do not matter.
    """
    ref, other = reference.table, member.table
    scored = min(len(other), vocab_size)
    if ref is other:  # byte-identical tokenizer files
        return scored
    bad = first_mismatch(ref, other, limit=min(vocab_size, len(ref), len(other)))
    if bad is not None:
        text_after = next((i for i in range(bad, vocab_size) if ref.is_text_token(i)), None)
        if text_after is not None:
            raise ManifestError(
                f"member {member.spec.name!r} does not share the vocabulary of {reference.spec.name!r}: "
                f"first difference at token id {bad}: {reference.spec.name!r} has {describe_token(ref, bad)}, "
                f"{member.spec.name!r} has {describe_token(other, bad)}"
            )
        return bad  # only special tokens differ from here on
    missing = next((i for i in range(len(other), vocab_size) if ref.is_text_token(i)), None)
    if missing is not None:
        raise ManifestError(
            f"member {member.spec.name!r} does not share the vocabulary of {reference.spec.name!r}: its tokenizer "
            f"has {len(other)} tokens and lacks token id {missing}: {describe_token(ref, missing)}"
        )
    return scored


def _role_token(tokenizer: Any, role: str) -> str | None:
    if role == "eot":
        return end_of_turn_token(tokenizer)
    token = getattr(tokenizer, f"{role}_token", None)
    return str(token) if token else None


def map_special_tokens(reference: MemberInfo, infos: Sequence[MemberInfo], vocab_size: int) -> SpecialTokens:
    """One id per role: the reference tokenizer's own, else the first member's that the shared
    vocabulary also knows (looked up by token text)."""
    vocab = reference.tokenizer.get_vocab()
    ids: dict[str, int | None] = {}
    for role in ("bos", "eos", "eot", "pad"):
        ids[role] = None
        for info in (reference, *[i for i in infos if i is not reference]):
            token = _role_token(info.tokenizer, role)
            if token is not None and token in vocab and vocab[token] < vocab_size:
                ids[role] = vocab[token]
                break
    return SpecialTokens(**ids)


def _pick(name: str | None, infos: Sequence[MemberInfo], what: str) -> MemberInfo:
    if name is None:
        return infos[0]
    for info in infos:
        if info.spec.name == name:
            return info
    raise ManifestError(f"{what} {name!r} is not a member (members: {', '.join(i.spec.name for i in infos)})")


def plan_ensemble(
    members: Sequence[MemberSpec],
    rule: str = "prob_mean",
    tokenizer_from: str | None = None,
    chat_template_from: str | None = None,
    name: str = "ensemble",
    contrastive_alpha: float = DEFAULT_ALPHA,
) -> tuple[EnsembleManifest, MemberInfo, str | None]:
    """Validate members and return (manifest, tokenizer-from member, chat template); no writes."""
    check_members(members, rule)
    members = [m.model_copy(update={"path": str(Path(m.path).expanduser().resolve())}) for m in members]
    infos = [inspect_member(m) for m in members]
    reference = _pick(tokenizer_from, infos, "tokenizer_from")
    vocab_size = reference.table.useful_size()
    scored = {info.spec.name: (check_shared_vocabulary(reference, info, vocab_size) if info is not reference
                               else min(len(info.table), vocab_size)) for info in infos}
    for info in infos:
        if info.embedding_rows < vocab_size:
            raise ManifestError(
                f"member {info.spec.name!r} has {info.embedding_rows} embedding rows but the shared "
                f"vocabulary has {vocab_size} tokens"
            )
    specs = tuple(i.spec.model_copy(update={"vocab_size": scored[i.spec.name]}) for i in infos)
    template_info = _pick(chat_template_from, infos, "chat_template_from") if chat_template_from else None
    if template_info is None:
        template_info = next((i for i in (reference, *infos) if i.tokenizer.chat_template), None)
    template = template_info.tokenizer.chat_template if template_info else None
    manifest = EnsembleManifest(
        name=name,
        members=specs,
        rule=rule,
        vocab_size=vocab_size,
        max_model_len=min(i.max_positions for i in infos),
        special_tokens=map_special_tokens(reference, infos, vocab_size),
        tokenizer_from=reference.spec.name,
        chat_template_from=template_info.spec.name if template_info and template else None,
        contrastive_alpha=contrastive_alpha,
    )
    return manifest, reference, template


def _write_tokenizer(reference: MemberInfo, template: str | None, manifest: EnsembleManifest, out: Path) -> None:
    """Copy the reference member's tokenizer files, with the chosen chat template and the
    ensemble's context length in ``tokenizer_config.json`` (and ``chat_template.jinja``)."""
    src = Path(reference.spec.path)
    for name in _TOKENIZER_FILES:
        if (src / name).is_file() and name not in ("chat_template.jinja", "chat_template.json"):
            shutil.copyfile(src / name, out / name)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config.pop("chat_template", None)
    if template:
        config["chat_template"] = template
        (out / "chat_template.jinja").write_text(template)
    config["model_max_length"] = manifest.max_model_len
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _write_folder(out: Path, manifest: EnsembleManifest, reference: MemberInfo, template: str | None) -> None:
    write_manifest(manifest, out)
    _write_tokenizer(reference, template, manifest, out)
    special = manifest.special_tokens
    generation = {"eos_token_id": list(special.stop_ids)}
    for role in ("bos", "pad"):
        if getattr(special, role) is not None:
            generation[f"{role}_token_id"] = getattr(special, role)
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def build_ensemble(
    out_dir: str | Path,
    members: Sequence[MemberSpec],
    rule: str = "prob_mean",
    tokenizer_from: str | None = None,
    chat_template_from: str | None = None,
    name: str | None = None,
    overwrite: bool = False,
    contrastive_alpha: float = DEFAULT_ALPHA,
) -> Path:
    """Validate `members` and write the ensemble folder `out_dir` atomically; return its path.

    Args:
        out_dir: the folder to create (its parent must be writable).
        members: the member models (paths to Hugging Face folders with tokenizer files).
        rule: default pooling rule, ``prob_mean`` or ``logprob_mean``.
        tokenizer_from: the member whose tokenizer the ensemble uses (default: the first).
        chat_template_from: the member whose chat template the ensemble uses (default: the
            tokenizer-from member's, else the first member that has one).
        name: the served model name (default: the folder name).
        overwrite: replace an existing folder at `out_dir`.
        contrastive_alpha: the plausibility threshold of contrastive pooling (negative weights).

    Raises:
        ManifestError: on any invalid input; nothing is written then.
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not overwrite:
        raise ManifestError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
    manifest, reference, template = plan_ensemble(
        members, rule, tokenizer_from, chat_template_from, name=name or out.name,
        contrastive_alpha=contrastive_alpha,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        tmp.chmod(0o755)
        _write_folder(tmp, manifest, reference, template)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
