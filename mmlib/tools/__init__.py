"""Command-line tools around the library (not library code): `make demo` and the notebook runner.

    python -m mmlib.tools.demo             # the trained model at work
    python -m mmlib.tools.run_notebooks    # execute the notebooks, collect their figures
"""
