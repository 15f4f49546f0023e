"""The `kunserve` command (also `python -m kunserve`). Its modules are imported when it runs,
not when this module is: worker processes are spawned, so each imports the main module
again, and they need none of the command's modules (importing them all took seconds per
worker, silent, while a cluster started)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    from kunserve.cli import main as run_command

    run_command(argv)


if __name__ == "__main__":
    main()
