"""Evaluation: accuracy on the new task and retention of prior skills (forgetting).

SDFT exists to learn a new task without forgetting old ones, so a run is judged on two kinds of
eval sets, generated greedily with the same prompt rendering as training:

- `new_task`: the data's held-out split (answer = the answer column, else the demonstration);
- one set per `eval.probes` entry: prior skills whose accuracy should not drop.

Each completion is scored by a scorer named in the recipe (`exact`, `normalized`, `contains`,
`regex`, `numeric`) or by a user function `module:function`. A user scorer is imported and run
as ordinary Python: it runs your code, with your permissions.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import math
import re
import string
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .config import SCORERS, EvalConfig, GenerationConfig, ProbeConfig, RecipeError
from .data import COLUMN_ALIASES, MAX_LISTED, BadRow, DataError, Example, parse_prompt, parse_text, read_table
from .prompts import PromptEncoder, left_pad
from .rollout import generate_rollouts

log = logging.getLogger(__name__)

Scorer = Callable[[str, str, dict], float]
NEW_TASK = "new_task"
NUM_EXAMPLES = 5  # completions kept per set in the results, enough to eyeball what the scorer sees
HELPS_GAP = 0.10  # teacher 10 points above student: a signal worth distilling (smaller is mostly noise)
ADVICE = "try a larger/instruction-tuned model, a different data.teacher_template, or method: sft"

# --------------------------------------------------------------------------- scorers

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# Last number: optional minus (not a hyphen between digits: "5-3" ends in 3), thousands commas, decimals.
_NUMBER = re.compile(r"(?<![\d.])-?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lowercase, drop punctuation, drop articles, collapse spaces."""
    text = "".join(c for c in text.lower() if c not in _PUNCT and not unicodedata.category(c).startswith("P"))
    return " ".join(_ARTICLES.sub(" ", text).split())


def _exact(completion: str, answer: str, example: dict) -> float:
    return float(completion.strip() == answer.strip())


def _normalized(completion: str, answer: str, example: dict) -> float:
    return float(normalize(completion) == normalize(answer))


def _contains(completion: str, answer: str, example: dict) -> float:
    want, got = normalize(answer), normalize(completion)
    if not want:  # an answer that normalises away ("the", ".") would be found in everything
        return float(not got)
    return float(f" {want} " in f" {got} ")  # whole words: "cat" is not in "concatenate"


def _regex(completion: str, answer: str, example: dict) -> float:
    return float(re.search(answer, completion) is not None)  # re.error is reported by score_completions


def _numeric(completion: str, answer: str, example: dict) -> float:
    try:
        want = float(answer.strip().replace(",", ""))
    except ValueError:
        return 0.0
    found = _NUMBER.findall(completion.replace("\u2212", "-"))  # U+2212 is the typographic minus
    if not found:
        return 0.0
    return float(math.isclose(float(found[-1].replace(",", "")), want, rel_tol=1e-6, abs_tol=1e-6))


BUILTIN: dict[str, Scorer] = {
    "exact": _exact,
    "normalized": _normalized,
    "contains": _contains,
    "regex": _regex,
    "numeric": _numeric,
}


def _as_unit(value, name: str, row) -> float:
    if isinstance(value, bool):
        return float(value)
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise RecipeError(
            [
                f"scorer '{name}' returned {type(value).__name__} on row {row}: "
                "return a bool or a number between 0 and 1"
            ]
        ) from None
    return 0.0 if math.isnan(x) else min(1.0, max(0.0, x))


def _user_scorer(name: str, key: str) -> Scorer:
    module_name, _, fn_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the module raises while importing
        raise RecipeError(
            [
                f"{key}: cannot import module '{module_name}' for scorer '{name}' "
                f"({type(e).__name__}: {e}); put its folder on PYTHONPATH or install it"
            ]
        ) from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise RecipeError([f"{key}: module '{module_name}' has no function '{fn_name}' (scorer '{name}')"])

    def score(completion: str, answer: str, example: dict) -> float:
        try:
            value = fn(completion, answer, example)
        except Exception as e:
            raise RecipeError(
                [f"scorer '{name}' raised {type(e).__name__} on row {example.get('row')}: {e}"]
            ) from e
        return _as_unit(value, name, example.get("row"))

    return score


