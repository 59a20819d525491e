"""SQuAD question answering against independent references written from the published definitions: the
official evaluation's normalisation, exact match and F1 (v2.0 script: lower case, ASCII punctuation
(``string.punctuation``) removed, the articles a / an / the removed, whitespace runs collapsed; the best score
over the gold answers; a question whose golds all normalise to nothing expects the empty answer), the
doc-stride window labels (a window that holds the whole answer points at its first and last token, any other
at [CLS]) and the span search (start <= end, both in the context, at most ``max_answer_length`` tokens, among
each window's ``n_best`` starts and ends; SQuAD v2's null score the smallest [CLS] score over the windows)."""

from __future__ import annotations

import math
import random
import re
import string
import unicodedata
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gmlp.data.sentiment import QAExample
from gmlp.data.text import TextDataError
from gmlp.train import text as pipelines
from gmlp.train.text import postprocess_qa, squad_exact_match, squad_f1, squad_metrics, squad_normalize
from gmlp.train.tokenizer import train_tokenizer

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True)

# --- the official metric, from its definition -----------------------------------------------------------


def ref_normalize(s: str) -> str:
    s = s.lower()
    s = "".join(c for c in s if c not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def ref_f1(pred: str, gold: str) -> float:
    p, g = ref_normalize(pred).split(), ref_normalize(gold).split()
    if not p or not g:
        return float(p == g)
    overlap = sum((Counter(p) & Counter(g)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(p), overlap / len(g)
    return 2 * precision * recall / (precision + recall)


def ref_scores(pred: str, golds: list[str]) -> tuple[float, float]:
    kept = [g for g in golds if ref_normalize(g)] or [""]
    em = max(float(ref_normalize(pred) == ref_normalize(g)) for g in kept)
    return em, max(ref_f1(pred, g) for g in kept)


# words, ASCII and Unicode punctuation, the articles in any case, whitespace of several kinds
_PIECES = ["the", "The", "THE", "an", "a", "A", "ahab", "Ahab", "whale", "white", "theory", "another", "ana",
           "café", "cafe\u0301", "東京", "🐋", "1851", "'s", ".", ",", "-", "!", '"', "(", ")", "«", "»", "—",
           "…", "¿", "’", "“", "”", "·", " ", "  ", "\t", "\n", "\u00a0", "\u3000"]
texts = st.lists(st.sampled_from(_PIECES), max_size=8).map("".join)


@SETTINGS
@given(pred=texts, gold=texts)
def test_normalize_exact_match_and_f1_equal_the_official_definitions(pred: str, gold: str) -> None:
    assert squad_normalize(pred) == ref_normalize(pred)
    assert squad_exact_match(pred, gold) == float(ref_normalize(pred) == ref_normalize(gold))
    assert squad_f1(pred, gold) == pytest.approx(ref_f1(pred, gold))


@SETTINGS
@given(data=st.lists(st.tuples(texts, st.lists(texts, max_size=4)), min_size=1, max_size=5))
def test_squad_metrics_is_the_mean_of_the_best_gold_scores(data: list[tuple[str, list[str]]]) -> None:
    preds = {f"q{i}": p for i, (p, _) in enumerate(data)}
    refs = {f"q{i}": golds for i, (_, golds) in enumerate(data)}
    preds["extra"] = "not scored"  # (a prediction with no reference is ignored, as the official script does)
    got = squad_metrics(preds, refs)
    want = [ref_scores(p, golds) for p, golds in data]
    assert got["count"] == len(data)
    assert got["exact_match"] == pytest.approx(100 * sum(w[0] for w in want) / len(data))
    assert got["f1"] == pytest.approx(100 * sum(w[1] for w in want) / len(data))


def test_metric_cases_by_hand() -> None:
    # only ASCII punctuation goes (the official script's string.punctuation): guillemets and dashes stay
    assert squad_normalize("«The Whale»") == "« whale»" and squad_normalize("X—Y") == "x—y"
    assert squad_exact_match("«Ahab»", "Ahab") == 0.0 and squad_exact_match("'Ahab.'", "ahab") == 1.0
    assert squad_normalize("theory of an ana") == "theory of ana"  # (articles as whole words only)
    assert squad_normalize(" the\u00a0white\twhale\n") == "white whale"
    # an unanswerable question: only the empty prediction scores; golds that normalise to nothing count so
    for golds in ([], [""], ["the", "."]):
        assert squad_metrics({"q": ""}, {"q": golds})["f1"] == 100.0
        assert squad_metrics({"q": "Ahab"}, {"q": golds}) == {"exact_match": 0.0, "f1": 0.0, "count": 1}
    # the best of several golds, each scored on its own
    m = squad_metrics({"q": "captain ahab"}, {"q": ["the captain", "Ahab", "captain ahab of the Pequod"]})
    assert m["exact_match"] == 0.0 and m["f1"] == pytest.approx(100 * 2 * (2 / 2) * (2 / 4) / (1 + 2 / 4))


def test_squad_metrics_names_a_missing_prediction_and_values_of_the_wrong_type() -> None:
    with pytest.raises(KeyError, match="'b'"):
        squad_metrics({"a": "x"}, {"a": ["x"], "b": ["y"]})
    with pytest.raises(TypeError, match=r"prediction of question 'a' must be a string, got None"):
        squad_metrics({"a": None}, {"a": ["x"]})  # type: ignore[dict-item]
    # QAExample.answers holds (text, answer_start) pairs: passed as golds they failed deep in lower()
    with pytest.raises(TypeError, match=r"gold answers of question 'a' must be strings, got \('x', 0\)"):
        squad_metrics({"a": "x"}, {"a": [("x", 0)]})  # type: ignore[list-item]


# --- doc-stride windows and their labels -----------------------------------------------------------------

# accents (composed and decomposed), CJK, emoji, a no-break space, characters no tokenizer here has seen
# ("☃", "ꙮ": [UNK]), and a base letter whose accent does not compose ("q\u0301")
_WORDS = ["Zoë", "met", "Renée", "at", "the", "café", "in", "Zürich", "🐋", "on", "Tuesday,", "near", "東京",
          "station.", "naïve", "whale", "Straße", "sailor", "harbour", "grey", "q\u0301uay"]
_UNSEEN = ["☃", "ꙮ", "☃snow", "ab☃"]


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, object]:
    corpus = [" ".join(_WORDS)] * 3 + ["Who met whom where and when?", " ".join(reversed(_WORDS))]
    corpus += [unicodedata.normalize("NFD", t) for t in corpus]
    return {
        "wordpiece": train_tokenizer(corpus, kind="wordpiece", vocab_size=220, model_max_length=64),
        "wordpiece-cased": train_tokenizer(corpus, kind="wordpiece", vocab_size=220, lowercase=False,
                                           model_max_length=64),
        "unigram": train_tokenizer(corpus, kind="unigram", vocab_size=220, model_max_length=64),
    }


def _context(rng: random.Random, n: int, form: str) -> tuple[str, list[tuple[int, int]]]:
    """A context of ``n`` words (separators of one to three spaces) and each word's character span."""
    words = [unicodedata.normalize(form, rng.choice(_WORDS + _UNSEEN)) for _ in range(n)]
    text, spans = "", []
    for w in words:
        spans.append((len(text), len(text) + len(w)))
        text += w + rng.choice([" ", "  ", "   "])
    return text.rstrip(), spans


def _check_window(ex: QAExample, feats: pipelines._QAFeatures, k: int, max_len: int, max_query: int) -> bool:
    """The invariants of window ``k`` and its label against the reference; whether it holds the answer."""
    ids, kinds, offsets = feats.input_ids[k], feats.token_type_ids[k], feats.offsets[k]
    assert len(ids) <= max_len and len(ids) == len(offsets)
    assert int((kinds == 0).sum()) <= max_query + 2  # ([CLS], the question, [SEP])
    ctx = [i for i, o in enumerate(offsets) if o is not None]
    for i in ctx:  # each context token: original characters, no surrounding whitespace, no mark cut off
        a, b = offsets[i]
        assert 0 <= a <= b <= len(ex.context)
        assert ex.context[a:b] == ex.context[a:b].strip()
        assert b == len(ex.context) or not unicodedata.combining(ex.context[b])
    assert [offsets[i][0] for i in ctx] == sorted(offsets[i][0] for i in ctx)
    text, cs = ex.answers[0]
    ce = cs + len(text)
    covered = {c for i in ctx for c in range(*offsets[i])}
    inside = bool(ctx) and all(c in covered for c in range(cs, ce) if not ex.context[c].isspace())
    touching = [i for i in ctx if offsets[i][0] < ce and offsets[i][1] > cs and offsets[i][0] < offsets[i][1]]
    want = (touching[0], touching[-1]) if inside else (0, 0)
    assert (feats.start[k], feats.end[k]) == want, (ex.context, text, offsets)
    return inside


def _answer_tokens(tok, ex: QAExample) -> int:
    """The tokens of the context (tokenized on its own) from the first to the last that holds characters of
    the answer (a SentencePiece-style lone "▁" between its words included)."""
    text, cs = ex.answers[0]
    offsets = tok(ex.context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    ce = cs + len(text)
    touching = [i for i, (a, b) in enumerate(offsets) if a < ce and b > cs and ex.context[a:b].strip()]
    return touching[-1] - touching[0] + 1


@pytest.mark.parametrize("kind", ["wordpiece", "wordpiece-cased", "unigram"])
def test_window_labels_match_the_reference_and_decode_the_original_text(tokenizers, kind: str) -> None:
    """Every answer placement in a short context (every window boundary crossed), three window shapes: the
    label of each window is the reference's, a labelled window's span is the context's own text (NFD marks,
    case, [UNK] words, CJK and emoji as written), and an answer longer than a window labels none."""
    tok = tokenizers[kind]
    rng = random.Random(kind)
    for form in ("NFC", "NFD"):
        context, spans = _context(rng, 20, form)
        examples = []
        for a in range(len(spans)):  # (answers of one to three words, at every word)
            for b in range(a, min(a + 3, len(spans))):
                answer = (context[spans[a][0] : spans[b][1]], spans[a][0])
                examples.append(QAExample(f"{a}-{b}", "Who met whom?", context, (answer,)))
        long_context, _ = _context(rng, 40, form)
        examples.append(QAExample("long", "Who?", long_context, ((long_context, 0),)))
        for max_len, stride, max_query in ((20, 3, 4), (24, 8, 6), (16, 16 - 4 - 3 - 1, 4)):
            feats = pipelines._qa_features(tok, examples, max_len, stride, max_query)
            labelled = set()
            for k, e in enumerate(feats.example_index):
                ex = examples[e]
                if _check_window(ex, feats, k, max_len, max_query):
                    labelled.add(e)
                    offsets = feats.offsets[k]
                    start, end = [0.0] * len(offsets), [0.0] * len(offsets)
                    start[feats.start[k]] = end[feats.end[k]] = 10.0
                    got = postprocess_qa([ex], [0], [offsets], [start], [end], max_answer_length=64)
                    assert got == {ex.id: ex.answers[0][0]}
            assert len(feats.input_ids) > len(examples)  # (several windows per context)
            # windows overlap by ``stride`` tokens: an answer of up to stride + 1 tokens is in one of them
            fits = {e for e, ex in enumerate(examples) if _answer_tokens(tok, ex) <= stride + 1}
            assert fits <= labelled and len(examples) - 1 not in labelled and len(fits) >= 10


@pytest.mark.parametrize("kind", ["wordpiece", "unigram"])
def test_long_questions_are_cut_to_max_query_tokens_at_any_allowed_stride(tokenizers, kind: str) -> None:
    """A question longer than the limit keeps at most ``max_query`` tokens. A SentencePiece-style first
    token ("▁" alone) spans the first character, so a one-token cut came back as two: with the largest
    stride the window allows, the tokenizer panicked (a BaseException from Rust, "stride must be strictly
    less than max_len")."""
    tok = tokenizers[kind]
    rng = random.Random(1)
    context, _ = _context(rng, 40, "NFC")
    for max_query in (1, 2, 5):
        max_len = 20
        stride, max_query = pipelines._check_doc_stride(max_len - max_query - 4, max_len, max_query)
        questions = [" ".join(rng.choice(_WORDS) for _ in range(12)) + "?" for _ in range(6)]
        examples = [QAExample(f"q{i}", q, context, ()) for i, q in enumerate(questions)]
        feats = pipelines._qa_features(tok, examples, max_len, stride, max_query)
        for k, e in enumerate(feats.example_index):
            n_question = int((feats.token_type_ids[k] == 0).sum()) - 2
            assert 0 <= n_question <= max_query
            if kind == "wordpiece":  # (a prefix-consistent tokenizer: exactly the first max_query tokens)
                full = tok(questions[e], add_special_tokens=False)["input_ids"]
                assert feats.input_ids[k][1 : 1 + n_question].tolist() == full[:max_query]


def test_an_empty_answer_is_no_span_and_a_misplaced_one_is_refused_by_id(tokenizers) -> None:
    tok = tokenizers["wordpiece"]
    context = "the whale met a sailor near the old harbour"
    # an empty answer text (a converted file) gave the label start 6 > end 5
    feats = pipelines._qa_features(tok, [QAExample("e", "who?", context, (("", 9), (" ", 9)))], 32, 4, 8)
    assert (feats.start, feats.end) == ([0], [0])
    # the first answer with text is the one labelled
    feats = pipelines._qa_features(tok, [QAExample("e", "who?", context, (("", 9), ("whale", 4)))], 32, 4, 8)
    assert feats.start == feats.end and feats.offsets[0][feats.start[0]] == (4, 9)
    # an answer_start that does not point at the answer (load_squad_json refuses it; hf: data was not
    # checked) labelled whatever tokens were there
    for bad in (("sailor", 4), ("whale", -5)):
        with pytest.raises(TextDataError, match=r"question 'bad'.*'(sailor|whale)'.*offset"):
            pipelines._qa_features(tok, [QAExample("bad", "who?", context, (bad,))], 32, 4, 8)


@pytest.mark.parametrize("context", ["", "   ", "\n\t\u00a0"])
def test_a_blank_context_gives_one_window_and_the_empty_answer(tokenizers, context: str) -> None:
    ex = QAExample("b", "who sang?", context, ())
    for tok in tokenizers.values():
        feats = pipelines._qa_features(tok, [ex], 16, 4, 8)
        assert (feats.start, feats.end) == ([0], [0]) and all(o is None for o in feats.offsets[0])
        zeros = [[0.0] * len(feats.offsets[0])]
        assert postprocess_qa([ex], [0], feats.offsets, zeros, zeros, version_2=True) == {"b": ""}


# --- span search ------------------------------------------------------------------------------------------


def ref_postprocess(
    context: str, windows: list, n_best: int, max_len: int, version_2: bool, threshold: float
) -> str:
    best, best_text = -math.inf, ""
    for offsets, s, e in windows:
        top_s = sorted(range(len(s)), key=lambda i: s[i], reverse=True)[:n_best]
        top_e = sorted(range(len(e)), key=lambda i: e[i], reverse=True)[:n_best]
        for i in top_s:
            for j in top_e:
                if offsets[i] is None or offsets[j] is None or j < i or j - i + 1 > max_len:
                    continue
                if s[i] + e[j] > best:
                    best, best_text = s[i] + e[j], context[offsets[i][0] : offsets[j][1]]
    null = min(s[0] + e[0] for _, s, e in windows)
    return "" if version_2 and null - best > threshold else best_text


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    n_windows=st.integers(1, 3),
    n_best=st.integers(1, 6),
    max_len=st.integers(1, 4),
    version_2=st.booleans(),
    threshold=st.sampled_from([-2.0, 0.0, 1.5]),
)
def test_postprocess_equals_the_brute_force_search(
    seed: int, n_windows: int, n_best: int, max_len: int, version_2: bool, threshold: float
) -> None:
    """Windows of one question that overlap (a token in two windows may win from either, on its score
    there), question tokens with the largest logits (never chosen), starts after ends (never chosen)."""
    rng = random.Random(seed)
    context = " ".join(f"w{i}" for i in range(12))
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", context)]
    windows = []
    for w in range(n_windows):
        first = min(w * 4, len(words) - 1)
        offsets = [None, None, None] + words[first : first + 6] + [None]  # [CLS] q q [SEP]-ish ... [SEP]
        s = [rng.gauss(0, 1) for _ in offsets]
        e = [rng.gauss(0, 1) for _ in offsets]
        s[1] = e[2] = 9.0  # (the question's tokens: out of bounds however large)
        windows.append((offsets, s, e))
    ex = QAExample("q", "?", context, ())
    got = postprocess_qa(
        [ex], [0] * n_windows, [w[0] for w in windows], [w[1] for w in windows], [w[2] for w in windows],
        n_best=n_best, max_answer_length=max_len, version_2=version_2, null_threshold=threshold,
    )
    assert got == {"q": ref_postprocess(context, windows, n_best, max_len, version_2, threshold)}


def test_a_nan_null_threshold_is_refused() -> None:
    """No comparison with NaN holds: SQuAD v2 answered every question, however large its [CLS] score."""
    ex = QAExample("q", "?", "Call me Ishmael", ())
    offsets = [[None, (0, 4), (5, 7), (8, 15)]]
    null_wins = ([[9.0, 0.0, 0.0, 1.0]], [[9.0, 0.0, 0.0, 1.0]])
    assert postprocess_qa([ex], [0], offsets, *null_wins, version_2=True) == {"q": ""}
    with pytest.raises(ValueError, match="null_threshold must be a number, got nan"):
        postprocess_qa([ex], [0], offsets, *null_wins, version_2=True, null_threshold=math.nan)


def test_nan_null_threshold_is_refused_before_anything_is_read() -> None:
    from gmlp.train.recipe import ConfigError
    from gmlp.train.text import FinetuneConfig

    with pytest.raises(ConfigError, match="--null-threshold must be a number"):
        FinetuneConfig(task="qa", null_threshold=float("nan")).validate()


@pytest.mark.parametrize("seq_len", range(4, 80))
def test_the_default_doc_stride_fits_every_seq_len_that_has_room(seq_len: int) -> None:
    """With no --doc-stride, a short --seq-len got a quarter of it as the stride, and an error naming a
    --doc-stride the user never gave; now the default fits, or the error names --seq-len."""
    from gmlp.train.recipe import ConfigError
    from gmlp.train.text import _check_doc_stride, default_doc_stride

    stride = default_doc_stride(seq_len, 64)
    max_query = min(64, seq_len // 2)
    if seq_len - max_query - 3 > 0:  # room for context: the default is accepted
        assert _check_doc_stride(stride, seq_len, 64, given=False) == (stride, max_query)
        assert stride == min(max(1, seq_len // 4), seq_len - max_query - 4) or stride == 0
    else:
        with pytest.raises(ConfigError, match=rf"a QA window of {seq_len} tokens .* leaves no room"):
            _check_doc_stride(stride, seq_len, 64, given=False)
