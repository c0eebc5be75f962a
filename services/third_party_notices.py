"""Notices that this project's own pins and settings make harmless, kept out of every job's log.

Each is dropped by its exact wording at the logger that emits it, so anything else those libraries
say still shows. `services/__init__.py` installs the filters, so they are in place in every driver,
Ray task and actor before torchao is imported (transformers imports it while loading any model).
"""

from __future__ import annotations

import logging

# Set in every job, node and client environment the project starts: torchao's prebuilt kernels target CUDA
# builds of torch, and beside the CPU build each import prints "Failed to load ... .so" for every one of
# them; FP8 training (torchao.float8) does not use them.
QUIET_TORCHAO_ENV = {"TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1"}

HARMLESS_NOTICES = {
    # ... which makes torchao say that it skipped them:
    "torchao": "Skipping import of cpp extensions due to TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1",
    # torchao 0.18 registers its Enums as pytree constants, which torch 2.13 supports natively and
    # warns about on every import; nothing in this project calls register_constant.
    "torch.utils._pytree": "is an Enum subclass and is now natively supported by torch.compile",
}


class DropNotice(logging.Filter):
    def __init__(self, wording: str) -> None:
        super().__init__()
        self.wording = wording

    def filter(self, record: logging.LogRecord) -> bool:
        return self.wording not in record.getMessage()


def drop_harmless_notices() -> None:
    for logger_name, wording in HARMLESS_NOTICES.items():
        logger = logging.getLogger(logger_name)
        if not any(isinstance(existing, DropNotice) for existing in logger.filters):
            logger.addFilter(DropNotice(wording))
