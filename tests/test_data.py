"""sdft_lite.data: every supported format loads, and every bad input stops with a message that names
the file, the column, the row(s) and the recipe key to change. Files are written to tmp_path."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sdft_lite.config import DataConfig
from sdft_lite.data import DataError, Example, LoadedData, load_data, read_table

ROWS = [{"prompt": f"question {i}", "demonstration": f"demo {i}", "answer": str(i)} for i in range(1, 6)]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write(path: Path, rows: list[dict], split: str = "train") -> Path:
    """Write rows in the format the path's suffix (or a `saved`/`saved_dict` name) says."""
    import pandas as pd

    if path.suffix == ".jsonl":
        write_jsonl(path, rows)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    elif path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        import datasets

        ds = datasets.Dataset.from_list(rows)
        if path.name == "saved_dict":
            ds = datasets.DatasetDict({split: ds, "other": ds.select([0])})
        ds.save_to_disk(str(path))
    return path


def cfg(source: Path | str, **kw) -> DataConfig:
    return DataConfig(source=str(source), **kw)


def error_of(config: DataConfig) -> str:
    with pytest.raises(DataError) as e:
        load_data(config)
    return str(e.value)


# --------------------------------------------------------------------------- happy paths


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.csv", "d.parquet", "saved", "saved_dict"])
def test_each_format_loads(tmp_path, name):
    data = load_data(cfg(write(tmp_path / name, ROWS), answer_column="answer"))
    assert isinstance(data, LoadedData)
    assert data.train == [Example(i, f"question {i}", f"demo {i}", str(i)) for i in range(1, 6)]
    assert data.eval == [] and data.skipped == []


@pytest.mark.parametrize("wrapper", ["data", "train"])
def test_json_object_with_rows_under_data_or_split(tmp_path, wrapper):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"version": 1, wrapper: ROWS}), encoding="utf-8")
    assert [r["prompt"] for r in read_table(str(path))] == [r["prompt"] for r in ROWS]


def test_json_lines_saved_as_json_still_loads(tmp_path):
    path = write_jsonl(tmp_path / "d.json", ROWS)
    assert len(read_table(str(path))) == 5


def test_datasetdict_split_is_picked(tmp_path):
    path = write(tmp_path / "saved_dict", ROWS, split="test")
    assert len(load_data(cfg(path, split="test")).train) == 5
    assert len(load_data(cfg(path, split="other")).train) == 1


def test_chat_prompts_as_lists_json_strings_and_parquet_structs(tmp_path):
    rows = [{"prompt": CHAT, "demonstration": "4"}]
    for path in (write_jsonl(tmp_path / "c.jsonl", rows), write(tmp_path / "c.parquet", rows)):
        assert load_data(cfg(path)).train[0].prompt == CHAT
    csv_path = tmp_path / "c.csv"
    write(csv_path, [{"prompt": json.dumps(CHAT), "demonstration": "4"}])
    assert load_data(cfg(csv_path)).train[0].prompt == CHAT


def test_text_that_only_looks_like_json_stays_text(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "[1, 2] sum them", "demonstration": "3"}])
    assert load_data(cfg(path)).train[0].prompt == "[1, 2] sum them"


def test_numbers_become_text_and_answer_is_optional(tmp_path):
    rows = [
        {"q": "a", "d": 42, "ans": 3.0},
        {"q": "b", "d": 1.5, "ans": None},
        {"q": "c", "d": "x"},  # answer key absent in this row
        {"q": "d", "d": "y", "ans": True},
    ]
    data = load_data(
        cfg(
            write_jsonl(tmp_path / "d.jsonl", rows),
            prompt_column="q",
            demonstration_column="d",
            answer_column="ans",
        )
    )
    assert [(e.demonstration, e.answer) for e in data.train] == [
        ("42", "3"),
        ("1.5", None),
        ("x", None),
        ("y", "True"),
    ]


def test_csv_cells_are_kept_verbatim(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,demonstration,answer\n"hi, there",007,None\n', encoding="utf-8")
    ex = load_data(cfg(path, answer_column="answer")).train[0]
    assert (ex.prompt, ex.demonstration, ex.answer) == ("hi, there", "007", "None")


# --------------------------------------------------------------------------- unreadable sources


def test_missing_file_names_the_path_and_key(tmp_path):
    msg = error_of(cfg(tmp_path / "nope.jsonl"))
    assert "data.source" in msg and "not found" in msg and str(tmp_path / "nope.jsonl") in msg


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "demonstration": "b"}\n\n{"prompt": "c", \n', encoding="utf-8")
    msg = error_of(cfg(path))
    assert "bad.jsonl" in msg and "line 3" in msg and "not valid JSON" in msg


def test_jsonl_line_that_is_not_an_object(tmp_path):
    msg = error_of(cfg(write_jsonl(tmp_path / "d.jsonl", [ROWS[0], ["a", "b"]])))
    assert "line 2" in msg and "not an object" in msg


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("e.jsonl", ""),
        ("e.jsonl", "\n\n"),
        ("e.json", "[]"),
        ("e.csv", ""),
        ("e.csv", "prompt,demonstration\n"),
    ],
)
def test_empty_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    msg = error_of(cfg(path))
    assert "data.source" in msg and name in msg and "empty" in msg


