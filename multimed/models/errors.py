"""The domain error hierarchy. Raised deep in the models layer; mapped to transport codes once, at
the serving edge. Model code never raises transport errors."""

SHOWN_CHARS = 64  # how much of a client-chosen name an error message echoes


def shown(name: str, limit: int = SHOWN_CHARS) -> str:
    """A client-chosen name as an error message may quote it: quoted, printable ASCII only, at
    most `limit` characters (a 1 MB task name must not come back whole in a status message)."""
    text = "".join(c if c.isascii() and c.isprintable() else "?" for c in str(name)[:limit])
    return repr(text) + ("..." if len(str(name)) > limit else "")


class MultiMedError(Exception):
    """Base of every error the product raises on purpose."""


class InputError(MultiMedError, ValueError):
    """A modality's input is malformed or out of range. The message names the modality."""

    def __init__(self, modality: str, problem: str):
        self.modality = modality
        self.problem = problem
        super().__init__(f"{modality}: {problem}")

    def __reduce__(self):  # errors cross process boundaries (Ray) by pickling
        return type(self), (self.modality, self.problem)


class UnknownTask(MultiMedError, KeyError):
    def __init__(self, task: str, known: tuple[str, ...]):
        self.task = task
        self.known = known
        super().__init__(task)
        self.message = f"unknown task {shown(task)}; known tasks: {', '.join(known)}"

    def __reduce__(self):
        return type(self), (self.task, self.known)

    def __str__(self) -> str:
        return self.message


class UnknownModality(MultiMedError, KeyError):
    def __init__(self, modality: str, known: tuple[str, ...]):
        self.modality = modality
        self.known = known
        super().__init__(modality)
        self.message = f"unknown modality {shown(modality)}; known modalities: {', '.join(known)}"

    def __reduce__(self):
        return type(self), (self.modality, self.known)

    def __str__(self) -> str:
        return self.message


class MissingModality(MultiMedError):
    """A task's required modalities are not all present."""


class UnexpectedModality(MultiMedError):
    """A modality was sent that the task neither requires nor accepts."""


class BundleError(MultiMedError):
    """A model bundle is missing, incomplete, tampered with or of another catalog version."""


class Overloaded(MultiMedError):
    """The service cannot take more work right now; the caller may retry."""


class BackendUnavailable(MultiMedError):
    """A remote model server (an encoder's Triton backend) failed or did not answer in time."""
