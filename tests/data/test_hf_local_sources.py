"""Hugging Face ``datasets`` as local text data, offline (twenty-seventh session: new).

A ``save_to_disk`` folder (``hf:PATH`` or the bare path) and a local folder of data files (``hf:PATH``, read
as ``datasets.load_dataset(PATH)`` reads it) are corpus, classification and QA sources; an ``hf:NAME`` that
offline mode keeps from being downloaded is one line naming the source and the setting. Every dataset here
is built with ``Dataset.from_dict`` in a temporary folder: nothing touches the network.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

datasets = pytest.importorskip("datasets")
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value  # noqa: E402

from gmlp.data import sentiment as S  # noqa: E402
from gmlp.data import text as T  # noqa: E402
from gmlp.data import token_cache as C  # noqa: E402

TEXTS = [f"document {i}: the whale swam past ship number {i * 7 % 11}" for i in range(40)]


@pytest.fixture(autouse=True)
def _private_hf_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """``load_dataset`` of a local folder writes its arrow files to a cache of this test session only."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf-cache")
    datasets.disable_progress_bars()


def _saved(path: Path, data: Dataset | DatasetDict) -> Path:
    data.save_to_disk(str(path))
    return path


def _docs(source: str, **kwargs: Any) -> list[str]:
    return [d.text for d in T.iter_documents([source], **kwargs)]


# --- pretraining corpus --------------------------------------------------------------------------------


