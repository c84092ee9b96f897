"""Errors a user can cause (bad files, bad arguments). Commands print them as one line, exit 2."""

import string


class FssError(Exception):
    """A user-facing error: the message names the problem and, where there is one, the file."""

    def __init__(self, message: str, path=None):
        self.message = message
        self.path = None if path is None else str(path)
        super().__init__(f"{message} ({self.path})" if self.path else message)


class CheckpointError(FssError):
    """A file that is not a loadable PANet / fss checkpoint."""


class ImageError(FssError):
    """An image or mask file that is not one: missing, a folder, no readable image header, or a format
    the caller does not take."""


class CorruptImageError(ImageError):
    """A file whose header reads as an image but whose pixels do not decode (truncated or damaged)."""


class ImageFormatError(ImageError):
    """An image in a format the caller does not take."""


class ImageTooLargeError(FssError):
    """An image over the pixel limit, refused from its header before decoding.

    ``size``: its (w, h), None where Pillow's own bound refused it before the size was read; ``limit``:
    the limit in pixels; ``hint``: what sets the limit (a command names its flag: :meth:`hinted`).
    """

    def __init__(self, detail: str, path=None, size=None, limit: int = 0, hint: str = ""):
        self.detail, self.size, self.limit = detail, size, limit
        super().__init__(f"{detail} ({hint})" if hint else detail, path)

    def hinted(self, hint: str) -> "ImageTooLargeError":
        """The same error, naming ``hint`` as what sets the limit."""
        return ImageTooLargeError(self.detail, self.path, self.size, self.limit, hint)


class ShotError(FssError, ValueError):
    """A support shot whose mask does not fit its image (another size, or no foreground pixel); a
    ``ValueError`` as well, for library callers."""


class EmptyMaskError(ShotError):
    """A support shot whose mask marks no foreground pixel."""


class SupportError(FssError, ValueError):
    """A support set that cannot be built or changed (lists of another length, repeated class names, the
    only shot of a class removed); a ``ValueError`` as well, for library callers."""


class MissingSupportError(FssError, KeyError):
    """No support set, or no class of a support set, of the name asked for; a ``KeyError`` as well."""

    __str__ = FssError.__str__  # the message, not KeyError's quoted repr


class NoSupportError(FssError, RuntimeError):
    """Queries segmented before any support set was registered; a ``RuntimeError`` as well."""


class ShotIndexError(FssError, IndexError):
    """A shot index a class does not have; an ``IndexError`` as well."""


class SettingError(FssError):
    """A refused setting of a library call that a command takes from one of its flags.

    The message template names each setting as ``{name}`` (the argument's name) and the values it
    quotes as further ``{fields}`` given by keyword: ``str()`` reads settings by their names, a command
    by its flags (:meth:`flagged`: ``{val_classes}`` -> ``--val-classes``).
    """

    def __init__(self, template: str, path=None, **values):
        self.template, self.values = template, values
        super().__init__(self.worded(lambda name: name), path)

    def worded(self, word) -> str:
        """The message with each setting named ``word(name)``."""
        fields = {name for _, name, _, _ in string.Formatter().parse(self.template) if name}
        settings = {name: word(name) for name in fields - self.values.keys()}
        return self.template.format(**settings, **self.values)

    def flagged(self) -> FssError:
        """The error as a command words it: each setting named by its flag."""
        return FssError(self.worded(lambda name: "--" + name.replace("_", "-")), self.path)


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
