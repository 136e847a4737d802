"""Shape checks: JSON Schema 2020-12, with each failure turned into a coded, positioned diagnostic.

jsonschema's own messages speak JSON ("Additional properties are not allowed"); users wrote
YAML and want the line, the key, and what to type instead. The schema carries hvha annotations
that jsonschema ignores: ``x-codes`` (validator keyword -> stable code) and ``x-hint``.
"""

from __future__ import annotations

import difflib
import json
from functools import cache
from typing import Any

import jsonschema
from jsonschema.exceptions import ValidationError

from hvha.config.diagnostics import Path
from hvha.config.loader import Document
from hvha.config.resources import schema_path

_TYPE_WORDS = {
    "object": "a mapping (key: value lines)",
    "array": "a list (lines starting with '- ')",
    "string": "text",
    "integer": "a whole number",
    "number": "a number",
    "boolean": "true or false",
    "null": "nothing",
}


@cache
def load_schema() -> dict[str, Any]:
    with open(schema_path(), encoding="utf-8") as fh:
        schema: dict[str, Any] = json.load(fh)
    return schema


@cache
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(load_schema())


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    for py, word in ((dict, "a mapping"), (list, "a list"), (str, "text"), (int, "a number"),
                     (float, "a number")):
        if isinstance(value, py):
            return word
    return "nothing" if value is None else type(value).__name__


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def check_schema(doc: Document) -> None:
    """Validate ``doc.data`` against the schema, adding diagnostics to ``doc.report``."""
    seen: set[tuple[str, Path, str]] = set()
    for error in _validator().iter_errors(doc.data):
        for code, path, message, hint, at_key in _explain(error):
            if any(path[: i + 1] in doc.reported for i in range(len(path))) or path in doc.reported:
                continue  # the loader already said what is wrong with this value
            if (code, path, message) in seen:
                continue
            seen.add((code, path, message))
            pos = doc.key_position(path) if at_key else doc.position(path)
            doc.report.add(code, message, hint, pos, path)


def _explain(error: ValidationError) -> list[tuple[str, Path, str, str, bool]]:
    """One or more (code, path, message, hint, point-at-key) for one jsonschema error."""
    path: Path = tuple(error.absolute_path)
    if "propertyNames" in error.relative_schema_path and isinstance(error.instance, str):
        return [("HV208", (*path, error.instance), f"`{error.instance}` is not a valid "
                 "variable name", "use letters, digits and '_', not starting with a digit", True)]
    schema = error.schema if isinstance(error.schema, dict) else {}
    hint = str(schema.get("x-hint", ""))
    kw, inst = str(error.validator), error.instance
    code: str | None = schema.get("x-codes", {}).get(kw)
    value: Any = error.validator_value

    if kw == "additionalProperties" and isinstance(inst, dict):
        known = sorted(schema.get("properties", {}))
        out = []
        for key in sorted(set(inst) - set(known)):
            near = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            fix = f"did you mean '{near[0]}'?" if near else (
                f"known keys here: {', '.join(known)}" if known else "remove it")
            out.append(("HV201", (*path, key), f"unknown key '{key}'", fix, True))
        return out
    if kw == "required":
        missing = [k for k in value if isinstance(inst, dict) and k not in inst]
        return [("HV202", path, f"'{k}' is required here",
                 hint or f"add `{k}:` (see docs/configuration.md)", False) for k in missing]
    if kw == "type" and code == "HV207":  # never echo what may be a secret
        return [(code, path, f"a secret is written inline ({_describe(inst)})", hint, False)]
    if kw == "type":
        want = value
        wants = want if isinstance(want, list) else [want]
        words = " or ".join(_TYPE_WORDS.get(str(w), str(w)) for w in wants)
        return [(code or "HV203", path, f"expected {words}, found {_describe(inst)} "
                 f"`{_show(inst)}`", hint or f"write {words} here", False)]
    if kw == "enum":
        choices = [str(c) for c in value]
        near = difflib.get_close_matches(str(inst), choices, n=1, cutoff=0.5)
        fix = f"did you mean '{near[0]}'?" if near else f"use one of: {', '.join(choices)}"
        return [(code or "HV204", path,
                 f"`{_show(inst)}` is not one of {', '.join(choices)}", fix, False)]
    if kw == "pattern":
        return [(code or "HV204", path, f"`{_show(inst)}` is not well formed",
                 hint or str(schema.get("description", "")), False)]
    if kw in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        bound = value
        rel = "at least" if "inimum" in kw else "at most"
        return [(code or "HV204", path, f"{_show(inst)} is out of range: must be {rel} {bound}",
                 hint or f"use a value {rel} {bound}", False)]
    if kw in ("minItems", "maxItems"):
        return [(code or "HV204", path, f"this list needs {kw[:3]}imum "
                 f"{value} item(s)", hint or "add or remove items", False)]
    if kw in ("minProperties", "maxProperties"):
        keys = ", ".join(sorted(inst)) if isinstance(inst, dict) else ""
        what = "is empty" if kw == "minProperties" else f"has too many keys ({keys})"
        return [(code or "HV204", path, f"this mapping {what}", hint or "see docs", False)]
    if kw in ("oneOf", "anyOf"):
        return [(code or "HV204", path, "this value does not match any accepted form",
                 hint or str(schema.get("description", "")), False)]
    if kw == "minLength":
        return [(code or "HV204", path, "this value is empty", hint or "write a value, or remove "
                 "the key to use the default", False)]
    return [(code or "HV200", path, error.message, hint, False)]
