"""Long documents for the summarization workload.

Three sources, all returning `langchain_core.documents.Document` objects:

* `embedded_corpus()`: the Python standard library's own documentation rendered as plain text with
  `pydoc`. It needs no network and exists wherever Python does; modules are grouped by theme into
  documents of at least 36,000 tokens each. The text depends only on the Python version.
* `load_user_documents(path)`: a file or a directory of ``.txt``, ``.md`` and ``.pdf`` files, read
  through langchain-community loaders.
* `load_hf_dataset(name)`: a Hugging Face dataset by hub name, or a dataset saved with
  ``save_to_disk``; the long-text column is found by name.

Every loader refuses empty, binary or missing inputs with a `DataError` that says what to do.
"""

from __future__ import annotations

import importlib
import pydoc
import re
import sys
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from langchain_core.documents import Document

from langchain_energy.errors import DataError

# Themes -> stdlib modules that exist in every CPython build (no tkinter, curses or platform-only
# modules), chosen so that each theme renders to well over 36,000 tokens of the embedded tokenizer.
CORPUS_THEMES: dict[str, tuple[str, ...]] = {
    "asynchronous-io": ("asyncio",),
    "syntax-trees": ("ast", "tokenize", "dis"),
    "operating-system": ("os", "subprocess", "shutil", "signal", "platform", "stat"),
    "networking": ("socket", "ssl", "selectors"),
    "internet-protocols": ("http.client", "urllib.request", "smtplib", "imaplib", "ftplib", "poplib"),
    "types-and-typing": ("typing", "enum", "types", "abc", "numbers"),
    "file-formats": ("configparser", "zipfile", "tarfile", "json", "csv", "gzip", "bz2", "lzma"),
    "testing-and-debugging": ("unittest", "doctest", "pdb", "traceback", "inspect"),
    "numbers-and-text": ("decimal", "fractions", "statistics", "random", "math", "re", "difflib", "textwrap"),
    "files-and-streams": ("io", "pathlib", "codecs", "tempfile", "mailbox"),
    "threads-and-processes": ("threading", "multiprocessing", "concurrent.futures", "queue", "sqlite3", "sched", "weakref"),
}

TEXT_SUFFIXES = (".txt", ".md", ".markdown")
PDF_SUFFIXES = (".pdf",)
DATASET_TEXT_FIELDS = ("article", "text", "document", "content", "body", "input")

# pydoc sections that name this machine (file paths) or a URL rather than documenting anything.
_DROP_SECTIONS = ("FILE", "MODULE REFERENCE")
_TRAILING_WS = re.compile(r"[ \t]+\n")


def _render_module(name: str) -> str:
    module = importlib.import_module(name)
    text = pydoc.render_doc(module, title="Python Library Documentation: %s", renderer=pydoc.plaintext)
    # Default argument values can hold this interpreter's path: keep the text machine-independent.
    text = text.replace(sys.executable, "python")
    # pydoc pads lines with trailing spaces that only cost tokens.
    return _TRAILING_WS.sub("\n", _drop_sections(text, _DROP_SECTIONS))


def _drop_sections(text: str, names: Sequence[str]) -> str:
    """Remove top-level pydoc sections (an upper-case heading and its indented body)."""
    out: list[str] = []
    skipping = False
    for line in text.splitlines():
        if line and not line[0].isspace():
            skipping = line.strip() in names
        if not skipping:
            out.append(line)
    return "\n".join(out)


@lru_cache(maxsize=1)
def _corpus() -> tuple[Document, ...]:
    docs = []
    for theme, modules in CORPUS_THEMES.items():
        text = "\n\n".join(_render_module(m) for m in modules)
        docs.append(Document(page_content=text, metadata={"source": f"stdlib:{theme}", "modules": list(modules)}))
    return tuple(docs)


def embedded_corpus(n_docs: int | None = None) -> list[Document]:
    """The embedded corpus, in a fixed order (rendered once per process, about 3 s).

    Args:
        n_docs: how many documents to return (all when None).

    Example:
        >>> docs = embedded_corpus(2)
        >>> docs[0].metadata["source"]
        'stdlib:asynchronous-io'
    """
    docs = list(_corpus())
    if n_docs is not None:
        if n_docs < 1:
            raise DataError(f"the number of documents must be at least 1, got {n_docs}")
        if n_docs > len(docs):
            raise DataError(f"the embedded corpus has {len(docs)} documents; asked for {n_docs}")
        docs = docs[:n_docs]
    return [Document(page_content=d.page_content, metadata=dict(d.metadata)) for d in docs]


