"""Answers that are JSON values, optionally constrained by a JSON Schema (the ``jsonschema`` library)."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import ConfigError, TaskConfig
from pipeline.tasks import register
from pipeline.tasks.base import Score, Task, strip_fence


def load_schema(cfg: TaskConfig) -> dict | None:
    import jsonschema

    schema = cfg.json_schema
    if isinstance(schema, str):
        try:
            schema = json.loads(Path(schema).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"task.json_schema: cannot read {cfg.json_schema}: {err}") from None
    if schema is not None:
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as err:
            raise ConfigError(f"task.json_schema: not a valid JSON Schema: {err.message}") from None
    return schema


@register
class JsonTask(Task):
    kind = "json"
    metrics_per_example = ("valid", "json_valid", "schema_valid", "exact_match", "field_accuracy")
    primary = "exact_match"
    settings = frozenset({"json_schema", "fields"})

    @classmethod
    def resources(cls, cfg: TaskConfig) -> list[Path]:
        return [Path(cfg.json_schema)] if isinstance(cfg.json_schema, str) else []

    def __init__(self, cfg: TaskConfig) -> None:
        super().__init__(cfg)
        import jsonschema

        schema = load_schema(cfg)
        self._validator = jsonschema.validators.validator_for(schema)(schema) if schema is not None else None

    def _parse(self, text: str) -> tuple[object, str]:
        try:
            return json.loads(strip_fence(text)), ""
        except (json.JSONDecodeError, ValueError) as err:
            return None, f"not valid JSON: {err}"

    def _schema_error(self, value: object) -> str:
        if self._validator is None:
            return ""
        err = next(iter(self._validator.iter_errors(value)), None)
        if err is None:
            return ""
        where = "/".join(str(p) for p in err.absolute_path) or "<root>"
        return f"schema violation at {where}: {err.message}"

    def drift_columns(self, answer: str) -> dict[str, str]:
        """``task.fields``: each named field's value (categorical fields only)."""
        obj, _ = self._parse(answer) if self.cfg.fields else (None, "")
        return {f"field.{name}": str(obj.get(name, "<missing>")) if isinstance(obj, dict) else "<invalid>"
                for name in self.cfg.fields}

    def check_reference(self, answer: str) -> str | None:
        value, reason = self._parse(answer)
        return reason or self._schema_error(value) or None

    def answer_key(self, answer: str) -> str:
        """The parsed value, keys sorted: whitespace, key order and fences do not make a different answer."""
        value, reason = self._parse(answer)
        return super().answer_key(answer) if reason else json.dumps(value, sort_keys=True, ensure_ascii=False)

    def score(self, prediction: str, reference: str, prompt: str = "") -> Score:
        ref, _ = self._parse(reference)
        pred, reason = self._parse(prediction)
        if reason:
            return self.zero(reason)
        schema_reason = self._schema_error(pred)
        if isinstance(ref, dict):
            fields = sum(1 for k, v in ref.items() if isinstance(pred, dict) and pred.get(k) == v) / max(len(ref), 1)
        else:
            fields = float(pred == ref)
        schema_ok = 0.0 if schema_reason else 1.0
        return Score({"valid": schema_ok, "json_valid": 1.0, "schema_valid": schema_ok,
                      "exact_match": float(pred == ref), "field_accuracy": fields}, schema_reason, pred)
