"""Export the full-size SDXL base architecture (random weights) and report wall time, peak memory and parity.

    .venv/bin/python benchmarks/export_sdxl.py [--model build/models/sdxl] [--out build/engines/sdxl]

Makes the random-weight checkpoint first if it is missing (``tools/make_models.py sdxl``: the 2.6B-parameter
UNet, CLIP ViT-L and OpenCLIP bigG, SDXL's VAE; about 14 GB of fp32 safetensors in 2 GB shards). The export
runs in a child process so that its peak resident memory is measured on its own (os.wait4's rusage of that
process); its output needs about 14 GB of disk more.
"""

import sys

import export_report

if __name__ == "__main__":
    sys.exit(export_report.main("sdxl", "SDXL base", __doc__))
