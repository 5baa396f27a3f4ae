"""The `process` stage: cMedQA2 CSV tables (and a user's own sources) -> ChatML JSONL splits and test candidate lists.

Reads  ``<data.raw_dir>/question.csv`` (``question_id,content``) and ``answer.csv``
       (``ans_id,question_id,content``); ``questions.csv``/``answers.csv`` or a ``.zip``
       holding one of them are accepted too. Encodings UTF-8 (with or without BOM), GBK and
       GB18030 are detected per file. When the official ``dev_candidates`` and
       ``test_candidates`` files are there (``.txt``/``.csv`` as `make data` unzips them,
       or the ``.zip`` itself), their question ids are the val and test splits.
       With ``data.sources``: each source instead (cMedQA2 as above, or alpaca / sharegpt /
       messages / table files read by ``mediagent/sources.py``), single- or multi-turn, all
       cleaned alike; questions equal after normalisation share a split (docs/data.md).
Writes ``<data.processed_dir>/`` = ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` (one
       ChatML example per line) and ``test_candidates.jsonl`` (one answer-selection list per
       test question), all built in a temporary directory and renamed into place; then
       ``<process.metrics_file>`` (row counts, encodings, drops by reason, split sizes,
       text lengths, PII masks; per source with ``data.sources``).
Run    ``python -m mediagent.pipeline.process`` (or ``dvc repro process``); for a quick run on part of
       the data: ``dvc exp run -S process.limit=1000``.

pyarrow reads the CSVs and cleans the texts (``mediagent/cmedqa2.py``, ``text_clean.py``);
pandas does the table work (duplicates, joins, splits); orjson writes every line. Any bad
input raises ``ProcessError`` naming the file, column or row and the fix, before anything
is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import time
from pathlib import Path

import numpy as np
import orjson
import pandas as pd

from mediagent.cmedqa2 import dedupe_ids, length_filter, load_inputs, make_pairs, official_heldout_ids
from mediagent.errors import ProcessError, run_stage
from mediagent.fileio import atomic_path, write_json
from mediagent.params import DataParams, Params, ProcessParams
from mediagent.sources import OWN_ID_BASE, dialogue_pairs, read_source
from mediagent.text_clean import PII_PATTERNS, clean_table

log = logging.getLogger(__name__)


OUTPUT_FILES = ("train.jsonl", "val.jsonl", "test.jsonl", "test_candidates.jsonl")
SPLITS = ("train", "val", "test")

# Every reason a row can be dropped for; all are reported (0 when unused) so the metric keys are
# the same in every run and `dvc metrics diff` lines up. duplicate_rows: the same row repeated;
# answer_question_missing: its question is not in the file or was dropped; duplicate_pairs: the
# same question and answer texts under other ids; answer_not_first: answers_per_question=first.
DROP_REASONS = (
    "question_duplicate_rows",
    "answer_duplicate_rows",
    "question_empty",
    "question_too_short",
    "question_too_long",
    "answer_empty",
    "answer_too_short",
    "answer_too_long",
    "answer_question_missing",
    "duplicate_pairs",
    "answer_not_first",
    "candidates_answer_missing",
    "candidate_lists_question_missing",
    "candidate_lists_no_positive",
)


def split_ids(qids: np.ndarray, seed: int, val_ratio: float, test_ratio: float) -> np.ndarray:
    """0/1/2 (train/val/test) per question id, from a seeded hash of the id.

    A question's split depends only on its id and the seed: its answers land together, and
    other questions never move it. md5 is the same on every machine (str hash() is salted).
    """
    u = (
        np.array(
            [int.from_bytes(hashlib.md5(f"{seed}:{q}".encode()).digest()[:6], "big") for q in qids.tolist()],
            dtype=np.float64,
        )
        / 2**48
    )  # 48 bits: exact in a float64, uniform in [0, 1)
    return np.select([u < test_ratio, u < test_ratio + val_ratio], [2, 1], 0).astype(np.int8)


# A candidates table: one row per candidate (question_id: its list's question), lists contiguous and in order.
CANDIDATE_FIELDS = ["question_id", "ans_id", "content", "label"]


def official_candidates(
    cands: pd.DataFrame, questions: pd.DataFrame, answers: pd.DataFrame, test_qids: np.ndarray, stats: dict
) -> pd.DataFrame:
    """Official lists of the questions in ``test_qids``, with the cleaned answer texts.

    Candidates whose answer was dropped in cleaning are removed; a list left without its
    question text or without any true answer cannot be scored and is dropped. Labels are
    the official ones, and each list keeps the file's order (true answers first): breaking
    score ties fairly is the evaluator's job. Lists come out by question id.
    """
    # Sorted without trusting the file to keep each list contiguous; stable keeps list order.
    c = cands[cands["question_id"].isin(test_qids)].sort_values("question_id", kind="stable")
    c = c.assign(content=c["ans_id"].map(answers.set_index("ans_id")["content"]))
    has_q, has_a, by_list = c["question_id"].isin(questions["question_id"]), c["content"].notna(), c["question_id"]
    list_has_q = has_q.groupby(by_list).first()
    positives = (has_a & (c["label"] == 1)).groupby(by_list).sum()
    stats["dropped"]["candidates_answer_missing"] += int((has_q & ~has_a).sum())
    stats["dropped"]["candidate_lists_question_missing"] += int((~list_has_q).sum())
    stats["dropped"]["candidate_lists_no_positive"] += int((list_has_q & (positives == 0)).sum())
    return c[has_a & by_list.map(list_has_q & (positives > 0))][CANDIDATE_FIELDS]


def sampled_candidates(
    pairs: pd.DataFrame, test_rows: np.ndarray, pool_rows: np.ndarray, num_negatives: int, seed: int, stats: dict
) -> pd.DataFrame:
    """Each test question's true answers plus ``num_negatives`` answers of other held-out questions.

    ``test_rows`` and ``pool_rows`` are positions in ``pairs``. Negatives come from the
    pool, the val+test answers, so no list shows a training answer, and never from the
    question itself; each list is shuffled with the seed so a true answer's position says nothing.
    """
    rng = np.random.default_rng(seed)
    qids = pairs["question_id"].to_numpy()
    lists, n_own = np.unique(qids[test_rows], return_counts=True)
    negatives = []
    for qid, n in zip(lists.tolist(), n_own.tolist()):
        # Enough distinct draws that num_negatives remain once the question's own answers
        # (all in the pool) are taken out; fewer only when the pool is that small.
        draw = pool_rows[rng.choice(len(pool_rows), size=min(len(pool_rows), num_negatives + n), replace=False)]
        negatives.append(draw[qids[draw] != qid][:num_negatives])
    stats["candidate_lists_short"] = sum(len(neg) < num_negatives for neg in negatives)
    rows = np.concatenate([test_rows, *negatives]).astype(np.int64)
    list_of = np.concatenate([qids[test_rows], np.repeat(lists, [len(neg) for neg in negatives])])
    labels = (np.arange(len(rows)) < len(test_rows)).astype(np.int64)  # the test rows are the true answers
    order = np.lexsort((rng.random(len(rows)), list_of))  # by list, shuffled within each
    cands = pairs.iloc[rows[order]].rename(columns={"answer": "content"})
    return cands.assign(question_id=list_of[order], label=labels[order])[CANDIDATE_FIELDS]


def build_candidates(
    cfg: ProcessParams,
    pairs: pd.DataFrame,
    pair_split: np.ndarray,
    test_cands: pd.DataFrame | None,
    questions: pd.DataFrame,
    answers: pd.DataFrame,
    input_qids: np.ndarray,
    stats: dict,
    single: np.ndarray | None = None,
) -> pd.DataFrame:
    """The test questions' lists: official ones when ``test_cands`` is given, else sampled
    (from the ``single``-turn pairs only where given: a list shows one question, no history).

    ``input_qids`` are the question ids before the length filters: an official list whose
    question was lost in cleaning is counted as dropped, one whose question was never in
    the input is not.
    """
    cap = cfg.max_candidate_questions
    if test_cands is not None:
        official_test = np.unique(test_cands["question_id"])
        test_qids = official_test[np.isin(official_test, input_qids)]
        stats["official_test_questions_not_in_input"] = len(official_test) - len(test_qids)
        cands = official_candidates(test_cands, questions, answers, test_qids, stats)
    else:
        eligible = np.ones(len(pairs), dtype=bool) if single is None else single
        test_rows = np.flatnonzero((pair_split == 2) & eligible)
        if cap:  # before sampling: no work for lists that are cut
            test_qids = pairs["question_id"].to_numpy()[test_rows]
            test_rows = test_rows[np.isin(test_qids, np.unique(test_qids)[:cap])]
        pool = np.flatnonzero((pair_split >= 1) & eligible)
        cands = sampled_candidates(pairs, test_rows, pool, cfg.num_negatives, cfg.seed, stats)
    if cap:
        cands = cands[cands["question_id"].isin(cands["question_id"].unique()[:cap])]
    return cands


def chatml_line(question_id: int, ans_id: int, question: str, answer: str, system_prompt: str) -> bytes:
    """One example as a JSON line in the data contract's ChatML layout."""
    messages = [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": question},
        {"role": "assistant", "content": answer},
    ]
    return orjson.dumps(
        {"messages": messages, "question_id": question_id, "ans_id": ans_id}, option=orjson.OPT_APPEND_NEWLINE
    )


