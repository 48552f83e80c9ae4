"""Checks that a failing `lmforge` command tells a person what went wrong the way the CLI
promises: one line, exit status 2, no traceback."""

from __future__ import annotations

from lmforge.cli import main


def one_line_error(capsys, *argv: str) -> str:
    """Run `lmforge ARGV`, assert it failed as a person should see it, return the message."""
    capsys.readouterr()  # what earlier steps printed
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    # Progress bars may come first; the message is the last line, and all of it.
    message = err.rstrip("\n").split("\n")[-1]
    assert message.startswith(f"lmforge {argv[0]}: error: "), err
    return message
