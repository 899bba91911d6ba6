"""Exceptions users can catch by kind. Each message names the problem and, where there is one, the fix."""

from __future__ import annotations


class MPlusError(Exception):
    """Base class of every error raised on purpose by mplus_agents."""


class UnsupportedModelError(MPlusError, ValueError):
    """The model's architecture cannot carry a latent memory prefix."""


class InvalidInputError(MPlusError, ValueError):
    """Text or messages that cannot be injected or answered (empty, too long, wrong type)."""


class MemoryMismatchError(MPlusError, ValueError):
    """A memory was made with another model or configuration than the one reading it."""


class DefaultModelNotFoundError(MPlusError, FileNotFoundError):
    """The embedded SmolLM2 GGUF is not installed."""


class ModelNotFoundError(MPlusError, FileNotFoundError):
    """A model path that is not a local model directory (nothing is ever downloaded from a hub)."""


class PromptTooLongError(InvalidInputError):
    """Memory prefix + prompt + reply would not fit the model's positions."""


class CheckpointError(MPlusError, ValueError):
    """A checkpoint directory that cannot be loaded as it stands: not a checkpoint, missing or unexpected
    weights, a shape that does not fit, or a config.json that contradicts the weights."""
