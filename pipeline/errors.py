"""One error base class; the exit code comes from the error's type, never from its module.

Per image, errors are data (an error row); these are for the run as a whole. Anything else
that escapes a run (a pyarrow ``ArrowInvalid`` in the read-back, say) is a failed run, exit 1.
A nightly run over its error budget is not an error: it commits its rows and ends with
``EXIT_OVER_ERROR_BUDGET``, and its commit says so.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_OVER_ERROR_BUDGET = 3
EXIT_INTERRUPTED = 130  # Ctrl+C, as a shell reports a SIGINT


class PipelineError(Exception):
    """Base of the errors the pipeline raises on purpose; ``exit_code`` is the process's."""

    exit_code = EXIT_RUN_FAILED


class BadInputError(PipelineError, ValueError):
    """A bad argument, input, weights file or output: one line, before any heavy work."""

    exit_code = EXIT_BAD_INPUT


class RunFailedError(PipelineError):
    """The run started and could not finish; nothing was committed."""

    exit_code = EXIT_RUN_FAILED
