"""The job: turn a `DataConfig` into lists of documents, from a file, a folder or the Hub.

A document is the unit the partitioner hands to sites, so it should be something a real site
would own whole: a Wikipedia article, a medical transcription, a text file. Every failure a user
can cause (a missing path, a wrong CSV column, an empty file) becomes a `FedskyError` that says
what to change.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from fedsky.config import DataConfig
from fedsky.errors import FedskyError

log = logging.getLogger("fedsky.data")

# A top-level WikiText heading is ` = Title = `; sub-headings (` = = Sub = = `) start with a
# second `=` and must stay inside their article.
_WIKITEXT_TITLE = re.compile(r"^\s*= (?!=).*[^=\s]\s*=\s*$")
# Text-file documents are separated by one or more blank (or whitespace-only) lines.
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n\s*")

_FALLBACK_FORMATS = ("wikitext", "text")


@dataclass(frozen=True)
class Document:
    """One unit of text a site owns whole; `label` (e.g. a topic) drives label-skew splits.

    An instruction example also keeps its `turns`, (role, content) pairs: ("prompt", p) and
    ("response", r), or a chat's messages; `text` then joins the contents (for partitioning by
    size and for training a tokenizer) and the rows are built from the turns.
    """

    text: str
    label: str | None = None
    turns: tuple[tuple[str, str], ...] | None = None


@dataclass
class Corpus:
    """The training pool (to be partitioned across sites) and the held-out evaluation docs."""

    train: list[Document]
    eval: list[Document]
    source: str  # where it came from, for the log


def resolve_data_path(path: str, job_dir: Path | None) -> Path | None:
    """Find a data file or folder named in a job config.

    Relative paths are tried against the job file's folder first (so a job directory can carry
    its data) and then `$FEDSKY_DATA` (a shared data folder, as on a cluster). Without a job
    folder, the working directory stands in for it.

    Args:
        path: The path as written in the config; `~` is expanded.
        job_dir: The folder of the job file, or None when there is no job file.

    Returns:
        The first existing candidate, or None when the path exists nowhere (an absolute path
        that does not exist also gives None, so callers have one check to make).
    """
    p = Path(path).expanduser()
    if p.is_absolute():
        return p if p.exists() else None
    for base in _search_dirs(job_dir):
        candidate = base / p
        if candidate.exists():
            return candidate
    return None


def _search_dirs(job_dir: Path | None) -> list[Path]:
    dirs = [job_dir if job_dir is not None else Path.cwd()]
    data_root = os.environ.get("FEDSKY_DATA")
    if data_root:
        dirs.append(Path(data_root).expanduser())
    return dirs


def _missing_path_error(path: str, job_dir: Path | None) -> FedskyError:
    if Path(path).expanduser().is_absolute():
        return FedskyError(f"data path not found: {path}")
    base = f"job dir {job_dir}" if job_dir is not None else f"working dir {Path.cwd()}"
    data_root = os.environ.get("FEDSKY_DATA")
    env = f"FEDSKY_DATA={data_root}" if data_root else "FEDSKY_DATA (not set)"
    return FedskyError(
        f"data path not found: {path} (looked in {base} and {env}); "
        "fix the path in [data] or set FEDSKY_DATA to the folder that holds it"
    )


def load_documents(
    source: str, cfg: DataConfig, job_dir: Path | None, *, split: str = "train"
) -> list[Document]:
    """Load one corpus (the train or the eval side) in the format `cfg.format` names.

    Args:
        source: A path (resolved with `resolve_data_path`) or, for `hf`, a dataset name.
        cfg: Says the format and, for CSV and HF, which columns hold the text and label.
        job_dir: The job file's folder, for relative paths.
        split: The Hugging Face split; ignored for local files.

    Returns:
        The non-empty documents, stripped, in corpus order.

    Raises:
        FedskyError: The path is missing, a column is wrong, or no document has any text.
    """
    if cfg.format == "hf":
        docs = _load_hf(source, split, cfg)
        where = f"Hugging Face dataset {source} ({split})"
    else:
        path = resolve_data_path(source, job_dir)
        if path is None:
            raise _missing_path_error(source, job_dir)
        where = str(path)
        if cfg.format == "wikitext":
            docs = split_wikitext(_read_text(path))
        elif cfg.format == "text":
            docs = _load_text(path)
        elif cfg.format == "jsonl":
            docs = load_jsonl(path, cfg)
        else:
            docs = _load_csv(path, cfg)
    if not docs:
        raise FedskyError(f"{where} is empty: no document with any text in it")
    return docs


def _read_text(path: Path) -> str:
    if path.is_dir():
        raise FedskyError(f"{path} is a folder; this format needs a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise FedskyError(f"{path}: not UTF-8 text ({err})") from None


def split_wikitext(text: str) -> list[Document]:
    """Split WikiText into articles at each top-level ` = Title = ` line (kept in the article)."""
    articles: list[list[str]] = [[]]
    for line in text.splitlines():
        if _WIKITEXT_TITLE.match(line):
            articles.append([])
        articles[-1].append(line)
    docs = ("\n".join(lines).strip() for lines in articles)
    return [Document(d) for d in docs if d]


def _load_text(path: Path) -> list[Document]:
    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.is_file())
        texts = [_read_text(f).strip() for f in files]
    else:
        texts = [t.strip() for t in _BLANK_LINES.split(_read_text(path).replace("\r\n", "\n"))]
    return [Document(t) for t in texts if t]


def _load_csv(path: Path, cfg: DataConfig) -> list[Document]:
    if path.is_dir():
        raise FedskyError(f"{path} is a folder; format = 'csv' needs a file")
    try:
        with path.open(encoding="utf-8", newline="") as f:
            rows = [row for row in csv.reader(f) if row]  # csv yields [] for blank lines
    except (UnicodeDecodeError, csv.Error) as err:
        raise FedskyError(f"{path}: cannot read as CSV ({err})") from None
    if not rows:
        raise FedskyError(f"{path} is empty: no rows")
    header = [h.strip() for h in rows[0]] if cfg.csv_header else None
    body = rows[1:] if cfg.csv_header else rows
    width = len(rows[0])
    text_idx = _column_index(cfg.text_column, header, width, path, "text_column")
    label_idx = (
        None
        if cfg.label_column is None
        else _column_index(cfg.label_column, header, width, path, "label_column")
    )
    needed = max(text_idx, label_idx if label_idx is not None else -1)
    docs = []
    first_line = 2 if cfg.csv_header else 1
    for n, row in enumerate(body, start=first_line):
        if needed >= len(row):
            raise FedskyError(
                f"{path}: row {n} has {len(row)} columns, fewer than the {needed + 1} needed"
            )
        text = row[text_idx].strip()
        if text:
            label = row[label_idx].strip() if label_idx is not None else None
            docs.append(Document(text, label))
    return docs


def load_jsonl(path: Path, cfg: DataConfig) -> list[Document]:
    """Instruction examples, one JSON object a line: {"prompt": ..., "response": ...} or
    {"messages": [{"role": ..., "content": ...}, ...]} with at least one assistant turn.
    With a string `label_column`, that key of each object is its label."""
    if path.is_dir():
        raise FedskyError(f"{path} is a folder; format = 'jsonl' needs a file")
    docs = []
    for n, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise FedskyError(f"{path}:{n}: not JSON ({err.msg})") from None
        turns = _turns(obj)
        if turns is None:
            raise FedskyError(f'{path}:{n}: expected {{"prompt": str, "response": str}} or '
                              '{"messages": [{"role": str, "content": str}, ...]} with an '
                              '"assistant" message')
        label = None
        if isinstance(cfg.label_column, str) and obj.get(cfg.label_column) is not None:
            label = str(obj[cfg.label_column]).strip()
        docs.append(Document("\n".join(c for _, c in turns), label, turns))
    return docs


def _turns(obj: object) -> tuple[tuple[str, str], ...] | None:
    """An example's (role, content) pairs, or None when it has neither accepted shape."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("prompt"), str) and isinstance(obj.get("response"), str):
        if not obj["response"]:
            return None
        return (("prompt", obj["prompt"]), ("response", obj["response"]))
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    turns = []
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            return None
        turns.append((m["role"], m["content"]))
    return tuple(turns) if any(r == "assistant" for r, _ in turns) else None


