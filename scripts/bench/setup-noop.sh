#!/bin/bash
# The script timed by scripts/bench-setup.sh: does nothing, so that what is
# measured is the cost of starting and recording a script.
exit 0
