"""One module per `tensorgpu` tool (models/cli.py lists them). A tool module has
`add_arguments(parser)` and `run(args) -> int` (0: done; raise `common.UsageError` for bad input);
`DESCRIPTION` is its --help text. Heavy imports (tensorgpu, the models) happen inside run(), so
`tensorgpu --help` and a tool's --help stay instant and argument errors come before any GPU work."""
