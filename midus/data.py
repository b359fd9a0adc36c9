"""Text corpora for continued pre-training and perplexity: read, split, tokenize, pack.

Sources (see :func:`load_documents`):

- ``"wiki"``: the real Wikipedia dump of docs/design.md §5 (206 pages: 106 articles and 100
  redirects, shipped as test data by the ``gensim==4.4.0`` wheel; fetched by
  :mod:`midus.defaults`), turned into plain text here
  with ``mwparserfromhell``. The bz2 XML is read with the standard library; gensim is never
  imported.
- a text file (``.txt`` or anything not matched below): documents are blocks separated by one or
  more blank lines;
- a JSON Lines file (``.jsonl``/``.ndjson``): one document per line, in its ``"text"`` field;
- a folder written by ``datasets`` ``save_to_disk`` (``datasets.load_from_disk``), column
  ``"text"``; for a DatasetDict its ``"train"`` split, else its only split.

Documents are split into train/validation by document (deterministic: by a hash of the
document's name, so the split does not depend on order), validation again into dev and test
halves (for choosing settings on one and reporting on the other), tokenized, joined with the tokenizer's
EOS token after each document, and packed into fixed-length sequences for training.
"""
from __future__ import annotations

import bz2
import hashlib
import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import List, Sequence, Tuple, Union

import torch

__all__ = ["WIKI_CLEANER_VERSION", "clean_wikitext", "read_wiki_dump", "wikipedia_articles", "load_documents",
           "split_documents", "dev_test_split", "SPLITS", "tokenize_documents", "pack_sequences", "load_corpus"]

WIKI_CLEANER_VERSION = 1
Document = Tuple[str, str]  # (name, text)

# Sections that are lists of citations and links, not prose.
_SKIP_SECTIONS = {"references", "external links", "see also", "further reading", "notes", "bibliography",
                  "sources", "footnotes", "citations", "notes and references", "works cited"}
# Tags whose content is not running text (tables, formulas, galleries, references).
_DROP_TAGS = {"ref", "table", "gallery", "math", "timeline", "references", "score", "chem", "syntaxhighlight",
              "source", "imagemap"}
# Links to files, categories and other-language wikis render as nothing in an article's prose.
_NONTEXT_LINK = re.compile(r"^\s*:?\s*(file|image|category|media|[a-z]{2,3}(-[a-z]+)?)\s*:", re.I)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
# Refs are removed on the raw text: a malformed ref (common in dumps) would survive the parser.
_REF = re.compile(r"<ref\b[^>/]*/>|<ref\b[^>]*>.*?</ref\s*>", re.S | re.I)
_H2 = re.compile(r"^==([^=].*?)==[ \t]*$", re.M)
_HTML_TAG = re.compile(r"</?[a-zA-Z][^<>\n]{0,200}?/?>")
_EMPTY_PARENS = re.compile(r"\(\s*[,;]?\s*\)")
_MARKUP_LEFT = ("[[", "]]", "{{", "}}", "|")


def clean_wikitext(raw: str) -> str:
    """Plain prose from one article's wikitext (str -> str, lines joined by "\\n").

    Drops comments, references, tables, templates, file/category links, headings and the
    citation sections (References, External links, ...); keeps link text; then drops lines that
    are too short to be prose (< 4 words: list stubs, captions) or still hold markup.
    """
    import mwparserfromhell

    raw = _REF.sub("", _COMMENT.sub("", raw))
    parts = _H2.split(raw)  # [lead, title, body, title, body, ...]
    kept = [parts[0]] + [parts[i + 1] for i in range(1, len(parts), 2)
                         if parts[i].strip().lower() not in _SKIP_SECTIONS]
    code = mwparserfromhell.parse("\n".join(kept))
    for node in code.filter_tags(recursive=False):
        if str(node.tag).strip().lower() in _DROP_TAGS:
            code.remove(node)
    for node in code.filter_wikilinks(recursive=False):
        if _NONTEXT_LINK.match(str(node.title)):
            code.remove(node)
    for node in code.filter_headings(recursive=False):
        code.remove(node)
    text = code.strip_code(normalize=True, collapse=True)  # templates go, link text stays
    lines = []
    for line in text.split("\n"):
        line = _HTML_TAG.sub("", line)
        line = re.sub(r"'{2,}", "", line)  # bold/italic quotes
        line = _EMPTY_PARENS.sub("", line)
        line = re.sub(r"[ \t]{2,}", " ", line).strip()
        if len(line.split()) < 4 or any(m in line for m in _MARKUP_LEFT):
            continue
        lines.append(line)
    return "\n".join(lines)


