"""The PBC-ERB benchmark: the shared runs table and settings (``common``), the sweep, the
validation-only selection of settings and the results tables."""