def candidate_lines(cands: pd.DataFrame, question_text: dict[int, str], system_prompt: str | dict[int, str]):
    """One JSON line per list: {"question_id", "system", "question", "candidates": [{"ans_id", "content", "label"}]}.

    ``system_prompt``: one for all, or each question's (sources with their own system prompts).
    """
    rows = zip(*(cands[c].tolist() for c in CANDIDATE_FIELDS))
    for qid, group in itertools.groupby(rows, key=lambda row: row[0]):
        yield orjson.dumps(
            {
                "question_id": qid,
                "system": system_prompt if isinstance(system_prompt, str) else system_prompt[qid],
                "question": question_text[qid],
                "candidates": [{"ans_id": a, "content": text, "label": label} for _, a, text, label in group],
            },
            option=orjson.OPT_APPEND_NEWLINE,
        )


def dialogue_line(
    question_id: int, ans_id: int, system: str, history: list[dict] | None, question: str, answer: str
) -> bytes:
    """One example of data.sources as a JSON line: system (if any), earlier turns, the final exchange."""
    messages = [
        *([{"role": "system", "content": system}] if system else []),
        *(history or ()),
        {"role": "user", "content": question},
        {"role": "assistant", "content": answer},
    ]
    return orjson.dumps(
        {"messages": messages, "question_id": question_id, "ans_id": ans_id}, option=orjson.OPT_APPEND_NEWLINE
    )


