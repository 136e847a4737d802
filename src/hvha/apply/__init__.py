"""`hvha apply`, `reconcile` and `destroy`: carry a plan out on the nodes.

Layers: :mod:`package` builds the wheelhouse pushed to nodes (no registry access needed there),
:mod:`steps` turns a plan into ordered steps per node (pure), :mod:`node` runs one node's steps
over its transport, :mod:`run` drives both nodes (phases, progress, the final status), and
:mod:`reconcile` loops facts -> plan -> apply with backoff. Nothing here decides roles: the agents
do; apply installs, pushes, reloads and waits.
"""
