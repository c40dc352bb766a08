"""`python -m megatron_llamapro.pretrain`: train the new blocks of an expanded checkpoint.

Exit codes: 0 finished; 75 stopped by SIGTERM/SIGUSR1 or --exit-duration-in-mins (requeue the job:
it resumes from the latest checkpoint in --save; the stop line says whether it saved one), and then
at once, without the interpreter's teardown; 2 bad configuration (one line on stderr, before any
work); 1 anything else.
"""

from __future__ import annotations

from megatron_llamapro.errors import EXIT_PREEMPTED, entry_point


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
    import sys

    from megatron_llamapro.training import signals

    code = main(None)
    if code == EXIT_PREEMPTED:  # a stop signal: Slurm's SIGKILL may follow KillWait seconds later
        signals.exit_at_once(code)
    sys.exit(code)
