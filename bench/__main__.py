"""``python -m bench [--quick] [--out DIR]``: devstreams next to direct TCP and ``ssh -R``."""

import argparse
import sys
from pathlib import Path

from devstreams.wire.errors import DevstreamsError

from . import report
from .run import FULL, QUICK, run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes: a correctness run in seconds")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="where results go")
    args = parser.parse_args(argv)
    try:
        results = run(QUICK if args.quick else FULL, log=lambda m: print(m, file=sys.stderr, flush=True))
    except KeyboardInterrupt:
        print("interrupted; all processes stopped", file=sys.stderr)
        return 130
    except (RuntimeError, DevstreamsError) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    files = report.write(results, Path(args.out), "quick" if args.quick else "latest")
    print(report.markdown(results))
    print("written: " + ", ".join(str(f) for f in files), file=sys.stderr)
    intact = report.verdicts(results)["all_intact"][1]
    return 0 if intact else 1


if __name__ == "__main__":
    sys.exit(main())
