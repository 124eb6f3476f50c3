"""Task accuracy through lm-evaluation-harness, scored by accllm's own scorers.

lm-eval's Hugging Face model class calls a model without accllm's KV cache, so Λ-shaped attention,
SpAtten and the accelerator's functional model would not apply. :class:`ScorerLM` is an lm-eval ``LM``
over a :class:`algo.eval.Scorer` instead: every request is scored in a fresh session of that scorer
(the float or fake-quant torch model with the recipe's cache, or a device through host/runtime.py),
so a task's accuracy is measured on exactly what the perplexities measure.

Local tasks (:data:`LOCAL_TASKS`; nothing is downloaded; ``local`` names all of them):

* ``capitals``: 4-way multiple choice, "What is the capital of X?" for the countries of
  :data:`CAPITALS`; the three wrong choices are other capitals of the table (seeded, fixed order).
* ``antonyms``: 4-way multiple choice, "The opposite of X is" for the pairs of :data:`ANTONYMS`.
* ``pydoc_cloze``: last-word prediction in the style of LAMBADA over sentences of the ``pydoc``
  evaluation text (algo/data.py, built from the running Python): accuracy is the fraction of
  sentences whose last word is the model's greedy continuation, token by token.

Metrics: ``acc`` for every task (with lm-eval's standard error), ``acc_norm`` (log-likelihood per
byte of the choice) for the multiple-choice ones.
"""
from __future__ import annotations

import os
import random
import re

import torch

from .common import AccllmError