def test_json_object_without_rows_lists_its_keys(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"rows": ROWS}), encoding="utf-8")
    msg = error_of(cfg(path))
    assert "'data'" in msg and "found keys: rows" in msg


def test_csv_row_with_extra_cells(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,demonstration\na,b\nc,d,e\n", encoding="utf-8")
    msg = error_of(cfg(path))
    assert "d.csv" in msg and "row(s) 2" in msg and "quote" in msg


def test_corrupt_parquet_and_unsupported_type(tmp_path):
    (tmp_path / "d.parquet").write_bytes(b"not parquet at all")
    assert "not readable as Parquet" in error_of(cfg(tmp_path / "d.parquet"))
    (tmp_path / "d.txt").write_text("hello", encoding="utf-8")
    assert "unsupported file type '.txt'" in error_of(cfg(tmp_path / "d.txt"))


def test_folder_that_is_not_a_saved_dataset(tmp_path):
    (tmp_path / "folder").mkdir()
    assert "save_to_disk" in error_of(cfg(tmp_path / "folder"))


def test_unknown_split_in_datasetdict_lists_splits(tmp_path):
    msg = error_of(cfg(write(tmp_path / "saved_dict", ROWS), split="validation"))
    assert "'validation'" in msg and "train, other" in msg and "data.split" in msg


def test_hub_id_offline_fails_fast_with_a_clear_message(monkeypatch):
    """Offline, a Hub id that is not cached fails without trying the network (no wall-clock limit:
    the test must not depend on the machine's load)."""
    import socket

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    attempts = []
    connect = socket.socket.connect

    def record(self, address):
        attempts.append(address)
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", record)
    msg = error_of(cfg("sdft-lite-tests/never-cached-dataset"))
    assert not [a for a in attempts if not (isinstance(a, str) or str(a[0]).startswith(("127.", "::1")))]
    assert "sdft-lite-tests/never-cached-dataset" in msg and "not cached" in msg and "local file" in msg


# --------------------------------------------------------------------------- columns


def test_missing_column_with_did_you_mean(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"promt": "a", "demonstration": "b"}])
    msg = error_of(cfg(path))
    assert "no column 'prompt'" in msg and "did you mean 'promt'" in msg and "set data.prompt_column" in msg
    assert "the file has columns: promt, demonstration" in msg


def test_all_missing_columns_reported_at_once_with_common_names(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "response": "b"}])
    msg = error_of(cfg(path, answer_column="gold"))
    assert "did you mean 'question'" in msg and "did you mean 'response'" in msg
    assert (
        "data.prompt_column" in msg
        and "data.demonstration_column" in msg
        and "no column 'gold' (data.answer_column)" in msg
    )


# --------------------------------------------------------------------------- bad rows


