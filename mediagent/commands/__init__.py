"""What a person runs: each module exposes one click ``command`` that ``mediagent`` lists."""
