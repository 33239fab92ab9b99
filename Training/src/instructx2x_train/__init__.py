"""Training package of InstructX2X: dataset builder, pseudo masks, synthetic cohort."""

__version__ = "0.1.0"
