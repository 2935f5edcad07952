"""The errors a user can act on, in one place: each carries one line naming what failed and the fix, and the CLI
(``trainer.cli.one_line_errors``) prints that line instead of a traceback. Nothing here imports torch."""


class CommandError(Exception):
    """A command that cannot go on as asked (options, run folders, missing extras); one line with the fix."""


class ArtifactError(Exception):
    """The file is not a usable brats2d artifact; the message is one line naming the file and the fix."""


class ModelError(Exception):
    """A model or checkpoint that cannot be built or loaded as asked; one line with the fix."""


class OutputError(Exception):
    """An output that could not be written; the message is one line naming it and what to do."""


class CaseError(Exception):
    """A case that cannot be segmented or scored as asked; one line naming the case and the reason."""


#: What the CLI turns into one line (with ValueError, which option and configuration checks raise).
USER_ERRORS = (CommandError, ArtifactError, ModelError, OutputError, CaseError)
