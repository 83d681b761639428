"""`python -m services.trainer --help` (or under torchrun); see services/trainer/train.py."""

import logging
import os
import sys

from services.trainer.train import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # Under torchrun, skip the interpreter's teardown: gloo's worker threads, destroyed there, can abort
    # a rank that finished cleanly ("terminate called without an active exception", SIGABRT), and
    # torchrun then reports the whole run failed.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
