"""The `kunserve` command (also `python -m kunserve`). Its modules are imported when it runs,
not when this module is: worker processes are spawned, so each imports the main module
again, and they need none of the command's modules (importing them all took seconds per
worker, silent, while a cluster started)."""

from __future__ import annotations

from kunserve.exit_codes import EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> None:
    try:
        from kunserve.cli import main as run_command
    except KeyboardInterrupt:  # a Ctrl-C while the command's modules load: nothing to stop yet
        raise SystemExit(EXIT_INTERRUPTED) from None
    run_command(argv)


if __name__ == "__main__":
    main()
