"""The optional ``eval`` extra (lm-eval-harness): one clear error when it is missing."""

from __future__ import annotations

INSTALL_HINT = 'pip install "nsn-peft[eval]"'


class MissingExtraError(ImportError):
    """Task evaluation was asked for but lm-eval-harness is not installed."""


def require_lm_eval() -> None:
    """Raise :class:`MissingExtraError` (naming the install command) unless ``lm_eval`` imports."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise MissingExtraError(
            f"task evaluation needs lm-eval-harness, which is not installed ({err}): {INSTALL_HINT}"
        ) from None
