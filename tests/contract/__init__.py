"""Contract tests against the real serving stacks' own code (SGLang's request classes on CPU)."""
