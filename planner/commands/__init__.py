"""One module per `moeplan` sub-command: `add_parser(subparsers)` and `main(args) -> int`.

Modules keep heavy imports (torch, optuna) inside `main`, so that `moeplan --help` and the commands that
do not need them start fast.
"""
