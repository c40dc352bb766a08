"""`python -m megatron_llamapro.pretrain`: train the new blocks of an expanded checkpoint.

Exit codes: 0 finished; 75 stopped by SIGTERM/SIGUSR1 or --exit-duration-in-mins after saving a
checkpoint (requeue the job: it resumes from --save); 2 bad configuration (one line on stderr,
before any work); 1 anything else.
"""

from __future__ import annotations

import sys
import warnings

from megatron_llamapro.training.config import CONFIG_ERROR_EXIT_CODE, load_config


def main(argv: list[str] | None = None) -> int:
    from megatron_llamapro.training import signals

    signals.install()  # before the slow imports: a preemption signal while starting is not fatal
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed.*")
    from megatron_llamapro.arch import ArchError
    from megatron_llamapro.checkpoint.manifest import ManifestError
    from megatron_llamapro.checkpoint.source import CheckpointError
    from megatron_llamapro.data.blend import DataSpecError
    from megatron_llamapro.training.config import ConfigError

    one_line_errors = (ConfigError, ArchError, CheckpointError, ManifestError, DataSpecError)
    try:
        config = load_config(argv)
        from megatron_llamapro.training.trainer import Trainer

        trainer = Trainer(config)
        trainer.setup()
        code = trainer.run()
    except one_line_errors as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return CONFIG_ERROR_EXIT_CODE
    finally:
        from megatron_llamapro.runtime.distributed import destroy_distributed

        destroy_distributed()
    return code


if __name__ == "__main__":
    sys.exit(main())
