"""lm-eval loads this file for the YAML tasks beside it (``!function shipped_data.NAME``): their documents, built by
``nemo_upcycle.evals.shipped`` from the Shakespeare corpus's held-out part."""

from nemo_upcycle.evals.shipped import cloze, next_line  # noqa: F401 -- what the YAML files name
