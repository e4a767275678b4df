"""The exceptions nsn-peft raises for bad input, by type, so callers (the CLI among them) need not read messages.

Each subclasses the built-in exception that code written before these types existed catches (``ValueError``,
``FileNotFoundError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = ["AdapterLoadError", "NSNError", "NoTokenizerError", "TokenIdError", "UnknownModulesError"]


class NSNError(Exception):
    """Base class of nsn-peft's own errors."""


class AdapterLoadError(NSNError, ValueError):
    """A saved adapter cannot be loaded as it is: its config is not valid JSON, lacks fields, or names another
    PEFT method than the factors its weights hold. The message names the file and what to do."""


class TokenIdError(NSNError, ValueError):
    """Token ids outside the model's vocabulary (a tokenizer of another model?); names the id and the vocab size."""


class NoTokenizerError(NSNError, ValueError):
    """A model folder holds no tokenizer and none was given."""


class UnknownModulesError(NSNError, ValueError):
    """Module names (``target_modules``, rank patterns) that match no module of the model."""
