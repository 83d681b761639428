"""`python -m services.trainer --help` (or under torchrun); see services/trainer/train.py."""
import sys

from services.trainer.train import main

sys.exit(main())
