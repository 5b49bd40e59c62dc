"""The discrepancy distribution (`deft distribution`): Q+, Q- and Q_diff.

Q+ counts the tokens of every response graded +1, Q- those graded -1, over all
levels of ``graded.parquet`` (the training set is level A only, the
distribution uses everything). Responses are tokenised exactly as the trainer
tokenises them: with the policy's tokenizer, no special tokens, and the
response prefix of the prompt template (:func:`deft.render.response_prefix`): after a plain
HH prompt ending in ``"Assistant:"`` the response is ``" " + response`` (the
space belongs to the response, as in HH transcripts); after a chat-template
prompt it is the response as is. The EOS the trainer appends is not counted.

``Q_diff = Q+ / sum(Q+) - Q- / sum(Q-)`` (float32, length = vocabulary incl.
added tokens, sums to 0 up to rounding). The file is a ``.safetensors`` with
tensors ``q_pos`` and ``q_neg`` (int64 counts) and ``q_diff`` (float32), and
string metadata: tokenizer source, SHA-256 of its JSON, a hash of its
vocabulary, vocabulary size, template and response prefix, response and token
counts, and the graded file (path, SHA-256) with its manifest.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import polars as pl

# Imported inside the functions that use them, on purpose: transformers, safetensors and matplotlib;
# importing deft stays fast.
from deft import __version__
from deft._hf import vocab_hash
from deft._native import Tokenizer
from deft.grade import read_graded
from deft.io import (
    atomic_path, begin_publication, check_publication, locked_output, sha256_file, sha256_text, write_json_atomic,
)
from deft.render import resolve_template, response_prefix

FORMAT = "deft-qdiff-v1"
@dataclass
class PolicyTokenizer:
    """A policy tokenizer resolved for native use: JSON text plus identity."""

    json: str
    source: str
    sha256: str
    vocab_hash: str
    vocab_size: int
    chat_template: Optional[str]
    _native: Any = field(default=None, repr=False)

    @property
    def native(self):
        if self._native is None:
            self._native = Tokenizer.from_str(self.json)
        return self._native


def _chat_template_beside(folder: Path) -> Optional[str]:
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    cfg = folder / "tokenizer_config.json"
    if cfg.exists():
        try:
            tmpl = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        except json.JSONDecodeError:
            return None
        return tmpl if isinstance(tmpl, str) else None
    return None


def hf_policy_tokenizer(hf_tok: Any, source: Union[str, "os.PathLike[str]"]) -> PolicyTokenizer:
    """The :class:`PolicyTokenizer` of a loaded Hugging Face fast tokenizer (its
    ``tokenizer.json``): the vocabulary identity a distribution file is checked against."""
    backend = getattr(hf_tok, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"tokenizer {source}: not a fast (tokenizers-based) tokenizer; deft needs its tokenizer.json")
    text = backend.to_str()
    vh, size = vocab_hash(text)  # the identity `deft distribution` records
    return PolicyTokenizer(json=text, source=str(source), sha256=sha256_text(text), vocab_hash=vh, vocab_size=size,
                           chat_template=getattr(hf_tok, "chat_template", None))


def resolve_tokenizer(spec: Union[str, "os.PathLike[str]"], *, trust_remote_code: bool = False) -> PolicyTokenizer:
    """A tokenizer.json file, a folder holding one, or a Hugging Face model
    folder / hub name (loaded with ``transformers.AutoTokenizer``, which must be
    a fast tokenizer)."""
    p = Path(spec)
    text: Optional[str] = None
    chat: Optional[str] = None
    if p.is_file():
        text, chat = p.read_text(encoding="utf-8"), _chat_template_beside(p.parent)
    elif p.is_dir() and (p / "tokenizer.json").exists():
        text, chat = (p / "tokenizer.json").read_text(encoding="utf-8"), _chat_template_beside(p)
    else:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(spec), trust_remote_code=trust_remote_code)
        except Exception as e:  # noqa: BLE001 - report what transformers said
            raise FileNotFoundError(
                f"tokenizer {spec!s}: not a tokenizer.json, a folder with one, or a loadable model ({type(e).__name__}: {e})"
            ) from None
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"tokenizer {spec!s} is not a fast (tokenizers-based) tokenizer; deft needs its tokenizer.json")
        text, chat = backend.to_str(), getattr(tok, "chat_template", None)
    vh, size = vocab_hash(text)
    return PolicyTokenizer(json=text, source=str(spec), sha256=sha256_text(text), vocab_hash=vh, vocab_size=size, chat_template=chat)


@dataclass
class Distribution:
    q_pos: np.ndarray
    q_neg: np.ndarray
    q_diff: np.ndarray
    metadata: Dict[str, str]

    @property
    def vocab_size(self) -> int:
        return int(self.q_diff.shape[0])


def polarity_texts(graded: pl.DataFrame, polarity: int, prefix: str = "") -> pl.Series:
    """The responses with the given polarity, one per row, as the trainer sees them."""
    s = (
        graded.select(pl.col("responses"), pl.col("polarity"))
        .explode("responses", "polarity")
        .filter(pl.col("polarity") == polarity)
        .get_column("responses")
    )
    return (prefix + s) if prefix else s


def build_distribution(
    graded: pl.DataFrame,
    tokenizer: PolicyTokenizer,
    *,
    template: str = "auto",
    num_threads: Optional[int] = None,
    graded_path: Optional[Path] = None,
) -> Distribution:
    """Count Q+ / Q- tokens natively and form Q_diff; see the module docstring."""
    for col in ("responses", "polarity"):
        if col not in graded.columns:
            raise ValueError(f"graded frame has no column {col!r}; is it the output of `deft grade`?")
    tmpl = resolve_template(template, tokenizer)
    prefix = response_prefix(tmpl)
    pos_texts, neg_texts = polarity_texts(graded, 1, prefix), polarity_texts(graded, -1, prefix)
    tok = tokenizer.native
    q_pos = tok.count_tokens(pos_texts, num_threads=num_threads).astype(np.int64)
    q_neg = tok.count_tokens(neg_texts, num_threads=num_threads).astype(np.int64)
    where = f" in {graded_path}" if graded_path else ""
    for name, q, texts in (("Q+", q_pos, pos_texts), ("Q-", q_neg, neg_texts)):
        if q.sum() == 0:
            raise ValueError(
                f"{name} is empty{where}: {len(texts)} responses have that polarity and they hold no tokens; "
                "grade more data or loosen the thresholds"
            )
    q_diff = (q_pos / q_pos.sum() - q_neg / q_neg.sum()).astype(np.float32)
    meta = {
        "format": FORMAT,
        "tokenizer_source": tokenizer.source,
        "tokenizer_sha256": tokenizer.sha256,
        "vocab_hash": tokenizer.vocab_hash,
        "vocab_size": str(q_diff.shape[0]),
        "template": tmpl,
        "response_prefix": json.dumps(prefix),
        "pos_responses": str(len(pos_texts)),
        "neg_responses": str(len(neg_texts)),
        "pos_tokens": str(int(q_pos.sum())),
        "neg_tokens": str(int(q_neg.sum())),
        "samples": str(graded.height),
    }
    if graded_path is not None:
        meta["graded_path"] = str(graded_path)
        meta["graded_sha256"] = sha256_file(graded_path)
        manifest = Path(graded_path).with_name("manifest.json")
        if manifest.exists():
            meta["graded_manifest"] = str(manifest)
            meta["graded_manifest_sha256"] = sha256_file(manifest)

    meta["deft_version"] = __version__
    return Distribution(q_pos, q_neg, q_diff, meta)


@dataclass
class DistributionRun:
    """What :func:`distribution_files` made: the distribution, its top tokens
    and the files written."""

    distribution: Distribution
    top: Dict[str, List[Dict[str, Any]]]
    output: Path
    plot: Optional[Path]
    top_json: Optional[Path]


def distribution_files(
    graded: Union[str, Path],
    tokenizer: Union[str, "os.PathLike[str]", PolicyTokenizer],
    output: Union[str, Path],
    *,
    template: str = "auto",
    num_threads: Optional[int] = None,
    top: int = 15,
    plot: Optional[Union[str, Path]] = None,
    top_json: Optional[Union[str, Path]] = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> DistributionRun:
    """The `deft distribution` stage: Q_diff of ``graded`` (graded.parquet)
    for the policy ``tokenizer``, its ``top`` tokens, and the files: the
    optional ``plot`` (PNG) and ``top_json``, then ``output`` (safetensors,
    the commit record of the publication, written last)."""
    graded, output = Path(graded), Path(output)
    plot_p = Path(plot) if plot is not None else None
    json_p = Path(top_json) if top_json is not None else None
    check_publication(output, [output], overwrite)
    if not graded.exists():
        raise FileNotFoundError(2, "graded file not found", str(graded))
    tok = tokenizer if isinstance(tokenizer, PolicyTokenizer) else resolve_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
    dist = build_distribution(read_graded(graded, ("responses", "polarity")), tok, template=template, num_threads=num_threads,
                              graded_path=graded)
    tt = top_tokens(dist, tok, top)
    pub = begin_publication(output, [plot_p, json_p], overwrite=overwrite, refuse=[output])  # the file is the commit record
    if plot_p is not None:
        plot_top_tokens(tt, plot_p)
    if json_p is not None:
        write_json_atomic(json_p, tt)
    save_distribution(dist, output, overwrite=True)
    pub.done()
    return DistributionRun(dist, tt, output, plot_p, json_p)


@locked_output("distribution", "path", beside=True)
def save_distribution(dist: Distribution, path: Union[str, Path], *, overwrite: bool = False) -> Path:
    """Write ``dist`` to ``path`` (safetensors), atomically, under the file's
    output lock; an existing file is refused unless ``overwrite`` or its
    publication (`deft distribution`: the plot, then this file) was interrupted."""
    from safetensors.numpy import save_file

    path = Path(path)
    check_publication(path, [path], overwrite)
    with atomic_path(path) as tmp:
        save_file({"q_pos": dist.q_pos, "q_neg": dist.q_neg, "q_diff": dist.q_diff}, str(tmp), metadata=dist.metadata)
    return path


def load_distribution(path: Union[str, Path], *, tokenizer: Optional[PolicyTokenizer] = None) -> Distribution:
    """Read a distribution file (safetensors: no pickle). With ``tokenizer``,
    check that its vocabulary is the one the file was counted with."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"distribution file not found: {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    missing = {"q_pos", "q_neg", "q_diff"} - tensors.keys()
    if meta.get("format") != FORMAT or missing:
        raise ValueError(f"{path}: not a deft distribution file (format {meta.get('format')!r}, missing tensors {sorted(missing)})")
    dist = Distribution(tensors["q_pos"], tensors["q_neg"], tensors["q_diff"], meta)
    if tokenizer is not None:
        check_vocabulary(dist, tokenizer, path)
    return dist


def check_vocabulary(dist: Distribution, tokenizer: PolicyTokenizer, where: Union[str, Path]) -> None:
    """A ValueError naming ``where`` (the distribution file) unless ``tokenizer``
    has the vocabulary ``dist`` was counted with (size and hash)."""
    meta = dist.metadata
    if tokenizer.vocab_size != dist.vocab_size or tokenizer.vocab_hash != meta.get("vocab_hash"):
        raise ValueError(
            f"{where}: counted with tokenizer {meta.get('tokenizer_source')} (vocabulary {meta.get('vocab_size')} tokens, "
            f"hash {meta.get('vocab_hash', '?')[:12]}) but the given tokenizer {tokenizer.source} has a different vocabulary "
            f"({tokenizer.vocab_size} tokens, hash {tokenizer.vocab_hash[:12]})"
        )


def top_tokens(dist: Distribution, tokenizer: PolicyTokenizer, k: int = 20) -> Dict[str, List[Dict[str, Any]]]:
    """The ``k`` most positive and most negative Q_diff entries, decoded."""
    tok = tokenizer.native
    q = dist.q_diff.astype(np.float64)
    out: Dict[str, List[Dict[str, Any]]] = {}
    for name, idx in (("positive", np.argsort(-q, kind="stable")[:k]), ("negative", np.argsort(q, kind="stable")[:k])):
        out[name] = [
            {
                "id": int(i),
                "token": tok.id_to_token(int(i)),
                "text": tok.decode([int(i)]),
                "q_diff": float(q[i]),
                "q_pos": int(dist.q_pos[i]),
                "q_neg": int(dist.q_neg[i]),
            }
            for i in idx
            if (q[i] > 0 if name == "positive" else q[i] < 0)
        ]
    return out


def plot_top_tokens(top: Dict[str, List[Dict[str, Any]]], path: Union[str, Path]) -> None:
    """Horizontal bars of the top positive and negative Q_diff tokens (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 0.32 * max(len(top["positive"]), len(top["negative"]), 5) + 1.2))
    for ax, name, color in ((axes[0], "positive", "#2a9d4b"), (axes[1], "negative", "#c0392b")):
        rows = top[name][::-1]
        ax.barh([repr(r["text"]) for r in rows], [r["q_diff"] for r in rows], color=color)
        ax.set_title(f"most {name} Q_diff tokens")
        ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
