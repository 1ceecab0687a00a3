"""Graph rewriter: template analysis and the passes that turn it into a pipelined training graph."""

from .rewrite import TrainingGraph, rewrite
from .template import Template, TemplateError, build_template

__all__ = ["Template", "TemplateError", "TrainingGraph", "build_template", "rewrite"]
