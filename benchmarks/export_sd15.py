"""Export the full-size SD1.5 architecture (random weights) and report wall time, peak memory and parity.

    .venv/bin/python benchmarks/export_sd15.py [--model build/models/sd15] [--out build/engines/sd15]

Makes the random-weight checkpoint first if it is missing (tools/make_models.py). The export runs in a child
process so that its peak resident memory is measured on its own (os.wait4's rusage of that process).
"""

import sys

import export_report

if __name__ == "__main__":
    sys.exit(export_report.main("sd15", "SD1.5", __doc__))