def write_examples(
    paths: list[Path], examples: pd.DataFrame, split: np.ndarray, question_text: dict[int, str], system_prompt: str
) -> None:
    """Write example i's line to paths[split[i]], keeping the examples' order within each file.

    Pairs from data.sources carry their own system, history and question; cMedQA2 alone the ids.
    """
    rows = zip(
        split.tolist(), examples["question_id"].tolist(), examples["ans_id"].tolist(), examples["answer"].tolist()
    )
    if "history" in examples:
        rows = zip(
            split.tolist(),
            *(examples[c].tolist() for c in ("question_id", "ans_id", "system", "history", "question", "answer")),
        )
    with contextlib.ExitStack() as stack:
        # 1 MB buffers: one write call per MB, not per 8 KB (0.17 s less for 226k lines).
        files = [stack.enter_context(open(p, "wb", buffering=1 << 20)) for p in paths]
        if "history" in examples:
            for k, *row in rows:
                files[k].write(dialogue_line(*row))
            return
        for k, qid, aid, answer in rows:
            files[k].write(chatml_line(qid, aid, question_text[qid], answer, system_prompt))


def write_outputs(
    out_dir: Path,
    cfg: ProcessParams,
    pairs: pd.DataFrame,
    pair_split: np.ndarray,
    examples: pd.DataFrame,
    ex_split: np.ndarray,
    tables: dict,
    questions,
    answers,
    input_qids: np.ndarray,
    stats: dict,
) -> tuple[pd.DataFrame, int]:
    """The three splits and the test candidate lists, renamed into ``out_dir`` together; the lists and their count."""
    test_cands = tables["test_candidates"][1].to_pandas() if "test_candidates" in tables else None
    single, system = None, cfg.system_prompt
    if "history" in pairs:  # data.sources: texts and system prompts per question
        single = pairs["history"].isna().to_numpy()
        firsts = pairs[single].drop_duplicates("question_id")
        question_text = dict(zip(firsts["question_id"].tolist(), firsts["question"].tolist()))
        system = dict(zip(firsts["question_id"].tolist(), firsts["system"].tolist()))
    else:
        question_text = dict(zip(questions["question_id"].tolist(), questions["content"].tolist()))
    cands = build_candidates(cfg, pairs, pair_split, test_cands, questions, answers, input_qids, stats, single)
    with atomic_path(out_dir, is_dir=True) as tmp:
        write_examples([tmp / f"{name}.jsonl" for name in SPLITS], examples, ex_split, question_text, cfg.system_prompt)
        with open(tmp / "test_candidates.jsonl", "wb") as fh:
            fh.writelines(candidate_lines(cands, question_text, system))
    n_lists = cands["question_id"].nunique()
    if not n_lists:
        log.warning("no test question has a candidate list (see dropped.candidate_* in %s)", cfg.metrics_file)
    return cands, n_lists