def _column_index(
    column: int | str, header: list[str] | None, width: int, path: Path, field: str
) -> int:
    """Map a configured column (index, or header name with csv_header) to an index."""
    if header is not None:
        available = ", ".join(f"{i}: {name!r}" for i, name in enumerate(header))
    else:
        available = f"indices 0..{width - 1} (no header row: csv_header = false)"
    if isinstance(column, str):
        if header is not None and column in header:
            return header.index(column)
        raise FedskyError(
            f"{path}: data.{field} = {column!r} is not a column; available: {available}"
        )
    if 0 <= column < width:
        return column
    raise FedskyError(f"{path}: data.{field} = {column} is out of range; available: {available}")


def _load_hf(name: str, split: str, cfg: DataConfig) -> list[Document]:
    try:
        import datasets  # optional: pip install 'fedsky[hf]'
    except ImportError:
        raise FedskyError(
            "data.format = 'hf' needs the datasets package: pip install 'fedsky[hf]'"
        ) from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as err:  # network, auth and not-found errors differ by datasets version
        raise FedskyError(
            f"could not fetch Hugging Face dataset {name!r} (split {split!r}): "
            f"{type(err).__name__}: {err}. Without network access, download it elsewhere "
            "and point data.train at a local file (format = 'text', 'csv' or 'wikitext')"
        ) from None
    columns = list(ds.column_names)
    text_col = _hf_column(cfg.text_column, columns, name, "text_column")
    label_col = None
    if cfg.label_column is not None:
        label_col = _hf_column(cfg.label_column, columns, name, "label_column")
    docs = []
    for row in ds:
        text = str(row[text_col] or "").strip()
        if text:
            label = None if label_col is None else str(row[label_col]).strip()
            docs.append(Document(text, label))
    return docs


