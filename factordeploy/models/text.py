"""Real text shipped in gensim's test data, split once into calibration and evaluation parts.

The split (recorded here, never elsewhere): Wikipedia articles are taken in file order;
article i goes to EVALUATION when i % 5 == 4, else to CALIBRATION. So the two sets never
share an article. The polarity sentences are evaluation-only.

Out-of-domain evaluation text (never used for calibration, training or tuning, by any
stage): `news` is the Lee news corpus in gensim's test data (`lee_background.cor`, ~300
Australian news stories, one per line); `pydoc` is the Python reference documentation that
ships with CPython (`pydoc_data.topics`). `domain_texts(name)` is the one way to get any of
them, so every quality table names the same domains.
"""

from __future__ import annotations

import bz2
import json
import random
from functools import lru_cache
from pathlib import Path

from ..errors import UserError

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
POLARITY_FILE = "pang_lee_polarity.cor"
NEWS_FILE = "lee_background.cor"
EVAL_EVERY = 5


def _datapath(name: str) -> str:
    try:
        from gensim.test.utils import datapath
    except ImportError as e:  # pragma: no cover - gensim is a dependency
        raise UserError("gensim is not installed (it ships the calibration text)", "pip install gensim") from e
    return datapath(name)


@lru_cache(maxsize=1)
def wiki_articles() -> tuple[str, ...]:
    """Plain text of the Wikipedia articles (markup stripped), in file order."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    out = []
    with bz2.open(_datapath(WIKI_FILE), "rb") as f:
        for _title, text, _pageid in extract_pages(f):
            clean = filter_wiki(text)
            lines = [ln.strip() for ln in clean.splitlines()]
            body = "\n".join(ln for ln in lines if len(ln) > 40 and not ln.startswith(("|", "!", "{", "*")))
            if len(body) > 500:
                out.append(body)
    return tuple(out)


def calibration_articles() -> list[str]:
    return [a for i, a in enumerate(wiki_articles()) if i % EVAL_EVERY != EVAL_EVERY - 1]


def evaluation_articles() -> list[str]:
    return [a for i, a in enumerate(wiki_articles()) if i % EVAL_EVERY == EVAL_EVERY - 1]


@lru_cache(maxsize=1)
def news_articles() -> tuple[str, ...]:
    """Out-of-domain: the Lee news corpus (one story per line)."""
    with open(_datapath(NEWS_FILE), encoding="latin-1") as f:
        return tuple(ln.strip() for ln in f if len(ln.strip()) > 200)


@lru_cache(maxsize=1)
def pydoc_articles() -> tuple[str, ...]:
    """Out-of-domain: CPython's reference documentation topics (technical prose + code)."""
    from pydoc_data.topics import topics

    return tuple(topics[k].strip() for k in sorted(topics) if len(topics[k].strip()) > 500)


IN_DOMAIN = "wiki"
OUT_OF_DOMAIN = ("news", "pydoc")
DOMAINS = (IN_DOMAIN, *OUT_OF_DOMAIN)


def domain_texts(name: str) -> list[str]:
    """Evaluation documents of one domain: `wiki` (the held-out Wikipedia split, in domain),
    `news` or `pydoc` (out of domain: no stage may ever train or calibrate on them)."""
    if name == "wiki":
        return evaluation_articles()
    if name == "news":
        return list(news_articles())
    if name == "pydoc":
        return list(pydoc_articles())
    raise UserError(f"unknown text domain '{name}'", "use one of " + ", ".join(DOMAINS))