def gather_sources(data: DataParams, cfg: ProcessParams, stats: dict) -> tuple[pd.DataFrame, tuple]:
    """Every data.sources entry as one pairs table, and the cMedQA2 source's tables, questions,
    answers and input question ids (empty when there is none). Counts go per source into
    ``stats["sources"]``, summed at the top; a dialogue repeated in a later source is dropped
    there (``cross_source_duplicates``); questions found in several sources are counted."""
    frames, cm, stats["sources"] = [], ({}, None, None, np.array([], dtype=np.int64)), {}
    raw = Path(data.raw_dir).resolve()
    for i, src in enumerate(data.sources):
        where, name, s = f"data.sources[{i}]", src.name or src.path, new_stats()
        if raw != Path(src.path).resolve() and raw not in Path(src.path).resolve().parents:
            log.warning(
                "%s: %s lies outside data.raw_dir (%s), the folder dvc.yaml tracks: `dvc repro` will not "
                "notice when it changes",
                where,
                src.path,
                data.raw_dir,
            )
        system = src.system_prompt or cfg.system_prompt
        if src.format == "cmedqa2":
            pairs, *cm = cmedqa2_pairs(Path(src.path), cfg, src.limit or cfg.limit, s)
            text = dict(zip(cm[1]["question_id"].tolist(), cm[1]["content"].tolist()))
            pairs = pairs.assign(question=pairs["question_id"].map(text), history=None, system=system)
            pairs["content_key"] = pairs["question"] + "\x1f" + pairs["answer"]
        else:
            dialogues, info = read_source(src, where, src.limit or cfg.limit)
            s.update(info)
            pairs = dialogue_pairs(dialogues, cfg, system, s)
        s["format"], s["examples"] = src.format, len(pairs)
        if not len(pairs):
            log.warning(
                "%s (%s): all %s records dropped (drops: %s); check its columns and process.*_chars",
                where,
                name,
                s["rows_read"],
                {k: v for k, v in s["dropped"].items() if v},
            )
        frames.append(pairs.assign(source=name))
        stats["sources"][name] = s
        stats["rows_read"][name], stats["encoding"][name] = s["rows_read"], s["encoding"]
        for key in ("dropped", "pii_masked"):
            stats[key] = {k: v + s[key][k] for k, v in stats[key].items()}
    pairs = pd.concat(frames, ignore_index=True)
    repeated = pairs["content_key"].duplicated().to_numpy()  # repeats inside a source are gone: these are across
    stats["cross_source_duplicates"] = int(repeated.sum())
    stats["cross_source_questions"] = int((pairs.groupby("qkey")["source"].nunique() > 1).sum())
    return pairs[~repeated].reset_index(drop=True), tuple(cm)


