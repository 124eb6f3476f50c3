"""Task accuracy (algo/tasks.py, `accllm eval --tasks`): the local tasks' data, lm-eval's model class over
accllm's scorers, and the command line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from algo.common import AccllmError
from algo.tasks import (ANTONYMS, CAPITALS, LOCAL_TASKS, _lm_class, antonyms_docs, capitals_docs, parse_tasks,
                        pydoc_cloze_docs)

REPO = Path(__file__).resolve().parents[1]


def test_parse_tasks_expands_local_and_refuses_unknown_names():
    assert parse_tasks("local") == list(LOCAL_TASKS)
    assert parse_tasks("antonyms, capitals,antonyms") == ["antonyms", "capitals"]
    with pytest.raises(AccllmError, match="unknown task 'hellaswag'; accepted: local"):
        parse_tasks("capitals,hellaswag")
    with pytest.raises(AccllmError, match="names no task"):
        parse_tasks(" , ")


@pytest.mark.parametrize("docs, pairs", [(capitals_docs, CAPITALS), (antonyms_docs, ANTONYMS)])
def test_multiple_choice_documents(docs, pairs):
    d = docs()
    assert len(d) == len(pairs) and d == docs()                 # one per pair, the same every time
    for doc, (q, a) in zip(d, pairs):
        assert q in doc["query"] and len(doc["choices"]) == 4 == len(set(doc["choices"]))
        assert doc["choices"][doc["gold"]] == a
    golds = [doc["gold"] for doc in d]
    assert len(set(golds)) == 4                                 # the answer is not always in one place


def test_cloze_documents_are_sentences_of_the_pydoc_text():
    from algo.data import read_text
    text = " ".join(read_text("pydoc").split())
    d = pydoc_cloze_docs()
    assert len(d) == 120 and d == pydoc_cloze_docs()
    for doc in d:
        assert doc["target"].startswith(" ") and doc["target"][1:].isalpha() and not doc["context"].endswith(" ")
        assert doc["context"] + doc["target"] + "." in text


def _fp_scorer(tiny):
    from algo.recipe import load_recipe
    from quant.pipeline import prepare
    return prepare(tiny, load_recipe("fp"), progress=False).scorer()


class _Req:
    def __init__(self, *args):
        self.args = args


def test_loglikelihood_is_the_scorers_log_probability(tiny):
    scorer = _fp_scorer(tiny)
    lm = _lm_class()(scorer, tiny.tokenizer)
    tok = tiny.tokenizer
    ctx = "The opposite of hot is"
    ids = tok.encode(ctx, add_special_tokens=False)
    logits = scorer.forward(scorer.new_session(), torch.tensor(ids))
    best = int(logits[-1].argmax())
    cont = tok.decode([best])
    (ll, greedy), (ll2, greedy2) = lm.loglikelihood([_Req(ctx, cont), _Req(ctx + " ", cont.lstrip() or cont)])
    want = torch.log_softmax(logits[-1].double(), -1)[best].item()
    assert greedy and ll == pytest.approx(want, abs=1e-6)
    # a trailing space of the context moves to the continuation (as lm-eval's HF model does)
    if cont.startswith(" ") and len(cont) > 1:
        assert (ll2, greedy2) == pytest.approx((ll, greedy))
    # a continuation that is not the greedy token
    other = (best + 1) % logits.shape[-1]
    ll3, g3 = lm._score(ids, [other])
    assert not g3 and ll3 == pytest.approx(torch.log_softmax(logits[-1].double(), -1)[other].item(), abs=1e-6)
    # several continuation tokens: the sum over the positions after the context
    two = tok.encode(" cold water", add_special_tokens=False)
    full = torch.log_softmax(scorer.forward(scorer.new_session(), torch.tensor(ids + two[:-1])).double(), -1)
    want2 = sum(full[len(ids) - 1 + i, t].item() for i, t in enumerate(two))
    assert lm._score(ids, two)[0] == pytest.approx(want2, abs=1e-6)


def test_generate_until_stops_at_the_stop_string(tiny):
    lm = _lm_class()(_fp_scorer(tiny), tiny.tokenizer)
    full, = lm.generate_until([_Req("Question: two plus two?\nAnswer:", {"until": [], "max_gen_toks": 6})])
    cut, = lm.generate_until([_Req("Question: two plus two?\nAnswer:", {"until": [full[2:4]], "max_gen_toks": 6})])
    assert full and cut == full.split(full[2:4])[0]
    with pytest.raises(AccllmError, match="greedily"):
        lm.generate_until([_Req("x", {"do_sample": True})])


def _cli(*argv):
    return subprocess.run([sys.executable, "-m", "host.cli", "eval", *argv], capture_output=True, text=True,
                          cwd=REPO, timeout=600)


def test_cli_tasks_json():
    r = _cli("--model", "tiny", "--tasks", "local", "--limit", "4", "--json", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)                   # stdout is the one document
    assert list(doc["tasks"]) == list(LOCAL_TASKS) and doc["limit"] == 4 and doc["recipe"]["name"] == "fp"
    for name, res in doc["tasks"].items():
        assert res["n"] == 4 and 0 <= res["acc"] <= 1 and res["acc_stderr"] is not None
        assert ("acc_norm" in res) == (name != "pydoc_cloze")


@pytest.mark.parametrize("argv, words", [
    (["--tasks", "trivia"], "unknown task 'trivia'"),
    (["--tasks", "capitals", "--data", "pydoc"], "--tasks and --data are separate runs"),
    (["--tasks", "capitals", "--limit", "0"], "--limit takes a positive number"),
    (["--limit", "3"], "--limit applies to --tasks only"),
    (["--tasks", "capitals", "--stream"], "perplexity options"),
])
def test_cli_tasks_bad_input_is_one_line(argv, words, capsys, monkeypatch):
    import algo.models
    from host import cli
    monkeypatch.setattr(algo.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli.main(["eval", "--model", "tiny", *argv]) == 2
    assert words in capsys.readouterr().err
