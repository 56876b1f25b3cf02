"""SQL answers: execution accuracy against the user's SQLite database, and normalised exact match.

The database is opened read-only (``mode=ro``, ``PRAGMA query_only``, no ATTACH), every query runs under
a time limit (a progress handler aborts it), and result sets are compared as multisets: row order is not
part of the answer. A prediction that does not parse, is not a single query, errors or times out scores 0
with that reason. Exact match compares the queries after ``sqlglot`` normalisation (keyword case,
identifier case, whitespace).
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from pathlib import Path

from pipeline.config import ConfigError, TaskConfig
from pipeline.tasks import register
from pipeline.tasks.base import Score, Task, strip_fence

MAX_ROWS = 100_000  # a runaway cross join must not exhaust memory


class QueryError(Exception):
    pass


def parse_query(sql: str):
    """The one query in ``sql`` as a sqlglot expression; raises QueryError saying why not."""
    import sqlglot
    from sqlglot import exp
    from sqlglot.errors import SqlglotError

    try:
        statements = [s for s in sqlglot.parse(strip_fence(sql), read="sqlite") if s is not None]
    except SqlglotError as err:
        raise QueryError(f"does not parse: {str(err).splitlines()[0][:200]}") from None
    if len(statements) != 1:
        raise QueryError(f"expected one statement, found {len(statements)}")
    if not isinstance(statements[0], exp.Query):
        raise QueryError(f"not a query ({type(statements[0]).__name__})")
    return statements[0]


def normalise_sql(sql: str) -> str:
    return parse_query(sql).sql(dialect="sqlite", normalize=True)


class ReadOnlyDatabase:
    def __init__(self, path: Path, timeout_s: float) -> None:
        if not path.is_file():
            raise ConfigError(f"task.database: {path} not found")
        self.timeout_s = timeout_s
        self.conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
        self.conn.execute("PRAGMA query_only = ON")
        self.conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)

    def run(self, sql: str) -> Counter:
        deadline = time.monotonic() + self.timeout_s
        self.conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
        try:
            cur = self.conn.execute(sql)
            rows = cur.fetchmany(MAX_ROWS + 1)
        except sqlite3.OperationalError as err:
            if "interrupted" in str(err):
                raise QueryError(f"timed out after {self.timeout_s:g}s") from None
            raise QueryError(f"execution failed: {err}") from None
        except sqlite3.Error as err:
            raise QueryError(f"execution failed: {err}") from None
        finally:
            self.conn.set_progress_handler(None, 0)
        if len(rows) > MAX_ROWS:
            raise QueryError(f"returned more than {MAX_ROWS} rows")
        return Counter(tuple(round(v, 6) if isinstance(v, float) else v for v in row) for row in rows)


@register
class SqlTask(Task):
    kind = "sql"
    metrics_per_example = ("valid", "execution_accuracy", "exact_match")
    primary = "execution_accuracy"
    settings = frozenset({"database"})

    @classmethod
    def check_config(cls, cfg: TaskConfig) -> None:
        if not cfg.database:
            raise ValueError("task.database: kind sql needs a SQLite file to execute queries against")

    @classmethod
    def resources(cls, cfg: TaskConfig) -> list[Path]:
        return [Path(cfg.database)]

    def __init__(self, cfg: TaskConfig) -> None:
        super().__init__(cfg)
        self.db = ReadOnlyDatabase(Path(cfg.database), cfg.query_timeout_s)
        self._reference_results: dict[str, Counter | QueryError] = {}

    def check_reference(self, answer: str) -> str | None:
        try:
            parse_query(answer)
        except QueryError as err:
            return f"reference SQL {err}"
        return None

    def answer_key(self, answer: str) -> str:
        try:
            return normalise_sql(answer)
        except QueryError:
            return super().answer_key(answer)

    def _reference(self, sql: str) -> Counter:
        if sql not in self._reference_results:
            try:
                self._reference_results[sql] = self.db.run(strip_fence(sql))
            except QueryError as err:
                self._reference_results[sql] = err
        result = self._reference_results[sql]
        if isinstance(result, QueryError):
            raise QueryError(f"the reference query fails: {result}")
        return result

    def score(self, prediction: str, reference: str, prompt: str = "") -> Score:
        try:
            normalised = parse_query(prediction).sql(dialect="sqlite", normalize=True)
        except QueryError as err:
            return self.zero(f"prediction {err}")
        exact = float(normalised == normalise_sql(reference))
        try:
            got = self.db.run(strip_fence(prediction))
        except QueryError as err:
            return Score({"valid": 1.0, "execution_accuracy": 0.0, "exact_match": exact}, f"prediction {err}")
        try:
            same = float(got == self._reference(reference))
        except QueryError as err:
            return Score({"valid": 1.0, "execution_accuracy": 0.0, "exact_match": exact}, str(err))
        return Score({"valid": 1.0, "execution_accuracy": same, "exact_match": exact}, "", normalised)
