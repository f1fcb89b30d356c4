"""bespoke's built-in plugins. Each module is one entry point of group ``bespoke`` and uses only
the public API (``bespoke`` and its documented stage modules), like a third-party plugin."""