def get_scorer(name: str, key: str = "eval.scorer") -> Scorer:
    """A built-in scorer, or `module:function` imported now (this runs the user's code)."""
    if name in BUILTIN:
        return BUILTIN[name]
    if re.fullmatch(r"[\w.]+:\w+", name):
        return _user_scorer(name, key)
    raise RecipeError([f"{key}: '{name}' is not one of {', '.join(SCORERS)} or 'module:function'"])


def _compile_extract(extract: str | None) -> re.Pattern | None:
    try:
        return re.compile(extract) if extract else None
    except re.error as e:
        raise RecipeError([f"eval.extract: {extract!r} is not a valid regular expression ({e})"]) from None


def extract_answer(pattern: re.Pattern | None, completion: str) -> str:
    """The part of the completion that is scored: first group if the regex has one, else the match."""
    if pattern is None:
        return completion
    m = pattern.search(completion)
    if m is None:
        return ""
    return (m.group(1) or "") if pattern.groups else m.group(0)


def score_completions(
    completions: Sequence[str],
    answers: Sequence[str],
    scorer: str,
    extract: str | None,
    examples: list[dict] | None = None,
) -> list[float]:
    """Score each completion against its answer; `examples` are passed to user scorers (with 'row')."""
    if len(completions) != len(answers) or (examples is not None and len(examples) != len(answers)):
        raise ValueError("completions, answers and examples must have the same length")
    fn, pattern = get_scorer(scorer), _compile_extract(extract)
    scores = []
    for i, (completion, answer) in enumerate(zip(completions, answers, strict=True)):
        example = {"row": i + 1, **(examples[i] if examples is not None else {})}
        try:
            scores.append(fn(extract_answer(pattern, completion), answer, example))
        except re.error as e:
            if fn is not _regex:
                raise
            raise DataError(
                f"row {example['row']}: the answer {answer!r} is not a valid regular expression "
                f"({e}); scorer 'regex' reads each answer as a pattern: fix it or pick another scorer"
            ) from None
    return scores


# --------------------------------------------------------------------------- eval sets


@dataclass
class EvalSet:
    name: str
    prompts: list[str | list[dict]]
    answers: list[str]
    demonstrations: list[str] | None  # None for probes: they have no teacher prompt
    rows: list[int]  # 1-based row numbers in the source, for error messages
    scorer: str
    records: list[dict] | None = None  # what a user scorer receives as `example` (probes: the whole row)


def _limit(*limits: int | None) -> int | None:
    given = [n for n in limits if n is not None]
    return min(given) if given else None


def new_task_set(examples: list[Example], cfg: EvalConfig) -> EvalSet:
    examples = examples[: cfg.limit]
    answers = [e.answer if e.answer is not None else e.demonstration for e in examples]
    records = [
        {"row": e.row, "prompt": e.prompt, "demonstration": e.demonstration, "answer": a}
        for e, a in zip(examples, answers, strict=True)
    ]
    return EvalSet(
        NEW_TASK,
        [e.prompt for e in examples],
        answers,
        [e.demonstration for e in examples],
        [e.row for e in examples],
        cfg.scorer,
        records,
    )


def _check_probe_columns(rows: list[dict], probe: ProbeConfig, key: str) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    problems = []
    for field in ("prompt_column", "answer_column"):
        name = getattr(probe, field)
        if name not in columns:
            # A near spelling, else a usual name for the same thing ("question", "label", ...).
            close = difflib.get_close_matches(name, columns, n=1, cutoff=0.6)
            close = close or [c for c in COLUMN_ALIASES[f"data.{field}"] if c in columns][:1]
            hint = f"did you mean '{close[0]}'? " if close else ""
            problems.append(
                f"no column '{name}' ({key}.{field}): {hint}set {key}.{field} to the column that holds it"
            )
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise DataError(
            f"{key} {probe.source}:\n{lines}\n  the file has columns: {', '.join(map(str, columns))}"
        )


