"""Synthetic tasks for the demo: prior skills, the new skill, and the demo data files.

Pure Python (no torch), seeded, so `python -m sdft_lite.demo data` rewrites byte-identical
JSONL files. Words are pronounceable pseudo-words ("bakore", "timu"): readable in a demo,
and unlimited, so the model has to learn each skill rather than memorise a word list.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TEACHER_TEMPLATE = (
    "{prompt}\n\n"
    "This is an example for a response to the question:\n"
    "{demonstration}\n\n"
    "Now answer with a response of your own, including the thinking process."
)

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"


def pseudo_word(rng: random.Random, min_len: int = 3, max_len: int = 8) -> str:
    """A lowercase consonant-vowel word of `min_len`..`max_len` letters."""
    n = rng.randint(min_len, max_len)
    start = rng.randrange(2)  # half the words start with a vowel
    return "".join(rng.choice(VOWELS if (i + start) % 2 else CONSONANTS) for i in range(n))


@dataclass(frozen=True)
class Skill:
    """A task: instruction phrasings and a function from an argument to the answer."""

    name: str
    phrasings: tuple[str, ...]  # format strings with {x}
    answer: Callable[[str], str]
    argument: Callable[[random.Random], str]
    # Whether probe prompts are kept out of pretraining. True for word skills (unlimited
    # arguments: the probe checks the skill). False for `add`: single-digit sums are a table
    # of 100 facts the model memorises (it does not learn to add unseen pairs), so its probe
    # checks that the pretrained facts are still remembered.
    hold_out: bool = True

    def example(self, rng: random.Random) -> dict:
        x = self.argument(rng)
        answer = self.answer(x)
        prompt = rng.choice(self.phrasings).format(x=x)
        return {"prompt": prompt, "demonstration": answer, "answer": answer}


def _sum_argument(rng: random.Random) -> str:
    return f"{rng.randint(0, 9)}+{rng.randint(0, 9)}"


def _sum_answer(x: str) -> str:
    a, b = x.split("+")
    return str(int(a) + int(b))


# Skills the demo model knows before fine-tuning; forgetting is measured on these.
PRIOR_SKILLS = {
    "copy": Skill("copy", ("Copy this word: {x}", "Write the word {x} exactly."), lambda w: w, pseudo_word),
    "reverse": Skill(
        "reverse", ("Reverse this word: {x}", "Spell {x} backwards."), lambda w: w[::-1], pseudo_word
    ),
    "upper": Skill(
        "upper", ("Uppercase this word: {x}", "Write {x} in capital letters."), str.upper, pseudo_word
    ),
    "add": Skill(
        "add", ("Add these numbers: {x}", "What is {x}?"), _sum_answer, _sum_argument, hold_out=False
    ),
}

# The skill SDFT should teach. Its instruction never appears in pretraining, so the
# plain-prompt student cannot do it, while the teacher can copy the demonstration.
NEW_SKILL = Skill("say_twice", ("Say this word twice: {x}",), lambda w: f"{w} {w}", pseudo_word)

# Instructions for "unseen-style" teacher-format pretraining examples. Their answers are
# unrelated to the instruction, so the only way to get them right is to copy the
# demonstration: this is what makes the teacher good at tasks it was never taught.
# None of them mentions saying or repeating a word twice.
_OTHER_INSTRUCTIONS = (
    "Encode this word: {x}",
    "Translate {x} into the secret language.",
    "Give the code name for {x}.",
    "Scramble this word: {x}",
    "What is the password for {x}?",
    "Name a city that rhymes with {x}.",
    "Make up a label for {x}.",
    "Compute the checksum of {x}.",
    "Rotate the letters of {x}.",
    "Shuffle this word: {x}",
    "Answer the riddle about {x}.",
    "Convert {x} to the new format.",
    "Solve the puzzle: {x}",
    "Mirror and mix {x}.",
)


def _random_answer(rng: random.Random) -> str:
    """An arbitrary short answer: words, digits and capitals, up to ~24 characters."""
    kind = rng.randrange(4)
    if kind == 0:
        return pseudo_word(rng, 1, 10)
    if kind == 1:
        words = [pseudo_word(rng, 2, 7) for _ in range(rng.randint(2, 3))]
        if len(set(words)) < len(words):  # never a repeated word: that is the new skill
            words = words[:1]
        return " ".join(words)
    if kind == 2:
        return str(rng.randint(0, 9999))
    return pseudo_word(rng, 2, 6).upper() + rng.choice(["-", " ", ""]) + str(rng.randint(0, 99))


def other_task_example(rng: random.Random) -> dict:
    """A teacher-format-only example of an unseen task with an arbitrary answer."""
    prompt = rng.choice(_OTHER_INSTRUCTIONS).format(x=pseudo_word(rng))
    answer = _random_answer(rng)
    return {"prompt": prompt, "demonstration": answer, "answer": answer}


def teacher_prompt(row: dict) -> str:
    """The paper's teacher prompt for a data row."""
    return TEACHER_TEMPLATE.format(prompt=row["prompt"], demonstration=row["demonstration"])


def _unique_examples(skill: Skill, n: int, rng: random.Random, taken: set[str]) -> list[dict]:
    """`n` examples whose prompts are not in `taken` (which is updated)."""
    rows = []
    for _ in range(100 * n):
        if len(rows) == n:
            break
        row = skill.example(rng)
        if row["prompt"] not in taken:
            taken.add(row["prompt"])
            rows.append(row)
    return rows


def make_data_files(seed: int = 0, n_train: int = 300, n_eval: int = 100, n_probe: int = 50) -> dict:
    """Build the demo data files' rows, keyed by file name. Prompts never repeat across files."""
    rng = random.Random(seed)
    taken: set[str] = set()
    files = {
        "train.jsonl": _unique_examples(NEW_SKILL, n_train, rng, taken),
        "eval.jsonl": _unique_examples(NEW_SKILL, n_eval, rng, taken),
    }
    for name, skill in PRIOR_SKILLS.items():
        files[f"probe_{name}.jsonl"] = _unique_examples(skill, n_probe, rng, taken)
    return files


def held_out_prompts(files: dict) -> set[str]:
    """Prompts of the data files that pretraining must not see (see `Skill.hold_out`)."""
    keep_in = {f"probe_{name}.jsonl" for name, skill in PRIOR_SKILLS.items() if not skill.hold_out}
    return {row["prompt"] for name, rows in files.items() if name not in keep_in for row in rows}


def write_data_files(data_dir: str | Path, seed: int = 0) -> dict:
    """Write the demo JSONL files into `data_dir`; return their rows keyed by file name."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    files = make_data_files(seed)
    for name, rows in files.items():
        with open(data_dir / name, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return files


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
