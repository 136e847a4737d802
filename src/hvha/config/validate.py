"""The validation pipeline: load -> schema -> defaults -> semantic rules -> model.

Every stage runs even when an earlier one found problems (rules skip what is ill-typed), so
the user sees all problems of a file in one run. The model is built only from a clean file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hvha.config import rules, rules_modules
from hvha.config.build import build_cluster
from hvha.config.defaults import Applied, apply_defaults
from hvha.config.diagnostics import Report
from hvha.config.loader import Document, load_bytes, load_file
from hvha.config.rules import Ctx
from hvha.config.schema import check_schema, load_schema
from hvha.model.cluster import Cluster

RULES = (
    rules.rule_node_count,
    rules.rule_unique_names,
    rules.rule_addresses,
    rules.rule_heartbeat_networks,
    rules.rule_timing,
    rules.rule_witness,
    rules.rule_vips,
    rules_modules.rule_paths,
    rules_modules.rule_ports,
    rules_modules.rule_references,
    rules_modules.rule_kinds,
    rules_modules.rule_options,
    rules_modules.rule_duplicate_addresses,
)


@dataclass
class Validation:
    doc: Document
    effective: Any
    applied: Applied
    cluster: Cluster | None

    @property
    def report(self) -> Report:
        return self.doc.report


def validate_document(doc: Document) -> Validation:
    if doc.data is None and not doc.report.ok:
        return Validation(doc, None, [], None)
    if not isinstance(doc.data, dict):
        doc.report.add("HV203", "the file must be a mapping with `cluster:`, `nodes:` and "
                       "`modules:`", "start from examples/lab.yaml", doc.position(()))
        return Validation(doc, None, [], None)
    check_schema(doc)
    effective, applied = apply_defaults(doc.data, load_schema())
    ctx = Ctx(doc, effective, applied)
    shape_ok = doc.report.ok
    for rule in RULES:
        try:
            rule(ctx)
        except (TypeError, AttributeError, KeyError, ValueError, IndexError):
            if shape_ok:
                raise  # a well-formed file must never trip a rule: that is a bug in hvha
            # The schema already reported what is malformed; this rule cannot judge the rest.
    cluster = build_cluster(effective, applied) if doc.report.ok else None
    return Validation(doc, effective, applied, cluster)


def validate_file(filename: str) -> Validation:
    return validate_document(load_file(filename))


def validate_bytes(raw: bytes, filename: str = "<input>") -> Validation:
    return validate_document(load_bytes(raw, filename))
