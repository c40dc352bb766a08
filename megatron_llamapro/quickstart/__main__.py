from megatron_llamapro.errors import run
from megatron_llamapro.quickstart import main

if __name__ == "__main__":
    run(main)
