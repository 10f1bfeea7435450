"""The one error type of the evaluation tools: its message is a single line meant for the user."""


class EvalError(ValueError):
    pass