# country -> capital (a fixed table: the task's data ships with the code)
CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("Russia", "Moscow"),
    ("Egypt", "Cairo"), ("Greece", "Athens"), ("Austria", "Vienna"), ("Poland", "Warsaw"),
    ("Hungary", "Budapest"), ("Sweden", "Stockholm"), ("Norway", "Oslo"), ("Denmark", "Copenhagen"),
    ("Finland", "Helsinki"), ("Ireland", "Dublin"), ("Belgium", "Brussels"), ("the Netherlands", "Amsterdam"),
    ("Czechia", "Prague"), ("Turkey", "Ankara"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"),
    ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Colombia", "Bogota"),
    ("Kenya", "Nairobi"), ("Ethiopia", "Addis Ababa"), ("Nigeria", "Abuja"), ("Morocco", "Rabat"),
    ("India", "New Delhi"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("South Korea", "Seoul"),
    ("Indonesia", "Jakarta"), ("the Philippines", "Manila"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
    ("Australia", "Canberra"), ("New Zealand", "Wellington"), ("Cuba", "Havana"), ("Brazil", "Brasilia"),
    ("Switzerland", "Bern"), ("Ukraine", "Kyiv"), ("Romania", "Bucharest"), ("Bulgaria", "Sofia"),
)
# word -> its opposite
ANTONYMS = (
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
    ("light", "dark"), ("open", "closed"), ("early", "late"), ("strong", "weak"), ("rich", "poor"),
    ("old", "young"), ("hard", "soft"), ("wet", "dry"), ("full", "empty"), ("high", "low"),
    ("thick", "thin"), ("loud", "quiet"), ("clean", "dirty"), ("true", "false"), ("win", "lose"),
    ("buy", "sell"), ("push", "pull"), ("begin", "end"), ("inside", "outside"), ("asleep", "awake"),
    ("long", "short"), ("cheap", "expensive"), ("friend", "enemy"), ("day", "night"), ("north", "south"),
    ("left", "right"), ("good", "bad"), ("love", "hate"), ("always", "never"), ("first", "last"),
    ("near", "far"), ("safe", "dangerous"), ("alive", "dead"), ("sweet", "sour"), ("accept", "refuse"),
)
LOCAL_TASKS = ("capitals", "antonyms", "pydoc_cloze")
CLOZE_SENTENCES = 120           # pydoc_cloze: sentences taken, spread evenly over the qualifying ones


def _choices(pairs, i: int, seed: int) -> tuple[list[str], int]:
    """The gold answer of pair *i* and three other answers of the table, in a seeded order."""
    rng = random.Random(seed * 1000 + i)
    others = sorted({b for j, (_a, b) in enumerate(pairs) if j != i and b != pairs[i][1]})
    ch = rng.sample(others, 3) + [pairs[i][1]]
    rng.shuffle(ch)
    return ch, ch.index(pairs[i][1])


def capitals_docs() -> list[dict]:
    return [{"query": f"Question: What is the capital of {c}?\nAnswer:", "choices": ch, "gold": g}
            for i, (c, _cap) in enumerate(CAPITALS) for ch, g in [_choices(CAPITALS, i, 1)]]


def antonyms_docs() -> list[dict]:
    return [{"query": f"The opposite of {w} is", "choices": ch, "gold": g}
            for i, (w, _o) in enumerate(ANTONYMS) for ch, g in [_choices(ANTONYMS, i, 2)]]


def pydoc_cloze_docs(n: int = CLOZE_SENTENCES) -> list[dict]:
    """Sentences of the pydoc evaluation text (one line of prose each, 12..40 words, ending in a
    plain word of at least 4 letters and a full stop): context = all but the last word."""
    from .data import read_text
    text = read_text("pydoc")
    found = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.splitlines()
        if not lines or any(l.startswith((" ", "\t", ">>>")) for l in lines):   # code, tables, examples
            continue
        flat = " ".join(l.strip() for l in lines)
        for s in re.split(r"(?<=\.)\s+(?=[A-Z])", flat):
            words = s.split()
            if not 12 <= len(words) <= 40 or not re.fullmatch(r"[a-z]{4,}\.", words[-1]):
                continue
            if not re.fullmatch(r"[A-Za-z0-9 ,;:'()\-.]+", s):
                continue
            found.append({"context": " ".join(words[:-1]), "target": " " + words[-1][:-1]})
    if len(found) < n:
        raise AccllmError(f"pydoc_cloze: the pydoc text of this Python has {len(found)} usable sentences, "
                          f"fewer than {n}")
    step = len(found) / n
    return [found[int(i * step)] for i in range(n)]


def _mc_config(name: str, docs_fn) -> dict:
    from datasets import Dataset
    return {"task": name, "output_type": "multiple_choice", "test_split": "test",
            "custom_dataset": lambda **_kw: {"test": Dataset.from_list(docs_fn())},
            "doc_to_text": "{{query}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}",
            "target_delimiter": " ",          # each choice is scored as " " + choice after the query
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0}}


def task_configs(names: list[str]) -> list[dict]:
    """lm-eval task configurations (dicts) of the local tasks *names*."""
    from datasets import Dataset
    out = []
    for n in names:
        if n == "capitals":
            out.append(_mc_config(n, capitals_docs))
        elif n == "antonyms":
            out.append(_mc_config(n, antonyms_docs))
        elif n == "pydoc_cloze":                 # the target carries its leading space
            out.append({"task": n, "output_type": "loglikelihood", "test_split": "test",
                        "custom_dataset": lambda **_kw: {"test": Dataset.from_list(pydoc_cloze_docs())},
                        "doc_to_text": "{{context}}", "doc_to_target": "{{target}}",
                        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
                        "metadata": {"version": 1.0}})
        else:
            raise AccllmError(f"unknown task {n!r}; accepted: {', '.join(LOCAL_TASKS)}")
    return out


def parse_tasks(spec: str) -> list[str]:
    """``NAME[,NAME]`` of :data:`LOCAL_TASKS` (``local``: all of them), in the order given, no repeats."""
    names = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        for n in (LOCAL_TASKS if part == "local" else (part,)):
            if n not in LOCAL_TASKS:
                raise AccllmError(f"unknown task {n!r}; accepted: local (all), {', '.join(LOCAL_TASKS)}")
            if n not in names:
                names.append(n)
    if not names:
        raise AccllmError(f"--tasks names no task; accepted: local (all), {', '.join(LOCAL_TASKS)}")
    return names


def _lm_class():
    """ScorerLM, defined on first use (lm-eval is imported only when a task is evaluated)."""
    global ScorerLM
    if "ScorerLM" in globals():
        return ScorerLM
    from lm_eval.api.model import LM

    class _ScorerLM(LM):
        """An lm-eval model over an accllm Scorer (see the module doc). *max_length*: the longest
        sequence a request may hand the scorer (the context is cut on the left, as lm-eval's HF model
        does); *progress*: a tqdm bar over requests on stderr."""

        def __init__(self, scorer, tokenizer, max_length: int = 2048, progress: bool = False):
            super().__init__()
            self.scorer, self.tok, self.max_length, self.progress = scorer, tokenizer, max_length, progress
            self.requests_scored = 0

        def _enc(self, text: str) -> list[int]:
            return self.tok.encode(text, add_special_tokens=False)

        def _prefix(self) -> list[int]:
            t = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id
            if t is None:
                raise AccllmError("the tokenizer has neither a BOS nor an EOS token to score a request "
                                  "with an empty context")
            return [t]

        def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            # as lm-eval's HF model: trailing spaces of the context move to the continuation, and the
            # continuation's tokens are those of the whole string after the context's
            n = len(context) - len(context.rstrip())
            if n:
                context, continuation = context[:-n], context[-n:] + continuation
            whole = self._enc(context + continuation)
            ctx = self._enc(context)
            if whole[:len(ctx)] != ctx:           # the tokenization merged across the boundary
                return ctx, self._enc(continuation)
            return ctx, whole[len(ctx):]

        def _logprobs(self, ids: list[int]) -> torch.Tensor:
            """log-softmax of the scorer's next-token logits after each of ids[:-1] (a fresh session)."""
            session = self.scorer.new_session()
            logits = self.scorer.forward(session, torch.tensor(ids[:-1], dtype=torch.long))
            return torch.log_softmax(logits.double(), dim=-1)

        def _score(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
            if not cont:
                raise AccllmError("an lm-eval request has an empty continuation")
            ctx = ctx or self._prefix()
            ids = (ctx + cont)[-(self.max_length + 1):]
            lp = self._logprobs(ids)[-len(cont):]
            target = torch.tensor(cont, dtype=torch.long)
            ll = lp.gather(1, target[:, None]).sum().item()
            greedy = bool((lp.argmax(-1) == target).all())
            self.requests_scored += 1
            return ll, greedy

        def _bar(self, reqs, desc):
            from tqdm import tqdm
            return tqdm(reqs, desc=desc, disable=not self.progress, file=__import__("sys").stderr)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return [self._score(*self._encode_pair(*r.args)) for r in self._bar(requests, "loglikelihood")]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
            out = []
            for r in self._bar(requests, "rolling loglikelihood"):
                toks = self._enc(r.args[0])
                total = 0.0
                for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                        token_list=toks, prefix_token=self._prefix()[0], max_seq_len=self.max_length,
                        context_len=1)):
                    total += self._score(list(ctx), list(cont))[0]
                out.append(total)
            return out

        def generate_until(self, requests, disable_tqdm: bool = False):
            out = []
            for r in self._bar(requests, "generate"):
                context, kw = r.args
                until = kw.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                if kw.get("do_sample"):
                    raise AccllmError("local tasks decode greedily; do_sample is not supported")
                max_new = int(kw.get("max_gen_toks", 64))
                ids = (self._enc(context) or self._prefix())[-self.max_length:]
                session = self.scorer.new_session()
                logits = self.scorer.forward(session, torch.tensor(ids, dtype=torch.long))
                new: list[int] = []
                text = ""
                for _ in range(max_new):
                    t = int(logits[-1].argmax())
                    if t == self.tok.eos_token_id:
                        break
                    new.append(t)
                    text = self.tok.decode(new)
                    if any(u in text for u in until):
                        break
                    logits = self.scorer.forward(session, torch.tensor([t], dtype=torch.long))
                for u in until:
                    text = text.split(u)[0]
                out.append(text)
            return out

    ScorerLM = _ScorerLM
    return ScorerLM


