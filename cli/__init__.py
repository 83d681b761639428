"""The top layer: the `offdpo` command and the end-to-end demo. Imports everything below it; nothing
imports it."""