def read_wiki_dump(path: Union[str, os.PathLike]) -> List[Document]:
    """Articles of a MediaWiki XML dump (``.xml`` or ``.xml.bz2``) as ``[(title, plain_text)]``.

    Keeps main-namespace pages (ns 0) that are not redirects and whose cleaned text is
    non-empty, in dump order. Raises FileNotFoundError naming ``path``; ValueError if no article
    is found.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"wiki dump not found: {path}")
    opener = bz2.open if path.suffix == ".bz2" else open
    articles = []
    with opener(path, "rb") as f:
        for _, el in ET.iterparse(f, events=("end",)):
            if el.tag.rsplit("}", 1)[-1] != "page":
                continue
            ns, title = el.findtext("{*}ns"), el.findtext("{*}title")
            raw = el.findtext("{*}revision/{*}text") or ""
            if ns == "0" and el.find("{*}redirect") is None:
                text = clean_wikitext(raw)
                if text:
                    articles.append((title, text))
            el.clear()  # keep memory flat on big dumps
    if not articles:
        raise ValueError(f"no articles found in wiki dump {path}")
    return articles


# Compressed text is read as it is (the inner suffix, e.g. .jsonl.gz, says text or JSONL).
_COMPRESSED = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}


def _open_text(path: Path):
    kind = _COMPRESSED.get(path.suffix.lower())
    if kind is None:
        return open(path, encoding="utf-8")
    import importlib

    return importlib.import_module(kind).open(path, "rt", encoding="utf-8")


def _inner_suffix(path: Path) -> str:
    suffixes = [x.lower() for x in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _read_text_file(path: Path) -> List[Document]:
    with _open_text(path) as f:
        text = f.read()
    blocks = [b.strip() for b in re.split(r"\n\s*\n", text)]
    return [(f"{path.name}#{i}", b) for i, b in enumerate(blocks) if b]


def _read_jsonl(path: Path) -> List[Document]:
    docs = []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise ValueError(f"{path}:{lineno}: each JSONL record needs a string field 'text'")
            docs.append((f"{path.name}:{lineno}", rec["text"]))
    return docs


def _read_datasets_folder(path: Path) -> List[Document]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise ValueError(f"datasets folder {path} has splits {list(ds)}; midus reads 'train' or a single split")
    if "text" not in ds.column_names:
        raise ValueError(f"datasets folder {path} has no 'text' column (columns: {ds.column_names})")
    return [(f"{path.name}[{i}]", t) for i, t in enumerate(ds["text"]) if isinstance(t, str)]


def wikipedia_articles() -> List[Tuple[str, str]]:
    """The Wikipedia articles as ``[(title, plain_text), ...]``, in dump order (main namespace,
    no redirects), cleaned of wiki markup by :func:`read_wiki_dump`; the dump comes from
    :func:`midus.defaults.wikipedia_dump_path` (fetched on first use).

    The cleaned text (about 2.7 M characters, 430 K words) is cached as JSONL next to the dump,
    so parsing (a few seconds) happens once.
    """
    from .defaults import _publish, wikipedia_dump_path

    dump = Path(wikipedia_dump_path())
    # The cleaner's version is in the name: a changed cleaner never reads a stale cache.
    cached = dump.with_name(f"{dump.name}.articles-v{WIKI_CLEANER_VERSION}.jsonl")
    if cached.is_file():
        with open(cached, encoding="utf-8") as f:
            return [(r["title"], r["text"]) for r in map(json.loads, f)]
    articles = read_wiki_dump(dump)
    tmp = cached.with_name(f".tmp-{os.getpid()}-{cached.name}")
    with open(tmp, "w", encoding="utf-8") as f:
        for title, text in articles:
            f.write(json.dumps({"title": title, "text": text}, ensure_ascii=False) + "\n")
    _publish(tmp, cached)
    return articles


def load_documents(source: Union[str, os.PathLike]) -> List[Document]:
    """Documents ``[(name, text)]`` of a source: ``"wiki"``, a text file, a JSONL file (each plain
    or compressed as .gz, .bz2 or .xz) or a ``datasets`` folder (see the module docstring). Empty
    documents are dropped.

    Raises FileNotFoundError naming the path if it does not exist; ValueError if it holds no text
    or is not UTF-8 text (a binary file, or a compressed one that its suffix misnames).
    """
    if str(source) == "wiki":
        docs = wikipedia_articles()
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"data source not found: {path} (give 'wiki', a .txt/.jsonl file "
                                    f"or a datasets folder)")
        if path.is_dir():
            docs = _read_datasets_folder(path)
        else:
            docs = _read_file(path)
    docs = [(n, t) for n, t in docs if t.strip()]
    if not docs:
        raise ValueError(f"data source {source} holds no text")
    return docs


def _read_file(path: Path) -> List[Document]:
    try:
        return _read_jsonl(path) if _inner_suffix(path) in (".jsonl", ".ndjson") else _read_text_file(path)
    except (UnicodeDecodeError, OSError, EOFError) as err:
        if isinstance(err, (FileNotFoundError, PermissionError)):
            raise
        # A binary file, or a compressed one that is not what its suffix says.
        raise ValueError(f"--data: {path} cannot be read as UTF-8 text ({type(err).__name__}: {err}); give a "
                         f"text or JSONL file ('text' field), plain or compressed as .gz, .bz2 or .xz, a "
                         f"datasets folder, or 'wiki'") from None


def split_documents(docs: Sequence[Document], val_fraction: float = 0.1) -> Tuple[List[Document], List[Document]]:
    """Split documents into (train, val) by document, deterministically.

    Documents are ranked by SHA-1 of their name; the first ``round(val_fraction * len)`` (at
    least 1) go to validation, the rest to training, each kept in the original order. The same
    names always give the same split. Raises ValueError if ``val_fraction`` is not in (0, 1) or
    fewer than 2 documents are given.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(docs) < 2:
        raise ValueError(f"splitting by document needs at least 2 documents, got {len(docs)}")
    n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
    rank = sorted(range(len(docs)), key=lambda i: hashlib.sha1(docs[i][0].encode("utf-8")).hexdigest())
    val_idx = set(rank[:n_val])
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val


