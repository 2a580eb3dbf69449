"""python -m nanoalign.report: the pipeline's stages, then the page (see the package's docstring)."""

from nanoalign.config import parse_config
from nanoalign.report import Config, main

main(parse_config(Config))