def probe_set(probe: ProbeConfig, index: int, cfg: EvalConfig) -> EvalSet:
    key = f"eval.probes[{index}]"
    try:
        rows = read_table(probe.source, probe.split)
    except DataError as e:
        raise DataError(f"{key}.source: {e}") from None
    rows = rows[: _limit(probe.limit, cfg.limit)]  # before checking: rows past the limit are never used
    _check_probe_columns(rows, probe, key)
    good, bad = [], []
    for n, rec in enumerate(rows, 1):
        try:
            prompt = parse_prompt(rec.get(probe.prompt_column), probe.prompt_column)
            answer = parse_text(rec.get(probe.answer_column), probe.answer_column, required=True)
            good.append((n, prompt, answer))
        except BadRow as e:
            bad.append(f"  - row {n}: {e}")
    if bad:
        more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise DataError(
            f"{key} {probe.source}: {len(bad)} of {len(rows)} rows are bad:\n"
            + "\n".join(bad[:MAX_LISTED])
            + more
            + "\nFix these rows or the probe's columns"
        )
    records = [{**rows[n - 1], "row": n} for n, _, _ in good]
    return EvalSet(
        probe.name,
        [p for _, p, _ in good],
        [a for _, _, a in good],
        None,
        [n for n, _, _ in good],
        probe.scorer or cfg.scorer,
        records,
    )


def eval_sets_from_recipe(recipe, eval_examples: list[Example]) -> list[EvalSet]:
    """The new-task set (when there is eval data) and one set per probe; scorers are checked now."""
    cfg: EvalConfig = recipe.eval
    sets = [new_task_set(eval_examples, cfg)] if eval_examples else []
    sets += [probe_set(p, i, cfg) for i, p in enumerate(cfg.probes)]
    seen = {NEW_TASK} if eval_examples else set()
    for i, probe in enumerate(cfg.probes):
        if probe.name in seen:
            raise RecipeError(
                [f"eval.probes[{i}].name: '{probe.name}' is already used: give each probe its own name"]
            )
        seen.add(probe.name)
        if probe.scorer:
            get_scorer(probe.scorer, f"eval.probes[{i}].scorer")
    get_scorer(cfg.scorer)  # fail before any model is loaded, not after training
    _compile_extract(cfg.extract)
    return sets


# --------------------------------------------------------------------------- generation


def _decode(tokenizer, rollout) -> list[str]:
    texts = []
    for ids, n, clipped in zip(
        rollout.completion_ids.tolist(), rollout.lengths.tolist(), rollout.clipped.tolist(), strict=True
    ):
        # `lengths` counts the EOS token: drop it even when the tokenizer does not mark it special.
        texts.append(tokenizer.decode(ids[: n if clipped else n - 1], skip_special_tokens=True))
    return texts


def generate_answers(
    model,
    tokenizer,
    encoder: PromptEncoder,
    prompts: Sequence[str | list[dict]],
    *,
    max_new_tokens: int,
    batch_size: int,
    eos_ids: list[int],
    pad_id: int,
    demonstrations: Sequence[str] | None = None,
) -> list[str]:
    """Greedy completions, batched and left-padded. With `demonstrations`, from the teacher prompt."""
    if demonstrations is not None and len(demonstrations) != len(prompts):
        raise ValueError("demonstrations must have one entry per prompt")
    device = next(model.parameters()).device
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens)
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        idx = range(start, min(start + batch_size, len(prompts)))
        if demonstrations is None:
            seqs = [encoder.student_ids(prompts[i]) for i in idx]
        else:
            seqs = [encoder.teacher_ids(prompts[i], demonstrations[i])[0] for i in idx]
        ids, mask = left_pad(seqs, pad_id)
        rollout = generate_rollouts(
            model, ids.to(device), mask.to(device), gen_cfg, eos_ids, pad_id, greedy=True
        )
        out += _decode(tokenizer, rollout)
    return out


# --------------------------------------------------------------------------- evaluation


