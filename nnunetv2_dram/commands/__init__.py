"""One module per `nnunetv2_dram` sub-command: `add_arguments(parser)` and `run(args) -> int`, light imports."""
