"""``python -m bench [--quick] [--anchors] [--tls] [--fleet] [--streams [N]] [--out DIR]``: devstreams next
to direct TCP, ``ssh -R`` and a stunnel chain.

The full run includes issue 14's anchor rows (iperf3 1 and 8 streams through every path, CPU seconds
per GB of the relay processes: bench/anchors.py).  ``--anchors`` runs only those (writes
anchors[-quick].md/json); ``--tls`` only the TLS cipher measurement (bench/tlsciphers.py, writes
tls[-quick].md/json).

``--fleet`` runs only the fleet benchmark (bench/fleet.py: 1k .. 10k idle devices, then a hub
restart, on the embedded broker and on Mosquitto); it takes longer than the rest together,
so the full run leaves it out.  ``--quick`` includes a tiny fleet (50, 100 devices).
``--streams`` runs only the gateway stage (bench/gwstreams.py: 5,000 concurrent echo streams at
1 message/s each, then requests beyond capacity); ``--fleet --streams`` runs both, the streams last.
"""

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

from devstreams.wire.errors import DevstreamsError

from . import anchors, fleet, gwstreams, report, tlsciphers
from .run import FULL, QUICK, run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a correctness run in seconds")
    parser.add_argument("--anchors", action="store_true",
                        help="only issue 14's anchor rows: iperf3, bulk, ping-pong, CPU-s per GB per path")
    parser.add_argument("--tls", action="store_true",
                        help="only the TLS cipher measurement (AES-GCM vs ChaCha20-Poly1305 on this CPU)")
    parser.add_argument("--stem", help="with --anchors or --tls: the results file name (default anchors / tls)")
    parser.add_argument("--fleet", action="store_true",
                        help="only the fleet benchmark (with --quick: its tiny stages)")
    parser.add_argument("--streams", nargs="?", type=int, const=0, metavar="N",
                        help="the gateway's concurrent streams stage: 5,000 streams, or N (with --quick: 20)")
    parser.add_argument("--backend", choices=("embedded", "mosquitto"), action="append",
                        help="with --fleet: only this backend (repeatable; default both)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="where results go")
    args = parser.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    machine = f"{platform.system()} {platform.machine()}, Python {platform.python_version()}"
    if args.anchors or args.tls:
        try:
            written = []
            if args.tls:
                tls = tlsciphers.run(tlsciphers.TLS_QUICK if args.quick else tlsciphers.TLS_FULL, log=log)
                written += tlsciphers.write(tls, Path(args.out), args.stem or ("tls-quick" if args.quick else "tls"))
            if args.anchors:
                a = anchors.run(anchors.ANCHORS_QUICK if args.quick else anchors.ANCHORS_FULL, log=log)
                written += anchors.write(a, Path(args.out), args.stem or ("anchors-quick" if args.quick else "anchors"))
        except KeyboardInterrupt:
            print("interrupted; all processes stopped", file=sys.stderr)
            return 130
        except (RuntimeError, DevstreamsError) as exc:
            print(f"bench: error: {exc}", file=sys.stderr)
            return 1
        for f in written:
            if f.suffix == ".md":
                print(f.read_text())
        print("written: " + ", ".join(str(f) for f in written), file=sys.stderr)
        return 0
    try:
        if args.fleet:
            sizes = fleet.FLEET_QUICK if args.quick else fleet.FLEET_FULL
            results = fleet.run(sizes, log=log, backends=tuple(args.backend or ("embedded", "mosquitto")))
        if args.streams is not None:
            sizes = gwstreams.STREAMS_QUICK if args.quick else gwstreams.STREAMS_FULL
            if args.streams:
                sizes = dataclasses.replace(sizes, streams=args.streams)
            streams = gwstreams.run(sizes, log=log)
        elif not args.fleet:
            results = run(QUICK if args.quick else FULL, log=log,
                          fleet_sizes=fleet.FLEET_QUICK if args.quick else None,
                          anchor_sizes=anchors.ANCHORS_QUICK if args.quick else anchors.ANCHORS_FULL)
    except KeyboardInterrupt:
        print("interrupted; all processes stopped", file=sys.stderr)
        return 130
    except (RuntimeError, DevstreamsError) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    if args.streams is not None:
        stem = "streams-quick" if args.quick else f"streams-{streams['sizes']['streams']}"
        files = gwstreams.write(streams, Path(args.out), stem,
                                time.strftime("%Y-%m-%d"), os.cpu_count(), machine)
        print(files[1].read_text())
        print("written: " + ", ".join(str(f) for f in files), file=sys.stderr)
    if args.fleet:
        stem = ("fleet-quick" if args.quick else "fleet") + ("-" + "-".join(args.backend) if args.backend else "")
        files = fleet.write(results, Path(args.out), stem,
                            time.strftime("%Y-%m-%d"), os.cpu_count(),
                            machine)
        print(files[1].read_text())
        print("written: " + ", ".join(str(f) for f in files), file=sys.stderr)
    if args.streams is not None or args.fleet:
        return 0 if args.streams is None or (streams["all_intact"] and streams["beyond_ok"]) else 1
    files = report.write(results, Path(args.out), "quick" if args.quick else "latest")
    print(report.markdown(results))
    print("written: " + ", ".join(str(f) for f in files), file=sys.stderr)
    intact = report.verdicts(results)["all_intact"][1]
    return 0 if intact else 1


if __name__ == "__main__":
    sys.exit(main())
