"""The project's base error and the one way every command line reports it.

Each module raises a subclass of `Error` (bad input, config, file or checkpoint)
with a message that names the file, field or value. The CLIs run their main
through `cli_main`, which prints such an error (and the OS errors a user can
cause: a missing or unwritable path) as one line `error: <message>` and exits
non-zero; `--debug` on the command line or BVCXR_DEBUG=1 shows the traceback.
"""
import argparse
import os
import sys
import traceback


class Error(ValueError):
  """Base of the project's errors; the message is one line a user can act on."""


class CheckpointError(Error):
  """A checkpoint or weights file that cannot be written or restored."""


class UsageError(Error):
  """A command line that cannot be parsed."""


class ArgumentParser(argparse.ArgumentParser):
  """argparse, but a usage error is a UsageError (one line) instead of usage text + exit."""

  def error(self, message):
    raise UsageError(f"{self.prog}: {message} (see --help)")


def debug_requested(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  return "--debug" in argv or os.environ.get("BVCXR_DEBUG", "") not in ("", "0")


def cli_main(main, argv=None, *, exit_code=2):
  """Runs main(argv without --debug); a project or OS error -> one stderr line, `exit_code`."""
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = debug_requested(argv)
  argv = [a for a in argv if a != "--debug"]
  try:
    return main(argv)
  except (Error, OSError) as e:
    if debug:
      traceback.print_exc()
    message = " ".join(str(e).split()) or type(e).__name__
    print(f"error: {message}", file=sys.stderr)
    return exit_code