def _hf_column(column: int | str, columns: list[str], name: str, field: str) -> str:
    if isinstance(column, int) and 0 <= column < len(columns):
        return columns[column]
    if isinstance(column, str) and column in columns:
        return column
    available = ", ".join(f"{i}: {c!r}" for i, c in enumerate(columns))
    raise FedskyError(f"{name}: data.{field} = {column!r} is not a column; available: {available}")


def fallback_documents() -> list[Document]:
    """English text that ships with every Python: the `help()` topic pages, one per document.

    Lets the demo run anywhere, offline, when its corpus is not on disk. About 80 documents and
    0.5 MB, enough for a tokenizer and a few rounds of a tiny model.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        raise FedskyError(
            "no corpus found and this Python lacks pydoc_data for the fallback corpus; "
            "set data.train to a local file"
        ) from None
    texts = (str(topics[key]).strip() for key in sorted(topics))
    return [Document(t) for t in texts if t]


def _hold_out(
    docs: list[Document], fraction: float, where: str
) -> tuple[list[Document], list[Document]]:
    """Keep the last `fraction` of the docs (at least one) for evaluation."""
    if len(docs) < 2:
        raise FedskyError(
            f"{where} has {len(docs)} document(s); holding out eval data needs at least 2 "
            "(add text or set data.eval to a separate file)"
        )
    n_eval = min(len(docs) - 1, max(1, round(len(docs) * fraction)))
    return docs[:-n_eval], docs[-n_eval:]


def load_corpus(cfg: DataConfig, job_dir: Path | None) -> Corpus:
    """Load the training pool and the evaluation docs a job asks for.

    When the training path is missing and `cfg.fallback` allows it (wikitext and text formats
    only: CSV and HF columns mean nothing for the fallback), the Python help topics stand in,
    with the last `cfg.eval_fraction` held out, and a warning is logged.

    Raises:
        FedskyError: A path is missing (without fallback), a column is wrong, or a side is empty.
    """
    missing = cfg.format != "hf" and resolve_data_path(cfg.train, job_dir) is None
    if missing and cfg.fallback and cfg.format in _FALLBACK_FORMATS:
        source = f"Python's pydoc topics (fallback: {cfg.train} not found)"
        log.warning("data: %s not found (job dir, FEDSKY_DATA); using pydoc topics", cfg.train)
        train, eval_docs = _hold_out(fallback_documents(), cfg.eval_fraction, "fallback corpus")
        return Corpus(train=train, eval=eval_docs, source=source)

    train = load_documents(cfg.train, cfg, job_dir, split=cfg.hf_split)
    train_where = _describe(cfg.train, cfg, job_dir, cfg.hf_split)
    if cfg.eval is not None:
        eval_docs = load_documents(cfg.eval, cfg, job_dir, split=cfg.hf_eval_split)
        eval_where = _describe(cfg.eval, cfg, job_dir, cfg.hf_eval_split)
    else:
        train, eval_docs = _hold_out(train, cfg.eval_fraction, train_where)
        eval_where = "the last train documents, held out"
    source = (
        f"{cfg.format} {train_where} ({len(train)} documents); "
        f"eval: {eval_where} ({len(eval_docs)} documents)"
    )
    return Corpus(train=train, eval=eval_docs, source=source)


def _describe(source: str, cfg: DataConfig, job_dir: Path | None, split: str) -> str:
    if cfg.format == "hf":
        return f"{source} [{split}]"
    return str(resolve_data_path(source, job_dir) or source)
