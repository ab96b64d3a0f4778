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


def load_user_text(path: str | Path) -> list[str]:
    """A user's own calibration text: plain text (one document per blank-line block) or JSONL with a 'text' field."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"calibration text file not found: {p}", "pass an existing .txt or .jsonl file to --calib-data")
    raw = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(raw.splitlines()):
            if line.strip():
                try:
                    docs.append(str(json.loads(line)["text"]))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise UserError(f"{p}:{i + 1} is not a JSON object with a 'text' field",
                                    "write one {\"text\": ...} object per line") from e
    else:
        docs = [d.strip() for d in raw.split("\n\n") if d.strip()]
    if not docs:
        raise UserError(f"calibration text file is empty: {p}", "put some text in it")
    return docs


def sample_windows(token_ids: list[int], n: int, length: int, seed: int) -> list[list[int]]:
    """`n` windows of `length` tokens at reproducible random offsets of one token stream."""
    if len(token_ids) < length:
        raise UserError(f"calibration text has {len(token_ids)} tokens, fewer than --calib-len {length}",
                        "use a smaller --calib-len or more text")
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(token_ids) - length + 1) for _ in range(n)]
    return [token_ids[s:s + length] for s in starts]
