"""Built-in cells beyond Keras' own, one module each: the module's ``CELL`` is its entry in ``pipeline.cells``, found
by name (``model.cell=<module>``) without importing the others. A module whose name starts with ``_`` is shared code."""