@settings(max_examples=6, deadline=None, derandomize=True)
@given(st.lists(st.one_of(st.none(), st.text(max_size=12)), min_size=1, max_size=8))
def test_a_save_to_disk_dataset_is_a_corpus_source_read_as_its_text_column(values: list[str | None]) -> None:
    import tempfile

    want = [v.strip() for v in values if v is not None and v.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        path = _saved(Path(tmp) / "ds", Dataset.from_dict({"text": values, "n": list(range(len(values)))},
                                                          features=Features({"text": Value("string"),
                                                                             "n": Value("int64")})))
        for source in (f"hf:{path}", str(path)):  # (the bare folder too, as the vision side takes it)
            if want:
                assert _docs(source) == want
            else:  # nothing but None / blank values: an empty source, said so (not silently skipped)
                with pytest.raises(T.TextDataError, match="holds no text"):
                    _docs(source)


def test_a_saved_dataset_dict_gives_its_train_split_and_splits_it_by_hash(tmp_path: Path) -> None:
    path = _saved(tmp_path / "dd", DatasetDict({
        "train": Dataset.from_dict({"text": TEXTS[:30]}),
        "validation": Dataset.from_dict({"text": TEXTS[30:35]}),
        "test": Dataset.from_dict({"text": TEXTS[35:]}),
    }))
    splits = T.load_text_splits(f"hf:{path}", valid_fraction=0.2)
    assert sorted(splits.train + splits.validation) == sorted(TEXTS[:30])  # the held-out part: of train
    assert (splits.train, splits.validation) == T.split_documents(TEXTS[:30], 0.2)
    only_test = _saved(tmp_path / "t", DatasetDict({"test": Dataset.from_dict({"text": TEXTS})}))
    with pytest.raises(T.TextDataError, match=r"has no 'train' split \(splits: test\)"):
        T.load_text_splits(f"hf:{only_test}")


def test_a_local_data_folder_is_read_as_load_dataset_reads_it(tmp_path: Path) -> None:
    folder = tmp_path / "pq"
    folder.mkdir()
    Dataset.from_dict({"text": TEXTS[:20]}).to_parquet(str(folder / "train.parquet"))
    Dataset.from_dict({"text": TEXTS[20:]}).to_parquet(str(folder / "test.parquet"))
    Dataset.from_dict({"text": ["hidden"]}).to_parquet(str(folder / ".hidden.parquet"))  # (left out)
    want = list(datasets.load_dataset(str(folder), split="train")["text"])
    assert _docs(f"hf:{folder}") == want == TEXTS[:20]


@pytest.mark.parametrize(
    "values, kind", [([["a b", "c"], ["d"]], "(List|Sequence)"), ([1, 2], "int64"), ([1.5, 2.0], "float64")]
)
def test_a_text_column_of_lists_or_numbers_is_refused_not_stringified(
    tmp_path: Path, values: list[Any], kind: str
) -> None:
    path = _saved(tmp_path / "ds", Dataset.from_dict({"text": values}))
    with pytest.raises(T.TextDataError, match=rf"column 'text' holds {kind} values .*--text-column"):
        _docs(f"hf:{path}")
    table = tmp_path / "t.jsonl"
    Dataset.from_dict({"text": values}).to_json(str(table))
    with pytest.raises(T.TextDataError, match=rf"holds {kind} values"):  # a table file too
        _docs(str(table))


def test_a_missing_text_column_names_the_source_and_the_columns(tmp_path: Path) -> None:
    path = _saved(tmp_path / "ds", Dataset.from_dict({"body": TEXTS}))
    with pytest.raises(T.TextDataError, match=r"no column 'text'; available columns: body .*--text-column"):
        _docs(f"hf:{path}")
    assert _docs(f"hf:{path}", text_column="body") == TEXTS


def test_unusable_local_paths_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="folder .*nope.* does not exist"):
        _docs(f"hf:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"hf:.*empty.*data files"):
        _docs(f"hf:{tmp_path / 'empty'}")
    path = _saved(tmp_path / "ds", Dataset.from_dict({"text": TEXTS}))
    with pytest.raises(T.TextDataError, match="save_to_disk folder, which has no config 'cfg'"):
        _docs(f"hf:{path}:cfg")


def test_an_uncached_hub_dataset_offline_is_one_line_naming_the_source_and_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def offline(*args: Any, **kwargs: Any) -> None:  # what datasets raises offline for an uncached dataset
        raise ConnectionError(f"Couldn't reach {args[0]!r} on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for load in (lambda: _docs("hf:wikitext:wikitext-2-raw-v1"),
                 lambda: S.load_classification("hf:wikitext:wikitext-2-raw-v1"),
                 lambda: S.load_qa("hf:wikitext:wikitext-2-raw-v1")):
        with pytest.raises(ConnectionError) as info:
            load()
        message = str(info.value)
        assert "\n" not in message and info.value.errno is None  # (the CLI prints it as one line)
        assert message.startswith("hf:wikitext:wikitext-2-raw-v1: dataset 'wikitext' (config 'wikitext-2-raw")
        assert "not in the local Hugging Face cache, and HF_DATASETS_OFFLINE=1 keeps it from" in message


# --- token cache ---------------------------------------------------------------------------------------


def test_local_hf_sources_are_keyed_by_their_files_and_hub_names_are_not_cached(tmp_path: Path) -> None:
    path = _saved(tmp_path / "ds", Dataset.from_dict({"text": TEXTS}))
    key = C.corpus_fingerprint([f"hf:{path}"])
    assert key is not None and key == C.corpus_fingerprint([str(path)])
    moved = Path(shutil.copytree(path, tmp_path / "elsewhere"))
    assert C.corpus_fingerprint([f"hf:{moved}"]) == key  # by contents, not by path
    edited = _saved(tmp_path / "edited", Dataset.from_dict({"text": [*TEXTS[:-1], "another text"]}))
    assert C.corpus_fingerprint([f"hf:{edited}"]) != key
    folder = tmp_path / "pq"
    folder.mkdir()
    Dataset.from_dict({"text": TEXTS}).to_parquet(str(folder / "train.parquet"))
    plain = C.corpus_fingerprint([f"hf:{folder}"])
    assert plain is not None and plain != C.corpus_fingerprint([f"hf:{folder}:other"])  # the config counts
    (folder / "test.parquet").write_bytes((folder / "train.parquet").read_bytes())
    assert C.corpus_fingerprint([f"hf:{folder}"]) != plain
    assert C.corpus_fingerprint(["hf:imdb"]) is None and C.corpus_fingerprint(["hf:glue:sst2"]) is None


# --- classification ----------------------------------------------------------------------------------------


def _labelled(n: int, names: list[str]) -> dict[str, list[Any]]:
    return {"sentence": [f"sentence {i} of the set" for i in range(n)],
            "label": [i * 5 % len(names) for i in range(n)]}


def test_a_saved_class_label_dataset_matches_the_same_rows_as_csv_files(tmp_path: Path) -> None:
    names = ["negative", "neutral", "positive"]  # sorted: the order CSV label names get
    features = Features({"sentence": Value("string"), "label": ClassLabel(names=names)})
    parts = {"train": _labelled(30, names), "validation": _labelled(6, names), "test": _labelled(5, names)}
    path = _saved(tmp_path / "dd", DatasetDict({k: Dataset.from_dict(v, features=features)
                                                for k, v in parts.items()}))
    files = tmp_path / "files"
    files.mkdir()
    for split, rows in parts.items():
        named = {"sentence": rows["sentence"], "label": [names[i] for i in rows["label"]]}
        Dataset.from_dict(named).to_csv(str(files / f"{split}.csv"), index=False)
    from_hf = S.load_classification(f"hf:{path}")
    assert from_hf == S.load_classification(str(files)) == S.load_classification(str(path))
    assert from_hf.label_names == names and from_hf.num_labels == 3  # ClassLabel names: id2label


def test_a_dataset_with_only_a_train_split_is_split_as_a_lone_file(tmp_path: Path) -> None:
    rows = {"sentence": [f"text {i}" for i in range(25)],
            "label": ["pos" if i % 3 else "neg" for i in range(25)]}
    path = _saved(tmp_path / "ds", Dataset.from_dict(rows))
    Dataset.from_dict(rows).to_csv(str(tmp_path / "all.csv"), index=False)
    data = S.load_classification(f"hf:{path}")
    assert data == S.load_classification(str(tmp_path / "all.csv"))  # 80/10/10, the files' fixed seed
    assert sorted(e.text for e in (*data.train, *data.validation, *data.test)) == sorted(rows["sentence"])


def test_an_unlabelled_test_split_is_replaced_by_the_validation_split(tmp_path: Path) -> None:
    rows = _labelled(20, ["a", "b"])
    for test in ({"sentence": ["x", "y"], "label": [-1, -1]}, {"sentence": ["x", "y"]}):
        path = _saved(tmp_path / f"dd{len(test)}", DatasetDict({
            "train": Dataset.from_dict(rows), "validation": Dataset.from_dict(rows),
            "test": Dataset.from_dict(test),
        }))
        data = S.load_classification(f"hf:{path}")
        assert data.test == data.validation and data.test_has_labels


@pytest.mark.parametrize(
    "rows, message",
    [
        ({"sentence": ["a", None, "c"], "label": [0, 1, 0]},
         r"\(train split\), row 1: no text in column 'sentence'"),
        ({"sentence": ["a", "b", "c"], "label": [0, None, 1]}, r"\(train split\), row 1: no label"),
        ({"sentence": [["a"], ["b"]], "label": [0, 1]}, r"column 'sentence' holds (List|Sequence) values"),
        ({"sentence": ["a", "b", "c"], "gold": [0, 1, 0]},
         r"no column 'label'; available columns: sentence, gold"),
        ({"sentence": ["a", "b", "c"], "label": [0.0, 1.5, 2.0]}, r"row 1: label 1.5 is neither"),  # as JSON
    ],
)
def test_bad_classification_columns_are_refused_with_the_row(
    tmp_path: Path, rows: dict[str, list[Any]], message: str
) -> None:
    many = {k: v * 4 for k, v in rows.items()}
    path = _saved(tmp_path / "ds", DatasetDict({"train": Dataset.from_dict(many),
                                                 "validation": Dataset.from_dict(rows)}))
    with pytest.raises(T.TextDataError, match=message):
        S.load_classification(f"hf:{path}")


def test_an_empty_dataset_is_refused_as_holding_no_rows(tmp_path: Path) -> None:
    empty = Dataset.from_dict({"sentence": [], "label": []},
                              features=Features({"sentence": Value("string"), "label": Value("int64")}))
    path = _saved(tmp_path / "ds", DatasetDict({"train": empty, "validation": empty}))
    folder = tmp_path / "pq"
    folder.mkdir()
    empty.to_parquet(str(folder / "train.parquet"))
    # (datasets 4: load_from_disk fails, IndexError; datasets 2: it loads, and the split holds no rows)
    with pytest.raises(T.TextDataError, match=r"holds no rows( \(split\(s\) train, validation empty\))?$"):
        S.load_classification(f"hf:{path}")
    with pytest.raises(T.TextDataError, match=r"pq'? holds no rows"):
        S.load_classification(f"hf:{folder}")
    with pytest.raises(T.TextDataError, match=r"holds no rows"):
        T.load_text_splits(f"hf:{folder}", text_column="sentence")


# --- question answering --------------------------------------------------------------------------------


def _squad(n: int, start: int = 0) -> dict[str, list[Any]]:
    contexts = [f"The ship {i} sailed to port {i + 3} at dawn." for i in range(start, start + n)]
    answers = [{"text": [f"port {i + 3}"], "answer_start": [c.index("port")]}
               for i, c in zip(range(start, start + n), contexts, strict=True)]
    answers[-1] = {"text": [], "answer_start": []}  # unanswerable (v2.0)
    return {"id": [f"q{i}" for i in range(start, start + n)], "title": ["t"] * n,
            "question": ["Where did it sail?"] * n, "context": contexts, "answers": answers}


def test_a_saved_squad_dataset_is_read_like_the_squad_json(tmp_path: Path) -> None:
    path = _saved(tmp_path / "dd", DatasetDict({"train": Dataset.from_dict(_squad(6)),
                                                "validation": Dataset.from_dict(_squad(3, 10))}))
    data = S.load_qa(f"hf:{path}")
    assert S.load_qa(str(path)) == data
    assert [e.id for e in data.train] == [f"q{i}" for i in range(6)] and data.test == data.validation
    assert data.train[0].answers == (("port 3", data.train[0].context.index("port 3")),)
    assert data.version_2 and data.validation[-1].answers == ()
    alone = _saved(tmp_path / "one", Dataset.from_dict(_squad(4)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert S.load_qa(f"hf:{alone}").validation == S.load_qa(f"hf:{alone}").train
    assert any("no validation file" in str(w.message) for w in caught)


def test_a_dataset_not_in_squad_layout_names_the_missing_columns(tmp_path: Path) -> None:
    path = _saved(tmp_path / "ds", Dataset.from_dict({"question": ["q"], "text": ["c"]}))
    with pytest.raises(T.TextDataError, match=r"not SQuAD format: no column 'id', 'context', 'answers'"):
        S.load_qa(f"hf:{path}")


def test_a_split_slice_is_read_as_load_dataset_reads_it(tmp_path: Path) -> None:
    """``iter_hf_text(..., split="train[:2]")`` (datasets' slice syntax) read two rows until the splits were
    looked up by name (then: "has no 'train[:2]' split")."""
    folder = tmp_path / "parquet"
    folder.mkdir()
    Dataset.from_dict({"text": ["one a", "two b", "three c"]}).to_parquet(str(folder / "train.parquet"))
    assert [d.text for d in T.iter_hf_text(str(folder), split="train[:2]")] == ["one a", "two b"]


def test_hf_of_a_file_says_to_give_it_without_hf(tmp_path: Path) -> None:
    """``hf:FILE`` gave datasets' "Couldn't find any data file at FILE", of a file that is there."""
    file = tmp_path / "c.parquet"
    Dataset.from_dict({"text": ["a b"]}).to_parquet(str(file))
    with pytest.raises(T.TextDataError, match=r"is a file; give the file without hf:"):
        list(T.iter_documents([f"hf:{file}"]))


def test_a_hidden_qa_test_split_is_scored_as_the_validation_split(tmp_path: Path) -> None:
    """A SQuAD v1-style dataset whose test split hides its answers (all empty) was scored as if every test
    question were unanswerable (about 0 EM/F1 in test_metrics.json); as GLUE's -1 labels, the validation
    split's score instead, with a warning."""
    answered = {k: v[:-1] for k, v in _squad(4).items()}  # (no unanswerable question: v1)
    hidden = {**_squad(3, 10), "answers": [{"text": [], "answer_start": []}] * 3}
    path = _saved(tmp_path / "dd", DatasetDict({"train": Dataset.from_dict(answered),
                                                "validation": Dataset.from_dict(answered),
                                                "test": Dataset.from_dict(hidden)}))
    with pytest.warns(UserWarning, match=r"the test split holds no answers \(hidden\)"):
        data = S.load_qa(f"hf:{path}")
    assert data.test == data.validation and not data.version_2
