"""Execute the notebooks headless and collect their figures (used by `make demo`).

    python -m mmlib.tools.run_notebooks                       # every notebooks/*.ipynb, in order
    python -m mmlib.tools.run_notebooks notebooks/03_mrl_loss.ipynb --out outputs

Each notebook runs top to bottom in a fresh `python3` kernel with its own folder as the working
directory (as in Jupyter), through nbclient. The executed copy goes to
`<out>/notebooks/<name>.ipynb` (the committed notebooks are left untouched; the kernel
process's own log goes to `<name>.kernel.log` beside it), and every PNG
figure it displayed to `<out>/figures/`, named `<notebook>-<figure>.png` when the cell carries
a `figure:<name>` tag and `<notebook>-<n>.png` (n-th figure of the notebook) otherwise. A
table of execution times is printed and written to `<out>/notebooks/timings.csv`. The exit
status is 1 when a notebook fails (the others still run; the failing cell is reported).
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

FIGURE_TAG = "figure:"


@dataclass
class NotebookRun:
    """Outcome of one notebook: where its outputs went and how long it took."""

    source: Path
    executed: Path
    seconds: float
    figures: list[Path] = field(default_factory=list)
    error: str | None = None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "figure"


def extract_figures(nb, stem: str, figures_dir: Path) -> list[Path]:
    """Write every image/png output of `nb` to `figures_dir`; returns the paths written."""
    figures_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    count = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        tags = cell.get("metadata", {}).get("tags", [])
        names = [t[len(FIGURE_TAG):] for t in tags if t.startswith(FIGURE_TAG)]
        in_cell = 0
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" not in data:
                continue
            count += 1
            in_cell += 1
            if names:
                name = _slug(names[0]) + (f"-{in_cell}" if in_cell > 1 else "")
            else:
                name = str(count)
            path = figures_dir / f"{stem}-{name}.png"
            png = data["image/png"]
            path.write_bytes(base64.b64decode(png if isinstance(png, str) else "".join(png)))
            written.append(path)
    return written


def run_notebook(path: Path, out_dir: Path, timeout: int = 600,
                 kernel_name: str = "python3") -> NotebookRun:
    """Execute one notebook into `out_dir/notebooks`, figures into `out_dir/figures`."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel_name,
                            resources={"metadata": {"path": str(path.parent.resolve())}})
    executed = out_dir / "notebooks" / path.name
    executed.parent.mkdir(parents=True, exist_ok=True)
    error = None
    start = time.perf_counter()
    # The kernel process's own log (not cell output, which is captured in the notebook) goes
    # to a file next to the executed notebook instead of the terminal.
    with open(executed.with_suffix(".kernel.log"), "w") as log:
        try:
            client.execute(stdout=log, stderr=log)
        except CellExecutionError as e:
            # The message holds the failing cell's source and the traceback; keep its head.
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            error = "\n".join(lines[:40])
        except Exception as e:  # kernel died, timeout, ...
            error = f"{type(e).__name__}: {e}"
    seconds = time.perf_counter() - start
    nbformat.write(nb, executed)
    figures = extract_figures(nb, path.stem, out_dir / "figures")
    return NotebookRun(path, executed, seconds, figures, error)


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    """CLI: run notebooks, print timings and output locations; 1 if any notebook failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path,
                        help="notebooks to run (default: notebooks/*.ipynb, sorted)")
    parser.add_argument("--out", type=Path, default=Path("outputs"),
                        help="output folder (default: outputs)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell (default 600)")
    parser.add_argument("--kernel", default="python3", help="Jupyter kernel name")
    args = parser.parse_args(argv)

    paths = args.notebooks or sorted(Path("notebooks").glob("[0-9]*.ipynb"))
    if not paths:
        parser.error("no notebooks found: pass paths, or run from the repository root")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        parser.error(f"not found: {', '.join(map(str, missing))}")
    # Models built from code stay in the checkout, as in the Makefile and the tests.
    os.environ.setdefault("MMLIB_CACHE", str(Path(".cache/mmlib").resolve()))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    runs = []
    total_start = time.perf_counter()
    for path in paths:
        print(f"running {_rel(path)} ...", flush=True)
        run = run_notebook(path, args.out, timeout=args.timeout, kernel_name=args.kernel)
        status = "ok" if run.error is None else "FAILED"
        print(f"  {status} in {run.seconds:.1f} s -> {_rel(run.executed)}, "
              f"{len(run.figures)} figure(s)", flush=True)
        if run.error:
            print("  " + run.error.replace("\n", "\n  "), file=sys.stderr)
        runs.append(run)
    total = time.perf_counter() - total_start

    print(f"\n{'notebook':<32} {'seconds':>8}  status")
    for run in runs:
        print(f"{run.source.name:<32} {run.seconds:>8.1f}  {'ok' if run.error is None else 'FAILED'}")
    print(f"{'total':<32} {total:>8.1f}")
    timings = args.out / "notebooks" / "timings.csv"
    timings.write_text("notebook,seconds,status\n" + "".join(
        f"{r.source.name},{r.seconds:.2f},{'ok' if r.error is None else 'failed'}\n" for r in runs))
    print(f"\nexecuted notebooks: {_rel(args.out / 'notebooks')}/ (timings.csv)")
    print(f"figures: {_rel(args.out / 'figures')}/")
    for run in runs:
        for fig in run.figures:
            print(f"  {_rel(fig)}")
    return 0 if all(r.error is None for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