def test_missing_empty_and_blank_demonstrations_are_listed(tmp_path):
    rows = [
        ROWS[0],
        {"prompt": "a", "demonstration": None},
        {"prompt": "b", "demonstration": ""},
        {"prompt": "c", "demonstration": "  \n"},
        {"prompt": "d"},
        {"prompt": "", "demonstration": "x"},
    ]
    msg = error_of(cfg(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert "d.jsonl" in msg and "5 of 6 rows are bad" in msg
    assert (
        "row 2: column 'demonstration' is missing" in msg and "row 3: column 'demonstration' is empty" in msg
    )
    assert (
        "row 4: column 'demonstration' is empty" in msg and "row 5: column 'demonstration' is missing" in msg
    )
    assert "row 6: column 'prompt' is empty" in msg and "row 1:" not in msg
    assert "set data.on_bad_row: skip" in msg


@pytest.mark.parametrize("name", ["d.csv", "d.parquet"])
def test_nan_counts_as_missing(tmp_path, name):
    rows = [ROWS[0], {"prompt": "a", "demonstration": math.nan}, {"prompt": math.nan, "demonstration": "b"}]
    msg = error_of(cfg(write(tmp_path / name, rows)))
    assert "row 2: column 'demonstration'" in msg and "row 3: column 'prompt'" in msg


@pytest.mark.parametrize(
    ("prompt", "reason"),
    [
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "last message must be the user's",
        ),
        ([{"role": "system", "content": "s"}], "last message must be the user's"),
        ([{"role": "tool", "content": "x"}, {"role": "user", "content": "q"}], "message 1 has role 'tool'"),
        ([{"role": "user"}], "message 1 must be an object with 'role' and 'content'"),
        (["just text"], "message 1 must be an object"),
        ([{"role": "user", "content": [{"type": "text"}]}], "message 1 content must be text"),
        ([], "empty list of messages"),
        ({"role": "user", "content": "q"}, "must be text or a list of chat messages, got dict"),
        (7, "must be text or a list of chat messages, got int"),
    ],
)
def test_bad_chat_prompts(tmp_path, prompt, reason):
    msg = error_of(
        cfg(write_jsonl(tmp_path / "d.jsonl", [ROWS[0], {"prompt": prompt, "demonstration": "d"}]))
    )
    assert "row 2: column 'prompt'" in msg and reason in msg


def test_bad_chat_prompt_in_csv_json_string(tmp_path):
    path = tmp_path / "d.csv"
    write(
        path,
        [{"prompt": "fine", "demonstration": "d"}, {"prompt": json.dumps(CHAT[:1]), "demonstration": "d"}],
    )
    assert "row 2: column 'prompt': the last message must be the user's question" in error_of(cfg(path))


def test_skip_drops_and_reports_bad_rows(tmp_path):
    rows = [
        ROWS[0],
        {"prompt": "a", "demonstration": ""},
        ROWS[1],
        {"prompt": [], "demonstration": "x"},
        ROWS[2],
    ]
    data = load_data(cfg(write_jsonl(tmp_path / "d.jsonl", rows), on_bad_row="skip"))
    assert [e.row for e in data.train] == [1, 3, 5]
    assert [(s, r) for s, r, _ in data.skipped] == [("train", 2), ("train", 4)]
    assert "is empty" in data.skipped[0][2]


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path):
    rows = [{"prompt": "a", "demonstration": ""}, {"prompt": "b", "demonstration": None}]
    msg = error_of(cfg(write_jsonl(tmp_path / "d.jsonl", rows), on_bad_row="skip"))
    assert "no usable rows" in msg and "all 2 row(s) are bad" in msg and "row 1:" in msg and "row 2:" in msg


def test_many_bad_rows_are_summarised(tmp_path):
    rows = [ROWS[0]] + [{"prompt": "p", "demonstration": ""}] * 30
    msg = error_of(cfg(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert (
        "30 of 31 rows are bad" in msg
        and "row 21:" in msg
        and "row 22:" not in msg
        and "... and 10 more" in msg
    )


# --------------------------------------------------------------------------- eval split and limit


def test_eval_fraction_is_deterministic_and_disjoint(tmp_path):
    rows = [{"prompt": f"q{i}", "demonstration": f"d{i}"} for i in range(20)]
    config = cfg(write_jsonl(tmp_path / "d.jsonl", rows), eval_fraction=0.25)
    a, b = load_data(config), load_data(config)
    assert a == b and len(a.eval) == 5 and len(a.train) == 15
    train_rows, eval_rows = {e.row for e in a.train}, {e.row for e in a.eval}
    assert not train_rows & eval_rows and train_rows | eval_rows == set(range(1, 21))
    assert [e.row for e in a.eval] == sorted(eval_rows) and eval_rows != set(
        range(16, 21)
    )  # shuffled, order kept


def test_eval_fraction_takes_at_least_one_row_and_leaves_one(tmp_path):
    two = write_jsonl(tmp_path / "two.jsonl", ROWS[:2])
    data = load_data(cfg(two, eval_fraction=0.01))
    assert (len(data.train), len(data.eval)) == (1, 1)
    one = write_jsonl(tmp_path / "one.jsonl", ROWS[:1])
    assert "leaves no training rows" in error_of(cfg(one, eval_fraction=0.5))


def test_eval_source_is_loaded_and_checked_the_same_way(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    eval_rows = [{"prompt": "e1", "demonstration": "x"}, {"prompt": "e2", "demonstration": " "}]
    ev = write_jsonl(tmp_path / "eval.jsonl", eval_rows)
    data = load_data(cfg(train, eval_source=str(ev), on_bad_row="skip"))
    assert len(data.train) == 5 and [e.prompt for e in data.eval] == ["e1"]
    assert data.skipped == [("eval", 2, "column 'demonstration' is empty")]
    msg = error_of(cfg(train, eval_source=str(ev)))
    assert "data.eval_source" in msg and "eval.jsonl" in msg and "row 2" in msg
    assert "data.eval_source" in error_of(cfg(train, eval_source=str(tmp_path / "missing.jsonl")))


def test_limit_applies_to_train_after_bad_rows_and_eval_split(tmp_path):
    rows = [{"prompt": "p", "demonstration": ""}] + [
        {"prompt": f"q{i}", "demonstration": "d"} for i in range(10)
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = load_data(cfg(path, on_bad_row="skip", limit=3))
    assert [e.row for e in data.train] == [2, 3, 4] and len(data.skipped) == 1
    split = load_data(cfg(path, on_bad_row="skip", limit=3, eval_fraction=0.2))
    assert len(split.train) == 3 and len(split.eval) == 2
