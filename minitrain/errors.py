"""The one exception type the CLI turns into a single error line (exit code 2, no traceback)."""


class MinitrainError(Exception):
    """A problem with the user's input: a recipe, an option, a plugin, a data set or a file."""
