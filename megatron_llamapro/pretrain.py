"""`python -m megatron_llamapro.pretrain`: train the new blocks of an expanded checkpoint.

Exit codes: 0 finished; 75 stopped by SIGTERM/SIGUSR1 or --exit-duration-in-mins after saving a
checkpoint (requeue the job: it resumes from --save); 2 bad configuration (one line on stderr,
before any work); 1 anything else.
"""

from __future__ import annotations

from megatron_llamapro.errors import entry_point, run


@entry_point
def main(argv: list[str] | None = None) -> int:
    from megatron_llamapro.training import signals

    signals.install()  # before the slow imports: a preemption signal while starting is not fatal
    from megatron_llamapro.runtime.distributed import destroy_distributed
    from megatron_llamapro.training.config import load_config
    from megatron_llamapro.training.trainer import Trainer

    config = load_config(argv)
    if config.check:
        from megatron_llamapro.training.plan import check_only

        print(check_only(config), flush=True)
        return 0
    try:
        trainer = Trainer(config)
        trainer.setup()
        return trainer.run()
    finally:
        destroy_distributed()


if __name__ == "__main__":
    run(main)
