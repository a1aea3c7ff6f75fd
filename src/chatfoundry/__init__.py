"""chatfoundry: the ChatGPT recipe, small enough to read and run on a laptop."""

import os

# OpenMP threads that wait for work spin by default. On a small machine where another process
# holds a core, torch's threads then spin against it: on 2 cores with one busy, 60 pretraining
# steps took 98 s spinning and 8 s waiting passively. With both cores free, passive waiting costs
# about 5% (250 steps: 21.5 s -> 23 s). Read when the OpenMP runtime starts: before torch loads.
# OMP_WAIT_POLICY=ACTIVE in the environment takes the spinning back.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
