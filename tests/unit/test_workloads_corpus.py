"""Documents for summarization: the embedded corpus, user files, and datasets saved locally."""

from __future__ import annotations

import pytest

from chains.workloads.corpus import embedded_corpus, load_hf_dataset, load_user_documents
from langchain_energy.errors import DataError
from tests.unit._workload_helpers import embedded_counter


def test_embedded_corpus_has_10_documents_of_36k_tokens_built_deterministically():
    docs = embedded_corpus()
    assert len(docs) >= 10
    count = embedded_counter()
    assert min(count(d.page_content) for d in docs) >= 36_000
    again = [d.page_content for d in embedded_corpus()]
    assert again == [d.page_content for d in docs]
    assert len({d.metadata["source"] for d in docs}) == len(docs)


def test_embedded_corpus_holds_no_machine_paths():
    import sys

    text = "".join(d.page_content for d in embedded_corpus())
    assert sys.executable not in text and sys.prefix not in text
    assert "\nFILE\n" not in text


def test_embedded_corpus_size_checks():
    assert len(embedded_corpus(3)) == 3
    with pytest.raises(DataError):
        embedded_corpus(0)
    with pytest.raises(DataError, match="has 11 documents"):
        embedded_corpus(99)


def _pdf_with_text(text: str) -> bytes:
    """A one-page PDF showing `text` (built by hand: no PDF writer is a dependency)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = b"%PDF-1.4\n"
    offsets = []
    for i, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return out


def test_user_documents_text_markdown_and_pdf(tmp_path):
    (tmp_path / "a.txt").write_text("Plain text about wind turbines.")
    (tmp_path / "b.md").write_text("# Title\n\nMarkdown about solar power.")
    (tmp_path / "c.pdf").write_bytes(_pdf_with_text("PDF text about batteries"))
    (tmp_path / "ignored.csv").write_text("x,y")
    docs = load_user_documents(tmp_path)
    assert [d.metadata["source"].rsplit("/", 1)[-1] for d in docs] == ["a.txt", "b.md", "c.pdf"]
    assert "wind turbines" in docs[0].page_content
    assert "solar power" in docs[1].page_content
    assert "batteries" in docs[2].page_content
    assert load_user_documents(tmp_path / "a.txt")[0].page_content == "Plain text about wind turbines."


def test_bad_user_documents_are_refused_with_a_reason(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_user_documents(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        load_user_documents(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02binary")
    with pytest.raises(DataError, match="binary"):
        load_user_documents(tmp_path / "bin.txt")
    (tmp_path / "x.docx").write_text("not supported")
    with pytest.raises(DataError, match="unsupported"):
        load_user_documents(tmp_path / "x.docx")
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match="no .txt"):
        load_user_documents(tmp_path / "sub")


def test_dataset_saved_locally_loads_by_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"article": ["first long article", "", "second article"],
                                     "abstract": ["a", "b", "c"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    docs = load_hf_dataset(str(tmp_path / "ds"))
    assert [d.page_content for d in docs] == ["first long article", "second article"]
    assert [d.page_content for d in load_hf_dataset(str(tmp_path / "ds"), field="abstract", n_docs=2)] == ["a", "b"]
    with pytest.raises(DataError, match="no column"):
        load_hf_dataset(str(tmp_path / "ds"), field="body")
    dd = datasets.DatasetDict({"train": ds})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(load_hf_dataset(str(tmp_path / "dd"), split="train")) == 2
    with pytest.raises(DataError, match="no split"):
        load_hf_dataset(str(tmp_path / "dd"), split="test")


def test_dataset_that_cannot_load_offline_is_a_data_error(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    # Offline as a machine without network is: the libraries read these flags at import time.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    with pytest.raises(DataError, match="cannot load dataset"):
        load_hf_dataset("no-such-org/no-such-dataset")
