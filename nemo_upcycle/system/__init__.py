"""Process and file-system services every layer may use: the mark and atomic writes (``files``), ranks
(``launcher``)."""
