"""The `kunserve` command's exit codes, one place for the entry module and the commands."""

EXIT_REQUESTS_FAILED = 1  # a benchmark whose requests failed measured something else than the workload
EXIT_USAGE = 2  # argparse's code for bad arguments
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C
