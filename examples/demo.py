"""The quick-start demo: declare → validate → plan → apply → train → merge → save/load.

The demo itself ships inside the package (``adapter_composer.demo``) so that
``adapter-composer demo`` works from any install; this file runs it from a checkout:

    python examples/demo.py [--steps N] [--out DIR]
"""

from adapter_composer.demo import run

if __name__ == "__main__":
    raise SystemExit(run())
