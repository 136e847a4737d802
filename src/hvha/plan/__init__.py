"""``hvha plan``'s pure core: facts from the nodes, the diff against compiled bundles, rendering.

Pipeline (the I/O around it belongs to transport/apply/cli)::

    desired = desired_from_bundles(build_bundles(cluster, source))      # compile
    raw = transport.run(facts_command())                                 # one round trip a node
    facts = {node: parse_facts(node, raw_stdout)}                        # FactsError on garbage
    p = plan(desired, facts)                                             # pure
    print(render_text(p)); sys.exit(detailed_exitcode(p))

Layering: imports config/model/compile only; never agent, cli or transport.
"""

from hvha.plan.diff import desired_from_bundles, plan
from hvha.plan.facts import (
    FACTS_SCRIPT,
    FactsError,
    NodeFacts,
    ServiceState,
    facts_command,
    facts_digest,
    facts_script,
    parse_facts,
)
from hvha.plan.model import Action, Change, DesiredNode, NodePlan, Plan, PlanError, Summary
from hvha.plan.render import detailed_exitcode, render_json, render_text

__all__ = [
    "FACTS_SCRIPT",
    "Action",
    "Change",
    "DesiredNode",
    "FactsError",
    "NodeFacts",
    "NodePlan",
    "Plan",
    "PlanError",
    "ServiceState",
    "Summary",
    "desired_from_bundles",
    "detailed_exitcode",
    "facts_command",
    "facts_digest",
    "facts_script",
    "parse_facts",
    "plan",
    "render_json",
    "render_text",
]