def evaluate(
    model,
    tokenizer,
    encoder: PromptEncoder,
    sets: list[EvalSet],
    *,
    eos_ids: list[int],
    pad_id: int,
    cfg: EvalConfig,
    as_teacher: bool = False,
) -> dict:
    """Greedy accuracy per set: {set: {accuracy, n, seconds, examples (first 5)}}.

    `as_teacher` generates from the teacher prompt (question + demonstration); sets without
    demonstrations (probes) are then skipped. Works on a plain model or a PeftModel; for the base
    model of a PeftModel, call it inside `with model.disable_adapter():`.
    """
    results = {}
    for s in sets:
        if as_teacher and s.demonstrations is None:
            continue  # a probe has no demonstration, so there is no teacher prompt to measure
        t0 = time.perf_counter()
        completions = generate_answers(
            model,
            tokenizer,
            encoder,
            s.prompts,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.batch_size,
            eos_ids=eos_ids,
            pad_id=pad_id,
            demonstrations=s.demonstrations if as_teacher else None,
        )
        records = s.records if s.records is not None else [{"row": r} for r in s.rows]
        try:
            scores = score_completions(completions, s.answers, s.scorer, cfg.extract, records)
        except DataError as e:
            raise DataError(f"eval set '{s.name}': {e}") from None
        shown = list(zip(s.prompts, completions, s.answers, scores, strict=True))[:NUM_EXAMPLES]
        results[s.name] = {
            "accuracy": sum(scores) / len(scores) if scores else 0.0,
            "n": len(scores),
            "seconds": round(time.perf_counter() - t0, 3),
            "examples": [{"prompt": p, "completion": c, "answer": a, "score": sc} for p, c, a, sc in shown],
        }
        log.info(
            "eval %s%s: %.1f%% of %d",
            s.name,
            " (teacher prompt)" if as_teacher else "",
            100 * results[s.name]["accuracy"],
            len(scores),
        )
    return results


def verdict(student: float, teacher: float) -> str:
    """One plain sentence: can SDFT learn here, judged by what the demonstration in context adds."""
    gap = teacher - student
    points = f"teacher {teacher:.0%} vs student {student:.0%}"
    if gap >= HELPS_GAP:
        return f"the demonstration helps ({points}): SDFT has a teacher signal"
    if student >= 0.9:
        return f"the model already answers these rows without the demonstration ({points}): little is left to learn"
    if gap > 0:
        return f"the demonstration helps only a little ({points}): SDFT's teacher signal is weak; {ADVICE}"
    return (
        f"the demonstration in context does not help this model on this data ({points}): "
        f"SDFT is unlikely to learn; {ADVICE}"
    )


def teacher_student_check(
    model,
    tokenizer,
    encoder: PromptEncoder,
    examples: list[Example],
    *,
    eos_ids: list[int],
    pad_id: int,
    cfg: EvalConfig,
    limit: int = 64,
) -> dict:
    """Student (plain prompt) vs teacher (prompt + demonstration) accuracy on training rows."""
    rows = examples[:limit]
    if not rows:
        return {"student": 0.0, "teacher": 0.0, "n": 0, "gap": 0.0, "verdict": "no training rows to check"}
    s = new_task_set(rows, cfg.model_copy(update={"limit": None}))
    kw = dict(eos_ids=eos_ids, pad_id=pad_id, cfg=cfg)
    student = evaluate(model, tokenizer, encoder, [s], **kw)[s.name]["accuracy"]
    teacher = evaluate(model, tokenizer, encoder, [s], as_teacher=True, **kw)[s.name]["accuracy"]
    return {
        "student": student,
        "teacher": teacher,
        "n": len(rows),
        "gap": teacher - student,
        "verdict": verdict(student, teacher),
    }


def format_table(results_by_label: dict[str, dict]) -> str:
    """Accuracy (%) per eval set (columns) for each label such as 'before' / 'after' (rows)."""
    names = list(dict.fromkeys(n for res in results_by_label.values() for n in res))
    sizes = {n: next(res[n]["n"] for res in results_by_label.values() if n in res) for n in names}
    header = ["", *(f"{n} (n={sizes[n]})" for n in names)]
    body = [
        [label, *(f"{100 * res[n]['accuracy']:.1f}%" if n in res else "-" for n in names)]
        for label, res in results_by_label.items()
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:  # labels left-aligned, numbers right-aligned
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, body)])
