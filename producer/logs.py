"""The one logging set-up every ``embedfleet`` command uses."""

from __future__ import annotations

import logging

from producer.settings import set_env

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(verbose: bool) -> None:
    """INFO with ``--verbose``, else WARNING; libraries' progress bars and chatter off."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format=FORMAT)
    # The Rust tokenizer's own threads: on, unless the user chose (a forked process turns them off).
    set_env("TOKENIZERS_PARALLELISM", "true", overwrite=False)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # the producer side runs without transformers
        pass
