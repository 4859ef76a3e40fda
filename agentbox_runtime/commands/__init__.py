"""One module per ``agentbox`` subcommand, each exposing ``run(args) -> int``."""
