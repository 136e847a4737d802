"""Node runtime: the agent, its state machine, heartbeats, witness, checkers."""