def selection_texts() -> list[str]:
    """Held-out text for choosing the best state during training (recovery's periodic evaluation):
    the second half of the pydoc topics. A domain no training data comes from, and disjoint from
    the reported pydoc evaluation, which reads the first ~6k tokens of the first topics (the first
    half alone holds ~50k tokens); news is never seen by any step at all."""
    topics = pydoc_articles()
    return list(topics[len(topics) // 2:])


def reported_texts(name: str) -> list[str]:
    """The documents a quality table reads for domain `name` (pydoc: the first half of the topics,
    so model selection on `selection_texts()` never sees them)."""
    if name == "pydoc":
        topics = pydoc_articles()
        return list(topics[: len(topics) // 2])
    return domain_texts(name)


def sentences(articles: list[str], min_words: int = 6, max_words: int = 60) -> list[str]:
    """Split articles into sentences of reasonable length (for encoder inputs)."""
    out = []
    for art in articles:
        for para in art.split("\n"):
            for s in para.replace("? ", "?|").replace("! ", "!|").replace(". ", ".|").split("|"):
                n = len(s.split())
                if min_words <= n <= max_words:
                    out.append(s.strip())
    return out


@lru_cache(maxsize=1)
def polarity() -> tuple[tuple[str, int], ...]:
    """(sentence, label) pairs; label 1 = positive, 0 = negative."""
    out = []
    with open(_datapath(POLARITY_FILE), encoding="latin-1") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            label, _, text = line.partition(" ")
            out.append((text, 1 if label == "__label__pos" else 0))
    return tuple(out)


_MAGIC = {b"\x1f\x8b": "gzip-compressed", b"PK\x03\x04": "zip archive", b"%PDF": "PDF", b"BZh": "bzip2-compressed",
          b"\xfd7zXZ": "xz-compressed", b"\x89PNG": "PNG image", b"\x80\x02": "Python pickle", b"\x7fELF": "executable"}


def _text_fix(flag: str, field: str) -> str:
    return f"pass {flag} a UTF-8 .txt file (documents separated by blank lines) or a .jsonl file with a '{field}' string per line"


@lru_cache(maxsize=4)
def _read_text_cached(path: str, size: int, mtime_ns: int, flag: str, field: str) -> tuple[str, ...]:
    p = Path(path)
    fix = _text_fix(flag, field)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise UserError(f"{flag} {p} cannot be read ({e.strerror})", "check the file's permissions") from e
    if not raw.strip():
        raise UserError(f"{flag} file is empty: {p}", "put some text in it")
    for magic, kind in _MAGIC.items():
        if raw.startswith(magic):
            raise UserError(f"{flag} {p} is a {kind} file, not text", "extract or convert it to UTF-8 text first; " + fix)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        head = raw[:4096]
        binary = sum(1 for b in head if b >= 0x80 or (b < 0x20 and b not in b"\t\n\r\f")) / len(head)
        raise UserError(f"{flag} {p} is not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start} is invalid and "
                        f"{binary:.0%} of the first {len(head)} bytes are binary or non-ASCII", fix) from None
    control = sum(1 for c in text if (ord(c) < 0x20 and c not in "\t\n\r\f") or c == "\x7f")
    if control > 0.01 * len(text):
        raise UserError(f"{flag} {p} is UTF-8 but {control / len(text):.0%} of it are control characters (binary data)", fix)
    if p.suffix == ".jsonl":
        docs = [_jsonl_text(line, p, i, flag, field) for i, line in enumerate(text.splitlines()) if line.strip()]
    else:
        docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"{flag} {p} holds no text (only empty '{field}' fields or whitespace)", "put some text in it")
    return tuple(docs)


def _jsonl_text(line: str, p: Path, i: int, flag: str, field: str) -> str:
    where = f"{flag} {p} line {i + 1}"
    fix = f"write one JSON object per line with a '{field}' string, e.g. {{\"{field}\": \"...\"}}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where} is not JSON ({e.msg} at column {e.colno})", fix) from None
    if not isinstance(obj, dict):
        raise UserError(f"{where} is a JSON {type(obj).__name__}, not an object", fix)
    if field not in obj:
        keys = ", ".join(sorted(obj)[:5]) or "none"
        raise UserError(f"{where} has no '{field}' field (fields: {keys})", fix)
    if not isinstance(obj[field], str):
        raise UserError(f"{where}: '{field}' is a JSON {type(obj[field]).__name__}, not a string", fix)
    return obj[field]


def read_text_input(path: str | Path, flag: str, field: str = "text") -> list[str]:
    """The ONE reader for every text-input flag (--calib-data, recovery data, ...): a user's documents.

    Accepts UTF-8 text (documents separated by blank lines) or JSONL (`.jsonl`) with a string
    `field` per line. Anything else - a missing or empty file, a folder, binary or compressed
    data, another encoding, JSONL without the field - is a UserError naming `flag`, what was
    found and the fix. Cached per (path, size, mtime), so validating early and reading later
    cost one read.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"{flag} file not found: {p}", f"pass an existing .txt or .jsonl file to {flag}")
    if not p.is_file():
        what = "a folder" if p.is_dir() else "a device or special file"
        raise UserError(f"{flag} {p} is not a file (it is {what})", f"pass a .txt or .jsonl file to {flag}")
    st = p.stat()
    return list(_read_text_cached(str(p.resolve()), st.st_size, st.st_mtime_ns, flag, field))


def load_user_text(path: str | Path, flag: str = "--calib-data") -> list[str]:
    """Older name of `read_text_input` (callers written before it existed); new code calls that."""
    return read_text_input(path, flag)


def check_token_budget(n_tokens: int, n: int, length: int, source: str,
                       n_flag: str = "--calib", len_flag: str = "--calib-len") -> None:
    """A user's text must hold the requested windows without reusing tokens: n x length at least."""
    if n_tokens < n * length:
        fit = n_tokens // length
        fix = (f"add text, or ask for fewer windows (e.g. {n_flag} {fit}) or shorter ones ({len_flag})" if fit >= 1
               else f"add text, or use a smaller {len_flag}")
        raise UserError(f"{source} has {n_tokens:,} tokens, fewer than the {n_flag} {n} x {len_flag} {length} = "
                        f"{n * length:,} that the requested windows need", fix)


def sample_windows(token_ids: list[int], n: int, length: int, seed: int) -> list[list[int]]:
    """`n` windows of `length` tokens at reproducible random offsets of one token stream."""
    if len(token_ids) < length:
        raise UserError(f"calibration text has {len(token_ids)} tokens, fewer than --calib-len {length}",
                        "use a smaller --calib-len or more text")
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(token_ids) - length + 1) for _ in range(n)]
    return [token_ids[s:s + length] for s in starts]