def dev_test_split(val: Sequence[Document]) -> Tuple[List[Document], List[Document]]:
    """Split the validation documents of :func:`split_documents` into (dev, test), by document.

    Ranked by SHA-1 of the name, documents alternate dev, test, dev, ... (dev gets the extra one),
    each part kept in the original order. Dev is for choosing settings (LR, recipe), test only
    for reporting, so a comparison never tunes on what it reports. Raises ValueError for fewer
    than 2 documents.
    """
    if len(val) < 2:
        raise ValueError(f"a dev/test split needs at least 2 validation documents, got {len(val)}; "
                         f"raise val_fraction or give more documents")
    rank = sorted(range(len(val)), key=lambda i: hashlib.sha1(val[i][0].encode("utf-8")).hexdigest())
    dev_idx = set(rank[0::2])
    return [d for i, d in enumerate(val) if i in dev_idx], [d for i, d in enumerate(val) if i not in dev_idx]


SPLITS = ("all", "train", "val", "dev", "test")


def tokenize_documents(texts: Sequence[str], tokenizer) -> torch.Tensor:
    """One token stream: each text tokenized (no special tokens) and followed by EOS.

    Returns a 1-D int64 tensor. Needs ``tokenizer.eos_token_id`` (ValueError otherwise).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id, needed to separate documents")
    ids: List[int] = []
    # verbose=False: documents longer than the model's context are fine here (they get packed).
    for tokens in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]:
        ids.extend(tokens)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def pack_sequences(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut a 1-D token stream into ``[len(ids) // seq_len, seq_len]`` int64 (the tail is dropped).

    Raises ValueError if ``seq_len < 2`` or the stream is shorter than one sequence.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if ids.dim() != 1:
        raise ValueError(f"expected a 1-D token stream, got shape {tuple(ids.shape)}")
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"the corpus has {ids.numel()} tokens, shorter than one sequence of seq_len={seq_len}; "
                         f"give more text or a smaller seq_len")
    return ids[: n * seq_len].reshape(n, seq_len).clone()


def load_corpus(source: Union[str, os.PathLike], tokenizer, split: str = "all", val_fraction: float = 0.1,
                max_tokens: int = 0) -> torch.Tensor:
    """Token stream (1-D int64) of a source's ``split``: "all", "train" or "val" (by document,
    :func:`split_documents`), or "dev" / "test", the two halves of "val" (:func:`dev_test_split`).
    ``max_tokens`` > 0 keeps only the first that many tokens."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(repr(x) for x in SPLITS)}, got {split!r}")
    docs = load_documents(source)
    if split != "all":
        docs = split_documents(docs, val_fraction)[0 if split == "train" else 1]
        if split in ("dev", "test"):
            docs = dev_test_split(docs)[0 if split == "dev" else 1]
    ids = tokenize_documents([t for _, t in docs], tokenizer)
    return ids[:max_tokens] if max_tokens > 0 else ids
