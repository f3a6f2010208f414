"""``python -m vcpo_optim.demo``."""

import sys

from vcpo_optim.demo import main

sys.exit(main())
