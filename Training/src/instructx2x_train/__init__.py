"""Training package of InstructX2X: dataset builder, pseudo masks, synthetic cohort."""

from instructx2x import __version__ as __version__  # one version for the repository: the library's