def evaluate_tasks(scorer, tokenizer, names: list[str], limit: int | None = None, max_length: int = 2048,
                   progress: bool = False) -> dict:
    """Run the local tasks *names* (see :func:`parse_tasks`) with lm-eval on *scorer*; return
    ``{name: {"acc", "acc_stderr", ["acc_norm", "acc_norm_stderr"], "n"}}`` in the order given.
    *limit*: at most this many documents per task (the first ones)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")           # local data only: never the network
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise AccllmError(f"task accuracy needs lm-evaluation-harness (lm-eval), not importable here ({e}); "
                          "run `make venv`") from None
    import logging
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    lm = _lm_class()(scorer, tokenizer, max_length=max_length, progress=progress)
    res = lm_eval.simple_evaluate(model=lm, tasks=task_configs(names), task_manager=TaskManager(include_defaults=False),
                                  limit=limit, log_samples=False, bootstrap_iters=1000, verbosity="ERROR")
    out = {}
    for n in names:
        r = res["results"][n]
        d = {}
        for m in ("acc", "acc_norm"):
            if f"{m},none" in r:
                d[m] = float(r[f"{m},none"])
                se = r.get(f"{m}_stderr,none")
                d[f"{m}_stderr"] = float(se) if isinstance(se, (int, float)) else None
        d["n"] = int(res.get("n-samples", {}).get(n, {}).get("effective", 0)) or None
        out[n] = d
    return out