def _percentiles(prefix: str, lengths: np.ndarray) -> dict[str, float]:
    p50, p95 = np.percentile(lengths, [50, 95])  # never empty: main stops when no pair is left
    return {
        f"{prefix}_p50": round(float(p50), 1),
        f"{prefix}_p95": round(float(p95), 1),
        f"{prefix}_max": int(lengths.max()),
    }


def new_stats() -> dict:
    """The metrics of one source (or of the whole run), filled as the stage goes."""
    return {
        "rows_read": {},
        "encoding": {},
        "dropped": dict.fromkeys(DROP_REASONS, 0),
        "pii_masked": dict.fromkeys(PII_PATTERNS, 0),
    }


def cmedqa2_pairs(raw_dir: Path, cfg: ProcessParams, limit: int, stats: dict) -> tuple:
    """cMedQA2's tables in ``raw_dir`` as the pairs table, with the tables, the cleaned questions and
    answers, and the question ids before the length filters (what cleaning may lose)."""
    tables = load_inputs(raw_dir, stats)
    (qfile, questions), (afile, answers) = tables["question"], tables["answer"]
    # Cleaning (and masking) before the duplicate checks: rows that differ only in spacing or
    # markup are the same row, not a conflict.
    questions, answers = clean_table(questions, cfg.mask_pii, stats), clean_table(answers, cfg.mask_pii, stats)
    # Orphans are a property of the files: counted before duplicates and the limit go.
    stats["answers_without_questions"] = int((~answers["question_id"].isin(questions["question_id"])).sum())
    stats["questions_without_answers"] = int((~questions["question_id"].isin(answers["question_id"])).sum())
    questions = dedupe_ids(qfile, questions, "question_id", "question", stats)
    answers = dedupe_ids(afile, answers, "ans_id", "answer", stats)
    if limit:
        questions = questions.head(limit)
        answers = answers[answers["question_id"].isin(questions["question_id"])]
        log.info("limit %d: %d questions, %d answers kept", limit, len(questions), len(answers))
    input_qids = questions["question_id"].to_numpy()
    questions = length_filter(questions, cfg.min_question_chars, cfg.max_question_chars, "question", stats)
    answers = length_filter(answers, cfg.min_answer_chars, cfg.max_answer_chars, "answer", stats)
    pairs = make_pairs(questions, answers, stats)
    return pairs, tables, questions, answers, input_qids


def question_splits(qids: np.ndarray, tables: dict, cfg: ProcessParams, stats: dict) -> np.ndarray:
    """0/1/2 (train/val/test) per question id: the official lists' when cMedQA2 brings them
    (other sources' questions hashed), else the seeded hash, official held-out ids to test."""
    if "dev_candidates" in tables:
        # Official dev ids -> val, test ids -> test, the rest of cMedQA2 -> train.
        split_of_q, own = np.zeros(len(qids), dtype=np.int8), qids >= OWN_ID_BASE
        split_of_q[own] = split_ids(qids[own], cfg.seed, cfg.val_ratio, cfg.test_ratio)
        split_of_q[np.isin(qids, tables["dev_candidates"][1]["question_id"])] = 1
        split_of_q[np.isin(qids, tables["test_candidates"][1]["question_id"])] = 2
        stats["split_method"] = "official"
        return split_of_q
    split_of_q, stats["split_method"] = split_ids(qids, cfg.seed, cfg.val_ratio, cfg.test_ratio), "hash"
    if cfg.heldout_candidates_dir:
        official = np.isin(qids, official_heldout_ids(Path(cfg.heldout_candidates_dir)))
        split_of_q[official] = 2
        stats["official_heldout_questions"] = int(official.sum())
    return split_of_q