def _check_text(text: str, source: str) -> str:
    if "\x00" in text:
        raise DataError(f"{source} looks binary (it contains NUL bytes); pass a text, Markdown or PDF file")
    if not text.strip():
        raise DataError(f"{source} is empty; pass a document with text in it")
    return text


def _load_file(path: Path) -> Document:
    suffix = path.suffix.lower()
    if suffix in PDF_SUFFIXES:
        try:
            from langchain_community.document_loaders import PyPDFLoader
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise DataError(f"reading {path} needs pypdf: pip install pypdf") from exc
        try:
            pages = PyPDFLoader(str(path)).load()
        except Exception as exc:
            raise DataError(f"cannot read PDF {path}: {exc}") from exc
        text = "\n\n".join(p.page_content for p in pages)
        return Document(page_content=_check_text(text, str(path)), metadata={"source": str(path), "pages": len(pages)})
    if suffix in TEXT_SUFFIXES:
        head = path.read_bytes()[:8192]
        if b"\x00" in head:
            raise DataError(f"{path} looks binary (it contains NUL bytes); pass a text, Markdown or PDF file")
        from langchain_community.document_loaders import TextLoader

        try:
            doc = TextLoader(str(path), encoding="utf-8").load()[0]
        except Exception as exc:
            raise DataError(f"cannot read {path} as UTF-8 text: {exc}") from exc
        _check_text(doc.page_content, str(path))
        return Document(page_content=doc.page_content, metadata={"source": str(path)})
    raise DataError(f"unsupported file type {path.suffix!r} for {path}; use .txt, .md or .pdf")


def load_user_documents(path: str | Path) -> list[Document]:
    """Documents from a file or a directory (``.txt``, ``.md``, ``.pdf``; sorted by name).

    Raises:
        DataError: the path is missing, a file is empty, binary or of another type, or a directory
            holds no supported file.

    Example:
        >>> docs = load_user_documents("notes/")  # doctest: +SKIP
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"document path {str(path)!r} does not exist")
    if p.is_file():
        return [_load_file(p)]
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES + PDF_SUFFIXES)
    if not files:
        raise DataError(f"directory {str(path)!r} holds no .txt, .md or .pdf file")
    return [_load_file(f) for f in files]


def load_hf_dataset(
    name: str, *, split: str = "test", field: str | None = None, n_docs: int | None = None
) -> list[Document]:
    """Long texts from a Hugging Face dataset (hub name) or a directory written by ``save_to_disk``.

    Args:
        name: a hub name such as ``ccdv/arxiv-summarization`` or a local dataset directory.
        split: which split to read (ignored for a saved single-split dataset).
        field: the text column; found among common names (article, text, document, ...) when None.
        n_docs: read only the first n rows.

    Raises:
        DataError: the library is missing, the dataset cannot be loaded (for example offline), or no
            text column exists.
    """
    try:
        import datasets
    except ImportError as exc:
        raise DataError("loading a dataset needs the 'datasets' package: pip install 'langchain-energy[hf]'") from exc
    local = Path(name).expanduser()
    try:
        if local.is_dir():
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"dataset {name!r} has splits {sorted(ds)}; no split {split!r}")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, split=split)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"cannot load dataset {name!r} (split {split!r}): {type(exc).__name__}: {exc}. "
            "Offline, pass a directory saved with Dataset.save_to_disk, or use the embedded corpus."
        ) from exc
    columns = list(ds.column_names)
    if field is None:
        field = next((c for c in DATASET_TEXT_FIELDS if c in columns), None)
        if field is None:
            raise DataError(f"dataset {name!r} has no text column among {DATASET_TEXT_FIELDS}; columns are {columns}")
    elif field not in columns:
        raise DataError(f"dataset {name!r} has no column {field!r}; columns are {columns}")
    rows = ds if n_docs is None else ds.select(range(min(n_docs, len(ds))))
    docs = []
    for i, row in enumerate(rows):
        text = row[field]
        if isinstance(text, list):  # some summarization sets store an article as a list of sentences
            text = "\n".join(map(str, text))
        if not isinstance(text, str) or not text.strip():
            continue
        docs.append(Document(page_content=text, metadata={"source": f"{name}[{i}]"}))
    if not docs:
        raise DataError(f"dataset {name!r} has no non-empty text in column {field!r}")
    return docs
