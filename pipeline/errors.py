"""The two exception families the entry point treats specially."""


class PipelineError(Exception):
    """A user mistake (bad config, missing input, corrupt file).

    The entry point prints it as one line, so the message must name the key, file or record
    and say how to fix it.
    """


class MissingUpstream(PipelineError):
    """An upstream stage's output is not there yet."""


class BadInput(PipelineError):
    """An input file or record cannot be used."""


class StageKilled(BaseException):
    """Raised in the main thread on SIGTERM so runs end as KILLED and partial output stays aside.

    A BaseException, like KeyboardInterrupt, so `except Exception` in libraries cannot swallow it.
    """

    def __init__(self, signal_name: str):
        super().__init__(f"killed by {signal_name}")
        self.signal_name = signal_name
