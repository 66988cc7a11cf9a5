"""The run configuration: typed schemas and their validation (``schema``), and every translation of a ``RunConfig``
into what the layers below need (``translate``)."""
