"""Built-in plugins: one module per method, the operators, architecture maps and site builders.

They are loaded by :func:`registry.load_registry` through the same hooks a third-party
package implements; importing this package registers nothing.
"""
