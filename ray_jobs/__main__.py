"""`python -m ray_jobs <command>`: ray_jobs.cli."""

import sys

from ray_jobs.cli import main

sys.exit(main())