def join_twins(pair_split: np.ndarray, qkeys: pd.Series, stats: dict) -> np.ndarray:
    """Questions equal after normalisation (``question_key``) share one split, the most held-out
    of theirs: a question never trains while its twin is tested, whichever source holds either."""
    group = pd.factorize(qkeys)[0]
    joined = pd.Series(pair_split).groupby(group).transform("max").to_numpy(dtype=np.int8)
    stats["twin_answers_moved"] = int((joined != pair_split).sum())
    return joined


def main(params: Params) -> None:
    data: DataParams = params.data
    cfg: ProcessParams = params.process
    log.info("process params: %s; data: %s", cfg, data)
    t_start = time.perf_counter()
    out_dir = Path(data.processed_dir)
    stats = {**new_stats(), "candidate_lists_short": 0, "official_test_questions_not_in_input": 0}
    if data.sources:
        pairs, (tables, questions, answers, input_qids) = gather_sources(data, cfg, stats)
    else:
        pairs, tables, questions, answers, input_qids = cmedqa2_pairs(Path(data.raw_dir), cfg, cfg.limit, stats)
    if pairs.empty:
        raise ProcessError(
            f"no question/answer pairs left after cleaning {[s.path for s in data.sources] or data.raw_dir} (drops: "
            f"{stats['dropped']}, answers without questions: {stats.get('answers_without_questions', 0)}); check "
            f"that the files belong together and the process.*_chars bounds"
        )
    codes, qids = pd.factorize(pairs["question_id"])  # qids in order of first appearance
    pair_split = join_twins(question_splits(qids, tables, cfg, stats)[codes], pairs["qkey"], stats)
    split_of_q = np.zeros(len(qids), dtype=np.int8)
    split_of_q[codes] = pair_split  # twins moved with their group
    first = ~pairs["question_id"].duplicated().to_numpy()  # each question's first answer (official ids ascend)
    examples, ex_split = pairs, pair_split
    if cfg.answers_per_question == "first":
        stats["dropped"]["answer_not_first"] += int((~first).sum())
        examples, ex_split = pairs[first], pair_split[first]
    split_counts = {name: int((ex_split == i).sum()) for i, name in enumerate(SPLITS)}
    if not split_counts["train"]:
        raise ProcessError(
            f"no training examples: all {len(qids)} questions fell into val/test (check process.val_ratio/"
            f"test_ratio, or the official candidate files)"
        )
    for name in ("val", "test"):
        if not split_counts[name]:
            log.warning("the %s split is empty (%d questions in all)", name, len(qids))
    cands, n_lists = write_outputs(
        out_dir, cfg, pairs, pair_split, examples, ex_split, tables, questions, answers, input_qids, stats
    )
    stats.update(
        examples=split_counts,
        questions={name: int((split_of_q == i).sum()) for i, name in enumerate(SPLITS)},
        candidate_questions=n_lists,
        candidates=len(cands),
        length={
            **_percentiles("question", pairs["question_chars"].to_numpy()[first]),
            **_percentiles("answer", examples["chars"].to_numpy()),
        },
    )
    write_json(cfg.metrics_file, stats)
    log.info(
        "wrote %s: train %d / val %d / test %d examples, %d candidate lists (%.2fs)",
        out_dir,
        split_counts["train"],
        split_counts["val"],
        split_counts["test"],
        n_lists,
        time.perf_counter() - t_start,
    )


if __name__ == "__main__":
    run_stage(main)
