"""Errors a user can cause: the CLI prints them in one line and exits non-zero."""

from __future__ import annotations


class PipelineError(Exception):
    """A problem with the user's input: message names the input, the problem and the fix."""

    exit_code = 1


class RecipeError(PipelineError):
    """The recipe (file, overrides or values) is invalid."""

    exit_code = 2


class StageFailed(PipelineError):
    """A stage ran and failed; the message carries the failing rank's error."""

    exit_code = 1


class Preempted(PipelineError):
    """A stage stopped on a preemption signal after saving a checkpoint; rerunning resumes it."""

    exit_code = 75
