"""The one error hierarchy of surgeon; the CLI turns each into a single line and exit code."""


class SurgeonError(Exception):
    """Base of every expected failure (bad input, bad rule, nothing matched)."""

    exit_code = 1


class CheckpointError(SurgeonError):
    """A file that is missing, unreadable, not a checkpoint, or holds no model."""

    exit_code = 2


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that names a class outside the allow-list (load it with trust=True)."""


class RuleError(SurgeonError):
    """A rule that does not exist, does not parse, or has a bad field."""

    exit_code = 3


class NoMatchError(RuleError):
    """A rule whose selectors match no block of the model."""


class TraceError(SurgeonError):
    """A model that torch.fx cannot trace."""

    exit_code = 4


class SurgeryError(SurgeonError):
    """A rewrite that cannot be done or whose result does not run."""

    exit_code = 5


class Interrupted(SurgeonError):
    """A run stopped by the user (Ctrl-C); the message says how to resume it."""

    exit_code = 130
