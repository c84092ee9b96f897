"""Errors a user can cause (bad files, bad arguments). Commands print them as one line, exit 2."""


class FssError(Exception):
    """A user-facing error: the message names the problem and, where there is one, the file."""

    def __init__(self, message: str, path=None):
        self.message = message
        self.path = None if path is None else str(path)
        super().__init__(f"{message} ({self.path})" if self.path else message)


class CheckpointError(FssError):
    """A file that is not a loadable PANet / fss checkpoint."""


SUMMARY_CHARS = 300


def summary(exc: BaseException, limit: int = SUMMARY_CHARS) -> str:
    """An exception's message as one line, shortened at a sentence or word end (never mid-word)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) <= limit:
        return text
    head = text[:limit]
    sentence = head.rfind(". ")
    cut = sentence + 1 if sentence > limit // 2 else head.rfind(" ")
    return head[: cut if cut > 0 else limit].rstrip(" ,;:") + " ..."
