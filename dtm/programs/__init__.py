"""The programs of dtm: one module (or package) per command."""
