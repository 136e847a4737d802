"""From the model to artefacts: the resource graph, rendered scripts and per-node bundles."""
