"""The one base class of every error a user can fix, for both backends and the CLI."""

from __future__ import annotations


class AdmmPruneError(ValueError):
    """A problem the user can fix: a bad setting, a missing file, a model we cannot prune.

    A ValueError, so callers that caught ValueError keep working. ``field`` names the setting
    at fault where there is one (``"nsamples"``); the CLI turns it into its flag
    (``--nsamples``). The message is one line and says what was expected.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class FactorizationError(AdmmPruneError):
    """A Gram matrix that no Cholesky factorization accepts, even with damping added on the
    diagonal (overflowing or degenerate calibration activations). ``field`` is ``damp``: a
    larger damping, or a wider dtype for the activations, is what a user can change."""

    def __init__(self, message: str, field: str | None = "damp"):
        super().__init__(message, field)
